"""Status for the autoscaling loop: the decision, each signal with its state, the recent
recommendations (so stabilization windows survive a restart) and the MetricsAvailable condition.

Pure: timestamps arrive as numbers and leave as RFC 3339 text."""

from __future__ import annotations

import datetime
import math
from typing import Any

from trimtab.api.autoscaling import AutoscalingSpec, AutoscalingStatus, ReplicaRecommendation
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.decisions.autoscaling import Recommendation, ReplicaDecision

# A signal as the metrics layer reports it: (state, value, message).
SignalReading = tuple[str, float | None, str]


def rfc3339(ts: float) -> str:
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def history_from_status(status: AutoscalingStatus) -> tuple[Recommendation, ...]:
    return tuple(
        Recommendation(time=parse_rfc3339(r.time), replicas=r.replicas, queue_depth=r.queue_depth)
        for r in status.recommendations
    )


def replicas_for_revision(spec: ModelDeploymentSpec, status: dict[str, Any]) -> int:
    """Replicas the reconcile applies: spec.replicas, or while the autoscaler is on, its last
    decision (spec.replicas clamped to the bounds until it has decided once).

    >>> from trimtab.api.modeldeployment import ModelDeploymentSpec as S
    >>> replicas_for_revision(S(image="x", replicas=5), {})
    5
    >>> replicas_for_revision(S(image="x", replicas=50, slo={"p99LatencyMs": 500},
    ...                         autoscaling={"maxReplicas": 8}), {})
    8
    >>> replicas_for_revision(S(image="x", slo={"p99LatencyMs": 500}, autoscaling={}),
    ...                       {"autoscaling": {"desiredReplicas": 3}})
    3
    """
    auto = spec.autoscaling
    if auto is None or not auto.enabled:
        return spec.replicas
    desired = (status.get("autoscaling") or {}).get("desiredReplicas")
    if isinstance(desired, int):
        return desired
    floor = 0 if auto.scale_to_zero else auto.min_replicas
    return max(floor, min(auto.max_replicas, max(spec.replicas, auto.min_replicas)))


def _signal(name: str, reading: SignalReading) -> dict[str, Any]:
    state, value, message = reading
    out: dict[str, Any] = {"name": name, "state": state}
    if value is not None and math.isfinite(value):
        out["value"] = round(value, 6)
    elif value is not None:
        # histogram_quantile above the top bucket: no number to show, so say so.
        out["message"] = ("+Inf" if value > 0 else "-Inf") + ": beyond the histogram's buckets"
    if message:
        out["message"] = message
    return out


def build_autoscaling_status(
    spec: AutoscalingSpec,
    decision: ReplicaDecision,
    signals: dict[str, SignalReading],
    current_replicas: int,
    ready_replicas: int,
    now: float,
    previous: AutoscalingStatus,
    scaled: bool,
) -> dict[str, Any]:
    """status.autoscaling after one loop, on the wire."""
    keep = max(
        1,
        min(512, math.ceil(spec.seconds().scale_down_stabilization / spec.seconds().interval) + 4),
    )
    recommendations = [
        ReplicaRecommendation(
            time=rfc3339(r.time), replicas=r.replicas, queue_depth=r.queue_depth
        ).to_wire()
        for r in decision.history[-keep:]
    ]
    up = scaled and decision.desired_replicas > current_replicas
    out: dict[str, Any] = {
        "desiredReplicas": decision.desired_replicas,
        "currentReplicas": decision.desired_replicas if scaled else current_replicas,
        "readyReplicas": ready_replicas,
        "action": decision.action,
        "reason": decision.reason,
        "signals": [_signal(name, reading) for name, reading in sorted(signals.items())],
        "recommendations": recommendations,
        "lastDecisionTime": rfc3339(now),
    }
    last_scale = rfc3339(now) if scaled else previous.last_scale_time
    last_up = rfc3339(now) if up else previous.last_scale_up_time
    if last_scale:
        out["lastScaleTime"] = last_scale
    if last_up:
        out["lastScaleUpTime"] = last_up
    return out
