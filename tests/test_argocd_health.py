"""The Argo CD health check (charts/trimtab/argocd/health.lua) run in a real Lua 5.1 (lupa, the
version Argo CD's gopher-lua implements) against statuses built from trimtab's own status models,
so a renamed status field breaks this test rather than the Argo CD UI."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from lupa import lua51

from tests.validation import ROOT
from trimtab.api.common import Condition, ConditionStatus
from trimtab.api.modeldeployment import ModelDeploymentStatus
from trimtab.api.rollout import RolloutStatus, Weights
from trimtab.api.trainingjob import TrainingJobStatus

ARGOCD = ROOT / "charts" / "trimtab" / "argocd"
HEALTH_LUA = (ARGOCD / "health.lua").read_text()


def run_health(obj: dict[str, Any]) -> tuple[str, str]:
    """Run health.lua as Argo CD does: `obj` a global table, the script returns hs."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(HEALTH_LUA)
    assert set(hs.keys()) == {"status", "message"}
    return str(hs["status"]), str(hs["message"])


def cond(type_: str, status: ConditionStatus, reason: str = "", message: str = "") -> Condition:
    return Condition(type=type_, status=status, reason=reason, message=message)


def mdep(status: ModelDeploymentStatus | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "trimtab.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "llama", "namespace": "ml", "generation": generation},
        "spec": {"image": "vllm/vllm-openai:v0.6.0"},
    }
    if status is not None:
        obj["status"] = status.to_wire()
    return obj


def tj(status: TrainingJobStatus | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "trimtab.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "pretrain", "namespace": "ml", "generation": generation},
        "spec": {"image": "ghcr.io/acme/train:1", "command": ["train.py"], "workers": 4},
    }
    if status is not None:
        obj["status"] = status.to_wire()
    return obj


READY = [cond("Ready", "True"), cond("Progressing", "False"), cond("Degraded", "False")]

MODELDEPLOYMENT_CASES = [
    pytest.param(mdep(None), "Progressing", "Waiting for trimtab", id="no-status-yet"),
    pytest.param(
        mdep(ModelDeploymentStatus(phase="Ready", observed_generation=2, conditions=READY), 3),
        "Progressing",
        "observe generation 3",
        id="status-of-an-older-generation",
    ),
    pytest.param(
        mdep(ModelDeploymentStatus(phase="Pending", observed_generation=1)),
        "Progressing",
        "Pending",
        id="pending",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Progressing", observed_generation=1, message="1/3 replicas ready"
            )
        ),
        "Progressing",
        "1/3 replicas ready",
        id="replicas-rolling-out",
    ),
    pytest.param(
        mdep(ModelDeploymentStatus(phase="Ready", observed_generation=1, conditions=READY)),
        "Healthy",
        "",
        id="ready",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Ready",
                observed_generation=1,
                conditions=READY,
                rollout=RolloutStatus(phase="Stable", stable_revision="abc123"),
            )
        ),
        "Healthy",
        "",
        id="ready-stable-rollout",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Ready",
                observed_generation=1,
                conditions=READY,
                rollout=RolloutStatus(phase="Watching", stable_revision="def456"),
            )
        ),
        "Healthy",
        "watching it against the SLO",
        id="promoted-and-watched",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Degraded",
                observed_generation=1,
                conditions=[cond("Degraded", "True", "ImagePullBackOff", "image not found")],
            )
        ),
        "Degraded",
        "image not found",
        id="degraded-phase",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Progressing",
                observed_generation=1,
                conditions=[cond("Degraded", "True", "ProgressDeadlineExceeded", "")],
            )
        ),
        "Degraded",
        "ProgressDeadlineExceeded",
        id="degraded-condition-wins-over-phase",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Ready",
                observed_generation=1,
                conditions=READY,
                rollout=RolloutStatus(
                    phase="Canary",
                    stable_revision="abc123",
                    candidate_revision="def456",
                    weights=Weights(stable=75, candidate=25),
                ),
            )
        ),
        "Progressing",
        "canary at 25%",
        id="canary-step",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Ready",
                observed_generation=1,
                conditions=READY,
                rollout=RolloutStatus(phase="Shadow", candidate_revision="def456"),
            )
        ),
        "Progressing",
        "shadow traffic",
        id="shadow",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Ready",
                observed_generation=1,
                conditions=READY,
                rollout=RolloutStatus(
                    phase="Paused", reason="step 2 waits for promotion", candidate_revision="d"
                ),
            )
        ),
        "Suspended",
        "Rollout paused: step 2 waits for promotion",
        id="paused-rollout",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Ready",
                observed_generation=1,
                conditions=[
                    *READY,
                    cond("MetricsAvailable", "False", "QueryFailed", "p99 latency: no data"),
                ],
            )
        ),
        "Suspended",
        "Metrics unavailable, no scale-down: p99 latency: no data",
        id="metrics-unavailable",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Ready",
                observed_generation=1,
                conditions=[*READY, cond("MetricsAvailable", "True")],
            )
        ),
        "Healthy",
        "",
        id="metrics-available",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Ready",
                observed_generation=1,
                conditions=READY,
                rollout=RolloutStatus(
                    phase="RolledBack",
                    reason="p99 latency 2.1x the stable's",
                    stable_revision="abc123",
                    failed_revision="def456",
                ),
            )
        ),
        "Degraded",
        "Rolled back revision def456: p99 latency 2.1x the stable's",
        id="rolled-back",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Ready",
                observed_generation=1,
                conditions=READY,
                rollout=RolloutStatus(
                    phase="FellBack", reason="error rate over SLO", stable_revision="abc123"
                ),
            )
        ),
        "Degraded",
        "last known-good revision abc123",
        id="fell-back",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Degraded",
                observed_generation=1,
                conditions=[cond("Degraded", "True", "BadSpec", "no GPUs of that kind")],
                rollout=RolloutStatus(phase="Paused"),
            )
        ),
        "Degraded",
        "no GPUs",
        id="degraded-wins-over-paused",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Ready",
                observed_generation=1,
                conditions=[*READY, cond(
                    "RouteAccepted", "False", "NotAllowedByListeners",
                    "HTTPRoute llama: Gateway infra/main did not accept it",
                )],
                rollout=RolloutStatus(phase="Paused"),
            )
        ),
        "Degraded",
        "Route not accepted: HTTPRoute llama: Gateway infra/main did not accept it",
        id="route-refused-by-its-gateway",
    ),
    pytest.param(
        mdep(
            ModelDeploymentStatus(
                phase="Ready",
                observed_generation=1,
                conditions=[*READY, cond("RouteAccepted", "Unknown", "Pending", "no report yet")],
            )
        ),
        "Healthy",
        "",
        id="route-not-yet-reported-on",
    ),
]


