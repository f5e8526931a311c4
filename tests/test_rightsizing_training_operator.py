"""TrainingJob right-sizing in the real kopf operator against the API server emulator, reading a
real Prometheus fed by an exporter that replays two workers' usage: Recommend writes
status.recommendations for the trainer container; Auto records the applied resources without
touching the running attempt, and a worker failure's next attempt runs with them. Also: the
usage reader finds OOM-killed workers, which are never restarted in place, one kill per pod."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster, OperatorRunner, wait_for
from tests.prometheus_fixture import (
    MetricsExporter,
    PodTarget,
    prometheus_bin,  # noqa: F401  # a fixture
)
from tests.test_rightsizing_operator import recommended
from tests.test_rightsizing_usage import HonorLabelsPrometheus, usage_for_operator
from tests.test_training_operator import fail_worker, set_job_status
from trimtab import constants as C
from trimtab.builders.training import worker_pod_regex
from trimtab.decisions.rightsizing import GiB
from trimtab.metrics.usage import (
    CPU_SERIES,
    LIMITS_SERIES,
    MEMORY_SERIES,
    RESTARTS_SERIES,
    TERMINATED_SERIES,
    UsageReader,
    UsageTarget,
)

pytestmark = pytest.mark.prometheus

NS = "ml"
TJ_PATH = f"/apis/{C.GROUP}/{C.VERSION}/namespaces/{NS}/{C.TRAININGJOB_PLURAL}"
JOB_PATH = f"/apis/batch/v1/namespaces/{NS}/jobs"
# Worker 0 of attempt 0 is the busiest (1 core, 3 GiB); worker 1 is lighter.
WORKERS = {"llama-r0-0-x2x9z": (1.0, 3 * GiB), "llama-r0-1-b7k4q": (0.5, 2 * GiB)}
# Another TrainingJob's worker in the namespace, with a name that starts the same.
OTHER = "llama2-r0-0-abcde"


class WorkerReplayer:
    """Moves the trainer containers' CPU counters and working sets every 100 ms."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self.e = exporter
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        exporter.declare(CPU_SERIES, "counter")
        exporter.declare(MEMORY_SERIES, "gauge")
        exporter.declare(RESTARTS_SERIES, "counter")
        exporter.set_gauge(MEMORY_SERIES, 50 * GiB, namespace=NS, pod=OTHER, container="trainer")
        for pod in WORKERS:  # kube-state-metrics reports every container's restarts
            exporter.inc_counter(RESTARTS_SERIES, 0.0, namespace=NS, pod=pod, container="trainer")

    def start(self) -> WorkerReplayer:
        self._thread.start()
        return self

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.1):
            now = time.monotonic()
            for pod, (cores, memory) in WORKERS.items():
                labels = {"namespace": NS, "pod": pod, "container": "trainer"}
                self.e.inc_counter(CPU_SERIES, cores * (now - last), **labels)
                self.e.set_gauge(MEMORY_SERIES, memory, **labels)
            last = now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def llama(mode: str) -> dict[str, Any]:
    return {
        "apiVersion": C.API_VERSION,
        "kind": C.TRAININGJOB_KIND,
        "metadata": {"name": "llama", "namespace": NS},
        "spec": {
            "image": "ghcr.io/acme/train:1",
            "command": ["train.py"],
            "workers": 2,
            "resources": {"cpu": "4", "memory": "8Gi"},
            "failurePolicy": {"maxRestarts": 2, "backoffSeconds": 1, "maxBackoffSeconds": 1},
            "rightsizing": {"mode": mode, "window": "6s"},
        },
    }


def trainer_resources(job: dict[str, Any]) -> dict[str, Any]:
    return dict(job["spec"]["template"]["spec"]["containers"][0]["resources"])


async def events(cluster: Cluster, reason: str) -> list[dict[str, Any]]:
    found = await cluster.get(f"/api/v1/namespaces/{NS}/events") or {}
    return [
        e for e in found.get("items", [])
        if e.get("reason") == reason and e["involvedObject"]["kind"] == C.TRAININGJOB_KIND
    ]  # fmt: skip


