"""The simulator on small traces with answers worked out by hand, the Prometheus path, and a
table per baseline policy."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from trimtab.api.autoscaling import AutoscalingSpec, SLOSpec
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.simulate.compare import Scenario, score
from trimtab.simulate.engine import Decision, MetricsPath, ServerModel, Simulation
from trimtab.simulate.policies import (
    CpuModel,
    HpaBehavior,
    HpaCpuPolicy,
    KedaQueuePolicy,
    KnativeKpaPolicy,
    OraclePolicy,
    _HpaAlgorithm,
)
from trimtab.simulate.prometheus import PrometheusView, Sample, histogram_quantile
from trimtab.simulate.traces import Request, Trace, burst_trace, parse_azure_csv, step_trace

# One token of prompt per ms of prefill and one output token per second: service = output s.
SERVER = ServerModel(
    prefill_tokens_per_s=1000.0,
    decode_tokens_per_s=1.0,
    max_concurrency=2,
    cold_start=10.0,
    service_noise=0.0,
)


@dataclass
class Fixed:
    """A policy that asks for a fixed count (or a schedule) so the engine can be checked alone."""

    plan: dict[float, int] = field(default_factory=dict)
    name: str = "fixed"
    interval: float = 1.0

    def decide(self, now: float, cluster: object) -> Decision | None:
        due = [n for t, n in self.plan.items() if t <= now]
        return Decision(now, due[-1]) if due else None


def run(requests: list[Request], policy: object, replicas: int = 1, slo: float = 5.0):  # type: ignore[no-untyped-def]  # test helper
    sim = Simulation(
        Trace("t", tuple(requests)),
        policy,
        SERVER,  # type: ignore[arg-type]  # duck-typed policy
        MetricsPath(scrape_interval=1.0, rate_window=10.0),
        replicas,
        seed=0,
        slo_s=slo,
        tail=0.0,
    )
    return sim.run()


def test_queueing_on_one_replica_known_latencies() -> None:
    # Two slots; three 4 s requests at t=0: the third waits for a slot until t=4.
    reqs = [Request(0.0, 0, 4) for _ in range(3)]
    result = run(reqs, Fixed())
    assert sorted(lat for _, lat in result.latencies) == [4.0, 4.0, 8.0]
    s = score(result)
    assert s.slo_violation_seconds == 1 and s.requests_over_slo == pytest.approx(1 / 3)


def test_cold_start_delays_new_capacity_and_cost_counts_it() -> None:
    # Scale to 2 at the first tick t0 < 1: the new replica serves from t0 + 10; four 20 s
    # requests at t=1, two of them wait for it.
    reqs = [Request(1.0, 0, 20) for _ in range(4)]
    result = run(reqs, Fixed({0.0: 2}))
    t0 = result.decisions[0].time
    assert 0.0 <= t0 < 1.0
    assert sorted(lat for _, lat in result.latencies) == pytest.approx([20, 20, 29 + t0, 29 + t0])
    # Horizon = last arrival (1 s): replica-seconds 1 (first) + 1 - t0 (second, starting).
    assert result.replica_seconds == pytest.approx(2.0 - t0)
    assert result.scale_actions == 1


def test_draining_replica_finishes_its_requests() -> None:
    reqs = [Request(0.0, 0, 5), Request(0.0, 0, 5), Request(0.1, 0, 5), Request(6.0, 0, 1)]
    result = run(reqs, Fixed({1.0: 1}), replicas=2)
    assert sorted(lat for _, lat in result.latencies) == pytest.approx([1.0, 5.0, 5.0, 5.0])


def test_ttft_measures_wait_plus_prefill() -> None:
    reqs = [Request(0.0, 500, 4) for _ in range(3)]
    sim = Simulation(
        Trace("t", tuple(reqs)),
        Fixed(),
        SERVER,  # type: ignore[arg-type]  # duck-typed policy
        MetricsPath(latency="ttft"),
        1,
        slo_s=1.0,
        tail=0.0,
    )
    got = sorted(lat for _, lat in sim.run().latencies)
    assert got == pytest.approx([0.5, 0.5, 4.5 + 0.5])


@pytest.mark.parametrize(
    ("latency", "counted_before_the_end"),
    [
        pytest.param("ttft", 1.0, id="ttft-observed-at-the-first-token"),
        pytest.param("e2e", 0.0, id="e2e-observed-at-the-end"),
    ],
)
def test_the_histogram_is_observed_when_the_server_observes_it(
    latency: str, counted_before_the_end: float
) -> None:
    # One request: 0.5 s of prefill, then 20 s of decode. vLLM observes TTFT at the first
    # token, so scrapes during the decode already count it; the e2e histogram only at the end.
    sim = Simulation(
        Trace("t", (Request(0.0, 500, 20),)),
        Fixed(),
        SERVER,  # type: ignore[arg-type]  # duck-typed policy
        MetricsPath(scrape_interval=1.0, rate_window=10.0, latency=latency),
        1,
        slo_s=1.0,
        tail=30.0,
    )
    sim.run()
    during = [s for s in sim.prometheus.samples if 2.0 <= s.time <= 19.0]
    after = [s for s in sim.prometheus.samples if s.time > 21.0]
    assert during and after
    assert {s.buckets[-1] for s in during} == {counted_before_the_end}
    assert {s.completed for s in during} == {0.0}
    assert {s.buckets[-1] for s in after} == {1.0}


def test_histogram_quantile_matches_prometheus() -> None:
    assert histogram_quantile(0.5, (1.0, 2.0), [10, 20, 20]) == 1.0
    assert histogram_quantile(0.75, (1.0, 2.0), [10, 20, 20]) == 1.5
    assert histogram_quantile(0.99, (1.0, 2.0), [0, 0, 5]) == 2.0  # +Inf: highest finite bound
    assert histogram_quantile(0.99, (1.0,), [0, 0]) is None


def _sample(
    t: float,
    arrivals: float,
    busy: dict[int, float],
    waiting: float = 0.0,
    slot_busy: dict[int, float] | None = None,
) -> Sample:
    return Sample(
        t,
        arrivals,
        arrivals,
        (arrivals, arrivals),
        arrivals,
        waiting,
        0.0,
        busy,
        slot_busy if slot_busy is not None else dict(busy),
    )


def test_prometheus_rate_and_gauge_lookback() -> None:
    view = PrometheusView(15.0, 60.0, (1.0,))
    for i in range(6):
        view.add(_sample(15.0 * i, 30.0 * i, {0: 7.5 * i}))
    assert view.rate(75.0, "arrivals") == pytest.approx(2.0)
    assert view.busy_share(75.0) == (0.5, 1)
    assert view.latest(75.0 + 299) is not None and view.latest(75.0 + 301) is None


class _Cluster:
    def __init__(self, view: PrometheusView, replicas: int, ready: int, in_flight: int = 0):
        self.prometheus, self.server = view, SERVER
        self.replicas, self.ready, self._in_flight = replicas, ready, in_flight

    def in_flight(self) -> int:
        return self._in_flight


@pytest.mark.parametrize(
    ("model", "engine_share", "slot_share", "replicas", "ready", "want"),
    [
        # Slot model: cpu = 5% + 95% x slot share.
        pytest.param("slots", 1.0, 1.0, 2, 2, 3, id="slots-saturated-ratio-1.25"),
        pytest.param("slots", 1.0, 0.8, 4, 4, 4, id="slots-80pct-busy-within-tolerance"),
        pytest.param("slots", 1.0, 0.2, 4, 4, 2, id="slots-engine-busy-but-slots-idle-down"),
        pytest.param("slots", 1.0, 0.0, 4, 4, 1, id="slots-idle-base-5pct"),
        pytest.param("slots", 1.0, 1.0, 4, 2, 4, id="slots-unready-pods-count-as-zero"),
        pytest.param("slots", 1.0, 1.0, 10, 10, 13, id="slots-up-13"),
        # Engine model: cpu = 5% + 95% x share of time with a request in flight.
        pytest.param("engine", 1.0, 0.2, 2, 2, 3, id="engine-one-request-saturates"),
        pytest.param("engine", 0.95, 0.1, 4, 4, 5, id="engine-95pct-busy-up"),
        pytest.param("engine", 0.2, 0.05, 4, 4, 2, id="engine-down-to-ratio"),
        pytest.param("engine", 1.0, 0.2, 4, 2, 4, id="engine-unready-pods-count-as-zero"),
    ],
)
def test_hpa_cpu_table(
    model: str, engine_share: float, slot_share: float, replicas: int, ready: int, want: int
) -> None:
    view = PrometheusView(15.0, 60.0, (1.0,))
    zero = {i: 0.0 for i in range(ready)}
    view.add(_sample(0.0, 0, zero, slot_busy=zero))
    view.add(
        _sample(
            15.0,
            0,
            {i: 15.0 * engine_share for i in range(ready)},
            slot_busy={i: 15.0 * slot_share for i in range(ready)},
        )
    )
    policy = HpaCpuPolicy(1, 20, cpu=CpuModel(busy=model))  # type: ignore[arg-type]  # a Literal from the table
    policy.hpa.start(-600.0, replicas)  # a controller that has run for a while
    assert policy.name == ("hpa_cpu" if model == "slots" else "hpa_cpu_engine_busy")
    decision = policy.decide(15.0, _Cluster(view, replicas, ready))
    assert decision is not None and decision.replicas == want, decision


def test_engine_counts_busy_slot_seconds() -> None:
    # Two slots; two 4 s requests at t=0 then one 2 s request at t=4: slot-seconds 4+4+2 = 10
    # over 2 slots = 5 "full" seconds, while the engine was busy for 6 s.
    reqs = [Request(0.0, 0, 4), Request(0.0, 0, 4), Request(4.0, 0, 2)]
    sim = Simulation(
        Trace("t", tuple(reqs)),
        Fixed(),
        SERVER,  # type: ignore[arg-type]  # duck-typed policy
        MetricsPath(scrape_interval=1.0, rate_window=10.0),
        1,
        seed=0,
        slo_s=5.0,
        tail=3.0,
    )
    sim.run()
    last = sim.prometheus.samples[-1]
    assert last.time >= 6.0
    assert last.busy[0] == pytest.approx(6.0) and last.slot_busy[0] == pytest.approx(5.0)


def test_hpa_scale_down_stabilization_and_scale_up_limit() -> None:
    view = PrometheusView(15.0, 60.0, (1.0,))
    policy = HpaCpuPolicy(1, 100)
    policy.hpa.start(-600.0, 1)
    view.add(_sample(0.0, 0, {0: 0.0}))
    view.add(_sample(15.0, 0, {0: 15.0}))
    # Saturated at 1 pod: ratio 1.25 -> 2 pods.
    assert policy.decide(15.0, _Cluster(view, 1, 1)).replicas == 2  # type: ignore[union-attr]  # not None here
    # Idle afterwards: the 300 s window keeps the earlier recommendation of 2.
    view.add(_sample(30.0, 0, {0: 15.0, 1: 0.0}))
    view.add(_sample(45.0, 0, {0: 15.0, 1: 0.0}))
    assert policy.decide(45.0, _Cluster(view, 2, 2)).replicas == 2  # type: ignore[union-attr]  # not None here


@pytest.mark.parametrize(
    ("waiting", "replicas", "want"),
    [
        pytest.param(0.0, 1, 1, id="empty-queue-min"),
        # No behavior block (KEDA writes none): at most max(2 x 2, 4) = 4 per sync.
        pytest.param(52.0, 2, 4, id="ceil-total-over-threshold-but-2x-or-4-limit"),
        pytest.param(23.0, 4, 5, id="ceil-23-over-5"),
        pytest.param(21.0, 4, 4, id="21-within-tolerance-of-20"),
        pytest.param(19.0, 4, 4, id="within-tolerance"),
        pytest.param(500.0, 10, 20, id="100-percent-limit"),
    ],
)
def test_keda_queue_table(waiting: float, replicas: int, want: int) -> None:
    view = PrometheusView(15.0, 60.0, (1.0,))
    view.add(_sample(0.0, 0, {}, waiting=waiting))
    policy = KedaQueuePolicy(1, 40)
    policy.hpa.start(-600.0, replicas)  # a controller that has run for a while
    decision = policy.decide(1.0, _Cluster(view, replicas, replicas))
    assert decision is not None and decision.replicas == want


@pytest.mark.parametrize("policy", [HpaCpuPolicy(1, 20), KedaQueuePolicy(1, 40)])
def test_hpa_seeds_its_window_with_the_replicas_it_finds(policy: Any) -> None:
    """As the HPA controller: its first look at a target counts the current replicas as a
    recommendation, so an idle start does not scale down for one window; scale-up is not held."""
    view = PrometheusView(15.0, 60.0, (1.0,))
    view.add(_sample(0.0, 0, {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}, waiting=0.0))
    view.add(_sample(15.0, 0, {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}, waiting=0.0))
    assert policy.decide(15.0, _Cluster(view, 4, 4)).replicas == 4
    assert policy.decide(200.0, _Cluster(view, 4, 4)).replicas == 4
    # One window after the first look the idle recommendations take over.
    for t in (315.0, 330.0):
        view.add(_sample(t, 0, {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}, waiting=0.0))
    assert policy.decide(330.0, _Cluster(view, 4, 4)).replicas < 4
    busy = PrometheusView(15.0, 60.0, (1.0,))
    busy.add(_sample(0.0, 0, {0: 0.0}, waiting=0.0))
    busy.add(_sample(15.0, 0, {0: 15.0}, waiting=60.0))
    fresh = type(policy)(1, 20)
    assert fresh.decide(15.0, _Cluster(busy, 1, 1)).replicas > 1


@pytest.mark.parametrize(
    ("history", "ready", "want", "mode"),
    [
        pytest.param([5] * 60, 1, 1, "stable", id="stable-at-target"),
        pytest.param([11] * 60, 2, 2, "stable", id="stable-11-over-5.6"),
        pytest.param([0] * 54 + [40] * 6, 1, 8, "panic", id="panic-on-6s-burst"),
        pytest.param([0] * 60, 8, 4, "stable", id="scale-down-at-most-half"),
    ],
)
def test_knative_kpa_table(history: list[int], ready: int, want: int, mode: str) -> None:
    policy = KnativeKpaPolicy(1, 50)
    policy.started = True  # an autoscaler that has run for a while (no start-up panic)
    decision = None
    for second, value in enumerate(history):
        policy.next_decision = 0.0 if second == len(history) - 1 else math.inf
        decision = policy.decide(float(second), _Cluster(PrometheusView(), ready, ready, value))
    assert decision is not None and decision.replicas == want and decision.reason.startswith(mode)


def test_oracle_provisions_ahead_for_known_peak() -> None:
    reqs = tuple(Request(30.0, 0, 5) for _ in range(6))
    trace = Trace("t", reqs)
    oracle = OraclePolicy(trace, SERVER, 1, 10, [5.0] * 6, interval=5.0)
    assert oracle.need[30:35] == [3] * 5 and oracle.need[35] == 3 and oracle.need[36] == 0
    assert oracle.decide(10.0, object()).replicas == 1  # type: ignore[arg-type, union-attr]  # unused view
    assert oracle.decide(16.0, object()).replicas == 3  # type: ignore[arg-type, union-attr]  # unused view
    result = run(list(reqs), oracle, replicas=1, slo=5.0)
    assert all(lat == pytest.approx(5.0) for _, lat in result.latencies)


def test_traces_parse_scale_and_synthesize() -> None:
    text = [
        "TIMESTAMP,ContextTokens,GeneratedTokens",
        "2023-11-16 18:17:04.0000000,10,2",
        "2023-11-16 18:17:03.5000000,5,1",
    ]
    trace = parse_azure_csv(text, "x.csv")
    assert [r.arrival for r in trace.requests] == [0.0, 0.5]
    assert trace.time_scaled(2.0).requests[1].arrival == 0.25
    with pytest.raises(ValueError, match="missing columns"):
        parse_azure_csv(["a,b", "1,2"], "bad.csv")
    a, b = step_trace(1, 2.0), step_trace(1, 2.0)
    assert a == b and step_trace(2, 2.0) != a
    before = sum(1 for r in a.requests if r.arrival < 180)
    during = sum(1 for r in a.requests if 180 <= r.arrival < 480)
    assert before / 180 == pytest.approx(2.0, rel=0.25) and during / 300 == pytest.approx(
        10, rel=0.15
    )
    assert len(burst_trace(3, 2.0).requests) > 0


def test_scenario_runs_every_policy_deterministically() -> None:
    scenario = Scenario(
        SLOSpec(p99_latency_ms=2000, latency="ttft"),
        AutoscalingSpec(max_replicas=10),
        ServerModel(cold_start=30.0),
    )
    trace = step_trace(0, 3.0, before=60, during=120, after=60)
    first = {n: score(scenario.run(n, trace, 1)) for n in ("trimtab", "keda_queue", "oracle")}
    again = score(scenario.run("trimtab", trace, 1))
    assert first["trimtab"] == again
    assert first["oracle"].slo_violation_seconds <= first["keda_queue"].slo_violation_seconds
    assert first["trimtab"].replica_seconds > 0 and first["trimtab"].scale_actions > 0


@pytest.mark.parametrize(
    ("scale_to_zero", "floor"),
    [
        pytest.param(None, 1, id="quiet-comes-down-to-min-replicas"),
        pytest.param({"idleWindow": "60s"}, 0, id="quiet-scales-to-zero"),
    ],
)
def test_trimtab_scales_down_when_traffic_stops(
    scale_to_zero: dict[str, str] | None, floor: int
) -> None:
    """20 req/s for 200 s, then silence until one last request at 1200 s. Once nothing arrives
    the mean service time is 0/0 (no data): trimtab must read that as no traffic, not as a
    missing signal, and come down once the 300 s window has passed (to zero with scaleToZero,
    woken again by the last request)."""
    rng = random.Random(1)
    arrivals: list[float] = []
    t = 0.0
    while (t := t + rng.expovariate(20.0)) < 200.0:
        arrivals.append(t)
    trace = Trace("busy-then-quiet", tuple(Request(a, 500, 40) for a in [*arrivals, 1200.0]))
    auto: dict[str, Any] = {"minReplicas": 1, "maxReplicas": 20}
    if scale_to_zero:
        auto["scaleToZero"] = scale_to_zero
    scenario = Scenario(
        SLOSpec(p99_latency_ms=5000), AutoscalingSpec.model_validate(auto), ServerModel()
    )
    result = scenario.run("trimtab", trace, 0)
    busy = max(p.replicas for p in result.timeline if p.time < 200)
    quiet = {p.replicas for p in result.timeline if 800 <= p.time < 1200}
    assert busy > 1 and quiet == {floor}, [d.reason for d in result.decisions if d.time > 800][:1]
    assert all(math.isfinite(latency) for _, latency in result.latencies)


@pytest.mark.parametrize(
    ("first", "second_after", "raw", "want"),
    [
        # 1 -> 5 (the +4 floor); 15 s later that change lies exactly at the cutoff, which
        # Kubernetes leaves out (changes strictly after it count): 5 -> max(10, 9) = 10.
        pytest.param(100, 15.0, 100, 10, id="up-change-exactly-one-period-ago-is-outside"),
        # 14.9 s later it is inside: the period started at 1 replica, so at most 5.
        pytest.param(100, 14.9, 100, 5, id="up-change-inside-the-period-counts"),
    ],
)
def test_hpa_rate_limit_period_excludes_its_boundary(
    first: int, second_after: float, raw: int, want: int
) -> None:
    hpa = _HpaAlgorithm(1, 100, HpaBehavior())
    hpa.start(-600.0, 1)
    assert hpa.stabilize_and_limit(0.0, 1, first) == 5
    assert hpa.stabilize_and_limit(second_after, 5, raw) == want


@pytest.mark.parametrize(
    ("second_after", "want"),
    [
        # 50% per 15 s: 40 -> 20. A removal exactly one period ago is outside the period, so
        # the next may take half of 20; inside it, the period started at 40 and 20 already went.
        pytest.param(15.0, 10, id="down-change-exactly-one-period-ago-is-outside"),
        pytest.param(14.9, 20, id="down-change-inside-the-period-counts"),
    ],
)
def test_hpa_scale_down_limit_period_excludes_its_boundary(second_after: float, want: int) -> None:
    hpa = _HpaAlgorithm(1, 100, HpaBehavior(scale_down_stabilization=0.0, scale_down_percent=50.0))
    hpa.start(-600.0, 40)
    assert hpa.stabilize_and_limit(0.0, 40, 1) == 20
    assert hpa.stabilize_and_limit(second_after, 20, 1) == want


@pytest.mark.parametrize(
    ("metrics", "override", "want"),
    [
        pytest.param(None, None, 15.0, id="default-15s"),
        pytest.param({"scrapeInterval": "5s"}, None, 5.0, id="from-the-spec"),
        pytest.param({"scrapeInterval": "5s"}, 30.0, 30.0, id="cli-override-wins"),
    ],
)
def test_scenario_scrapes_as_the_spec_says(
    metrics: dict[str, str] | None, override: float | None, want: float
) -> None:
    body: dict[str, object] = {"image": "x:1", "slo": {"p99LatencyMs": 500}}
    if metrics is not None:
        body["metrics"] = metrics
    spec = ModelDeploymentSpec.model_validate(body)
    assert Scenario.from_spec(spec, scrape_interval=override).metrics.scrape_interval == want


def test_knative_kpa_starts_in_panic_mode_over_one_pod() -> None:
    """newAutoscaler: "We always start in the panic mode, if the deployment is scaled up over
    1 pod": the ready pods stay until a stable window passes (strictly) without panic, so one
    quiet second after the start does not halve them. With one pod it starts stable."""
    policy = KnativeKpaPolicy(1, 50)
    decisions = []
    for second in range(63):
        policy.next_decision = 0.0
        decisions.append(policy.decide(float(second), _Cluster(PrometheusView(), 4, 4, 0)))
    assert all(d is not None and d.replicas == 4 for d in decisions[:61]), decisions[:3]
    assert decisions[0] is not None and decisions[0].reason.startswith("panic")
    last = decisions[-1]
    assert last is not None and last.replicas == 2 and last.reason.startswith("stable")
    one = KnativeKpaPolicy(1, 50)
    first = one.decide(0.0, _Cluster(PrometheusView(), 1, 1, 0))
    assert first is not None and first.reason.startswith("stable")


def test_knative_kpa_panics_on_the_larger_of_stable_and_panic() -> None:
    """In panic, upstream provisions for the stable window too when it asks more."""
    policy = KnativeKpaPolicy(1, 50)
    policy.started = True
    # 60 s at 40 in flight, then 6 s at 12: the stable window still asks 7+, the panic 3.
    history = [40] * 54 + [12] * 6
    decision = None
    for second, value in enumerate(history):
        policy.next_decision = 0.0 if second == len(history) - 1 else math.inf
        policy.panic_since = 50.0  # panicking since a burst
        policy.max_panic_pods = 1
        decision = policy.decide(float(second), _Cluster(PrometheusView(), 1, 1, value))
    assert decision is not None and decision.reason.startswith("panic")
    assert decision.replicas == math.ceil((40 * 54 + 12 * 6) / 60 / 5.6)
