"""Progressive delivery in the real kopf operator, against the API server emulator and a real
Prometheus scraping one exporter per revision, whose numbers the test sets.

- a good candidate walks the steps (weights split the replicas the autoscaler chose), waits at
  an untilPromoted step across an operator restart without losing its place, is promoted by
  the annotation and then by analysis, and the old revision is retired; when the promoted
  revision then breaks its SLO, the last known-good revision is rebuilt from status;
- a bad candidate is rolled back; a later candidate's weights freeze when Prometheus stops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
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
from tests.test_modeldeployment_operator import (
    MD_PATH,
    NS,
    deployment_controller,
    model,
    serving_deployments,
)
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.rollout import ROLLOUT_ACTION_ANNOTATION
from trimtab.builders.serving import deployment_name, revision_of
from trimtab.observability import forget_resource

pytestmark = pytest.mark.prometheus

NAME = "chat"
IMAGES = ("srv:1", "srv:2", "srv:3")


def rollout_model(prometheus_url: str, image: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    body = model(
        NAME,
        server="generic",
        image=image,
        args=[],
        resources={"cpu": "1"},
        replicas=5,
        slo={"p99LatencyMs": 500, "maxErrorRate": 0.01},
        metrics={"prometheusUrl": prometheus_url, "rateWindow": "2s", "scrapeInterval": "200ms"},
        rollout={
            "steps": steps,
            "analysis": {"interval": "1s", "minRequests": 20},
            "router": {"type": "replicas"},
            "postPromotion": {"watchWindow": "10m"},
            "progressDeadline": "60s",
        },
    )
    return body


def revision(image: str) -> str:
    return revision_of(
        ModelDeploymentSpec.model_validate(
            rollout_model("http://x", image, [{"weight": 10}])["spec"]
        )
    )


@dataclass
class Scraped:
    exporters: dict[str, MetricsExporter]  # by image
    prometheus: PrometheusServer


@contextlib.asynccontextmanager
async def revisions_scraped(tmp_path: Path) -> AsyncIterator[Scraped]:
    """One exporter per image's revision, scraped by a real Prometheus every 200 ms."""
    binary = require_prometheus()
    exporters = {image: MetricsExporter("generic").start() for image in IMAGES}
    targets = [
        PodTarget(
            e.address,
            namespace=NS,
            pod=f"{NAME}-{revision(image)}-0",
            labels={C.LABEL_OWNER: NAME, C.LABEL_REVISION: revision(image)},
        )
        for image, e in exporters.items()
    ]
    prometheus = PrometheusServer(targets, tmp_path / "prom", binary=binary).start()
    try:
        for e in exporters.values():
            e.set_load(40.0, 0.05)  # well inside the SLO: 50 ms, no errors
        await asyncio.to_thread(prometheus.wait_for_scrapes)
        yield Scraped(exporters, prometheus)
    finally:
        prometheus.stop()
        for e in exporters.values():
            e.stop()


async def status_of(cluster: Cluster) -> dict[str, Any]:
    body = await cluster.get(f"{MD_PATH}/{NAME}") or {}
    return dict(body.get("status") or {})


async def wait_rollout(cluster: Cluster, check: Any, timeout: float = 20.0) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        return dict((await status_of(cluster)).get("rollout") or {})

    return await wait_for_value(read, check, timeout)


async def replicas_by_revision(cluster: Cluster) -> dict[str, int]:
    return {
        d["metadata"]["labels"][C.LABEL_REVISION]: d["spec"]["replicas"]
        for d in await serving_deployments(cluster, NAME)
    }


async def event_reasons(cluster: Cluster) -> list[str]:
    events = await cluster.get(f"/api/v1/namespaces/{NS}/events") or {}
    return [
        e.get("reason", "")
        for e in events.get("items", [])
        if e.get("involvedObject", {}).get("name") == NAME
    ]


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


