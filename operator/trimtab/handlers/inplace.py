"""In-place CPU: between revisions, the right-sizing pass of a ModelDeployment in Auto mode
resizes its running pods' CPU requests through the pods' `resize` subresource (Kubernetes
in-place pod resize), following usage within the day under the revision's own request.

No pod is restarted: a CPU request has no restart policy by default, and pods whose container
would restart (or whose QoS class would change) are left alone. While a rollout is in progress,
when in-place is turned off, or when usage cannot be read, the pods go back to their revision's
request: analysis compares revisions at the requests they were built with, and nothing is
kept small blind."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import kopf

from trimtab import constants as C
from trimtab.api.common import Condition, ConditionStatus
from trimtab.api.quantity import format_cpu, parse_quantity
from trimtab.api.rightsizing import CONDITION_CPU_RESIZED_IN_PLACE, InPlaceStatus
from trimtab.builders.serving import CONTAINER_NAME, deployment_name
from trimtab.decisions.conditions import is_news, remove_condition, set_condition
from trimtab.decisions.rightsizing import (
    IN_PLACE_REFUSALS,
    InPlaceCpu,
    PodCpuResize,
    Sample,
    in_place_cpu,
    in_place_verdict,
    plan_cpu_resizes,
)
from trimtab.kube.client import KubeClient, KubeError
from trimtab.kube.resources import DEPLOYMENTS, PODS
from trimtab.observability import IN_PLACE_CPU, IN_PLACE_RESIZES

EVENT_IN_PLACE_FAILED = "InPlaceResizeFailed"

UNSUPPORTED = (
    "the API server does not serve pods/resize (in-place pod resize needs Kubernetes 1.33 or "
    "later); CPU requests change only with a new revision"
)
FORBIDDEN = (
    "trimtab may not patch pods/resize: its ClusterRole lacks it (upgrade the chart, which "
    "grants it)"
)


@dataclass(frozen=True)
class InPlaceWork:
    """What one ModelDeployment's pass asks of in-place CPU."""

    namespace: str
    name: str
    # Auto mode with rightsizing.inPlace.cpu.
    follow: bool
    # Why the pods go back to their revision's request now (a rollout in progress); empty when
    # they may follow usage.
    held: str
    # status.currentRevision: the revision whose pods follow usage.
    revision: str | None
    # The smallest request (rightsizing.cpu.min, at least MIN_CPU).
    floor: float


@dataclass(frozen=True)
class InPlaceOutcome:
    status: InPlaceStatus | None
    conditions: list[Condition]


def template_cpu(deployment: dict[str, Any]) -> float | None:
    """The server container's CPU request in a revision's Deployment template (its ceiling)."""
    pod_spec = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    for container in pod_spec.get("containers") or []:
        if container.get("name") == CONTAINER_NAME:
            cpu = ((container.get("resources") or {}).get("requests") or {}).get("cpu")
            return float(parse_quantity(str(cpu))) if cpu else None
    return None


def _failure(err: KubeError, pod: str) -> tuple[str, str]:
    """(result, message) of a refused resize."""
    details = (err.body or {}).get("details") if isinstance(err.body, dict) else None
    if err.not_found:
        if isinstance(details, dict) and details.get("name") == pod:
            return "gone", ""
        return "unsupported", UNSUPPORTED
    if err.status == 403:
        return "forbidden", FORBIDDEN
    if err.conflict or err.test_failed:
        return "changed", ""  # changed since it was listed: the next pass sees the new value
    return "refused", f"{pod}: {err.message}"


async def _resize(
    kube: KubeClient, namespace: str, resize: PodCpuResize
) -> tuple[str, str]:
    """One pod's resize, only if its request is still what the plan read."""
    base = f"/spec/containers/{resize.index}"
    ops = [
        {"op": "test", "path": f"{base}/name", "value": CONTAINER_NAME},
        {"op": "test", "path": f"{base}/resources/requests/cpu", "value": resize.current},
        {"op": "replace", "path": f"{base}/resources/requests/cpu", "value": resize.target},
    ]
    try:
        await kube.json_patch(PODS, namespace, resize.pod, ops, subresource="resize")
    except KubeError as err:
        return _failure(err, resize.pod)
    return "ok", ""


