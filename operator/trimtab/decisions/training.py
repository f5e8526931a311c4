"""The TrainingJob phase machine (Pending -> Queued -> Starting -> Running -> Succeeded | Failed,
with Restarting and Suspended), the restart backoff, and the diagnosis from GPU metrics.

Pure: the caller passes what it observed (the current attempt's Job, its failed pods, what is
left of earlier attempts) and the time; `decide_training` says what the status is and what to
create or delete."""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from trimtab.api.common import ConditionStatus, checked_model
from trimtab.api.quantity import parse_quantity
from trimtab.api.trainingjob import (
    CONDITION_FAILED,
    CONDITION_QUEUED,
    CONDITION_RESTARTING,
    CONDITION_RUNNING,
    CONDITION_SUCCEEDED,
    CONDITION_SUSPENDED,
    TERMINAL_PHASES,
    Diagnosis,
    FailurePolicy,
    Phase,
    TrainingJobSpec,
    TrainingJobStatus,
    WorkerFailure,
)
from trimtab.decisions.conditions import get_condition, set_condition

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# A Job whose deletion is still in progress is looked at again after this long.
WAIT_SECONDS = 5.0
# How often a job whose name another resource holds looks again.
BLOCKED_RETRY_SECONDS = 30.0
# How long after an OOM kill a restart waits, at most, for right-sizing (Auto) to answer it.
OOM_RESIZE_WAIT = datetime.timedelta(seconds=120)
# Job condition reasons (batch/v1).
REASON_DEADLINE = "DeadlineExceeded"
REASON_POD_FAILURE_POLICY = "PodFailurePolicy"
_EXIT_CODE_RE = re.compile(r"pod [^/\s]+/(?P<pod>\S+) failed with exit code (?P<code>\d+)")
# An Indexed Job's pod: `<job>-<index>-<5 random>`; the controller cuts a long Job name, never
# the index (podGenerateNameWithIndex). The message's "rule at index N" is the podFailurePolicy
# rule's index, not the worker's.
_POD_INDEX_RE = re.compile(r"-(?P<index>\d+)-[a-z0-9]{5}$")


def oom_unanswered(status: TrainingJobStatus) -> bool:
    """Whether the last worker failure is an OOM kill that no right-sizing pass has answered:
    that pass runs at once, and in Auto mode the next attempt waits for it.

    Only a pass that ran after trimtab recorded the failure (`recordedAt`) saw it: one that ran
    between the kill (the kubelet's `time`) and the record had no `lastFailure` to add. A pass in
    the very second of the record may have read the status before it, so it does not count.
    A record without `recordedAt` (an older operator's) falls back to the kill's time.

    >>> from trimtab.api.rightsizing import RecommendationsStatus
    >>> from trimtab.api.trainingjob import WorkerFailure
    >>> killed = WorkerFailure(reason="OOMKilled", time="2025-01-01T00:05:00Z",
    ...                        recorded_at="2025-01-01T00:05:40Z")
    >>> oom_unanswered(TrainingJobStatus(last_failure=killed))
    True
    >>> between = RecommendationsStatus(updated_at="2025-01-01T00:05:30Z")
    >>> oom_unanswered(TrainingJobStatus(last_failure=killed, recommendations=between))
    True
    >>> later = RecommendationsStatus(updated_at="2025-01-01T00:06:00Z")
    >>> oom_unanswered(TrainingJobStatus(last_failure=killed, recommendations=later))
    False
    """
    failure = status.last_failure
    if failure is None or failure.reason != "OOMKilled":
        return False
    seen = parse_time(failure.recorded_at or failure.time)
    last = parse_time(status.recommendations.updated_at if status.recommendations else None)
    return seen is not None and (last is None or seen >= last)


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def format_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# --- observations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class JobObservation:
    """What the Job controller (and Kueue, through `suspend`) reports for one attempt's Job."""

    name: str
    suspended: bool = False
    deleting: bool = False
    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    complete: bool = False
    failed_condition: bool = False
    failure_reason: str = ""
    failure_message: str = ""
    # spec.activeDeadlineSeconds: the Job controller counts it from status.startTime, which it
    # sets (again) when the Job is admitted (unsuspended).
    active_deadline_seconds: int | None = None
    # spec.completions: the workers this attempt runs. A Job keeps the count it was built with,
    # so status compares with it, not with a spec.workers edited since (the next attempt's).
    completions: int | None = None

    @staticmethod
    def from_manifest(job: Mapping[str, Any]) -> JobObservation:
        meta = job.get("metadata") or {}
        spec = job.get("spec") or {}
        status = job.get("status") or {}
        conds = {c.get("type"): c for c in status.get("conditions") or []}

        def true(kind: str) -> bool:
            return str((conds.get(kind) or {}).get("status")) == "True"

        # FailureTarget comes first (1.31+), while the Job controller still stops the pods.
        failing = conds.get("Failed") if true("Failed") else conds.get("FailureTarget")
        return JobObservation(
            name=str(meta.get("name", "")),
            suspended=bool(spec.get("suspend")),
            deleting=bool(meta.get("deletionTimestamp")),
            active=int(status.get("active") or 0),
            ready=int(status.get("ready") or 0),
            succeeded=int(status.get("succeeded") or 0),
            failed=int(status.get("failed") or 0),
            start_time=status.get("startTime"),
            completion_time=status.get("completionTime"),
            complete=true("Complete") or true("SuccessCriteriaMet"),
            failed_condition=true("Failed") or true("FailureTarget"),
            active_deadline_seconds=(
                int(spec["activeDeadlineSeconds"])
                if spec.get("activeDeadlineSeconds") is not None
                else None
            ),
            failure_reason=str((failing or {}).get("reason") or ""),
            failure_message=str((failing or {}).get("message") or ""),
            completions=(
                int(spec["completions"]) if spec.get("completions") is not None else None
            ),
        )


