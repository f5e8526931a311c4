"""What Prometheus would show a policy: samples scraped every scrape interval from the
simulated servers, and the few PromQL functions autoscalers use (rate, histogram_quantile, gauges).

A policy never sees the simulator's exact state this way, only scraped, windowed numbers."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Literal

# vLLM's buckets for vllm:e2e_request_latency_seconds.
VLLM_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

# vLLM's buckets for vllm:time_to_first_token_seconds.
VLLM_TTFT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)


@dataclass(frozen=True, slots=True)
class Sample:
    """One scrape of every replica, already summed over replicas as `sum(...)` would."""

    time: float
    arrivals: float  # counter: requests received
    completed: float  # counter: requests finished
    buckets: tuple[float, ...]  # counter per bucket, cumulative, last is +Inf
    service_sum: float  # counter: seconds in service of finished requests
    waiting: float  # gauge: requests queued
    running: float  # gauge: requests in service
    busy: dict[int, float]  # counter per ready replica: seconds its engine was busy
    # Counter per ready replica: slot-seconds in use over its slots (requests in flight
    # integrated over time, divided by max concurrency), so one busy second of a full
    # replica adds 1.
    slot_busy: dict[int, float] = field(default_factory=dict)


@dataclass
class PrometheusView:
    """Scraped samples and PromQL-like queries over them, evaluated at a query time."""

    scrape_interval: float = 15.0
    rate_window: float = 60.0
    buckets: tuple[float, ...] = VLLM_LATENCY_BUCKETS
    samples: list[Sample] = field(default_factory=list)
    _times: list[float] = field(default_factory=list)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        self._times.append(sample.time)

    def _window(self, now: float, window: float) -> list[Sample]:
        hi = bisect.bisect_right(self._times, now)
        lo = bisect.bisect_right(self._times, now - window)
        return self.samples[lo:hi]

    def latest(self, now: float) -> Sample | None:
        """The sample an instant query for a gauge returns (Prometheus' 5m lookback)."""
        hi = bisect.bisect_right(self._times, now)
        if hi == 0 or now - self._times[hi - 1] > 300.0:
            return None
        return self.samples[hi - 1]

    def rate(self, now: float, attr: str, window: float | None = None) -> float | None:
        """rate(counter[window]): per-second increase between the first and last sample."""
        got = self._window(now, window or self.rate_window)
        if len(got) < 2:
            return None
        first, last = got[0], got[-1]
        span = last.time - first.time
        return (float(getattr(last, attr)) - float(getattr(first, attr))) / span

    def mean_service_time(self, now: float) -> float | None:
        """rate(service_sum[w]) / rate(service_count[w]); no data when nothing finished."""
        got = self._window(now, self.rate_window)
        if len(got) < 2:
            return None
        done = got[-1].completed - got[0].completed
        if done <= 0:
            return None
        return (got[-1].service_sum - got[0].service_sum) / done

    def quantile(self, now: float, q: float, window: float | None = None) -> float | None:
        """histogram_quantile(q, rate(latency_bucket[w])) with Prometheus' interpolation."""
        got = self._window(now, window or self.rate_window)
        if len(got) < 2:
            return None
        counts = [b - a for a, b in zip(got[0].buckets, got[-1].buckets, strict=True)]
        return histogram_quantile(q, self.buckets, counts)

    def busy_share(
        self, now: float, counter: Literal["busy", "slot_busy"] = "busy"
    ) -> tuple[float, int] | None:
        """Average share of the last resolution window (the last two samples, as
        metrics-server sees a pod) that the ready replicas were busy, by one of the two busy
        counters, and how many replicas it averaged."""
        hi = bisect.bisect_right(self._times, now)
        if hi < 2:
            return None
        a, b = self.samples[hi - 2], self.samples[hi - 1]
        span = b.time - a.time
        before, after = getattr(a, counter), getattr(b, counter)
        shares = [
            min(1.0, (after[i] - before[i]) / span) for i in after if i in before and span > 0
        ]
        if not shares:
            return None
        return sum(shares) / len(shares), len(shares)


def histogram_quantile(q: float, bounds: tuple[float, ...], counts: list[float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts (last bucket +Inf).

    >>> histogram_quantile(0.5, (1.0, 2.0), [10, 20, 20])
    1.0
    >>> histogram_quantile(0.75, (1.0, 2.0), [10, 20, 20])
    1.5
    """
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    for i, cumulative in enumerate(counts):
        if cumulative >= rank:
            if i == len(bounds):  # the +Inf bucket: Prometheus answers the highest finite bound
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            below = counts[i - 1] if i > 0 else 0.0
            in_bucket = cumulative - below
            if in_bucket <= 0:
                return bounds[i]
            return lower + (bounds[i] - lower) * (rank - below) / in_bucket
    return bounds[-1]
