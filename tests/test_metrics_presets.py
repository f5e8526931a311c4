"""The PromQL each preset writes, the selectors and overrides, the provider factory, and the
three-state results, without a Prometheus (test_prometheus_provider.py runs them for real)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping

import pytest

from trimtab.api.autoscaling import SIGNALS, MetricQueries
from trimtab.metrics.base import (
    SIGNAL_NAMES,
    LabelValues,
    MetricsProvider,
    QueryResult,
    ResultState,
    SignalName,
    Signals,
    read_signals,
)
from trimtab.metrics.factory import (
    PROVIDERS,
    ProviderConfig,
    UnknownProviderError,
    create_provider,
)
from trimtab.metrics.presets import (
    PRESETS,
    LabelNames,
    PresetOptions,
    QueryTarget,
    UnknownPresetError,
    build_queries,
    overrides_from_spec,
    render_override,
)
from trimtab.metrics.prometheus import PrometheusProvider, _api_error_text, parse_result

S = 'namespace="ns",trimtab_io_owner="m"'
TARGET = QueryTarget("ns", "m")


def q(template: str) -> str:
    return template.replace("$S", S)


def rate(selector: str) -> str:
    return f"sum(rate({selector}[1m]))"


V = '{__name__=~"vllm[:_]%s",$S}'
TRITON_OK = rate("nv_inference_request_success{$S}")
TRITON_FAIL = rate("nv_inference_request_failure{$S}")
TRITON_ALL = f"({TRITON_OK} + ({TRITON_FAIL} or vector(0)))"
TRITON_BUSY = (
    f"({rate('nv_inference_request_duration_us{$S}')}"
    f" - {rate('nv_inference_queue_duration_us{$S}')})"
)
TS_QUEUE = rate("ts_queue_latency_microseconds{$S}")
TS_BUSY = f"({rate('ts_inference_latency_microseconds{$S}')} - {TS_QUEUE})"
TS_REQUESTS = rate("ts_inference_requests_total{$S}")
VLLM_ROUTES = 'handler=~"/v1/.+",handler!="/v1/models"'
VLLM_5XX = rate('http_requests_total{$S,' + VLLM_ROUTES + ',status="5xx"}')
TGI_OK = rate("tgi_request_success{$S}")
TGI_ALL = f"({TGI_OK} + ({rate('tgi_request_failure{$S}')} or vector(0)))"
TGI_SERVER_FAILED = rate('tgi_request_failure{$S,err!~"validation|dropped"}')
GENERIC_5XX = rate('http_requests_total{$S,status=~"5.."}')
HTTP_BUCKETS = "http_request_duration_seconds_bucket{$S}"

PRESET_QUERIES = [
    # vLLM
    ("vllm", "queueDepth", "sum(" + V % "num_requests_waiting" + ")"),
    ("vllm", "running", "sum(" + V % "num_requests_running" + ")"),
    ("vllm", "arrivalRate", rate(V % "e2e_request_latency_seconds_count")),
    (
        "vllm",
        "serviceTime",
        f"({rate(V % 'request_inference_time_seconds_sum')} / "
        f"{rate(V % 'request_inference_time_seconds_count')}) or "
        f"({rate(V % 'e2e_request_latency_seconds_sum')} / "
        f"{rate(V % 'e2e_request_latency_seconds_count')})",
    ),
    (
        "vllm",
        "p99Latency",
        "histogram_quantile(0.99, sum by (le) (rate("
        + V % "e2e_request_latency_seconds_bucket"
        + "[1m])))",
    ),
    (
        "vllm",
        "errorRate",
        f"({VLLM_5XX} or vector(0)) / " + rate("http_requests_total{$S," + VLLM_ROUTES + "}"),
    ),
    # Triton
    ("triton", "queueDepth", "sum(nv_inference_pending_request_count{$S})"),
    ("triton", "running", f"{TRITON_BUSY} / 1e6"),
    ("triton", "arrivalRate", TRITON_ALL),
    ("triton", "serviceTime", f"{TRITON_BUSY} / {TRITON_OK} / 1e6"),
    ("triton", "p99Latency", 'max(nv_inference_request_summary_us{$S,quantile="0.99"}) / 1e6'),
    ("triton", "errorRate", f"({TRITON_FAIL} or vector(0)) / {TRITON_ALL}"),
    # TGI
    ("tgi", "queueDepth", "sum(tgi_queue_size{$S})"),
    ("tgi", "running", "sum(tgi_batch_current_size{$S})"),
    # tgi_request_count counts an OpenAI-style request twice (TGI issue #1901).
    ("tgi", "arrivalRate", TGI_ALL),
    (
        "tgi",
        "serviceTime",
        f"{rate('tgi_request_inference_duration_sum{$S}')} / "
        f"{rate('tgi_request_inference_duration_count{$S}')}",
    ),
    (
        "tgi",
        "p99Latency",
        "histogram_quantile(0.99, sum by (le) (rate(tgi_request_duration_bucket{$S}[1m])))",
    ),
    (
        "tgi",
        "errorRate",
        f"({TGI_SERVER_FAILED} or vector(0)) / {TGI_ALL}",
    ),
    # TorchServe
    ("torchserve", "queueDepth", f"{TS_QUEUE} / 1e6"),
    ("torchserve", "running", f"{TS_BUSY} / 1e6"),
    ("torchserve", "arrivalRate", TS_REQUESTS),
    ("torchserve", "serviceTime", f"{TS_BUSY} / {TS_REQUESTS} / 1e6"),
    ("torchserve", "p99Latency", None),
    (
        "torchserve",
        "errorRate",
        # Over inference requests: the status classes also count probes and scrapes.
        f"({rate('Requests5XX{$S}')} or vector(0)) / {TS_REQUESTS}",
    ),
    # generic, with a queue gauge named by the user and no running gauge
    ("generic", "queueDepth", "sum(inference_queue_length{$S})"),
    ("generic", "running", None),
    ("generic", "arrivalRate", rate("http_request_duration_seconds_count{$S}")),
    (
        "generic",
        "serviceTime",
        f"{rate('http_request_duration_seconds_sum{$S}')} / "
        f"{rate('http_request_duration_seconds_count{$S}')}",
    ),
    (
        "generic",
        "p99Latency",
        f"histogram_quantile(0.99, sum by (le) (rate({HTTP_BUCKETS}[1m])))",
    ),
    (
        "generic",
        "errorRate",
        f"({GENERIC_5XX} or vector(0)) / " + rate("http_requests_total{$S}"),
    ),
]


@pytest.mark.parametrize(
    ("preset", "signal", "expected"),
    [pytest.param(p, s, e, id=f"{p}-{s}") for p, s, e in PRESET_QUERIES],
)
def test_preset_promql(preset: str, signal: SignalName, expected: str | None) -> None:
    options = PresetOptions(queue_metric="inference_queue_length")
    queries = build_queries(preset, TARGET, options=options)
    assert queries[signal] == (q(expected) if expected is not None else None)


def test_every_preset_answers_every_signal_and_the_table_covers_them() -> None:
    assert set(SIGNAL_NAMES) == set(SIGNALS), "metrics and the API must name the same signals"
    covered = {(p, s) for p, s, _ in PRESET_QUERIES}
    for preset in PRESETS:
        queries = build_queries(preset, TARGET)
        assert set(queries) == set(SIGNAL_NAMES), preset
        assert {(preset, s) for s in SIGNAL_NAMES} <= covered, preset


@pytest.mark.parametrize(
    ("target", "matchers"),
    [
        pytest.param(QueryTarget("ns", "m"), S, id="owner-only"),
        pytest.param(
            QueryTarget("ns", "m", revision="7f3a9c"),
            S + ',trimtab_io_revision="7f3a9c"',
            id="one-revision",
        ),
        pytest.param(
            QueryTarget("ns", "m", "r", labels=LabelNames("kubernetes_namespace", "app", "rev")),
            'kubernetes_namespace="ns",app="m",rev="r"',
            id="custom-label-names",
        ),
        pytest.param(
            QueryTarget('we"ird\\ns', "m"),
            'namespace="we\\"ird\\\\ns",trimtab_io_owner="m"',
            id="quoted-values",
        ),
    ],
)
def test_selectors(target: QueryTarget, matchers: str) -> None:
    assert target.matchers() == matchers
    assert build_queries("tgi", target)["queueDepth"] == f"sum(tgi_queue_size{{{matchers}}})"


def test_window_reaches_every_rate() -> None:
    queries = build_queries("vllm", QueryTarget("ns", "m", window="30s"))
    for name in ("arrivalRate", "serviceTime", "p99Latency", "errorRate"):
        text = queries[name]
        assert text is not None and "[30s]" in text and "[1m]" not in text, name


def test_vllm_ttft_option_reads_time_to_first_token() -> None:
    queries = build_queries("vllm", TARGET, options=PresetOptions(latency="ttft"))
    assert queries["p99Latency"] is not None
    assert "time_to_first_token_seconds_bucket" in queries["p99Latency"]


@pytest.mark.parametrize(
    ("template", "rendered"),
    [
        pytest.param(
            "sum(x{ {{selector}} })", f'sum(x{{ {S},trimtab_io_revision="r1" }})', id="selector"
        ),  # fmt: skip
        pytest.param(
            'sum(rate(x{namespace="{{namespace}}",app="{{ name }}"}[{{window}}]))',
            'sum(rate(x{namespace="ns",app="m"}[1m]))',
            id="namespace-name-window",
        ),
        pytest.param('x{rev="{{revision}}"}', 'x{rev="r1"}', id="revision"),
        pytest.param("x{ {{nope}} }", "x{ {{nope}} }", id="unknown-left-for-prometheus"),
        pytest.param("vector(1)", "vector(1)", id="no-placeholders"),
    ],
)
def test_render_override(template: str, rendered: str) -> None:
    assert render_override(template, QueryTarget("ns", "m", revision="r1")) == rendered


def test_override_replaces_only_its_signal() -> None:
    plain = build_queries("tgi", TARGET)
    queries = build_queries("tgi", TARGET, overrides={"p99Latency": "max(x{ {{selector}} })"})
    assert queries["p99Latency"] == f"max(x{{ {S} }})"
    assert {k: v for k, v in queries.items() if k != "p99Latency"} == {
        k: v for k, v in plain.items() if k != "p99Latency"
    }


def test_overrides_from_the_spec() -> None:
    spec = MetricQueries(p99_latency="max(lat{ {{selector}} })", queue_depth=None)
    assert overrides_from_spec(spec) == {"p99Latency": "max(lat{ {{selector}} })"}
    assert overrides_from_spec(None) == {}
    queries = build_queries("torchserve", TARGET, overrides=overrides_from_spec(spec))
    assert queries["p99Latency"] == f"max(lat{{ {S} }})"


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(
            lambda: build_queries("onnx", TARGET), UnknownPresetError, "onnx", id="unknown-preset"
        ),  # fmt: skip
        pytest.param(
            lambda: build_queries("vllm", TARGET, overrides={"latency": "x"}),
            ValueError,
            "latency",
            id="unknown-signal",
        ),  # fmt: skip
        pytest.param(
            lambda: QueryTarget("ns", "m", window="1 minute"), ValueError, "window", id="bad-window"
        ),  # fmt: skip
        pytest.param(
            lambda: LabelNames(revision="trimtab.io/revision"),
            ValueError,
            "label",
            id="bad-label-name",
        ),  # fmt: skip
        pytest.param(
            lambda: PresetOptions(queue_metric="queue depth"),
            ValueError,
            "metric",
            id="bad-queue-metric",
        ),  # fmt: skip
        pytest.param(
            lambda: PresetOptions(latency="p50"), ValueError, "latency", id="bad-latency"
        ),  # fmt: skip
        pytest.param(
            lambda: create_provider("datadog", ProviderConfig("http://x")),
            UnknownProviderError,
            "datadog",
            id="unknown-provider",
        ),  # fmt: skip
    ],
)
def test_invalid_inputs_are_errors(call: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]


def test_provider_registry() -> None:
    assert set(PROVIDERS) == {"prometheus"}
    provider = create_provider("prometheus", ProviderConfig("http://prom:9090/", timeout_s=2))
    assert isinstance(provider, PrometheusProvider)
    assert isinstance(provider, MetricsProvider)
    assert provider.url == "http://prom:9090"
    assert provider.timeout_s == 2


@pytest.mark.parametrize(
    ("data", "state", "value", "message"),
    [
        pytest.param(
            [{"metric": {}, "value": [1.0, "4.5"]}], ResultState.VALUE, 4.5, "", id="one-series"
        ),  # fmt: skip
        pytest.param([1.0, "2"], ResultState.VALUE, 2.0, "", id="scalar"),
        pytest.param(
            [{"metric": {}, "value": [1.0, "+Inf"]}],
            ResultState.VALUE,
            math.inf,
            "",
            id="above-the-last-bucket",
        ),  # fmt: skip
        pytest.param([], ResultState.NO_DATA, None, "no series", id="no-series"),
        pytest.param(
            [{"metric": {}, "value": [1.0, "NaN"]}],
            ResultState.NO_DATA,
            None,
            "NaN",
            id="nan-is-0-over-0",
        ),  # fmt: skip
        pytest.param(
            [
                {"metric": {"pod": "a"}, "value": [1.0, "1"]},
                {"metric": {"pod": "b"}, "value": [1.0, "2"]},
            ],
            ResultState.UNAVAILABLE,
            None,
            "2 series",
            id="many-series",
        ),  # fmt: skip
        pytest.param(
            [{"metric": {}, "values": [[1.0, "1"]]}],
            ResultState.UNAVAILABLE,
            None,
            "range vector",
            id="range-vector",
        ),  # fmt: skip
        pytest.param({"odd": 1}, ResultState.UNAVAILABLE, None, "unexpected", id="not-a-list"),
    ],
)
def test_parse_result(data: object, state: ResultState, value: float | None, message: str) -> None:
    result = parse_result(data)
    assert result.state is state
    assert result.value == value
    assert message in result.message


def test_prometheus_error_text_is_unwrapped() -> None:
    raw = (
        'HTTP Status Code 400 (b\'{"status":"error","errorType":"bad_data",'
        '"error":"invalid parameter \\\\"query\\\\": 1:15: parse error: unclosed left '
        "parenthesis\"}')"
    )
    assert _api_error_text(raw) == (
        'HTTP Status Code 400: bad_data: invalid parameter "query": 1:15: parse error: '
        "unclosed left parenthesis"
    )
    assert _api_error_text("HTTP Status Code 502 (b'<html>bad gateway</html>')") == (
        "HTTP Status Code 502 (b'<html>bad gateway</html>')"
    )


class FakeProvider:
    """Answers from a table, to test what callers do with each state."""

    def __init__(self, answers: Mapping[str, QueryResult]) -> None:
        self.answers = answers
        self.batches: list[dict[str, str]] = []

    async def query_batch(self, queries: Mapping[str, str]) -> dict[str, QueryResult]:
        self.batches.append(dict(queries))
        return {k: self.answers[v] for k, v in queries.items()}

    async def query_together(self, queries: Mapping[str, str]) -> dict[str, QueryResult]:
        return await self.query_batch(queries)

    async def label_values(self, query: str, label: str) -> LabelValues:
        answer = self.answers[query]
        return LabelValues(error=answer.message if answer.is_unavailable else "")

    async def is_online(self) -> bool:
        return True

    async def close(self) -> None:
        pass


def test_read_signals_runs_one_batch_and_explains_missing_queries() -> None:
    down = QueryResult.unavailable("cannot reach Prometheus at http://p: [Errno 111] refused")
    provider = FakeProvider({"a": QueryResult.of(3), "b": QueryResult.no_data("no series matched"),
                             "c": down, "d": QueryResult.of(0.25), "e": down})  # fmt: skip
    queries = {"queueDepth": "a", "running": "b", "arrivalRate": "c", "serviceTime": "d",
               "p99Latency": None, "errorRate": "e"}  # fmt: skip
    signals = asyncio.run(read_signals(provider, queries, "torchserve"))  # type: ignore[arg-type]
    assert len(provider.batches) == 1 and "p99Latency" not in provider.batches[0]
    assert signals.queue_depth.value == 3
    assert signals.running.state is ResultState.NO_DATA
    assert "torchserve preset has no query for p99Latency" in signals.p99_latency.message
    assert not signals.available
    assert signals.errors() == {"arrivalRate": down.message, "errorRate": down.message}
    assert signals.error_text() == f"arrivalRate, errorRate: {down.message}"

    decision_input = signals.to_decision()
    assert decision_input.queue_depth == 3
    assert decision_input.running is None
    assert decision_input.service_time == 0.25
    assert decision_input.source_unavailable
    assert "Errno 111" in decision_input.error


def test_signals_status_form() -> None:
    signals = Signals.from_results(
        {"queueDepth": QueryResult.of(2), "p99Latency": QueryResult.of(math.inf)}
    )
    status = signals.to_status()
    assert status["queueDepth"] == {"state": "Value", "value": 2}
    assert status["p99Latency"] == {"state": "Value", "value": "+Inf"}
    assert status["running"] == {"state": "NoData", "message": "not queried"}
    assert signals.available and not signals.to_decision().source_unavailable


def test_generic_preset_without_gauges_marks_them_unmeasured() -> None:
    """The generic preset without queueMetric/runningMetric has no query for those gauges:
    the decision is told they are never measured (so their absence blocks no scale-down), while
    a gauge whose query found no series is only missing this loop."""
    queries = build_queries("generic", QueryTarget("prod", "chat"))
    assert queries["queueDepth"] is None and queries["running"] is None
    provider = FakeProvider({q: QueryResult.of(1.0) for q in queries.values() if q})
    signals = asyncio.run(read_signals(provider, queries, "generic"))  # type: ignore[arg-type]
    decided = signals.to_decision()
    assert decided.unmeasured == {"queueDepth", "running"}
    assert decided.queue_depth is None and not decided.source_unavailable

    with_gauge = build_queries(
        "generic", QueryTarget("prod", "chat"), options=PresetOptions(queue_metric="q")
    )
    answers = {q: QueryResult.of(1.0) for q in with_gauge.values() if q}
    answers[str(with_gauge["queueDepth"])] = QueryResult.no_data("no series matched")
    signals = asyncio.run(read_signals(FakeProvider(answers), with_gauge, "generic"))  # type: ignore[arg-type]
    assert signals.to_decision().unmeasured == {"running"}


@pytest.mark.parametrize(
    ("preset", "signal", "has", "lacks"),
    [
        pytest.param("triton", "arrivalRate", 'nv_inference_request_success{$S,model="ens"}', "",
                     id="triton-counters"),
        pytest.param("triton", "queueDepth", 'nv_inference_pending_request_count{$S,model="ens"}',
                     "", id="triton-queue"),
        pytest.param("triton", "p99Latency", 'model="ens",quantile="0.99"', "",
                     id="triton-summary"),
        pytest.param("vllm", "queueDepth", '$S,model_name="ens"}', "", id="vllm-gauges"),
        pytest.param("vllm", "errorRate", "http_requests_total{$S,handler", 'model_name="ens"',
                     id="vllm-http-counters-have-no-model-label"),
        pytest.param("tgi", "arrivalRate", "tgi_request_success{$S}", "ens",
                     id="tgi-serves-one-model"),
    ],
)  # fmt: skip
def test_a_model_selects_the_per_model_series(
    preset: str, signal: SignalName, has: str, lacks: str
) -> None:
    """metrics.model: a server serving several models (a Triton ensemble and the models it
    runs, each counting every request) is read at the one named."""
    query = build_queries(preset, TARGET, options=PresetOptions(model="ens"))[signal]
    assert query is not None and q(has) in query, query
    if lacks:
        assert q(lacks) not in query, query
