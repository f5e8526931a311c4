"""The discrete-event simulator: model-server replicas with a fixed number of request slots,
a shared queue, cold starts, and a Prometheus scrape path, driven by a trace and one policy.

Time is simulated seconds; a run is deterministic for a given trace, policy and seed."""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from trimtab.simulate.prometheus import (
    VLLM_LATENCY_BUCKETS,
    VLLM_TTFT_BUCKETS,
    PrometheusView,
    Sample,
)
from trimtab.simulate.traces import Trace


@dataclass(frozen=True)
class ServerModel:
    """One replica of the model server. A request's service time is its prompt at the prefill
    rate plus its output at the per-request decode rate (continuous batching keeps each
    request's decode rate while fewer than `max_concurrency` run); more requests wait."""

    prefill_tokens_per_s: float = 8000.0
    decode_tokens_per_s: float = 40.0
    max_concurrency: int = 8
    cold_start: float = 60.0  # scale-up to ready: pod start, image and weights loaded
    service_noise: float = 0.15  # lognormal sigma of per-request service-time jitter

    def service_time(self, prompt_tokens: int, output_tokens: int) -> float:
        return prompt_tokens / self.prefill_tokens_per_s + output_tokens / self.decode_tokens_per_s


def draw_jitter(trace: Trace, server: ServerModel, seed: int) -> list[float]:
    """Each request's seeded service-time factor (mean 1); the same for every policy."""
    rng = random.Random(f"service-{seed}")
    sigma = server.service_noise
    if sigma <= 0:
        return [1.0] * len(trace.requests)
    return [math.exp(rng.gauss(-sigma * sigma / 2, sigma)) for _ in trace.requests]


def draw_service_times(trace: Trace, server: ServerModel, seed: int) -> list[float]:
    """Each request's service time with the seeded jitter; the same for every policy."""
    return [
        server.service_time(r.prompt_tokens, r.output_tokens) * j
        for r, j in zip(trace.requests, draw_jitter(trace, server, seed), strict=True)
    ]


@dataclass(frozen=True)
class MetricsPath:
    scrape_interval: float = 15.0
    rate_window: float = 60.0
    latency: str = "e2e"  # which latency the histogram (and the SLO) measures: e2e or ttft

    @property
    def buckets(self) -> tuple[float, ...]:
        return VLLM_LATENCY_BUCKETS if self.latency == "e2e" else VLLM_TTFT_BUCKETS


class Replica:
    """One replica's state and its two busy counters: seconds with at least one request in
    flight (engine busy), and slot-seconds (the integral of requests in flight)."""

    __slots__ = (
        "id",
        "state",
        "busy",
        "created",
        "busy_seconds",
        "busy_since",
        "slot_seconds",
        "slot_mark",
    )

    def __init__(self, rid: int, state: str, created: float) -> None:
        self.id = rid
        self.state = state  # "starting", "ready" or "draining"
        self.busy = 0
        self.created = created
        self.busy_seconds = 0.0
        self.busy_since = 0.0
        self.slot_seconds = 0.0
        self.slot_mark = created

    def busy_until(self, now: float) -> float:
        return self.busy_seconds + (now - self.busy_since if self.busy else 0.0)

    def slots_until(self, now: float) -> float:
        return self.slot_seconds + self.busy * (now - self.slot_mark)

    def set_busy(self, now: float, busy: int) -> None:
        """Change the requests in flight, keeping both counters exact."""
        self.slot_seconds += self.busy * (now - self.slot_mark)
        self.slot_mark = now
        if self.busy == 0 and busy > 0:
            self.busy_since = now
        elif self.busy > 0 and busy == 0:
            self.busy_seconds += now - self.busy_since
        self.busy = busy


@dataclass(frozen=True)
class Decision:
    """What a policy decided at one tick, with its reason when it gives one."""

    time: float
    replicas: int
    reason: str = ""


class Cluster(Protocol):
    """What a policy may look at: the scraped metrics, the replica counts a controller reads
    from the API server, and the servers' own in-flight counts (Knative's queue-proxy)."""

    prometheus: PrometheusView
    server: ServerModel

    @property
    def replicas(self) -> int: ...

    @property
    def ready(self) -> int: ...

    def in_flight(self) -> int: ...


class Policy(Protocol):
    name: str
    interval: float  # seconds between ticks

    def decide(self, now: float, cluster: Cluster) -> Decision | None:
        """The replicas wanted now, or None to leave them."""
        ...


@dataclass
class TimelinePoint:
    time: float
    replicas: int  # asked for (starting + ready)
    ready: int
    waiting: int
    running: int


@dataclass
class RunResult:
    policy: str
    trace: str
    horizon: float
    latencies: list[tuple[float, float]]  # (arrival, latency the SLO measures) per request
    replica_seconds: float
    scale_actions: int
    timeline: list[TimelinePoint]
    decisions: list[Decision]
    slo_s: float


