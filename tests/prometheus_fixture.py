"""A real Prometheus and a real model-server metrics exporter for tests and benchmarks.

`MetricsExporter` serves /metrics on 127.0.0.1 with the metric and label names that vLLM,
Triton, TGI, TorchServe or a generic HTTP server export; the test sets gauges, observes
histograms, increments counters, or sets a steady load that the counters follow at scrape time.
`PrometheusServer` runs the `prometheus` binary (on PATH, or $PROMETHEUS_BIN) on a random
127.0.0.1 port with a temp data dir, scraping exporters as if kubernetes_sd had found them in
pods (static targets carrying kubernetes_sd's meta labels: no cluster is needed, and the
Debian build of Prometheus has no kubernetes_sd), through the relabeling the README documents.

The pytest fixtures at the bottom are plain; register them by importing them into conftest.py."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from prometheus_client.utils import floatToGoString as _float_to_go

from trimtab.metrics.presets import SCRAPE_RELABEL_CONFIGS

Labels = tuple[tuple[str, str], ...]
# Go's float formatting (+Inf, NaN, 1e+06), as every Prometheus exporter writes numbers.
floatToGoString = cast(Callable[[float], str], _float_to_go)  # noqa: N816

# --------------------------------------------------------------------------------------------
# The exporter
# --------------------------------------------------------------------------------------------

# Bucket bounds as the servers ship them (upper bounds in seconds, +Inf added at render).
VLLM_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                        50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                     2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
TGI_DURATION_BUCKETS = tuple(round(0.0001 * 1.5**i, 6) for i in range(35))
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


@dataclass
class _Family:
    name: str
    kind: str  # gauge | counter | histogram | summary
    help: str
    buckets: tuple[float, ...] = ()
    values: dict[Labels, float] = field(default_factory=dict)
    hist: dict[Labels, list[float]] = field(default_factory=dict)  # bucket counts.., sum, count
    recent: dict[Labels, deque[float]] = field(default_factory=dict)  # summary observations


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _fmt_labels(labels: Labels | list[tuple[str, str]]) -> str:
    if not labels:
        return ""
    body = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels
    )
    return "{" + body + "}"


class MetricsExporter:
    """A /metrics endpoint on 127.0.0.1 that looks like one model-server pod.

    The exposition is written here in Prometheus text format 0.0.4, not by prometheus_client's
    registry, because prometheus_client always names counters `*_total` (Triton and TGI
    counters have no suffix) and, under OpenMetrics negotiation, rewrites `vllm:` to `vllm_`.
    `escape_colons=True` reproduces that rewrite, as newer vLLM builds show it to Prometheus.
    """

    SERVERS = ("vllm", "triton", "tgi", "torchserve", "generic")

    def __init__(
        self,
        server: str = "vllm",
        *,
        model: str = "demo",
        escape_colons: bool = False,
        queue_metric: str = "app_queue_depth",
        running_metric: str = "app_requests_in_flight",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if server not in self.SERVERS:
            raise ValueError(f"unknown server {server!r}; have {self.SERVERS}")
        self.server = server
        self.model = model
        self.escape_colons = escape_colons
        self.queue_metric = queue_metric
        self.running_metric = running_metric
        self._clock = clock
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}
        self._load: tuple[float, float, float, float] | None = None  # rps, latency, queue, err
        self._load_since = 0.0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.scrapes = 0
        _DECLARE[server](self)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> MetricsExporter:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MetricsExporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        assert self._httpd is not None, "exporter not started"
        return f"127.0.0.1:{self._httpd.server_address[1]}"

    # --- raw metric access -------------------------------------------------------------------
    def declare(
        self, name: str, kind: str, help: str = "", buckets: tuple[float, ...] = ()
    ) -> None:
        with self._lock:
            self._families.setdefault(name, _Family(name, kind, help or name, tuple(buckets)))

    def set_gauge(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._family(name, "gauge").values[_labels(labels)] = float(value)

    def inc_counter(self, name: str, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        with self._lock:
            values = self._family(name, "counter").values
            key = _labels(labels)
            values[key] = values.get(key, 0.0) + amount

    def observe(self, name: str, value: float, count: float = 1.0, **labels: str) -> None:
        """Record `count` observations of `value` (fractional counts model a steady rate)."""
        with self._lock:
            self._observe(name, value, count, labels)

    def _observe(self, name: str, value: float, count: float, labels: dict[str, str]) -> None:
        fam = self._families[name]
        key = _labels(labels)
        if fam.kind == "histogram":
            row = fam.hist.setdefault(key, [0.0] * (len(fam.buckets) + 2))
            for i, bound in enumerate(fam.buckets):
                if value <= bound:
                    row[i] += count
            row[-2] += value * count
            row[-1] += count
        elif fam.kind == "summary":
            row = fam.hist.setdefault(key, [0.0, 0.0])
            row[0] += value * count
            row[1] += count
            if count > 0:
                fam.recent.setdefault(key, deque(maxlen=2000)).append(value)
        else:
            raise ValueError(f"{name} is a {fam.kind}, not a histogram or summary")

    def _family(self, name: str, kind: str) -> _Family:
        fam = self._families.get(name)
        if fam is None:
            raise KeyError(f"{name} is not a {self.server} metric here; declare() it first")
        if fam.kind != kind:
            raise ValueError(f"{name} is a {fam.kind}, not a {kind}")
        return fam

    def _inc(self, name: str, amount: float, **labels: str) -> None:
        values = self._families[name].values
        key = _labels(labels)
        values[key] = values.get(key, 0.0) + amount

    # --- model-server level ------------------------------------------------------------------
    def set_queue(self, waiting: float) -> None:
        """Requests waiting, on the server's queue gauge (Triton, vLLM, TGI, generic).

        TorchServe has no queue gauge: its queue depth is what its latency counters imply."""
        with self._lock:
            _QUEUE[self.server](self, waiting)

    def set_running(self, running: float) -> None:
        """Requests in service, on the server's gauge (vLLM, TGI, generic)."""
        with self._lock:
            _RUNNING[self.server](self, running)

    def serve(
        self, requests: float, latency_s: float, queue_s: float = 0.0, errors: float = 0.0
    ) -> None:
        """Record `requests` finished requests, `errors` of them failed, each `latency_s` end
        to end of which `queue_s` waiting, on every counter and histogram the server keeps."""
        with self._lock:
            _SERVE[self.server](self, requests, latency_s, queue_s, errors)

    def set_load(
        self, rps: float, latency_s: float, queue_s: float = 0.0, error_ratio: float = 0.0
    ) -> None:
        """A steady load from now on: every scrape first records the requests finished since
        the last one, so rates in Prometheus come out exactly `rps`."""
        with self._lock:
            self._advance()
            self._load = (rps, latency_s, queue_s, error_ratio)
            self._load_since = self._clock()

    def _advance(self) -> None:
        now = self._clock()
        if self._load is not None:
            rps, latency, queue, err = self._load
            n = rps * (now - self._load_since)
            if n > 0:
                _SERVE[self.server](self, n, latency, queue, n * err)
        self._load_since = now

    # --- exposition ----------------------------------------------------------------------------
    def render(self) -> str:
        with self._lock:
            self._advance()
            self.scrapes += 1
            lines: list[str] = []
            for fam in self._families.values():
                name = fam.name.replace(":", "_") if self.escape_colons else fam.name
                lines.append(f"# HELP {name} {fam.help}")
                lines.append(f"# TYPE {name} {fam.kind}")
                lines.extend(self._samples(fam, name))
            return "\n".join(lines) + "\n"

    @staticmethod
    def _samples(fam: _Family, name: str) -> Iterator[str]:
        if fam.kind in ("gauge", "counter"):
            for key, value in fam.values.items():
                yield f"{name}{_fmt_labels(key)} {floatToGoString(value)}"
        elif fam.kind == "histogram":
            for key, row in fam.hist.items():
                for bound, n in zip((*fam.buckets, math.inf), (*row[:-2], row[-1]), strict=True):
                    le = [*key, ("le", floatToGoString(bound))]
                    yield f"{name}_bucket{_fmt_labels(le)} {floatToGoString(n)}"
                yield f"{name}_sum{_fmt_labels(key)} {floatToGoString(row[-2])}"
                yield f"{name}_count{_fmt_labels(key)} {floatToGoString(row[-1])}"
        else:  # summary with quantiles over the recent observations, as Triton's are
            for key, row in fam.hist.items():
                recent = sorted(fam.recent.get(key, ()))
                for q in (0.5, 0.9, 0.95, 0.99):
                    value = (
                        recent[min(len(recent) - 1, int(q * len(recent)))] if recent else math.nan
                    )
                    labels = _fmt_labels([*key, ("quantile", str(q))])
                    yield f"{name}{labels} {floatToGoString(value)}"
                yield f"{name}_sum{_fmt_labels(key)} {floatToGoString(row[0])}"
                yield f"{name}_count{_fmt_labels(key)} {floatToGoString(row[1])}"