def first_worker_failure(pods: Iterable[Mapping[str, Any]]) -> WorkerFailure | None:
    """The worker that failed first among a Job's pods: the earliest terminated container with a
    non-zero exit code. The others' later exits (143 after the Job controller stops them) are
    consequences, not causes.

    >>> pod = {"metadata": {"name": "llama-r0-1-x", "annotations": {COMPLETION_INDEX: "1"}},
    ...        "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state":
    ...        {"terminated": {"exitCode": 137, "reason": "OOMKilled",
    ...                        "finishedAt": "2025-01-01T00:00:00Z"}}}]}}
    >>> f = first_worker_failure([pod]); (f.worker, f.exit_code, f.reason)
    (1, 137, 'OOMKilled')
    """
    found: list[tuple[str, int, WorkerFailure]] = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        index_text = (meta.get("annotations") or {}).get(COMPLETION_INDEX) or (
            meta.get("labels") or {}
        ).get(COMPLETION_INDEX)
        worker = int(index_text) if index_text and str(index_text).isdigit() else None
        limits = {
            str(c.get("name")): ((c.get("resources") or {}).get("limits") or {}).get("memory")
            for c in (pod.get("spec") or {}).get("containers") or []
        }
        for cs in status.get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or (
                cs.get("lastState") or {}
            ).get("terminated")
            if not term or int(term.get("exitCode") or 0) == 0:
                continue
            code = int(term["exitCode"])
            failure = WorkerFailure(
                worker=worker,
                pod=meta.get("name"),
                exit_code=code,
                reason=str(term.get("reason") or "Error"),
                message=str(term.get("message") or "")[:512],
                time=term.get("finishedAt"),
                memory_limit=str(limits[cs.get("name")]) if limits.get(cs.get("name")) else None,
            )
            # SIGTERM (143) is what the Job controller sends the survivors: rank it last.
            found.append((str(term.get("finishedAt") or ""), 1 if code == 143 else 0, failure))
        if status.get("phase") == "Failed" and not status.get("containerStatuses"):
            found.append(
                (
                    "",
                    2,
                    WorkerFailure(
                        worker=worker,
                        pod=meta.get("name"),
                        reason=str(status.get("reason") or "Failed"),
                        message=str(status.get("message") or "")[:512],
                    ),
                )
            )
    if not found:
        return None
    found.sort(key=lambda item: (item[1], item[0] or "~"))
    return found[0][2]


def failure_from_job(job: JobObservation) -> WorkerFailure:
    """What the Job's own Failed condition says, for when the pods are already gone.

    >>> f = failure_from_job(JobObservation("j", failed_condition=True, failure_reason=
    ...     "PodFailurePolicy", failure_message="Container trainer for pod ml/j-3-x7k2q failed "
    ...     "with exit code 3 matching FailJob rule at index 0"))
    >>> f.worker, f.pod, f.exit_code
    (3, 'j-3-x7k2q', 3)
    """
    code_match = _EXIT_CODE_RE.search(job.failure_message)
    index_match = _POD_INDEX_RE.search(code_match["pod"]) if code_match else None
    return WorkerFailure(
        worker=int(index_match["index"]) if index_match else None,
        pod=code_match["pod"] if code_match else None,
        exit_code=int(code_match["code"]) if code_match else None,
        reason=job.failure_reason or "Failed",
        message=job.failure_message[:512],
    )