@pytest.mark.parametrize(("obj", "health", "message"), MODELDEPLOYMENT_CASES)
def test_modeldeployment_health(obj: dict[str, Any], health: str, message: str) -> None:
    got_health, got_message = run_health(obj)
    assert got_health == health
    assert message in got_message


TRAININGJOB_CASES = [
    pytest.param(tj(None), "Progressing", "Waiting for trimtab", id="no-status-yet"),
    pytest.param(tj(TrainingJobStatus(phase="Pending")), "Progressing", "Pending", id="pending"),
    pytest.param(
        tj(TrainingJobStatus(phase="Queued", conditions=[cond("Queued", "True")])),
        "Progressing",
        "Kueue",
        id="queued-for-kueue",
    ),
    pytest.param(
        tj(TrainingJobStatus(phase="Starting", message="2/4 workers running")),
        "Progressing",
        "2/4 workers running",
        id="starting",
    ),
    pytest.param(
        tj(TrainingJobStatus(phase="Running", workers=4, workers_ready=4)),
        "Progressing",
        "(4/4 workers ready)",
        id="running",
    ),
    pytest.param(
        tj(TrainingJobStatus(phase="Restarting", restarts=2)),
        "Progressing",
        "restarts: 2",
        id="restarting-from-checkpoint",
    ),
    pytest.param(
        tj(TrainingJobStatus(phase="Suspended", conditions=[cond("Suspended", "True")])),
        "Suspended",
        "spec.suspend",
        id="suspended",
    ),
    pytest.param(
        tj(TrainingJobStatus(phase="Succeeded", conditions=[cond("Succeeded", "True")])),
        "Healthy",
        "succeeded",
        id="succeeded",
    ),
    pytest.param(
        tj(
            TrainingJobStatus(
                phase="Failed",
                conditions=[cond("Failed", "True", "BackoffLimitExceeded", "3 restarts used")],
            )
        ),
        "Degraded",
        "3 restarts used",
        id="failed",
    ),
    pytest.param(
        tj(TrainingJobStatus(phase="Running", observed_generation=1), generation=2),
        "Progressing",
        "observe generation 2",
        id="status-of-an-older-generation",
    ),
]


@pytest.mark.parametrize(("obj", "health", "message"), TRAININGJOB_CASES)
def test_trainingjob_health(obj: dict[str, Any], health: str, message: str) -> None:
    got_health, got_message = run_health(obj)
    assert got_health == health
    assert message in got_message


def test_every_phase_has_a_health() -> None:
    """A phase added to a model later must not fall through to a wrong answer silently."""
    from typing import get_args

    from trimtab.api import modeldeployment, rollout, trainingjob

    for phase in get_args(modeldeployment.Phase):
        health, _ = run_health(mdep(ModelDeploymentStatus(phase=phase, observed_generation=1)))
        assert health in {"Healthy", "Progressing", "Degraded"}, phase
    for phase in get_args(rollout.RolloutPhase):
        status = ModelDeploymentStatus(
            phase="Ready", observed_generation=1, rollout=RolloutStatus(phase=phase)
        )
        assert (
            run_health(mdep(status))[0]
            == {
                "Stable": "Healthy",
                "Watching": "Healthy",
                "Shadow": "Progressing",
                "Canary": "Progressing",
                "Paused": "Suspended",
                "RolledBack": "Degraded",
                "FellBack": "Degraded",
            }[phase]
        )
    for phase in get_args(trainingjob.Phase):
        health, _ = run_health(tj(TrainingJobStatus(phase=phase)))
        expected = {"Succeeded": "Healthy", "Failed": "Degraded", "Suspended": "Suspended"}
        assert health == expected.get(phase, "Progressing"), phase


def test_argocd_cm_snippet_embeds_the_same_lua() -> None:
    snippet = yaml.safe_load((ARGOCD / "argocd-cm-snippet.yaml").read_text())
    assert snippet["kind"] == "ConfigMap" and snippet["metadata"]["name"] == "argocd-cm"
    assert snippet["data"] == {
        "resource.customizations.health.trimtab.io_ModelDeployment": HEALTH_LUA,
        "resource.customizations.health.trimtab.io_TrainingJob": HEALTH_LUA,
    }
