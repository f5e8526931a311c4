"""The autoscaling loop between its status writes, with a fake API client and metrics source:
a loop that writes nothing still carries its decision (the recommendation history above all)
to the next, and a new loop (an operator restart) resumes from the last written status."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from tests.test_modeldeployment_operator import model
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.serving import deployment_name, revision_of
from trimtab.handlers.autoscaling import LoopMemory, autoscale_once, autoscaling_loop
from trimtab.kube.resources import Resource
from trimtab.metrics.base import QueryResult

LOG = logging.getLogger("test")
BODY = model(
    "chat",
    replicas=2,
    slo={"p99LatencyMs": 2000},
    # Bounds that pin the decision to 2: this test is about what is written, not how many.
    autoscaling={"minReplicas": 2, "maxReplicas": 2, "interval": "1s"},
)
DEPLOYMENT = deployment_name("chat", revision_of(ModelDeploymentSpec.model_validate(BODY["spec"])))


class FakeKube:
    """The Deployment to scale, and status patches applied to the body as the watch would."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.status_patches: list[dict[str, Any]] = []

    async def get(self, res: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        if name != DEPLOYMENT:
            return None
        return {"metadata": {"name": name}, "spec": {"replicas": 2}, "status": {"readyReplicas": 2}}

    async def patch_status(
        self, res: Resource, namespace: str, name: str, status: dict[str, Any], rv: Any = None
    ) -> dict[str, Any]:
        self.status_patches.append(status)
        self.body["status"] = _merged(self.body.get("status") or {}, status)
        return self.body


def _merged(current: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch applied (RFC 7386)."""
    out = dict(current)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


class FakePool:
    """Every query answers its signal's value from `values` (None: no data)."""

    def __init__(self, values: dict[str, float | None]) -> None:
        self.values = values

    def get(self, url: str | None = None) -> FakePool:
        return self

    async def query_batch(self, queries: Mapping[str, str]) -> dict[str, QueryResult]:
        return {
            name: QueryResult.no_data("no series matched")
            if self.values.get(name) is None
            else QueryResult.of(float(self.values[name] or 0))
            for name in queries
        }


STEADY: dict[str, float | None] = {
    "queueDepth": 0.0,
    "running": 5.0,
    "arrivalRate": 5.0,
    "serviceTime": 1.0,
    "p99Latency": 1.0,
    "errorRate": 0.0,
}


def loop(kube: FakeKube, pool: FakePool, memory: LoopMemory) -> float:
    return asyncio.run(
        autoscale_once(kube, pool, kube.body, LOG, memory, 3600.0)  # type: ignore[arg-type]  # fakes
    )


def test_unwritten_loops_carry_their_history_and_a_restart_resumes_from_status() -> None:
    kube, pool = FakeKube(copy.deepcopy(BODY)), FakePool(dict(STEADY))
    memory = LoopMemory()
    for _ in range(4):
        loop(kube, pool, memory)
    assert len(kube.status_patches) == 1  # the first decision; nothing that matters moved since
    assert memory.autoscaling is not None
    assert len(memory.autoscaling["recommendations"]) == 4  # every loop's, though unwritten
    written = kube.body["status"]["autoscaling"]
    assert len(written["recommendations"]) == 1

    # A restart: a new loop starts from the written status and loses only what was unwritten.
    restarted = LoopMemory()
    loop(kube, pool, restarted)
    assert restarted.autoscaling is not None
    assert len(restarted.autoscaling["recommendations"]) == 2
    assert len(kube.status_patches) == 1

    # A signal losing its data is written at once, with the history carried so far.
    pool.values["queueDepth"] = None
    loop(kube, pool, memory)
    assert len(kube.status_patches) == 2
    written = kube.body["status"]["autoscaling"]
    states = {s["name"]: s["state"] for s in written["signals"]}
    assert states["queueDepth"] == "noData"
    assert len(written["recommendations"]) == 5


class OneWait:
    """kopf's DaemonStopped for one loop: false until the daemon has waited once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __bool__(self) -> bool:
        return bool(self.waits)

    async def wait(self, seconds: float) -> None:
        self.waits.append(seconds)


def test_a_failed_loop_retries_after_the_specs_interval() -> None:
    """A loop that raises (here: no API client at all) is retried after the resource's own
    autoscaling.interval, not a fixed default."""
    body = copy.deepcopy(BODY)
    body["spec"]["autoscaling"]["interval"] = "7s"
    stopped = OneWait()
    memo = SimpleNamespace(
        settings=SimpleNamespace(autoscaling_status_refresh_seconds=30.0),
        kube=None,
        metrics_pool=None,
    )
    asyncio.run(autoscaling_loop(body=body, stopped=stopped, memo=memo, logger=LOG))  # type: ignore[arg-type]  # fakes
    assert stopped.waits == [7.0]
