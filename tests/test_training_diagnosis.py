"""The TrainingJob diagnosis end to end against a real Prometheus: GPU metrics as dcgm-exporter
(or trimtab's GPU agent) export them for two workers, the handler's PromQL, and the sentence
that lands in status."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.prometheus_fixture import (  # noqa: F401  # fixtures
    MetricsExporter,
    PodTarget,
    metrics_exporter,
    prometheus_bin,
    prometheus_server,
)
from trimtab.api.trainingjob import Diagnosis, TrainingJobStatus
from trimtab.handlers.trainingjob import _refresh_diagnosis, diagnosis_queries
from trimtab.metrics.prometheus import PrometheusProvider

pytestmark = pytest.mark.prometheus
NOW = datetime.datetime(2025, 6, 1, 12, 0, tzinfo=datetime.UTC)
LOG = logging.getLogger(__name__)


def gpu_exporter(factory: Callable[..., MetricsExporter], *names: str) -> MetricsExporter:
    exporter: MetricsExporter = factory("generic")
    for name in names:
        exporter.declare(name, "gauge")
    return exporter


DCGM = ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE")


def targets(exporters: list[MetricsExporter], job: str = "llama-r0") -> list[PodTarget]:
    return [
        PodTarget(e.address, namespace="ml", pod=f"{job}-{i}-abcde",
                  labels={"trimtab.io/owner": "llama"})
        for i, e in enumerate(exporters)
    ]


async def diagnosis_when_ready(url: str, want_memory: bool) -> Diagnosis:
    """The diagnosis read from the Prometheus at `url`, once both workers' samples are
    queryable (the first scrape takes ~5 s; at most 30 s)."""
    provider = PrometheusProvider(url)
    deadline = time.monotonic() + 30
    try:
        while True:
            status = TrainingJobStatus(phase="Running")
            await _refresh_diagnosis(provider, "ml", "llama-r0", status, NOW, LOG)
            d = status.diagnosis
            assert d is not None
            ready = d.gpu_utilization is not None and (
                not want_memory or d.memory_used_ratio is not None
            )
            if ready or time.monotonic() > deadline:
                return d
            time.sleep(0.3)
    finally:
        await provider.close()


async def test_dcgm_metrics_give_input_bound_and_memory_headroom(
    metrics_exporter: Any, prometheus_server: Any  # noqa: F811
) -> None:
    workers = [gpu_exporter(metrics_exporter, *DCGM) for _ in range(2)]
    # Worker 0 at 20%, worker 1 at 26% utilization; 20 of 80 GiB used at peak.
    for exporter, util in zip(workers, (20.0, 26.0), strict=True):
        for gpu in ("0", "1"):
            exporter.set_gauge("DCGM_FI_DEV_GPU_UTIL", util, gpu=gpu)
            exporter.set_gauge("DCGM_FI_DEV_FB_USED", 20480.0, gpu=gpu)
            exporter.set_gauge("DCGM_FI_DEV_FB_FREE", 61440.0, gpu=gpu)
    # Another job's worker in the same namespace must not count.
    other = gpu_exporter(metrics_exporter, *DCGM)
    other.set_gauge("DCGM_FI_DEV_GPU_UTIL", 100.0, gpu="0")
    server = prometheus_server([*targets(workers), *targets([other], job="other-r0")])
    server.wait_for_scrapes()
    d = await diagnosis_when_ready(server.url, want_memory=True)
    assert d.gpu_utilization == pytest.approx(0.23, abs=1e-6)
    assert d.memory_used_ratio == pytest.approx(0.25, abs=1e-6)
    assert d.message == (
        "input-bound: GPU utilization 23% over 10 min; the GPUs wait for data, CPU work or the "
        "network; memory headroom: at most 25% of GPU memory used over 10 min; a larger batch "
        "would fit"
    )


def daemonset_exporter(factory: Callable[..., MetricsExporter]) -> MetricsExporter:
    """dcgm-exporter as it runs: one pod per node, its series naming the workload's pod in
    their own namespace/pod/container labels. Worker 0 at 20%, worker 1 at 26% utilization,
    20 of 80 GiB used at peak; another job's worker on the same node at 100%."""
    exporter = gpu_exporter(factory, *DCGM)
    for gpu, pod, util in (("0", "llama-r0-0-abcde", 20.0), ("1", "llama-r0-1-abcde", 26.0),
                           ("2", "other-r0-0-abcde", 100.0)):  # fmt: skip
        labels = {"gpu": gpu, "namespace": "ml", "pod": pod, "container": "trainer"}
        exporter.set_gauge("DCGM_FI_DEV_GPU_UTIL", util, **labels)
        exporter.set_gauge("DCGM_FI_DEV_FB_USED", 20480.0, **labels)
        exporter.set_gauge("DCGM_FI_DEV_FB_FREE", 61440.0, **labels)
    return exporter


