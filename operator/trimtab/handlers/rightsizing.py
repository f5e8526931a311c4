"""The right-sizing timer: per ModelDeployment, read usage, recommend, write
status.recommendations, post an Event when a recommendation moves, and in Auto mode apply it.

Auto writes the applied resources to status.recommendations.applied, never to spec: spec stays
what Git says (Argo CD sees no drift and does not fight trimtab), and reconcile takes the
revision from `effective_spec`, so a resize is a new revision that goes through the rollout."""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import kopf
from pydantic import ValidationError

from trimtab import constants as C
from trimtab.api.common import Condition
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.rightsizing import (
    CONDITION_RECOMMENDATION_APPLIED,
    CONDITION_USAGE_AVAILABLE,
    AppliedResources,
    ContainerRecommendation,
    RecommendationsStatus,
)
from trimtab.builders.common import child_name
from trimtab.builders.serving import CONTAINER_NAME
from trimtab.decisions.conditions import set_condition
from trimtab.decisions.rightsizing import (
    CurrentResources,
    Policy,
    effective_resources,
    moved,
    moved_since,
    recommend_resources,
    resources_hash,
)
from trimtab.kube.resources import MODELDEPLOYMENTS
from trimtab.metrics.usage import UsageReader, UsageTarget, pod_regex_for

# kopf wakes the timer every TICK_S; a pass runs when the last one (status.recommendations.
# updatedAt, so it survives restarts) is older than the interval. Right-sizing follows days of
# history, so minutes are plenty and keep Prometheus at a few range queries per object.
TICK_S = 10.0
DEFAULT_INTERVAL_S = 300.0
# The first pass waits this long after creation: there is no usage to read before.
FIRST_PASS_DELAY_S = 60.0


def interval_s() -> float:
    """TRIMTAB_RIGHTSIZING_INTERVAL_SECONDS, read on each tick."""
    return float(os.environ.get("TRIMTAB_RIGHTSIZING_INTERVAL_SECONDS", DEFAULT_INTERVAL_S))


def _parse_time(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def due(body: Any, now: float) -> bool:
    """Whether a right-sizing pass is due: one interval after the last, and not before
    min(interval, FIRST_PASS_DELAY_S) after creation."""
    every = interval_s()
    last = _parse_time(((body.get("status") or {}).get("recommendations") or {}).get("updatedAt"))
    if last is not None:
        return now - last >= every
    created = _parse_time((body.get("metadata") or {}).get("creationTimestamp"))
    return created is None or now - created >= min(every, FIRST_PASS_DELAY_S)


EVENT_MOVED = "RecommendationChanged"
EVENT_APPLIED = "RecommendationApplied"


def make_reader(memo: Any) -> UsageReader:
    """The usage source, one per operator (kept in memo)."""
    reader = getattr(memo, "usage_reader", None)
    if reader is None:
        reader = UsageReader(memo.settings.prometheus_url)
        memo.usage_reader = reader
    return reader


def _now_rfc3339(now: float) -> str:
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).replace(microsecond=0)
    return stamp.isoformat().replace("+00:00", "Z")


def _previous(status: Any) -> RecommendationsStatus:
    raw = (status or {}).get("recommendations")
    try:
        return RecommendationsStatus.model_validate(raw or {})
    except ValidationError:
        return RecommendationsStatus()


