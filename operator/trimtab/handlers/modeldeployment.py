"""kopf handlers for ModelDeployment: apply the Deployments of the revisions that run (the
spec's own; with spec.rollout, the stable one and the candidate beside it) and the Service, and
keep status in step with the Deployments, which kopf indexes as they change.

Each handler parses, asks decisions/ and builders/, writes only what differs, and records why."""

from __future__ import annotations

import datetime
import logging
import os
import time
from typing import Any, cast

import kopf

from trimtab import constants as C
from trimtab.api.common import Condition
from trimtab.api.modeldeployment import (
    CONDITION_DEGRADED,
    CONDITION_METRICS_AVAILABLE,
    CONDITION_READY,
    ModelDeploymentSpec,
)
from trimtab.api.rollout import ROLLOUT_CONDITIONS, RolloutStatus
from trimtab.builders.autoscaling import replicas_for_revision
from trimtab.builders.common import Owner, merge_patch
from trimtab.builders.routing import route_record
from trimtab.builders.serving import (
    build_deployment,
    build_disruption_budget,
    build_service,
    revision_of,
    selector_string,
)
from trimtab.decisions.conditions import get_condition, set_condition
from trimtab.decisions.rightsizing import effective_spec
from trimtab.decisions.rollout import RevisionPlan, plan_revisions, spec_with_model
from trimtab.decisions.serving import (
    DeploymentObservation,
    checked_spec,
    plan_disruption_budget,
    serving_state,
)
from trimtab.handlers.routes import release_stale_route, route_lock
from trimtab.kube.client import KubeClient, KubeError, NameTaken, patch_status_from
from trimtab.kube.resources import (
    DEPLOYMENTS,
    MODELDEPLOYMENTS,
    PODDISRUPTIONBUDGETS,
    SERVICES,
)
from trimtab.observability import RECONCILE_SECONDS, RECONCILES, forget_resource

KIND = C.MODELDEPLOYMENT_KIND
# Deployments of serving revisions; only these feed the index.
SERVING_LABELS: dict[str, Any] = {
    C.LABEL_MANAGED_BY: C.MANAGED_BY,
    C.LABEL_OWNER: kopf.PRESENT,
    C.LABEL_REVISION: kopf.PRESENT,
}
# The Service named after a resource: trimtab's, with no revision (a mesh router's per-revision
# Services carry one, and the rollout loop re-applies those itself).
RESOURCE_SERVICE_LABELS: dict[str, Any] = {
    C.LABEL_MANAGED_BY: C.MANAGED_BY,
    C.LABEL_OWNER: kopf.PRESENT,
    C.LABEL_REVISION: kopf.ABSENT,
}
# Degraded reasons set by the reconcile; Deployment events do not clear them.
SPEC_REASONS = ("InvalidSpec", "ApplyRejected", "NameTaken")
NAME_TAKEN_RETRY_SECONDS = 30

# How often a ModelDeployment is checked for a spec generation no reconcile has taken up.
CONVERGE_S = float(os.environ.get("TRIMTAB_CONVERGE_SECONDS", "30"))
# kopf's record of the reconcile handler in progress (or waiting to retry) on an object.
RECONCILE_PROGRESS = f"{C.KOPF_ANNOTATION_PREFIX}/reconcile_modeldeployment"

IndexKey = tuple[str, str]
Log = logging.Logger | logging.LoggerAdapter[Any]


def now_rfc3339() -> str:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    return now.isoformat().replace("+00:00", "Z")


def owner_of(body: kopf.Body) -> Owner:
    meta = body["metadata"]
    return Owner(C.API_VERSION, KIND, meta["name"], meta["namespace"], meta["uid"])


def parse_spec(spec: Any, status: Any = None) -> tuple[ModelDeploymentSpec | None, list[str]]:
    """The spec pods run with, or the problems that make it unusable, each naming the field.

    With `status`, resources that right-sizing applied in Auto mode replace spec.resources:
    every handler takes the revision from this, so an applied recommendation is a new revision
    that goes through the normal rollout."""
    parsed, problems = checked_spec(spec)
    if parsed is not None and status is not None and not problems:
        parsed = effective_spec(parsed, dict(status))
    return parsed, problems


