"""The SLO, autoscaling and metrics parts of a ModelDeployment, and the autoscaler's status.

These are policy, not model: changing them never starts a new revision."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import ConfigDict, Field

from trimtab.api.common import Duration, StatusModel, StrictModel

_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    """Seconds in a Go/Prometheus duration: "15s" -> 15.0, "1m30s" -> 90.0, "250ms" -> 0.25."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)


class SLOSpec(StrictModel):
    """What users must feel. The autoscaler keeps p99 latency under the target at the lowest
    replica count; rollouts judge canaries against the same numbers."""

    p99_latency_ms: int = Field(
        ge=1, le=3_600_000, description="Target for the 99th percentile of request latency (ms)."
    )
    latency: Literal["e2e", "ttft"] = Field(
        default="e2e",
        description="Which latency the target is of: end to end (e2e), or time to first token "
        "(ttft) for servers that stream tokens (vLLM, TGI).",
    )
    max_error_rate: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Largest acceptable share of failed requests."
    )


class ScaleToZero(StrictModel):
    """Scale to zero replicas after a quiet spell. At zero no server exports metrics: only an
    arrivalRate or queueDepth query on the gateway's metrics sees requests and wakes it, and
    requests get errors from the gateway until a replica is ready (no activator holds them)."""

    idle_window: Duration = Field(
        default="10m",
        description="No requests for this long scales the model server to zero. To wake it, "
        "set metrics.queries.arrivalRate (or queueDepth) to a query on the gateway's or "
        "ingress' metrics: with no pod, the server's own series are absent.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "duration(self.idleWindow) >= duration('30s')",
                    "message": "scaleToZero.idleWindow must be at least 30s",
                    "fieldPath": ".idleWindow",
                }
            ]
        }
    )


class AutoscalingSpec(StrictModel):
    """How trimtab scales the model server from SLO signals. Present and enabled: trimtab owns
    the replica count (spec.replicas is only the starting point)."""

    enabled: bool = Field(default=True, description="false keeps spec.replicas fixed.")
    min_replicas: int = Field(default=1, ge=1, le=1000, description="Fewest replicas.")
    max_replicas: int = Field(default=10, ge=1, le=1000, description="Most replicas.")
    interval: Duration = Field(
        default="15s",
        description="How often the control loop runs. The default matches the usual 15s "
        "scrape; a faster loop (e.g. 5s) acts on a new scrape sooner, for more queries.",
    )
    scale_up_stabilization: Duration = Field(
        default="0s",
        description="A scale-up must be recommended for this long before it happens; 0s reacts "
        "at once.",
    )
    scale_down_stabilization: Duration = Field(
        default="300s",
        description="Scale down only to the highest recommendation seen in this window.",
    )
    max_scale_up_rate: float = Field(
        default=4.0,
        ge=1.0,
        le=100.0,
        description="Replicas may grow at most this many times per loop (and by at least 4).",
    )
    max_scale_down_rate: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="At most this share of replicas is removed per loop (at least one).",
    )
    target_concurrency: int = Field(
        default=8,
        ge=1,
        le=10_000,
        description="Requests one replica serves at once at full speed (e.g. vLLM max-num-seqs).",
    )
    target_utilization: int = Field(
        default=80,
        ge=10,
        le=100,
        description="Percent of targetConcurrency to plan for; the rest is headroom for bursts.",
    )
    cold_start: Duration = Field(
        default="60s",
        description="Estimated time from a scale-up to a ready replica (image pull, weight load).",
    )
    on_missing_metrics: Literal["hold", "fallback"] = Field(
        default="hold",
        description="Without metrics: hold the current replicas, or go up to fallbackReplicas. "
        "trimtab never scales down blind.",
    )
    fallback_replicas: int | None = Field(
        default=None, ge=1, le=1000, description="Replicas when metrics are missing (fallback)."
    )
    scale_to_zero: ScaleToZero | None = Field(
        default=None, description="Scale to zero when idle; unset never goes below minReplicas."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.minReplicas <= self.maxReplicas",
                    "message": "autoscaling.minReplicas must not exceed maxReplicas",
                    "fieldPath": ".minReplicas",
                },
                {
                    "rule": "self.onMissingMetrics != 'fallback' || has(self.fallbackReplicas)",
                    "message": "onMissingMetrics fallback needs fallbackReplicas",
                    "fieldPath": ".fallbackReplicas",
                },
                {
                    "rule": "!has(self.fallbackReplicas) || self.onMissingMetrics == 'fallback'",
                    "message": "fallbackReplicas applies only when onMissingMetrics is fallback",
                    "fieldPath": ".fallbackReplicas",
                },
                {
                    "rule": "!has(self.fallbackReplicas) || (self.fallbackReplicas >= "
                    "self.minReplicas && self.fallbackReplicas <= self.maxReplicas)",
                    "message": "fallbackReplicas must lie within minReplicas..maxReplicas",
                    "fieldPath": ".fallbackReplicas",
                },
                {
                    "rule": "duration(self.interval) >= duration('1s') && "
                    "duration(self.interval) <= duration('10m')",
                    "message": "autoscaling.interval must be between 1s and 10m",
                    "fieldPath": ".interval",
                },
                {
                    "rule": "duration(self.scaleUpStabilization) <= duration('1h') && "
                    "duration(self.scaleDownStabilization) <= duration('1h')",
                    "message": "stabilization windows must be at most 1h",
                },
                {
                    "rule": "duration(self.coldStart) <= duration('2h')",
                    "message": "autoscaling.coldStart must be at most 2h",
                    "fieldPath": ".coldStart",
                },
            ]
        }
    )

    def seconds(self) -> AutoscalingSeconds:
        """The durations as seconds, for the decision functions."""
        return AutoscalingSeconds(
            interval=duration_seconds(self.interval),
            scale_up_stabilization=duration_seconds(self.scale_up_stabilization),
            scale_down_stabilization=duration_seconds(self.scale_down_stabilization),
            cold_start=duration_seconds(self.cold_start),
            idle_window=(
                duration_seconds(self.scale_to_zero.idle_window) if self.scale_to_zero else None
            ),
        )


