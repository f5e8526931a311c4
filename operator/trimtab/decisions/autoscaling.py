"""The autoscaling decision: how many replicas a model server needs for its SLO, from the
signals Prometheus shows (queue depth, arrival rate, service time, p99 latency). Pure.

The operator's timer and the simulator (`trimtab simulate`, benchmark B1) both call
`decide_replicas`; neither has a copy of this logic."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from trimtab.api.autoscaling import AutoscalingSpec, SLOSpec

Action = Literal["up", "down", "hold"]

# Scale-up may always add this many replicas in one loop, whatever maxScaleUpRate says, so a
# deployment at one replica is not held to doubling (the HPA uses the same floor).
MIN_SCALE_UP_STEP = 4
# A backlog should be gone this long after the capacity asked for it is ready: short enough
# that few requests arriving behind it miss the SLO, long enough not to buy replicas that
# only ever drain a queue.
DRAIN_SECONDS = 15.0
# Queue growth is measured between readings one scrape apart, so a loop faster than the scrape
# compares two scrapes, not one scrape with itself or with the one before it over too short a
# time. Without a scrape interval given: Prometheus' usual 15 s (the default 1m rate window
# holds four).
GROWTH_SPAN = 15.0
# An arrival rate at or below this is no traffic: rate() over a window with no new requests is
# exactly 0, and one request in even an hour's window is far above it.
NO_TRAFFIC_RATE = 1e-6
# The history keeps every loop's recommendation for this long (the queue's growth is measured
# against a reading one scrape back) and, beyond it, one merged recommendation per bucket. A
# bucket's width grows with its age, in powers of two of the loop interval, to at most 1/16 of
# its age: a window's edge is as sharp as a loop for the first 16 loops back and within 6% of
# its length beyond, whatever the longest window, and status keeps about 16 entries per
# doubling of age (about 150 for a 24 h idle window at a 15 s loop).
FULL_DETAIL_SECONDS = 60.0
AGE_BUCKETS = 16


@dataclass(frozen=True)
class Signals:
    """What the metrics source said this loop. None means "no data" (the query returned no
    series, or its source failed); `source_unavailable` means the source could not be asked
    for at least one signal: demand comes from the others, but nothing scales down."""

    queue_depth: float | None = None  # requests waiting, all replicas together
    running: float | None = None  # requests being served, all replicas together
    arrival_rate: float | None = None  # requests per second
    service_time: float | None = None  # mean seconds in service, queue excluded
    p99_latency: float | None = None  # seconds, end to end
    error_rate: float | None = None  # share of requests failing
    source_unavailable: bool = False
    error: str = ""  # the source's error text, for the reason
    # Signals this setup never measures (no preset query, no override), by their spec names
    # ("queueDepth", "running"): their None is not a signal gone missing.
    unmeasured: frozenset[str] = frozenset()

    def zero_or_unmeasured(self, name: str) -> bool:
        """Whether a gauge reads 0, or is one this setup has no query for."""
        value = self.queue_depth if name == "queueDepth" else self.running
        return value == 0 or (value is None and name in self.unmeasured)

    def as_dict(self) -> dict[str, float | None]:
        return {
            "queueDepth": self.queue_depth,
            "running": self.running,
            "arrivalRate": self.arrival_rate,
            "serviceTime": self.service_time,
            "p99Latency": self.p99_latency,
            "errorRate": self.error_rate,
        }


@dataclass(frozen=True)
class Recommendation:
    """One loop's recommendation for the load: what the arrival rate (and p99 feedback)
    needs, before stabilization, rate limits and bounds. Replicas asked for only to drain a
    backlog are left out: once the backlog is gone they are not needed again, so the
    scale-down window must not hold them."""

    time: float  # when it was made; for a merged bucket, when its newest one was
    replicas: int  # for a merged bucket, the highest (what the scale-down window holds)
    queue_depth: float | None = None  # what the queue held then, to see it grow
    lowest: int | None = None  # for a merged bucket, the lowest (the scale-up window's)

    @property
    def fewest(self) -> int:
        return self.replicas if self.lowest is None else self.lowest


@dataclass(frozen=True)
class AutoscalingInput:
    signals: Signals
    current_replicas: int  # replicas asked for now (ready or starting)
    ready_replicas: int  # replicas serving now
    spec: AutoscalingSpec
    slo: SLOSpec | None
    now: float  # seconds on any clock the history uses too
    history: tuple[Recommendation, ...] = ()  # earlier raw recommendations, oldest first
    last_scale_up: float | None = None  # when replicas were last added
    scrape_interval: float = GROWTH_SPAN  # seconds between Prometheus scrapes of the servers


@dataclass(frozen=True)
class ReplicaDecision:
    desired_replicas: int
    action: Action
    reason: str
    recommendation: int | None  # the raw recommendation; None when the data was missing
    history: tuple[Recommendation, ...]  # what to keep for the next loop
    inputs: dict[str, float | None] = field(default_factory=dict)


def _bounded(n: int, spec: AutoscalingSpec, floor: int) -> int:
    return max(floor, min(spec.max_replicas, n))


def _unbroken_since(history: tuple[Recommendation, ...], now: float, max_gap: float) -> float:
    """When the recommendations leading up to `now` began without a gap longer than `max_gap`
    (`now` itself when the newest is older than that). A gap is time nobody measured the load:
    an operator down, autoscaling switched off, no data. Recommendations from before it say
    nothing about the load since, as the HPA's window, kept in memory, restarts with it.

    >>> h = tuple(Recommendation(t, 1) for t in (0, 15, 30, 600, 615, 630))
    >>> _unbroken_since(h, 645, 150), _unbroken_since(h, 645, 600), _unbroken_since(h, 900, 150)
    (600, 0, 900)
    """
    start = now
    for r in reversed(history):
        if start - r.time > max_gap:
            break
        start = min(start, r.time)
    return start


def _prune(history: tuple[Recommendation, ...], since: float) -> tuple[Recommendation, ...]:
    """The recommendations from `since` on, and the newest one before it: with merged buckets
    a window's start may fall between two entries, and the older one says the history covers
    the window.

    >>> [r.time for r in _prune(tuple(Recommendation(t, 1) for t in (10, 50, 90, 130)), 60)]
    [50, 90, 130]
    """
    older = [i for i, r in enumerate(history) if r.time < since]
    return history[older[-1] :] if older else history


def _bucket_width(age: float, interval: float) -> float:
    """The width of the bucket a recommendation `age` seconds old merges into: the loop
    interval times the largest power of two at most age / (AGE_BUCKETS x interval).

    >>> [_bucket_width(a, 15) for a in (100, 240, 480, 1000, 3600, 86400)]
    [15, 15, 30, 60, 120, 3840]
    """
    ratio = age / (AGE_BUCKETS * interval)
    return interval * (2 ** math.floor(math.log2(ratio)) if ratio >= 2 else 1)


def compact_history(
    history: tuple[Recommendation, ...], now: float, interval: float
) -> tuple[Recommendation, ...]:
    """The history as status keeps it: every recommendation of the last FULL_DETAIL_SECONDS
    (or three loops), older ones merged per bucket, aligned to the clock, of a width that
    grows with age (`_bucket_width`; the widths nest, so a bucket only ever merges into a
    wider one as it ages, and merging again changes nothing). A bucket keeps its newest time
    and queue depth, its highest recommendation (so the scale-down and idle windows hold at
    least as long as with every loop kept, at most a bucket longer: 1/16 of the window) and
    its lowest (for the scale-up window). The oldest entry is never merged, so the history
    says exactly how far back it reaches (the scale-down waits until it spans the window).

    >>> h = tuple(Recommendation(t, n, 0.0) for t, n in [(0, 3), (5, 5), (10, 1), (995, 2)])
    >>> once = compact_history(h, 1000, 5)  # about 1000 s old: 40 s buckets; the last minute
    >>> [(r.time, r.replicas, r.fewest) for r in once]  # as it is
    [(0, 3, 3), (10, 5, 1), (995, 2, 2)]
    >>> compact_history(once, 1000, 5) == once
    True
    """
    detail_from = now - max(FULL_DETAIL_SECONDS, 3 * interval)
    out: list[Recommendation] = []
    for r in history:
        last = out[-1] if out else None
        width = _bucket_width(now - r.time, interval)
        if (
            len(out) > 1  # the oldest stays as it is: how far back the history reaches
            and last is not None
            and r.time < detail_from
            and math.floor(last.time / width) == math.floor(r.time / width)
        ):
            out[-1] = Recommendation(
                r.time,
                max(last.replicas, r.replicas),
                r.queue_depth,
                min(last.fewest, r.fewest),
            )
        else:
            out.append(r)
    return tuple(out)


def _record(
    history: tuple[Recommendation, ...],
    now: float,
    replicas: int,
    queue_depth: float | None,
    interval: float,
) -> tuple[Recommendation, ...]:
    """The history with this loop's recommendation added, compacted as status keeps it."""
    return compact_history((*history, Recommendation(now, replicas, queue_depth)), now, interval)