# --- policy -----------------------------------------------------------------------------------


def restart_backoff(policy: FailurePolicy, restart: int) -> int:
    """Seconds to wait before restart number `restart` (1-based): doubling, capped.

    >>> p = FailurePolicy(backoff_seconds=10, max_backoff_seconds=60)
    >>> [restart_backoff(p, n) for n in (1, 2, 3, 4, 5)]
    [10, 20, 40, 60, 60]
    """
    if policy.backoff_seconds == 0:
        return 0
    exponent = min(max(0, restart - 1), 30)
    wait: int = policy.backoff_seconds * (1 << exponent)
    return min(policy.max_backoff_seconds, wait)


def checked_spec(raw: Mapping[str, Any]) -> tuple[TrainingJobSpec | None, list[str]]:
    """The spec as the operator reads it (None if the models refuse it), and the problems that
    make it unusable, each naming the field (see checked_model)."""
    return checked_model(TrainingJobSpec, raw, find_spec_problems)


def find_spec_problems(spec: TrainingJobSpec) -> list[str]:
    """Reasons a schema-valid spec still cannot work, each naming the field. Empty means fine.

    >>> problems = find_spec_problems(
    ...     TrainingJobSpec(image="i", workers=2, command=["python", "t.py"]))
    >>> problems[0].split(":")[0], "drop 'python' from command" in problems[0]
    ('spec.command', True)
    """
    problems: list[str] = []
    res = spec.resources
    if res.cpu and res.cpu_limit and parse_quantity(res.cpu_limit) < parse_quantity(res.cpu):
        problems.append(f"spec.resources.cpuLimit: {res.cpu_limit} is below the request {res.cpu}")
    if res.memory and res.memory_limit and parse_quantity(res.memory_limit) < parse_quantity(
        res.memory
    ):
        problems.append(
            f"spec.resources.memoryLimit: {res.memory_limit} is below the request {res.memory}"
        )
    if spec.distributed.launcher == "torchrun" and spec.command:
        head = spec.command[0].rsplit("/", 1)[-1]
        if re.fullmatch(r"python[0-9.]*|torchrun", head):
            problems.append(
                f"spec.command: trimtab already runs torchrun, which takes a script or -m module, "
                f"not {head!r}: drop {head!r} from command, or set distributed.launcher to none"
            )
    if spec.gpus_per_worker and any(v.name == "dshm" for v in spec.volumes) and all(
        m.mount_path != "/dev/shm" for m in spec.volume_mounts
    ):
        problems.append('spec.volumes: the name "dshm" is taken by the /dev/shm trimtab adds')
    return problems


# --- the phase machine ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingInputs:
    spec: TrainingJobSpec
    status: TrainingJobStatus
    # The Job of attempt `status.restarts`, if it exists.
    job: JobObservation | None
    # The first failed worker of that Job, from its pods (None when none failed or pods are gone).
    failure: WorkerFailure | None
    now: datetime.datetime
    generation: int = 0
    problems: tuple[str, ...] = ()
    # Why this attempt's objects cannot be created now: a name another resource holds
    # (`builders.common.claim_problem`). The attempt waits Pending and looks again.
    blocked: str | None = None
    # What is left of earlier attempts: their Jobs that still exist (being deleted or not), and
    # worker pods of earlier Jobs that have not stopped (phase neither Succeeded nor Failed).
    # A failed attempt's surviving workers get a grace period to write a last checkpoint, and
    # a Foreground delete keeps their Job until they are gone: the next attempt, which resumes
    # from that checkpoint, is created only once nothing is left (`previous_attempt_gone`).
    earlier_jobs: tuple[JobObservation, ...] = ()
    earlier_pods: tuple[str, ...] = ()

    @property
    def previous_attempt_gone(self) -> bool:
        """No Job or running worker of an earlier attempt is left."""
        return not self.earlier_jobs and not self.earlier_pods


