"""Which revisions' signals the autoscaler reads during a rollout, and how it splits what it
decides: while the candidate only receives mirrored copies, its load is not user demand."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.test_modeldeployment_operator import model
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.serving import deployment_name, revision_of
from trimtab.handlers import autoscaling
from trimtab.metrics.base import SIGNAL_NAMES, QueryResult, Signals


class FakeKube:
    """Deployments by name; scale writes recorded."""

    def __init__(self, deployments: dict[str, dict[str, Any]]) -> None:
        self.deployments = deployments
        self.scaled: dict[str, int] = {}

    async def get(self, _res: Any, _ns: str, name: str) -> dict[str, Any] | None:
        return self.deployments.get(name)

    async def scale(self, _res: Any, _ns: str, name: str, replicas: int) -> None:
        self.scaled[name] = replicas

    async def patch_status(self, *_: Any, **__: Any) -> None:
        return None


def _deployment(name: str, replicas: int, ready: int) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"replicas": replicas},
            "status": {"readyReplicas": ready}}  # fmt: skip


@pytest.mark.parametrize(
    ("weights", "router", "signal_revision", "ready"),
    [
        pytest.param(
            {"stable": 100, "candidate": 0, "mirrorPercent": 100},
            {"type": "istio", "host": "m.example"},
            "stable",
            4,
            id="shadow-reads-stable-only",
        ),
        pytest.param(
            {"stable": 90, "candidate": 10, "mirrorPercent": 0},
            {"type": "istio", "host": "m.example"},
            None,
            6,
            id="canary-reads-both",
        ),
    ],
)
async def test_signals_during_a_rollout(
    monkeypatch: pytest.MonkeyPatch,
    weights: dict[str, int],
    router: dict[str, Any],
    signal_revision: str | None,
    ready: int,
) -> None:
    base = model("chat", image="srv:1", replicas=4)
    stable = revision_of(ModelDeploymentSpec.model_validate(base["spec"]))
    body = model("chat", image="srv:2", replicas=4)
    candidate = revision_of(ModelDeploymentSpec.model_validate(body["spec"]))
    body["spec"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 8}
    body["spec"]["rollout"] = {"router": router}
    body["metadata"].setdefault("namespace", "default")
    body["status"] = {
        "rollout": {
            "stableRevision": stable,
            "candidateRevision": candidate,
            "stepIndex": -1 if weights["mirrorPercent"] else 0,
            "weights": weights,
            "stableModel": ModelDeploymentSpec.model_validate(base["spec"]).model_part(),
        },
        "autoscaling": {"desiredReplicas": 8},
    }
    kube = FakeKube(
        {
            deployment_name("chat", stable): _deployment(deployment_name("chat", stable), 4, 4),
            deployment_name("chat", candidate): _deployment(
                deployment_name("chat", candidate), 4, 2
            ),
        }
    )
    read: list[str | None] = []
    decided: list[Any] = []

    async def fake_read(_pool: Any, _spec: Any, _ns: str, _name: str, revision: str | None) -> Any:
        read.append(revision)
        return Signals.from_results({n: QueryResult.unavailable("down") for n in SIGNAL_NAMES})

    real_decide = autoscaling.decide_replicas

    def capture(inputs: Any) -> Any:
        decided.append(inputs)
        return real_decide(inputs)

    monkeypatch.setattr(autoscaling, "_read", fake_read)
    monkeypatch.setattr(autoscaling, "decide_replicas", capture)
    monkeypatch.setattr(autoscaling.kopf, "warn", lambda *_, **__: None)
    monkeypatch.setattr(autoscaling.kopf, "event", lambda *_, **__: None)
    await autoscaling.autoscale_once(
        kube,  # type: ignore[arg-type]  # the calls autoscale_once makes, recorded
        None,  # type: ignore[arg-type]  # _read is replaced: no metrics pool is used
        body,
        logging.getLogger("test"),
        autoscaling.LoopMemory(),
        300.0,
    )
    assert read == [stable if signal_revision == "stable" else None]
    assert decided[0].ready_replicas == ready


async def test_without_a_rollout_a_new_revision_is_sized_from_all_revisions_signals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without spec.rollout, the old revision serves every request through the shared Service
    while the new one cold-starts. Reading the new revision's series alone saw no traffic
    (hold, and nothing recorded), then only the share its first ready pods got, and cut it
    before the old revision was retired."""
    body = model("chat", image="srv:2", replicas=10)
    new = revision_of(ModelDeploymentSpec.model_validate(body["spec"]))
    old = revision_of(ModelDeploymentSpec.model_validate(model("chat", image="srv:1")["spec"]))
    body["spec"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 20, "coldStart": "8m"}
    body["metadata"].setdefault("namespace", "default")
    body["status"] = {"autoscaling": {"desiredReplicas": 10}}
    kube = FakeKube(
        {
            deployment_name("chat", old): _deployment(deployment_name("chat", old), 10, 10),
            deployment_name("chat", new): _deployment(deployment_name("chat", new), 10, 3),
        }
    )
    read: list[str | None] = []

    async def fake_read(_pool: Any, _spec: Any, _ns: str, _name: str, revision: str | None) -> Any:
        read.append(revision)
        # Every request, both revisions: 20 req/s of 2.5 s each, no queue (10 replicas' worth).
        values = {"queueDepth": 0.0, "running": 50.0, "arrivalRate": 20.0, "serviceTime": 2.5}
        return Signals.from_results(
            {n: QueryResult.of(values[n]) if n in values else QueryResult.no_data("none")
             for n in SIGNAL_NAMES}
        )  # fmt: skip

    monkeypatch.setattr(autoscaling, "_read", fake_read)
    monkeypatch.setattr(autoscaling.kopf, "warn", lambda *_, **__: None)
    monkeypatch.setattr(autoscaling.kopf, "event", lambda *_, **__: None)
    await autoscaling.autoscale_once(
        kube,  # type: ignore[arg-type]  # the calls autoscale_once makes, recorded
        None,  # type: ignore[arg-type]  # _read is replaced: no metrics pool is used
        body,
        logging.getLogger("test"),
        autoscaling.LoopMemory(),
        300.0,
    )
    assert read == [None]
    # Sized for all the traffic, which it carries once the old revision is retired.
    assert kube.scaled.get(deployment_name("chat", new), 10) >= 10
    assert deployment_name("chat", old) not in kube.scaled