async def test_good_candidate_walks_steps_survives_restart_promotes_then_falls_back(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any, tmp_path: Path
) -> None:
    a, b = revision(IMAGES[0]), revision(IMAGES[1])
    steps = [
        {"weight": 20, "pause": {"untilPromoted": True}},
        {"weight": 50, "pause": {"duration": "2s"}},
    ]
    async with revisions_scraped(tmp_path) as scraped, deployment_controller(cluster):
        url = scraped.prometheus.url
        body = rollout_model(url, IMAGES[0], steps)
        # The autoscaler decides total capacity (pinned to 5 here); the rollout splits it.
        body["spec"]["autoscaling"] = {"minReplicas": 5, "maxReplicas": 5, "interval": "1s"}
        # a becomes known-good once a short watch window closes on passing analysis; a
        # candidate started inside it would leave a unverified (no fallback target).
        body["spec"]["rollout"]["postPromotion"] = {"watchWindow": "2s"}
        async with run_operator():
            await cluster.create(MD_PATH, body)
            known = await wait_rollout(
                cluster, lambda ro: [k["revision"] for k in ro.get("knownGood", [])] == [a]
            )
            assert known["stableRevision"] == a and known["phase"] == "Stable"
            assert "RevisionKnownGood" in await event_reasons(cluster)
            await cluster.merge(
                f"{MD_PATH}/{NAME}",
                {
                    "spec": {
                        "image": IMAGES[1],
                        "rollout": {"postPromotion": {"watchWindow": "10m"}},
                    }
                },
            )
            at_step = await wait_rollout(
                cluster, lambda ro: ro.get("candidateRevision") == b and ro.get("phase") == "Paused"
            )
            assert at_step["stepIndex"] == 0
            assert at_step["weights"] == {"stable": 80, "candidate": 20, "mirrorPercent": 0}

            async def split() -> bool:
                return await replicas_by_revision(cluster) == {a: 4, b: 1}

            # Replicas follow the weight, and the autoscaler, deciding 5 in all, keeps them so.
            await wait_for(split, timeout=10)
            await asyncio.sleep(2.5)
            assert await replicas_by_revision(cluster) == {a: 4, b: 1}
            status = await status_of(cluster)
            assert conditions(status)["RolloutPaused"]["status"] == "True"
            assert status["currentRevision"] == b

        # A pooled keep-alive connection to the emulator can hang once after kopf's shutdown
        # (30 s, then fine): start the test client's connections afresh.
        await cluster.close()
        # A restart resumes at the same step, from status alone.
        async with run_operator():
            await asyncio.sleep(2.5)  # a few loops of the restarted operator
            resumed = await wait_rollout(cluster, lambda ro: bool(ro))
            assert resumed["candidateRevision"] == b
            assert resumed["stepIndex"] == 0
            assert resumed["stepSince"] == at_step["stepSince"]
            assert resumed["candidateSince"] == at_step["candidateSince"]
            assert await replicas_by_revision(cluster) == {a: 4, b: 1}

            await cluster.merge(
                f"{MD_PATH}/{NAME}",
                {"metadata": {"annotations": {ROLLOUT_ACTION_ANNOTATION: "promote"}}},
            )
            step_two = await wait_rollout(cluster, lambda ro: ro.get("stepIndex") == 1)
            assert step_two["weights"]["candidate"] == 50

            async def annotation_removed() -> bool:
                meta = (await cluster.get(f"{MD_PATH}/{NAME}") or {}).get("metadata", {})
                return ROLLOUT_ACTION_ANNOTATION not in (meta.get("annotations") or {})

            await wait_for(annotation_removed, timeout=10)

            # Analysis passes the 2 s step: promotion, and the old revision is retired.
            promoted = await wait_rollout(
                cluster,
                lambda ro: ro.get("stableRevision") == b and not ro.get("candidateRevision"),
            )
            assert promoted["phase"] == "Watching"
            # b joins knownGood only when its watch window closes cleanly.
            assert [k["revision"] for k in promoted["knownGood"]] == [a]
            passes = [v for v in promoted["verdicts"] if v["verdict"] == "Pass"]
            assert passes, promoted["verdicts"]

            async def retired() -> bool:
                return await replicas_by_revision(cluster) == {b: 5}

            await wait_for(retired, timeout=10)
            reasons = await event_reasons(cluster)
            for reason in ("RolloutStarted", "TrafficShifted", "RolloutPaused", "RolloutPromoted"):
                assert reason in reasons, reasons

            # The promoted revision starts failing inside its watch window: fallback to a,
            # rebuilt from the model part status kept.
            scraped.exporters[IMAGES[1]].set_load(40.0, 0.05, error_ratio=0.3)
            fell_back = await wait_rollout(cluster, lambda ro: ro.get("phase") == "FellBack")
            assert fell_back["stableRevision"] == a
            assert fell_back["failedRevision"] == b

            async def rebuilt() -> bool:
                return await replicas_by_revision(cluster) == {a: 5}

            await wait_for(rebuilt, timeout=10)
            deploy = await cluster.get(
                f"/apis/apps/v1/namespaces/{NS}/deployments/{deployment_name(NAME, a)}"
            )
            assert deploy is not None
            image = deploy["spec"]["template"]["spec"]["containers"][0]["image"]
            assert image == IMAGES[0]
            status = await status_of(cluster)
            assert conditions(status)["FallbackApplied"]["status"] == "True"
            assert "breached its SLO" in conditions(status)["FallbackApplied"]["message"]
            assert "FallbackApplied" in await event_reasons(cluster)


