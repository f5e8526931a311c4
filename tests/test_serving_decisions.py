"""Tables for the serving decisions: phase and conditions from Deployments, feasibility of a
spec, and condition bookkeeping."""

from __future__ import annotations

from typing import Any

import pytest

from trimtab.api.common import Condition
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.decisions.conditions import set_condition
from trimtab.decisions.serving import (
    DeploymentObservation,
    find_spec_problems,
    revision_serving,
    serving_state,
)

NOW = "2026-01-01T00:00:00Z"


def obs(
    revision: str,
    replicas: int = 2,
    ready: int = 0,
    updated: int | None = None,
    observed: int = 1,
    conditions: tuple[tuple[str, str, str, str], ...] = (),
) -> DeploymentObservation:
    return DeploymentObservation(
        revision=revision,
        name=f"m-{revision}",
        replicas=replicas,
        generation=1,
        observed_generation=observed,
        status_replicas=max(ready, replicas if observed else 0),
        ready_replicas=ready,
        updated_replicas=ready if updated is None else updated,
        available_replicas=ready,
        conditions=conditions,
    )


STATES = [
    pytest.param([], "Pending", False, id="no-deployment-yet"),
    pytest.param([obs("b", observed=0)], "Pending", False, id="controller-not-caught-up"),
    pytest.param([obs("b", ready=1), obs("a", ready=2)], "Progressing", False, id="half-ready"),
    pytest.param([obs("b", ready=2), obs("a", ready=2)], "Ready", True, id="current-ready"),
    pytest.param([obs("b", replicas=0)], "Ready", True, id="scaled-to-zero"),
    pytest.param(
        [
            obs(
                "b",
                ready=0,
                conditions=(("Progressing", "False", "ProgressDeadlineExceeded", "x"),),
            )
        ],
        "Degraded",
        False,
        id="deadline-exceeded",
    ),
    pytest.param(
        [obs("b", ready=1, conditions=(("ReplicaFailure", "True", "FailedCreate", "quota"),))],
        "Degraded",
        False,
        id="replica-failure",
    ),
    pytest.param([obs("a", ready=2)], "Pending", False, id="only-old-revision"),
]


@pytest.mark.parametrize(("deployments", "phase", "current_ready"), STATES)
def test_serving_state(
    deployments: list[DeploymentObservation], phase: str, current_ready: bool
) -> None:
    state = serving_state("b", deployments, [], 3, NOW)
    assert state.phase == phase
    assert state.current_ready is current_ready
    conds = {c.type: c for c in state.conditions}
    assert conds["Ready"].status == ("True" if phase == "Ready" else "False")
    assert conds["Degraded"].status == ("True" if phase == "Degraded" else "False")
    assert conds["Progressing"].status == (
        "True" if phase in ("Pending", "Progressing") else "False"
    )
    assert all(c.observed_generation == 3 for c in state.conditions)


def test_steady_state_keeps_transition_times() -> None:
    first = serving_state("b", [obs("b", ready=2)], [], 1, NOW)
    again = serving_state("b", [obs("b", ready=2)], first.conditions, 1, "2026-01-02T00:00:00Z")
    assert again.conditions == first.conditions


def test_condition_transition_time_moves_only_on_flip() -> None:
    conds = set_condition([], "Ready", "False", "Waiting", "", "t1")
    conds = set_condition(conds, "Ready", "False", "Waiting", "still", "t2")
    assert conds[0].last_transition_time == "t1"
    conds = set_condition(conds, "Ready", "True", "Ok", "", "t3")
    assert conds == [
        Condition(type="Ready", status="True", reason="Ok", message="", last_transition_time="t3")
    ]


