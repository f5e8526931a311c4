"""The right-sizing timers: per ModelDeployment and per TrainingJob, read usage, recommend,
write status.recommendations, post an Event when a recommendation moves, and in Auto mode apply it.

Auto writes the applied resources to status.recommendations.applied, never to spec: spec stays
what Git says (Argo CD sees no drift and does not fight trimtab). A ModelDeployment's reconcile
takes the revision from `effective_spec`, so a resize is a new revision that goes through the
rollout; a TrainingJob's next attempt is built from `effective_training_spec`, so a running job
is never restarted only to resize."""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import kopf
from pydantic import ValidationError

from trimtab import constants as C
from trimtab.api.common import Condition, Resources
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.rightsizing import (
    CONDITION_RECOMMENDATION_APPLIED,
    CONDITION_USAGE_AVAILABLE,
    AppliedResources,
    ContainerRecommendation,
    RecommendationsStatus,
    RightsizingSpec,
)
from trimtab.api.trainingjob import (
    TERMINAL_PHASES,
    TrainingJobSpec,
    TrainingJobStatus,
    WorkerFailure,
)
from trimtab.builders.common import child_name, merge_patch
from trimtab.builders.serving import CONTAINER_NAME
from trimtab.builders.training import CONTAINER_NAME as TRAINER_CONTAINER
from trimtab.builders.training import worker_pod_regex
from trimtab.decisions.conditions import set_condition
from trimtab.decisions.rightsizing import (
    CurrentResources,
    Policy,
    effective_resources,
    effective_training_spec,
    moved,
    moved_since,
    recommend_resources,
    resources_hash,
    with_failure_kill,
    worker_resources,
)
from trimtab.decisions.training import oom_unanswered
from trimtab.handlers.inplace import InPlaceWork, cpu_in_place
from trimtab.handlers.stopping import stoppable
from trimtab.kube.resources import MODELDEPLOYMENTS, TRAININGJOBS, Resource
from trimtab.metrics.usage import UsageReader, UsageTarget, pod_regex_for

# kopf wakes the timer every TICK_S; a pass runs when the last one (status.recommendations.
# updatedAt, so it survives restarts) is older than the interval. Right-sizing follows days of
# history, so minutes are plenty and keep Prometheus at a few range queries per object.
# TRIMTAB_RIGHTSIZING_TICK_SECONDS, read once at start: kopf fixes a timer's interval when it
# registers the handler.
TICK_S = float(os.environ.get("TRIMTAB_RIGHTSIZING_TICK_SECONDS", "10"))
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


def oom_since_last_pass(status: Any) -> bool:
    """Whether a TrainingJob's last worker failure is an OOM kill newer than the last pass
    (`oom_unanswered`): such a pass runs at once, not an interval later, so a raise can be in
    place before the next attempt's Job is built (it is built from the applied resources when
    it is created; in Auto mode the restart waits for this pass, see decide_training).

    >>> oom_since_last_pass({"lastFailure": {"reason": "OOMKilled", "time": "2025-01-01T00:05:00Z"},
    ...     "recommendations": {"updatedAt": "2025-01-01T00:00:00Z"}})
    True
    >>> oom_since_last_pass({"lastFailure": {"reason": "OOMKilled", "time": "2025-01-01T00:05:00Z"},
    ...     "recommendations": {"updatedAt": "2025-01-01T00:06:00Z"}})
    False
    """
    try:
        return oom_unanswered(TrainingJobStatus.model_validate(status or {}))
    except ValidationError:
        return False


EVENT_MOVED = "RecommendationChanged"
EVENT_APPLIED = "RecommendationApplied"


def make_reader(memo: Any) -> UsageReader:
    """The usage source, one per operator (kept in memo)."""
    reader = getattr(memo, "usage_reader", None)
    if reader is None:
        reader = UsageReader(
            memo.settings.prometheus_url, connection=memo.settings.prometheus_connection()
        )
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


