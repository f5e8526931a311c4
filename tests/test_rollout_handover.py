"""A promotion hands traffic over as the promoted revision's replicas become ready. Before, the
route moved all traffic at once to a revision with the replicas of its last step (its others
only starting), and the previous stable revision was deleted in the same loop."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.conftest import Cluster
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import DEPLOY_PATH, MD_PATH, NS, mark_ready, model
from tests.test_rollout_decisions import PASS
from tests.test_rollout_fresh_replicas import NOW, _ts
from tests.test_rollout_routers_operator import PARENTS, ROUTE_PATH
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.common import Owner
from trimtab.builders.routing import revision_service_name
from trimtab.builders.serving import build_deployment, revision_of
from trimtab.handlers import rollout as handler


async def _weights(cluster: Cluster) -> dict[str, int]:
    route = await cluster.get(f"{ROUTE_PATH}/llm")
    assert route is not None
    return {r["name"]: r["weight"] for r in route["spec"]["rules"][0]["backendRefs"]}


async def _revisions(cluster: Cluster) -> set[str]:
    listing = await cluster.get(DEPLOY_PATH) or {}
    return {d["metadata"]["labels"][C.LABEL_REVISION] for d in listing["items"]}


@pytest.mark.parametrize(
    ("promoted_ago", "handed_over"),
    [
        pytest.param(30, True, id="while-its-replicas-start-the-previous-keeps-its-share"),
        pytest.param(600, False, id="past-twice-the-cold-start-it-waits-no-longer"),
    ],
)
async def test_a_promotion_hands_traffic_over_as_replicas_become_ready(
    api: ApiServerEmulator,
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    promoted_ago: float,
    handed_over: bool,
) -> None:
    extra = {
        "slo": {"p99LatencyMs": 2000},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 20, "coldStart": "60s"},
        "rollout": {"steps": [{"weight": 20, "pause": {"duration": "1m"}}],
                    "router": {"type": "gatewayApi", "parentRefs": PARENTS}},
    }  # fmt: skip
    specs = {
        image: ModelDeploymentSpec.model_validate(model("llm", image=image, **extra)["spec"])
        for image in ("srv:a", "srv:b")
    }
    a, b = (revision_of(s) for s in specs.values())
    created = await cluster.create(MD_PATH, model("llm", image="srv:b", **extra))
    owner = Owner(C.API_VERSION, C.MODELDEPLOYMENT_KIND, "llm", NS, created["metadata"]["uid"])
    # b was promoted from a 20% step: 1 of its 5 replicas ready, a's 4 still serving.
    await cluster.merge(f"{MD_PATH}/llm/status", {"status": {
        "rollout": {"phase": "Watching", "stableRevision": b, "promotedAt": _ts(promoted_ago),
                    "stableModel": specs["srv:b"].model_part()},
        "autoscaling": {"desiredReplicas": 5},
    }})  # fmt: skip
    old = await cluster.create(DEPLOY_PATH, build_deployment(owner, specs["srv:a"], a, 4))
    await mark_ready(cluster, old)
    new = await cluster.create(DEPLOY_PATH, build_deployment(owner, specs["srv:b"], b, 1))
    await mark_ready(cluster, new)

    async def analyse(*_: Any, **__: Any) -> Any:
        return PASS, "", ""

    monkeypatch.setattr(handler, "analyse", analyse)
    for name in ("event", "info", "warn"):
        monkeypatch.setattr(handler.kopf, name, lambda *_, **__: None)

    async def loop() -> None:
        await handler.rollout_once(
            cluster.kube, None, NS, "llm", logging.getLogger("t"), now=NOW  # type: ignore[arg-type]
        )

    await loop()
    svc_a, svc_b = revision_service_name("llm", a), revision_service_name("llm", b)
    if not handed_over:
        assert await _weights(cluster) == {svc_b: 100}
        assert await _revisions(cluster) == {b}
        return
    # a's 4 ready replicas carry 80%, b's 1 ready one 20%; a is not deleted yet.
    assert await _weights(cluster) == {svc_b: 20, svc_a: 80}
    assert await _revisions(cluster) == {a, b}

    # The autoscaler has scaled b to the 5 it decided, and they are ready: all traffic to b,
    # and a goes.
    scaled = await cluster.merge(
        f"{DEPLOY_PATH}/{new['metadata']['name']}", {"spec": {"replicas": 5}}
    )
    await mark_ready(cluster, scaled)
    await loop()
    assert await _weights(cluster) == {svc_b: 100}
    assert await _revisions(cluster) == {b}
