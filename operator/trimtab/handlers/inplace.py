"""In-place CPU: between revisions, the right-sizing pass of a ModelDeployment in Auto mode
resizes its running pods' CPU requests through the pods' `resize` subresource (Kubernetes
in-place pod resize), following usage within the day under the revision's own request.

No pod is restarted: a CPU request has no restart policy by default, and pods whose container
would restart (or whose QoS class would change) are left alone. While a rollout is in progress,
when in-place is turned off, or when usage cannot be read, the pods go back to their revision's
request: analysis compares revisions at the requests they were built with, and nothing is
kept small blind."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from trimtab import constants as C
from trimtab.api.common import Condition
from trimtab.api.quantity import format_cpu, parse_quantity
from trimtab.api.rightsizing import CONDITION_CPU_RESIZED_IN_PLACE, InPlaceStatus
from trimtab.builders.serving import CONTAINER_NAME, deployment_name
from trimtab.decisions.conditions import set_condition
from trimtab.decisions.rightsizing import (
    InPlaceCpu,
    PodCpuResize,
    Sample,
    in_place_cpu,
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
    if err.conflict or (err.invalid and "test" in err.message.lower()):
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
    work: InPlaceWork,
    cpu: Sequence[Sample],
    step_s: float,
    floor: float,
    previous: InPlaceStatus | None,
    conditions: list[Condition],
    now: float,
    stamp: str,
    warn: Callable[[str, str], None],
    logger: Any,
) -> InPlaceOutcome:
    """Resize the running pods of one revision in place; the status and conditions after it.

    Following (Auto, inPlace.cpu, no rollout): the pods of status.currentRevision go to
    `in_place_cpu` of the usage. Otherwise, pods trimtab resized before (`previous`) go back to
    their revision's request, and status.recommendations.inPlace is dropped once they are."""
    restore = not work.follow or bool(work.held)
    if restore and previous is None:
        kept = [c for c in conditions if c.type != CONDITION_CPU_RESIZED_IN_PLACE]
        if work.follow and work.held:
            kept = set_condition(
                kept, CONDITION_CPU_RESIZED_IN_PLACE, "False", "RolloutInProgress", work.held, stamp
            )
        return InPlaceOutcome(None, kept)
    revision = previous.revision if restore and previous is not None else work.revision
    if not revision:
        return InPlaceOutcome(previous, conditions)
    deployment = await kube.get(DEPLOYMENTS, work.namespace, deployment_name(work.name, revision))
    if deployment is None:
        if restore:  # the revision is gone, and its pods with it
            return _done_restoring(work, conditions, stamp)
        return InPlaceOutcome(
            previous,
            set_condition(
                conditions,
                CONDITION_CPU_RESIZED_IN_PLACE,
                "False",
                "WaitingForRevision",
                f"revision {revision} has no Deployment yet",
                stamp,
            ),
        )
    ceiling = template_cpu(deployment)
    if restore:
        why = work.held or "in-place CPU is off"
        target = InPlaceCpu(ceiling, f"back to the revision's request: {why}")
    else:
        target = in_place_cpu(cpu, now, ceiling, floor, step_s)
    if target.request is None:
        IN_PLACE_CPU.remove_by_labels({"namespace": work.namespace, "name": work.name})
        return InPlaceOutcome(
            None,
            set_condition(
                conditions,
                CONDITION_CPU_RESIZED_IN_PLACE,
                "False",
                "NoCPURequest",
                f"{target.reason}: there is no request to follow usage under",
                stamp,
            ),
        )

    pods = await kube.list(
        PODS, work.namespace, {C.LABEL_OWNER: work.name, C.LABEL_REVISION: revision}
    )
    plan = plan_cpu_resizes(pods, CONTAINER_NAME, target.request)
    resized = 0
    failures: dict[str, str] = {}
    for resize in plan.resizes:
        result, message = await _resize(kube, work.namespace, resize)
        IN_PLACE_RESIZES.labels(work.namespace, work.name, result).inc()
        if result == "ok":
            resized += 1
        elif result not in ("gone", "changed"):
            failures.setdefault(result, message)
    done = len(plan.settled) + resized
    if plan.resizes:
        logger.info(
            "in-place CPU: %d of %d pods of revision %s -> %s (%s)",
            resized,
            len(plan.resizes),
            revision,
            format_cpu(target.request),
            target.reason,
        )

    before = next((c for c in conditions if c.type == CONDITION_CPU_RESIZED_IN_PLACE), None)
    if failures:
        result = next(r for r in ("unsupported", "forbidden", "refused") if r in failures)
        reason = {"unsupported": "Unsupported", "forbidden": "Forbidden", "refused": "Refused"}[
            result
        ]
        message = failures[result]
        if before is None or before.reason != reason:
            warn(EVENT_IN_PLACE_FAILED, message)
        return InPlaceOutcome(
            previous,
            set_condition(
                conditions, CONDITION_CPU_RESIZED_IN_PLACE, "False", reason, message, stamp
            ),
        )
    if restore:
        return _done_restoring(work, conditions, stamp)

    IN_PLACE_CPU.labels(work.namespace, work.name).set(target.request)
    status = InPlaceStatus(
        container=CONTAINER_NAME,
        revision=revision,
        cpu=format_cpu(target.request),
        ceiling=format_cpu(ceiling) if ceiling else format_cpu(target.request),
        reason=target.reason,
        recent_peak=format_cpu(target.recent_peak) if target.recent_peak is not None else None,
        same_time_peak=(
            format_cpu(target.same_time_peak) if target.same_time_peak is not None else None
        ),
        days=target.days,
        pods=done,
        pending=len(plan.pending),
        updated_at=stamp,
    )
    if plan.pending:
        pod, reason, message = plan.pending[0]
        text = f"{len(plan.pending)} pod(s) wait for the kubelet, e.g. {pod}: {reason}"
        text += f" ({message})" if message else ""
        return InPlaceOutcome(
            status,
            set_condition(conditions, CONDITION_CPU_RESIZED_IN_PLACE, "False", reason, text, stamp),
        )
    skipped = f"; {len(plan.skipped)} left alone ({plan.skipped[0][1]})" if plan.skipped else ""
    return InPlaceOutcome(
        status,
        set_condition(
            conditions,
            CONDITION_CPU_RESIZED_IN_PLACE,
            "True",
            "Following",
            f"{done} pod(s) at {format_cpu(target.request)}: {target.reason}{skipped}",
            stamp,
        ),
    )


def _done_restoring(work: InPlaceWork, conditions: list[Condition], stamp: str) -> InPlaceOutcome:
    """Every pod is back at its revision's request: no in-place status; a held pass says why."""
    IN_PLACE_CPU.remove_by_labels({"namespace": work.namespace, "name": work.name})
    kept = [c for c in conditions if c.type != CONDITION_CPU_RESIZED_IN_PLACE]
    if work.follow and work.held:
        kept = set_condition(
            kept, CONDITION_CPU_RESIZED_IN_PLACE, "False", "RolloutInProgress", work.held, stamp
        )
    return InPlaceOutcome(None, kept)
