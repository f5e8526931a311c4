"""kopf handlers for TrainingJob: one daemon per TrainingJob runs the phase machine in
decisions/training.py and does what it says; changes to the spec and to its Jobs wake it.

Status is written before acting, so an operator restart never loses a restart count; every
create and delete touches only objects this TrainingJob owns (by ownerReference uid)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, cast

import kopf

from trimtab import constants as C
from trimtab.api.trainingjob import (
    PHASES,
    TERMINAL_PHASES,
    Diagnosis,
    TrainingJobSpec,
    TrainingJobStatus,
)
from trimtab.builders.common import Owner, claim_problem, merge_patch, object_meta
from trimtab.builders.training import (
    COMPONENT,
    LABEL_RESTART,
    build_attempt,
    build_service,
    job_name,
    job_pod_regex,
)
from trimtab.decisions.conditions import set_condition
from trimtab.decisions.rightsizing import effective_training_spec
from trimtab.decisions.training import (
    JobObservation,
    TrainingDecision,
    TrainingInputs,
    checked_spec,
    decide_training,
    diagnose,
    first_worker_failure,
    format_time,
    parse_time,
    starts_over,
)
from trimtab.kube.client import KubeClient, KubeError
from trimtab.kube.resources import JOBS, PODGROUPS, PODS, SERVICES, TRAININGJOBS, Resource
from trimtab.metrics.base import MetricsProvider
from trimtab.observability import (
    RECONCILE_SECONDS,
    RECONCILES,
    export_training,
    forget_training,
)

KIND = C.TRAININGJOB_KIND
# The Jobs trimtab runs workers in; only these wake a TrainingJob.
WORKER_JOB_LABELS: dict[str, Any] = {
    C.LABEL_MANAGED_BY: C.MANAGED_BY,
    C.LABEL_OWNER: kopf.PRESENT,
    C.LABEL_COMPONENT: COMPONENT,
}
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
# After an API error, try again this soon; never loop faster than MIN_SLEEP.
RETRY_SECONDS = 10.0
MIN_SLEEP_SECONDS = 0.2
# GPU diagnosis: the window it averages over, and how often it is refreshed.
DIAGNOSIS_WINDOW_SECONDS = 600

Key = tuple[str, str]
Log = logging.Logger | logging.LoggerAdapter[Any]
# The status keys this module owns; a key it no longer sets is removed (merge patch null).
OWNED_STATUS_KEYS = frozenset(
    (f.alias or name) for name, f in TrainingJobStatus.model_fields.items()
)


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def owner_of(body: Mapping[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(C.API_VERSION, KIND, meta["name"], meta["namespace"], meta["uid"])


def owned_by(obj: Mapping[str, Any], owner: Owner) -> bool:
    """True only for an object whose ownerReferences name this very TrainingJob (by uid), so a
    same-named object of another tenant, or a PVC, is never touched."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == owner.uid and r.get("kind") == KIND for r in refs)


