"""The autoscaling loop in the real kopf operator, against the API server emulator and a real
Prometheus scraping a real vLLM-style exporter: a queue builds -> the Deployment is scaled up
through its scale subresource, status.autoscaling explains why, an Event is posted; Prometheus
stops -> MetricsAvailable goes False with the error text and nothing scales down; an override
Prometheus rejects -> MetricsAvailable False with its parse error, and load still scales up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.conftest import Cluster, wait_for, wait_for_value
from tests.kube_emulator import ApiServerEmulator
from tests.prometheus_fixture import (
    MetricsExporter,
    PodTarget,
    PrometheusServer,
    require_prometheus,
)
from tests.test_modeldeployment_operator import DEPLOY_PATH, MD_PATH, NS, mark_ready, model
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.serving import deployment_name, revision_of

pytestmark = pytest.mark.prometheus


def available(name: str) -> float | None:
    """trimtab_metrics_available of a ModelDeployment in NS, as the operator exports it."""
    return REGISTRY.get_sample_value("trimtab_metrics_available", {"namespace": NS, "name": name})


def autoscaled_model(prometheus_url: str) -> dict[str, Any]:
    return model(
        "chat",
        replicas=1,
        slo={"p99LatencyMs": 2000, "latency": "e2e"},
        autoscaling={
            "minReplicas": 1,
            "maxReplicas": 8,
            "interval": "1s",
            "coldStart": "5s",
            "scaleDownStabilization": "2s",
        },
        metrics={"prometheusUrl": prometheus_url, "rateWindow": "2s", "scrapeInterval": "200ms"},
    )


@contextlib.asynccontextmanager
async def quiet_server(
    tmp_path: Path,
) -> AsyncIterator[tuple[MetricsExporter, PrometheusServer, str]]:
    """A vLLM exporter for the ModelDeployment's revision, quiet (a little load, nothing
    waiting), scraped by a real Prometheus: (exporter, prometheus, revision)."""
    binary = require_prometheus()
    exporter = MetricsExporter("vllm", model="m").start()
    placeholder = autoscaled_model("http://127.0.0.1:9")
    revision = revision_of(ModelDeploymentSpec.model_validate(placeholder["spec"]))
    target = PodTarget(
        exporter.address,
        namespace=NS,
        pod=f"chat-{revision}-0",
        labels={C.LABEL_OWNER: "chat", C.LABEL_REVISION: revision, C.LABEL_MANAGED_BY: "trimtab"},
    )
    prometheus = PrometheusServer([target], tmp_path / "prom", binary=binary).start()
    try:
        exporter.set_queue(0)
        exporter.set_running(1)
        exporter.set_load(1.0, 0.5)
        await asyncio.to_thread(prometheus.wait_for_scrapes)
        yield exporter, prometheus, revision
    finally:
        prometheus.stop()
        exporter.stop()


async def test_queue_scales_up_and_a_dead_prometheus_freezes_scale_down(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any, tmp_path: Path
) -> None:
    async with quiet_server(tmp_path) as (exporter, prometheus, revision):
        deploy_path = f"{DEPLOY_PATH}/{deployment_name('chat', revision)}"

        async with run_operator():
            await cluster.create(MD_PATH, autoscaled_model(prometheus.url))
            deploy = await wait_for(lambda: cluster.get(deploy_path))
            assert deploy["spec"]["replicas"] == 1
            await mark_ready(cluster, deploy)

            async def first_decision() -> dict[str, Any] | None:
                body = await cluster.get(f"{MD_PATH}/chat") or {}
                auto = body.get("status", {}).get("autoscaling")
                return auto if auto and auto.get("lastDecisionTime") else None

            auto = await wait_for(first_decision, timeout=20)
            signals = {s["name"]: s for s in auto["signals"]}
            assert signals["queueDepth"]["state"] == "value"
            assert signals["queueDepth"]["value"] == 0

            # A burst: 40 waiting, 8 running, 20 req/s at 1 s each.
            exporter.set_queue(40)
            exporter.set_running(8)
            exporter.set_load(20.0, 1.0)

            async def scaled_up() -> dict[str, Any] | None:
                d = await cluster.get(deploy_path) or {}
                return d if d.get("spec", {}).get("replicas", 0) > 1 else None

            scaled = await wait_for(scaled_up, timeout=20)
            replicas = scaled["spec"]["replicas"]
            assert 1 < replicas <= 8
            # Through the Deployment's scale subresource, as `kubectl scale` does; never by
            # patching the Deployment's own spec.
            scale_writes = [(m, p) for m, p, _ in api.writes if p == f"{deploy_path}/scale"]
            assert scale_writes and all(m.endswith("PATCH") for m, _ in scale_writes), api.writes

            async def recorded() -> dict[str, Any] | None:
                # status.autoscaling names the replicas the Deployment now has, and why.
                d = await cluster.get(deploy_path) or {}
                b = await cluster.get(f"{MD_PATH}/chat") or {}
                auto = (b.get("status") or {}).get("autoscaling") or {}
                wanted = (d.get("spec") or {}).get("replicas")
                ok = auto.get("desiredReplicas") == wanted and auto.get("lastScaleUpTime")
                return b if ok else None

            body = await wait_for(recorded, timeout=10)
            auto = body["status"]["autoscaling"]
            assert auto["desiredReplicas"] > 1 and "40 queued" in auto["reason"], auto
            conds = {c["type"]: c for c in body["status"]["conditions"]}
            assert conds["MetricsAvailable"]["status"] == "True"
            assert available("chat") == 1.0

            async def scale_event() -> list[dict[str, Any]]:
                events = await cluster.get(f"/api/v1/namespaces/{NS}/events") or {}
                return [e for e in events.get("items", []) if e.get("reason") == "ScaledUp"]

            assert await wait_for(scale_event)

            # The queue drains and Prometheus dies: no scale-down may follow.
            exporter.set_queue(0)
            exporter.set_running(0)
            exporter.set_load(0.1, 0.2)
            prometheus.stop()

            async def unavailable() -> dict[str, Any] | None:
                b = await cluster.get(f"{MD_PATH}/chat") or {}
                c = {c["type"]: c for c in b.get("status", {}).get("conditions", [])}
                cond = c.get("MetricsAvailable")
                return cond if cond and cond["status"] == "False" else None

            cond = await wait_for(unavailable, timeout=20)
            assert "refused" in cond["message"].lower() or "reach" in cond["message"].lower()
            assert available("chat") == 0.0  # TrimtabMetricsUnavailable's series
            before = (await cluster.get(deploy_path) or {})["spec"]["replicas"]
            await asyncio.sleep(3.5)  # three more loops without metrics
            after = (await cluster.get(deploy_path) or {})["spec"]["replicas"]
            assert after >= before


async def test_steady_load_writes_status_once_per_refresh_and_a_step_at_once(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any, tmp_path: Path
) -> None:
    """A loop every second decides every second, but with nothing changing it writes
    status.autoscaling once per refresh period, not once per loop; a queue step is still acted
    on and written within a loop or two."""
    refresh = 5.0
    async with quiet_server(tmp_path) as (exporter, prometheus, revision):
        deploy_path = f"{DEPLOY_PATH}/{deployment_name('chat', revision)}"
        status_path = f"{MD_PATH}/chat/status"

        def status_writes() -> int:
            # The emulator records the method as its enum's text ("method.PATCH").
            return sum(1 for m, p, _ in api.writes if m.endswith("PATCH") and p == status_path)

        async with run_operator(autoscaling_status_refresh_seconds=refresh):
            await cluster.create(MD_PATH, autoscaled_model(prometheus.url))
            deploy = await wait_for(lambda: cluster.get(deploy_path))
            await mark_ready(cluster, deploy)

            async def settled() -> bool:
                body = await cluster.get(f"{MD_PATH}/chat") or {}
                status = body.get("status", {})
                return status.get("phase") == "Ready" and bool(
                    status.get("autoscaling", {}).get("lastDecisionTime")
                )

            await wait_for(settled, timeout=20)
            await asyncio.sleep(3.0)  # the first signals and the stabilization window settle

            # Steady load, a loop a second: about one write per refresh period, not 12.
            window = 12.0
            before = status_writes()
            await asyncio.sleep(window)
            steady = status_writes() - before
            assert steady <= window / refresh + 1, api.writes[-steady:]
            body = await cluster.get(f"{MD_PATH}/chat") or {}
            assert body["status"]["autoscaling"]["desiredReplicas"] == 1

            # A queue step: scaled and written within a few loops, well inside a refresh period.
            exporter.set_queue(40)
            exporter.set_running(8)
            exporter.set_load(20.0, 1.0)

            async def scaled_up() -> dict[str, Any] | None:
                d = await cluster.get(deploy_path) or {}
                return d if d.get("spec", {}).get("replicas", 0) > 1 else None

            scaled = await wait_for(scaled_up, timeout=20)

            async def written() -> dict[str, Any] | None:
                b = await cluster.get(f"{MD_PATH}/chat") or {}
                auto = b.get("status", {}).get("autoscaling", {})
                ok = auto.get("desiredReplicas") == scaled["spec"]["replicas"]
                return auto if ok and auto.get("lastScaleUpTime") else None

            auto = await wait_for(written, timeout=refresh / 2)
            assert auto["action"] == "up" and auto["reason"]


async def test_invalid_promql_override_sets_metrics_unavailable_and_load_still_scales_up(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any, tmp_path: Path
) -> None:
    """An override Prometheus rejects (a PromQL parse error) makes that one signal unavailable:
    MetricsAvailable goes False with Prometheus' own error text and a Warning Event, nothing
    may scale down, but a load the other signals show still scales up."""
    async with quiet_server(tmp_path) as (exporter, prometheus, revision):
        deploy_path = f"{DEPLOY_PATH}/{deployment_name('chat', revision)}"
        body = autoscaled_model(prometheus.url)
        body["spec"]["metrics"]["queries"] = {"queueDepth": "sum(rate(vllm:num_requests_waiting[)"}

        async with run_operator():
            await cluster.create(MD_PATH, body)
            deploy = await wait_for(lambda: cluster.get(deploy_path))
            await mark_ready(cluster, deploy)

            async def unavailable() -> dict[str, Any] | None:
                b = await cluster.get(f"{MD_PATH}/chat") or {}
                c = {c["type"]: c for c in b.get("status", {}).get("conditions", [])}
                cond = c.get("MetricsAvailable")
                return b if cond and cond["status"] == "False" else None

            got = await wait_for(unavailable, timeout=20)
            cond = {c["type"]: c for c in got["status"]["conditions"]}["MetricsAvailable"]
            assert cond["reason"] == "SourceUnavailable"
            assert cond["message"].startswith("queueDepth: ") and "parse error" in cond["message"]
            signals = {s["name"]: s for s in got["status"]["autoscaling"]["signals"]}
            assert signals["queueDepth"]["state"] == "unavailable"
            assert signals["arrivalRate"]["state"] == "value"

            async def warned() -> list[dict[str, Any]]:
                events = await cluster.get(f"/api/v1/namespaces/{NS}/events") or {}
                return [
                    e for e in events.get("items", []) if e.get("reason") == "MetricsUnavailable"
                ]

            assert await wait_for(warned)

            # 20 req/s at 1 s each, 8 running: Little's law asks for 4 replicas.
            exporter.set_running(8)
            exporter.set_load(20.0, 1.0)

            async def scaled_up() -> dict[str, Any] | None:
                d = await cluster.get(deploy_path) or {}
                return d if d.get("spec", {}).get("replicas", 0) > 1 else None

            await wait_for(scaled_up, timeout=20)


async def test_switching_autoscaling_off_forgets_the_loop_and_on_again_starts_afresh(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    """No Prometheus answers: MetricsAvailable is False and the loop holds at 1. Switched off,
    that condition and status.autoscaling go (before, both stayed for good: Argo CD showed the
    resource Suspended, and a re-enable applied the old desiredReplicas at once, 1 here: a
    scale-down from spec.replicas with no metrics). Switched on again, it starts from
    spec.replicas, as the first time."""
    body = autoscaled_model("http://127.0.0.1:9")
    revision = revision_of(ModelDeploymentSpec.model_validate(body["spec"]))
    deploy_path = f"{DEPLOY_PATH}/{deployment_name('chat', revision)}"

    async def status() -> dict[str, Any]:
        return dict(((await cluster.get(f"{MD_PATH}/chat")) or {}).get("status") or {})

    def conditions(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {c["type"]: c for c in st.get("conditions") or []}

    async def replicas() -> int:
        return int(((await cluster.get(deploy_path)) or {}).get("spec", {}).get("replicas", -1))

    async def set_autoscaling(enabled: bool) -> None:
        auto = {**body["spec"]["autoscaling"], "enabled": enabled}
        await cluster.merge(f"{MD_PATH}/chat", {"spec": {"replicas": 3, "autoscaling": auto}})

    async with run_operator():
        await cluster.create(MD_PATH, body)
        held = await wait_for_value(
            status,
            lambda st: conditions(st).get("MetricsAvailable", {}).get("status") == "False"
            and (st.get("autoscaling") or {}).get("desiredReplicas") == 1,
            timeout=20,
        )
        assert "cannot reach Prometheus" in conditions(held)["MetricsAvailable"]["message"]

        await set_autoscaling(False)
        off = await wait_for_value(
            status,
            lambda st: "autoscaling" not in st and "MetricsAvailable" not in conditions(st),
        )
        assert off["observedGeneration"] == 2
        await wait_for_value(replicas, lambda n: n == 3)

        await set_autoscaling(True)
        await wait_for_value(
            status, lambda st: "MetricsAvailable" in conditions(st) and "autoscaling" in st,
            timeout=20,
        )
        await asyncio.sleep(1.5)  # a loop or two more: still holding, never down blind
        assert await replicas() == 3
        assert ((await status()).get("autoscaling") or {}).get("desiredReplicas") == 3
