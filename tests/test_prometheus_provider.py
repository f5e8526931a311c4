"""PrometheusProvider against a real Prometheus scraping real exporters: every preset's
signals, revisions apart, no data, an invalid override, a stopped Prometheus, a timeout."""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.prometheus_fixture import (
    TGI_DURATION_BUCKETS,
    TGI_VALIDATION_SHARE,
    MetricsExporter,
    PodTarget,
    PrometheusServer,
    prometheus_bin,  # noqa: F401  (fixture)
    prometheus_server,  # noqa: F401  (fixture)
    require_prometheus,
    wait_until,
)
from trimtab.metrics.base import LabelValues, QueryResult, ResultState, Signals, read_signals
from trimtab.metrics.factory import ProviderConfig, UnknownProviderError, create_provider
from trimtab.metrics.presets import (
    PresetOptions,
    QueryTarget,
    bucket_bounds_query,
    build_queries,
    choose_bucket,
    count_queries,
)
from trimtab.metrics.prometheus import PrometheusProvider

pytestmark = pytest.mark.prometheus

NS = "serving"
WINDOW = "2s"  # ten 200 ms scrapes
# The steady load every preset's exporter serves, and what its gauges say.
RPS, LATENCY, QUEUE_S, ERRORS = 5.0, 0.7, 0.2, 0.1
WAITING, RUNNING = 3.0, 2.0


@dataclass
class Fleet:
    prometheus: PrometheusServer
    exporters: dict[str, MetricsExporter]


