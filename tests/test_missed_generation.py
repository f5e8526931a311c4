"""A spec change kopf took for handled without running the reconcile is reconciled anyway.

kopf records a create as handled with the body it last saw, so a change that lands while the
create's handlers finish fires no update (kopf issue 1178): the Deployments kept the old spec
until the next change. It showed as a rare failure of test_rollout_removed. The timer
`converge_modeldeployment` finds a generation past status.observedGeneration that no
reconcile is working on, and reconciles it."""

from __future__ import annotations

import asyncio
import logging
import types
from typing import Any

import kopf
import pytest

from tests.conftest import Cluster
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import MD_PATH, model, serving_deployments
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.serving import revision_of
from trimtab.handlers import modeldeployment as handler


class Running:
    """kopf's `stopped` of a timer nobody stops: its wait is a sleep."""

    def wait(self, timeout: float) -> Any:
        return asyncio.sleep(timeout)

    def __bool__(self) -> bool:
        return False


class Stopping(Running):
    """The timer kopf stops (the resource is being deleted) while it waits."""

    def __bool__(self) -> bool:
        return True


async def _converge(
    cluster: Cluster, body: dict[str, Any], stopped: Any = None
) -> kopf.Patch:
    patch = kopf.Patch()
    await handler.converge_modeldeployment(
        body=kopf.Body(body),
        spec=kopf.Spec(kopf.Body(body)),
        patch=patch,
        memo=types.SimpleNamespace(kube=cluster.kube),
        logger=logging.getLogger("t"),
        stopped=stopped or Running(),
        serving_deployments={},
    )
    return patch


@pytest.mark.parametrize(
    ("in_progress", "reconciled"),
    [
        pytest.param(False, True, id="a-change-no-handler-took-up"),
        pytest.param(True, False, id="a-change-the-reconcile-is-working-on"),
    ],
)
async def test_a_generation_no_reconcile_saw_is_reconciled(
    api: ApiServerEmulator,
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    in_progress: bool,
    reconciled: bool,
) -> None:
    monkeypatch.setattr(handler.kopf, "event", lambda *_, **__: None)
    await cluster.create(MD_PATH, model("llm", image="srv:1"))
    # What kopf's create saw and the reconcile recorded: generation 1.
    await cluster.merge(f"{MD_PATH}/llm/status", {"status": {"observedGeneration": 1}})
    # The change that landed while the create finished: generation 2, never reconciled.
    change: dict[str, Any] = {"spec": {"image": "srv:2"}}
    if in_progress:
        change["metadata"] = {"annotations": {handler.RECONCILE_PROGRESS: '{"started": "x"}'}}
    body = await cluster.merge(f"{MD_PATH}/llm", change)
    assert body["metadata"]["generation"] == 2

    await _converge(cluster, body)

    spec = ModelDeploymentSpec.model_validate(body["spec"])
    revisions = {d["metadata"]["labels"][C.LABEL_REVISION]
                 for d in await serving_deployments(cluster, "llm")}  # fmt: skip
    assert (revision_of(spec) in revisions) is reconciled
    status = (await cluster.get(f"{MD_PATH}/llm") or {}).get("status") or {}
    assert status.get("observedGeneration") == (2 if reconciled else 1)


async def test_an_object_whose_generation_was_seen_is_left_alone(
    api: ApiServerEmulator, cluster: Cluster
) -> None:
    body = await cluster.create(MD_PATH, model("llm", image="srv:1"))
    body = await cluster.merge(f"{MD_PATH}/llm/status", {"status": {"observedGeneration": 1}})
    await _converge(cluster, body)
    assert await serving_deployments(cluster, "llm") == []


async def test_a_timer_stopped_while_it_waits_returns_at_once(
    api: ApiServerEmulator, cluster: Cluster
) -> None:
    """kopf keeps the resource's finalizer until the timer is done (and looks again a minute
    later): a deletion must not wait for the timer's second look."""
    await cluster.create(MD_PATH, model("llm", image="srv:1"))
    body = await cluster.merge(f"{MD_PATH}/llm", {"spec": {"image": "srv:2"}})
    await _converge(cluster, body, Stopping())
    assert await serving_deployments(cluster, "llm") == []