# --- per-server metric sets, with the names and labels the real servers use ------------------


def _declare_vllm(e: MetricsExporter) -> None:
    e.declare(
        "vllm:num_requests_running", "gauge", "Number of requests in model execution batches."
    )
    e.declare("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.")
    e.declare("vllm:request_success_total", "counter", "Count of successfully processed requests.")
    e.declare("vllm:e2e_request_latency_seconds", "histogram", "E2E request latency in seconds.",
              VLLM_LATENCY_BUCKETS)  # fmt: skip
    e.declare("vllm:request_queue_time_seconds", "histogram", "Time in WAITING phase.",
              VLLM_LATENCY_BUCKETS)  # fmt: skip
    e.declare("vllm:request_inference_time_seconds", "histogram", "Time in RUNNING phase.",
              VLLM_LATENCY_BUCKETS)  # fmt: skip
    e.declare("vllm:time_to_first_token_seconds", "histogram", "Time to first token in seconds.",
              VLLM_TTFT_BUCKETS)  # fmt: skip
    e.declare(
        "http_requests_total", "counter", "Total number of requests by method, status and handler."
    )


def _serve_vllm(e: MetricsExporter, n: float, latency: float, queue: float, errors: float) -> None:
    m = {"model_name": e.model}
    ok = n - errors
    e._observe("vllm:e2e_request_latency_seconds", latency, ok, m)
    e._observe("vllm:request_queue_time_seconds", queue, ok, m)
    e._observe("vllm:request_inference_time_seconds", latency - queue, ok, m)
    e._observe("vllm:time_to_first_token_seconds", queue + (latency - queue) * 0.1, ok, m)
    e._inc("vllm:request_success_total", ok, finished_reason="stop", **m)
    http = {"handler": "/v1/completions", "method": "POST"}
    e._inc("http_requests_total", ok, status="2xx", **http)
    if errors:
        e._inc("http_requests_total", errors, status="5xx", **http)
    # The kubelet's probes and Prometheus' scrapes are HTTP requests too, all answered 2xx:
    # an error ratio over every route would be diluted by them.
    e._inc("http_requests_total", n, status="2xx", handler="/health", method="GET")
    e._inc("http_requests_total", n / 2, status="2xx", handler="/v1/models", method="GET")