@dataclass(frozen=True)
class AutoscalingSeconds:
    """AutoscalingSpec's durations in seconds."""

    interval: float
    scale_up_stabilization: float
    scale_down_stabilization: float
    cold_start: float
    idle_window: float | None


# The signals the autoscaler reads; each may be overridden with PromQL in metrics.queries.
SIGNALS = ("queueDepth", "arrivalRate", "p99Latency", "serviceTime", "errorRate", "running")


class MetricQueries(StrictModel):
    """PromQL that replaces the preset's query for one signal. Each must return one number."""

    queue_depth: str | None = Field(
        default=None, min_length=1, max_length=4096, description="Requests waiting (all replicas)."
    )
    arrival_rate: str | None = Field(
        default=None, min_length=1, max_length=4096, description="Requests arriving per second."
    )
    p99_latency: str | None = Field(
        default=None, min_length=1, max_length=4096, description="p99 request latency (seconds)."
    )
    service_time: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Mean time a request spends being served, queue excluded (seconds).",
    )
    error_rate: str | None = Field(
        default=None, min_length=1, max_length=4096, description="Share of requests failing."
    )
    running: str | None = Field(
        default=None, min_length=1, max_length=4096, description="Requests being served now."
    )


class MetricsSpec(StrictModel):
    """Where trimtab reads the signals. The server preset supplies the PromQL; override only
    what your setup names differently."""

    prometheus_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s]+$",
        max_length=2048,
        description="Prometheus base URL; defaults to the operator's setting.",
    )
    queries: MetricQueries | None = Field(default=None, description="PromQL overrides per signal.")
    rate_window: Duration = Field(
        default="1m",
        description="Window of rate() and histogram_quantile(); at least 4 scrape intervals.",
    )
    scrape_interval: Duration = Field(
        default="15s",
        description="How often Prometheus scrapes the model servers: the autoscaler measures a "
        "queue's growth across one scrape, and after a scale-up waits for the next one.",
    )
    queue_metric: str | None = Field(
        default=None,
        pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$",
        description="generic preset: the gauge of requests waiting. Without it the autoscaler "
        "sizes from arrival rate x mean request duration (queueing included) and p99.",
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="triton and vllm presets: the one model whose series are read when the "
        "server serves several (Triton's `model` label, vLLM's `model_name`). For a Triton "
        "ensemble name its entry model: summed over every model, each request counts once "
        "per model it runs.",
    )
    running_metric: str | None = Field(
        default=None,
        pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$",
        description="generic preset: the gauge of requests in flight.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    # CEL multiplies no durations: four scrape intervals as a sum.
                    "rule": "duration(self.rateWindow) >= duration(self.scrapeInterval) + "
                    "duration(self.scrapeInterval) + duration(self.scrapeInterval) + "
                    "duration(self.scrapeInterval)",
                    "message": "metrics.rateWindow must be at least 4 x metrics.scrapeInterval: "
                    "a shorter rate() window holds too few scrapes and often reads no data",
                    "fieldPath": ".rateWindow",
                },
            ]
        }
    )


class SignalStatus(StatusModel):
    name: str
    value: float | None = Field(default=None, description="Unset when there was no data.")
    state: Literal["value", "noData", "unavailable"] | None = Field(
        default=None, description="value, noData (no series), or unavailable (source error)."
    )
    message: str | None = Field(default=None, description="Why there is no value; +Inf etc.")


class ReplicaRecommendation(StatusModel):
    """One loop's raw recommendation, kept so the stabilization windows survive a restart."""

    time: str
    replicas: int
    queue_depth: float | None = Field(
        default=None, description="Queue depth seen then, to tell a growing queue."
    )
    lowest_replicas: int | None = Field(
        default=None,
        description="For older recommendations merged into one per time bucket: the lowest "
        "(replicas is then the highest, time the newest).",
    )


class AutoscalingStatus(StatusModel):
    """The autoscaler's last decision, enough to explain it from status alone."""

    desired_replicas: int | None = None
    current_replicas: int | None = None
    ready_replicas: int | None = None
    action: Literal["up", "down", "hold"] | None = None
    reason: str | None = None
    signals: list[SignalStatus] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    recommendations: list[ReplicaRecommendation] = Field(
        default_factory=list,
        max_length=512,
        description="Raw recommendations over the longest window: every loop of the last "
        "minute, older ones merged per time bucket.",
    )
    last_decision_time: str | None = Field(
        default=None,
        description="When the decision shown was made. The loop decides every interval but "
        "writes a decision that changes nothing that matters at most once per refresh period "
        "(TRIMTAB_AUTOSCALING_STATUS_REFRESH_SECONDS, 30s by default).",
    )
    last_scale_time: str | None = None
    last_scale_up_time: str | None = None
