"""metrics/usage.py against a real Prometheus scraping an exporter that replays container usage
as cAdvisor, kube-state-metrics and trimtab's gpu-agent expose it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

import trimtab.handlers.rightsizing as rightsizing_handler
from tests.prometheus_fixture import (
    MetricsExporter,
    PodTarget,
    PrometheusServer,
    prometheus_bin,  # noqa: F401  # a fixture
    wait_until,
)
from trimtab.decisions.rightsizing import (
    CurrentResources,
    GiB,
    Policy,
    recommend_resources,
)
from trimtab.metrics.usage import (
    AGENT_GPU_MEMORY,
    CPU_SERIES,
    DCGM_GPU_MEMORY,
    LIMITS_SERIES,
    MEMORY_SERIES,
    RESTARTS_SERIES,
    UsageReader,
    UsageTarget,
    pod_regex_for,
    usage_queries,
)

pytestmark = pytest.mark.prometheus

NS = "ml"
POD = "chat-0123456789-7d9f8c6b5-x2x9z"
OTHER_POD = "chatty-0123456789-7d9f8c6b5-aaaaa"


class HonorLabelsPrometheus(PrometheusServer):
    """Scrapes the exporter as Prometheus scrapes the kubelet's cAdvisor endpoint: the series
    carry their own namespace/pod/container labels (honor_labels)."""

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "usage",
                    "honor_labels": True,
                    "scrape_interval": self.scrape_interval,
                    "scrape_timeout": self.scrape_interval,
                    "static_configs": [{"targets": [t.address for t in self.targets]}],
                }
            ],
        }


class UsageReplayer:
    """Moves the exporter's series every 100 ms: CPU seconds at `cores`, working set at
    `memory`, GPU memory from the agent, the memory limit at `limit` (kube-state-metrics);
    `oom()` records an OOM-killed restart."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self.e = exporter
        self.cores = 0.5
        self.memory = 2 * GiB
        self.limit = 2.5 * GiB
        self.gpu_memory = 6e9
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        labels = {"namespace": NS, "pod": POD, "container": "server"}
        self.labels = labels
        exporter.declare(CPU_SERIES, "counter")
        exporter.declare(MEMORY_SERIES, "gauge")
        exporter.declare("kube_pod_container_status_restarts_total", "counter")
        exporter.declare("kube_pod_container_status_last_terminated_reason", "gauge")
        exporter.declare(LIMITS_SERIES, "gauge")
        exporter.declare(AGENT_GPU_MEMORY, "gauge")
        exporter.declare("trimtab_gpu_utilization_ratio", "gauge")
        exporter.inc_counter("kube_pod_container_status_restarts_total", 0.0, **labels)
        # A pod of another workload with a similar name must not be read.
        exporter.set_gauge(MEMORY_SERIES, 50 * GiB, namespace=NS, pod=OTHER_POD, container="server")

    def start(self) -> UsageReplayer:
        self._thread.start()
        return self

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.1):
            now = time.monotonic()
            self.e.inc_counter(CPU_SERIES, self.cores * (now - last), **self.labels)
            self.e.set_gauge(MEMORY_SERIES, self.memory, **self.labels)
            self.e.set_gauge(
                LIMITS_SERIES, self.limit, resource="memory", unit="byte", **self.labels
            )
            self.e.set_gauge(
                AGENT_GPU_MEMORY,
                self.gpu_memory,
                gpu="0",
                gpu_model="NVIDIA H100 80GB HBM3",
                **self.labels,
            )
            self.e.set_gauge("trimtab_gpu_utilization_ratio", 0.1, gpu="0", **self.labels)
            last = now

    def oom(self) -> None:
        self.e.set_gauge(
            "kube_pod_container_status_last_terminated_reason", 1, reason="OOMKilled", **self.labels
        )
        self.e.inc_counter("kube_pod_container_status_restarts_total", 1, **self.labels)

    def restart(self, reason: str) -> None:
        """A restart whose termination had `reason` (kube-state-metrics: 1 for it, 0 others)."""
        for r in ("OOMKilled", "Error"):
            self.e.set_gauge(
                "kube_pod_container_status_last_terminated_reason",
                1 if r == reason else 0,
                reason=r,
                **self.labels,
            )
        self.e.inc_counter("kube_pod_container_status_restarts_total", 1, **self.labels)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def usage_for_operator(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    replayer: Callable[[MetricsExporter], Any] = UsageReplayer,
    wait: bool = True,
) -> Iterator[Any]:
    """For the operator's right-sizing timers: a real Prometheus scraping an exporter that
    `replayer` moves, read with a 2 s rate window, a pass every second. Yields the replayer;
    with `wait`, once Prometheus has scraped."""
    exporter = MetricsExporter("generic").start()
    moving = replayer(exporter).start()
    prom = HonorLabelsPrometheus([PodTarget(exporter.address)], tmp_path / "prom").start()
    monkeypatch.setenv("TRIMTAB_RIGHTSIZING_INTERVAL_SECONDS", "1")
    monkeypatch.setattr(
        rightsizing_handler, "make_reader", lambda memo: UsageReader(prom.url, rate_window="2s")
    )
    try:
        if wait:
            prom.wait_for_scrapes()
        yield moving
    finally:
        prom.stop()
        moving.stop()
        exporter.stop()