def _declare_triton(e: MetricsExporter) -> None:
    for name, kind in (
        ("nv_inference_request_success", "counter"),
        ("nv_inference_request_failure", "counter"),
        ("nv_inference_count", "counter"),
        ("nv_inference_exec_count", "counter"),
        ("nv_inference_request_duration_us", "counter"),
        ("nv_inference_queue_duration_us", "counter"),
        ("nv_inference_compute_infer_duration_us", "counter"),
        ("nv_inference_pending_request_count", "gauge"),
        ("nv_inference_request_summary_us", "summary"),
    ):
        e.declare(name, kind, f"Triton {name}")


def _serve_triton(
    e: MetricsExporter, n: float, latency: float, queue: float, errors: float
) -> None:
    m = {"model": e.model, "version": "1"}
    ok = n - errors
    e._inc("nv_inference_request_success", ok, **m)
    if errors:
        e._inc("nv_inference_request_failure", errors, reason="REJECTED", **m)
    e._inc("nv_inference_count", ok, **m)
    e._inc("nv_inference_exec_count", ok, **m)
    e._inc("nv_inference_request_duration_us", ok * latency * 1e6, **m)
    e._inc("nv_inference_queue_duration_us", ok * queue * 1e6, **m)
    e._inc("nv_inference_compute_infer_duration_us", ok * (latency - queue) * 1e6, **m)
    e._observe("nv_inference_request_summary_us", latency * 1e6, ok, m)


