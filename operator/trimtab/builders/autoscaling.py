"""Status for the autoscaling loop: the decision, each signal with its state, the recent
recommendations (so stabilization windows survive a restart), the MetricsAvailable condition,
and which changes to it must be written at once and which can wait for the next refresh.

Pure: timestamps arrive as numbers and leave as RFC 3339 text."""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Mapping
from typing import Any

from trimtab.api.autoscaling import AutoscalingSpec, AutoscalingStatus, ReplicaRecommendation
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.decisions.autoscaling import Recommendation, ReplicaDecision

# The most recommendations status holds (the CRD's maxItems); decide_replicas keeps far fewer.
MAX_RECOMMENDATIONS = 512
# A signal as the metrics layer reports it: (state, value, message).
SignalReading = tuple[str, float | None, str]


def rfc3339(ts: float) -> str:
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def history_from_status(status: AutoscalingStatus) -> tuple[Recommendation, ...]:
    return tuple(
        Recommendation(
            time=parse_rfc3339(r.time),
            replicas=r.replicas,
            queue_depth=r.queue_depth,
            lowest=r.lowest_replicas,
        )
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
    """status.autoscaling after one loop, on the wire.

    The recommendations are the decision's history as it keeps it (`compact_history`): every
    loop of the last minute, and older ones merged per bucket, wider with age (at most 1/16
    of it), so they span the scale-down, scale-up and idle windows in a bounded list. The
    cap is only a guard for a history that did not come from decide_replicas."""
    recommendations = [
        ReplicaRecommendation(
            time=rfc3339(r.time),
            replicas=r.replicas,
            queue_depth=r.queue_depth,
            lowest_replicas=r.lowest,
        ).to_wire()
        for r in decision.history[-MAX_RECOMMENDATIONS:]
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


# Fields of status.autoscaling whose change is news: the decision and the replicas it acted on.
_WRITE_AT_ONCE = (
    "desiredReplicas",
    "currentReplicas",
    "readyReplicas",
    "action",
    "lastScaleTime",
    "lastScaleUpTime",
)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _reason_shape(reason: Any) -> str:
    """A reason with its numbers masked: what it says, not the live values it quotes.

    >>> _reason_shape("demand 1.4 concurrent (1.02 req/s x 0.50s) / 8.0 per replica = 1")
    'demand # concurrent (# req/s x #s) / # per replica = #'
    """
    return _NUMBER.sub("#", str(reason or ""))


def _signal_states(status: Mapping[str, Any]) -> dict[str, Any]:
    return {s.get("name"): s.get("state") for s in status.get("signals") or []}


def status_write_due(
    written: Mapping[str, Any],
    built: Mapping[str, Any],
    *,
    scaled: bool,
    conditions_changed: bool,
    now: float,
    refresh_seconds: float,
) -> str | None:
    """Why status.autoscaling must be written now, or None when this loop's status can wait.

    `written` is status.autoscaling as the API server holds it, `built` what this loop built
    (build_autoscaling_status); `scaled` says a Deployment's replicas were set this loop (a
    scale, or a new split between revisions), `conditions_changed` that MetricsAvailable moved.
    Written at once: a scale, a new decision (desired, current or ready replicas, action, or a
    reason that says something else, its quoted numbers aside), a scale timestamp, a signal
    whose state (value, noData, unavailable) moved, a condition. Anything else, such as signal
    values and the recommendation history, waits until `refresh_seconds` after the written
    lastDecisionTime (or at once when that lies in the future: another clock wrote it). The loop
    carries what it has not written in memory, so the next decision loses nothing.

    >>> held = {"desiredReplicas": 2, "currentReplicas": 2, "readyReplicas": 2,
    ...         "action": "hold", "reason": "demand 9.6 concurrent / 8.0 per replica = 2",
    ...         "signals": [{"name": "queueDepth", "state": "value", "value": 0}],
    ...         "lastDecisionTime": "2025-01-01T00:00:00.000Z"}
    >>> t0 = parse_rfc3339(held["lastDecisionTime"])
    >>> drift = {**held, "reason": "demand 9.9 concurrent / 8.0 per replica = 2",
    ...          "signals": [{"name": "queueDepth", "state": "value", "value": 1}],
    ...          "lastDecisionTime": "2025-01-01T00:00:05.000Z"}
    >>> due = dict(scaled=False, conditions_changed=False, refresh_seconds=30)
    >>> status_write_due(held, drift, now=t0 + 5, **due) is None  # new numbers only: wait
    True
    >>> status_write_due(held, drift, now=t0 + 30, **due)  # a refresh period since the write
    'refresh: 30s since the last write'
    >>> status_write_due(held, {**drift, "desiredReplicas": 3, "action": "up"}, now=t0 + 5, **due)
    'desiredReplicas changed'
    >>> gone = {**drift, "signals": [{"name": "queueDepth", "state": "noData"}]}
    >>> status_write_due(held, gone, now=t0 + 5, **due)
    'signal state changed: queueDepth'
    >>> status_write_due({}, drift, now=t0 + 5, **due)  # nothing written yet
    'first decision'
    """
    if not written.get("lastDecisionTime"):
        return "first decision"
    if scaled:
        return "scaled"
    for key in _WRITE_AT_ONCE:
        if written.get(key) != built.get(key):
            return f"{key} changed"
    if _reason_shape(written.get("reason")) != _reason_shape(built.get("reason")):
        return "reason changed"
    before, after = _signal_states(written), _signal_states(built)
    if before != after:
        names = before.keys() | after.keys()
        moved = sorted(str(n) for n in names if before.get(n) != after.get(n))
        return "signal state changed: " + ", ".join(moved)
    if conditions_changed:
        return "condition changed"
    since = now - parse_rfc3339(str(written["lastDecisionTime"]))
    if since < 0:
        return "refresh: the last write is dated after this clock's now"
    if since >= refresh_seconds:
        return f"refresh: {since:.0f}s since the last write"
    return None