async def test_dcgm_exporter_daemonset_read_through_its_renamed_labels(
    metrics_exporter: Any, prometheus_server: Any  # noqa: F811
) -> None:
    """The scrape target is the exporter's own pod (gpu-monitoring/dcgm-exporter-...), and with
    honor_labels false, the default, Prometheus renames the workload's labels exported_*.
    The diagnosis reads that spelling too, as right-sizing does; it said "no GPU metrics"."""
    exporter = daemonset_exporter(metrics_exporter)
    # The fixture keeps targets that carry trimtab.io/owner; the exporter's is not a worker's.
    target = PodTarget(exporter.address, namespace="gpu-monitoring", pod="dcgm-exporter-x1x2y",
                       labels={"trimtab.io/owner": "dcgm-exporter"})  # fmt: skip
    server = prometheus_server([target])
    server.wait_for_scrapes()
    d = await diagnosis_when_ready(server.url, want_memory=True)
    stored = server.query('DCGM_FI_DEV_GPU_UTIL{exported_pod="llama-r0-0-abcde"}')
    assert stored and stored[0]["metric"]["pod"] == "dcgm-exporter-x1x2y"
    assert d.gpu_utilization == pytest.approx(0.23, abs=1e-6)
    assert d.memory_used_ratio == pytest.approx(0.25, abs=1e-6)
    assert d.message.startswith("input-bound: GPU utilization 23% over 10 min")


async def test_trimtab_agent_metrics_when_there_is_no_dcgm(
    metrics_exporter: Any, prometheus_server: Any  # noqa: F811
) -> None:
    workers = [
        gpu_exporter(metrics_exporter, "trimtab_gpu_utilization_ratio") for _ in range(2)
    ]
    for exporter in workers:
        exporter.set_gauge("trimtab_gpu_utilization_ratio", 0.92, gpu="0", container="trainer")
    server = prometheus_server(targets(workers))
    server.wait_for_scrapes()
    d = await diagnosis_when_ready(server.url, want_memory=False)
    assert d.gpu_utilization == pytest.approx(0.92)
    assert d.memory_used_ratio is None
    assert d.message == "GPU-bound: GPU utilization 92% over 10 min"


async def test_no_metrics_is_said_in_status() -> None:
    provider = PrometheusProvider("http://127.0.0.1:9", timeout_s=0.5)
    status = TrainingJobStatus(phase="Running")
    try:
        await _refresh_diagnosis(provider, "ml", "llama-r0", status, NOW, LOG)
    finally:
        await provider.close()
    assert status.diagnosis is not None
    assert status.diagnosis.message.startswith("no GPU metrics")
    # Not asked again within the window.
    again = status.model_copy(deep=True)
    await _refresh_diagnosis(provider, "ml", "llama-r0", again,
                             NOW + datetime.timedelta(minutes=5), LOG)
    assert again.diagnosis == status.diagnosis


PODS_R3 = '"llama-r3-[0-9]+-[a-z0-9]{5}"'


@pytest.mark.parametrize(
    ("query", "selector"),
    [
        pytest.param("gpuUtilization", f'DCGM_FI_DEV_GPU_UTIL{{namespace="ml",pod=~{PODS_R3}}}',
                     id="utilization-dcgm-as-written"),
        pytest.param("gpuUtilization",
                     f'DCGM_FI_DEV_GPU_UTIL{{exported_namespace="ml",exported_pod=~{PODS_R3}}}',
                     id="utilization-dcgm-renamed-by-the-scrape"),
        pytest.param("gpuUtilization",
                     f'trimtab_gpu_utilization_ratio{{namespace="ml",pod=~{PODS_R3}}}',
                     id="utilization-trimtab-agent"),
        pytest.param("memoryUsedRatio", f'DCGM_FI_DEV_FB_USED{{namespace="ml",pod=~{PODS_R3}}}',
                     id="memory-used-as-written"),
        pytest.param("memoryUsedRatio",
                     f'DCGM_FI_DEV_FB_USED{{exported_namespace="ml",exported_pod=~{PODS_R3}}}',
                     id="memory-used-renamed-by-the-scrape"),
        pytest.param("memoryUsedRatio", f'DCGM_FI_DEV_FB_FREE{{namespace="ml",pod=~{PODS_R3}}}',
                     id="memory-free-as-written"),
        pytest.param("memoryUsedRatio",
                     f'DCGM_FI_DEV_FB_FREE{{exported_namespace="ml",exported_pod=~{PODS_R3}}}',
                     id="memory-free-renamed-by-the-scrape"),
    ],
)  # fmt: skip
def test_queries_read_both_spellings_of_the_pod_labels(query: str, selector: str) -> None:
    """dcgm-exporter's pod labels as it writes them, or as a scrape with honorLabels false
    renames them (exported_*), like metrics/usage.py's right-sizing queries."""
    assert f"{selector}[600s]" in diagnosis_queries("ml", "llama-r3", 600)[query]


def test_queries_select_only_the_attempts_pods() -> None:
    queries = diagnosis_queries("ml", "llama-r3", 600)
    for promql in queries.values():
        assert 'namespace="ml",pod=~"llama-r3-[0-9]+-[a-z0-9]{5}"' in promql
        assert "[600s]" in promql
    # A Job name the Job controller cuts for its pods (`<job>-<index>-` within 58 characters)
    # still selects them: the cut spellings are alternatives of the pattern.
    job = "a-very-long-training-job-name-for-the-llama-3-70b-finet-r0"
    promql = diagnosis_queries("ml", job, 600)["gpuUtilization"]
    assert "a-very-long-training-job-name-for-the-llama-3-70b-finet-[0-9]{1}-" in promql
