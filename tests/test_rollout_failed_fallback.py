"""A new image after a fallback whose target never came up: the revision fallen from, which
still serves, is stable again and the new image starts beside it. Before, the new image started
beside the target that had no pod, and a mesh route moved to it and off the only revision that
answered."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import Cluster
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import DEPLOY_PATH, MD_PATH, NS, mark_ready, model
from tests.test_rollout_fresh_replicas import NOW, _ts
from tests.test_rollout_routers_operator import HTTPROUTE_CRD, PARENTS, ROUTE_PATH
from tests.validation import validate_custom
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.common import Owner
from trimtab.builders.serving import build_deployment, deployment_name, revision_of
from trimtab.handlers import rollout as handler


async def test_a_new_image_after_a_failed_fallback_starts_beside_the_revision_that_serves(
    api: ApiServerEmulator, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = {
        "rollout": {
            "steps": [{"weight": 10, "pause": {"duration": "1m"}}],
            "router": {"type": "gatewayApi", "parentRefs": PARENTS},
            "progressDeadline": "30m",
        },
        "replicas": 2,
    }
    specs = {
        image: ModelDeploymentSpec.model_validate(model("llm", image=image, **extra)["spec"])
        for image in ("srv:a", "srv:b", "srv:c")
    }
    a, b, c = (revision_of(s) for s in specs.values())
    created = await cluster.create(MD_PATH, model("llm", image="srv:c", **extra))
    owner = Owner(C.API_VERSION, C.MODELDEPLOYMENT_KIND, "llm", NS, created["metadata"]["uid"])
    # Fell back from b to a 40 minutes ago; a never got a ready replica; b serves.
    await cluster.merge(f"{MD_PATH}/llm/status", {"status": {"rollout": {
        "phase": "FellBack", "stableRevision": a, "failedRevision": b,
        "stableModel": specs["srv:a"].model_part(), "fallbackSince": _ts(2400),
        "fallbackFailedAt": _ts(600),
        "knownGood": [{"revision": a, "model": specs["srv:a"].model_part(),
                       "promotedAt": _ts(7200)}],
    }}})  # fmt: skip
    await cluster.create(DEPLOY_PATH, build_deployment(owner, specs["srv:a"], a, 2))
    serving = await cluster.create(DEPLOY_PATH, build_deployment(owner, specs["srv:b"], b, 2))
    await mark_ready(cluster, serving)
    for name in ("event", "info", "warn"):
        monkeypatch.setattr(handler.kopf, name, lambda *_, **__: None)

    await handler.rollout_once(
        cluster.kube, None, NS, "llm", logging.getLogger("t"), now=NOW  # type: ignore[arg-type]
    )

    rollout = ((await cluster.get(f"{MD_PATH}/llm") or {})["status"])["rollout"]
    assert (rollout["stableRevision"], rollout["candidateRevision"]) == (b, c)
    assert rollout["phase"] == "Canary" and "failedRevision" not in rollout
    listing = await cluster.get(DEPLOY_PATH) or {}
    images = {
        d["metadata"]["labels"][C.LABEL_REVISION]: d["spec"]["template"]["spec"]["containers"][0][
            "image"
        ]
        for d in listing["items"]
    }
    # b kept as it was, c created beside it, a (never ready) retired since b serves.
    assert images == {b: "srv:b", c: "srv:c"}
    route = await cluster.get(f"{ROUTE_PATH}/llm")
    assert route is not None
    validate_custom(route, HTTPROUTE_CRD)
    backends = {r["name"]: r.get("weight") for r in route["spec"]["rules"][0]["backendRefs"]}
    assert backends[deployment_name("llm", b)] == 100, backends
    assert all(w == 0 for n, w in backends.items() if n != deployment_name("llm", b)), backends