@dataclass(frozen=True)
class Sizing:
    """One workload to size: what differs between a ModelDeployment and a TrainingJob."""

    resource: Resource
    rightsizing: RightsizingSpec
    # spec.resources as written (its hash marks an applied recommendation as still current).
    spec_resources: Resources
    # What the pods run with (ModelDeployment) or the next attempt gets (TrainingJob).
    current: CurrentResources
    target: UsageTarget
    # How an applied recommendation takes effect: the condition's reason and a sentence.
    applied_reason: str
    applied_note: str
    # ModelDeployment: fire the reconcile now, which rolls the new revision out.
    fire_reconcile: bool
    # TrainingJob: the operator's own record of the last failed worker (an OOM kill counts).
    last_failure: WorkerFailure | None = None
    # Why an Auto apply must wait now (a rollout in progress: a new revision would replace its
    # candidate mid-analysis); empty when it may go ahead.
    apply_held: str = ""
    # ModelDeployment: the running pods' CPU requests in place between revisions.
    in_place: InPlaceWork | None = None


@kopf.timer(
    C.GROUP,
    C.VERSION,
    C.MODELDEPLOYMENT_PLURAL,
    interval=TICK_S,
    sharp=False,
)
@stoppable  # a pass cut short when the resource is deleted
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
    meta = body["metadata"]
    in_place = InPlaceWork(
        namespace=meta["namespace"],
        name=meta["name"],
        follow=parsed.rightsizing.mode == "Auto" and parsed.rightsizing.in_place.cpu,
        held=_rollout_in_progress(status),
        revision=dict(status or {}).get("currentRevision"),
        floor=Policy.from_spec(parsed.rightsizing).cpu_min,
    )
    now = time.time()
    if parsed.rightsizing.mode == "Off":
        await _turn_off(body, status, patch, memo, logger, in_place, now)
        return

    if not due(body, now):
        return
    previous = _previous(status)
    running = effective_resources(parsed.resources, parsed.rightsizing.mode, previous)
    # Pods are named <name>-<revision>-<replicaset hash>-<suffix>; child_name trims long names.
    prefix = child_name(meta["name"], "0" * 10)[: -len("-" + "0" * 10)]
    sizing = Sizing(
        resource=MODELDEPLOYMENTS,
        rightsizing=parsed.rightsizing,
        spec_resources=parsed.resources,
        current=CurrentResources.from_spec(running),
        target=UsageTarget(meta["namespace"], pod_regex_for(prefix), CONTAINER_NAME),
        applied_reason="NewRevision",
        applied_note="rolled out as a new revision",
        fire_reconcile=True,
        apply_held=in_place.held,
        in_place=in_place,
    )
    await _rightsize(body, previous, patch, memo, logger, sizing, now)


async def _turn_off(
    body: kopf.Body,
    status: Any,
    patch: kopf.Patch,
    memo: Any,
    logger: Any,
    in_place: InPlaceWork,
    now: float,
) -> None:
    """Mode Off: status.recommendations goes, once pods trimtab resized in place are back at
    their revision's request (tried once per interval while that is refused)."""
    if not dict(status or {}).get("recommendations"):
        return
    previous = _previous(status)
    if previous.in_place is not None:
        if not due(body, now):
            return
        stamp = _now_rfc3339(now)
        outcome = await cpu_in_place(
            memo.kube, body, in_place, previous.in_place, list(previous.conditions), now, stamp,
            logger,
        )  # fmt: skip
        if outcome.status is not None:
            update = {"updated_at": stamp, "conditions": outcome.conditions}
            out = previous.model_copy(update=update)
            patch.status["recommendations"] = recommendations_patch(body, out)
            return
    patch.status["recommendations"] = None


def _rollout_in_progress(status: Any) -> str:
    """Why an applied recommendation must wait: a candidate is being analysed (a new revision
    now would replace it and start the rollout over); empty when none is."""
    candidate = (dict(status or {}).get("rollout") or {}).get("candidateRevision")
    if not candidate:
        return ""
    return f"revision {candidate} is being rolled out; applied once it is promoted or rolled back"


