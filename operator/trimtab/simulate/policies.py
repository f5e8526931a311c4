"""The policies the simulator compares: trimtab's (through the operator's own
`decide_replicas`), the Kubernetes HPA on CPU, KEDA on queue depth, Knative's KPA, and an oracle.

Each baseline follows its project's algorithm and defaults; the docstrings name every parameter."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from trimtab.api.autoscaling import AutoscalingSpec, SLOSpec
from trimtab.decisions.autoscaling import (
    AutoscalingInput,
    Recommendation,
    Signals,
    decide_replicas,
)
from trimtab.simulate.engine import Cluster, Decision, ServerModel
from trimtab.simulate.traces import Trace


class TrimtabPolicy:
    """trimtab's control loop: every `autoscaling.interval` it reads the signals the vLLM
    preset queries from Prometheus (queue depth and running gauges, arrival rate and mean
    service time as rates over the rate window, p99 from the latency histogram) and applies
    `decide_replicas`, keeping the recommendation history as the operator keeps it in status.
    The simulated scrape counts arrivals and the queue even at zero replicas, as a gateway-level
    arrivalRate or queueDepth override would (what scale-to-zero needs to wake; the preset's
    own series are absent with no pod)."""

    name = "trimtab"

    def __init__(self, spec: AutoscalingSpec, slo: SLOSpec, scrape_interval: float = 15.0) -> None:
        self.spec = spec
        self.slo = slo
        self.scrape_interval = scrape_interval
        self.interval = spec.seconds().interval
        self.history: tuple[Recommendation, ...] = ()
        self.last_scale_up: float | None = None

    def signals(self, now: float, cluster: Cluster) -> Signals:
        prom = cluster.prometheus
        latest = prom.latest(now)
        return Signals(
            queue_depth=latest.waiting if latest else None,
            running=latest.running if latest else None,
            arrival_rate=prom.rate(now, "arrivals"),
            service_time=prom.mean_service_time(now),
            p99_latency=prom.quantile(now, 0.99),
            error_rate=0.0 if latest else None,
        )

    def decide(self, now: float, cluster: Cluster) -> Decision | None:
        decision = decide_replicas(
            AutoscalingInput(
                signals=self.signals(now, cluster),
                current_replicas=cluster.replicas,
                ready_replicas=cluster.ready,
                spec=self.spec,
                slo=self.slo,
                now=now,
                history=self.history,
                last_scale_up=self.last_scale_up,
                scrape_interval=self.scrape_interval,
            )
        )
        self.history = decision.history
        if decision.action == "up":
            self.last_scale_up = now
        return Decision(now, decision.desired_replicas, f"{decision.action}: {decision.reason}")


@dataclass
class HpaBehavior:
    """autoscaling/v2 behavior; the defaults are Kubernetes' own."""

    scale_up_stabilization: float = 0.0
    scale_down_stabilization: float = 300.0
    # scaleUp policies (selectPolicy Max): 100% or 4 pods per 15 s.
    scale_up_percent: float = 100.0
    scale_up_pods: int = 4
    scale_up_period: float = 15.0
    # scaleDown policy: 100% per 15 s.
    scale_down_percent: float = 100.0
    scale_down_period: float = 15.0


