"""decide_replicas, table-driven: each case names the situation and the expected replicas,
action and a fragment of the reason; which status changes are written at once
(status_write_due, table-driven too); plus the spec's CEL rules and the revision hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.validation import cel_failures, validate_custom
from trimtab.api.autoscaling import AutoscalingSpec, AutoscalingStatus, SLOSpec, duration_seconds
from trimtab.api.crdgen import MODELDEPLOYMENT_CRD, model_schema
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.autoscaling import (
    build_autoscaling_status,
    history_from_status,
    parse_rfc3339,
    rfc3339,
    status_write_due,
)
from trimtab.decisions.autoscaling import (
    AutoscalingInput,
    Recommendation,
    Signals,
    compact_history,
    decide_replicas,
)

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT / "crds" / "trimtab.io_modeldeployments.yaml"
SLO = SLOSpec(p99_latency_ms=2000)
NOW = 10_000.0


def spec(**kw: Any) -> AutoscalingSpec:
    base: dict[str, Any] = {
        "min_replicas": 1,
        "max_replicas": 20,
        "scale_down_stabilization": "120s",
    }
    return AutoscalingSpec(**{**base, **kw})


def sig(**kw: Any) -> Signals:
    base: dict[str, Any] = {
        "queue_depth": 0.0,
        "running": 5.0,
        "arrival_rate": 5.0,
        "service_time": 1.0,
        "p99_latency": 1.0,
        "error_rate": 0.0,
    }
    return Signals(**{**base, **kw})


def hist(*pairs: tuple[float, int]) -> tuple[Recommendation, ...]:
    return tuple(Recommendation(NOW - ago, n) for ago, n in pairs)


GENERIC_UNMEASURED = frozenset({"queueDepth", "running"})

CASES = [
    pytest.param(
        sig(arrival_rate=20.0, running=20.0),
        3,
        3,
        spec(),
        (),
        None,
        4,
        "up",
        "20.00 req/s",
        id="littles-law-scales-up",
    ),
    pytest.param(
        # 400 queued would take 100 s on the 4 spare slots: drain it in 15 s once new
        # replicas are ready: 20 + 400 / 15 = 46.7 concurrent -> 8.
        sig(arrival_rate=20.0, running=24.0, queue_depth=400.0),
        3,
        3,
        spec(),
        (),
        None,
        8,
        "up",
        "400 queued",
        id="queue-adds-drain-capacity",
    ),
    pytest.param(
        # No queue, but 30 running while the rate window still says 5 req/s: a rise the
        # window has not caught up with; 30 / 6.4 -> 5.
        sig(arrival_rate=5.0, running=30.0),
        3,
        3,
        spec(),
        (),
        None,
        5,
        "up",
        "30 running, above 5.00 req/s",
        id="running-counts-as-demand-with-empty-queue",
    ),
    pytest.param(
        # Queue 30 -> 60 in 15 s: 8 finishing + 2/s growth = 10 req/s; backlog over a cold
        # start 60 + 2 x 60 = 180, drained in 15 s: 12 more slots -> 22 / 6.4 -> 4.
        sig(arrival_rate=10.0, running=8.0, queue_depth=60.0),
        2,
        1,
        spec(),
        (Recommendation(NOW - 15, 2, 30.0),),
        None,
        4,
        "up",
        "10.00 req/s",
        id="growing-queue-projects-backlog-over-cold-start",
    ),
    pytest.param(
        # Queue 0 -> 60 since the last loop: it began mid-interval on average, 8/s growth,
        # so 16 req/s; backlog 60 + 8 x 60 = 540 over 15 s: 36 + 16 = 52 -> 9, limited to 8.
        sig(arrival_rate=10.0, running=8.0, queue_depth=60.0),
        2,
        1,
        spec(),
        (Recommendation(NOW - 15, 2, 0.0),),
        None,
        8,
        "up",
        "16.00 req/s",
        id="queue-out-of-nothing-assumes-mid-interval-onset",
    ),
    pytest.param(
        # 9 ready replicas draining 600 queued: running (72, every slot) is capacity, not
        # demand; 52 spare slots drain it in 12 s, before a new replica could serve.
        sig(arrival_rate=20.0, running=72.0, queue_depth=600.0, p99_latency=30.0),
        9,
        9,
        spec(),
        (Recommendation(NOW - 15, 4, 700.0),),
        NOW - 200,
        9,
        "hold",
        "drain in 12s on the 9 replicas",
        id="backlog-drained-by-ready-capacity-adds-nothing",
    ),
    pytest.param(
        # 1 ready, 7 starting (asked 30 s ago, ready in 30 s at the latest): the queue grows
        # at 12/s to 460 by then, and 44 spare slots take 10 s more: 40 s < the cold start.
        sig(arrival_rate=20.0, running=8.0, queue_depth=100.0),
        8,
        1,
        spec(),
        (Recommendation(NOW - 15, 8, 100.0),),
        NOW - 30,
        8,
        "hold",
        "drain in 40s on the 8 replicas asked for",
        id="backlog-drained-by-starting-capacity-adds-nothing",
    ),
    pytest.param(
        # The queue shrank 700 -> 600 since the last loop: p99 (over a rate window) still
        # shows the backlog, which the replicas are draining; no feedback replicas.
        sig(arrival_rate=20.0, running=72.0, queue_depth=600.0, p99_latency=30.0),
        9,
        9,
        spec(),
        (Recommendation(NOW - 15, 4, 700.0),),
        NOW - 200,
        9,
        "hold",
        "p99 over SLO while the queue shrinks",
        id="no-p99-feedback-while-queue-shrinks",
    ),
    pytest.param(
        # A backlog bought 12 replicas, but the load alone needed 4 (kept in the history):
        # once the queue is gone the window holds 4, not 12; at most half go per loop.
        sig(arrival_rate=20.0, running=20.0),
        12,
        12,
        spec(),
        (
            Recommendation(NOW - 120, 4, 0.0),
            Recommendation(NOW - 60, 4, 500.0),
            Recommendation(NOW - 30, 4, 100.0),
        ),
        NOW - 100,
        6,
        "down",
        "maxScaleDownRate",
        id="window-ignores-replicas-bought-to-drain-a-backlog",
    ),
    pytest.param(
        sig(arrival_rate=100.0, running=100.0),
        2,
        2,
        spec(max_scale_up_rate=2.0),
        (),
        None,
        6,
        "up",
        "limited to 6",
        id="scale-up-rate-limited-but-at-least-plus-4",
    ),
    pytest.param(
        sig(arrival_rate=500.0, running=500.0),
        3,
        3,
        spec(),
        (),
        None,
        12,
        "up",
        "maxScaleUpRate",
        id="max-rate-4x",
    ),
    pytest.param(
        sig(arrival_rate=1000.0, running=1000.0),
        10,
        10,
        spec(),
        (),
        None,
        20,
        "up",
        "",
        id="bounded-by-max",
    ),
    pytest.param(
        sig(arrival_rate=30.0, running=30.0),
        5,
        3,
        spec(),
        (),
        NOW - 20,
        5,
        "hold",
        "",
        id="starting-capacity-counts",
    ),
    pytest.param(
        sig(arrival_rate=5.0, running=5.0),
        6,
        6,
        spec(),
        hist((120, 6), (50, 4)),
        None,
        6,
        "hold",
        "highest recommendation",
        id="down-held-by-stabilization-window",
    ),
    pytest.param(
        sig(arrival_rate=5.0, running=5.0),
        6,
        6,
        spec(),
        hist((200, 6), (130, 4), (90, 1), (45, 1)),
        None,
        3,
        "down",
        "maxScaleDownRate",
        id="down-rate-limited-after-window",
    ),
    pytest.param(
        sig(arrival_rate=5.0, running=5.0),
        2,
        2,
        spec(),
        hist((200, 2), (100, 1), (40, 1)),
        None,
        1,
        "down",
        "",
        id="down-to-demand",
    ),
    pytest.param(
        sig(arrival_rate=5.0, running=5.0, queue_depth=3.0),
        6,
        6,
        spec(),
        hist((200, 6)),
        None,
        6,
        "hold",
        "3 requests queued",
        id="never-down-while-queueing",
    ),
    pytest.param(
        sig(arrival_rate=5.0, running=5.0, p99_latency=3.0, queue_depth=None),
        6,
        6,
        spec(),
        hist((200, 6)),
        None,
        9,
        "up",
        "p99",
        id="never-down-while-p99-over-slo-and-queue-unknown",
    ),
    pytest.param(
        # The generic preset without queueMetric or runningMetric: the gauges are never
        # measured (not missing); Little's law on the request duration (queueing included)
        # sizes it, down included.
        sig(queue_depth=None, running=None, unmeasured=GENERIC_UNMEASURED),
        6,
        6,
        spec(),
        hist((200, 6), (130, 1), (90, 1), (45, 1)),
        None,
        3,
        "down",
        "maxScaleDownRate",
        id="generic-without-queue-gauge-scales-down",
    ),
    pytest.param(
        sig(
            arrival_rate=0.0,
            service_time=None,
            p99_latency=None,
            queue_depth=None,
            running=None,
            unmeasured=GENERIC_UNMEASURED,
        ),
        3,
        3,
        spec(),
        hist((200, 3), (130, 0), (90, 0), (45, 0)),
        None,
        2,
        "down",
        "no requests arriving",
        id="generic-quiet-without-gauges-is-no-traffic",
    ),
    pytest.param(
        # Without a queue gauge p99 is the only sign of saturation: over the SLO adds replicas.
        sig(queue_depth=None, running=None, p99_latency=3.0, unmeasured=GENERIC_UNMEASURED),
        6,
        6,
        spec(),
        hist((200, 6)),
        None,
        9,
        "up",
        "p99",
        id="generic-without-queue-gauge-p99-over-slo-scales-up",
    ),
    pytest.param(
        sig(arrival_rate=5.0, running=5.0, queue_depth=1.0, p99_latency=4.0),
        4,
        4,
        spec(),
        (),
        NOW - 600,
        8,
        "up",
        "over SLO",
        id="p99-feedback-while-queueing",
    ),
    pytest.param(
        sig(arrival_rate=5.0, running=5.0, queue_depth=1.0, p99_latency=4.0),
        4,
        4,
        spec(),
        (),
        NOW - 30,
        4,
        "hold",
        "",
        id="no-p99-feedback-within-cold-start-of-last-scale-up",
    ),
    pytest.param(
        sig(arrival_rate=5.0, running=5.0, p99_latency=4.0),
        1,
        1,
        spec(),
        (),
        None,
        1,
        "hold",
        "empty queue",
        id="p99-over-slo-with-empty-queue-adds-nothing",
    ),
    pytest.param(
        Signals(source_unavailable=True, error="connection refused"),
        4,
        4,
        spec(),
        (),
        None,
        4,
        "hold",
        "connection refused",
        id="source-down-holds",
    ),
    pytest.param(
        # The latency histogram's query failed (p99 unavailable), but the queue spike is in
        # plain sight: scale up on it; the failure only blocks scale-down.
        sig(
            arrival_rate=20.0,
            running=24.0,
            queue_depth=400.0,
            p99_latency=None,
            source_unavailable=True,
            error="p99Latency: bad_data: parse error",
        ),
        3,
        3,
        spec(),
        (),
        None,
        8,
        "up",
        "400 queued",
        id="queue-spike-scales-up-while-latency-query-fails",
    ),
    pytest.param(
        sig(p99_latency=None, source_unavailable=True, error="p99Latency: timeout"),
        6,
        6,
        spec(),
        hist((200, 1)),
        None,
        6,
        "hold",
        "no scale-down: metrics source unavailable (p99Latency: timeout)",
        id="partial-outage-blocks-scale-down",
    ),
    pytest.param(
        # Every signal unavailable: nothing to compute demand from.
        Signals(source_unavailable=True, error="connection refused"),
        3,
        3,
        spec(),
        hist((200, 1)),
        None,
        3,
        "hold",
        "metrics source unavailable (connection refused); holding",
        id="nothing-available-holds",
    ),
    pytest.param(
        Signals(source_unavailable=True),
        4,
        4,
        spec(on_missing_metrics="fallback", fallback_replicas=6),
        (),
        None,
        6,
        "up",
        "fallback",
        id="source-down-fallback-up",
    ),
    pytest.param(
        Signals(source_unavailable=True),
        8,
        8,
        spec(on_missing_metrics="fallback", fallback_replicas=6),
        (),
        None,
        8,
        "hold",
        "fallback",
        id="fallback-never-scales-down-blind",
    ),
    pytest.param(
        Signals(),
        3,
        3,
        spec(),
        (),
        None,
        3,
        "hold",
        "no data",
        id="no-data-holds",
    ),
    pytest.param(
        sig(arrival_rate=None, service_time=None, running=2.0),
        5,
        5,
        spec(),
        hist((200, 5)),
        None,
        5,
        "hold",
        "arrival rate or service time missing",
        id="partial-data-never-down",
    ),
    pytest.param(
        sig(arrival_rate=None, service_time=None, running=30.0),
        2,
        2,
        spec(),
        (),
        None,
        5,
        "up",
        "30 running",
        id="partial-data-may-scale-up",
    ),
    pytest.param(
        sig(arrival_rate=0.0, running=0.0),
        1,
        1,
        spec(scale_to_zero={"idle_window": "60s"}),
        tuple(Recommendation(NOW - a, 0) for a in (120, 105, 90, 75, 60, 45, 30, 15)),
        None,
        0,
        "down",
        "idle",
        id="scale-to-zero-after-idle-window",
    ),
    pytest.param(
        sig(arrival_rate=0.0, running=0.0),
        1,
        1,
        spec(scale_to_zero={"idle_window": "60s"}),
        tuple(Recommendation(NOW - a, n) for a, n in ((75, 0), (60, 1), (15, 0))),
        None,
        1,
        "hold",
        "",
        id="no-zero-if-any-traffic-in-window",
    ),
    pytest.param(
        # Nothing arrived in the rate window: the mean service time is 0/0, no data. That is
        # no traffic, not a missing signal: demand is 0 and the replicas come down.
        sig(arrival_rate=0.0, running=0.0, service_time=None, p99_latency=None),
        6,
        6,
        spec(),
        hist((200, 6), (130, 0), (60, 0), (15, 0)),
        None,
        3,
        "down",
        "no requests arriving, queued or running",
        id="no-traffic-scales-down-without-service-time",
    ),
    pytest.param(
        sig(arrival_rate=0.0, running=0.0, service_time=None, p99_latency=None),
        1,
        1,
        spec(scale_to_zero={"idle_window": "60s"}),
        tuple(Recommendation(NOW - a, 0) for a in (120, 105, 90, 75, 60, 45, 30, 15)),
        None,
        0,
        "down",
        "idle",
        id="no-traffic-without-service-time-scales-to-zero",
    ),
    pytest.param(
        # No arrivals in the window but requests still running (longer than the window):
        # the service time is undefined, the running requests are demand.
        sig(arrival_rate=0.0, running=14.0, service_time=None),
        6,
        6,
        spec(),
        hist((200, 6)),
        None,
        6,
        "hold",
        "arrival rate or service time missing",
        id="no-arrivals-but-running-is-not-no-traffic",
    ),
    pytest.param(
        # A rate of 0 with the queue gauge absent could hide requests waiting: not no traffic.
        sig(arrival_rate=0.0, running=0.0, queue_depth=None, service_time=None),
        3,
        3,
        spec(),
        hist((200, 3)),
        None,
        3,
        "hold",
        "queue depth missing",
        id="no-traffic-needs-the-queue-as-a-value",
    ),
    pytest.param(
        sig(arrival_rate=0.0, running=0.0),
        1,
        1,
        spec(),
        tuple(Recommendation(NOW - a, 0) for a in (900, 600, 300, 15)),
        None,
        1,
        "hold",
        "",
        id="min-replicas-floor-without-scale-to-zero",
    ),
    pytest.param(
        # Requests seen at zero (queue and arrival rate from gateway-level overrides, a
        # service time from one): Little's law sizes the wake-up.
        sig(arrival_rate=2.0, running=0.0, queue_depth=2.0),
        0,
        0,
        spec(scale_to_zero={"idle_window": "60s"}),
        (),
        None,
        1,
        "up",
        "",
        id="wake-from-zero",
    ),
    pytest.param(
        # Scaled to zero, no pod exports the server's series: that is no demand, not missing
        # data; holding means staying at zero, not going back up to minReplicas.
        Signals(),
        0,
        0,
        spec(scale_to_zero={"idle_window": "60s"}),
        (),
        None,
        0,
        "hold",
        "at 0 replicas, no request seen (arrival rate no data",
        id="zero-without-series-stays-at-zero",
    ),
    pytest.param(
        # An arrivalRate override on the gateway's metrics answers 0: nobody is asking.
        Signals(arrival_rate=0.0),
        0,
        0,
        spec(scale_to_zero={"idle_window": "60s"}),
        (),
        None,
        0,
        "hold",
        "only a signal that sees requests while no pod runs wakes it",
        id="zero-gateway-rate-zero-stays-at-zero",
    ),
    pytest.param(
        # The gateway sees requests (answered with errors: no pod behind it); no server has
        # measured a service time: wake to minReplicas, the next loops size from there.
        Signals(arrival_rate=0.5),
        0,
        0,
        spec(min_replicas=2, scale_to_zero={"idle_window": "60s"}),
        (),
        None,
        2,
        "up",
        "arrival rate 0.5; waking to 2",
        id="zero-gateway-arrivals-wake-to-min-replicas",
    ),
    pytest.param(
        Signals(source_unavailable=True, error="connection refused"),
        0,
        0,
        spec(scale_to_zero={"idle_window": "60s"}),
        (),
        None,
        0,
        "hold",
        "connection refused",
        id="zero-source-down-holds-at-zero",
    ),
    pytest.param(
        Signals(source_unavailable=True, error="connection refused"),
        0,
        0,
        spec(
            scale_to_zero={"idle_window": "60s"},
            on_missing_metrics="fallback",
            fallback_replicas=3,
        ),
        (),
        None,
        3,
        "up",
        "fallback to 3",
        id="zero-source-down-fallback-wakes",
    ),
    pytest.param(
        # Zero replicas without scaleToZero (spec.replicas 0, say): minReplicas is the floor.
        Signals(),
        0,
        0,
        spec(),
        (),
        None,
        1,
        "up",
        "no data",
        id="zero-without-scale-to-zero-comes-to-min-replicas",
    ),
    pytest.param(
        sig(arrival_rate=20.0, running=20.0),
        3,
        3,
        spec(scale_up_stabilization="30s"),
        hist((20, 3)),
        None,
        3,
        "hold",
        "",
        id="scale-up-stabilization-waits",
    ),
    pytest.param(
        sig(arrival_rate=5.0, running=5.0),
        25,
        25,
        spec(),
        hist((120, 1)),
        None,
        13,
        "down",
        "maxScaleDown",
        id="above-max-comes-down-rate-limited",
    ),
    pytest.param(
        # No history yet: above maxReplicas still comes to the bound at once, but no lower.
        sig(arrival_rate=5.0, running=5.0),
        25,
        25,
        spec(),
        (),
        None,
        20,
        "down",
        "window has 0s of recommendations",
        id="above-max-without-history-comes-to-the-bound",
    ),
    pytest.param(
        # The first loop after autoscaling starts: one quiet reading does not cut replicas.
        sig(arrival_rate=0.0, running=0.0),
        2,
        2,
        spec(),
        (),
        None,
        2,
        "hold",
        "window has 0s of recommendations yet",
        id="first-loop-never-scales-down",
    ),
    pytest.param(
        # 60 s of 1s in a 120 s window: the 2 replicas found stand for the rest of it.
        sig(arrival_rate=5.0, running=5.0),
        2,
        2,
        spec(),
        hist((60, 1), (45, 1), (30, 1), (15, 1)),
        None,
        2,
        "hold",
        "held at 2: the stabilization window has 60s of recommendations yet",
        id="down-waits-until-history-spans-window",
    ),
    pytest.param(
        sig(arrival_rate=5.0, running=5.0),
        2,
        2,
        spec(),
        hist((120, 1), (60, 1), (15, 1)),
        None,
        1,
        "down",
        "",
        id="down-once-history-spans-window",
    ),
    pytest.param(
        # The operator was down (or autoscaling off) for 15 minutes: the 1s from before say
        # nothing about the load since; the window starts again.
        sig(arrival_rate=5.0, running=5.0),
        2,
        2,
        spec(),
        hist((930, 1), (915, 1), (900, 1)),
        None,
        2,
        "hold",
        "held at 2: the stabilization window has 0s of recommendations yet",
        id="history-from-before-an-outage-is-no-window",
    ),
    pytest.param(
        # No data for over 2 minutes (nothing recorded), then 100 s of readings again.
        sig(arrival_rate=5.0, running=5.0),
        2,
        2,
        spec(),
        hist((400, 1), (385, 1), (100, 1), (85, 1), (70, 1), (55, 1), (40, 1), (25, 1), (10, 1)),
        None,
        2,
        "hold",
        "held at 2: the stabilization window has 100s of recommendations yet",
        id="a-gap-in-the-history-restarts-the-window",
    ),
    pytest.param(
        # Loop 5 s, scrape 15 s: the loop 5 s ago read this same scrape of 40. Growth is
        # measured against the reading 15 s back (0): 40 / (15 / 2) = 5.33/s, so arrivals are
        # 8 running / 1 s + 5.33 = 13.33/s, not 8 + 0 (same scrape) nor 8 + 40 / 2.5.
        sig(queue_depth=40.0, running=8.0, arrival_rate=4.0, p99_latency=1.0),
        1,
        1,
        spec(interval="5s"),
        (
            Recommendation(NOW - 15, 1, 0.0),
            Recommendation(NOW - 10, 1, 0.0),
            Recommendation(NOW - 5, 1, 40.0),
        ),
        None,
        5,
        "up",
        "arrivals 13.33 req/s from the queue's growth",
        id="fast-loop-measures-growth-one-scrape-back",
    ),
    pytest.param(
        # Scaled up 5 s ago on this scrape; those replicas still start: wait for the next one.
        sig(queue_depth=40.0, running=8.0, arrival_rate=4.0, p99_latency=1.0),
        5,
        1,
        spec(interval="5s"),
        (
            Recommendation(NOW - 15, 1, 0.0),
            Recommendation(NOW - 10, 1, 0.0),
            Recommendation(NOW - 5, 1, 40.0),
        ),
        NOW - 5,
        5,
        "hold",
        "no scale-up: replicas added 5s ago",
        id="fast-loop-waits-for-a-fresh-scrape-after-scale-up",
    ),
    pytest.param(
        # 15 s after that scale-up the reading is a new scrape: the queue kept growing.
        sig(queue_depth=160.0, running=8.0, arrival_rate=10.0, p99_latency=5.0),
        5,
        1,
        spec(interval="5s"),
        (
            Recommendation(NOW - 15, 1, 40.0),
            Recommendation(NOW - 10, 1, 40.0),
            Recommendation(NOW - 5, 1, 40.0),
        ),
        NOW - 15,
        10,
        "up",
        "arrivals 16.00 req/s from the queue's growth",
        id="fast-loop-scales-up-again-on-the-next-scrape",
    ),
    pytest.param(
        # A 15 s loop reads a new scrape every loop: it never waits after a scale-up.
        sig(queue_depth=160.0, running=8.0, arrival_rate=10.0, p99_latency=5.0),
        5,
        1,
        spec(),
        (Recommendation(NOW - 15, 1, 40.0),),
        NOW - 15,
        10,
        "up",
        "",
        id="loop-as-slow-as-the-scrape-never-waits",
    ),
]


@pytest.mark.parametrize(
    ("signals", "current", "ready", "aspec", "history", "last_up", "want", "action", "reason"),
    CASES,
)
def test_decide_replicas(
    signals: Signals,
    current: int,
    ready: int,
    aspec: AutoscalingSpec,
    history: tuple[Recommendation, ...],
    last_up: float | None,
    want: int,
    action: str,
    reason: str,
) -> None:
    decision = decide_replicas(
        AutoscalingInput(signals, current, ready, aspec, SLO, NOW, history, last_up)
    )
    assert (decision.desired_replicas, decision.action) == (want, action), decision.reason
    assert reason in decision.reason
    assert aspec.min_replicas <= decision.desired_replicas or decision.desired_replicas == 0
    assert decision.desired_replicas <= max(aspec.max_replicas, 0)


def test_history_is_pruned_and_carries_queue() -> None:
    # A 120 s window: what is older goes, but for the newest one before it, which says the
    # history spans the window.
    old = hist((10_000, 9), (5_000, 8), (20, 3))
    d = decide_replicas(AutoscalingInput(sig(queue_depth=0.0), 3, 3, spec(), SLO, NOW, old))
    assert [r.time for r in d.history] == [NOW - 5_000, NOW - 20, NOW]
    assert d.history[-1].queue_depth == 0.0
    assert d.inputs["arrivalRate"] == 5.0 and d.inputs["neededConcurrency"] == 5.0


def test_history_keeps_what_the_load_needs_not_the_backlog() -> None:
    # 20 req/s x 1 s needs 4 replicas; the 400 queued add 4 more for a while. The window
    # must remember 4, or it would hold the backlog's replicas for the whole window.
    d = decide_replicas(
        AutoscalingInput(
            sig(arrival_rate=20.0, running=24.0, queue_depth=400.0), 3, 3, spec(), SLO, NOW
        )
    )
    assert d.recommendation == 8 and d.desired_replicas == 8
    assert d.history[-1].replicas == 4 and d.history[-1].queue_depth == 400.0


QUIET = sig(arrival_rate=0.0, running=0.0, service_time=None, p99_latency=None)
LOW = sig(arrival_rate=1.0, running=1.0)


@pytest.mark.parametrize(
    ("autoscaling", "signals", "start", "want", "after", "by"),
    [
        # The first loop's reading stands for the loop before it: each window closes one loop
        # after the first loop at the earliest.
        pytest.param(
            {"interval": "5s", "scaleDownStabilization": "1h"},
            LOW,
            6,
            3,
            3595,
            3700,
            id="1h-window-5s-loop-scales-down",
        ),
        pytest.param(
            {"interval": "1s", "scaleDownStabilization": "600s"},
            LOW,
            6,
            3,
            599,
            640,
            id="600s-window-1s-loop-scales-down",
        ),
        pytest.param(
            # 15 s loops; the first loop's reading stands for the loop before it.
            {"scaleToZero": {"idleWindow": "10m"}},
            QUIET,
            1,
            0,
            585,
            660,
            id="scale-to-zero-10m-idle-default-interval",
        ),
        pytest.param(
            {"interval": "5s", "scaleToZero": {"idleWindow": "1h"}},
            QUIET,
            1,
            0,
            3595,
            3700,
            id="scale-to-zero-1h-idle-5s-loop",
        ),
    ],
)
def test_status_history_spans_long_windows(
    autoscaling: dict[str, Any], signals: Signals, start: int, want: int, after: int, by: int
) -> None:
    """Loop after loop through status alone (decide_replicas, build_autoscaling_status, and
    back through history_from_status), as the operator does: the first scale-down comes once
    the history spans the window, not never, and status stays small."""
    aspec = AutoscalingSpec.model_validate({"minReplicas": 1, "maxReplicas": 10, **autoscaling})
    step = aspec.seconds().interval
    previous, current, t0 = AutoscalingStatus(), start, 1_700_000_000.0
    longest = 0
    for i in range(int(by / step) + 1):
        now = t0 + i * step
        d = decide_replicas(
            AutoscalingInput(
                signals, current, current, aspec, SLO, now, history_from_status(previous)
            )
        )
        scaled = d.desired_replicas != current
        status = build_autoscaling_status(aspec, d, {}, current, current, now, previous, scaled)
        longest = max(longest, len(status["recommendations"]))
        previous = AutoscalingStatus.model_validate(status)
        if scaled:
            assert (d.desired_replicas, d.action) == (want, "down"), d.reason
            assert after <= now - t0 <= by, d.reason
            break
    else:
        pytest.fail(f"never scaled in {by}s: {d.reason}")
    assert longest <= 200


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15s", 15.0), ("1m30s", 90.0), ("250ms", 0.25), ("2h", 7200.0), ("0s", 0.0)],
)
def test_duration_seconds(text: str, seconds: float) -> None:
    assert duration_seconds(text) == seconds


def test_duration_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        duration_seconds("15 s")


def _mdep(autoscaling: dict[str, Any], slo: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"image": "x:1", "autoscaling": autoscaling}
    if slo is not False:
        spec["slo"] = slo or {"p99LatencyMs": 500}
    return {
        "apiVersion": "trimtab.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m"},
        "spec": spec,
    }


@pytest.mark.parametrize(
    ("autoscaling", "message"),
    [
        pytest.param(
            {"minReplicas": 5, "maxReplicas": 2}, "minReplicas must not exceed", id="min>max"
        ),
        pytest.param(
            {"onMissingMetrics": "fallback"}, "needs fallbackReplicas", id="fallback-no-n"
        ),
        pytest.param({"fallbackReplicas": 2}, "applies only when", id="n-without-fallback"),
        pytest.param(
            {"onMissingMetrics": "fallback", "fallbackReplicas": 50, "maxReplicas": 10},
            "within minReplicas..maxReplicas",
            id="fallback-out-of-bounds",
        ),
        pytest.param({"interval": "500ms"}, "between 1s and 10m", id="interval-too-short"),
        pytest.param({"scaleDownStabilization": "2h"}, "at most 1h", id="window-too-long"),
        pytest.param({"scaleToZero": {"idleWindow": "5s"}}, "at least 30s", id="idle-too-short"),
    ],
)
def test_cel_rejects_nonsense(autoscaling: dict[str, Any], message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        validate_custom(_mdep(autoscaling), CRD)


@pytest.mark.parametrize(
    ("queries", "ok"),
    [
        pytest.param(None, False, id="preset-only-would-never-wake"),
        pytest.param({"p99Latency": "max(x)"}, False, id="other-override-does-not-wake"),
        pytest.param({"arrivalRate": "sum(rate(gw_requests_total[1m]))"}, True, id="gateway-rate"),
        pytest.param({"queueDepth": "sum(gw_pending)"}, True, id="gateway-queue"),
    ],
)
def test_scale_to_zero_needs_a_signal_that_sees_requests_at_zero(
    queries: dict[str, str] | None, ok: bool
) -> None:
    obj = _mdep({"scaleToZero": {"idleWindow": "10m"}})
    if queries is not None:
        obj["spec"]["metrics"] = {"queries": queries}
    if ok:
        validate_custom(obj, CRD)
    else:
        with pytest.raises(AssertionError, match="scaleToZero needs metrics.queries"):
            validate_custom(obj, CRD)


@pytest.mark.parametrize(
    ("metrics", "ok"),
    [
        pytest.param({}, True, id="defaults-1m-over-15s"),
        pytest.param({"rateWindow": "1m", "scrapeInterval": "15s"}, True, id="exactly-4"),
        pytest.param({"rateWindow": "30s"}, False, id="2-default-scrapes"),
        pytest.param({"scrapeInterval": "30s"}, False, id="default-window-over-slower-scrapes"),
        pytest.param({"scrapeInterval": "30s", "rateWindow": "2m"}, True, id="window-raised-too"),
        pytest.param({"rateWindow": "2s", "scrapeInterval": "500ms"}, True, id="milliseconds"),
        pytest.param({"rateWindow": "1999ms", "scrapeInterval": "500ms"}, False,
                     id="a-millisecond-short"),
        pytest.param({"rateWindow": "1h", "scrapeInterval": "15m"}, True, id="hours"),
    ],
)  # fmt: skip
def test_rate_window_holds_at_least_four_scrapes(metrics: dict[str, Any], ok: bool) -> None:
    obj = _mdep({"maxReplicas": 3})
    obj["spec"]["metrics"] = metrics
    if ok:
        validate_custom(obj, CRD)
    else:
        with pytest.raises(AssertionError, match="rateWindow must be at least 4 x"):
            validate_custom(obj, CRD)


def test_autoscaling_needs_slo() -> None:
    obj = _mdep({"maxReplicas": 3})
    del obj["spec"]["slo"]
    with pytest.raises(AssertionError, match="autoscaling needs slo"):
        validate_custom(obj, CRD)


def test_sensible_spec_passes_and_crd_is_current() -> None:
    sensible = _mdep(
        {
            "minReplicas": 2,
            "maxReplicas": 8,
            "onMissingMetrics": "fallback",
            "fallbackReplicas": 4,
            "scaleToZero": {"idleWindow": "15m"},
        },
        {"p99LatencyMs": 800, "latency": "ttft", "maxErrorRate": 0.01},
    )
    sensible["spec"]["metrics"] = {"queries": {"arrivalRate": "sum(rate(gw_total[1m]))"}}
    validate_custom(sensible, CRD)
    schema = model_schema(MODELDEPLOYMENT_CRD.spec_model)
    assert "autoscaling" in schema["properties"] and "metrics" in schema["properties"]
    assert not list(
        cel_failures(
            schema["properties"]["autoscaling"],
            {
                "minReplicas": 1,
                "maxReplicas": 1,
                "interval": "15s",
                "scaleUpStabilization": "0s",
                "scaleDownStabilization": "300s",
                "coldStart": "60s",
                "onMissingMetrics": "hold",
            },
        )
    )


def test_policy_fields_are_not_part_of_the_revision() -> None:
    a = ModelDeploymentSpec.model_validate({"image": "x:1"})
    b = ModelDeploymentSpec.model_validate(
        {
            "image": "x:1",
            "slo": {"p99LatencyMs": 100},
            "autoscaling": {"maxReplicas": 4},
            "metrics": {"prometheusUrl": "http://prom:9090", "queries": {"queueDepth": "sum(q)"}},
        }
    )
    assert a.model_part() == b.model_part()


# status.autoscaling as last written: holding 2 replicas, every signal read.
WRITTEN_AT = parse_rfc3339("2025-01-01T00:00:00.000Z")
WRITTEN: dict[str, Any] = {
    "desiredReplicas": 2,
    "currentReplicas": 2,
    "readyReplicas": 2,
    "action": "hold",
    "reason": "demand 9.6 concurrent (4.80 req/s x 2.00s) / 8.0 per replica = 2",
    "signals": [
        {"name": "arrivalRate", "state": "value", "value": 4.8},
        {"name": "queueDepth", "state": "value", "value": 0},
    ],
    "recommendations": [{"time": rfc3339(WRITTEN_AT), "replicas": 2}],
    "lastDecisionTime": rfc3339(WRITTEN_AT),
    "lastScaleTime": "2024-12-31T23:50:00.000Z",
    "lastScaleUpTime": "2024-12-31T23:50:00.000Z",
}


def built(after: float = 5.0, **changes: Any) -> dict[str, Any]:
    """This loop's status.autoscaling, `after` seconds on: the same decision with new numbers
    unless `changes` say otherwise."""
    now = WRITTEN_AT + after
    out: dict[str, Any] = {
        **WRITTEN,
        "reason": "demand 10.1 concurrent (5.05 req/s x 2.00s) / 8.0 per replica = 2",
        "signals": [
            {"name": "arrivalRate", "state": "value", "value": 5.05},
            {"name": "queueDepth", "state": "value", "value": 1},
        ],
        "recommendations": [*WRITTEN["recommendations"], {"time": rfc3339(now), "replicas": 2}],
        "lastDecisionTime": rfc3339(now),
    }
    return {**out, **changes}


WRITE_CASES = [
    pytest.param(WRITTEN, built(), {}, None, id="steady-new-values-wait"),
    pytest.param(WRITTEN, built(after=29.9), {}, None, id="steady-just-inside-refresh-waits"),
    pytest.param(WRITTEN, built(after=30.0), {}, "refresh", id="steady-refresh-period-writes"),
    pytest.param({}, built(), {}, "first decision", id="nothing-written-yet"),
    pytest.param(WRITTEN, built(), {"scaled": True}, "scaled", id="split-changed-same-total"),
    pytest.param(
        WRITTEN,
        built(desiredReplicas=3, currentReplicas=3, action="up"),
        {"scaled": True},
        "scaled",
        id="scaled-up",
    ),
    pytest.param(
        WRITTEN, built(desiredReplicas=3, action="up"), {}, "desiredReplicas", id="desired-moved"
    ),
    pytest.param(WRITTEN, built(action="down"), {}, "action changed", id="action-moved"),
    pytest.param(WRITTEN, built(readyReplicas=1), {}, "readyReplicas", id="a-replica-went-unready"),
    pytest.param(
        WRITTEN,
        built(reason="held at 2, the highest recommendation in the stabilization window"),
        {},
        "reason changed",
        id="reason-says-something-else",
    ),
    pytest.param(
        WRITTEN,
        built(
            signals=[
                {"name": "arrivalRate", "state": "value", "value": 5.05},
                {"name": "queueDepth", "state": "noData", "message": "no series matched"},
            ]
        ),
        {},
        "signal state changed: queueDepth",
        id="signal-lost-its-data",
    ),
    pytest.param(
        WRITTEN,
        built(signals=[{"name": "arrivalRate", "state": "value", "value": 5.05}]),
        {},
        "signal state changed: queueDepth",
        id="signal-no-longer-queried",
    ),
    pytest.param(
        WRITTEN, built(), {"conditions_changed": True}, "condition changed", id="metrics-went-away"
    ),
    pytest.param(
        WRITTEN,
        built(lastScaleTime=rfc3339(WRITTEN_AT + 5)),
        {},
        "lastScaleTime changed",
        id="scale-timestamp-moved",
    ),
    pytest.param(
        {**WRITTEN, "lastDecisionTime": rfc3339(WRITTEN_AT + 600)},
        built(),
        {},
        "refresh",
        id="written-by-a-clock-ahead-of-ours",
    ),
]


@pytest.mark.parametrize(("written", "this_loop", "flags", "expected"), WRITE_CASES)
def test_status_write_due(
    written: dict[str, Any], this_loop: dict[str, Any], flags: dict[str, bool], expected: str | None
) -> None:
    """Each case: what is written, what this loop built, and why it is written now (a fragment
    of the answer), or None when it can wait for the refresh."""
    now = parse_rfc3339(this_loop["lastDecisionTime"])
    why = status_write_due(
        written,
        this_loop,
        scaled=flags.get("scaled", False),
        conditions_changed=flags.get("conditions_changed", False),
        now=now,
        refresh_seconds=30.0,
    )
    if expected is None:
        assert why is None
    else:
        assert why is not None and expected in why, why


@pytest.mark.parametrize(
    ("scrape", "action", "reason"),
    [
        # A 1 s scrape: the reading one loop back is another scrape, with no queue: the queue
        # grew by 200 in (on average) half a second, and that is demand now.
        pytest.param(1.0, "up", "from the queue's growth", id="1s-scrape-growth-since-last-loop"),
        # Taken for a 15 s scrape, the last two loops may be copies of one scrape: growth is
        # measured 15 s back, where the queue of an earlier burst stood as high as now.
        pytest.param(15.0, "hold", "", id="15s-scrape-growth-one-scrape-back"),
    ],
)
def test_scrape_interval_sets_how_far_back_growth_is_measured(
    scrape: float, action: str, reason: str
) -> None:
    history = (
        Recommendation(NOW - 16, 1, 200.0),
        Recommendation(NOW - 2, 1, 0.0),
        Recommendation(NOW - 1, 1, 0.0),
    )
    decision = decide_replicas(
        AutoscalingInput(
            sig(queue_depth=200.0, running=2.0, arrival_rate=2.0, service_time=1.0),
            1,
            1,
            spec(interval="1s"),
            SLO,
            NOW,
            history,
            scrape_interval=scrape,
        )
    )
    assert decision.action == action, decision.reason
    assert reason in decision.reason


@pytest.mark.parametrize(
    ("autoscaling", "before", "after", "start", "within"),
    [
        pytest.param(
            {"scaleUpStabilization": "180s"},
            sig(arrival_rate=6.0, running=6.0, queue_depth=0.0),
            sig(arrival_rate=30.0, running=30.0, queue_depth=0.0),
            1,
            (180, 195),
            id="scale-up-window-180s",
        ),
        pytest.param(
            {"scaleDownStabilization": "300s"},
            sig(arrival_rate=30.0, running=30.0, queue_depth=0.0),
            sig(arrival_rate=6.0, running=6.0, queue_depth=0.0),
            5,
            (300, 315),
            id="scale-down-window-300s",
        ),
    ],
)
def test_a_long_idle_window_leaves_the_scaling_windows_sharp(
    autoscaling: dict[str, Any],
    before: Signals,
    after: Signals,
    start: int,
    within: tuple[float, float],
) -> None:
    """With a 24 h idle window the history reaches back a day, merged into buckets that widen
    with age; the 180 s and 300 s windows still close within a loop of their length, and the
    history stays small (15 s loops for 25 hours, then the change)."""
    aspec = AutoscalingSpec.model_validate(
        {"minReplicas": 1, "maxReplicas": 20, "scaleToZero": {"idleWindow": "24h"}, **autoscaling}
    )
    step = aspec.seconds().interval
    history: tuple[Any, ...] = ()
    current, change_at, longest = start, 25 * 3600.0 + 37, 0
    t = 0.0
    while t < change_at + 600:
        signals = before if t < change_at else after
        d = decide_replicas(AutoscalingInput(signals, current, current, aspec, SLO, t, history))
        history = d.history
        longest = max(longest, len(history))
        if d.desired_replicas != current:
            assert t >= change_at, d.reason
            assert within[0] <= t - change_at <= within[1], d.reason
            break
        t += step
    else:
        pytest.fail(f"never scaled: {d.reason}")
    assert longest <= 200


@pytest.mark.parametrize(
    ("low_ago", "want"),
    [
        pytest.param(600, 2, id="low-reading-merged-in-an-old-bucket-holds"),
        pytest.param(None, 8, id="no-low-reading-scales-up"),  # 10, limited by maxScaleUpRate
    ],
)
def test_scale_up_window_reads_a_merged_buckets_lowest(low_ago: float | None, want: int) -> None:
    """A 15m scale-up window at a 15 s loop: one low recommendation 10 minutes back has been
    merged into a bucket with higher ones; the bucket's lowest still holds the scale-up (the
    window's lowest recommendation is 2), where its highest would let it through."""
    aspec = spec(scale_up_stabilization="15m")
    history: tuple[Recommendation, ...] = ()
    for ago in range(900, 0, -15):
        t = NOW - ago
        n = 2 if low_ago is not None and ago == low_ago else 10
        history = compact_history((*history, Recommendation(t, n, 0.0)), t, 15.0)
    assert len(history) < 60  # old loops were merged
    d = decide_replicas(
        AutoscalingInput(sig(arrival_rate=64.0, running=64.0), 2, 2, aspec, SLO, NOW, history)
    )
    assert d.recommendation == 10
    assert d.desired_replicas == want, d.reason