@dataclass(frozen=True)
class TrainingDecision:
    """The new status and what to do. At most one Job is created or deleted per decision."""

    status: TrainingJobStatus
    # Create the Job (and PodGroup) of attempt `status.restarts`.
    create_job: bool = False
    # Seconds left of spec.activeDeadlineSeconds, for the Job to enforce while trimtab is down.
    active_deadline_seconds: int | None = None
    # Delete this attempt's Job (and PodGroup): it failed, or the job is suspended or overdue.
    delete_job: str | None = None
    # TTL: delete everything trimtab made for this TrainingJob.
    cleanup: bool = False
    # Set this attempt's Job's activeDeadlineSeconds to this: it was admitted later than it was
    # created (Kueue), and the Job controller counts from admission.
    job_deadline_seconds: int | None = None
    # Look again after this many seconds even if nothing changes (backoff, deadline, TTL).
    requeue_after: float | None = None
    # An Event for a transition worth telling: (type "Normal"|"Warning", reason, message).
    events: tuple[tuple[str, str, str], ...] = field(default_factory=tuple)


class _Builder:
    """Accumulates status changes for one decision."""

    def __init__(self, inputs: TrainingInputs) -> None:
        self.inputs = inputs
        self.now_text = format_time(inputs.now)
        self.status = inputs.status.model_copy(deep=True)
        self.status.observed_generation = inputs.generation or self.status.observed_generation
        job = inputs.job
        # The attempt's own worker count: a spec.workers edited since is the next attempt's.
        self.workers: int = (job.completions if job is not None else None) or inputs.spec.workers
        # A finished job, its Job gone, keeps the count it recorded.
        if job is not None or inputs.status.phase not in TERMINAL_PHASES or not self.status.workers:
            self.status.workers = self.workers
        self.events: list[tuple[str, str, str]] = []

    def cond(self, type_: str, status: ConditionStatus, reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(
            self.status.conditions,
            type_,
            status,
            reason,
            message,
            self.now_text,
            self.inputs.generation or None,
        )

    def clear(self, type_: str, reason: str, message: str = "") -> None:
        """Set a condition False, but only if it exists: a fresh job lists only what happened."""
        if get_condition(self.status.conditions, type_) is not None:
            self.cond(type_, "False", reason, message)

    def phase(self, phase: Phase, message: str) -> None:
        old = self.inputs.status.phase
        self.status.phase = phase
        self.status.message = message
        if old != phase and phase in ("Restarting", "Failed"):
            self.events.append(("Warning", phase, message))
        elif old != phase and phase in ("Running", "Succeeded", "Suspended", "Queued"):
            self.events.append(("Normal", phase, message))

    def done(self, **kwargs: Any) -> TrainingDecision:
        return TrainingDecision(status=self.status, events=tuple(self.events), **kwargs)


def _describe(failure: WorkerFailure) -> str:
    who = f"worker {failure.worker}" if failure.worker is not None else "a worker"
    if failure.exit_code is not None:
        text = f"{who} exited with code {failure.exit_code}"
        if failure.reason and failure.reason != "Error":
            text += f" ({failure.reason})"
        return text
    return f"{who} failed: {failure.reason}" + (f": {failure.message}" if failure.message else "")


def _deadline(inputs: TrainingInputs) -> datetime.datetime | None:
    start = parse_time(inputs.status.start_time)
    if inputs.spec.active_deadline_seconds is None or start is None:
        return None
    return start + datetime.timedelta(seconds=inputs.spec.active_deadline_seconds)


def _remaining_deadline(inputs: TrainingInputs) -> int | None:
    if inputs.spec.active_deadline_seconds is None:
        return None
    due = _deadline(inputs)
    if due is None:
        return inputs.spec.active_deadline_seconds
    return max(1, int((due - inputs.now).total_seconds()))


def _finish(b: _Builder, phase: Phase, reason: str, message: str) -> None:
    b.phase(phase, message)
    b.status.completion_time = b.status.completion_time or b.now_text
    b.status.next_restart_time = None
    if phase == "Succeeded":
        b.cond(CONDITION_SUCCEEDED, "True", reason, message)
    else:
        b.cond(CONDITION_FAILED, "True", reason, message)
    b.clear(CONDITION_RUNNING, reason, message)
    b.clear(CONDITION_RESTARTING, reason, message)
    b.clear(CONDITION_QUEUED, reason, message)
    # Nothing runs again, so a resume restarts nothing (a deadline can end a suspended job).
    b.clear(CONDITION_SUSPENDED, reason, message)


def _ttl(b: _Builder) -> TrainingDecision:
    """A finished job: clean up once its TTL has passed, exactly once."""
    ttl = b.inputs.spec.ttl_seconds_after_finished
    finished = parse_time(b.status.completion_time)
    if ttl is None or b.status.cleaned_up or finished is None:
        return b.done()
    due = finished + datetime.timedelta(seconds=ttl)
    if b.inputs.now >= due:
        b.status.cleaned_up = True
        b.events.append(
            ("Normal", "CleanedUp", f"ttlSecondsAfterFinished {ttl}: deleted the Job and Service")
        )
        return b.done(cleanup=True)
    return b.done(requeue_after=(due - b.inputs.now).total_seconds())


def _create(b: _Builder, message: str) -> TrainingDecision:
    """Create this attempt's Job, unless an earlier attempt is not gone yet, or a name it needs
    is taken: then wait."""
    inputs = b.inputs
    if not inputs.previous_attempt_gone:
        return _wait_for_earlier_attempt(b)
    if inputs.blocked:
        text = f"waiting: {inputs.blocked}"
        if inputs.status.message != text:
            b.events.append(("Warning", "NameTaken", inputs.blocked))
        b.phase("Pending", text)
        return b.done(requeue_after=BLOCKED_RETRY_SECONDS)
    b.phase("Pending", message)
    return b.done(create_job=True, active_deadline_seconds=_remaining_deadline(inputs))


def _wait_for_earlier_attempt(b: _Builder) -> TrainingDecision:
    """The next attempt waits until the last one's Job and workers are gone: the old workers
    may still be writing the checkpoint it resumes from (their grace period after SIGTERM), and
    they still hold their GPUs. A Job of theirs that nobody deletes (the operator stopped
    between writing status and deleting it) is deleted now; one Job per step."""
    inputs = b.inputs
    left = [f"Job {j.name}" for j in inputs.earlier_jobs]
    left += [f"pod {p}" for p in inputs.earlier_pods]
    shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
    text = (
        f"waiting for the earlier attempt to stop before attempt {b.status.restarts} starts "
        f"(its workers may still be writing the checkpoint): {shown} not gone yet"
    )
    b.phase("Restarting" if inputs.status.phase == "Restarting" else "Pending", text)
    delete = next((j.name for j in inputs.earlier_jobs if not j.deleting), None)
    return b.done(delete_job=delete, requeue_after=WAIT_SECONDS)


def starts_over(status: TrainingJobStatus, generation: int) -> bool:
    """Whether a job that failed for its spec (InvalidSpec) runs again: the spec changed since
    (a new generation; one the API server refused has no problem the model finds, and the same
    generation would be refused again). The caller checks that the spec has no problem left.

    >>> from trimtab.decisions.conditions import set_condition
    >>> failed = TrainingJobStatus(phase="Failed", conditions=set_condition(
    ...     [], CONDITION_FAILED, "True", "InvalidSpec", "bad", "2025-01-01T00:00:00Z", 3))
    >>> starts_over(failed, 3), starts_over(failed, 4)
    (False, True)
    """
    failed = get_condition(status.conditions, CONDITION_FAILED)
    return (
        status.phase == "Failed"
        and failed is not None
        and failed.reason == "InvalidSpec"
        and (failed.observed_generation is None or failed.observed_generation < generation)
    )


def decide_training(inputs: TrainingInputs) -> TrainingDecision:
    """One step of the phase machine.

    Worked examples (spec: 2 workers, maxRestarts 3, backoff 10 s doubling):
    - no Job yet -> Pending, create attempt 0's Job.
    - Job suspended with a Kueue queue -> Queued (Kueue admits by unsuspending it).
    - Job running with 1 of 2 workers ready -> Starting; 2 of 2 -> Running.
    - Job Failed, worker 1 exit 137 (OOMKilled), restarts 0 -> Restarting, restarts 1, delete
      the Job, next attempt due in 10 s; once due -> create attempt 1's Job (`<name>-r1`).
    - same with restarts 3 -> Failed, reason RestartsExhausted.
    - Job Failed, exit code 2 listed in neverRetryExitCodes -> Failed, reason
      NonRetryableExitCode, whatever the restart count.
    - Job Complete -> Succeeded; ttlSecondsAfterFinished later -> cleanup.
    - spec.suspend -> Suspended, delete the Job; suspend false -> create it again (same
      attempt: a suspension is not a failure). A Job that failed when the suspend is seen is
      counted first (Restarting, restarts 1), and the resume waits out that backoff.
    - activeDeadlineSeconds passed, suspended or not -> Failed, reason DeadlineExceeded.
    - the backoff is over but `llama-r0` (or one of its workers) is still there, stopping ->
      Restarting, "waiting for the earlier attempt to stop ...", a look again in 5 s; attempt
      1's Job is created only once it is gone.
    - a Job to create, but its Service's name is held by a ModelDeployment of the same name
      -> Pending, "waiting: Service llama belongs to ModelDeployment llama, ...", a NameTaken
      Event once, and a look again in 30 s; nothing is created.
    """
    b = _Builder(inputs)
    spec, status, job, now = inputs.spec, b.status, inputs.job, inputs.now

    # An invalid spec blocks everything until the spec changes; it is terminal for this
    # generation only.
    # A running attempt keeps the spec it started with; the problem stops the next one.
    failed = get_condition(status.conditions, CONDITION_FAILED)
    if inputs.problems:
        if job is None and status.phase not in TERMINAL_PHASES:
            _finish(b, "Failed", "InvalidSpec", "; ".join(inputs.problems))
            return b.done()
    elif starts_over(status, inputs.generation):
        # Fixed: start over. The run that follows gets its own TTL clean-up.
        b.status.completion_time = None
        b.status.cleaned_up = None
        b.clear(CONDITION_FAILED, "SpecFixed", "the spec was corrected")
        status.phase = None

    if status.phase in TERMINAL_PHASES:
        decision = _ttl(b)
        if (
            failed is not None
            and failed.reason == REASON_DEADLINE
            and job is not None
            and not job.failed_condition
            and not job.deleting
        ):
            # The deadline's stop did not happen (the delete failed, or the operator stopped
            # after writing status): the workers still run, so delete their Job again.
            decision = replace(decision, delete_job=job.name)
        return decision

    workers = b.workers

    # A Job that completed has finished the training, whatever the spec says since (a suspend
    # set after it completed must not delete it and run the attempt again).
    if job is not None and job.complete:
        status.completion_time = job.completion_time or b.now_text
        status.workers_ready = 0
        _finish(b, "Succeeded", "Completed", f"all {workers} workers completed")
        return _ttl(b)

    # The overall deadline counts from the first start, across restarts and suspensions.
    due = _deadline(inputs)
    if due is not None and now >= due:
        message = f"activeDeadlineSeconds {spec.active_deadline_seconds} passed"
        _finish(b, "Failed", REASON_DEADLINE, message)
        b.status.workers_ready = 0
        # Stop the workers; the Job controller has done so already if its own deadline hit.
        delete = None
        if job is not None and not job.failed_condition and not job.deleting:
            delete = job.name
        return b.done(delete_job=delete)

    # Suspend: stop the workers, keep everything else.
    if spec.suspend:
        if job is not None and job.failed_condition and not job.deleting:
            # The attempt failed before (or as) the suspend came: count it like any failure,
            # so that a suspend and resume never runs a failed attempt again uncounted.
            counted = _on_failure(b, inputs, job)
            if status.phase in TERMINAL_PHASES:
                return counted
        return _suspend(b, due)
    if status.phase == "Suspended":
        b.cond(CONDITION_SUSPENDED, "False", "Resumed", "spec.suspend is false")

    # Waiting out the backoff before the next attempt (also when a suspension came between
    # the failure and the restart: the resume does not cut the backoff short).
    next_at = parse_time(status.next_restart_time)
    pending_restart = status.phase == "Restarting" or (
        status.phase == "Suspended" and next_at is not None
    )
    if pending_restart and job is None:
        if next_at is not None and now < next_at:
            if status.phase != "Restarting":
                b.phase(
                    "Restarting",
                    f"resumed: attempt {status.restarts} starts at {status.next_restart_time}, "
                    "after the restart backoff",
                )
            return b.done(requeue_after=(next_at - now).total_seconds())
        if spec.rightsizing.mode == "Auto" and oom_unanswered(status):
            last = status.last_failure
            failed_at = parse_time((last.recorded_at or last.time) if last else None)
            if failed_at is not None and now < failed_at + OOM_RESIZE_WAIT:
                # The right-sizing pass this kill started has not written yet: the next
                # attempt is built from the resources it applies, so wait for it (bounded).
                b.status.message = (
                    f"waiting for right-sizing to answer the OOM kill before attempt "
                    f"{status.restarts} (at most {OOM_RESIZE_WAIT.seconds} s after it)"
                )
                return b.done(requeue_after=WAIT_SECONDS)
        status.next_restart_time = None
        return _create(b, f"starting attempt {status.restarts} from the checkpoint")

    if job is None:
        if status.phase not in (None, "Pending", "Suspended"):
            # Someone deleted the running attempt's Job: run the same attempt again.
            b.events.append(("Warning", "JobMissing", "the Job was deleted; creating it again"))
        return _create(b, "creating the Job")

    if job.deleting:
        return b.done(requeue_after=WAIT_SECONDS)

    status.workers_ready = job.ready
    if job.failed_condition:
        return _on_failure(b, inputs, job)

    if job.suspended:
        queue = spec.scheduling.queue_name
        message = (
            f"waiting for Kueue to admit the Job in LocalQueue {queue}"
            if queue
            else "the Job is suspended"
        )
        b.phase("Queued", message)
        reason = "WaitingForAdmission" if queue else "JobSuspended"
        b.cond(CONDITION_QUEUED, "True", reason, message)
        b.clear(CONDITION_RUNNING, "Queued", message)
        return b.done()

    # Admitted (or never queued): workers are starting or running.
    if get_condition(status.conditions, CONDITION_QUEUED) is not None:
        b.cond(CONDITION_QUEUED, "False", "Admitted", "the Job was admitted")
    if status.start_time is None:
        status.start_time = job.start_time or b.now_text
    requeue = None
    job_deadline = None
    if spec.active_deadline_seconds is not None:
        left = _deadline(inputs)
        requeue = (left - now).total_seconds() if left is not None else None
        job_deadline = _job_deadline(job, left)
    running = job.ready + job.succeeded
    if running >= workers:
        message = f"{workers}/{workers} workers running"
        if status.restarts:
            message += f" (attempt {status.restarts}, resumed from the checkpoint)"
        b.phase("Running", message)
        b.cond(CONDITION_RUNNING, "True", "AllWorkersRunning", message)
        b.clear(CONDITION_RESTARTING, "Recovered", message)
        return b.done(requeue_after=requeue, job_deadline_seconds=job_deadline)
    message = f"{running}/{workers} workers running"
    b.phase("Starting", message)
    b.cond(CONDITION_RUNNING, "False", "WorkersStarting", message)
    return b.done(requeue_after=requeue, job_deadline_seconds=job_deadline)


def _suspend(b: _Builder, due: datetime.datetime | None) -> TrainingDecision:
    """spec.suspend: delete the attempt's Job (its workers stop; the checkpoint, Service and
    restart count stay). A pending restart keeps its nextRestartTime, and the deadline, which
    counts on while suspended, is looked at again when it falls due."""
    status, job, now = b.status, b.inputs.job, b.inputs.now
    message = "spec.suspend is true: workers stopped; the checkpoint is kept"
    if status.next_restart_time is not None:
        message += (
            f"; attempt {status.restarts} follows a resume, not before "
            f"{status.next_restart_time} (restart backoff)"
        )
    b.phase("Suspended", message)
    b.cond(CONDITION_SUSPENDED, "True", "SuspendedBySpec", "spec.suspend is true")
    b.clear(CONDITION_RUNNING, "Suspended")
    b.clear(CONDITION_QUEUED, "Suspended")
    status.workers_ready = 0
    requeue = (due - now).total_seconds() if due is not None else None
    delete = job.name if job is not None and not job.deleting else None
    return b.done(delete_job=delete, requeue_after=requeue)


def _job_deadline(job: JobObservation, due: datetime.datetime | None) -> int | None:
    """The activeDeadlineSeconds that makes an admitted Job stop at the TrainingJob's deadline,
    when the one it has would stop it later; None when it needs none.

    A Job gets what is left of the deadline when it is created, so that its workers stop on
    time while the operator is down. Under Kueue it may wait long before admission, and the Job
    controller counts its deadline from then (from each re-admission after a preemption too):
    the deadline would pass that much late.

    >>> at = lambda s: datetime.datetime(2025, 6, 1, 12, 0, s, tzinfo=datetime.UTC)
    >>> queued = JobObservation("j", start_time="2025-06-01T12:00:40Z", active_deadline_seconds=50)
    >>> _job_deadline(queued, at(59)), _job_deadline(queued, at(59) + datetime.timedelta(hours=1))
    (19, None)
    """
    start = parse_time(job.start_time)
    if due is None or start is None or job.active_deadline_seconds is None:
        return None
    wanted = max(1, math.ceil((due - start).total_seconds()))
    return wanted if job.active_deadline_seconds > wanted else None


def _on_failure(b: _Builder, inputs: TrainingInputs, job: JobObservation) -> TrainingDecision:
    spec, status, now = inputs.spec, b.status, inputs.now
    failure = inputs.failure or failure_from_job(job)
    from_job = failure_from_job(job)
    if failure.exit_code is None and from_job.exit_code is not None:
        failure = from_job
    # recordedAt: when trimtab saw it, which is what a right-sizing pass is compared with
    # (`oom_unanswered`); the kubelet's time of the kill can be well before.
    failure = failure.model_copy(
        update={
            "restart": status.restarts,
            "time": failure.time or b.now_text,
            "recorded_at": b.now_text,
        }
    )
    status.last_failure = failure
    status.workers_ready = 0
    what = _describe(failure)
    policy = spec.failure_policy

    if job.failure_reason == REASON_DEADLINE:
        _finish(b, "Failed", REASON_DEADLINE, f"activeDeadlineSeconds passed: {what}")
        return _ttl(b)
    never = failure.exit_code is not None and failure.exit_code in policy.never_retry_exit_codes
    if never or job.failure_reason == REASON_POD_FAILURE_POLICY:
        _finish(
            b,
            "Failed",
            "NonRetryableExitCode",
            f"{what}, which failurePolicy.neverRetryExitCodes does not retry",
        )
        return _ttl(b)
    if 0 <= policy.max_restarts <= status.restarts:
        _finish(
            b,
            "Failed",
            "RestartsExhausted",
            f"{what}; gave up after {status.restarts} restarts (failurePolicy.maxRestarts "
            f"{policy.max_restarts})",
        )
        return _ttl(b)

    status.restarts += 1
    wait = restart_backoff(policy, status.restarts)
    status.next_restart_time = format_time(now + datetime.timedelta(seconds=wait))
    limit = "unlimited" if policy.max_restarts < 0 else str(policy.max_restarts)
    resume = f" from {spec.checkpoint.directory}" if spec.checkpoint is not None else ""
    message = f"{what}; restart {status.restarts} of {limit}{resume} in {wait}s"
    b.phase("Restarting", message)
    b.cond(CONDITION_RESTARTING, "True", "WorkerFailed", message)
    b.cond(CONDITION_RUNNING, "False", "WorkerFailed", what)
    return b.done(delete_job=job.name, requeue_after=float(wait))


# --- diagnosis --------------------------------------------------------------------------------

LOW_UTILIZATION = 0.5
LOW_MEMORY_USE = 0.5


def _window_text(seconds: int) -> str:
    if seconds % 3600 == 0 and seconds >= 3600:
        hours = seconds // 3600
        return f"{hours} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def diagnose(
    gpu_utilization: float | None,
    memory_used_ratio: float | None,
    window_seconds: int,
    now: datetime.datetime,
) -> Diagnosis | None:
    """A plain sentence about how well the job uses its GPUs, from the mean utilization (0..1)
    and the peak share of GPU memory used (0..1) over the window. None without data.

    >>> diagnose(0.23, 0.9, 600, datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)).message
    'input-bound: GPU utilization 23% over 10 min; the GPUs wait for data, CPU work or the network'
    >>> diagnose(0.95, 0.3, 600, datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)).message
    'memory headroom: at most 30% of GPU memory used over 10 min; a larger batch would fit'
    >>> diagnose(0.95, 0.9, 600, datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)).message
    'GPU-bound: GPU utilization 95% over 10 min'
    """
    if gpu_utilization is None and memory_used_ratio is None:
        return None
    window = _window_text(window_seconds)
    sentences: list[str] = []
    if gpu_utilization is not None and gpu_utilization < LOW_UTILIZATION:
        sentences.append(
            f"input-bound: GPU utilization {round(gpu_utilization * 100)}% over {window}; "
            "the GPUs wait for data, CPU work or the network"
        )
    if memory_used_ratio is not None and memory_used_ratio < LOW_MEMORY_USE:
        sentences.append(
            f"memory headroom: at most {round(memory_used_ratio * 100)}% of GPU memory used over "
            f"{window}; a larger batch would fit"
        )
    if not sentences and gpu_utilization is not None:
        sentences.append(
            f"GPU-bound: GPU utilization {round(gpu_utilization * 100)}% over {window}"
        )
    elif not sentences and memory_used_ratio is not None:
        sentences.append(
            f"GPU memory: at most {round(memory_used_ratio * 100)}% used over {window}"
        )
    return Diagnosis(
        gpu_utilization=gpu_utilization,
        memory_used_ratio=memory_used_ratio,
        window_seconds=window_seconds,
        message="; ".join(sentences),
        time=format_time(now),
    )

