"""The GPU data path through a real Prometheus: the agent's `--no-kube` series named by the
README's join with kube-state-metrics, and dcgm-exporter's pod labels through the README's
ServiceMonitor settings, read with the operator's own DCGM query."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.prometheus_fixture import (
    MetricsExporter,
    PodTarget,
    PrometheusServer,
    prometheus_bin,  # noqa: F401  # a fixture
    wait_until,
)
from tests.test_gpu_agent import CID_A, CID_B, UID_A, UID_B, FakeNvml, _proc, _systemd
from trimtab.gpu.agent import GpuUsageCollector, NvmlReader, serve
from trimtab.metrics.usage import (
    DCGM_GPU_MEMORY,
    DCGM_GPU_UTIL,
    UsageTarget,
    pod_regex_for,
    usage_queries,
)

pytestmark = pytest.mark.prometheus

README = Path(__file__).resolve().parents[1] / "README.md"
NS = "ml"
POD = "chat-0123456789-7d9f8c6b5-x2x9z"
GiB = 2**30


def _readme_blocks(language: str, *needles: str) -> list[str]:
    """The README's fenced `language` blocks that contain every needle, in order."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", README.read_text(), re.M | re.S)
    return [b for b in blocks if all(n in b for n in needles)]


def _endpoint_as_scrape_config(endpoint: dict[str, Any]) -> dict[str, Any]:
    """What prometheus-operator makes of a ServiceMonitor endpoint's honorLabels and
    metricRelabelings (camelCase keys to Prometheus's snake_case)."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return {
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "metric_relabel_configs": [
            {keys.get(k, k): v for k, v in rule.items()}
            for rule in endpoint.get("metricRelabelings", [])
        ],
    }


def _documented_dcgm_endpoints() -> dict[str, dict[str, Any]]:
    monitor, fragment = (
        yaml.safe_load(b) for b in _readme_blocks("yaml", "endpoints:", "honorLabels")
    )
    return {
        "dcgm-honor-labels": _endpoint_as_scrape_config(monitor["spec"]["endpoints"][0]),
        "dcgm-relabel": _endpoint_as_scrape_config(fragment["endpoints"][0]),
    }


class ScrapeJobsPrometheus(PrometheusServer):
    """One job per target, each with its own scrape settings and the target labels a
    ServiceMonitor gives the scraped pod (namespace, pod, container)."""

    def __init__(self, jobs: dict[str, tuple[PodTarget, dict[str, Any]]], data_dir: Path) -> None:
        super().__init__([target for target, _ in jobs.values()], data_dir)
        self.jobs = jobs

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": name,
                    "scrape_interval": self.scrape_interval,
                    "scrape_timeout": self.scrape_interval,
                    "static_configs": [
                        {
                            "targets": [target.address],
                            "labels": {
                                "namespace": target.namespace,
                                "pod": target.pod,
                                "container": target.labels.get("container", ""),
                            },
                        }
                    ],
                    **settings,
                }
                for name, (target, settings) in self.jobs.items()
            ],
        }


@pytest.fixture(scope="module")
def prometheus(
    prometheus_bin: str,  # noqa: F811  (the fixture)
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ScrapeJobsPrometheus]:
    # The agent in --no-kube mode, NVML faked at the pynvml boundary: pod UIDs and container IDs.
    root = tmp_path_factory.mktemp("proc")
    _proc(root, 101, _systemd(UID_A, CID_A))
    _proc(root, 102, _systemd(UID_A, CID_A))
    _proc(root, 201, f"0::/kubepods/besteffort/pod{UID_B}/{CID_B}")
    _proc(root, 999, "0::/system.slice/some-host-daemon.service")
    patch = pytest.MonkeyPatch()
    FakeNvml().patch(patch)
    server, thread = serve(GpuUsageCollector(NvmlReader(), None, root), "127.0.0.1", 0)

    # kube-state-metrics' pod and container info for both pods.
    ksm = MetricsExporter("generic").start()
    ksm.declare("kube_pod_info", "gauge")
    ksm.declare("kube_pod_container_info", "gauge")
    for uid, ns, pod, container, cid in (
        (UID_A, NS, POD, "server", CID_A),
        (UID_B, "batch", "trainer-0", "trainer", CID_B),
    ):
        ksm.set_gauge(
            "kube_pod_info", 1, namespace=ns, pod=pod, uid=uid, node="gpu-1", created_by_kind=""
        )
        ksm.set_gauge(
            "kube_pod_container_info",
            1,
            namespace=ns,
            pod=pod,
            uid=uid,
            container=container,
            container_id=f"containerd://{cid}",
            image="registry.example/app:1",
        )

    # dcgm-exporter with pod mapping: GPU 0 held by the chat pod, GPU 1 idle (empty labels).
    dcgm = MetricsExporter("generic").start()
    dcgm.declare(DCGM_GPU_MEMORY, "gauge")
    dcgm.declare(DCGM_GPU_UTIL, "gauge")
    for gpu, (ns, pod, container), mib, util in (
        ("0", (NS, POD, "server"), 12 * 1024, 70),
        ("1", ("", "", ""), 0, 0),
    ):
        labels = {
            "gpu": gpu,
            "UUID": f"GPU-{gpu}",
            "device": f"nvidia{gpu}",
            "modelName": "NVIDIA H100 80GB HBM3",
            "Hostname": "gpu-1",
            "namespace": ns,
            "pod": pod,
            "container": container,
        }
        dcgm.set_gauge(DCGM_GPU_MEMORY, mib, **labels)
        dcgm.set_gauge(DCGM_GPU_UTIL, util, **labels)

    def target(address: str, ns: str, pod: str, container: str) -> PodTarget:
        return PodTarget(address, ns, pod, {"container": container})

    agent = target(f"127.0.0.1:{server.server_port}", "trimtab", "trimtab-gpu-agent-q7x2k", "gpu")
    dcgm_pod = target(dcgm.address, "gpu-monitoring", "dcgm-exporter-5kq2p", "exporter")
    jobs: dict[str, tuple[PodTarget, dict[str, Any]]] = {
        # As the chart's ServiceMonitor scrapes the agent.
        "gpu-agent": (agent, {"honor_labels": True}),
        "kube-state-metrics": (
            target(ksm.address, "monitoring", "kube-state-metrics-0", "kube-state-metrics"),
            {"honor_labels": True},
        ),
        # A ServiceMonitor's default: the target's labels win, dcgm-exporter's are renamed.
        "dcgm-default": (dcgm_pod, {"honor_labels": False}),
        **{name: (dcgm_pod, config) for name, config in _documented_dcgm_endpoints().items()},
    }
    prom = ScrapeJobsPrometheus(jobs, tmp_path_factory.mktemp("prom"))
    prom.binary = prometheus_bin
    try:
        prom.start()
        prom.wait_for_scrapes()
        yield prom
    finally:
        prom.stop()
        server.shutdown()
        thread.join(timeout=5)
        ksm.stop()
        dcgm.stop()
        patch.undo()


def test_readme_join_names_the_no_kube_agent_series(prometheus: ScrapeJobsPrometheus) -> None:
    (join,) = _readme_blocks("promql", "kube_pod_info")
    assert prometheus.query('trimtab_gpu_memory_used_bytes{pod_uid!=""}'), "agent not scraped"
    result: list[dict[str, Any]] = []

    def joined() -> bool:
        result[:] = prometheus.query(join)
        return len(result) == 2

    wait_until(joined, timeout_s=10, what=f"the join to give 2 series: {result}")
    named = {
        (r["metric"]["namespace"], r["metric"]["pod"], r["metric"]["container"]): (
            r["metric"]["gpu"],
            float(r["value"][1]),
        )
        for r in result
    }
    assert named == {
        (NS, POD, "server"): ("0", 4 * GiB),
        ("batch", "trainer-0", "trainer"): ("1/mig0", 20 * GiB),
    }


@pytest.mark.parametrize(
    "job",
    [
        pytest.param("dcgm-default", id="honor-labels-false-read-through-exported-labels"),
        pytest.param("dcgm-honor-labels", id="readme-honor-labels-true"),
        pytest.param("dcgm-relabel", id="readme-metric-relabelings"),
    ],
)
def test_operator_dcgm_query_through_a_servicemonitor(
    prometheus: ScrapeJobsPrometheus, job: str
) -> None:
    """The operator's DCGM query (metrics/usage.py) on each scrape setting: with a ServiceMonitor's
    default the pod labels are exported_*, which the query reads too; the README's two settings
    keep them as namespace/pod/container."""
    renamed = prometheus.query(f'{DCGM_GPU_MEMORY}{{job="{job}",exported_pod="{POD}"}}')
    if job == "dcgm-default":
        assert renamed and renamed[0]["metric"]["pod"] == "dcgm-exporter-5kq2p"
    else:
        assert renamed == []
    queries = usage_queries(UsageTarget(NS, pod_regex_for("chat"), "server"), 60, "5m")

    def in_job(promql: str) -> str:
        return promql.replace("{namespace=", f'{{job="{job}",namespace=').replace(
            "{exported_namespace=", f'{{job="{job}",exported_namespace='
        )

    memory, util, model = (in_job(queries[k]) for k in ("gpu_memory_dcgm", "gpu_util_dcgm",
                                                          "gpu_model_dcgm"))
    assert [float(r["value"][1]) for r in prometheus.query(memory)] == [12 * GiB]
    assert [float(r["value"][1]) for r in prometheus.query(util)] == [0.7]
    assert [r["metric"]["modelName"] for r in prometheus.query(model)] == [
        "NVIDIA H100 80GB HBM3"
    ]
    if job != "dcgm-default":
        # The idle GPU names no workload's pod (none with honorLabels: dcgm-exporter's empty
        # label wins; dcgm-exporter's own after the relabeling) and keeps no exported_* label.
        (idle,) = prometheus.query(f'{DCGM_GPU_MEMORY}{{job="{job}",gpu="1"}}')
        assert idle["metric"].get("pod", "") in ("", "dcgm-exporter-5kq2p")
        assert not any(k.startswith("exported_") for k in idle["metric"])


def test_an_exporter_two_jobs_scrape_is_counted_once(prometheus: ScrapeJobsPrometheus) -> None:
    """The README's two dcgm-exporter settings scrape the same exporter here, as a GPU
    Operator ServiceMonitor beside an annotation-driven job would: two series per GPU that
    differ only in `job`. The operator's GPU memory query dedupes per device before it sums a
    pod's GPUs, so a 12 GiB peak reads 12 GiB, not 24 (it read 24 when it summed raw series)."""
    queries = usage_queries(UsageTarget(NS, pod_regex_for("chat"), "server"), 60, "5m")
    both = prometheus.query(f'{DCGM_GPU_MEMORY}{{exported_pod="",pod="{POD}"}}')
    assert len({s["metric"]["job"] for s in both}) == 2  # the duplicate is there
    assert [float(r["value"][1]) for r in prometheus.query(queries["gpu_memory_dcgm"])] == [
        12 * GiB
    ]