def status_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that makes the owned keys of `current` equal `desired`: changed keys
    replaced, keys no longer set removed (null), nested objects patched key by key."""
    owned = {k: v for k, v in current.items() if k in OWNED_STATUS_KEYS or k in desired}
    return merge_patch(owned, desired, remove_missing=True)


# --- wake-ups ---------------------------------------------------------------------------------


@kopf.on.startup()
async def init_training(memo: Any, **_: Any) -> None:
    # Per-resource memos are shallow copies of this one: the dict is shared by all of them.
    if getattr(memo, "training_wakeups", None) is None:
        memo.training_wakeups = {}
    # The diagnosis reads GPU metrics from the operator's Prometheus: memo.metrics, set up
    # (and closed) by handlers/operator_setup.py.


def _wakeup(memo: Any, key: Key) -> asyncio.Event:
    wakeups: dict[Key, asyncio.Event] | None = getattr(memo, "training_wakeups", None)
    if wakeups is None:
        wakeups = {}
        memo.training_wakeups = wakeups
    if key not in wakeups:
        wakeups[key] = asyncio.Event()
    return wakeups[key]


@kopf.on.update(C.GROUP, C.VERSION, C.TRAININGJOB_PLURAL, field="spec")
async def on_trainingjob_spec_change(
    namespace: str | None, name: str | None, memo: Any, **_: Any
) -> None:
    """suspend, resume or any other spec change: the daemon looks again now."""
    _wakeup(memo, (namespace or "", name or "")).set()


@kopf.on.event("batch", "v1", "jobs", labels=WORKER_JOB_LABELS)
async def follow_training_job(
    namespace: str | None, labels: kopf.Labels, memo: Any, **_: Any
) -> None:
    """A worker Job changed (Kueue admitted it, a worker is ready, it failed or finished)."""
    _wakeup(memo, (namespace or "", labels[C.LABEL_OWNER])).set()


async def _sleep(wake: asyncio.Event, stopped: Any, seconds: float) -> None:
    """Until woken, stopped, or `seconds` pass."""

    async def stop() -> None:
        await stopped.wait()

    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop())]
    try:
        await asyncio.wait(waiters, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        for waiter in waiters:
            with contextlib.suppress(asyncio.CancelledError):
                await waiter


@kopf.daemon(C.GROUP, C.VERSION, C.TRAININGJOB_PLURAL, cancellation_timeout=5.0)
async def run_trainingjob(
    namespace: str | None, name: str | None, memo: Any, stopped: Any, logger: Log, **_: Any
) -> None:
    """The control loop of one TrainingJob, for as long as it exists."""
    key = (namespace or "", name or "")
    wake = _wakeup(memo, key)
    resync = float(getattr(getattr(memo, "settings", None), "resync_seconds", 60.0))
    metrics: MetricsProvider | None = getattr(memo, "metrics", None)
    try:
        while not stopped:
            wake.clear()
            started = time.monotonic()
            result = "error"
            try:
                delay = await sync_trainingjob(memo.kube, key[0], key[1], logger, metrics)
                result = "ok"
            except KubeError as err:
                logger.warning("TrainingJob %s/%s: API error, retrying: %s", *key, err)
                delay = RETRY_SECONDS
            finally:
                RECONCILES.labels(kind=KIND, result=result).inc()
                RECONCILE_SECONDS.labels(kind=KIND).observe(time.monotonic() - started)
            if delay is None:
                return
            await _sleep(wake, stopped, max(MIN_SLEEP_SECONDS, min(delay, resync)))
    finally:
        wakeups = getattr(memo, "training_wakeups", None)
        if wakeups is not None:
            wakeups.pop(key, None)
        # Gone (or the operator stopping, whose successor exports them again): its series go.
        forget_training(*key)


# --- one step ---------------------------------------------------------------------------------


async def sync_trainingjob(
    kube: KubeClient,
    namespace: str,
    name: str,
    logger: Log,
    metrics: MetricsProvider | None = None,
    now: datetime.datetime | None = None,
) -> float | None:
    """Observe, decide, write status, act. Returns seconds until it wants to look again (inf:
    only when something changes), or None when the TrainingJob is gone."""
    body = await kube.get(TRAININGJOBS, namespace, name)
    if body is None or body.get("metadata", {}).get("deletionTimestamp"):
        return None
    now = now or now_utc()
    generation = int(body["metadata"].get("generation") or 0)
    current_status = dict(body.get("status") or {})
    status = TrainingJobStatus.model_validate(current_status)
    spec, problems = checked_spec(body.get("spec") or {})
    owner = owner_of(body)
    if spec is None:
        await _write_invalid(kube, body, status, problems, generation, now)
        return float("inf")

    name_now = job_name(name, status.restarts)
    raw_job = await kube.get(JOBS, namespace, name_now)
    blocked = None
    if raw_job is not None and not owned_by(raw_job, owner):
        # Another's Job of this name (often an earlier TrainingJob of the same name that the
        # garbage collector has not removed yet): wait for the name, touching nothing.
        claim = {"kind": "Job", "metadata": object_meta(owner, name_now)}
        blocked = claim_problem(claim, raw_job) or (
            f"Job {name_now} exists and was not made by trimtab for this TrainingJob"
        )
        raw_job = None
    job = JobObservation.from_manifest(raw_job) if raw_job is not None else None
    # This step may create the attempt's Job: none exists, and the job is not finished (or is
    # about to start over, its spec fixed), so the checks below run on that very step.
    may_create = (
        raw_job is None
        and not problems
        and (status.phase not in TERMINAL_PHASES or starts_over(status, generation))
    )
    earlier_jobs: tuple[JobObservation, ...] = ()
    earlier_pods: tuple[str, ...] = ()
    if may_create:
        # The next attempt waits until the last one's workers have stopped writing the
        # checkpoint it resumes from (decide_training: previous_attempt_gone).
        earlier_jobs, earlier_pods = await _earlier_attempts(kube, owner, status.restarts)
    # An attempt's Job is created only with its Service (and PodGroup): first make sure the
    # name is ours, and that the PodGroup API is there to gang-schedule it.
    if may_create and not blocked:
        service = build_service(owner, spec)
        blocked = claim_problem(
            service, await kube.get(SERVICES, namespace, service["metadata"]["name"])
        )
        if not blocked and spec.scheduling.gang.enabled:
            blocked = await _podgroups_missing(kube)
    failure = None
    if job is not None and job.failed_condition:
        pods = await kube.list(PODS, namespace, {JOB_NAME_LABEL: name_now})
        failure = first_worker_failure(pods)

    decision = decide_training(
        TrainingInputs(
            spec,
            status,
            job,
            failure,
            now,
            generation,
            tuple(problems),
            blocked,
            earlier_jobs=earlier_jobs,
            earlier_pods=earlier_pods,
        )
    )
    new_status = decision.status
    if metrics is not None and new_status.phase == "Running" and job is not None:
        await _refresh_diagnosis(metrics, namespace, job.name, new_status, now, logger)

    # Status first: if acting fails, the next step still knows the attempt it is on. Except
    # cleanedUp, written once the clean-up has run: written before, a failed delete would never
    # be tried again.
    first = new_status
    if decision.cleanup:
        first = new_status.model_copy(update={"cleaned_up": status.cleaned_up})
    # Metrics first, so they never lag what status says.
    _export(namespace, name, new_status)
    patch = status_patch(current_status, first.to_wire())
    if patch:
        await kube.patch_status(TRAININGJOBS, namespace, name, patch)
    # A Job is created once per attempt, so right-sizing's applied resources (Auto) reach the
    # workers at the next attempt and never restart a running one.
    try:
        await _act(kube, owner, effective_training_spec(spec, current_status), decision, logger)
    except KubeError as err:
        if not err.rejected:
            raise
        # The API server refused an object built from the spec (a value the CRD schema let
        # through, such as a node selector value that is not a label value): retrying would
        # fail alike, so the job fails and says why until the spec changes.
        message = f"the API server rejected an object built from the spec: {err.message}"
        fresh = await kube.get(TRAININGJOBS, namespace, name) or body
        fresh_status = TrainingJobStatus.model_validate(dict(fresh.get("status") or {}))
        await _write_invalid(kube, fresh, fresh_status, [message], generation, now)
        kopf.warn(cast(kopf.Body, body), reason="InvalidSpec", message=message[:1000])
        return float("inf")
    if first is not new_status:
        await kube.patch_status(TRAININGJOBS, namespace, name, {"cleanedUp": True})
    for kind, reason, message in decision.events:
        kopf.event(cast(kopf.Body, body), type=kind, reason=reason, message=message)
    return float("inf") if decision.requeue_after is None else decision.requeue_after


def _export(namespace: str, name: str, status: TrainingJobStatus) -> None:
    """The phase and restarts as metrics (for the chart's alerts), once there is a phase."""
    if status.phase is not None:
        export_training(namespace, name, status.phase, status.restarts, PHASES)


async def _write_invalid(
    kube: KubeClient,
    body: Mapping[str, Any],
    status: TrainingJobStatus,
    problems: list[str],
    generation: int,
    now: datetime.datetime,
) -> None:
    """A spec the model refuses (the CRD schema was bypassed or is older): say so, do nothing."""
    message = "; ".join(problems)
    meta = body["metadata"]
    if status.phase == "Failed" and status.message == message:
        _export(meta["namespace"], meta["name"], status)
        return
    status.phase = "Failed"
    status.message = message
    status.observed_generation = generation
    # Failed is finished: the TTL clean-up counts from here (the Service and PodGroup applied
    # before a refused Job are deleted then too).
    status.completion_time = status.completion_time or format_time(now)
    status.next_restart_time = None
    status.conditions = set_condition(
        status.conditions, "Failed", "True", "InvalidSpec", message, format_time(now), generation
    )
    _export(meta["namespace"], meta["name"], status)
    await kube.patch_status(
        TRAININGJOBS,
        meta["namespace"],
        meta["name"],
        status_patch(dict(body.get("status") or {}), status.to_wire()),
    )
    kopf.warn(cast(kopf.Body, body), reason="InvalidSpec", message=message)


async def _act(
    kube: KubeClient,
    owner: Owner,
    spec: TrainingJobSpec,
    decision: TrainingDecision,
    logger: Log,
) -> None:
    restarts = decision.status.restarts
    if decision.delete_job is not None:
        # Foreground: the Job stays until its pods are gone, which is what the next attempt
        # waits for (decide_training creates it only once no earlier Job is left).
        await _delete_owned(kube, JOBS, owner, decision.delete_job, "Foreground")
        # Its PodGroup (named alike), even if gang was turned off since that attempt; a GET
        # finds none where the API is not served.
        await _delete_owned(kube, PODGROUPS, owner, decision.delete_job)
        logger.info("deleted Job %s", decision.delete_job)
    if decision.create_job:
        attempt = build_attempt(owner, spec, restarts, decision.active_deadline_seconds)
        await kube.apply(attempt.service)
        if attempt.podgroup is not None:
            await kube.apply(attempt.podgroup)
        job = attempt.job
        try:
            # Created once, never applied again: Kueue owns `suspend` and the pod template is
            # immutable, so a later apply would fight Kueue or be rejected.
            await kube.create(job)
            logger.info("created Job %s", job["metadata"]["name"])
        except KubeError as err:
            if not err.conflict:
                raise
    if decision.job_deadline_seconds is not None:
        name = job_name(owner.name, restarts)
        await kube.patch(
            JOBS, owner.namespace, name,
            {"spec": {"activeDeadlineSeconds": decision.job_deadline_seconds}},
        )  # fmt: skip
        logger.info(
            "Job %s admitted late: its activeDeadlineSeconds is now %d, to stop at the deadline",
            name,
            decision.job_deadline_seconds,
        )
    if decision.cleanup:
        await cleanup(kube, owner, spec, logger)


async def _podgroups_missing(kube: KubeClient) -> str | None:
    """Why a gang cannot be scheduled here: the PodGroup API is not served (the coscheduling
    plugin's CRD is not installed); None when it is."""
    path = f"/apis/{PODGROUPS.group}/{PODGROUPS.version}"
    try:
        served = await kube.request("GET", path)
    except KubeError as err:
        if not err.not_found:
            raise
        served = {}
    if any(r.get("name") == PODGROUPS.plural for r in (served or {}).get("resources") or []):
        return None
    return (
        f"scheduling.gang needs the PodGroup API ({PODGROUPS.group}/{PODGROUPS.version}), "
        "which this cluster does not serve: install the scheduler-plugins coscheduling CRDs, "
        "or turn scheduling.gang off"
    )


def _attempt_of(obj: Mapping[str, Any]) -> int | None:
    label = ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_RESTART, "")
    return int(label) if str(label).isdigit() else None