@kopf.timer(
    C.GROUP,
    C.VERSION,
    C.TRAININGJOB_PLURAL,
    interval=TICK_S,
    sharp=False,
)
@stoppable  # a pass cut short when the resource is deleted
async def rightsize_trainingjob(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: Any,
    logger: Any,
    **_: Any,
) -> None:
    """One right-sizing pass for the worker container of one TrainingJob: one worker is sized
    from the usage of every worker of every attempt (the busiest worker at each step, since a
    throttled or killed worker stalls or restarts all of them)."""
    try:
        parsed = TrainingJobSpec.model_validate(dict(spec))
    except ValidationError:
        return  # the daemon reports an invalid spec; nothing to size
    current_status = dict(status or {})
    if parsed.rightsizing.mode == "Off":
        if current_status.get("recommendations"):
            patch.status["recommendations"] = None
        return
    if current_status.get("phase") in TERMINAL_PHASES:
        # No attempt will follow: one last pass after the job ended, then none.
        last = _parse_time((current_status.get("recommendations") or {}).get("updatedAt"))
        ended = _parse_time(current_status.get("completionTime"))
        if last is not None and (ended is None or last >= ended):
            return

    now = time.time()
    if not (due(body, now) or oom_since_last_pass(current_status)):
        return
    meta = body["metadata"]
    previous = _previous(status)
    next_attempt = effective_training_spec(parsed, current_status)
    failure_raw = current_status.get("lastFailure")
    try:
        failure = WorkerFailure.model_validate(failure_raw) if failure_raw else None
    except ValidationError:
        failure = None
    sizing = Sizing(
        resource=TRAININGJOBS,
        rightsizing=parsed.rightsizing,
        spec_resources=parsed.resources,
        current=worker_resources(next_attempt),
        target=UsageTarget(
            meta["namespace"],
            worker_pod_regex(meta["name"]),
            TRAINER_CONTAINER,
            restarts_in_place=False,
        ),
        applied_reason="NextAttempt",
        applied_note="takes effect at the next attempt's Job (after a failure or a resume); "
        "running workers are not restarted to resize",
        fire_reconcile=False,
        last_failure=failure,
    )
    await _rightsize(body, previous, patch, memo, logger, sizing, now)


