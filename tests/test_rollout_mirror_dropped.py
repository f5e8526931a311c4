"""On a cluster whose HTTPRoute CRD predates Gateway API v1.3, the API server refuses an apply
that sets requestMirror.percent ("field not declared in schema"); trimtab writes the route
without it, and the gateway copies every request to the candidate. The rollout says so
(condition message and a Warning) instead of shadowing at a share it does not get."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import DEPLOY_PATH, MD_PATH, NS, mark_ready, model
from tests.test_rollout_fresh_replicas import NOW, _ts
from tests.test_rollout_routers_operator import PARENTS, shadow_rollout
from tests.validation import crd_without, thirdparty
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.common import Owner
from trimtab.builders.serving import build_deployment, revision_of
from trimtab.handlers import rollout as handler

STANDARD_HTTPROUTE_CRD = thirdparty(
    "gateway-api", "standard", "gateway.networking.k8s.io_httproutes.yaml"
)


@pytest.mark.parametrize("prune", [pytest.param(True, id="old-crd"),
                                   pytest.param(False, id="v1.3-crd")])  # fmt: skip
async def test_a_mirror_percent_the_cluster_drops_is_reported(
    api: ApiServerEmulator,
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    prune: bool,
    tmp_path: Path,
) -> None:
    extra = {"slo": {"p99LatencyMs": 2000},
             "rollout": shadow_rollout({"type": "gatewayApi", "parentRefs": PARENTS}, 20, 30)}
    specs = {image: ModelDeploymentSpec.model_validate(model("llm", image=image, **extra)["spec"])
             for image in ("srv:a", "srv:b")}  # fmt: skip
    a, b = (revision_of(s) for s in specs.values())
    created = await cluster.create(MD_PATH, model("llm", image="srv:b", **extra))
    owner = Owner(C.API_VERSION, C.MODELDEPLOYMENT_KIND, "llm", NS, created["metadata"]["uid"])
    since = _ts(60)
    await cluster.merge(f"{MD_PATH}/llm/status", {"status": {"rollout": {
        "phase": "Canary", "stableRevision": a, "candidateRevision": b,
        "stableModel": specs["srv:a"].model_part(), "candidateModel": specs["srv:b"].model_part(),
        "candidateSince": since, "stepIndex": -1,
    }}})  # fmt: skip
    for spec, revision in ((specs["srv:a"], a), (specs["srv:b"], b)):
        made = await cluster.create(DEPLOY_PATH, build_deployment(owner, spec, revision, 1))
        await mark_ready(cluster, made)
    warnings: list[str] = []
    monkeypatch.setattr(handler.kopf, "warn", lambda *_, message, **__: warnings.append(message))
    for name in ("event", "info"):
        monkeypatch.setattr(handler.kopf, name, lambda *_, **__: None)

    if prune:  # a CRD before v1.3: a mirror filter without percent or fraction
        api.crds[("gateway.networking.k8s.io", "httproutes")] = crd_without(
            STANDARD_HTTPROUTE_CRD, tmp_path / "httproute-crd.yaml",
            ("requestMirror", "percent"), ("requestMirror", "fraction"),
        )  # fmt: skip
    await handler.rollout_once(
        cluster.kube, None, NS, "llm", logging.getLogger("t"), now=NOW  # type: ignore[arg-type]
    )
    refused = [w for w in api.writes if "httproutes" in w[1]]
    assert len(refused) == (2 if prune else 1)  # refused whole, then sent without the percent
    status = ((await cluster.get(f"{MD_PATH}/llm")) or {})["status"]
    assert status["rollout"]["phase"] == "Shadow"
    progressing = {c["type"]: c for c in status["conditions"]}["RolloutProgressing"]
    dropped = "mirrors 100% of requests, not the 20% asked"
    assert (dropped in progressing["message"]) is prune, progressing["message"]
    assert bool(warnings) is prune