def _conditions(status: Any) -> list[Condition]:
    return [Condition.model_validate(c) for c in (status or {}).get("conditions") or []]


@kopf.index("apps", "v1", "deployments", labels=SERVING_LABELS)
def serving_deployments(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[IndexKey, DeploymentObservation]:
    """Every serving Deployment's observed state, keyed by (namespace, ModelDeployment name)."""
    return {
        (namespace or "", labels[C.LABEL_OWNER]): DeploymentObservation.from_manifest(
            labels[C.LABEL_REVISION], dict(body)
        )
    }


def _observations(
    index: kopf.Index[IndexKey, DeploymentObservation], key: IndexKey
) -> list[DeploymentObservation]:
    return list(index.get(key, []))


def desired_status(
    body: Any,
    revision: str,
    observations: list[DeploymentObservation],
    generation: int,
    now: str,
) -> tuple[dict[str, Any], bool]:
    """The status fields that follow the Deployments, and whether the current revision is ready."""
    status = body.get("status") or {}
    state = serving_state(revision, observations, _conditions(status), generation, now)
    owner = owner_of(body)
    return (
        {
            "phase": state.phase,
            "message": state.message,
            "replicas": state.replicas,
            "readyReplicas": state.ready_replicas,
            "updatedReplicas": state.updated_replicas,
            "currentRevision": revision,
            "selector": selector_string(owner),
            "conditions": [c.to_wire() for c in state.conditions],
        },
        state.current_ready,
    )


async def _degrade(
    body: kopf.Body, patch: kopf.Patch, reason: str, problems: list[str], generation: int
) -> None:
    message = "; ".join(problems)
    now = now_rfc3339()
    conds = _conditions(body.get("status"))
    before = get_condition(conds, CONDITION_DEGRADED)
    said = (before.status, before.reason, before.message) if before is not None else None
    told = said == ("True", reason, message)
    conds = set_condition(conds, CONDITION_DEGRADED, "True", reason, message, now, generation)
    conds = set_condition(conds, CONDITION_READY, "False", reason, message, now, generation)
    desired = {
        "phase": "Degraded",
        "message": message,
        "observedGeneration": generation,
        "conditions": [c.to_wire() for c in conds],
    }
    changes = merge_patch(dict(body.get("status") or {}), desired)
    for key, value in changes.items():
        patch.status[key] = value
    if not told:  # a retry that finds the same problem (NameTaken) says it once
        kopf.warn(body, reason=reason, message=message)


@kopf.on.resume(C.GROUP, C.VERSION, C.MODELDEPLOYMENT_PLURAL)
@kopf.on.create(C.GROUP, C.VERSION, C.MODELDEPLOYMENT_PLURAL)
# Any change to spec, labels or annotations (kopf's own excluded): right-sizing in Auto mode
# signals an applied recommendation through an annotation, since status changes fire nothing.
@kopf.on.update(C.GROUP, C.VERSION, C.MODELDEPLOYMENT_PLURAL)
async def reconcile_modeldeployment(
    body: kopf.Body,
    spec: kopf.Spec,
    patch: kopf.Patch,
    memo: Any,
    logger: Log,
    **kwargs: Any,
) -> None:
    """Apply the running revisions' Deployments and the Service; write status if it changed."""
    # On an update, kopf's `old` is the spec last handled: its router names the route to
    # release where status.route has no record yet (one written before trimtab recorded it).
    old = kwargs.get("old")
    before = ((old.get("spec") or {}).get("rollout") if isinstance(old, dict) else None) or None
    await _measured_reconcile(
        body, spec, patch, memo, logger, kwargs["serving_deployments"], before
    )
    _explain_ignored_replicas(body, spec, kwargs.get("diff") or ())


async def _measured_reconcile(
    body: kopf.Body,
    spec: Any,
    patch: kopf.Patch,
    memo: Any,
    logger: Log,
    index: kopf.Index[IndexKey, DeploymentObservation],
    rollout_before: Any = None,
) -> None:
    """`_reconcile`, counted in trimtab_reconcile_total and timed, by whichever handler runs it."""
    started = time.monotonic()
    result = "error"
    try:
        await _reconcile(body, spec, patch, memo, logger, index, rollout_before)
        result = "ok"
    except kopf.PermanentError:
        result = "invalid"
        raise
    finally:
        RECONCILES.labels(kind=KIND, result=result).inc()
        RECONCILE_SECONDS.labels(kind=KIND).observe(time.monotonic() - started)


@kopf.on.delete(C.GROUP, C.VERSION, C.MODELDEPLOYMENT_PLURAL, optional=True)
async def forget_modeldeployment(namespace: str | None, name: str | None, **_: Any) -> None:
    """The resource is being deleted (its objects go with it, by owner reference): so do the
    operator's metric series about it."""
    forget_resource(namespace or "", name or "")


def missed_generation(body: Any) -> int | None:
    """The generation of `body`'s spec that no reconcile has taken up, or None.

    kopf records a create as handled with the body it last saw: a spec change that lands
    while the create's handlers finish is taken for handled and fires no update (kopf issue
    1178). status.observedGeneration says what the reconcile did see; a generation past it,
    with no reconcile in progress or waiting to retry (kopf's progress annotation), was missed.

    >>> missed_generation({"metadata": {"generation": 2}, "status": {"observedGeneration": 1}})
    2
    >>> missed_generation({"metadata": {"generation": 2}, "status": {"observedGeneration": 2}})
    >>> busy = {"annotations": {RECONCILE_PROGRESS: "{}"}, "generation": 2}
    >>> missed_generation({"metadata": busy, "status": {"observedGeneration": 1}})
    """
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp") or RECONCILE_PROGRESS in (meta.get("annotations") or {}):
        return None
    generation = int(meta.get("generation") or 0)
    observed = int((body.get("status") or {}).get("observedGeneration") or 0)
    return generation if generation > observed else None


@kopf.timer(C.GROUP, C.VERSION, C.MODELDEPLOYMENT_PLURAL, interval=CONVERGE_S, sharp=False)
async def converge_modeldeployment(
    body: kopf.Body,
    spec: kopf.Spec,
    patch: kopf.Patch,
    memo: Any,
    logger: Log,
    **kwargs: Any,
) -> None:
    """Reconcile a spec generation that kopf took for handled without running the reconcile
    (see `missed_generation`); until the next change, the Deployments would otherwise keep
    the previous spec. The outcome is in status, as from the reconcile handler."""
    generation = missed_generation(body)
    if generation is None:
        return
    # A change the reconcile handler is taking up right now looks the same until it writes
    # status: look again after a while, on a fresh read. The wait ends at once when kopf stops
    # the timer (the resource is being deleted): kopf holds its finalizer until the timer is
    # done, and checks again only a minute later.
    stopped: kopf.DaemonStopped = kwargs["stopped"]  # kopf passes it to timers as to daemons
    await stopped.wait(CONVERGE_S / 2)
    if stopped:
        return
    meta = body["metadata"]
    fresh = await memo.kube.get(MODELDEPLOYMENTS, meta["namespace"], meta["name"])
    if fresh is None or missed_generation(fresh) != generation:
        return
    logger.info("generation %s was never reconciled; reconciling it now", generation)
    try:
        await _measured_reconcile(
            cast(kopf.Body, fresh), fresh["spec"], patch, memo, logger,
            kwargs["serving_deployments"],
        )  # fmt: skip
    except (kopf.PermanentError, kopf.TemporaryError) as err:
        # Written to status (Degraded) or retried at the next check: the timer keeps going.
        logger.warning("reconcile of generation %s: %s", generation, err)


def _explain_ignored_replicas(body: kopf.Body, spec: kopf.Spec, diff: Any) -> None:
    """`kubectl scale mdep` writes spec.replicas; while the autoscaler owns the count, say that
    it was noted and left to the autoscaler rather than silently doing nothing."""
    auto = spec.get("autoscaling")
    if not isinstance(auto, dict) or auto.get("enabled", True) is False:
        return
    if any(tuple(d[1]) == ("spec", "replicas") for d in diff if len(d) > 1):
        kopf.event(
            body,
            type="Normal",
            reason="ReplicasIgnored",
            message="spec.replicas is not applied while spec.autoscaling is enabled; "
            "set autoscaling.minReplicas/maxReplicas or disable autoscaling to pin a count",
        )


async def _reconcile(
    body: kopf.Body,
    spec: kopf.Spec,
    patch: kopf.Patch,
    memo: Any,
    logger: Log,
    index: kopf.Index[IndexKey, DeploymentObservation],
    rollout_before: Any = None,
) -> None:
    kube: KubeClient = memo.kube
    meta = body["metadata"]
    generation = int(meta.get("generation") or 0)
    parsed, problems = parse_spec(spec, body.get("status") or {})
    if parsed is None or problems:
        await _degrade(body, patch, "InvalidSpec", problems, generation)
        raise kopf.PermanentError("; ".join(problems))

    owner = owner_of(body)
    revision = revision_of(parsed)
    key = (owner.namespace, owner.name)
    observations = _observations(index, key)
    is_new = all(o.revision != revision for o in observations)
    try:
        plan = await apply_revisions(kube, owner, parsed, dict(body.get("status") or {}))
        await apply_disruption_budget(kube, owner, parsed, body)
        await release_route_not_named(kube, body, owner, parsed, memo, logger, rollout_before)
    except NameTaken as err:
        # Another resource holds a name this one needs: nothing was taken from it. Look again
        # later, since that resource may go (the garbage collector, or its user, removes it).
        await _degrade(body, patch, "NameTaken", [err.message], generation)
        raise kopf.TemporaryError(err.message, delay=NAME_TAKEN_RETRY_SECONDS) from err
    except KubeError as err:
        if err.rejected:
            await _degrade(body, patch, "ApplyRejected", [err.message], generation)
            raise kopf.PermanentError(err.message) from err
        raise kopf.TemporaryError(f"API server: {err}", delay=10) from err
    if is_new and revision in plan.keep:
        role = f" (candidate beside stable {plan.stable})" if plan.candidate == revision else ""
        kopf.event(
            body,
            type="Normal",
            reason="RevisionCreated",
            message=f"revision {revision}: image {parsed.image}{role}",
        )
        logger.info("revision %s applied", revision)

    await write_reconciled_status(kube, body, parsed, index, generation)


async def release_route_not_named(
    kube: KubeClient,
    body: Any,
    owner: Owner,
    spec: ModelDeploymentSpec,
    memo: Any,
    logger: Log,
    rollout_before: Any = None,
) -> None:
    """Hand back the route status.route records if the spec no longer routes through it (see
    handlers.routes): the rollout loop that would otherwise do it stops with spec.rollout.
    Decided on a fresh read under the route lock, not on `body`: a rollout loop that read the
    spec before it changed may have written and recorded a route since. Without a record in
    `body` and with no route writer run for this resource in this process (it would have made
    the lock), there is none to read: a resource without spec.rollout costs no read.

    Where status has no record, the route of `rollout_before` (spec.rollout as kopf last
    handled it, on an update) is released instead: a route an earlier trimtab wrote, which did
    not record routes, changed while the operator was being upgraded."""
    earlier = route_record(
        owner, rollout_before.get("router") if isinstance(rollout_before, dict) else None
    )
    if (
        getattr(memo, "route_lock", None) is None
        and not (body.get("status") or {}).get("route")
        and earlier is None
    ):
        return
    async with route_lock(memo):
        fresh = await kube.get(MODELDEPLOYMENTS, owner.namespace, owner.name)
        if fresh is None or fresh["metadata"].get("deletionTimestamp"):
            return
        now, problems = parse_spec(fresh.get("spec") or {}, fresh.get("status") or {})
        if now is not None and not problems:
            await release_stale_route(kube, fresh, owner, now, logger, unrecorded=earlier)


async def write_reconciled_status(
    kube: KubeClient,
    body: Any,
    spec: ModelDeploymentSpec,
    index: kopf.Index[IndexKey, DeploymentObservation],
    generation: int,
) -> None:
    """Write the status that follows the Deployments, with observedGeneration. Written here
    with the resourceVersion it was computed from (patch_status_from), not through kopf's
    patch: that is applied after the handler, over whatever the rollout loop or the Deployment
    watch wrote meanwhile, and the conditions list, which a merge patch replaces whole, would
    lose their conditions."""
    key = (body["metadata"]["namespace"], body["metadata"]["name"])

    def compute(current: Any) -> dict[str, Any] | None:
        if int(current["metadata"].get("generation") or 0) != generation:
            return None  # a newer spec, whose own reconcile writes its status
        status = dict(current.get("status") or {})
        revision = plan_for(spec, status).status_revision
        desired, _ = desired_status(
            current, revision, _observations(index, key), generation, now_rfc3339()
        )
        desired["observedGeneration"] = generation
        if spec.autoscaling is None or not spec.autoscaling.enabled:
            _forget_autoscaler(desired)
        if spec.rollout is None:
            _forget_rollout(desired)
        return merge_patch(status, desired)

    try:
        await patch_status_from(kube, MODELDEPLOYMENTS, body, compute)
    except KubeError as err:
        if not err.conflict:
            raise
        raise kopf.TemporaryError("status kept changing under the reconcile", delay=1) from err


def _forget_autoscaler(desired: dict[str, Any]) -> None:
    """Autoscaling is off: what its loop last wrote no longer holds. A MetricsAvailable=False
    would stay for good (nothing else writes it; Argo CD reads it as Suspended), and an old
    status.autoscaling would be where a re-enabled autoscaler starts (its desiredReplicas
    applied at once, its recommendations taken for a window): it starts from spec.replicas,
    as the first time."""
    desired["autoscaling"] = None
    desired["conditions"] = [
        c for c in desired["conditions"] if c.get("type") != CONDITION_METRICS_AVAILABLE
    ]


def _forget_rollout(desired: dict[str, Any]) -> None:
    """spec.rollout is gone: the revision the spec names replaces the others, so what the
    rollout recorded (stable, candidate, known-good revisions) no longer describes what runs.
    Kept, a spec.rollout added back later would take its stale stable revision for the one
    serving, rebuild it and route to it before it has a pod; it starts afresh instead."""
    desired["rollout"] = None
    desired["conditions"] = [
        c for c in desired["conditions"] if c.get("type") not in ROLLOUT_CONDITIONS
    ]


def plan_for(spec: ModelDeploymentSpec, status: dict[str, Any]) -> RevisionPlan:
    """The revisions that run now and their traffic split (see `plan_revisions`)."""
    rollout = spec.rollout
    return plan_revisions(
        revision_of(spec),
        rollout is not None,
        RolloutStatus.model_validate(status.get("rollout") or {}),
        exact_weights=rollout is not None and rollout.router.type != "replicas",
    )


async def apply_revisions(
    kube: KubeClient, owner: Owner, spec: ModelDeploymentSpec, status: dict[str, Any]
) -> RevisionPlan:
    """Apply the Deployment of every revision that runs, with the replicas the autoscaler (or
    spec.replicas) chose split by traffic weight, and the Service. No-op applies write nothing.

    The stable revision's pods come from its known-good model part in status when the spec
    describes a candidate; a stable revision status cannot rebuild is left as it is."""
    plan = plan_for(spec, status)
    stable_n, candidate_n = plan.replicas(replicas_for_revision(spec, status))
    stable_spec = spec if plan.stable_from_spec else None
    if stable_spec is None and plan.stable_model is not None:
        stable_spec = spec_with_model(spec, plan.stable_model)
    # The Service first: it claims the resource's name, so a resource whose name another one
    # holds (NameTaken) starts no pods.
    await kube.apply(build_service(owner, spec, plan.service_revision))
    if stable_spec is not None:
        await kube.apply(build_deployment(owner, stable_spec, plan.stable, stable_n))
    if plan.candidate is not None:
        await kube.apply(build_deployment(owner, spec, plan.candidate, candidate_n))
    return plan


async def apply_disruption_budget(
    kube: KubeClient, owner: Owner, spec: ModelDeploymentSpec, body: Any = None
) -> None:
    """Write the resource's PodDisruptionBudget, unless one that someone else made already
    covers its pods (see `plan_disruption_budget`): then trimtab's goes, and an Event says
    which budget is left in charge. One list of the namespace's budgets decides."""
    template = build_deployment(owner, spec, revision_of(spec), 1)["spec"]["template"]
    plan = plan_disruption_budget(
        await kube.list(PODDISRUPTIONBUDGETS, owner.namespace),
        template["metadata"]["labels"],
        owner.uid,
        spec.disruption_budget.enabled,
    )
    if plan.write:
        await kube.apply(build_disruption_budget(owner, spec))
    if plan.delete:
        await kube.delete(PODDISRUPTIONBUDGETS, owner.namespace, owner.name)
    if plan.other is not None and body is not None:
        kopf.event(
            cast(kopf.Body, body),
            type="Normal",
            reason="DisruptionBudgetLeftToYours",
            message=f"PodDisruptionBudget {plan.other} already covers the pods: trimtab writes "
            "none (a pod two budgets cover cannot be evicted, which stops node drains)",
        )


@kopf.on.event("apps", "v1", "deployments", labels=SERVING_LABELS)
async def follow_serving_deployment(
    namespace: str | None,
    labels: kopf.Labels,
    memo: Any,
    logger: Log,
    **kwargs: Any,
) -> None:
    """A Deployment changed: recompute its ModelDeployment's status, and (without spec.rollout)
    retire old revisions once the current one is fully ready. One that should run but was
    deleted (by hand, or by a tool pruning what it does not know) is created again at once, as
    a ReplicaSet's deleted pod is, rather than at the next change of the ModelDeployment."""
    if kwargs.get("type") == "DELETED":
        await restore_deleted_revision(
            memo.kube, namespace or "", labels[C.LABEL_OWNER], labels.get(C.LABEL_REVISION), logger
        )
    await sync_status(
        memo.kube, namespace or "", labels[C.LABEL_OWNER], kwargs["serving_deployments"], logger
    )


async def restore_deleted_revision(
    kube: KubeClient, namespace: str, name: str, revision: str | None, logger: Log
) -> bool:
    """Apply the revisions again when `revision`, whose Deployment is gone, is one that runs.
    True when it was recreated."""
    body = await kube.get(MODELDEPLOYMENTS, namespace, name)
    if body is None or body.get("metadata", {}).get("deletionTimestamp"):
        return False  # the ModelDeployment goes too (the garbage collector's cascade)
    parsed, problems = parse_spec(body.get("spec") or {}, body.get("status") or {})
    if parsed is None or problems:
        return False
    status = dict(body.get("status") or {})
    if revision not in plan_for(parsed, status).keep:
        return False  # retired: a revision the rollout (or the changeover) is done with
    try:
        await apply_revisions(kube, owner_of(cast(kopf.Body, body)), parsed, status)
    except NameTaken:
        return False  # the reconcile reports it and retries
    except KubeError as err:
        if err.namespace_terminating:
            return False  # the namespace's deletion removed it, and removes the resource next
        raise
    logger.info("revision %s of %s/%s was deleted; created again", revision, namespace, name)
    kopf.event(
        cast(kopf.Body, body),
        type="Normal",
        reason="RevisionRecreated",
        message=f"the Deployment of revision {revision} was deleted; it was created again",
    )
    return True


def _owned_by_modeldeployment(body: kopf.Body, **_: Any) -> bool:
    """A TrainingJob's headless Service carries the same labels; only a ModelDeployment's own
    is restored here."""
    refs = body.get("metadata", {}).get("ownerReferences") or []
    return any(r.get("kind") == KIND and r.get("controller") for r in refs)


@kopf.on.event("", "v1", "services", labels=RESOURCE_SERVICE_LABELS, when=_owned_by_modeldeployment)
async def follow_resource_service(
    namespace: str | None, body: kopf.Body, memo: Any, logger: Log, **kwargs: Any
) -> None:
    """The Service named after a ModelDeployment was deleted (by hand, or by a tool pruning
    what it does not know): every client that calls the resource by name lost it, so it is
    created again at once rather than at the ModelDeployment's next change."""
    if kwargs.get("type") != "DELETED":
        return
    uid = next(
        r.get("uid") for r in body["metadata"]["ownerReferences"] if r.get("controller")
    )
    await restore_deleted_service(
        memo.kube, namespace or "", body["metadata"]["name"], str(uid), logger
    )


async def restore_deleted_service(
    kube: KubeClient, namespace: str, name: str, owner_uid: str, logger: Log
) -> bool:
    """Apply the Service of ModelDeployment `name` again, if that ModelDeployment (the one
    with `owner_uid`, not a later one of the same name) still exists and is not being deleted.
    True when it was recreated."""
    body = await kube.get(MODELDEPLOYMENTS, namespace, name)
    if body is None or body.get("metadata", {}).get("deletionTimestamp"):
        return False  # the garbage collector's cascade
    if body["metadata"].get("uid") != owner_uid:
        return False  # a ModelDeployment made since, whose own reconcile creates its Service
    if await kube.get(SERVICES, namespace, name) is not None:
        return False  # already back (the reconcile ran meanwhile)
    parsed, problems = parse_spec(body.get("spec") or {}, body.get("status") or {})
    if parsed is None or problems:
        return False
    try:
        pinned = plan_for(parsed, dict(body.get("status") or {})).service_revision
        await kube.apply(build_service(owner_of(cast(kopf.Body, body)), parsed, pinned))
    except NameTaken:
        return False  # something else took the name meanwhile: the reconcile reports it
    except KubeError as err:
        if err.namespace_terminating:
            return False  # the namespace's deletion removed it, and removes the resource next
        raise
    logger.info("the Service of %s/%s was deleted; created again", namespace, name)
    kopf.event(
        cast(kopf.Body, body),
        type="Normal",
        reason="ServiceRecreated",
        message=f"Service {name} was deleted; it was created again",
    )
    return True


async def sync_status(
    kube: KubeClient,
    namespace: str,
    name: str,
    index: kopf.Index[IndexKey, DeploymentObservation],
    logger: Log,
) -> None:
    # Another loop may write status between our read and our patch: retry from a fresh read.
    for _ in range(3):
        try:
            await _sync_status_once(kube, namespace, name, index, logger)
            return
        except KubeError as err:
            if not err.conflict:
                raise
    logger.debug("status of %s/%s kept changing; the next event retries", namespace, name)


async def _sync_status_once(
    kube: KubeClient,
    namespace: str,
    name: str,
    index: kopf.Index[IndexKey, DeploymentObservation],
    logger: Log,
) -> None:
    body = await kube.get(MODELDEPLOYMENTS, namespace, name)
    if body is None or body.get("metadata", {}).get("deletionTimestamp"):
        return
    parsed, problems = parse_spec(body.get("spec") or {}, body.get("status") or {})
    if parsed is None or problems:
        return
    status = body.get("status") or {}
    degraded = get_condition(_conditions(status), CONDITION_DEGRADED)
    generation = int(body["metadata"].get("generation") or 0)
    if (
        degraded
        and degraded.status == "True"
        and degraded.reason in SPEC_REASONS
        and (degraded.observed_generation == generation)
    ):
        return
    plan = plan_for(parsed, dict(status))
    revision = plan.status_revision
    observations = _observations(index, (namespace, name))
    desired, current_ready = desired_status(
        body, revision, observations, int(status.get("observedGeneration") or 0), now_rfc3339()
    )
    changes = merge_patch(dict(status), desired)
    if changes:
        await kube.patch_status(
            MODELDEPLOYMENTS, namespace, name, changes, body["metadata"].get("resourceVersion")
        )
    # With spec.rollout, revisions retire when the rollout promotes or rolls back, not when
    # the newest is ready: handlers/rollout.py removes them.
    if current_ready and not plan.rollout:
        for old in observations:
            if old.revision != revision and await kube.delete(DEPLOYMENTS, namespace, old.name):
                logger.info("retired revision %s of %s/%s", old.revision, namespace, name)
                kopf.event(
                    cast(kopf.Body, body),
                    type="Normal",
                    reason="RevisionRetired",
                    message=f"revision {old.revision} removed; {revision} is ready",
                )
