"""The right-sizing timer in the real kopf operator against the API server emulator, reading a
real Prometheus fed by an exporter that replays a pod's usage: Recommend writes
status.recommendations and an Event; Auto records the applied resources, whose effective spec is
a new revision."""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import trimtab.handlers.rightsizing as rightsizing_handler
from tests.conftest import Cluster, OperatorRunner, wait_for
from tests.prometheus_fixture import (
    prometheus_bin,  # noqa: F401  # a fixture
)
from tests.test_rightsizing_usage import usage_for_operator
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.serving import deployment_name, revision_of
from trimtab.decisions.rightsizing import effective_spec
from trimtab.metrics.usage import UsageReader

pytestmark = pytest.mark.prometheus

NS = "ml"
MD_PATH = f"/apis/{C.GROUP}/{C.VERSION}/namespaces/{NS}/{C.MODELDEPLOYMENT_PLURAL}"


def chat(mode: str) -> dict[str, Any]:
    return {
        "apiVersion": C.API_VERSION,
        "kind": C.MODELDEPLOYMENT_KIND,
        "metadata": {"name": "chat", "namespace": NS},
        "spec": {
            "image": "ghcr.io/example/chat:1",
            "resources": {"cpu": "2", "memory": "8Gi"},
            "rightsizing": {"mode": mode, "window": "8s"},
        },
    }


def recommended(cluster: Cluster, path: str) -> Callable[[], Awaitable[dict[str, Any] | None]]:
    """A probe: the object at `path` once its first container has a recommendation."""

    async def probe() -> dict[str, Any] | None:
        body = await cluster.get(path) or {}
        recs = (body.get("status") or {}).get("recommendations") or {}
        containers = recs.get("containers") or []
        return body if containers and containers[0]["state"] == "Recommended" else None

    return probe


async def test_recommend_then_auto(
    run_operator: OperatorRunner,
    cluster: Cluster,
    prometheus_bin: str,  # noqa: F811  # the fixture imported above
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pod chat-0123456789-...: 0.5 cores, 2 GiB
    with usage_for_operator(tmp_path, monkeypatch):
        async with run_operator():
            await cluster.create(MD_PATH, chat("Recommend"))

            body = await wait_for(recommended(cluster, f"{MD_PATH}/chat"), timeout=40, interval=0.5)
            recs = body["status"]["recommendations"]
            server = recs["containers"][0]
            assert server["container"] == "server"
            assert server["current"] == {"cpu": "2", "memory": "8Gi", "memoryLimit": "8Gi"}
            # A window of a day or less needs 90% of its samples.
            assert server["basis"]["window"] == "8s" and server["basis"]["samples"] >= 7
            rec_memory = server["recommended"]["memory"]
            assert rec_memory == server["recommended"]["memoryLimit"]
            assert rec_memory.endswith("Mi") and 2048 < int(rec_memory[:-2]) < 2400
            cond = {c["type"]: c for c in recs["conditions"]}["UsageAvailable"]
            assert cond["status"] == "True"
            assert "applied" not in recs  # Recommend changes nothing

            async def moved_event() -> list[dict[str, Any]]:
                events = await cluster.get(f"/api/v1/namespaces/{NS}/events") or {}
                return [
                    e for e in events.get("items", []) if e.get("reason") == "RecommendationChanged"
                ]

            assert "memory 8Gi -> " in (await wait_for(moved_event))[0]["message"]

            # Auto: the recommendation is applied through status, spec is left as written.
            await cluster.merge(f"{MD_PATH}/chat", {"spec": {"rightsizing": {"mode": "Auto"}}})

            async def applied() -> dict[str, Any] | None:
                body = await cluster.get(f"{MD_PATH}/chat") or {}
                recs = (body.get("status") or {}).get("recommendations") or {}
                return body if recs.get("applied") else None

            body = await wait_for(applied, timeout=20, interval=0.5)
            assert body["spec"]["resources"] == {"cpu": "2", "memory": "8Gi"}
            applied_res = body["status"]["recommendations"]["applied"]["resources"]
            assert applied_res["memory"] == applied_res["memoryLimit"]
            spec = ModelDeploymentSpec.model_validate(body["spec"])
            effective = effective_spec(spec, body["status"])
            assert effective.resources.memory == applied_res["memory"]
            assert revision_of(effective) != revision_of(spec)

            async def applied_event() -> list[dict[str, Any]]:
                events = await cluster.get(f"/api/v1/namespaces/{NS}/events") or {}
                return [
                    e for e in events.get("items", []) if e.get("reason") == "RecommendationApplied"
                ]

            assert await wait_for(applied_event)

            # The applied resources are a new revision: its Deployment appears beside the old.
            new_name = deployment_name("chat", revision_of(effective))

            async def resized() -> dict[str, Any] | None:
                return await cluster.get(f"/apis/apps/v1/namespaces/{NS}/deployments/{new_name}")

            deploy = await wait_for(resized, timeout=20, interval=0.5)
            container = deploy["spec"]["template"]["spec"]["containers"][0]
            assert container["resources"]["requests"]["memory"] == applied_res["memory"]


async def test_unreachable_prometheus_names_the_source(
    run_operator: OperatorRunner, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIMTAB_RIGHTSIZING_INTERVAL_SECONDS", "1")
    monkeypatch.setattr(
        rightsizing_handler,
        "make_reader",
        lambda memo: UsageReader("http://127.0.0.1:9", timeout_s=2),
    )
    async with run_operator():
        await cluster.create(MD_PATH, copy.deepcopy(chat("Recommend")))

        async def condition() -> dict[str, Any] | None:
            body = await cluster.get(f"{MD_PATH}/chat") or {}
            recs = (body.get("status") or {}).get("recommendations") or {}
            conds = {c["type"]: c for c in recs.get("conditions") or []}
            return conds.get("UsageAvailable")

        cond = await wait_for(condition, timeout=30, interval=0.5)
        assert cond["status"] == "False" and cond["reason"] == "SourceUnavailable"
        assert "127.0.0.1:9" in cond["message"]