async def _rightsize(
    body: kopf.Body,
    previous: RecommendationsStatus,
    patch: kopf.Patch,
    memo: Any,
    logger: Any,
    sizing: Sizing,
    now: float,
) -> None:
    """Read usage, recommend, write status.recommendations, post Events, apply in Auto."""
    stamp = _now_rfc3339(now)
    meta = body["metadata"]
    rightsizing = sizing.rightsizing
    policy = Policy.from_spec(rightsizing)
    current = sizing.current
    answer = await make_reader(memo).read(
        sizing.target,
        policy.window_s,
        now,
        wants_gpu=current.gpu > 0,
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
        if sizing.in_place is not None:
            # Blind: the pods go back up to their revision's request (in_place_cpu of no usage).
            moved_in_place = await cpu_in_place(
                memo.kube, body, sizing.in_place, previous.in_place, conditions, now, stamp, logger
            )
            conditions = moved_in_place.conditions
            out = out.model_copy(update={"in_place": moved_in_place.status})
        out = out.model_copy(update={"conditions": conditions})
        patch.status["recommendations"] = recommendations_patch(body, out)
        logger.warning("right-sizing: %s", answer.unavailable)
        return

    usage = with_failure_kill(answer.usage, sizing.last_failure)
    rec = recommend_resources(usage, current, policy, now)
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
            f"{rec.samples} of {rec.expected_samples} samples in {rightsizing.window}",
            stamp,
        )
    container = rec.to_status(rightsizing.window)
    before = next((c for c in previous.containers if c.container == container.container), None)
    container.announced = before.announced if before is not None else None
    if moved_since(before, rec, policy.min_change) and moved(rec, policy.min_change):
        # kopf.event, not kopf.info: operator_setup posts only WARNING and above from kopf.info.
        kopf.event(
            body,
            type="Normal",
            reason=EVENT_MOVED,
            message=f"{container.container}: {_summary(container)} ({rec.message})",
        )
        container.announced = container.recommended

    applied = previous.applied
    write_status_first = False
    applied_message = ""
    apply_now = rightsizing.mode == "Auto" and moved(rec, policy.min_change)
    if apply_now and container.recommended and sizing.apply_held:
        conditions = set_condition(
            conditions,
            CONDITION_RECOMMENDATION_APPLIED,
            "False",
            "WaitingForRollout",
            f"{_summary(container)}: not applied yet: {sizing.apply_held}",
            stamp,
        )
    elif apply_now and container.recommended:
        applied = AppliedResources(
            resources=container.recommended,
            applied_at=stamp,
            spec_resources_hash=resources_hash(sizing.spec_resources),
        )
        conditions = set_condition(
            conditions,
            CONDITION_RECOMMENDATION_APPLIED,
            "True",
            sizing.applied_reason,
            f"{_summary(container)}: {sizing.applied_note}",
            stamp,
        )
        applied_message = f"{container.container}: {_summary(container)}: {sizing.applied_note}"
        if sizing.fire_reconcile:
            # Status changes fire no handler; this annotation makes the reconcile roll it out.
            # kopf patches metadata before status, so status is written here first: the event
            # the annotation causes must already carry the applied resources.
            patch.metadata.annotations[C.ANNOTATION_RESOURCES_APPLIED] = stamp
            write_status_first = True
    elif rightsizing.mode != "Auto":
        applied = None
        conditions = [c for c in conditions if c.type != CONDITION_RECOMMENDATION_APPLIED]

    in_place_status = previous.in_place
    if sizing.in_place is not None:
        work = sizing.in_place
        if applied_message and not work.held:
            work = replace(work, held="a new revision with the applied requests is rolling out")
        moved_in_place = await cpu_in_place(
            memo.kube, body, work, previous.in_place, conditions, now, stamp, logger,
            cpu=usage.cpu, step_s=usage.step_seconds,
        )  # fmt: skip
        conditions, in_place_status = moved_in_place.conditions, moved_in_place.status

    others = [c for c in previous.containers if c.container != container.container]
    out = out.model_copy(
        update={
            "containers": [*others, container],
            "applied": applied,
            "conditions": conditions,
            "in_place": in_place_status,
        }
    )
    wire = recommendations_patch(body, out)
    if write_status_first:
        await memo.kube.patch_status(
            sizing.resource, meta["namespace"], meta["name"], {"recommendations": wire}
        )
    else:
        patch.status["recommendations"] = wire
    if applied_message:
        # After the status write that carries it: a refused write posts no Event of an apply
        # that did not happen.
        kopf.event(body, type="Normal", reason=EVENT_APPLIED, message=applied_message)
        logger.info("right-sizing applied: %s", applied_message)


def recommendations_patch(body: Any, out: RecommendationsStatus) -> dict[str, Any]:
    """The merge patch that makes status.recommendations exactly `out`: a key it no longer has
    is removed (null), at every depth. A plain merge patch of `out` left such keys behind: an
    applied cpuLimit the user had since removed came back with the next apply."""
    stored = ((body.get("status") or {}).get("recommendations")) or {}
    return merge_patch(dict(stored), out.to_wire(), remove_missing=True)


def _summary(c: ContainerRecommendation) -> str:
    cur, rec = c.current, c.recommended
    if rec is None:
        return c.message
    return f"cpu {cur.cpu or 'unset'} -> {rec.cpu}, memory {cur.memory or 'unset'} -> {rec.memory}"