class _HpaAlgorithm:
    """The HPA controller's replica calculation (pkg/controller/podautoscaler): the usage
    ratio with a 10% tolerance, then one of its two paths. With a `behavior` block
    (normalizeDesiredReplicasWithBehaviors): stabilization windows over past recommendations
    and the behavior's rate limits over their periods. Without one (behavior None: what
    `kubectl autoscale` and KEDA without advanced.horizontalPodAutoscalerConfig create; the API
    server fills in a behavior's defaults only where a behavior block is given), the legacy
    normalizeDesiredReplicas: the highest recommendation of the last 300 s
    (--horizontal-pod-autoscaler-downscale-stabilization), and at most max(2 x current, 4)
    replicas (calculateScaleUpLimit) per sync."""

    tolerance = 0.1
    legacy_stabilization = 300.0

    def __init__(
        self, min_replicas: int, max_replicas: int, behavior: HpaBehavior | None
    ) -> None:
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.behavior = behavior
        self.recommendations: deque[tuple[float, int]] = deque()
        self.events: deque[tuple[float, int]] = deque()  # (time, replica change)
        self.seed: tuple[float, int] | None = None

    def start(self, now: float, replicas: int) -> None:
        """The controller's first look at its target (recordInitialRecommendation): the
        replicas it finds count as a recommendation made then, so it does not scale down
        within one scale-down window of starting. The simulator calls this on the first
        decision; tests call it earlier to model a controller that has been running."""
        self.seed = (now, replicas)

    def stabilize_and_limit(self, now: float, current: int, raw: int) -> int:
        if self.seed is None:
            self.start(now, current)
        if self.behavior is None:
            return self._legacy(now, current, raw)
        b = self.behavior
        self.recommendations.append((now, raw))
        keep = max(b.scale_up_stabilization, b.scale_down_stabilization)
        while self.recommendations and self.recommendations[0][0] < now - keep:
            self.recommendations.popleft()
        up_window = [r for t, r in self.recommendations if t >= now - b.scale_up_stabilization]
        down_window = [r for t, r in self.recommendations if t >= now - b.scale_down_stabilization]
        assert self.seed is not None
        if self.seed[0] >= now - b.scale_down_stabilization:
            down_window.append(self.seed[1])
        up_floor = min(up_window) if up_window else raw
        down_ceiling = max(down_window) if down_window else raw
        desired = current
        if desired < up_floor:
            desired = up_floor
        if desired > down_ceiling:
            desired = down_ceiling
        # Rate limits: replicas at the start of the period plus what the policy allows. As the
        # controller's getReplicasChangePerPeriod, only changes strictly after the cutoff count:
        # a change exactly one period ago is outside it.
        while self.events and self.events[0][0] <= now - max(
            b.scale_up_period, b.scale_down_period
        ):
            self.events.popleft()
        added = sum(d for t, d in self.events if d > 0 and t > now - b.scale_up_period)
        removed = -sum(d for t, d in self.events if d < 0 and t > now - b.scale_down_period)
        if desired > current:
            start = current - added
            limit = max(
                math.ceil(start * (1 + b.scale_up_percent / 100.0)), start + b.scale_up_pods
            )
            desired = min(desired, limit)
        elif desired < current:
            start = current + removed
            limit = start - math.ceil(start * b.scale_down_percent / 100.0)
            desired = max(desired, limit)
        desired = max(self.min_replicas, min(self.max_replicas, desired))
        if desired != current:
            self.events.append((now, desired - current))
        return desired

    def _legacy(self, now: float, current: int, raw: int) -> int:
        """normalizeDesiredReplicas: stabilizeRecommendation, then
        convertDesiredReplicasWithRules."""
        assert self.seed is not None
        cutoff = now - self.legacy_stabilization
        while self.recommendations and self.recommendations[0][0] < cutoff:
            self.recommendations.popleft()
        window = [r for _, r in self.recommendations]
        if self.seed[0] >= cutoff:
            window.append(self.seed[1])
        self.recommendations.append((now, raw))
        stabilized = max([raw, *window])
        up_limit = max(2 * current, 4)
        return max(self.min_replicas, min(self.max_replicas, up_limit, stabilized))


@dataclass(frozen=True)
class CpuModel:
    """How a model-server replica's CPU utilization (of its CPU request, as metrics-server
    reports it) follows its load: `idle_base` when idle, plus the rest in proportion to the
    busy share that `busy` names.

    - "slots" (the default): the share of the replica's request slots in use, i.e. requests in
      flight over max concurrency, averaged over the window. A vLLM or TGI process spends its
      CPU on per-sequence work (scheduling, sampling, detokenising, streaming tokens over
      HTTP), which grows with the sequences in flight; a full batch is 100%.
    - "engine": the share of time at least one request is in flight. This reads the engine
      loop as the whole cost, so CPU saturates at one request; at an 80% target the HPA then
      holds about 1.6 requests per 8-slot replica. It is the reading most favourable to the
      HPA's SLO (and most costly), kept as a second baseline (`hpa_cpu_engine_busy`).

    `idle_base` 5%: the HTTP server, metrics endpoint and an idle engine loop use a small
    fraction of a multi-core request (0.2 of the example's 4 cores)."""

    busy: Literal["slots", "engine"] = "slots"
    idle_base: float = 0.05

    def utilization(self, share: float) -> float:
        return self.idle_base + (1.0 - self.idle_base) * share