# Requests TGI refuses as invalid (422), as a share of the load, on top of it.
TGI_VALIDATION_SHARE = 0.02


def _declare_tgi(e: MetricsExporter) -> None:
    e.declare("tgi_queue_size", "gauge", "Current queue size")
    e.declare("tgi_batch_current_size", "gauge", "Current batch size")
    e.declare("tgi_request_count", "counter", "Total number of requests")
    e.declare("tgi_request_success", "counter", "Number of successful requests")
    e.declare("tgi_request_failure", "counter", "Number of failed requests")
    for name in ("tgi_request_duration", "tgi_request_queue_duration",
                 "tgi_request_inference_duration"):  # fmt: skip
        e.declare(name, "histogram", name, TGI_DURATION_BUCKETS)


def _serve_tgi(e: MetricsExporter, n: float, latency: float, queue: float, errors: float) -> None:
    ok = n - errors
    # Through /v1/chat/completions TGI counts each request twice in tgi_request_count (the
    # route and the generation both add one: text-generation-inference issue #1901).
    e._inc("tgi_request_count", 2 * n)
    e._inc("tgi_request_success", ok)
    if errors:
        e._inc("tgi_request_failure", errors, err="generation")
    # Bad requests (422) fail as `validation`: not the server's errors, and no generation
    # (so not among the requests here either: TGI_VALIDATION_SHARE of the load on top).
    e._inc("tgi_request_failure", n * TGI_VALIDATION_SHARE, err="validation")
    e._observe("tgi_request_duration", latency, ok, {})
    e._observe("tgi_request_queue_duration", queue, ok, {})
    e._observe("tgi_request_inference_duration", latency - queue, ok, {})


def _declare_torchserve(e: MetricsExporter) -> None:
    e.declare("ts_inference_requests_total", "counter", "Total number of inference requests.")
    e.declare(
        "ts_inference_latency_microseconds",
        "counter",
        "Cumulative inference duration in microseconds",
    )
    e.declare(
        "ts_queue_latency_microseconds", "counter", "Cumulative queue duration in microseconds"
    )
    for status in ("2XX", "4XX", "5XX"):
        e.declare(
            f"Requests{status}", "counter", "Torchserve prometheus counter metric with unit: Count"
        )


def _serve_torchserve(
    e: MetricsExporter, n: float, latency: float, queue: float, errors: float
) -> None:
    m = {"model_name": e.model, "model_version": "default", "hostname": "pod-0"}
    e._inc("ts_inference_requests_total", n, **m)
    e._inc("ts_inference_latency_microseconds", n * latency * 1e6, **m)
    e._inc("ts_queue_latency_microseconds", n * queue * 1e6, **m)
    host = {"Level": "Host", "Hostname": "pod-0"}
    # Every HTTP response counts in the status classes: probes of /ping and scrapes too.
    e._inc("Requests2XX", n - errors + n, **host)
    if errors:
        e._inc("Requests5XX", errors, **host)


def _declare_generic(e: MetricsExporter) -> None:
    e.declare("http_request_duration_seconds", "histogram", "Duration of HTTP requests in seconds",
              HTTP_BUCKETS)  # fmt: skip
    e.declare(
        "http_requests_total", "counter", "Total number of requests by method, status and handler."
    )
    e.declare(e.queue_metric, "gauge", "Requests waiting in the server's queue")
    e.declare(e.running_metric, "gauge", "Requests being served")


def _serve_generic(
    e: MetricsExporter, n: float, latency: float, queue: float, errors: float
) -> None:
    http = {"handler": "/predict", "method": "POST"}
    e._observe("http_request_duration_seconds", latency, n, http)
    e._inc("http_requests_total", n - errors, status="2xx", **http)
    if errors:
        e._inc("http_requests_total", errors, status="5xx", **http)