@dataclass
class Simulation:
    """Replays `trace` against `policy`. Requests go to the ready replica with the fewest in
    flight (a least-request load balancer); when every slot is taken they wait in one queue.
    Removing a replica takes the starting ones first, then idle ready ones, then drains busy
    ones (they finish what they serve and take nothing new). Cost counts every replica that
    exists, starting and draining ones included, up to the horizon."""

    trace: Trace
    policy: Policy
    server: ServerModel = field(default_factory=ServerModel)
    metrics: MetricsPath = field(default_factory=MetricsPath)
    initial_replicas: int = 1
    seed: int = 0
    slo_s: float = 10.0
    timeline_step: float = 5.0
    tail: float = 60.0  # horizon = last arrival + tail

    def __post_init__(self) -> None:
        self.prometheus = PrometheusView(
            self.metrics.scrape_interval, self.metrics.rate_window, self.metrics.buckets
        )
        self._replicas: dict[int, Replica] = {}
        self._next_id = 0
        self._queue: deque[tuple[float, float, float]] = deque()  # (arrival, service, prefill)
        self._events: list[tuple[float, int, int, int, float, float, float]] = []
        self._seq = 0
        self._arrivals = 0
        self._completed = 0
        self._bucket_counts = [0] * (len(self.metrics.buckets) + 1)
        self._e2e = self.metrics.latency == "e2e"
        self._service_sum = 0.0
        self._running = 0
        self._cost = 0.0
        self._cost_mark = 0.0
        self._alive = 0
        self._scale_actions = 0
        self._latencies: list[tuple[float, float]] = []

    # --- the view policies get -------------------------------------------------------------
    @property
    def replicas(self) -> int:
        return sum(1 for r in self._replicas.values() if r.state != "draining")

    @property
    def ready(self) -> int:
        return sum(1 for r in self._replicas.values() if r.state == "ready")

    def in_flight(self) -> int:
        return self._running + len(self._queue)

    # --- bookkeeping ------------------------------------------------------------------------
    def _push(
        self, time: float, kind: int, arg: int = 0, a: float = 0.0, b: float = 0.0, c: float = 0.0
    ) -> None:
        self._seq += 1
        heapq.heappush(self._events, (time, kind, self._seq, arg, a, b, c))

    def _account(self, now: float) -> None:
        end = min(now, self.horizon)
        if end > self._cost_mark:
            self._cost += self._alive * (end - self._cost_mark)
            self._cost_mark = end

    def _add_replica(self, now: float, ready: bool) -> None:
        self._account(now)
        rid = self._next_id
        self._next_id += 1
        self._replicas[rid] = Replica(rid, "ready" if ready else "starting", now)
        self._alive += 1
        if not ready:
            self._push(now + self.server.cold_start, _READY, rid)

    def _remove(self, now: float, replica: Replica) -> None:
        self._account(now)
        del self._replicas[replica.id]
        self._alive -= 1

    def scale_to(self, now: float, wanted: int) -> None:
        current = [r for r in self._replicas.values() if r.state != "draining"]
        if wanted == len(current):
            return
        self._scale_actions += 1
        if wanted > len(current):
            for _ in range(wanted - len(current)):
                self._add_replica(now, ready=False)
            return
        surplus = len(current) - wanted
        # Newest starting replicas first, then idle ready ones, then the least busy.
        order = sorted(current, key=lambda r: (r.state != "starting", r.busy, -r.created))
        for replica in order[:surplus]:
            if replica.state == "starting" or replica.busy == 0:
                self._remove(now, replica)
            else:
                replica.state = "draining"

    def _start(
        self, now: float, replica: Replica, arrival: float, service: float, prefill: float
    ) -> None:
        replica.set_busy(now, replica.busy + 1)
        self._running += 1
        measured = service if self._e2e else prefill
        self._push(now + service, _FINISH, replica.id, arrival, service, now - arrival + measured)
        if not self._e2e:
            # vLLM observes time-to-first-token when the first token is out, not at the end.
            self._push(now + prefill, _FIRST_TOKEN, 0, now - arrival + prefill)

    def _dispatch(self, now: float) -> None:
        while self._queue:
            best: Replica | None = None
            for r in self._replicas.values():
                if (
                    r.state == "ready"
                    and r.busy < self.server.max_concurrency
                    and (best is None or r.busy < best.busy)
                ):
                    best = r
            if best is None:
                return
            arrival, service, prefill = self._queue.popleft()
            self._start(now, best, arrival, service, prefill)

    def _finish(self, now: float, rid: int, arrival: float, service: float, latency: float) -> None:
        replica = self._replicas[rid]
        replica.set_busy(now, replica.busy - 1)
        self._running -= 1
        self._completed += 1
        self._service_sum += service
        self._latencies.append((arrival, latency))
        if self._e2e:
            self._observe(latency)
        if replica.state == "draining" and replica.busy == 0:
            self._remove(now, replica)

    def _observe(self, latency: float) -> None:
        i = 0
        bounds = self.metrics.buckets
        while i < len(bounds) and latency > bounds[i]:
            i += 1
        self._bucket_counts[i] += 1

    def _scrape(self, now: float) -> None:
        cumulative = []
        total = 0
        for c in self._bucket_counts:
            total += c
            cumulative.append(float(total))
        self.prometheus.add(
            Sample(
                time=now,
                arrivals=float(self._arrivals),
                completed=float(self._completed),
                buckets=tuple(cumulative),
                service_sum=self._service_sum,
                waiting=float(len(self._queue)),
                running=float(self._running),
                busy={
                    r.id: r.busy_until(now) for r in self._replicas.values() if r.state == "ready"
                },
                slot_busy={
                    r.id: r.slots_until(now) / self.server.max_concurrency
                    for r in self._replicas.values()
                    if r.state == "ready"
                },
            )
        )

    # --- the run ----------------------------------------------------------------------------
    def run(self) -> RunResult:
        rng = random.Random(self.seed)
        requests = self.trace.requests
        jitter = draw_jitter(self.trace, self.server, self.seed)
        server = self.server
        services = [
            server.service_time(r.prompt_tokens, r.output_tokens) * j
            for r, j in zip(requests, jitter, strict=True)
        ]
        prefills = [
            r.prompt_tokens / server.prefill_tokens_per_s * j
            for r, j in zip(requests, jitter, strict=True)
        ]
        self.horizon = self.trace.duration + self.tail
        for _ in range(self.initial_replicas):
            self._add_replica(0.0, ready=True)
        # Random phases: a scrape or a control loop has no reason to align with the trace.
        self._push(rng.uniform(0, self.metrics.scrape_interval), _SCRAPE)
        self._push(rng.uniform(0, self.policy.interval), _TICK)
        self._push(0.0, _SAMPLE)
        timeline: list[TimelinePoint] = []
        decisions: list[Decision] = []
        n = len(requests)
        nxt = 0
        limit = self.horizon + 3600.0
        now = 0.0
        while True:
            next_arrival = requests[nxt].arrival if nxt < n else math.inf
            if self._events and self._events[0][0] <= next_arrival:
                now, kind, _, arg, a, b, c = heapq.heappop(self._events)
            elif nxt < n:
                now, kind, arg, a, b, c = next_arrival, _ARRIVAL, nxt, 0.0, 0.0, 0.0
                nxt += 1
            else:
                break
            if now > limit:
                break
            if kind == _FINISH:
                self._finish(now, arg, a, b, c)
                self._dispatch(now)
            elif kind == _FIRST_TOKEN:
                self._observe(a)
            elif kind == _ARRIVAL:
                self._arrivals += 1
                self._queue.append((now, services[arg], prefills[arg]))
                self._dispatch(now)
            elif kind == _READY:
                replica = self._replicas.get(arg)
                if replica is not None and replica.state == "starting":
                    replica.state = "ready"
                    self._dispatch(now)
            elif kind == _SCRAPE:
                self._scrape(now)
                self._push(now + self.metrics.scrape_interval, _SCRAPE)
            elif kind == _TICK:
                decision = self.policy.decide(now, self)
                if decision is not None:
                    decisions.append(decision)
                    self.scale_to(now, decision.replicas)
                    self._dispatch(now)
                self._push(now + self.policy.interval, _TICK)
            elif kind == _SAMPLE:
                timeline.append(
                    TimelinePoint(now, self.replicas, self.ready, len(self._queue), self._running)
                )
                self._push(now + self.timeline_step, _SAMPLE)
            done = nxt >= n and self._running == 0 and not self._queue
            if done and now >= self.horizon:
                break
        self._account(self.horizon)
        latencies = self._latencies
        # Requests the run never finished (a policy that starved them) count as infinitely late.
        unfinished = n - len(latencies)
        if unfinished > 0:
            finished = {round(a, 9) for a, _ in latencies}
            latencies = (
                latencies
                + [(r.arrival, math.inf) for r in requests if round(r.arrival, 9) not in finished][
                    :unfinished
                ]
            )
        return RunResult(
            policy=self.policy.name,
            trace=self.trace.name,
            horizon=self.horizon,
            latencies=latencies,
            replica_seconds=self._cost,
            scale_actions=self._scale_actions,
            timeline=timeline,
            decisions=decisions,
            slo_s=self.slo_s,
        )


# Event kinds; at equal times a finish frees its slot before an arrival looks for one.
_FINISH, _FIRST_TOKEN, _READY, _ARRIVAL, _SCRAPE, _TICK, _SAMPLE = range(7)