async def _earlier_attempts(
    kube: KubeClient, owner: Owner, restarts: int
) -> tuple[tuple[JobObservation, ...], tuple[str, ...]]:
    """What is left before attempt `restarts` is created (its Job does not exist): this
    TrainingJob's Jobs of earlier attempts, and the worker pods of any earlier Job that have not
    stopped, this attempt's included (a Job deleted without Foreground propagation leaves its
    pods stopping). Pods are matched by trimtab's labels: their owner is their Job, maybe gone."""
    labels = {C.LABEL_MANAGED_BY: C.MANAGED_BY, C.LABEL_OWNER: owner.name}
    jobs: list[JobObservation] = []
    for raw in await kube.list(JOBS, owner.namespace, labels):
        attempt = _attempt_of(raw)
        if owned_by(raw, owner) and attempt is not None and attempt < restarts:
            jobs.append(JobObservation.from_manifest(raw))
    pods: list[str] = []
    for pod in await kube.list(PODS, owner.namespace, {**labels, C.LABEL_COMPONENT: COMPONENT}):
        attempt = _attempt_of(pod)
        stopped = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
        if attempt is not None and attempt <= restarts and not stopped:
            pods.append(str(pod["metadata"]["name"]))
    return tuple(jobs), tuple(pods)


async def _delete_owned(
    kube: KubeClient, res: Resource, owner: Owner, name: str, propagation: str = "Background"
) -> bool:
    """Delete `name` only if this TrainingJob owns it."""
    current = await kube.get(res, owner.namespace, name)
    if current is None or not owned_by(current, owner):
        return False
    return await kube.delete(res, owner.namespace, name, propagation)