def _pod(exporter: MetricsExporter, owner: str, revision: str, pod: str) -> PodTarget:
    labels = {
        "trimtab.io/owner": owner,
        "trimtab.io/revision": revision,
        "app.kubernetes.io/managed-by": "trimtab",
    }
    return PodTarget(exporter.address, namespace=NS, pod=pod, labels=labels)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One Prometheus scraping a pod of each preset, a vLLM canary beside its stable
    revision, and a vLLM whose names reach Prometheus with `_` for `:`."""
    binary = require_prometheus()
    exporters: dict[str, MetricsExporter] = {}
    targets: list[PodTarget] = []
    for server in MetricsExporter.SERVERS:
        e = MetricsExporter(server, model="m").start()
        e.set_queue(WAITING)
        e.set_running(RUNNING)
        e.set_load(RPS, LATENCY, QUEUE_S, ERRORS)
        exporters[server] = e
        targets.append(_pod(e, f"{server}-app", "r1", f"{server}-app-r1-0"))
    # A Triton ensemble: its entry model and the one it runs, each reporting every request.
    for model in ("ensemble", "tensorrt_llm"):
        e = MetricsExporter("triton", model=model).start()
        e.set_queue(WAITING)
        e.set_load(RPS, LATENCY, QUEUE_S, ERRORS)
        exporters[f"triton-{model}"] = e
        targets.append(_pod(e, "ens-app", "r1", "ens-app-r1-0"))
    stable = MetricsExporter("vllm").start()
    canary = MetricsExporter("vllm").start()
    escaped = MetricsExporter("vllm", escape_colons=True).start()
    stable.set_queue(3)
    canary.set_queue(7)
    escaped.set_queue(5)
    exporters.update({"stable": stable, "canary": canary, "escaped": escaped})
    targets += [
        _pod(stable, "chat", "stable1", "chat-stable1-0"),
        _pod(canary, "chat", "canary2", "chat-canary2-0"),
        _pod(escaped, "new-vllm", "r1", "new-vllm-r1-0"),
    ]
    prometheus = PrometheusServer(targets, tmp_path_factory.mktemp("prom"), binary=binary)
    try:
        prometheus.start()
        prometheus.wait_for_scrapes()
        yield Fleet(prometheus, exporters)
    finally:
        prometheus.stop()
        for e in exporters.values():
            e.stop()


def _read(url: str, preset: str, target: QueryTarget, **kw: object) -> Signals:
    async def go() -> Signals:
        provider = PrometheusProvider(url, timeout_s=5)
        try:
            queries = build_queries(preset, target, **kw)  # type: ignore[arg-type]
            return await read_signals(provider, queries, source=preset)
        finally:
            await provider.close()

    return asyncio.run(go())


def _target(owner: str, revision: str | None = None) -> QueryTarget:
    return QueryTarget(NS, owner, revision=revision, window=WINDOW)


Check = Callable[[QueryResult], bool]


def near(expected: float, rel: float = 0.06) -> Check:
    return lambda r: r.value is not None and math.isclose(r.value, expected, rel_tol=rel)


def within(low: float, high: float) -> Check:
    """A histogram quantile: Prometheus interpolates inside the bucket holding the value."""
    return lambda r: r.value is not None and low < r.value <= high


def no_data() -> Check:
    return lambda r: r.state is ResultState.NO_DATA


SERVICE = LATENCY - QUEUE_S
OK = RPS * (1 - ERRORS)
TGI_BUCKET = (0.0001 * 1.5**21, 0.0001 * 1.5**22)  # 0.498..0.748 holds 0.7

# What each preset must read from its server's metrics under the steady load above.
EXPECTED: list[object] = [
    pytest.param(
        "vllm",
        {
            "queueDepth": near(WAITING),
            "running": near(RUNNING),
            "arrivalRate": near(OK),  # finished requests
            "serviceTime": near(SERVICE),  # RUNNING-phase histogram
            "p99Latency": within(0.5, 0.8),
            "errorRate": near(ERRORS),
        },
        id="vllm",
    ),
    pytest.param(
        "triton",
        {
            "queueDepth": near(WAITING),
            "running": near(OK * SERVICE),  # Little's law on compute microseconds
            "arrivalRate": near(RPS),
            "serviceTime": near(SERVICE),
            "p99Latency": near(LATENCY),  # summary quantile
            "errorRate": near(ERRORS),
        },
        id="triton",
    ),
    pytest.param(
        "tgi",
        {
            "queueDepth": near(WAITING),
            "running": near(RUNNING),
            # Successes and failures, bad requests included (tgi_request_count reads 2x).
            "arrivalRate": near(RPS * (1 + TGI_VALIDATION_SHARE)),
            "serviceTime": near(SERVICE),
            "p99Latency": within(*TGI_BUCKET),
            # Bad requests (validation) are no server errors.
            "errorRate": near(ERRORS / (1 + TGI_VALIDATION_SHARE)),
        },
        id="tgi",
    ),
    pytest.param(
        "torchserve",
        {
            "queueDepth": near(RPS * QUEUE_S),  # Little's law on queue microseconds
            "running": near(RPS * SERVICE),
            "arrivalRate": near(RPS),
            "serviceTime": near(SERVICE),
            "p99Latency": no_data(),  # no histogram exported
            "errorRate": near(ERRORS),
        },
        id="torchserve",
    ),
    pytest.param(
        "generic",
        {
            "queueDepth": near(WAITING),
            "running": near(RUNNING),
            "arrivalRate": near(RPS),
            "serviceTime": near(LATENCY),  # the HTTP histogram includes queueing
            "p99Latency": within(0.5, 0.75),
            "errorRate": near(ERRORS),
        },
        id="generic",
    ),
]


@pytest.mark.parametrize(("preset", "expected"), EXPECTED)
def test_preset_reads_every_signal(fleet: Fleet, preset: str, expected: dict[str, Check]) -> None:
    options = PresetOptions(queue_metric="app_queue_depth", running_metric="app_requests_in_flight")
    seen: dict[str, QueryResult] = {}

    def all_match() -> bool:
        signals = _read(
            fleet.prometheus.url, preset, _target(f"{preset}-app", "r1"), options=options
        )
        for name, result in signals.by_name().items():
            seen[name] = result
        return all(check(seen[name]) for name, check in expected.items())

    try:
        wait_until(all_match, timeout_s=20, interval_s=0.3, what=f"{preset} signals")
    except AssertionError:
        pytest.fail(f"{preset} read {seen}")
    assert not any(r.is_unavailable for r in seen.values()), seen


def test_revisions_are_measured_apart(fleet: Fleet) -> None:
    url = fleet.prometheus.url

    def queue(revision: str | None) -> float | None:
        return _read(url, "vllm", _target("chat", revision)).queue_depth.value

    wait_until(lambda: queue(None) == 10.0, timeout_s=10, what="both revisions scraped")
    assert queue("stable1") == 3.0
    assert queue("canary2") == 7.0


@pytest.mark.parametrize(
    ("model", "share"),
    [
        pytest.param(None, 2.0, id="every-model-counts-each-request-twice"),
        pytest.param("ensemble", 1.0, id="the-entry-model-counts-it-once"),
    ],
)
def test_a_triton_ensemble_is_read_at_its_entry_model(
    fleet: Fleet, model: str | None, share: float
) -> None:
    options = PresetOptions(model=model)
    target = _target("ens-app", "r1")
    signals = _read(fleet.prometheus.url, "triton", target, options=options)
    assert near(RPS * share)(signals.arrival_rate), signals.arrival_rate
    assert near(ERRORS)(signals.error_rate), signals.error_rate

    counts = count_queries("triton", target, None, options)
    queries = {k: q for k, q in counts.items() if q}
    read: dict[str, QueryResult] = {}

    def counted() -> bool:
        read.update(_together(fleet.prometheus.url, queries))
        return math.isclose(read["requests"].value or 0.0, RPS * 2 * share, rel_tol=0.2)

    try:
        wait_until(counted, timeout_s=20, interval_s=0.3, what="triton counts")
    except AssertionError:
        pytest.fail(f"read {read}")


def test_vllm_names_with_underscores_are_read(fleet: Fleet) -> None:
    """Newer prometheus_client in vLLM shows `vllm_num_requests_waiting` to Prometheus."""
    assert fleet.prometheus.query('vllm_num_requests_waiting{trimtab_io_owner="new-vllm"}')
    signals = _read(fleet.prometheus.url, "vllm", _target("new-vllm"))
    assert signals.queue_depth.value == 5.0


def test_absent_series_is_no_data(fleet: Fleet) -> None:
    signals = _read(fleet.prometheus.url, "vllm", _target("nobody-deployed-this"))
    for name, result in signals.by_name().items():
        assert result.state is ResultState.NO_DATA, (name, result)
        assert result.message
    assert signals.available, "no data is not an outage"


def test_preset_without_a_query_says_how_to_add_one(fleet: Fleet) -> None:
    signals = _read(fleet.prometheus.url, "torchserve", _target("torchserve-app"))
    assert signals.p99_latency.state is ResultState.NO_DATA
    assert "spec.metrics.queries.p99Latency" in signals.p99_latency.message


def test_invalid_override_is_unavailable_with_the_parse_error(fleet: Fleet) -> None:
    overrides = {"queueDepth": "sum(rate(vllm:num_requests_waiting{ {{selector}} }[1m]"}
    signals = _read(fleet.prometheus.url, "vllm", _target("vllm-app"), overrides=overrides)
    assert signals.queue_depth.state is ResultState.UNAVAILABLE
    assert "bad_data" in signals.queue_depth.message
    assert "parse error" in signals.queue_depth.message
    assert not signals.available
    assert set(signals.errors()) == {"queueDepth"}
    # The other signals of the same batch still read.
    assert signals.running.value == RUNNING


def test_override_with_placeholders_is_read(fleet: Fleet) -> None:
    overrides = {"queueDepth": "max(vllm:num_requests_waiting{ {{selector}} }) * 2"}
    signals = _read(fleet.prometheus.url, "vllm", _target("vllm-app", "r1"), overrides=overrides)
    assert signals.queue_depth.value == WAITING * 2


def test_override_answering_many_series_is_unavailable(fleet: Fleet) -> None:
    overrides = {"queueDepth": 'vllm:num_requests_waiting{trimtab_io_owner="chat"}'}
    signals = _read(fleet.prometheus.url, "vllm", _target("chat"), overrides=overrides)
    assert signals.queue_depth.state is ResultState.UNAVAILABLE
    assert "2 series" in signals.queue_depth.message
    assert "sum(" in signals.queue_depth.message


def _together(url: str, queries: dict[str, str]) -> dict[str, QueryResult]:
    async def go() -> dict[str, QueryResult]:
        provider = PrometheusProvider(url, timeout_s=5)
        try:
            return await provider.query_together(queries)
        finally:
            await provider.close()

    return asyncio.run(go())


@pytest.mark.parametrize("preset", ["vllm", "tgi", "generic", "triton"])
def test_counts_read_together_are_each_queries_own(fleet: Fleet, preset: str) -> None:
    """A rollout's counts in one query: each keeps its own value, and a count with no series
    is no data, not a number taken from another."""
    target = _target(f"{preset}-app", "r1")
    # A bucket bound above LATENCY that the preset's histogram has.
    bound = min(b for b in TGI_DURATION_BUCKETS if b > LATENCY) if preset == "tgi" else 1.0
    counts = count_queries(preset, target, bound, PresetOptions())
    queries: dict[str, str] = {k: q for k, q in counts.items() if q}
    queries["absent"] = 'sum(increase(no_such_total{trimtab_io_owner="x"}[2s]))'
    read: dict[str, QueryResult] = {}

    def counted() -> bool:
        read.update(_together(fleet.prometheus.url, queries))
        requests = read["requests"].value or 0.0
        errors = read["errors"].value or 0.0
        return math.isclose(requests, RPS * 2, rel_tol=0.2) and math.isclose(
            errors, requests * ERRORS, rel_tol=0.05
        )

    try:
        wait_until(counted, timeout_s=20, interval_s=0.3, what=f"{preset} counts")
    except AssertionError:
        pytest.fail(f"{preset} read {read}")
    assert set(read) == set(queries)
    assert read["absent"].state is ResultState.NO_DATA
    assert all(read[name].has_value for name in set(queries) - {"absent"}), read
    if "latencyFast" in queries:  # every request took LATENCY, under the bound
        assert read["latencyFast"].value == read["latencyRequests"].value


def test_tgi_latency_is_counted_at_the_bucket_nearest_the_slo(fleet: Fleet) -> None:
    """TGI's bucket bounds grow by 1.5x from 0.1 ms, so no whole-millisecond SLO is one of them:
    counted at exactly the SLO's bound, latency had no series and was never judged on a TGI
    canary. The bounds are read from Prometheus and the nearest within 5% is counted at."""
    above = min(b for b in TGI_DURATION_BUCKETS if b > LATENCY)  # every request is under it
    slo_s = round(above * 1000) / 1000  # as p99LatencyMs is written: whole milliseconds
    assert slo_s != above
    bounds_query = bucket_bounds_query("tgi", QueryTarget(NS, "tgi-app"), PresetOptions())
    assert bounds_query is not None

    async def bounds() -> LabelValues:
        provider = PrometheusProvider(fleet.prometheus.url, timeout_s=5)
        try:
            return await provider.label_values(bounds_query, "le")
        finally:
            await provider.close()

    found = asyncio.run(bounds())
    assert found.error == "" and len(found.values) == len(TGI_DURATION_BUCKETS) + 1  # and +Inf
    le, why = choose_bucket(found.values, slo_s)
    assert le is not None and float(le) == above and why == ""

    target = _target("tgi-app", "r1")
    exact = count_queries("tgi", target, slo_s, PresetOptions())
    nearest = count_queries("tgi", target, slo_s, PresetOptions(), latency_le=le)
    queries = {
        "seen": nearest["latencyRequests"] or "",
        "fast": nearest["latencyFast"] or "",
        "exact": exact["latencyFast"] or "",
    }
    read: dict[str, QueryResult] = {}

    def counted() -> bool:
        read.update(_together(fleet.prometheus.url, queries))
        return bool(read["seen"].value)

    wait_until(counted, timeout_s=20, interval_s=0.3, what="TGI latency counts")
    assert read["fast"].value == read["seen"].value
    assert read["exact"].state is ResultState.NO_DATA


def test_counts_read_together_come_from_the_same_scrapes(fleet: Fleet) -> None:
    """Every request is under the bound, so a histogram's count and its bucket must agree
    exactly; read in separate queries they differ whenever a scrape lands between them (a
    scrape's worth of invented slow requests: a false rollback). 40 reads over 8 s cross
    about 40 of the 200 ms scrapes."""
    target = QueryTarget(NS, "generic-app", revision="r1", window="5s")
    queries = count_queries("generic", target, 1.0, PresetOptions())
    pair = {"seen": queries["latencyRequests"] or "", "fast": queries["latencyFast"] or ""}
    wait_until(
        lambda: _together(fleet.prometheus.url, pair)["seen"].has_value,
        timeout_s=20,
        interval_s=0.2,
        what="two scrapes in the window",
    )
    for _ in range(40):
        read = _together(fleet.prometheus.url, pair)
        assert read["seen"].has_value, read
        assert read["fast"].value == read["seen"].value, read
        time.sleep(0.2)


def test_a_failed_query_read_together_fails_every_count(fleet: Fleet) -> None:
    queries = {"ok": "vector(1)", "bad": "sum(rate(x[1m]"}
    read = _together(fleet.prometheus.url, queries)
    for result in read.values():
        assert result.state is ResultState.UNAVAILABLE
        assert "parse error" in result.message
    many = _together(
        fleet.prometheus.url,
        {"many": 'vllm:num_requests_waiting{trimtab_io_owner="chat"}', "one": "vector(2)"},
    )
    assert many["many"].state is ResultState.UNAVAILABLE and "2 series" in many["many"].message
    assert many["one"].value == 2.0


def test_is_online(fleet: Fleet) -> None:
    async def go() -> bool:
        provider = create_provider("prometheus", ProviderConfig(fleet.prometheus.url))
        try:
            return await provider.is_online()
        finally:
            await provider.close()

    assert asyncio.run(go()) is True


def test_unknown_provider_is_an_error() -> None:
    with pytest.raises(UnknownProviderError, match="datadog"):
        create_provider("datadog", ProviderConfig("http://127.0.0.1:1"))


def test_prometheus_stopped_mid_test_is_unavailable(
    prometheus_server: Callable[..., PrometheusServer],  # noqa: F811  (the fixture)
    tmp_path: Path,
) -> None:
    with MetricsExporter("tgi").start() as exporter:
        exporter.set_queue(4)
        prometheus = prometheus_server([_pod(exporter, "solo", "r1", "solo-r1-0")])
        provider = PrometheusProvider(prometheus.url, timeout_s=2)
        queries = build_queries("tgi", _target("solo"))

        async def read() -> Signals:
            return await read_signals(provider, queries, "tgi")

        wait_until(
            lambda: asyncio.run(read()).queue_depth.value == 4.0, timeout_s=20, what="first value"
        )
        assert asyncio.run(provider.is_online())
        prometheus.stop()

        signals = asyncio.run(read())
        assert not signals.available
        for name, result in signals.by_name().items():
            assert result.state is ResultState.UNAVAILABLE, (name, result)
            assert prometheus.url in result.message
            assert "Connection refused" in result.message
        assert set(signals.errors()) == {
            "arrivalRate", "queueDepth", "running", "serviceTime", "p99Latency", "errorRate"
        }  # fmt: skip
        assert asyncio.run(provider.is_online()) is False


def test_a_silent_prometheus_times_out() -> None:
    """A server that accepts the connection and never answers costs at most timeout_s."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        held: list[socket.socket] = []
        stop = threading.Event()

        def accept() -> None:
            listener.settimeout(0.1)
            while not stop.is_set():
                try:
                    held.append(listener.accept()[0])
                except OSError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:

            async def go() -> tuple[dict[str, QueryResult], float]:
                provider = PrometheusProvider(f"http://127.0.0.1:{port}", timeout_s=0.3)
                start = asyncio.get_running_loop().time()
                results = await provider.query_batch({"a": "vector(1)", "b": "up"})
                return results, asyncio.get_running_loop().time() - start

            results, elapsed = asyncio.run(go())
        finally:
            stop.set()
            thread.join(timeout=2)
            for conn in held:
                conn.close()
    assert elapsed < 1.5
    for result in results.values():
        assert result.state is ResultState.UNAVAILABLE
        assert "0.3s" in result.message or "timed out" in result.message