@pytest.fixture
def replay(
    prometheus_bin: str,  # noqa: F811  # the fixture imported above
    tmp_path: Path,
) -> Iterator[tuple[UsageReplayer, PrometheusServer]]:
    exporter = MetricsExporter("generic").start()
    replayer = UsageReplayer(exporter).start()
    prom = HonorLabelsPrometheus(
        [PodTarget(exporter.address)], tmp_path / "prom", scrape_interval="200ms"
    ).start()
    try:
        prom.wait_for_scrapes()
        yield replayer, prom
    finally:
        prom.stop()
        replayer.stop()
        exporter.stop()


TARGET = UsageTarget(NS, pod_regex_for("chat"), "server")


async def test_reads_usage_oom_and_gpu_and_recommends(
    replay: tuple[UsageReplayer, PrometheusServer],
) -> None:
    replayer, prom = replay
    reader = UsageReader(prom.url, rate_window="2s")
    try:
        wait_until(lambda: bool(prom.query(f"{MEMORY_SERIES}{{pod={POD!r}}}")), 20, what="data")
        await asyncio.sleep(3)
        replayer.oom()
        wait_until(
            lambda: bool(prom.query("kube_pod_container_status_last_terminated_reason == 1")),
            10,
            what="OOM series",
        )
        await asyncio.sleep(2.5)
        # Under load a scrape can land late: read until the window holds every sample (bounded).
        deadline = time.monotonic() + 15
        while True:
            now = time.time()
            answer = await reader.read(TARGET, 10.0, now, wants_gpu=True)
            assert answer.usage is not None, answer.unavailable
            full = recommend_resources(
                answer.usage,
                CurrentResources(cpu=2.0, memory=8 * GiB, gpu=1),
                Policy(window_s=6.0),
                now,
            )
            # (A kill is answered before the window is full: wait for the whole answer.)
            whole = full.state == "Recommended" and "insufficient data" not in full.message
            if whole or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        await reader.close()
    usage = answer.usage
    assert usage.missing_series == () and usage.missing_gpu_series == ()
    assert usage.step_seconds == 1.0
    cpus = [v for _, v in usage.cpu]
    assert cpus and 0.3 < sorted(cpus)[len(cpus) // 2] < 0.7, cpus
    # The other workload's 50 GiB pod is not ours.
    assert max(v for _, v in usage.memory) == 2 * GiB
    # The kill is valued at the limit the pod had (2.5 GiB), not at its working set.
    assert len(usage.oom_kills) == 1 and usage.oom_kills[0][1] == 2.5 * GiB
    assert max(v for _, v in usage.gpu_memory) == 6e9
    assert usage.gpu_model == "H100-80GB"

    rec = recommend_resources(
        usage, CurrentResources(cpu=2.0, memory=8 * GiB, gpu=1), Policy(window_s=6.0), now
    )
    assert rec.state == "Recommended", rec.message
    assert rec.memory is not None and rec.memory >= 2.5 * GiB * 1.2  # the OOM bump
    assert rec.gpu_shape is not None and rec.gpu_shape.resource_name == "nvidia.com/mig-1g.10gb"


async def test_each_kill_of_a_crash_loop_counts_and_other_restarts_do_not(
    replay: tuple[UsageReplayer, PrometheusServer],
) -> None:
    """Three OOM kills of one container, then a restart for another reason. Each kill is a rise
    of the restart counter while the last termination says OOMKilled: three kills (an
    increase() over windows merged a crash loop into one), and the Error restart is none."""
    replayer, prom = replay
    reader = UsageReader(prom.url, rate_window="2s")
    restarts = "kube_pod_container_status_restarts_total"
    try:
        wait_until(lambda: bool(prom.query(f"{MEMORY_SERIES}{{pod={POD!r}}}")), 20, what="data")
        await asyncio.sleep(1.5)
        for n, reason in enumerate(("OOMKilled", "OOMKilled", "OOMKilled", "Error"), start=1):
            replayer.restart(reason)
            wait_until(
                lambda n=n: [float(r["value"][1]) for r in prom.query(f"{restarts}{{pod={POD!r}}}")]
                == [float(n)],
                10,
                what=f"restart {n} scraped",
            )
            await asyncio.sleep(1.2)
        answer = await reader.read(TARGET, 12.0, time.time())
    finally:
        await reader.close()
    assert answer.usage is not None, answer.unavailable
    assert len(answer.usage.oom_kills) == 3, answer.usage.oom_kills
    assert {v for _, v in answer.usage.oom_kills} == {2.5 * GiB}


async def test_steps_whose_working_set_reached_the_limit_are_named_with_it(
    replay: tuple[UsageReplayer, PrometheusServer],
) -> None:
    """2 GiB under a 2.5 GiB limit, then 2.45 GiB (98% of it: the kernel holding the working
    set under the limit by reclaiming cache): only the later steps are at the limit, and they
    carry the pod's limit, which right-sizing then holds without headroom."""
    replayer, prom = replay
    reader = UsageReader(prom.url, rate_window="2s")
    try:
        wait_until(lambda: bool(prom.query(f"{MEMORY_SERIES}{{pod={POD!r}}}")), 20, what="data")
        await asyncio.sleep(3)
        replayer.memory = 2.45 * GiB
        wait_until(
            lambda: [float(r["value"][1]) for r in prom.query(f"{MEMORY_SERIES}{{pod={POD!r}}}")]
            == [2.45 * GiB],
            10,
            what="the working set at the limit",
        )
        await asyncio.sleep(2.5)
        answer = await reader.read(TARGET, 10.0, time.time())
    finally:
        await reader.close()
    assert answer.usage is not None, answer.unavailable
    usage = answer.usage
    at_limit = dict(usage.memory_at_limit)
    assert at_limit and set(at_limit.values()) == {2.5 * GiB}, usage.memory_at_limit
    below = [t for t, v in usage.memory if v == 2 * GiB]
    assert below and not any(t in at_limit for t in below)
    assert all(t in at_limit for t, v in usage.memory if v == 2.45 * GiB)


async def test_gpu_memory_peak_between_points_is_kept(
    replay: tuple[UsageReplayer, PrometheusServer],
) -> None:
    """GPU memory is sized from its peak: a spike that ended before the point is read still
    counts for the step it fell in, as memory's does (an instant read would see 6 GB)."""
    replayer, prom = replay
    query = usage_queries(TARGET, 30, "2s")["gpu_memory_agent"]

    def values(promql: str) -> list[float]:
        return [float(r["value"][1]) for r in prom.query(promql)]

    def scraped(value: float) -> bool:
        return values(f"{AGENT_GPU_MEMORY}{{pod={POD!r}}}") == [value]

    wait_until(lambda: bool(values(query)), 20, what="GPU series")
    replayer.gpu_memory = 9e9
    wait_until(lambda: scraped(9e9), 10, what="the spike scraped")
    await asyncio.sleep(0.6)
    replayer.gpu_memory = 6e9
    wait_until(lambda: scraped(6e9), 10, what="the spike's end scraped")
    assert values(query) == [9e9]


async def test_missing_series_are_named(replay: tuple[UsageReplayer, PrometheusServer]) -> None:
    _, prom = replay
    reader = UsageReader(prom.url, rate_window="2s")
    try:
        answer = await reader.read(
            UsageTarget(NS, pod_regex_for("absent"), "server"), 10.0, time.time(), wants_gpu=True
        )
    finally:
        await reader.close()
    assert answer.usage is not None
    assert answer.usage.missing_series == (CPU_SERIES, MEMORY_SERIES, RESTARTS_SERIES)
    assert DCGM_GPU_MEMORY in answer.usage.missing_gpu_series[0]


async def test_missing_kube_state_metrics_is_named_not_read_as_no_kills(
    replay: tuple[UsageReplayer, PrometheusServer],
) -> None:
    """The other workload's pod has a working set (cAdvisor) but no kube-state-metrics series:
    its OOM kills cannot be seen, so no recommendation may be made as if it had none."""
    _, prom = replay
    reader = UsageReader(prom.url, rate_window="2s")
    other = UsageTarget(NS, pod_regex_for("chatty"), "server")
    try:
        query = f"{MEMORY_SERIES}{{pod={OTHER_POD!r}}}"
        wait_until(lambda: bool(prom.query(query)), 20, what="data")
        # Under load a scrape can land late: read until the working set shows (bounded).
        deadline = time.monotonic() + 15
        while True:
            answer = await reader.read(other, 10.0, time.time())
            assert answer.usage is not None, answer.unavailable
            if answer.usage.memory or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        await reader.close()
    assert answer.usage is not None and answer.usage.memory
    assert RESTARTS_SERIES in answer.usage.missing_series
    assert MEMORY_SERIES not in answer.usage.missing_series
    rec = recommend_resources(
        answer.usage, CurrentResources(cpu=2.0), Policy(window_s=6.0), time.time()
    )
    assert rec.state == "MissingMetrics" and RESTARTS_SERIES in rec.message


async def test_unreachable_prometheus_is_unavailable() -> None:
    reader = UsageReader("http://127.0.0.1:9", timeout_s=3)
    try:
        answer = await reader.read(TARGET, 60.0, time.time())
    finally:
        await reader.close()
    assert answer.usage is None
    assert "127.0.0.1:9" in answer.unavailable


class OneQueryRefused(UsageReader):
    """The memory query is refused at once; the others take a while (a slow Prometheus)."""

    async def _range(self, promql: str, start: float, end: float, step_s: int) -> Any:
        if "container_memory_working_set_bytes" in promql:
            raise requests.ConnectionError("connection refused")
        await asyncio.sleep(0.3)
        return []


async def test_a_failed_query_leaves_no_other_query_running() -> None:
    """One failure answers "unavailable" only once every query of the batch has ended: none is
    left running past the call, to fail later, unobserved (kopf re-raises such a task's error
    when the operator stops)."""
    reader = OneQueryRefused("http://127.0.0.1:9", timeout_s=3)
    try:
        answer = await reader.read(TARGET, 60.0, time.time())
    finally:
        await reader.close()
    assert answer.usage is None and "ConnectionError" in answer.unavailable
    assert asyncio.all_tasks() == {asyncio.current_task()}



@pytest.mark.parametrize(
    ("step_s", "rate_window", "peak_range"),
    [
        pytest.param(300, "2m", "[300s]", id="a-week-at-5-minute-steps"),
        pytest.param(21, "2m", "[120s]", id="a-12h-window-never-under-the-rate-window"),
        pytest.param(1, "2s", "[2s]", id="tests-scrape-fast"),
    ],
)
def test_peaks_are_read_over_at_least_the_rate_window(
    step_s: int, rate_window: str, peak_range: str
) -> None:
    """A short `window` makes a step shorter than the scrape interval (12h: 21 s); a peak read
    over just the step would find no sample at most points, and coverage would never reach
    what the recommendation needs."""
    queries = usage_queries(TARGET, step_s, rate_window)
    for key in ("memory", "gpu_memory_agent", "gpu_memory_dcgm"):
        assert f"{peak_range})" in queries[key], queries[key]


# A container's CPU counter at one sample per 15 s: `values` in promtool's notation.
CPU_BURSTS = [
    pytest.param("0 0+60x10 600x10", 4.0, id="burst-between-two-steps"),
    pytest.param("0x10 0+60x10", 4.0, id="burst-just-before-the-step"),
    pytest.param("0+15x20", 1.0, id="steady-one-core"),
    pytest.param("0x20", 0.0, id="idle"),
]  # fmt: skip


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (prometheus) not installed")
@pytest.mark.parametrize(("values", "peak"), CPU_BURSTS)
def test_the_cpu_read_at_a_step_is_its_peak(values: str, peak: float, tmp_path: Path) -> None:
    """Evaluated by Prometheus (promtool) at a 5-minute step: a burst of 4 cores from 0m15s to
    2m45s, then idle. A 2-minute rate taken at the step alone reads 0 there, and the in-place
    target ("what the busiest pod used in the last 15 minutes") would cut the pods below the
    burst; the query reads the step's peak."""
    query = usage_queries(TARGET, 300, "2m")["cpu"]
    series = (f'container_cpu_usage_seconds_total{{namespace="{NS}",'
              f'pod="chat-0123456789-7d9f8c6b5-x2x9z",container="server"}}')  # fmt: skip
    test = {
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [{"series": series, "values": values}],
            "promql_expr_test": [{"expr": query, "eval_time": "5m",
                                  "exp_samples": [{"labels": "{}", "value": peak}]}],
        }],
    }  # fmt: skip
    path = tmp_path / "cpu.test.yml"
    path.write_text(yaml.safe_dump(test))
    result = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