async def test_recommend_then_auto_resizes_the_next_attempt(
    run_operator: OperatorRunner,
    cluster: Cluster,
    prometheus_bin: str,  # noqa: F811  # the fixture imported above
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with usage_for_operator(tmp_path, monkeypatch, WorkerReplayer, wait=False):
        # Prometheus fills its window while the operator starts and the job runs.
        async with run_operator():
            await cluster.create(TJ_PATH, llama("Recommend"))
            first = await wait_for(lambda: cluster.get(f"{JOB_PATH}/llama-r0"))
            await set_job_status(cluster, "llama-r0", {"active": 2, "ready": 2})

            body = await wait_for(
                recommended(cluster, f"{TJ_PATH}/llama"), timeout=40, interval=0.5
            )
            recs = body["status"]["recommendations"]
            trainer = recs["containers"][0]
            assert trainer["container"] == "trainer"
            assert trainer["current"] == {"cpu": "4", "memory": "8Gi", "memoryLimit": "8Gi"}
            # A window of a day or less needs 90% of its samples.
            assert trainer["basis"]["window"] == "6s" and trainer["basis"]["samples"] >= 5
            # One worker, sized for the busiest: 3 GiB + 10%, not the sum of both workers
            # (5 GiB) nor the other TrainingJob's 50 GiB.
            memory = trainer["recommended"]["memory"]
            assert memory == trainer["recommended"]["memoryLimit"]
            assert memory.endswith("Mi") and 3 * 1024 < int(memory[:-2]) < 3.5 * 1024, memory
            cpu = trainer["recommended"]["cpu"]
            assert cpu.endswith("m") and 900 < int(cpu[:-1]) < 1300, cpu
            cond = {c["type"]: c for c in recs["conditions"]}["UsageAvailable"]
            assert cond["status"] == "True"
            assert "applied" not in recs  # Recommend changes nothing
            moved = await wait_for(lambda: events(cluster, "RecommendationChanged"))
            assert "memory 8Gi -> " in moved[0]["message"]

            # Auto: applied through status; the running attempt is left alone.
            await cluster.merge(f"{TJ_PATH}/llama", {"spec": {"rightsizing": {"mode": "Auto"}}})

            async def applied() -> dict[str, Any] | None:
                body = await cluster.get(f"{TJ_PATH}/llama") or {}
                recs = (body.get("status") or {}).get("recommendations") or {}
                return body if recs.get("applied") else None

            body = await wait_for(applied, timeout=20, interval=0.5)
            assert body["spec"]["resources"] == {"cpu": "4", "memory": "8Gi"}
            recs = body["status"]["recommendations"]
            applied_res = recs["applied"]["resources"]
            cond = {c["type"]: c for c in recs["conditions"]}["RecommendationApplied"]
            assert cond["reason"] == "NextAttempt"
            assert "next attempt" in (await wait_for(
                lambda: events(cluster, "RecommendationApplied")
            ))[0]["message"]  # fmt: skip
            running = await cluster.get(f"{JOB_PATH}/llama-r0")
            assert running is not None
            assert running["metadata"]["uid"] == first["metadata"]["uid"]
            assert trainer_resources(running) == trainer_resources(first)
            assert trainer_resources(running)["requests"]["memory"] == "8Gi"

            # A worker fails: the next attempt's Job carries the applied resources.
            await fail_worker(cluster, "llama-r0", index=1, code=1, reason="Error")
            second = await wait_for(lambda: cluster.get(f"{JOB_PATH}/llama-r1"), timeout=20)
            resources = trainer_resources(second)
            assert resources["requests"]["cpu"] == applied_res["cpu"]
            assert resources["requests"]["memory"] == applied_res["memory"]
            assert resources["limits"]["memory"] == applied_res["memoryLimit"]


async def test_reader_counts_each_oom_killed_worker_once(
    prometheus_bin: str,  # noqa: F811  # the fixture imported above
    tmp_path: Path,
) -> None:
    exporter = MetricsExporter("generic").start()
    replayer = WorkerReplayer(exporter).start()
    exporter.declare(TERMINATED_SERIES, "gauge")
    terminated = {
        "llama-r0-1-b7k4q": "OOMKilled",  # attempt 0, worker 1
        "llama-r1-0-q2w5z": "OOMKilled",  # attempt 1, worker 0
        "llama-r1-1-m4n8p": "Error",  # stopped by the Job controller: not a kill
        OTHER: "OOMKilled",  # another TrainingJob's worker
    }
    exporter.declare(LIMITS_SERIES, "gauge")
    for pod, reason in terminated.items():
        labels = {"namespace": NS, "pod": pod, "container": "trainer"}
        exporter.set_gauge(TERMINATED_SERIES, 1, reason=reason, **labels)
        # Attempt 1 ran with a raised limit: each kill is valued at its own pod's limit.
        limit = 8 * GiB if "-r0-" in pod else 10 * GiB
        exporter.set_gauge(LIMITS_SERIES, limit, resource="memory", unit="byte", **labels)
    prom = HonorLabelsPrometheus([PodTarget(exporter.address)], tmp_path / "prom").start()
    reader = UsageReader(prom.url, rate_window="2s")
    target = UsageTarget(NS, worker_pod_regex("llama"), "trainer", restarts_in_place=False)
    try:
        prom.wait_for_scrapes()
        deadline = time.monotonic() + 15
        while True:
            answer = await reader.read(target, 10.0, time.time())
            assert answer.usage is not None, answer.unavailable
            # Every scrape keeps both series: still two kills, not one per step.
            if len(answer.usage.memory) >= 3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert sorted(m for _, m in answer.usage.oom_kills) == [8 * GiB, 10 * GiB]
        assert max(v for _, v in answer.usage.memory) == 3 * GiB
        # Read as a Deployment's pods are (restart counter), the same workers show no kill.
        restarting = dataclasses.replace(target, restarts_in_place=True)
        answer = await reader.read(restarting, 10.0, time.time())
        assert answer.usage is not None and answer.usage.oom_kills == []
    finally:
        await reader.close()
        prom.stop()
        replayer.stop()
        exporter.stop()