def _growth_reference(
    history: tuple[Recommendation, ...], now: float, interval: float, scrape: float = GROWTH_SPAN
) -> Recommendation | None:
    """The reading to measure the queue's growth against: the newest one with a queue depth
    about one scrape old, or one loop old when the loop is slower than the scrape.

    >>> h = tuple(Recommendation(t, 1, q) for t, q in [(85, 0), (90, 0), (95, 40), (100, 40)])
    >>> _growth_reference(h, 105, 5)  # 15 s back, not the 5 s old copy of the same scrape
    Recommendation(time=90, replicas=1, queue_depth=0, lowest=None)
    >>> _growth_reference(h, 115, 15)  # a 15 s loop: the last loop
    Recommendation(time=100, replicas=1, queue_depth=40, lowest=None)
    >>> _growth_reference(h[2:], 105, 5) is None  # nothing a scrape old yet
    True
    >>> _growth_reference(h, 105, 5, scrape=5)  # a 5 s scrape: the last loop's is another
    Recommendation(time=100, replicas=1, queue_depth=40, lowest=None)
    """
    span = _span(interval, scrape)
    return next(
        (r for r in reversed(history) if r.queue_depth is not None and now - r.time >= span),
        None,
    )


def _span(interval: float, scrape: float = GROWTH_SPAN) -> float:
    """How old a reading must be to come from an earlier scrape than this loop's: half a loop
    short of one scrape (or of one loop, when the loop is slower), so timer jitter never
    skips a scrape."""
    return max(scrape, interval) - interval / 2