def _gauge(name_of: Callable[[MetricsExporter], str | None], **fixed: str) -> Callable[..., None]:
    def apply(e: MetricsExporter, value: float) -> None:
        name = name_of(e)
        if name is not None:
            labels = {k: (e.model if v == "$model" else v) for k, v in fixed.items()}
            e._families[name].values[_labels(labels)] = float(value)

    return apply


_DECLARE: dict[str, Callable[[MetricsExporter], None]] = {
    "vllm": _declare_vllm,
    "triton": _declare_triton,
    "tgi": _declare_tgi,
    "torchserve": _declare_torchserve,
    "generic": _declare_generic,
}
_SERVE: dict[str, Callable[[MetricsExporter, float, float, float, float], None]] = {
    "vllm": _serve_vllm,
    "triton": _serve_triton,
    "tgi": _serve_tgi,
    "torchserve": _serve_torchserve,
    "generic": _serve_generic,
}
_QUEUE: dict[str, Callable[[MetricsExporter, float], None]] = {
    "vllm": _gauge(lambda e: "vllm:num_requests_waiting", model_name="$model"),
    "triton": _gauge(lambda e: "nv_inference_pending_request_count", model="$model", version="1"),
    "tgi": _gauge(lambda e: "tgi_queue_size"),
    "torchserve": _gauge(lambda e: None),
    "generic": _gauge(lambda e: e.queue_metric),
}
_RUNNING: dict[str, Callable[[MetricsExporter, float], None]] = {
    "vllm": _gauge(lambda e: "vllm:num_requests_running", model_name="$model"),
    "triton": _gauge(lambda e: None),
    "tgi": _gauge(lambda e: "tgi_batch_current_size"),
    "torchserve": _gauge(lambda e: None),
    "generic": _gauge(lambda e: e.running_metric),
}


# --------------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------------


def prometheus_binary() -> str | None:
    """$PROMETHEUS_BIN, else `prometheus` on PATH, else None."""
    env = os.environ.get("PROMETHEUS_BIN")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("prometheus")


def require_prometheus() -> str:
    """The binary's path, or skip the calling test with the reason."""
    binary = prometheus_binary()
    if binary is None:
        pytest.skip(
            "needs the prometheus binary: install it (Debian: apt-get install prometheus) "
            "or point PROMETHEUS_BIN at it"
        )
    return binary