@kopf.timer(
    C.GROUP,
    C.VERSION,
    C.MODELDEPLOYMENT_PLURAL,
    interval=TICK_S,
    sharp=False,
)
async def rightsize_modeldeployment(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: Any,
    logger: Any,
    **_: Any,
) -> None:
    """One right-sizing pass for the server container of one ModelDeployment."""
    try:
        parsed = ModelDeploymentSpec.model_validate(dict(spec))
    except ValidationError:
        return  # reconcile reports an invalid spec; nothing to size
    if parsed.rightsizing.mode == "Off":
        if dict(status or {}).get("recommendations"):
            patch.status["recommendations"] = None
        return

    now = time.time()
    if not due(body, now):
        return
    stamp = _now_rfc3339(now)
    meta = body["metadata"]
    previous = _previous(status)
    policy = Policy.from_spec(parsed.rightsizing)
    running = effective_resources(parsed.resources, parsed.rightsizing.mode, previous)
    current = CurrentResources.from_spec(running)
    # Pods are named <name>-<revision>-<replicaset hash>-<suffix>; child_name trims long names.
    prefix = child_name(meta["name"], "0" * 10)[: -len("-" + "0" * 10)]
    target = UsageTarget(meta["namespace"], pod_regex_for(prefix), CONTAINER_NAME)
    answer = await make_reader(memo).read(
        target, policy.window_s, now, memory_limit=current.memory_limit, wants_gpu=current.gpu > 0
    )

    conditions: list[Condition] = list(previous.conditions)
    out = previous.model_copy(update={"updated_at": stamp})
    if answer.usage is None:
        # Keep the last recommendation: the source is down, the workload has not changed.
        conditions = set_condition(
            conditions,
            CONDITION_USAGE_AVAILABLE,
            "False",
            "SourceUnavailable",
            answer.unavailable,
            stamp,
        )
        out = out.model_copy(update={"conditions": conditions})
        patch.status["recommendations"] = out.to_wire()
        logger.warning("right-sizing: %s", answer.unavailable)
        return

    rec = recommend_resources(answer.usage, current, policy, now)
    if rec.missing_series:
        conditions = set_condition(
            conditions,
            CONDITION_USAGE_AVAILABLE,
            "False",
            "MissingSeries",
            "no data for " + ", ".join(rec.missing_series),
            stamp,
        )
    else:
        conditions = set_condition(
            conditions,
            CONDITION_USAGE_AVAILABLE,
            "True",
            "SeriesPresent",
            f"{rec.samples} of {rec.expected_samples} samples in {parsed.rightsizing.window}",
            stamp,
        )
    container = rec.to_status(parsed.rightsizing.window)
    before = next((c for c in previous.containers if c.container == container.container), None)
    if moved_since(before, rec, policy.min_change) and moved(rec, policy.min_change):
        # kopf.event, not kopf.info: operator_setup posts only WARNING and above from kopf.info.
        kopf.event(
            body,
            type="Normal",
            reason=EVENT_MOVED,
            message=f"{container.container}: {_summary(container)} ({rec.message})",
        )

    applied = previous.applied
    write_status_first = False
    if (
        parsed.rightsizing.mode == "Auto"
        and moved(rec, policy.min_change)
        and container.recommended is not None
    ):
        applied = AppliedResources(
            resources=container.recommended,
            applied_at=stamp,
            spec_resources_hash=resources_hash(parsed.resources),
        )
        conditions = set_condition(
            conditions,
            CONDITION_RECOMMENDATION_APPLIED,
            "True",
            "NewRevision",
            f"{_summary(container)}: rolled out as a new revision",
            stamp,
        )
        message = f"{container.container}: {_summary(container)}"
        kopf.event(body, type="Normal", reason=EVENT_APPLIED, message=message)
        logger.info("right-sizing applied: %s", _summary(container))
        # Status changes fire no handler; this annotation makes the reconcile roll it out.
        # kopf patches metadata before status, so status is written here first: the event the
        # annotation causes must already carry the applied resources.
        patch.metadata.annotations[C.ANNOTATION_RESOURCES_APPLIED] = stamp
        write_status_first = True
    elif parsed.rightsizing.mode != "Auto":
        applied = None
        conditions = [c for c in conditions if c.type != CONDITION_RECOMMENDATION_APPLIED]

    others = [c for c in previous.containers if c.container != container.container]
    out = out.model_copy(
        update={"containers": [*others, container], "applied": applied, "conditions": conditions}
    )
    wire = out.to_wire()
    if applied is None and previous.applied is not None:
        wire["applied"] = None  # merge patch: null removes it
    if write_status_first:
        await memo.kube.patch_status(
            MODELDEPLOYMENTS, meta["namespace"], meta["name"], {"recommendations": wire}
        )
    else:
        patch.status["recommendations"] = wire


def _summary(c: ContainerRecommendation) -> str:
    cur, rec = c.current, c.recommended
    if rec is None:
        return c.message
    return f"cpu {cur.cpu or 'unset'} -> {rec.cpu}, memory {cur.memory or 'unset'} -> {rec.memory}"
