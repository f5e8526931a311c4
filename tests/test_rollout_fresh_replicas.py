"""A rollout step applies the replicas the autoscaler decided last, not those it read before
the analysis: the analysis is a Prometheus round, and a scale that lands meanwhile must not be
undone by the step."""

from __future__ import annotations

import datetime
import logging
from typing import Any

import pytest

from tests.conftest import Cluster
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import DEPLOY_PATH, MD_PATH, NS, mark_ready, model
from tests.test_rollout_decisions import PASS
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.common import Owner
from trimtab.builders.serving import build_deployment, revision_of
from trimtab.handlers import rollout as handler

NOW = datetime.datetime(2025, 6, 1, 12, 0, 0, tzinfo=datetime.UTC)


def _ts(seconds_ago: float) -> str:
    t = NOW - datetime.timedelta(seconds=seconds_ago)
    return t.isoformat().replace("+00:00", "Z")


async def test_a_step_keeps_a_scale_the_autoscaler_made_during_the_analysis(
    api: ApiServerEmulator, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = {
        "slo": {"p99LatencyMs": 2000},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 20},
        "rollout": {"steps": [{"weight": 10, "pause": {"duration": "1m"}},
                              {"weight": 50, "pause": {"duration": "1m"}}]},
    }  # fmt: skip
    old_spec = ModelDeploymentSpec.model_validate(model("llm", image="srv:a", **extra)["spec"])
    body = model("llm", image="srv:b", **extra)
    new_spec = ModelDeploymentSpec.model_validate(body["spec"])
    stable, candidate = revision_of(old_spec), revision_of(new_spec)
    created = await cluster.create(MD_PATH, body)
    owner = Owner(C.API_VERSION, C.MODELDEPLOYMENT_KIND, "llm", NS, created["metadata"]["uid"])
    await cluster.merge(f"{MD_PATH}/llm/status", {"status": {
        "rollout": {
            "stableRevision": stable, "candidateRevision": candidate,
            "stableModel": old_spec.model_part(), "candidateModel": new_spec.model_part(),
            "candidateSince": _ts(600), "stepIndex": 0, "stepSince": _ts(120),
            "weights": {"stable": 90, "candidate": 10}, "phase": "Canary",
        },
        "autoscaling": {"desiredReplicas": 2},
    }})  # fmt: skip
    for spec, revision, n in ((old_spec, stable, 1), (new_spec, candidate, 1)):
        made = await cluster.create(DEPLOY_PATH, build_deployment(owner, spec, revision, n))
        await mark_ready(cluster, made)

    async def analyse_while_the_autoscaler_scales(*_: Any, **__: Any) -> Any:
        await cluster.merge(f"{MD_PATH}/llm/status", {"status": {"autoscaling": {
            "desiredReplicas": 10}}})  # fmt: skip
        return PASS, "", ""

    monkeypatch.setattr(handler, "analyse", analyse_while_the_autoscaler_scales)
    for name in ("event", "info", "warn"):
        monkeypatch.setattr(handler.kopf, name, lambda *_, **__: None)
    await handler.rollout_once(
        cluster.kube, None, NS, "llm", logging.getLogger("t"), now=NOW  # type: ignore[arg-type]
    )
    after = await cluster.get(f"{MD_PATH}/llm") or {}
    assert after["status"]["rollout"]["stepIndex"] == 1  # the step moved
    listing = await cluster.get(DEPLOY_PATH) or {}
    replicas = {
        d["metadata"]["labels"][C.LABEL_REVISION]: d["spec"]["replicas"]
        for d in listing["items"]
        if d["metadata"]["labels"].get(C.LABEL_OWNER) == "llm"
    }
    assert sum(replicas.values()) == 10, replicas  # not the 2 read before the analysis