@dataclass(frozen=True)
class PodTarget:
    """One scrape target as kubernetes_sd would find it: an address and a pod's metadata."""

    address: str
    namespace: str = "default"
    pod: str = "model-0"
    # Kubernetes pod labels, e.g. {"trimtab.io/owner": "chat", "trimtab.io/revision": "7f3a"}.
    labels: dict[str, str] = field(default_factory=dict)

    def meta_labels(self) -> dict[str, str]:
        """The `__meta_kubernetes_*` labels the pod role of kubernetes_sd_configs attaches."""
        meta = {
            "__meta_kubernetes_namespace": self.namespace,
            "__meta_kubernetes_pod_name": self.pod,
        }
        for key, value in self.labels.items():
            clean = "".join(c if c.isalnum() else "_" for c in key)
            meta[f"__meta_kubernetes_pod_label_{clean}"] = value
            meta[f"__meta_kubernetes_pod_labelpresent_{clean}"] = "true"
        return meta


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """The real Prometheus, on 127.0.0.1 with a random port and its data under `data_dir`.

    Targets carry kubernetes_sd's meta labels and go through `SCRAPE_RELABEL_CONFIGS`, the
    relabeling the README documents, so the stored series have the labels trimtab selects by."""

    def __init__(
        self,
        targets: list[PodTarget],
        data_dir: Path,
        *,
        scrape_interval: str = "200ms",
        binary: str | None = None,
        web_config: dict[str, Any] | None = None,
        ready_headers: dict[str, str] | None = None,
        ready_context: ssl.SSLContext | None = None,
    ) -> None:
        self.targets = targets
        self.data_dir = data_dir
        self.scrape_interval = scrape_interval
        self.binary = binary or require_prometheus()
        # Prometheus' --web.config.file (TLS, basic auth users); it reads the file again at
        # each request, so a test may change it while Prometheus runs (`write_web_config`).
        self.web_config = web_config
        # What the readiness check sends with such a config (an Authorization header).
        self.ready_headers = ready_headers or {}
        self.ready_context = ready_context
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        tls = self.web_config is not None and "tls_server_config" in self.web_config
        return f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    def write_web_config(self, web_config: dict[str, Any]) -> None:
        self.web_config = web_config
        (self.data_dir / "web.yml").write_text(yaml.safe_dump(web_config))

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "model-servers",
                    "scrape_interval": self.scrape_interval,
                    "scrape_timeout": self.scrape_interval,
                    "static_configs": [
                        {"targets": [t.address], "labels": t.meta_labels()} for t in self.targets
                    ],
                    "relabel_configs": SCRAPE_RELABEL_CONFIGS,
                }
            ],
        }

    def start(self, timeout_s: float = 15.0) -> PrometheusServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        web = []
        if self.web_config is not None:
            self.write_web_config(self.web_config)
            web = [f"--web.config.file={self.data_dir / 'web.yml'}"]
        # A free port can be taken between probing and binding; try a few.
        for _attempt in range(3):
            self.port = _free_port()
            log = (self.data_dir / "prometheus.log").open("wb")
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    *web,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            if self._wait_ready(timeout_s):
                return self
            self.stop()
        raise RuntimeError(f"prometheus did not start; log:\n{self.log_tail()}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            request = urllib.request.Request(f"{self.url}/-/ready", headers=self.ready_headers)
            # Readiness only: the certificate is the test's to check, not this loop's.
            context = self.ready_context
            if context is None and self.url.startswith("https"):
                context = ssl._create_unverified_context()
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(request, timeout=1, context=context) as r,
            ):
                if r.status == 200:
                    return True
            time.sleep(0.05)
        return False

    def wait_for_scrapes(self, timeout_s: float = 20.0) -> None:
        """Block until every target has been scraped successfully (the first scrape comes
        about 5 s after start: Prometheus batches target discovery updates)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            active = self.api("targets")["activeTargets"]
            if len(active) == len(self.targets) and all(t["health"] == "up" for t in active):
                return
            time.sleep(0.1)
        raise TimeoutError(f"targets not up within {timeout_s}s: {self.api('targets')}")

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as r:
            return json.load(r)["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=promql)["result"]
        return result

    def stop(self) -> None:
        """Stop by PID: SIGTERM, then SIGKILL after 5 s."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def log_tail(self, chars: int = 2000) -> str:
        path = self.data_dir / "prometheus.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(
    check: Callable[[], bool], timeout_s: float, interval_s: float = 0.1, what: str = "condition"
) -> None:
    """Poll `check` until true; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_s)
    raise AssertionError(f"{what} not met within {timeout_s}s")


# --------------------------------------------------------------------------------------------
# pytest fixtures (import them into conftest.py or a test module to use them)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    """The prometheus binary; skips the test when there is none."""
    return require_prometheus()


@pytest.fixture
def metrics_exporter() -> Iterator[Callable[..., MetricsExporter]]:
    """A factory: `metrics_exporter("vllm", model="m")` starts an exporter, stopped after."""
    started: list[MetricsExporter] = []

    def make(server: str = "vllm", **kwargs: Any) -> MetricsExporter:
        exporter = MetricsExporter(server, **kwargs).start()
        started.append(exporter)
        return exporter

    yield make
    for exporter in started:
        exporter.stop()


@pytest.fixture
def prometheus_server(
    prometheus_bin: str, tmp_path: Path
) -> Iterator[Callable[..., PrometheusServer]]:
    """A factory: `prometheus_server([PodTarget(...)], scrape_interval="200ms")` starts a
    Prometheus scraping those targets; every one started is stopped after the test."""
    started: list[PrometheusServer] = []

    def make(targets: list[PodTarget], scrape_interval: str = "200ms") -> PrometheusServer:
        server = PrometheusServer(
            targets,
            tmp_path / f"prometheus-{len(started)}",
            scrape_interval=scrape_interval,
            binary=prometheus_bin,
        ).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