async def cleanup(kube: KubeClient, owner: Owner, spec: TrainingJobSpec, logger: Log) -> list[str]:
    """TTL clean-up: every Job, Service and PodGroup this TrainingJob owns, nothing else (its
    checkpoint PVC, ConfigMaps and Secrets are the user's). Returns what it deleted."""
    labels = {C.LABEL_MANAGED_BY: C.MANAGED_BY, C.LABEL_OWNER: owner.name}
    # PodGroups whatever spec.scheduling.gang says now: it may have been on for an attempt.
    kinds: list[Resource] = [JOBS, SERVICES, PODGROUPS]
    deleted: list[str] = []
    for res in kinds:
        try:
            listed = await kube.list(res, owner.namespace, labels)
        except KubeError as err:
            if res is PODGROUPS and err.not_found:
                continue  # the PodGroup API is not served here: there are none
            raise
        for obj in listed:
            if not owned_by(obj, owner):
                continue
            name = obj["metadata"]["name"]
            if await kube.delete(res, owner.namespace, name, "Background"):
                deleted.append(f"{res.kind}/{name}")
    logger.info("TTL clean-up deleted %s", ", ".join(deleted) or "nothing")
    return deleted


# --- diagnosis --------------------------------------------------------------------------------


def diagnosis_queries(namespace: str, job: str, window_seconds: int) -> dict[str, str]:
    """PromQL for a Job's workers: mean GPU utilization (0..1), from dcgm-exporter or else
    trimtab's GPU agent, and peak GPU memory used over total (0..1), from dcgm-exporter only
    (the agent exports memory used but not the device's total)."""
    pods = json.dumps(job_pod_regex(job))
    sel = f"namespace={json.dumps(namespace)},pod=~{pods}"
    # dcgm-exporter is a DaemonSet: scraped with honorLabels false (prometheus-operator's and
    # its chart's default), its pod labels are renamed exported_* and namespace/pod name the
    # exporter. Either spelling is read, as right-sizing does (metrics/usage.py).
    exported = f"exported_namespace={json.dumps(namespace)},exported_pod=~{pods}"
    w = f"{window_seconds}s"

    def dcgm_util(labels: str) -> str:
        return f"avg(avg_over_time(DCGM_FI_DEV_GPU_UTIL{{{labels}}}[{w}]))"

    util = (
        f"({dcgm_util(sel)} or {dcgm_util(exported)}) / 100"
        f" or avg(avg_over_time(trimtab_gpu_utilization_ratio{{{sel}}}[{w}]))"
    )

    # used + free is the device's memory, so peak used over (peak used + least free) is the
    # peak share used, with no subquery (whose aligned steps would miss short peaks).
    def dcgm_memory(labels: str) -> str:
        used = f"max_over_time(DCGM_FI_DEV_FB_USED{{{labels}}}[{w}])"
        return f"max({used} / ({used} + min_over_time(DCGM_FI_DEV_FB_FREE{{{labels}}}[{w}])))"

    memory = f"{dcgm_memory(sel)} or {dcgm_memory(exported)}"
    return {"gpuUtilization": util, "memoryUsedRatio": memory}


