"""Runs every policy on the same trace and seed and scores them the same way: SLO-violation
seconds, share of requests over the SLO, replica-seconds and scale actions.

The scores are what `trimtab simulate --json` prints and what benchmark B1 aggregates."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from trimtab.api.autoscaling import AutoscalingSpec, MetricsSpec, SLOSpec, duration_seconds
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.simulate.engine import (
    MetricsPath,
    Policy,
    RunResult,
    ServerModel,
    Simulation,
    draw_service_times,
)
from trimtab.simulate.policies import (
    CpuModel,
    HpaCpuPolicy,
    KedaQueuePolicy,
    KnativeKpaPolicy,
    KpaConfig,
    OraclePolicy,
    TrimtabPolicy,
)
from trimtab.simulate.traces import Trace

# What `trimtab simulate` compares. The benchmark adds the HPA with the engine-busy CPU model.
POLICIES = ("trimtab", "hpa_cpu", "keda_queue", "knative_kpa", "oracle")
ALL_POLICIES = (*POLICIES, "hpa_cpu_engine_busy")


@dataclass(frozen=True)
class Scenario:
    """The policy-independent part of a run: SLO, autoscaling spec, server and metrics path."""

    slo: SLOSpec
    autoscaling: AutoscalingSpec
    server: ServerModel
    metrics: MetricsPath = MetricsPath()
    initial_replicas: int = 1

    @classmethod
    def from_spec(
        cls,
        spec: ModelDeploymentSpec,
        prefill_tokens_per_s: float = 8000.0,
        decode_tokens_per_s: float = 40.0,
        cold_start: float | None = None,
        scrape_interval: float | None = None,
    ) -> Scenario:
        """The simulated server takes its slots and cold start from the spec's capacity
        hints (targetConcurrency, coldStart), and Prometheus its scrape interval from
        metrics.scrapeInterval (as the operator's loop does), unless told otherwise."""
        if spec.slo is None:
            raise ValueError("the ModelDeployment has no slo to simulate against")
        autoscaling = spec.autoscaling or AutoscalingSpec()
        secs = autoscaling.seconds()
        server = ServerModel(
            prefill_tokens_per_s=prefill_tokens_per_s,
            decode_tokens_per_s=decode_tokens_per_s,
            max_concurrency=autoscaling.target_concurrency,
            cold_start=secs.cold_start if cold_start is None else cold_start,
        )
        return cls(
            slo=spec.slo,
            autoscaling=autoscaling,
            server=server,
            metrics=MetricsPath(
                scrape_interval=(
                    duration_seconds((spec.metrics or MetricsSpec()).scrape_interval)
                    if scrape_interval is None
                    else scrape_interval
                ),
                latency=spec.slo.latency,
            ),
            initial_replicas=max(
                autoscaling.min_replicas, min(spec.replicas, autoscaling.max_replicas)
            ),
        )

    def policy(self, name: str, trace: Trace, seed: int) -> Policy:
        a = self.autoscaling
        if name == "trimtab":
            return TrimtabPolicy(a, self.slo, self.metrics.scrape_interval)
        if name == "hpa_cpu":
            return HpaCpuPolicy(a.min_replicas, a.max_replicas, cpu=CpuModel(busy="slots"))
        if name == "hpa_cpu_engine_busy":
            return HpaCpuPolicy(a.min_replicas, a.max_replicas, cpu=CpuModel(busy="engine"))
        if name == "keda_queue":
            return KedaQueuePolicy(a.min_replicas, a.max_replicas)
        if name == "knative_kpa":
            return KnativeKpaPolicy(
                a.min_replicas,
                a.max_replicas,
                KpaConfig(container_concurrency=a.target_concurrency),
            )
        if name == "oracle":
            return OraclePolicy(
                trace,
                self.server,
                a.min_replicas,
                a.max_replicas,
                draw_service_times(trace, self.server, seed),
            )
        raise ValueError(f"unknown policy {name!r}; have {', '.join(ALL_POLICIES)}")

    def run(self, name: str, trace: Trace, seed: int) -> RunResult:
        return Simulation(
            trace=trace,
            policy=self.policy(name, trace, seed),
            server=self.server,
            metrics=self.metrics,
            initial_replicas=self.initial_replicas,
            seed=seed,
            slo_s=self.slo.p99_latency_ms / 1000.0,
        ).run()


@dataclass(frozen=True)
class Score:
    slo_violation_seconds: int  # 1 s bins (by arrival) whose p99 latency exceeds the SLO
    requests_over_slo: float  # share of requests slower than the SLO
    replica_seconds: float
    scale_actions: int
    p99_latency_s: float  # over the whole run
    requests: int

    def to_json(self) -> dict[str, float | int | None]:
        return {
            "slo_violation_seconds": self.slo_violation_seconds,
            "requests_over_slo": round(self.requests_over_slo, 6),
            "replica_seconds": round(self.replica_seconds, 1),
            "scale_actions": self.scale_actions,
            "p99_latency_s": round(self.p99_latency_s, 3)
            if math.isfinite(self.p99_latency_s)
            else None,
            "requests": self.requests,
        }


def nearest_rank(sorted_values: list[float], q: float) -> float:
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def score(result: RunResult) -> Score:
    bins: dict[int, list[float]] = {}
    over = 0
    for arrival, latency in result.latencies:
        bins.setdefault(int(arrival), []).append(latency)
        if latency > result.slo_s:
            over += 1
    violations = sum(
        1 for values in bins.values() if nearest_rank(sorted(values), 0.99) > result.slo_s
    )
    everything = sorted(lat for _, lat in result.latencies)
    n = len(everything)
    return Score(
        slo_violation_seconds=violations,
        requests_over_slo=over / n if n else 0.0,
        replica_seconds=result.replica_seconds,
        scale_actions=result.scale_actions,
        p99_latency_s=nearest_rank(everything, 0.99) if n else 0.0,
        requests=n,
    )


def run_all(
    scenario: Scenario,
    trace: Trace,
    seed: int,
    policies: tuple[str, ...] = POLICIES,
    on_result: Callable[[RunResult], None] | None = None,
) -> dict[str, tuple[Score, RunResult]]:
    out: dict[str, tuple[Score, RunResult]] = {}
    for name in policies:
        result = scenario.run(name, trace, seed)
        if on_result:
            on_result(result)
        out[name] = (score(result), result)
    return out