def rollbacks(kind: str) -> float | None:
    labels = {"namespace": NS, "name": NAME, "kind": kind}
    return REGISTRY.get_sample_value("trimtab_rollbacks_total", labels)


async def test_bad_candidate_rolls_back_and_dead_prometheus_freezes_weights(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any, tmp_path: Path
) -> None:
    a, b, c = (revision(i) for i in IMAGES)
    steps: list[dict[str, Any]] = [{"weight": 20, "pause": {"duration": "4s"}}, {"weight": 50}]
    forget_resource(NS, NAME)  # series an earlier test left in this process's registry
    async with revisions_scraped(tmp_path) as scraped, deployment_controller(cluster):
        prometheus = scraped.prometheus
        scraped.exporters[IMAGES[1]].set_load(40.0, 0.05, error_ratio=0.3)
        async with run_operator():
            await cluster.create(MD_PATH, rollout_model(prometheus.url, IMAGES[0], steps))
            await wait_rollout(cluster, lambda ro: ro.get("stableRevision") == a)
            # At 0 before the first rollback, so TrimtabRolledBack's increase() sees it.
            assert rollbacks("rollback") == rollbacks("fallback") == 0
            await cluster.merge(f"{MD_PATH}/{NAME}", {"spec": {"image": IMAGES[1]}})

            rolled = await wait_rollout(cluster, lambda ro: ro.get("phase") == "RolledBack")

            async def counted() -> float | None:  # counted after status is written
                return rollbacks("rollback")

            await wait_for_value(counted, lambda n: n == 1, timeout=10)
            assert rolled["stableRevision"] == a and rolled["failedRevision"] == b
            assert rolled["weights"] == {"stable": 100, "candidate": 0, "mirrorPercent": 0}
            assert any(
                v["verdict"] == "Fail" and v["metric"] == "errorRate" for v in rolled["verdicts"]
            )

            async def only_stable() -> bool:
                return await replicas_by_revision(cluster) == {a: 5}

            await wait_for(only_stable, timeout=10)
            status = await status_of(cluster)
            assert conditions(status)["RolledBack"]["status"] == "True"
            assert "analysis failed" in conditions(status)["RolledBack"]["message"]
            assert "RolledBack" in await event_reasons(cluster)
            # The failed revision is not retried while the spec still names it.
            await asyncio.sleep(1.5)
            assert b not in await replicas_by_revision(cluster)

            # A new candidate: at its first step Prometheus goes away.
            await cluster.merge(f"{MD_PATH}/{NAME}", {"spec": {"image": IMAGES[2]}})
            step = await wait_rollout(
                cluster, lambda ro: ro.get("candidateRevision") == c and ro.get("stepIndex") == 0
            )
            assert step["weights"]["candidate"] == 20
            prometheus.stop()

            async def frozen() -> dict[str, Any] | None:
                cond = conditions(await status_of(cluster)).get("RolloutProgressing") or {}
                return cond if cond.get("reason") == "MetricsUnavailable" else None

            cond = await wait_for(frozen, timeout=20)
            assert cond["status"] == "False"
            assert "weights frozen at 20%" in cond["message"]
            await asyncio.sleep(5)  # longer than the step's 4 s pause
            held = (await status_of(cluster))["rollout"]
            assert held["candidateRevision"] == c and held["stepIndex"] == 0
            assert held["stableRevision"] == a
            assert held["weights"]["candidate"] == 20
            assert "RolloutMetricsUnavailable" in await event_reasons(cluster)