PROBLEMS: list[Any] = [
    pytest.param(
        {"server": "vllm", "args": ["--tensor-parallel-size", "2"], "resources": {"gpu": 2}},
        [],
        id="tp-fits",
    ),
    pytest.param(
        {"server": "vllm", "args": ["--tensor-parallel-size=4"], "resources": {"gpu": 2}},
        ["spec.args: --tensor-parallel-size 4 needs 4 GPUs"],
        id="tp-too-large",
    ),
    pytest.param(
        {"server": "vllm", "args": ["-tp", "two"], "resources": {"gpu": 2}},
        ["is not a positive integer"],
        id="tp-not-a-number",
    ),
    pytest.param(
        {"server": "tgi", "args": ["--num-shard", "2"], "resources": {"gpu": 1}},
        ["--num-shard 2 needs 2 GPUs"],
        id="tgi-shards",
    ),
    pytest.param(
        {"resources": {"memory": "8Gi", "memoryLimit": "4Gi"}},
        ["spec.resources.memoryLimit: 4Gi is below the request 8Gi"],
        id="memory-limit-low",
    ),
    pytest.param(
        {"resources": {"cpu": "2", "cpuLimit": "1500m"}},
        ["spec.resources.cpuLimit"],
        id="cpu-limit-low",
    ),
    pytest.param(
        {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
        ["spec.env: duplicate names A"],
        id="duplicate-env",
    ),
    pytest.param(
        {"volumes": [{"name": "w", "emptyDir": {}}],
         "volumeMounts": [{"name": "w", "mountPath": "/m"}, {"name": "x", "mountPath": "/x"}]},
        ["spec.volumeMounts: no volume named x"],
        id="mount-of-an-unknown-volume"),
    pytest.param(
        {"volumes": [{"name": "w", "emptyDir": {}}, {"name": "v", "emptyDir": {}}],
         "volumeMounts": [{"name": "w", "mountPath": "/m"}, {"name": "v", "mountPath": "/m"}]},
        ["spec.volumeMounts: /m mounted more than once"],
        id="two-mounts-on-one-path"),
    pytest.param(
        {"server": "vllm", "resources": {"gpu": 1}, "volumes": [{"name": "dshm", "emptyDir": {}}]},
        ['the name "dshm" is taken'],
        id="dshm-name-taken-by-the-added-shm"),
    pytest.param(
        {"server": "vllm", "resources": {"gpu": 1},
         "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}],
         "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]},
        [],
        id="own-shm-named-dshm"),
    pytest.param(
        {"server": "generic", "resources": {"gpu": 1},
         "volumes": [{"name": "dshm", "emptyDir": {}}],
         "volumeMounts": [{"name": "dshm", "mountPath": "/scratch"}]},
        [],
        id="dshm-free-where-no-shm-is-added"),
    pytest.param(
        {"topologySpread": [{"topologyKey": "kubernetes.io/hostname"},
                            {"topologyKey": "kubernetes.io/hostname", "maxSkew": 2}]},
        ["spec.topologySpread: kubernetes.io/hostname given more than once"],
        id="one-topology-key-twice"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "expected"), PROBLEMS)
def test_find_spec_problems(spec: dict[str, Any], expected: list[str]) -> None:
    problems = find_spec_problems(ModelDeploymentSpec.model_validate({"image": "x", **spec}))
    assert len(problems) == len(expected)
    for problem, fragment in zip(problems, expected, strict=True):
        assert fragment in problem


def _deployment(**kw: Any) -> DeploymentObservation:
    base: dict[str, Any] = dict(
        revision="b",
        name="m-b",
        replicas=3,
        generation=2,
        observed_generation=2,
        status_replicas=3,
        ready_replicas=3,
        updated_replicas=3,
        available_replicas=3,
    )
    return DeploymentObservation(**{**base, **kw})


@pytest.mark.parametrize(
    ("obs", "expected"),
    [
        pytest.param(_deployment(), True, id="all-current-and-ready"),
        pytest.param(_deployment(generation=3, replicas=5), True, id="scale-not-yet-observed"),
        pytest.param(
            _deployment(
                generation=1,
                observed_generation=0,
                status_replicas=0,
                ready_replicas=0,
                updated_replicas=0,
                available_replicas=0,
            ),
            False,
            id="new-deployment-nothing-observed",
        ),
        pytest.param(
            # The old pods serve the same revision's model while the new one starts.
            _deployment(status_replicas=4, updated_replicas=1, ready_replicas=3),
            True,
            id="template-rolling-old-pods-still-serve",
        ),
        pytest.param(
            _deployment(status_replicas=4, updated_replicas=2, ready_replicas=3),
            True,
            id="template-rolling-one-new-pod-ready",
        ),
        pytest.param(_deployment(ready_replicas=0), False, id="crashed-pods"),
    ],
)
def test_revision_serving(obs: DeploymentObservation, expected: bool) -> None:
    assert revision_serving(obs) is expected
