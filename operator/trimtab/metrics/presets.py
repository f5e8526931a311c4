"""PromQL for each model-server preset (vLLM, Triton, TGI, TorchServe, generic), so users write
no PromQL; and the rendering of users' per-signal overrides.

Every query selects one ModelDeployment (namespace + owner label) and, when given, one revision,
so a canary and its stable revision are measured apart. Each query answers one number."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from trimtab.api.autoscaling import MetricQueries
from trimtab.metrics.base import SIGNAL_NAMES, SignalName

SignalQueries = dict[SignalName, "str | None"]

_DURATION = re.compile(r"^([0-9]+(ms|s|m|h))+$")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_PLACEHOLDER = re.compile(r"\{\{\s*([a-zA-Z]+)\s*\}\}")


class UnknownPresetError(ValueError):
    """A preset name with no PromQL behind it. Never fall back to another preset silently."""


# The relabeling trimtab expects in the scrape job for model-server pods
# (`kubernetes_sd_configs: [{role: pod}]`); the README shows it as YAML and the tests scrape
# through it. It keeps trimtab's pods and turns their namespace, name and trimtab.io/* labels
# into the `namespace`, `pod`, `trimtab_io_owner` and `trimtab_io_revision` labels.
SCRAPE_RELABEL_CONFIGS: list[dict[str, object]] = [
    {
        "action": "keep",
        "source_labels": ["__meta_kubernetes_pod_labelpresent_trimtab_io_owner"],
        "regex": "true",
    },
    {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(trimtab_io_.+)"},
    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
]


@dataclass(frozen=True)
class LabelNames:
    """The Prometheus label names that carry a pod's namespace, owner and revision.

    The defaults are what the usual scrape configs produce from the pod labels trimtab sets
    (`trimtab.io/owner`, `trimtab.io/revision`): kubernetes_sd with a `labelmap` of
    `__meta_kubernetes_pod_label_(trimtab_io_.+)`, or a PodMonitor with `podTargetLabels`."""

    namespace: str = "namespace"
    owner: str = "trimtab_io_owner"
    revision: str = "trimtab_io_revision"

    def __post_init__(self) -> None:
        for name in (self.namespace, self.owner, self.revision):
            if not _LABEL_NAME.match(name):
                raise ValueError(f"invalid Prometheus label name {name!r}")


@dataclass(frozen=True)
class QueryTarget:
    """Whose numbers to read: one ModelDeployment, optionally one of its revisions."""

    namespace: str
    owner: str
    revision: str | None = None
    # The rate() window. It must hold at least two scrapes; 4x the scrape interval is safe.
    window: str = "1m"
    labels: LabelNames = field(default_factory=LabelNames)

    def __post_init__(self) -> None:
        if not _DURATION.match(self.window):
            raise ValueError(f"invalid rate window {self.window!r}; use e.g. '30s' or '1m'")

    def matchers(self) -> str:
        """The label matchers, without braces: `namespace="ns",trimtab_io_owner="llm"`."""
        parts = [
            f'{self.labels.namespace}="{_quote(self.namespace)}"',
            f'{self.labels.owner}="{_quote(self.owner)}"',
        ]
        if self.revision is not None:
            parts.append(f'{self.labels.revision}="{_quote(self.revision)}"')
        return ",".join(parts)


@dataclass(frozen=True)
class PresetOptions:
    """Knobs some presets need. Unused ones are ignored by the others."""

    # generic: the gauge of requests waiting, named by the user (None: no queue signal).
    queue_metric: str | None = None
    # generic: a gauge of requests in flight (None: no running signal).
    running_metric: str | None = None
    # generic: the label of http_requests_total holding the status ("status" or "code").
    status_label: str = "status"
    # vllm: which latency the p99 is of: end-to-end ("e2e") or time to first token ("ttft").
    latency: str = "e2e"
    # triton, vllm: the one model whose series count, for a server that serves several (a
    # Triton ensemble's entry model: its composing models would count each request again).
    model: str | None = None

    def model_matcher(self, preset: str) -> str:
        """The matcher on the model label of the preset's per-model series ("" for all)."""
        label = {"triton": "model", "vllm": "model_name"}.get(preset)
        if self.model is None or label is None:
            return ""
        return f'{label}="{_quote(self.model)}"'

    def __post_init__(self) -> None:
        for metric in (self.queue_metric, self.running_metric):
            if metric is not None and not _METRIC_NAME.match(metric):
                raise ValueError(f"invalid Prometheus metric name {metric!r}")
        if not _LABEL_NAME.match(self.status_label):
            raise ValueError(f"invalid Prometheus label name {self.status_label!r}")
        if self.latency not in ("e2e", "ttft"):
            raise ValueError(f"latency must be 'e2e' or 'ttft', not {self.latency!r}")