class HpaCpuPolicy:
    """The Kubernetes HPA on CPU utilization (autoscaling/v2, Resource metric cpu,
    averageUtilization `target`, default 80%): 15 s sync period, 10% tolerance, and no
    behavior block, as `kubectl autoscale` writes it (the legacy path: scale-down only to the
    highest recommendation of 300 s, scale-up to at most max(2 x current, 4) per sync; with a
    `behavior`, its rules instead). Utilization comes from metrics-server: each ready pod's
    CPU over the last resolution window (the scrape interval), by `cpu` (see `CpuModel`;
    default: CPU in proportion to busy request slots). Pods not yet ready count as 0% when the
    ratio says scale up, as the controller does for CPU.

    With the slot model a saturated replica reads 100%, so an overloaded deployment grows by
    at most 100/80 = 1.25x per sync: CPU cannot see the queue, which is the HPA's real weakness
    on model servers, not a handicap of the model."""

    interval = 15.0

    def __init__(
        self,
        min_replicas: int,
        max_replicas: int,
        target: float = 0.8,
        behavior: HpaBehavior | None = None,
        cpu: CpuModel | None = None,
    ) -> None:
        self.target = target
        self.cpu = cpu or CpuModel()
        self.name = "hpa_cpu" if self.cpu.busy == "slots" else "hpa_cpu_engine_busy"
        self.hpa = _HpaAlgorithm(min_replicas, max_replicas, behavior)

    def decide(self, now: float, cluster: Cluster) -> Decision | None:
        current = cluster.replicas
        counter: Literal["busy", "slot_busy"] = "slot_busy" if self.cpu.busy == "slots" else "busy"
        measured = cluster.prometheus.busy_share(now, counter)
        if measured is None:
            return None
        share, pods = measured
        utilization = self.cpu.utilization(share)
        ratio = utilization / self.target
        raw = current
        unready = max(0, current - pods)
        if ratio > 1.0 + self.hpa.tolerance:
            # Scale-up: pods still starting count as 0% used; if that flips or dampens the
            # ratio into the tolerance, the controller keeps the current count.
            ratio = utilization * pods / (self.target * (pods + unready))
            if ratio > 1.0 + self.hpa.tolerance:
                raw = math.ceil(ratio * (pods + unready))
        elif ratio < 1.0 - self.hpa.tolerance:
            # Scale-down: pods not ready are set aside.
            raw = math.ceil(ratio * pods)
        desired = self.hpa.stabilize_and_limit(now, current, raw)
        return Decision(now, desired, f"cpu {utilization:.0%} of target {self.target:.0%}")


class KedaQueuePolicy:
    """KEDA's Prometheus scaler on queue depth, through the HPA: the ScaledObject trigger
    `sum(vllm:num_requests_waiting)` with metricType AverageValue and `threshold` 5 per replica
    (the value the vLLM production-stack and vendor guides use), minReplicaCount as the floor.
    The HPA (15 s sync, 10% tolerance; KEDA writes no behavior block unless
    advanced.horizontalPodAutoscalerConfig sets one, so the legacy path of `HpaCpuPolicy`)
    asks KEDA's metrics server, which queries Prometheus on each request:
    desired = ceil(total / threshold), unchanged while total / (threshold x current) is within
    10% of 1."""

    name = "keda_queue"
    interval = 15.0

    def __init__(
        self,
        min_replicas: int,
        max_replicas: int,
        threshold: float = 5.0,
        behavior: HpaBehavior | None = None,
    ) -> None:
        self.threshold = threshold
        self.hpa = _HpaAlgorithm(min_replicas, max_replicas, behavior)

    def decide(self, now: float, cluster: Cluster) -> Decision | None:
        current = cluster.replicas
        latest = cluster.prometheus.latest(now)
        if latest is None:
            return None
        total = latest.waiting
        ratio = total / (self.threshold * max(current, 1))
        raw = (
            current if abs(ratio - 1.0) <= self.hpa.tolerance else math.ceil(total / self.threshold)
        )
        desired = self.hpa.stabilize_and_limit(now, current, raw)
        return Decision(now, desired, f"queue {total:.0f} / threshold {self.threshold:g}")


@dataclass
class KpaConfig:
    """Knative Serving's config-autoscaler defaults."""

    container_concurrency: int = 8  # set to the server's slots, as one would for an LLM
    target_utilization: float = 0.7  # container-concurrency-target-percentage
    stable_window: float = 60.0
    panic_window_percentage: float = 10.0  # panic window = 6 s
    panic_threshold: float = 2.0  # 200%
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    tick: float = 2.0