async def _refresh_diagnosis(
    metrics: MetricsProvider,
    namespace: str,
    job: str,
    status: TrainingJobStatus,
    now: datetime.datetime,
    logger: Log,
) -> None:
    """Once per window while Running: the diagnosis sentence from GPU metrics."""
    last = parse_time(status.diagnosis.time) if status.diagnosis is not None else None
    if last is not None and (now - last).total_seconds() < DIAGNOSIS_WINDOW_SECONDS:
        return
    results = await metrics.query_batch(diagnosis_queries(namespace, job, DIAGNOSIS_WINDOW_SECONDS))
    util, memory = results.get("gpuUtilization"), results.get("memoryUsedRatio")
    found = diagnose(
        util.value if util is not None and util.has_value else None,
        memory.value if memory is not None and memory.has_value else None,
        DIAGNOSIS_WINDOW_SECONDS,
        now,
    )
    if found is None:
        # Said in status too, so "no diagnosis" is never mistaken for "nothing to say".
        logger.debug("no GPU metrics for Job %s/%s", namespace, job)
        found = Diagnosis(
            window_seconds=DIAGNOSIS_WINDOW_SECONDS,
            message="no GPU metrics for the workers (dcgm-exporter or the trimtab GPU agent)",
            time=format_time(now),
        )
    status.diagnosis = found