def _quote(value: str) -> str:
    """A PromQL double-quoted string body."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _series(name: str, t: QueryTarget, extra: str = "") -> str:
    """A vector selector for one metric of the target, `name{matchers}`."""
    matchers = t.matchers() + (f",{extra}" if extra else "")
    return f"{name}{{{matchers}}}"


def _series_matching(name_regex: str, t: QueryTarget, extra: str = "") -> str:
    """A vector selector for every metric whose name matches `name_regex`."""
    matchers = f'__name__=~"{name_regex}",' + t.matchers() + (f",{extra}" if extra else "")
    return f"{{{matchers}}}"


def _vllm_series(name: str, t: QueryTarget, extra: str = "") -> str:
    """vLLM's metric `vllm:<name>`, also matched as `vllm_<name>`.

    prometheus_client (which vLLM uses) rewrites the colon to an underscore when Prometheus
    negotiates OpenMetrics (client_python issue #1177), so which spelling is stored depends
    on both versions. Only one spelling exists per pod, so summing both never double counts."""
    return _series_matching(f"vllm[:_]{name}", t, extra)


def _join(*matchers: str) -> str:
    return ",".join(m for m in matchers if m)


def _rate(selector: str, t: QueryTarget) -> str:
    return f"sum(rate({selector}[{t.window}]))"


def _p99(bucket_selector: str, t: QueryTarget) -> str:
    return f"histogram_quantile(0.99, sum by (le) (rate({bucket_selector}[{t.window}])))"


def _mean(sum_selector: str, count_selector: str, t: QueryTarget) -> str:
    return f"{_rate(sum_selector, t)} / {_rate(count_selector, t)}"


def _plus_optional(required: str, optional: str, t: QueryTarget) -> str:
    """The rate of `required` plus the rate of `optional`, which may have no series yet.

    Two counters are never merged with one `__name__=~` selector: after rate() drops the
    name, two series with the same labels make Prometheus fail the whole query."""
    return f"({_rate(required, t)} + ({_rate(optional, t)} or vector(0)))"


def _error_ratio(errors: str, total: str, t: QueryTarget) -> str:
    # A server that never failed has no error series at all; `or vector(0)` turns that into
    # 0 errors, while a missing total still yields no data.
    return f"({_rate(errors, t)} or vector(0)) / {_rate(total, t)}"


# The handler label of vLLM's inference routes (OpenAI completions, chat, embeddings, ...):
# /health, /metrics, /ping and /v1/models answer probes and scrapes, which would dilute errors.
VLLM_INFERENCE_ROUTES = 'handler=~"/v1/.+",handler!="/v1/models"'
# TGI's failures that are the server's: `validation` is a bad request (422) and `dropped` a
# client that left, neither of which a canary or the SLO should be charged with.
TGI_SERVER_FAILURES = 'err!~"validation|dropped"'


def vllm_queries(t: QueryTarget, o: PresetOptions) -> SignalQueries:
    """vLLM's OpenAI server: scheduler gauges, request histograms, HTTP status counters."""
    latency = "e2e_request_latency_seconds" if o.latency == "e2e" else "time_to_first_token_seconds"
    m = o.model_matcher("vllm")
    e2e_sum = _vllm_series("e2e_request_latency_seconds_sum", t, m)
    e2e_count = _vllm_series("e2e_request_latency_seconds_count", t, m)
    run_sum = _vllm_series("request_inference_time_seconds_sum", t, m)
    run_count = _vllm_series("request_inference_time_seconds_count", t, m)
    return {
        "queueDepth": f"sum({_vllm_series('num_requests_waiting', t, m)})",
        "running": f"sum({_vllm_series('num_requests_running', t, m)})",
        # Finished requests per second: equal to arrivals in steady state; under overload the
        # queue depth, read alongside, carries the rest.
        "arrivalRate": _rate(e2e_count, t),
        # Time in the RUNNING phase (prefill + decode), without queueing; older vLLMs without
        # that histogram fall back to the end-to-end mean.
        "serviceTime": f"({_mean(run_sum, run_count, t)}) or ({_mean(e2e_sum, e2e_count, t)})",
        "p99Latency": _p99(_vllm_series(f"{latency}_bucket", t, m), t),
        # vLLM's API server counts responses by status class (prometheus-fastapi-instrumentator),
        # on every route: only the inference routes count, not probes, scrapes or /v1/models.
        "errorRate": _error_ratio(
            _series("http_requests_total", t, f'{VLLM_INFERENCE_ROUTES},status="5xx"'),
            _series("http_requests_total", t, VLLM_INFERENCE_ROUTES),
            t,
        ),
    }


def triton_queries(t: QueryTarget, o: PresetOptions) -> SignalQueries:
    """NVIDIA Triton: the pending-request gauge and cumulative microsecond counters."""
    m = o.model_matcher("triton")
    success = _series("nv_inference_request_success", t, m)
    failure = _series("nv_inference_request_failure", t, m)
    busy_us = (
        f"({_rate(_series('nv_inference_request_duration_us', t, m), t)}"
        f" - {_rate(_series('nv_inference_queue_duration_us', t, m), t)})"
    )
    p99 = _series("nv_inference_request_summary_us", t, _join(m, 'quantile="0.99"'))
    return {
        "queueDepth": f"sum({_series('nv_inference_pending_request_count', t, m)})",
        # Little's law on the counters: microseconds of compute per second / 1e6 = requests
        # in service on average over the window.
        "running": f"{busy_us} / 1e6",
        "arrivalRate": _plus_optional(success, failure, t),
        "serviceTime": f"{busy_us} / {_rate(success, t)} / 1e6",
        # Triton has no latency histogram; its summaries need
        # `--metrics-config summary_latencies=true`. Quantiles cannot be merged across pods,
        # so take the worst pod.
        "p99Latency": f"max({p99}) / 1e6",
        "errorRate": f"({_rate(failure, t)} or vector(0)) / {_plus_optional(success, failure, t)}",
    }


def tgi_queries(t: QueryTarget, o: PresetOptions) -> SignalQueries:
    """Hugging Face TGI: queue and batch gauges, request histograms (seconds), counters.

    Requests are its successes plus failures, each counted once per generation:
    `tgi_request_count` counts an OpenAI-style request two or three times (the route and the
    generation each add one; text-generation-inference issue #1901)."""
    success = _series("tgi_request_success", t)
    failure = _series("tgi_request_failure", t)
    return {
        "queueDepth": f"sum({_series('tgi_queue_size', t)})",
        "running": f"sum({_series('tgi_batch_current_size', t)})",
        # Finished requests per second: arrivals in steady state, the queue carries the rest.
        "arrivalRate": _plus_optional(success, failure, t),
        "serviceTime": _mean(
            _series("tgi_request_inference_duration_sum", t),
            _series("tgi_request_inference_duration_count", t),
            t,
        ),
        "p99Latency": _p99(_series("tgi_request_duration_bucket", t), t),
        "errorRate": f"({_rate(_series('tgi_request_failure', t, TGI_SERVER_FAILURES), t)}"
        f" or vector(0)) / {_plus_optional(success, failure, t)}",
    }


def torchserve_queries(t: QueryTarget, o: PresetOptions) -> SignalQueries:
    """TorchServe (metrics_mode prometheus): cumulative microsecond counters, status counters.

    It exports no queue gauge and no latency histogram: queue depth and running come from
    Little's law on the cumulative counters, and p99 needs an override."""
    queue_us = _rate(_series("ts_queue_latency_microseconds", t), t)
    # ts_inference_latency_microseconds runs from arrival to response, queueing included.
    busy_us = f"({_rate(_series('ts_inference_latency_microseconds', t), t)} - {queue_us})"
    requests = _series("ts_inference_requests_total", t)
    errors = _series("Requests5XX", t)
    return {
        "queueDepth": f"{queue_us} / 1e6",
        "running": f"{busy_us} / 1e6",
        "arrivalRate": _rate(requests, t),
        "serviceTime": f"{busy_us} / {_rate(requests, t)} / 1e6",
        "p99Latency": None,
        # Server errors over inference requests: the Requests2XX/4XX/5XX classes count every
        # HTTP response, the kubelet's /ping probes and Prometheus' scrapes included, which
        # would dilute the ratio.
        "errorRate": _error_ratio(errors, requests, t),
    }


def generic_queries(t: QueryTarget, o: PresetOptions) -> SignalQueries:
    """Any HTTP server with an `http_request_duration_seconds` histogram, an
    `http_requests_total` counter by status, and optionally a queue gauge the user names."""
    hist = "http_request_duration_seconds"
    status = o.status_label
    return {
        "queueDepth": f"sum({_series(o.queue_metric, t)})" if o.queue_metric else None,
        "running": f"sum({_series(o.running_metric, t)})" if o.running_metric else None,
        "arrivalRate": _rate(_series(f"{hist}_count", t), t),
        # Includes any queueing inside the server: the best a plain HTTP histogram can tell.
        "serviceTime": _mean(_series(f"{hist}_sum", t), _series(f"{hist}_count", t), t),
        "p99Latency": _p99(_series(f"{hist}_bucket", t), t),
        "errorRate": _error_ratio(
            _series("http_requests_total", t, f'{status}=~"5.."'),
            _series("http_requests_total", t),
            t,
        ),
    }


PresetBuilder = Callable[[QueryTarget, PresetOptions], SignalQueries]

# The registry of presets, by the name `spec.server` uses.
PRESETS: dict[str, PresetBuilder] = {
    "vllm": vllm_queries,
    "triton": triton_queries,
    "tgi": tgi_queries,
    "torchserve": torchserve_queries,
    "generic": generic_queries,
}


def render_override(template: str, t: QueryTarget) -> str:
    """A user's PromQL with `{{ namespace }}`, `{{ name }}`, `{{ revision }}`,
    `{{ selector }}` (the label matchers, without braces) and `{{ window }}` filled in.

    An unknown placeholder is left as written: Prometheus then rejects the query and the
    signal reports its parse error, the same path as any other invalid override.

    >>> render_override('sum(q{ {{selector}} })', QueryTarget("ns", "llm", window="30s"))
    'sum(q{ namespace="ns",trimtab_io_owner="llm" })'
    """
    values = {
        "namespace": _quote(t.namespace),
        "name": _quote(t.owner),
        "revision": _quote(t.revision or ""),
        "selector": t.matchers(),
        "window": t.window,
    }

    def fill(match: re.Match[str]) -> str:
        return values.get(match.group(1), match.group(0))

    return _PLACEHOLDER.sub(fill, template)


def overrides_from_spec(queries: MetricQueries | None) -> dict[str, str]:
    """`spec.metrics.queries` as {signal name: PromQL}, unset signals left out."""
    if queries is None:
        return {}
    wire: dict[str, str] = queries.model_dump(by_alias=True, exclude_none=True)
    return wire


def build_queries(
    preset: str,
    target: QueryTarget,
    overrides: Mapping[str, str | None] | None = None,
    options: PresetOptions | None = None,
) -> SignalQueries:
    """The PromQL of every signal for one target: the preset's, replaced per signal by the
    user's override where one is given. None means the signal cannot be queried.

    >>> q = build_queries("tgi", QueryTarget("prod", "chat", revision="7f3a", window="30s"))
    >>> q["queueDepth"]
    'sum(tgi_queue_size{namespace="prod",trimtab_io_owner="chat",trimtab_io_revision="7f3a"})'
    """
    builder = PRESETS.get(preset)
    if builder is None:
        raise UnknownPresetError(f"unknown metrics preset {preset!r}; known: {sorted(PRESETS)}")
    queries = builder(target, options or PresetOptions())
    for name, template in (overrides or {}).items():
        if name not in SIGNAL_NAMES:
            raise ValueError(f"unknown signal {name!r} in overrides; known: {SIGNAL_NAMES}")
        if template:
            queries[name] = render_override(template, target)
    return queries


# --- counts for canary analysis ----------------------------------------------------------------

# What the rollout loop counts per revision over the analysis window (`QueryTarget.window`):
# requests served, failed requests, requests the latency histogram saw, and those of them
# within the latency bound. Counts, not rates: the sequential tests weigh evidence by sample
# size.
CountName = Literal["requests", "errors", "latencyRequests", "latencyFast"]
COUNT_NAMES: tuple[CountName, ...] = ("requests", "errors", "latencyRequests", "latencyFast")
CountQueries = dict[CountName, "str | None"]


def le_matcher(bound_s: float) -> str:
    r"""A `le` matcher for the histogram bucket whose upper bound is `bound_s`, in every way
    exporters spell that number (Go writes "2" and "1e+06", Python's client "2.0").

    >>> le_matcher(0.5)
    'le=~"0\\\\.5"'
    >>> le_matcher(2.0)
    'le=~"2|2\\\\.0"'
    """
    spellings = [format(bound_s, "g"), repr(float(bound_s))]
    if float(bound_s).is_integer():
        spellings.append(str(int(bound_s)))
    unique = sorted(set(spellings), key=spellings.index)
    body = "|".join(re.escape(s).replace("\\", "\\\\") for s in unique)
    return f'le=~"{body}"'


def _increase(selector: str, t: QueryTarget) -> str:
    return f"sum(increase({selector}[{t.window}]))"


def _zero_if_absent(expr: str) -> str:
    # A server that never failed has no error series: that is 0 errors, not missing data.
    return f"({expr} or vector(0))"


def _latency_selectors(
    preset: str, t: QueryTarget, options: PresetOptions, le: str = ""
) -> tuple[str, str] | None:
    """(count selector, bucket selector with the `le` matcher) of the preset's latency
    histogram; None for presets without one (Triton, TorchServe)."""
    if preset == "vllm":
        vllm = (
            "e2e_request_latency_seconds"
            if options.latency == "e2e"
            else "time_to_first_token_seconds"
        )
        m = options.model_matcher("vllm")
        return (
            _vllm_series(f"{vllm}_count", t, m),
            _series_matching(f"vllm[:_]{vllm}_bucket", t, _join(m, le)),
        )
    hist = {"tgi": "tgi_request_duration", "generic": "http_request_duration_seconds"}.get(preset)
    if hist is None:
        return None
    return _series(f"{hist}_count", t), _series(f"{hist}_bucket", t, le)


def bucket_bounds_query(preset: str, target: QueryTarget, options: PresetOptions) -> str | None:
    """PromQL whose series' `le` labels are the bucket bounds of the preset's latency histogram
    for `target`; None for presets without one.

    >>> bucket_bounds_query("tgi", QueryTarget("p", "c"), PresetOptions())
    'count by (le) (tgi_request_duration_bucket{namespace="p",trimtab_io_owner="c"})'
    """
    selectors = _latency_selectors(preset, target, options)
    return None if selectors is None else f"count by (le) ({selectors[1]})"


# How far a bucket bound may be from the SLO's for latency to be judged at it: TGI's bounds
# grow by 1.5x from 0.1 ms (..., 0.3325, 0.4988, 0.7482 s), so no whole millisecond is one.
BUCKET_TOLERANCE = 0.05


def choose_bucket(
    bounds: Sequence[str], bound_s: float, tolerance: float = BUCKET_TOLERANCE
) -> tuple[str | None, str]:
    """The `le` to count latency at: the bucket bound nearest to the SLO's `bound_s` within
    `tolerance` of it (the lower on a tie), spelled as the exporter spells it; else None and
    why, naming the nearest bounds on either side.

    >>> choose_bucket(["0.3325", "0.49875", "0.748125", "+Inf"], 0.5)
    ('0.49875', '')
    >>> choose_bucket(["0.25", "0.5", "1"], 0.5)
    ('0.5', '')
    >>> choose_bucket(["0.3325", "0.49875"], 0.4)[1]
    'no histogram bucket within 5% of 0.4s (nearest: le=0.3325s, le=0.49875s)'
    >>> choose_bucket(["0.1", "+Inf"], 0.4)[1]
    'no histogram bucket within 5% of 0.4s (nearest: le=0.1s)'
    """
    values: list[tuple[float, str]] = []
    for spelled in bounds:
        try:
            value = float(spelled)
        except ValueError:
            continue
        if math.isfinite(value):
            values.append((value, spelled))
    if not values:
        return None, ""
    near = [
        (abs(value - bound_s), value, spelled)
        for value, spelled in values
        if abs(value - bound_s) <= tolerance * bound_s
    ]
    if near:
        return min(near)[2], ""
    below = max((v for v in values if v[0] < bound_s), default=None)
    above = min((v for v in values if v[0] > bound_s), default=None)
    nearest = ", ".join(f"le={v[1]}s" for v in (below, above) if v is not None)
    return None, (
        f"no histogram bucket within {tolerance:.0%} of {bound_s:g}s (nearest: {nearest})"
    )


def count_queries(
    preset: str,
    target: QueryTarget,
    latency_bound_s: float | None,
    options: PresetOptions,
    latency_le: str | None = None,
) -> CountQueries:
    """PromQL for the counts of one revision over `target.window`; None: cannot be counted.

    Latency is counted from a histogram bucket: at `latency_le` (a bound as the exporter spells
    it, from `choose_bucket`), else at exactly the bound (a bound between two buckets has no
    exact count: the query then finds no series and latency is not judged). Triton and
    TorchServe export no latency histogram.

    >>> q = count_queries("torchserve", QueryTarget("p", "c", revision="r1", window="30s"),
    ...                   0.5, PresetOptions())
    >>> q["requests"]
    'sum(increase(ts_inference_requests_total{namespace="p",trimtab_io_owner="c",trimtab_io_revision="r1"}[30s]))'
    """
    t = target
    latency: CountQueries = {"latencyRequests": None, "latencyFast": None}
    if latency_bound_s is not None:
        le = (
            f'le="{_quote(latency_le)}"' if latency_le is not None else le_matcher(latency_bound_s)
        )
        selectors = _latency_selectors(preset, t, options, le)
        if selectors is not None:
            latency = {
                "latencyRequests": _increase(selectors[0], t),
                "latencyFast": _increase(selectors[1], t),
            }
    if preset == "vllm":
        return {
            "requests": _increase(_series("http_requests_total", t, VLLM_INFERENCE_ROUTES), t),
            "errors": _zero_if_absent(
                _increase(
                    _series("http_requests_total", t, f'{VLLM_INFERENCE_ROUTES},status="5xx"'), t
                )
            ),
            **latency,
        }
    if preset == "tgi":
        failure = _zero_if_absent(_increase(_series("tgi_request_failure", t), t))
        return {
            "requests": f"({_increase(_series('tgi_request_success', t), t)} + {failure})",
            "errors": _zero_if_absent(
                _increase(_series("tgi_request_failure", t, TGI_SERVER_FAILURES), t)
            ),
            **latency,
        }
    if preset == "generic":
        return {
            "requests": _increase(_series("http_requests_total", t), t),
            "errors": _zero_if_absent(
                _increase(_series("http_requests_total", t, f'{options.status_label}=~"5.."'), t)
            ),
            **latency,
        }
    if preset == "triton":
        m = options.model_matcher("triton")
        failure = _zero_if_absent(_increase(_series("nv_inference_request_failure", t, m), t))
        return {
            "requests": f"({_increase(_series('nv_inference_request_success', t, m), t)}"
            f" + {failure})",
            "errors": failure,
            "latencyRequests": None,
            "latencyFast": None,
        }
    if preset == "torchserve":
        return {
            "requests": _increase(_series("ts_inference_requests_total", t), t),
            "errors": _zero_if_absent(_increase(_series("Requests5XX", t), t)),
            "latencyRequests": None,
            "latencyFast": None,
        }
    raise UnknownPresetError(f"unknown metrics preset {preset!r}; known: {sorted(PRESETS)}")