def _backlog_done_by(
    *,
    queue: float,
    arrivals: float,
    service: float,
    in_use: float,
    slots: int,
    ready: int,
    current: int,
    starting_for: float,
) -> float:
    """Seconds until `queue` is gone on the replicas already asked for, if the ready ones
    serve from now and the starting ones from `starting_for` seconds on; inf if never.

    >>> _backlog_done_by(queue=600, arrivals=20, service=1, in_use=20, slots=8, ready=9,
    ...                  current=9, starting_for=0)  # 52 spare slots from now
    11.538...
    >>> _backlog_done_by(queue=100, arrivals=20, service=1, in_use=20, slots=8, ready=1,
    ...                  current=8, starting_for=30)  # +12/s for 30 s, then 44 spare slots
    40.454...
    """
    if queue <= 0:
        return 0.0
    net = arrivals - ready * slots / service  # the queue's growth until the starting are ready
    at_ready = queue + net * starting_for
    if at_ready <= 0:
        return queue / -net  # drains before the starting replicas are even needed
    spare = current * slots - in_use
    if spare <= 0:
        return math.inf
    return starting_for + at_ready * service / spare


def decide_replicas(inp: AutoscalingInput) -> ReplicaDecision:
    """Replicas the model server needs now, the action, and why.

    Demand: by Little's law the concurrency in use is arrival rate x mean service time. With no
    request arriving in the rate window and none queued or running, demand is 0: the service
    time is then 0/0 (nothing was served), undefined rather than missing. With an
    empty queue the requests running count too (a rise the rate window does not show yet); with
    a queue they only fill the slots there are, so they are not demand. A queue that grew since
    the reading one scrape (GROWTH_SPAN) or one loop ago, whichever is longer, raises the
    arrival estimate to what the replicas finish plus the growth (a queue out of nothing began,
    on average, mid-interval). The backlog projected over one cold start adds the slots to drain
    it within DRAIN_SECONDS of new replicas being ready, unless the replicas already asked for
    drain it before a new one could serve. The recommendation is that concurrency over what one
    replica should carry (targetConcurrency x targetUtilization). p99 above the SLO while the
    queue is not shrinking, with no capacity still starting, adds replicas in proportion to the
    miss (feedback for a service time the gauges underestimate). p99 above the SLO while the
    queue shrinks is a backlog draining, and with an empty queue a drained backlog still in the
    window (or the service time itself, which more replicas cannot fix): neither adds anything.

    Up is fast: at once (or after scaleUpStabilization), at most maxScaleUpRate times the
    current replicas (and at least +4); while replicas added less than a scrape ago still start,
    a loop faster than the scrape waits for a fresh reading rather than act twice on the one it
    scaled up on. Down is slow: only to the highest recommendation of the scaleDownStabilization
    window (the history keeps what the load needed, not replicas bought to drain a backlog), and
    only once the history spans that window: as the Kubernetes HPA seeds its window with the
    replicas it found, a deployment is not cut in the first minutes after autoscaling starts on
    a few quiet readings. At most maxScaleDownRate of the replicas go per loop, and none while
    requests queue, p99 misses the SLO, or a signal is missing or its source failed. A source
    that failed for some signals leaves demand to the others: a queue seen while the latency
    histogram's query fails still scales up. With nothing to compute demand from, it holds.
    Replicas still in their cold start count as capacity, so a spike is not answered twice
    while they load.

    At zero replicas (scaleToZero) no server runs, so its own series are absent: no demand, not
    missing data; it stays at zero until a signal that sees requests without a pod (an
    arrivalRate or queueDepth override on the gateway's metrics) shows some, then wakes to
    minReplicas (or what Little's law asks, when a service time is known).

    Worked examples (targetConcurrency 8, targetUtilization 80% -> 6.4 requests a replica):

    - 20 req/s x 1.0 s service time, no queue, 3 replicas: 20 / 6.4 -> 4: up to 4.
    - Same, plus 400 requests waiting (the 4 spare slots would take 100 s): drain them in
      15 s, (20 + 400 / 15) / 6.4 -> 8: up to 8 at once; the history records 4, the load's
      need. With 9 replicas ready and 600 waiting, the 52 spare slots drain them in 12 s,
      sooner than a new replica could start: no replicas added for them.
    - 5 req/s x 1.0 s, 6 replicas, history in the window [6, 4, 1]: recommendation 1, held at
      the window's highest (6): hold. Once the window holds only 1s: down to 3 (half of 6
      per loop at maxScaleDownRate 0.5), then to 1.
    - 0 req/s, nothing queued or running, service time no data (nothing finished in the
      window), 6 replicas, the window's history all 0: down to 3, then 1 (or 0 with
      scaleToZero once the idle window is quiet).
    - 5 req/s x 1.0 s, 2 replicas, autoscaling started 60 s ago and every loop since
      recommended 1: hold at 2 until the recommendations span the 300 s window, then down to 1.
      The same after a gap longer than the window (or two loops) in the history (the operator
      was down, autoscaling was off, or there was no data): what came before the gap says
      nothing about the load since, so the window starts again after it.
    - Loop 5 s, scrape 15 s: the loops at 80, 85 and 90 s read a queue of 0, those at 95, 100
      and 105 s one scrape of 40. At each of the last three the growth is measured against
      the reading 15 s before (0): (40 - 0) / (15 / 2) = 5.3/s, never (40 - 40) / 5 = 0 nor
      40 / 5 = 8/s. If 95 s scaled up 2 -> 8, 100 s and 105 s add nothing while those start;
      110 s, on the next scrape, may add more.
    - Prometheus down, 4 replicas, onMissingMetrics hold: stay at 4. With fallback and
      fallbackReplicas 6: up to 6; with fallbackReplicas 2: stay at 4 (never down blind).
    """
    spec, sig = inp.spec, inp.signals
    secs = spec.seconds()
    current, ready = inp.current_replicas, inp.ready_replicas
    starting = max(0, current - ready)
    per_replica = spec.target_concurrency * spec.target_utilization / 100.0
    slo_s = inp.slo.p99_latency_ms / 1000.0 if inp.slo else None
    # The history spans the longest window, and at least the span the queue's growth is
    # measured over (with no stabilization windows, too).
    keep_for = max(
        secs.scale_down_stabilization,
        secs.scale_up_stabilization,
        secs.idle_window or 0,
        FULL_DETAIL_SECONDS,
        2 * _span(secs.interval, inp.scrape_interval),
    )
    history = _prune(inp.history, inp.now - keep_for - secs.interval)
    used: dict[str, float | None] = {
        **sig.as_dict(),
        "currentReplicas": float(current),
        "readyReplicas": float(ready),
        "perReplicaConcurrency": per_replica,
    }
    # Bounds are the user's explicit limits, never a blind move.
    floor = spec.min_replicas

    # --- at zero: no server runs, so its own series are absent ---------------------------
    if current == 0 and spec.scale_to_zero is not None:
        at_zero = {
            "arrival rate": sig.arrival_rate,
            "queue depth": sig.queue_depth,
            "running": sig.running,
        }
        demand = {k: v for k, v in at_zero.items() if v is not None and v > NO_TRAFFIC_RATE}
        shown = at_zero.items()
        if not demand:
            history = _record(history, inp.now, 0, sig.queue_depth, secs.interval)
            why = (
                "at 0 replicas, no request seen ("
                + ", ".join(f"{k} {'no data' if v is None else f'{v:g}'}" for k, v in shown)
                + "); only a signal that sees requests while no pod runs wakes it (an "
                "arrivalRate or queueDepth query on the gateway's or ingress' metrics)"
            )
            target = 0
            if sig.source_unavailable:
                why = f"metrics source unavailable ({sig.error}); " + why
                if spec.on_missing_metrics == "fallback" and spec.fallback_replicas is not None:
                    target = spec.fallback_replicas
                    why += f"; fallback to {spec.fallback_replicas}"
            desired = min(target, spec.max_replicas)
            return ReplicaDecision(desired, _action(desired, 0), why, 0, history, used)
        if sig.arrival_rate is None or sig.service_time is None:
            # Requests arrive but no server has measured a service time yet: start the
            # fewest replicas; the next loops size them from what those measure.
            desired = max(1, floor)
            why = (
                "at 0 replicas: "
                + ", ".join(f"{k} {v:g}" for k, v in demand.items())
                + f"; waking to {desired}"
            )
            history = _record(history, inp.now, desired, sig.queue_depth, secs.interval)
            return ReplicaDecision(desired, "up", why, desired, history, used)

    # --- missing data: never scale down blind -------------------------------------------
    # No request arrived in the rate window and none waits or runs: demand is zero. The mean
    # service time is then 0/0 (nothing was served), undefined rather than missing, so it is
    # not needed; without this a deployment that goes quiet would never scale down.
    no_traffic = (
        sig.arrival_rate is not None
        and sig.arrival_rate <= NO_TRAFFIC_RATE
        and sig.zero_or_unmeasured("queueDepth")
        and sig.zero_or_unmeasured("running")
    )
    have_littles = sig.arrival_rate is not None and (sig.service_time is not None or no_traffic)
    have_inflight = sig.running is not None
    # A source that failed for some signals still leaves the others to scale up on; it only
    # blocks scale-down (below). With nothing to compute demand from: hold, or fall back up.
    unavailable = (
        f"metrics source unavailable ({sig.error})"
        if sig.source_unavailable and sig.error
        else "metrics source unavailable"
    )
    if not (have_littles or have_inflight):
        why = (
            unavailable
            if sig.source_unavailable
            else "no data for arrival rate and service time, nor requests running"
        )
        target = current
        if spec.on_missing_metrics == "fallback" and spec.fallback_replicas is not None:
            target = max(current, spec.fallback_replicas)
            why += f"; fallback to at least {spec.fallback_replicas}"
        else:
            why += "; holding"
        desired = _bounded(target, spec, min(floor, current) if current else floor)
        desired = max(desired, floor)
        return ReplicaDecision(desired, _action(desired, current), why, None, history, used)

    # --- demand ---------------------------------------------------------------------------
    queue = sig.queue_depth or 0.0
    running = sig.running or 0.0
    growth = 0.0  # queue growth since the last loop, requests/s
    notes: list[str] = []
    asides = ""
    if have_littles and sig.service_time is None:
        in_use, drain = 0.0, 0.0
        source = "no requests arriving, queued or running"
    elif have_littles:
        assert sig.arrival_rate is not None and sig.service_time is not None
        service = max(sig.service_time, 1e-3)
        arrivals = sig.arrival_rate
        # A rate over a window trails a step. A queue that grew since the last scrape shows
        # the true arrival rate sooner: what the busy replicas finish plus the growth.
        previous = _growth_reference(history, inp.now, secs.interval, inp.scrape_interval)
        if previous is not None and previous.queue_depth is not None and inp.now > previous.time:
            elapsed = inp.now - previous.time
            if previous.queue_depth == 0 and queue > 0:
                # A queue out of nothing began at an unknown moment since that reading:
                # expect the middle, not the start, or a step is underestimated by half.
                elapsed /= 2
            growth = (queue - previous.queue_depth) / elapsed
            if growth > 0 and queue > 0:
                arrivals = max(arrivals, running / service + growth)
        used["estimatedArrivalRate"] = arrivals
        # With an empty queue the requests running are demand the rate window may not show
        # yet; with a queue they are only the slots there are, so they say nothing of demand
        # (counting them would ask for more replicas the longer a backlog drains).
        in_use = arrivals * service if queue > 0 else max(arrivals * service, running)
        # Replicas asked for now serve only after a cold start, and the queue keeps growing
        # until then: plan to drain that backlog within DRAIN_SECONDS once they are ready.
        # Unless the replicas already asked for drain it before a new one could serve: the
        # ready ones from now, the starting ones from when they are ready at the latest (one
        # cold start after the last scale-up).
        backlog = queue + (max(0.0, growth) * secs.cold_start if queue > 0 else 0.0)
        drain = backlog * service / max(DRAIN_SECONDS, service)
        done_by = _backlog_done_by(
            queue=queue,
            arrivals=arrivals,
            service=service,
            in_use=in_use,
            slots=spec.target_concurrency,
            ready=ready,
            current=current,
            starting_for=(
                0.0
                if starting == 0
                else secs.cold_start
                if inp.last_scale_up is None
                else min(secs.cold_start, max(0.0, inp.last_scale_up + secs.cold_start - inp.now))
            ),
        )
        if queue > 0 and done_by <= secs.cold_start:
            drain = 0.0
            asides += ("; " if asides else "") + (
                f"{queue:.0f} queued drain in {done_by:.0f}s on the {current} replicas asked "
                "for, before a new one could serve"
            )
        used["projectedBacklog"] = backlog
        source = f"{arrivals:.2f} req/s x {service:.2f}s"
        if arrivals > sig.arrival_rate:
            asides = (
                f"arrivals {arrivals:.2f} req/s from the queue's growth (the rate window "
                f"says {sig.arrival_rate:.2f})" + ("; " if asides else "") + asides
            )
        if in_use > arrivals * service:
            source = f"{running:.0f} running, above {source}"
    else:
        in_use, drain = running, queue
        source = f"{running:.0f} running"
    needed = in_use + drain
    recommendation = math.ceil(needed / per_replica - 1e-9) if needed > 0 else 0
    for_load = math.ceil(in_use / per_replica - 1e-9) if in_use > 0 else 0
    used["neededConcurrency"] = needed
    notes.append(
        f"demand {needed:.1f} concurrent ({source}"
        + (f" + {queue:.0f} queued" if queue else "")
        + f") / {per_replica:.1f} per replica = {recommendation}"
    )
    if asides:
        notes.append(asides)

    slo_missed = slo_s is not None and sig.p99_latency is not None and sig.p99_latency > slo_s
    queueing = sig.queue_depth is None or sig.queue_depth > 0
    # p99 is over a rate window, so it still shows a backlog the replicas are now draining;
    # only a queue that is not shrinking says the capacity is short.
    shrinking = queueing and growth < 0
    settled = starting == 0 and (
        inp.last_scale_up is None or inp.now - inp.last_scale_up >= secs.cold_start + secs.interval
    )
    if slo_missed and queueing and settled and not shrinking:
        assert slo_s is not None and sig.p99_latency is not None
        miss = min(2.0, sig.p99_latency / slo_s)
        feedback = max(ready + 1, math.ceil(ready * miss))
        if feedback > recommendation:
            recommendation = feedback
            for_load = max(for_load, feedback)
            notes.append(
                f"p99 {sig.p99_latency:.2f}s over SLO {slo_s:.2f}s with requests queued: "
                f"{recommendation}"
            )
    elif slo_missed and not queueing:
        notes.append(
            "p99 over SLO with an empty queue (a drained backlog still in the window, or the "
            "service time itself): no replicas added"
        )
    elif slo_missed and shrinking:
        notes.append("p99 over SLO while the queue shrinks: the backlog is draining")

    idle = needed == 0
    history = _record(history, inp.now, for_load, sig.queue_depth, secs.interval)

    # --- scale to zero ----------------------------------------------------------------------
    if secs.idle_window is not None and idle:
        quiet = [r for r in history if r.time >= inp.now - secs.idle_window]
        covered = history[0].time <= inp.now - secs.idle_window + secs.interval
        if covered and all(r.replicas == 0 for r in quiet):
            floor = 0
            notes.append(f"idle for {spec.scale_to_zero.idle_window if spec.scale_to_zero else ''}")
    if current == 0 and not idle:
        floor = max(floor, 1)

    # --- up: fast ---------------------------------------------------------------------------
    # A loop faster than the scrape reads the scrape it last scaled up on once or twice more;
    # acting on it again would buy the same replicas twice. Replicas still starting and added
    # less than a scrape ago wait for a fresh reading.
    since_up = math.inf if inp.last_scale_up is None else inp.now - inp.last_scale_up
    if recommendation > current and starting and since_up < _span(
        secs.interval, inp.scrape_interval
    ):
        notes.append(
            f"no scale-up: replicas added {since_up:.0f}s ago on readings this loop may see "
            "again; waiting for the next scrape"
        )
        return ReplicaDecision(current, "hold", "; ".join(notes), recommendation, history, used)
    if recommendation > current:
        target = recommendation
        if secs.scale_up_stabilization > 0:
            window = [
                r.fewest for r in history[:-1] if r.time >= inp.now - secs.scale_up_stabilization
            ]
            target = max(current, min([*window, recommendation]))
        limit = max(math.ceil(current * spec.max_scale_up_rate), current + MIN_SCALE_UP_STEP)
        if target > limit:
            notes.append(f"limited to {limit} by maxScaleUpRate")
            target = limit
        desired = _bounded(target, spec, floor)
        if starting and desired > current:
            notes.append(f"{starting} still starting counted as capacity")
        return ReplicaDecision(
            desired, _action(desired, current), "; ".join(notes), recommendation, history, used
        )

    # --- down: slow -------------------------------------------------------------------------
    if recommendation < current:
        blockers = []
        if sig.source_unavailable:
            blockers.append(unavailable)
        if not have_littles:
            blockers.append("arrival rate or service time missing")
        if sig.queue_depth is None and "queueDepth" not in sig.unmeasured:
            # A queue gauge that vanished may hide a backlog. One this setup never had (the
            # generic preset without queueMetric) is not missing: the mean request duration
            # then includes the time queued, so Little's law counts queued requests as demand.
            blockers.append("queue depth missing")
        elif sig.queue_depth is not None and sig.queue_depth > 0:
            blockers.append(f"{sig.queue_depth:.0f} requests queued")
        if slo_missed:
            blockers.append("p99 over SLO")
        if blockers and current <= spec.max_replicas and current >= floor:
            notes.append("no scale-down: " + ", ".join(blockers))
            return ReplicaDecision(current, "hold", "; ".join(notes), recommendation, history, used)
        window = [r.replicas for r in history if r.time >= inp.now - secs.scale_down_stabilization]
        target = max([*window, recommendation])
        # Pruning drops what is older than the window, so ask the history as it came in.
        seen = inp.now - _unbroken_since(
            inp.history, inp.now, max(secs.scale_down_stabilization, 2 * secs.interval)
        )
        if seen + secs.interval < secs.scale_down_stabilization:
            # Recommendations that do not yet span the window cannot say the load stayed low
            # for all of it: the replicas running when they began stand for the rest.
            target = current
            notes.append(
                f"held at {current}: the stabilization window has {seen:.0f}s of "
                "recommendations yet"
            )
        elif target > recommendation:
            notes.append(
                f"held at {target}, the highest recommendation in the stabilization window"
            )
        step = max(1, math.floor(current * spec.max_scale_down_rate))
        if target < current - step:
            target = current - step
            notes.append(f"limited to -{step} per loop by maxScaleDownRate")
        desired = _bounded(min(target, current), spec, floor)
        return ReplicaDecision(
            desired, _action(desired, current), "; ".join(notes), recommendation, history, used
        )

    desired = _bounded(current, spec, floor)
    return ReplicaDecision(
        desired, _action(desired, current), "; ".join(notes), recommendation, history, used
    )


def _action(desired: int, current: int) -> Action:
    return "up" if desired > current else "down" if desired < current else "hold"