class KnativeKpaPolicy:
    """Knative's KPA: the autoscaler scrapes every pod's queue-proxy each second for requests
    in flight (queued or served), averages them over a 60 s stable window and a 6 s panic
    window, and wants ceil(average / target) pods, target = containerConcurrency x 70%.
    When the panic window asks for 2x the ready pods it panics: it scales on the panic window
    and never down until a stable window passes without panic. Scale-up is limited to 1000x
    and scale-down to 1/2 of the ready pods per 2 s decision."""

    name = "knative_kpa"
    interval = 1.0  # the metric scrape; decisions every `config.tick`

    def __init__(
        self, min_replicas: int, max_replicas: int, config: KpaConfig | None = None
    ) -> None:
        self.config = config or KpaConfig()
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.samples: deque[tuple[float, int]] = deque()
        self.panic_since: float | None = None
        self.max_panic_pods = 0
        self.next_decision = 0.0
        self.started = False

    def decide(self, now: float, cluster: Cluster) -> Decision | None:
        c = self.config
        self.samples.append((now, cluster.in_flight()))
        while self.samples and self.samples[0][0] <= now - c.stable_window:
            self.samples.popleft()
        if not self.started:
            # newAutoscaler: "We always start in the panic mode, if the deployment is scaled
            # up over 1 pod", keeping the ready pods until the windows hold enough data.
            self.started = True
            if cluster.ready > 1:
                self.panic_since = now
                self.max_panic_pods = cluster.ready
        if now < self.next_decision:
            return None
        self.next_decision = now + c.tick
        panic_window = c.stable_window * c.panic_window_percentage / 100.0
        stable = [v for _, v in self.samples]
        panic = [v for t, v in self.samples if t > now - panic_window]
        target = c.container_concurrency * c.target_utilization
        stable_pods = math.ceil(sum(stable) / len(stable) / target)
        panic_pods = math.ceil(sum(panic) / len(panic) / target) if panic else stable_pods
        ready = max(1, cluster.ready)
        up_limit = math.ceil(c.max_scale_up_rate * ready)
        down_limit = math.floor(ready / c.max_scale_down_rate)
        stable_pods = max(down_limit, min(up_limit, stable_pods))
        panic_pods = max(down_limit, min(up_limit, panic_pods))
        if panic_pods / ready >= c.panic_threshold:
            if self.panic_since is None:
                self.max_panic_pods = ready
            self.panic_since = now  # every tick over the threshold extends the panic
        elif self.panic_since is not None and now - self.panic_since > c.stable_window:
            # panicTime.Add(StableWindow).Before(now): strictly after.
            self.panic_since = None
            self.max_panic_pods = 0
        if self.panic_since is not None:
            # The larger of the stable and panic counts, and never below the panic's highest.
            desired = max(stable_pods, panic_pods, self.max_panic_pods)
            self.max_panic_pods = desired
            reason = f"panic: {sum(panic) / len(panic):.1f} in flight (6 s)"
        else:
            desired = stable_pods
            reason = f"stable: {sum(stable) / len(stable):.1f} in flight (60 s)"
        desired = max(self.min_replicas, min(self.max_replicas, desired))
        return Decision(now, desired, reason)


@dataclass
class OraclePolicy:
    """A clairvoyant zero-queueing sizing, the reference for cost: it knows every future request
    and its exact service time, and so the concurrency the trace needs at each second if no
    request ever waited. At each tick it asks for the fewest replicas whose slots cover that
    concurrency's peak from now until a replica started now would be ready plus one tick, so
    new replicas are ready just in time, and removes the rest at once.

    It is not a lower bound on cost: it never lets a request wait, so a policy that queues
    requests within the SLO (or misses it) can use fewer replica-seconds, and its own rounding
    to whole replicas over a look-ahead window and cold starts it cannot avoid may cost it an
    SLO second or two."""

    trace: Trace
    server: ServerModel
    min_replicas: int
    max_replicas: int
    services: list[float]
    interval: float = 5.0
    name: str = "oracle"
    need: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        horizon = int(self.trace.duration + max(self.services, default=0.0)) + 2
        events: list[tuple[float, int]] = []
        for r, s in zip(self.trace.requests, self.services, strict=True):
            events.append((r.arrival, 1))
            events.append((r.arrival + s, -1))
        events.sort(key=lambda e: (e[0], e[1]))
        peak = [0] * (horizon + 1)
        level = 0
        filled = 0  # seconds before this one already hold their peak
        for t, d in events:
            second = min(int(t), horizon)
            # Requests still in service carry their level into the seconds without events.
            for s in range(filled, second + 1):
                peak[s] = max(peak[s], level)
            filled = second + 1
            level += d
            peak[second] = max(peak[second], level)
        self.need = [math.ceil(p / self.server.max_concurrency) for p in peak]

    def decide(self, now: float, cluster: Cluster) -> Decision | None:
        lo = int(now)
        hi = int(now + self.server.cold_start + self.interval) + 1
        window = self.need[lo : hi + 1] or [0]
        desired = max(self.min_replicas, min(self.max_replicas, max(window)))
        return Decision(now, desired, "knows the future")