async def cpu_in_place(
    kube: KubeClient,
    body: Any,
    work: InPlaceWork,
    previous: InPlaceStatus | None,
    conditions: list[Condition],
    now: float,
    stamp: str,
    logger: Any,
    cpu: Sequence[Sample] = (),
    step_s: float = 300.0,
) -> InPlaceOutcome:
    """Resize the running pods of one revision in place; the status and conditions after it.

    Following (Auto, inPlace.cpu, no rollout): the pods of status.currentRevision go to
    `in_place_cpu` of the usage `cpu` (none: back to the revision's request). Otherwise, pods
    trimtab resized before (`previous`) go back to their revision's request, and
    status.recommendations.inPlace is dropped once they are."""
    restore = not work.follow or bool(work.held)
    if restore and previous is None:
        return _done_restoring(work, conditions, stamp)
    revision = previous.revision if restore and previous is not None else work.revision
    if not revision:
        return InPlaceOutcome(previous, conditions)
    deployment = await kube.get(DEPLOYMENTS, work.namespace, deployment_name(work.name, revision))
    if deployment is None:
        if restore:  # the revision is gone, and its pods with it
            return _done_restoring(work, conditions, stamp)
        waiting = f"revision {revision} has no Deployment yet"
        return InPlaceOutcome(
            previous, _set(conditions, "False", "WaitingForRevision", waiting, stamp)
        )
    ceiling = template_cpu(deployment)
    if restore:
        why = work.held or "in-place CPU is off"
        target = InPlaceCpu(ceiling, f"back to the revision's request: {why}")
    else:
        target = in_place_cpu(cpu, now, ceiling, work.floor, step_s)
    if target.request is None or ceiling is None:
        IN_PLACE_CPU.remove_by_labels({"namespace": work.namespace, "name": work.name})
        message = f"{target.reason}: there is no request to follow usage under"
        return InPlaceOutcome(None, _set(conditions, "False", "NoCPURequest", message, stamp))

    pods = await kube.list(
        PODS, work.namespace, {C.LABEL_OWNER: work.name, C.LABEL_REVISION: revision}
    )
    plan = plan_cpu_resizes(pods, CONTAINER_NAME, target.request, exact=restore)
    resized = 0
    refusals: dict[str, str] = {}
    for refusal in IN_PLACE_REFUSALS:
        # At 0 from the start, so a first refusal is an increase an alert sees.
        IN_PLACE_RESIZES.labels(work.namespace, work.name, refusal)
    for resize in plan.resizes:
        result, message = await _resize(kube, work.namespace, resize)
        IN_PLACE_RESIZES.labels(work.namespace, work.name, result).inc()
        if result == "ok":
            resized += 1
        elif result in IN_PLACE_REFUSALS:
            refusals.setdefault(result, message)
    if plan.resizes:
        logger.info(
            "in-place CPU: %d of %d pods of revision %s -> %s (%s)",
            resized,
            len(plan.resizes),
            revision,
            format_cpu(target.request),
            target.reason,
        )
    if restore and not refusals:
        return _done_restoring(work, conditions, stamp)

    status, reason, message = in_place_verdict(target, plan, resized, refusals)
    if refusals:
        if is_news(conditions, CONDITION_CPU_RESIZED_IN_PLACE, status, reason):
            kopf.event(body, type="Warning", reason=EVENT_IN_PLACE_FAILED, message=message)
        # What was set before stays: the next pass tries again.
        return InPlaceOutcome(previous, _set(conditions, status, reason, message, stamp))
    if reason == "NotResizable":  # nothing runs at the target: no status or gauge says so
        IN_PLACE_CPU.remove_by_labels({"namespace": work.namespace, "name": work.name})
        return InPlaceOutcome(None, _set(conditions, status, reason, message, stamp))
    IN_PLACE_CPU.labels(work.namespace, work.name).set(target.request)
    in_place = InPlaceStatus(
        container=CONTAINER_NAME,
        revision=revision,
        cpu=format_cpu(target.request),
        ceiling=format_cpu(ceiling),
        reason=target.reason,
        recent_peak=format_cpu(target.recent_peak) if target.recent_peak is not None else None,
        same_time_peak=(
            format_cpu(target.same_time_peak) if target.same_time_peak is not None else None
        ),
        days=target.days,
        pods=len(plan.settled) + resized,
        pending=len(plan.pending),
        updated_at=stamp,
    )
    return InPlaceOutcome(in_place, _set(conditions, status, reason, message, stamp))


def _set(
    conditions: list[Condition], status: ConditionStatus, reason: str, message: str, stamp: str
) -> list[Condition]:
    return set_condition(conditions, CONDITION_CPU_RESIZED_IN_PLACE, status, reason, message, stamp)


def _done_restoring(work: InPlaceWork, conditions: list[Condition], stamp: str) -> InPlaceOutcome:
    """No pod is held below its revision's request: no in-place status; a held pass says why."""
    IN_PLACE_CPU.remove_by_labels({"namespace": work.namespace, "name": work.name})
    kept = remove_condition(conditions, CONDITION_CPU_RESIZED_IN_PLACE)
    if work.follow and work.held:
        kept = _set(kept, "False", "RolloutInProgress", work.held, stamp)
    return InPlaceOutcome(None, kept)
