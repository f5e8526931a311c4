"""The TrainingJob phase machine, restart backoff, failure detection and GPU diagnosis: tables of
named cases over the pure functions in decisions/training.py."""

from __future__ import annotations

import datetime
import doctest
from typing import Any

import pytest

import trimtab.decisions.training as D
from trimtab.api.trainingjob import FailurePolicy, TrainingJobSpec, TrainingJobStatus, WorkerFailure
from trimtab.decisions.conditions import get_condition

T0 = datetime.datetime(2025, 6, 1, 12, 0, 0, tzinfo=datetime.UTC)


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def ts(seconds: float) -> str:
    return D.format_time(at(seconds))


def spec(**over: Any) -> TrainingJobSpec:
    base: dict[str, Any] = {
        "image": "train:1",
        "command": ["train.py"],
        "workers": 2,
        "gpusPerWorker": 8,
        "failurePolicy": {"maxRestarts": 3, "neverRetryExitCodes": [2], "backoffSeconds": 10},
        "volumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "c"}}],
        "volumeMounts": [{"name": "ckpt", "mountPath": "/ckpt"}],
        "checkpoint": {"directory": "/ckpt"},
    }
    base.update(over)
    return TrainingJobSpec.model_validate(base)


def status(**over: Any) -> TrainingJobStatus:
    return TrainingJobStatus.model_validate(over)


def job(**over: Any) -> D.JobObservation:
    return D.JobObservation(name=over.pop("name", "llama-r0"), **over)


OOM = WorkerFailure(worker=1, pod="llama-r0-1-abc", exit_code=137, reason="OOMKilled")
BAD_CONFIG = WorkerFailure(worker=0, pod="llama-r0-0-abc", exit_code=2, reason="Error")
FAILED = {"failed_condition": True, "failure_reason": "BackoffLimitExceeded", "failed": 1}


@pytest.mark.parametrize(
    ("s", "st", "j", "failure", "now", "want"),
    [
        pytest.param(
            spec(),
            status(),
            None,
            None,
            0,
            {"phase": "Pending", "create": True, "restarts": 0},
            id="new-creates-attempt-0",
        ),
        pytest.param(
            spec(scheduling={"queueName": "team-a"}),
            status(phase="Pending"),
            job(suspended=True),
            None,
            1,
            {"phase": "Queued", "cond": ("Queued", "True", "WaitingForAdmission")},
            id="kueue-suspended-is-queued",
        ),
        pytest.param(
            spec(scheduling={"queueName": "team-a"}),
            status(phase="Queued", conditions=[{"type": "Queued", "status": "True"}]),
            job(active=2, ready=1, start_time=ts(5)),
            None,
            6,
            {"phase": "Starting", "cond": ("Queued", "False", "Admitted"), "start": ts(5)},
            id="admitted-is-starting",
        ),
        pytest.param(
            spec(),
            status(phase="Starting", start_time=ts(5)),
            job(active=2, ready=2),
            None,
            9,
            {"phase": "Running", "cond": ("Running", "True", "AllWorkersRunning"), "ready": 2},
            id="all-workers-ready-is-running",
        ),
        pytest.param(
            spec(),
            status(phase="Running", start_time=ts(0)),
            job(active=1, ready=1, succeeded=1),
            None,
            100,
            {"phase": "Running"},
            id="one-worker-done-still-running",
        ),
        pytest.param(
            spec(),
            status(phase="Running", start_time=ts(0)),
            job(complete=True, succeeded=2, completion_time=ts(500)),
            None,
            501,
            {
                "phase": "Succeeded",
                "cond": ("Succeeded", "True", "Completed"),
                "completion": ts(500),
            },
            id="complete-is-succeeded",
        ),
        pytest.param(
            spec(),
            status(phase="Running", start_time=ts(0)),
            job(**FAILED),
            OOM,
            100,
            {
                "phase": "Restarting",
                "restarts": 1,
                "delete": "llama-r0",
                "requeue": 10,
                "next": ts(110),
                "cond": ("Restarting", "True", "WorkerFailed"),
                "failure": (1, 137, "OOMKilled", 0),
            },
            id="worker-failure-restarts-whole-job",
        ),
        pytest.param(
            spec(),
            status(phase="Running", start_time=ts(0), restarts=2),
            job(name="llama-r2", **FAILED),
            OOM,
            100,
            {"phase": "Restarting", "restarts": 3, "requeue": 40, "next": ts(140)},
            id="backoff-doubles",
        ),
        pytest.param(
            spec(),
            status(phase="Restarting", restarts=1, next_restart_time=ts(110), start_time=ts(0)),
            None,
            None,
            105,
            {"phase": "Restarting", "create": False, "requeue": 5},
            id="waits-out-the-backoff",
        ),
        pytest.param(
            spec(),
            status(phase="Restarting", restarts=1, next_restart_time=ts(110), start_time=ts(0)),
            None,
            None,
            110,
            {"phase": "Pending", "create": True, "restarts": 1},
            id="backoff-over-creates-next-attempt",
        ),
        pytest.param(
            spec(rightsizing={"mode": "Auto"}),
            status(
                phase="Restarting",
                restarts=1,
                next_restart_time=ts(110),
                start_time=ts(0),
                last_failure={"reason": "OOMKilled", "time": ts(100)},
            ),
            None,
            None,
            110,
            {"phase": "Restarting", "create": False, "requeue": 5},
            id="auto-waits-for-right-sizing-to-answer-the-oom-kill",
        ),
        pytest.param(
            spec(rightsizing={"mode": "Auto"}),
            status(
                phase="Restarting",
                restarts=1,
                next_restart_time=ts(110),
                start_time=ts(0),
                last_failure={"reason": "OOMKilled", "time": ts(100)},
                recommendations={"updatedAt": ts(104)},
            ),
            None,
            None,
            110,
            {"phase": "Pending", "create": True, "restarts": 1},
            id="auto-oom-answered-creates-next-attempt",
        ),
        pytest.param(
            spec(rightsizing={"mode": "Auto"}),
            status(
                phase="Restarting",
                restarts=1,
                next_restart_time=ts(110),
                start_time=ts(0),
                last_failure={"reason": "OOMKilled", "time": ts(100)},
            ),
            None,
            None,
            220,
            {"phase": "Pending", "create": True, "restarts": 1},
            id="auto-oom-unanswered-waits-at-most-120s",
        ),
        pytest.param(
            spec(),
            status(
                phase="Restarting",
                restarts=1,
                next_restart_time=ts(110),
                start_time=ts(0),
                last_failure={"reason": "OOMKilled", "time": ts(100)},
            ),
            None,
            None,
            110,
            {"phase": "Pending", "create": True, "restarts": 1},
            id="recommend-mode-does-not-wait",
        ),
        pytest.param(
            spec(),
            status(
                phase="Running",
                restarts=1,
                start_time=ts(0),
                conditions=[{"type": "Restarting", "status": "True"}],
            ),
            job(name="llama-r1", active=2, ready=2),
            None,
            200,
            {"phase": "Running", "cond": ("Restarting", "False", "Recovered")},
            id="recovered-clears-restarting",
        ),
        pytest.param(
            spec(),
            status(phase="Running", restarts=3, start_time=ts(0)),
            job(name="llama-r3", **FAILED),
            OOM,
            100,
            {
                "phase": "Failed",
                "restarts": 3,
                "delete": None,
                "cond": ("Failed", "True", "RestartsExhausted"),
            },
            id="restarts-exhausted-fails",
        ),
        pytest.param(
            spec(failurePolicy={"maxRestarts": 0}),
            status(phase="Running", start_time=ts(0)),
            job(**FAILED),
            OOM,
            100,
            {"phase": "Failed", "cond": ("Failed", "True", "RestartsExhausted")},
            id="max-restarts-zero-fails-first-time",
        ),
        pytest.param(
            spec(failurePolicy={"maxRestarts": -1}, activeDeadlineSeconds=10**6),
            status(phase="Running", restarts=500, start_time=ts(0)),
            job(name="llama-r500", **FAILED),
            OOM,
            100,
            {"phase": "Restarting", "restarts": 501, "requeue": 300},
            id="unlimited-restarts-capped-backoff",
        ),
        pytest.param(
            spec(),
            status(phase="Running", start_time=ts(0)),
            job(**FAILED),
            BAD_CONFIG,
            100,
            {"phase": "Failed", "restarts": 0, "cond": ("Failed", "True", "NonRetryableExitCode")},
            id="never-retry-exit-code-fails-at-once",
        ),
        pytest.param(
            spec(),
            status(phase="Running", start_time=ts(0)),
            job(
                failed_condition=True,
                failure_reason="PodFailurePolicy",
                # The Job controller's message: "rule at index 0" is the podFailurePolicy
                # rule's (trimtab writes one); the worker is the pod's index.
                failure_message="Container trainer for pod ml/llama-r0-1-x7k2q failed with exit "
                "code 2 matching FailJob rule at index 0",
            ),
            None,
            100,
            {
                "phase": "Failed",
                "cond": ("Failed", "True", "NonRetryableExitCode"),
                "failure": (1, 2, "PodFailurePolicy", 0),
            },
            id="never-retry-from-job-condition-when-pods-are-gone",
        ),
        pytest.param(
            spec(activeDeadlineSeconds=3600),
            status(phase="Running", start_time=ts(0)),
            job(active=2, ready=2),
            None,
            3600,
            {
                "phase": "Failed",
                "delete": "llama-r0",
                "cond": ("Failed", "True", "DeadlineExceeded"),
            },
            id="active-deadline-stops-the-job",
        ),
        pytest.param(
            spec(activeDeadlineSeconds=3600),
            status(phase="Running", start_time=ts(0)),
            job(active=2, ready=2),
            None,
            600,
            {"phase": "Running", "requeue": 3000},
            id="deadline-requeues",
        ),
        pytest.param(
            spec(activeDeadlineSeconds=3600),
            status(phase="Restarting", restarts=1, next_restart_time=ts(1000), start_time=ts(0)),
            None,
            None,
            1000,
            {"phase": "Pending", "create": True, "deadline_left": 2600},
            id="next-attempt-gets-the-rest-of-the-deadline",
        ),
        pytest.param(
            spec(activeDeadlineSeconds=3600),
            status(phase="Running", start_time=ts(0)),
            job(failed_condition=True, failure_reason="DeadlineExceeded"),
            None,
            3601,
            {"phase": "Failed", "delete": None, "cond": ("Failed", "True", "DeadlineExceeded")},
            id="job-deadline-fails-without-restart",
        ),
        pytest.param(
            spec(suspend=True),
            status(phase="Running", start_time=ts(0)),
            job(active=2, ready=2),
            None,
            50,
            {
                "phase": "Suspended",
                "delete": "llama-r0",
                "ready": 0,
                "cond": ("Suspended", "True", "SuspendedBySpec"),
            },
            id="suspend-deletes-the-job",
        ),
        pytest.param(
            spec(suspend=True),
            status(phase="Suspended"),
            job(deleting=True),
            None,
            51,
            {"phase": "Suspended", "delete": None},
            id="suspended-while-deleting",
        ),
        pytest.param(
            spec(),
            status(
                phase="Suspended",
                start_time=ts(0),
                conditions=[{"type": "Suspended", "status": "True"}],
            ),
            None,
            None,
            60,
            {
                "phase": "Pending",
                "create": True,
                "restarts": 0,
                "cond": ("Suspended", "False", "Resumed"),
            },
            id="resume-recreates-same-attempt",
        ),
        pytest.param(
            spec(),
            status(phase="Suspended"),
            job(deleting=True),
            None,
            60,
            {"create": False, "requeue": 5},
            id="resume-waits-for-the-old-job-to-go",
        ),
        pytest.param(
            spec(suspend=True),
            status(phase="Succeeded", completion_time=ts(0)),
            None,
            None,
            10,
            {"phase": "Succeeded", "delete": None},
            id="terminal-ignores-suspend",
        ),
        pytest.param(
            # The Job completed, and spec.suspend was set before trimtab saw it: the training
            # is done; the Job is not deleted and the attempt not run again.
            spec(suspend=True),
            status(phase="Running", start_time=ts(0)),
            job(complete=True, completion_time=ts(90)),
            None,
            100,
            {"phase": "Succeeded", "delete": None, "create": False,
             "cond": ("Succeeded", "True", "Completed")},
            id="completed-before-a-suspend-is-success",
        ),
        pytest.param(
            # The deadline failed the job but the delete that stops its workers did not happen
            # (refused, or the operator stopped after writing status): it is sent again.
            spec(activeDeadlineSeconds=3600),
            status(phase="Failed", start_time=ts(0), completion_time=ts(3601),
                   conditions=[{"type": "Failed", "status": "True",
                                "reason": "DeadlineExceeded"}]),
            job(active=2, ready=2),
            None,
            3700,
            {"phase": "Failed", "delete": "llama-r0", "create": False},
            id="a-deadline-stop-that-did-not-happen-is-retried",
        ),
        pytest.param(
            spec(activeDeadlineSeconds=3600),
            status(phase="Failed", start_time=ts(0), completion_time=ts(3601),
                   conditions=[{"type": "Failed", "status": "True",
                                "reason": "DeadlineExceeded"}]),
            job(deleting=True),
            None,
            3700,
            {"phase": "Failed", "delete": None},
            id="a-deadline-stop-under-way-is-left-alone",
        ),
        pytest.param(
            # Attempt 1's Job was created at 600 s with the 3000 s left, then waited in Kueue
            # until 2000 s: the Job controller counts its 3000 s from admission, which would
            # stop it at 5000 s. It is set to the 1600 s left at admission.
            spec(activeDeadlineSeconds=3600),
            status(phase="Starting", restarts=1, start_time=ts(0)),
            job(active=2, ready=1, start_time=ts(2000), active_deadline_seconds=3000),
            None,
            2010,
            {"phase": "Starting", "job_deadline": 1600, "requeue": 1590},
            id="a-job-admitted-late-gets-the-deadline-left",
        ),
        pytest.param(
            spec(activeDeadlineSeconds=3600),
            status(phase="Running", start_time=ts(0)),
            job(active=2, ready=2, start_time=ts(0), active_deadline_seconds=3600),
            None,
            10,
            {"phase": "Running", "job_deadline": None},
            id="a-job-admitted-at-once-keeps-its-deadline",
        ),
        pytest.param(
            spec(ttlSecondsAfterFinished=60),
            status(phase="Succeeded", completion_time=ts(0)),
            job(complete=True),
            None,
            30,
            {"phase": "Succeeded", "cleanup": False, "requeue": 30},
            id="ttl-not-yet",
        ),
        pytest.param(
            spec(ttlSecondsAfterFinished=60),
            status(phase="Failed", completion_time=ts(0)),
            job(**FAILED),
            None,
            60,
            {"phase": "Failed", "cleanup": True, "cleaned": True},
            id="ttl-cleans-up",
        ),
        pytest.param(
            spec(ttlSecondsAfterFinished=60),
            status(phase="Failed", completion_time=ts(0), cleaned_up=True),
            None,
            None,
            600,
            {"phase": "Failed", "cleanup": False, "create": False},
            id="ttl-cleans-up-once",
        ),
        pytest.param(
            spec(),
            status(phase="Running", start_time=ts(0)),
            None,
            None,
            100,
            {"phase": "Pending", "create": True, "restarts": 0},
            id="job-deleted-by-someone-is-recreated",
        ),
    ],
)
def test_phase_machine(
    s: TrainingJobSpec,
    st: TrainingJobStatus,
    j: D.JobObservation | None,
    failure: WorkerFailure | None,
    now: float,
    want: dict[str, Any],
) -> None:
    d = D.decide_training(D.TrainingInputs(s, st, j, failure, at(now), generation=1))
    check(d, want)


def check(d: D.TrainingDecision, want: dict[str, Any]) -> None:
    """The decision has what `want` names (each key optional)."""
    out = d.status
    if "phase" in want:
        assert out.phase == want["phase"], out.message
    if "message" in want:
        assert want["message"] in (out.message or ""), out.message
    if "workers" in want:
        assert out.workers == want["workers"]
    if "create" in want:
        assert d.create_job is want["create"]
    if "restarts" in want:
        assert out.restarts == want["restarts"]
    if "delete" in want:
        assert d.delete_job == want["delete"]
    if "requeue" in want:
        if want["requeue"] is None:
            assert d.requeue_after is None
        else:
            assert d.requeue_after == pytest.approx(want["requeue"])
    if "next" in want:
        assert out.next_restart_time == want["next"]
    if "start" in want:
        assert out.start_time == want["start"]
    if "completion" in want:
        assert out.completion_time == want["completion"]
    if "ready" in want:
        assert out.workers_ready == want["ready"]
    if "cleanup" in want:
        assert d.cleanup is want["cleanup"]
    if "cleaned" in want:
        assert out.cleaned_up is want["cleaned"]
    if "deadline_left" in want:
        assert d.active_deadline_seconds == want["deadline_left"]
    if "job_deadline" in want:
        assert d.job_deadline_seconds == want["job_deadline"]
    for key in ("cond", "cond2"):
        if key in want:
            kind, cstatus, reason = want[key]
            cond = get_condition(out.conditions, kind)
            assert cond is not None, [c.type for c in out.conditions]
            assert (cond.status, cond.reason) == (cstatus, reason), cond.message
    if "failure" in want:
        lf = out.last_failure
        assert lf is not None
        assert (lf.worker, lf.exit_code, lf.reason, lf.restart) == want["failure"]
    if "recorded" in want:
        assert out.last_failure is not None
        assert out.last_failure.recorded_at == want["recorded"]


TAKEN = "Service llama belongs to ModelDeployment llama, not to this TrainingJob"


@pytest.mark.parametrize(
    ("st", "j", "now", "want"),
    [
        pytest.param(status(), None, 0, {"phase": "Pending", "event": True},
                     id="first-attempt-waits-for-the-name"),
        pytest.param(status(phase="Pending", message=f"waiting: {TAKEN}"), None, 30,
                     {"phase": "Pending", "event": False}, id="says-it-once"),
        pytest.param(status(phase="Restarting", restarts=1, next_restart_time=ts(10)), None, 20,
                     {"phase": "Pending", "event": True, "restarts": 1},
                     id="next-attempt-waits-for-the-name"),
        pytest.param(status(phase="Restarting", restarts=1, next_restart_time=ts(10)), None, 5,
                     {"phase": "Restarting", "requeue": 5, "event": False},
                     id="backoff-first"),
        pytest.param(status(phase="Running", start_time=ts(0)), job(active=2, ready=2), 50,
                     {"phase": "Running", "event": False}, id="a-running-job-is-not-blocked"),
    ],
)  # fmt: skip
def test_an_attempt_waits_while_its_service_name_is_taken(
    st: TrainingJobStatus, j: D.JobObservation | None, now: float, want: dict[str, Any]
) -> None:
    """`blocked` (a name another resource holds) stops a Job being created, never a running
    one, and is told once in an Event, with the reason in status.message."""
    d = D.decide_training(
        D.TrainingInputs(spec(), st, j, None, at(now), generation=1, blocked=TAKEN)
    )
    assert d.status.phase == want["phase"], d.status.message
    assert d.create_job is False
    if want["phase"] == "Pending":
        assert d.status.message == f"waiting: {TAKEN}"
        assert d.requeue_after == D.BLOCKED_RETRY_SECONDS
    if "requeue" in want:
        assert d.requeue_after == pytest.approx(want["requeue"])
    if "restarts" in want:
        assert d.status.restarts == want["restarts"]
    assert (("Warning", "NameTaken", TAKEN) in d.events) is want["event"]


LONG = "x" * 60 + "-r0"  # cut by the Job controller: `<job[:54]>-12-`


@pytest.mark.parametrize(
    ("message", "want"),
    [
        pytest.param("Container trainer for pod ml/llama-r0-3-x7k2q failed with exit code 2 "
                     "matching FailJob rule at index 0", (3, "llama-r0-3-x7k2q", 2),
                     id="worker-from-the-pod-not-the-rule"),
        pytest.param(f"Container trainer for pod ml/{LONG[:54]}-12-b7z2q failed with exit code "
                     "3 matching FailJob rule at index 0", (12, f"{LONG[:54]}-12-b7z2q", 3),
                     id="a-cut-job-name-keeps-the-index"),
        pytest.param("Job has reached the specified backoff limit", (None, None, None),
                     id="no-pod-named"),
    ],
)  # fmt: skip
def test_failure_from_job_condition(message: str, want: tuple[Any, ...]) -> None:
    f = D.failure_from_job(
        D.JobObservation("j", failed_condition=True, failure_reason="PodFailurePolicy",
                         failure_message=message)
    )  # fmt: skip
    assert (f.worker, f.pod, f.exit_code) == want


def test_restarting_message_names_worker_exit_code_and_checkpoint() -> None:
    d = D.decide_training(
        D.TrainingInputs(
            spec(), status(phase="Running", start_time=ts(0)), job(**FAILED), OOM, at(100)
        )
    )
    assert d.status.message == (
        "worker 1 exited with code 137 (OOMKilled); restart 1 of 3 from /ckpt in 10s"
    )
    assert d.events == (("Warning", "Restarting", d.status.message),)


def test_exhausted_message_says_why() -> None:
    d = D.decide_training(
        D.TrainingInputs(
            spec(),
            status(phase="Running", restarts=3, start_time=ts(0)),
            job(name="llama-r3", **FAILED),
            OOM,
            at(100),
        )
    )
    assert d.status.message == (
        "worker 1 exited with code 137 (OOMKilled); gave up after 3 restarts "
        "(failurePolicy.maxRestarts 3)"
    )


def test_full_run_through_restarts_to_success() -> None:
    """Drive the machine as the handler does: attempt 0 fails, attempt 1 succeeds."""
    s = spec()
    st = status()
    trace: list[str] = []

    def step(j: D.JobObservation | None, now: float, failure: WorkerFailure | None = None) -> Any:
        nonlocal st
        d = D.decide_training(D.TrainingInputs(s, st, j, failure, at(now)))
        st = d.status
        trace.append(str(st.phase))
        return d

    assert step(None, 0).create_job
    step(job(active=2, ready=0), 1)
    step(job(active=2, ready=2), 2)
    assert step(job(**FAILED), 50, OOM).delete_job == "llama-r0"
    step(None, 55)
    assert step(None, 60).create_job and st.restarts == 1
    step(job(name="llama-r1", active=2, ready=2), 70)
    step(job(name="llama-r1", complete=True, succeeded=2), 80)
    assert trace == [
        "Pending",
        "Starting",
        "Running",
        "Restarting",
        "Restarting",
        "Pending",
        "Running",
        "Succeeded",
    ]
    assert st.start_time == ts(1)
    types = {c.type: (c.status, c.reason) for c in st.conditions}
    assert types == {
        "Running": ("False", "Completed"),
        "Restarting": ("False", "Completed"),
        "Succeeded": ("True", "Completed"),
    }


def test_invalid_spec_fails_until_fixed() -> None:
    problems = ("spec.command: nope",)
    d = D.decide_training(D.TrainingInputs(spec(), status(), None, None, at(0), 1, problems))
    assert d.status.phase == "Failed" and not d.create_job
    cond = get_condition(d.status.conditions, "Failed")
    assert cond is not None and cond.reason == "InvalidSpec"
    fixed = D.decide_training(D.TrainingInputs(spec(), d.status, None, None, at(5), 2))
    assert fixed.status.phase == "Pending" and fixed.create_job


@pytest.mark.parametrize(
    ("policy", "restart", "want"),
    [
        pytest.param({"backoffSeconds": 10, "maxBackoffSeconds": 300}, 1, 10, id="first"),
        pytest.param({"backoffSeconds": 10, "maxBackoffSeconds": 300}, 4, 80, id="fourth"),
        pytest.param({"backoffSeconds": 10, "maxBackoffSeconds": 300}, 9, 300, id="capped"),
        pytest.param({"backoffSeconds": 10, "maxBackoffSeconds": 300}, 10**6, 300, id="huge"),
        pytest.param({"backoffSeconds": 0, "maxBackoffSeconds": 0}, 3, 0, id="no-backoff"),
    ],
)
def test_restart_backoff(policy: dict[str, int], restart: int, want: int) -> None:
    assert D.restart_backoff(FailurePolicy.model_validate(policy), restart) == want


def pod(index: int, code: int, finished: str, reason: str = "Error") -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"llama-r0-{index}-x",
            "annotations": {D.COMPLETION_INDEX: str(index)},
        },
        "status": {
            "phase": "Failed" if code else "Succeeded",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {
                        "terminated": {"exitCode": code, "reason": reason, "finishedAt": finished}
                    },
                }
            ],
        },
    }


@pytest.mark.parametrize(
    ("pods", "want"),
    [
        pytest.param([], None, id="no-pods"),
        pytest.param([pod(0, 0, ts(5))], None, id="only-success"),
        pytest.param(
            [pod(0, 143, ts(9)), pod(1, 137, ts(10), "OOMKilled")],
            (1, 137),
            id="sigterm-of-survivor-is-not-the-cause",
        ),
        pytest.param([pod(0, 1, ts(9)), pod(1, 3, ts(10))], (0, 1), id="earliest-wins"),
        pytest.param(
            [
                {
                    "metadata": {"name": "p", "labels": {D.COMPLETION_INDEX: "3"}},
                    "status": {"phase": "Failed", "reason": "Evicted", "message": "node drained"},
                }
            ],
            (3, None),
            id="evicted-without-container-status",
        ),
    ],
)
def test_first_worker_failure(pods: list[dict[str, Any]], want: tuple[int, int] | None) -> None:
    got = D.first_worker_failure(pods)
    assert (None if got is None else (got.worker, got.exit_code)) == want


def test_first_worker_failure_records_the_memory_limit_it_had() -> None:
    """An OOM kill is later valued at the limit the killed container had, not the one the next
    attempt gets (which right-sizing may already have raised for this very kill)."""
    killed = pod(1, 137, ts(10), "OOMKilled")
    killed["spec"] = {
        "containers": [
            {"name": "sidecar", "resources": {"limits": {"memory": "1Gi"}}},
            {"name": "trainer", "resources": {"limits": {"memory": "16Gi"}}},
        ]
    }
    got = D.first_worker_failure([killed])
    assert got is not None and got.memory_limit == "16Gi"
    no_spec = D.first_worker_failure([pod(1, 137, ts(10), "OOMKilled")])
    assert no_spec is not None and no_spec.memory_limit is None


@pytest.mark.parametrize(
    ("util", "mem", "window", "want"),
    [
        pytest.param(0.23, 0.9, 600, "input-bound: GPU utilization 23% over 10 min", id="low-util"),
        pytest.param(
            0.95,
            0.2,
            3600,
            "memory headroom: at most 20% of GPU memory used over 1 h",
            id="memory-headroom",
        ),
        pytest.param(
            0.3,
            0.3,
            600,
            "input-bound: GPU utilization 30% over 10 min; "
            "the GPUs wait for data, CPU work or the network; memory headroom",
            id="both",
        ),
        pytest.param(0.9, None, 90, "GPU-bound: GPU utilization 90% over 90 s", id="busy"),
        pytest.param(None, 0.8, 600, "GPU memory: at most 80% used over 10 min", id="memory-only"),
    ],
)
def test_diagnosis(util: float | None, mem: float | None, window: int, want: str) -> None:
    d = D.diagnose(util, mem, window, T0)
    assert d is not None
    assert d.message.startswith(want)


def test_no_metrics_no_diagnosis() -> None:
    assert D.diagnose(None, None, 600, T0) is None


@pytest.mark.parametrize(
    ("over", "field"),
    [
        pytest.param(
            {"command": ["python", "train.py"]}, "spec.command", id="python-under-torchrun"
        ),
        pytest.param(
            {"command": ["/usr/bin/torchrun", "t.py"]}, "spec.command", id="torchrun-twice"
        ),
        pytest.param(
            {"resources": {"memory": "8Gi", "memoryLimit": "4Gi"}},
            "spec.resources.memoryLimit",
            id="limit-below-request",
        ),
        pytest.param(
            {"volumes": [{"name": "dshm", "emptyDir": {}}], "volumeMounts": [], "checkpoint": None},
            "spec.volumes",
            id="dshm-name-taken",
        ),
    ],
)
def test_spec_problems(over: dict[str, Any], field: str) -> None:
    problems = D.find_spec_problems(spec(**over))
    assert problems and problems[0].startswith(field + ":"), problems


def test_no_problems_in_a_good_spec() -> None:
    assert D.find_spec_problems(spec()) == []
    assert D.find_spec_problems(spec(command=["python"], distributed={"launcher": "none"})) == []


def test_docstring_examples() -> None:
    result = doctest.testmod(D)
    assert result.attempted > 0 and result.failed == 0


# --- the next attempt waits for the last one to be gone (review #1) -----------------------------

# Attempt 0 failed; its Job is being deleted (Foreground) while a worker uses its grace period.
R0_STOPPING = job(name="llama-r0", deleting=True, active=1, **FAILED)
RESTARTING = status(phase="Restarting", restarts=1, next_restart_time=ts(10), start_time=ts(0))
STOPPING_PODS = tuple(f"llama-r0-{i}-abcde" for i in range(5))


@pytest.mark.parametrize(
    ("st", "earlier_jobs", "earlier_pods", "now", "want"),
    [
        pytest.param(RESTARTING, (R0_STOPPING,), (), 20,
                     {"phase": "Restarting", "create": False, "delete": None, "requeue": 5,
                      "restarts": 1,
                      "message": "before attempt 1 starts (its workers may still be writing the "
                                 "checkpoint): Job llama-r0 not gone yet"},
                     id="old-job-still-being-deleted-waits"),
        pytest.param(RESTARTING, (), ("llama-r0-1-abcde",), 20,
                     {"phase": "Restarting", "create": False, "delete": None, "requeue": 5,
                      "message": "pod llama-r0-1-abcde not gone yet"},
                     id="old-worker-still-stopping-waits"),
        pytest.param(RESTARTING, (), STOPPING_PODS, 20,
                     {"create": False, "message": "pod llama-r0-2-abcde and 2 more not gone yet"},
                     id="many-left-are-counted-not-listed"),
        pytest.param(RESTARTING, (job(name="llama-r0", **FAILED),), (), 20,
                     {"phase": "Restarting", "create": False, "delete": "llama-r0", "requeue": 5},
                     id="old-job-nobody-deletes-is-deleted-first"),
        pytest.param(RESTARTING, (R0_STOPPING,), (), 5,
                     {"phase": "Restarting", "create": False, "delete": None, "requeue": 5},
                     id="backoff-first"),
        pytest.param(RESTARTING, (), (), 20,
                     {"phase": "Pending", "create": True, "restarts": 1},
                     id="old-attempt-gone-starts-the-next"),
        pytest.param(status(phase="Suspended", restarts=1, start_time=ts(0)), (),
                     ("llama-r1-0-abcde",), 20,
                     {"phase": "Pending", "create": False, "requeue": 5,
                      "message": "pod llama-r1-0-abcde"},
                     id="resume-waits-for-workers-a-background-delete-left"),
        pytest.param(status(), (), (), 0, {"phase": "Pending", "create": True},
                     id="first-attempt-has-nothing-to-wait-for"),
    ],
)  # fmt: skip
def test_next_attempt_waits_until_the_earlier_one_is_gone(
    st: TrainingJobStatus,
    earlier_jobs: tuple[D.JobObservation, ...],
    earlier_pods: tuple[str, ...],
    now: float,
    want: dict[str, Any],
) -> None:
    """A failed attempt's survivors get SIGTERM and a grace period to write a last checkpoint
    to the directory the next attempt resumes from: it is created only once no Job and no
    running worker of an earlier attempt is left (`previous_attempt_gone`)."""
    inputs = D.TrainingInputs(
        spec(), st, None, None, at(now), generation=1,
        earlier_jobs=earlier_jobs, earlier_pods=earlier_pods,
    )  # fmt: skip
    assert inputs.previous_attempt_gone is (not earlier_jobs and not earlier_pods)
    check(D.decide_training(inputs), want)


def test_a_restart_waits_for_the_failed_attempts_workers_to_stop() -> None:
    """The sequence the review reproduced: FailureTarget with a worker still active, the Job
    deleted, the backoff over while that worker is in its 120 s grace period."""
    s = spec()
    target = job(active=1, ready=1, failed=1, failed_condition=True,
                 failure_reason="BackoffLimitExceeded")  # fmt: skip
    d = D.decide_training(D.TrainingInputs(s, status(phase="Running", start_time=ts(0)),
                                           target, OOM, at(0)))  # fmt: skip
    assert (d.status.phase, d.delete_job, d.status.restarts) == ("Restarting", "llama-r0", 1)
    st = d.status
    for now in (10, 60, 125):  # backoff over; llama-r0 still being deleted
        d = D.decide_training(D.TrainingInputs(
            s, st, None, None, at(now), earlier_jobs=(job(name="llama-r0", deleting=True),)
        ))  # fmt: skip
        assert not d.create_job and d.requeue_after == D.WAIT_SECONDS, now
        st = d.status
    d = D.decide_training(D.TrainingInputs(s, st, None, None, at(130)))
    assert d.create_job and d.status.restarts == 1 and d.status.phase == "Pending"


# --- the TTL after a start-over (review #4a) -------------------------------------------------


INVALID = [{"type": "Failed", "status": "True", "reason": "InvalidSpec", "observedGeneration": 1}]


@pytest.mark.parametrize(
    ("st", "j", "now", "generation", "want"),
    [
        pytest.param(status(phase="Failed", completion_time=ts(0), cleaned_up=True,
                            conditions=INVALID),
                     None, 100, 2,
                     {"phase": "Pending", "create": True, "cleaned": None, "completion": None,
                      "cond": ("Failed", "False", "SpecFixed")},
                     id="a-start-over-forgets-the-earlier-clean-up"),
        pytest.param(status(phase="Failed", completion_time=ts(0), cleaned_up=True,
                            conditions=INVALID),
                     None, 100, 1, {"phase": "Failed", "create": False, "cleaned": True},
                     id="same-generation-stays-failed"),
        pytest.param(status(phase="Failed", conditions=INVALID), None, 100, 1,
                     {"phase": "Failed", "cleanup": False, "requeue": None},
                     id="no-completion-time-no-clean-up"),
        pytest.param(status(phase="Failed", completion_time=ts(0), conditions=INVALID), None,
                     60, 1, {"phase": "Failed", "cleanup": True, "cleaned": True},
                     id="a-refused-job-with-its-completion-time-is-cleaned-up"),
    ],
)  # fmt: skip
def test_ttl_around_an_invalid_spec(
    st: TrainingJobStatus, j: D.JobObservation | None, now: float, generation: int,
    want: dict[str, Any],
) -> None:
    d = D.decide_training(D.TrainingInputs(spec(ttlSecondsAfterFinished=60), st, j, None,
                                           at(now), generation))  # fmt: skip
    check(d, want)


def test_a_start_over_gets_its_own_ttl_clean_up() -> None:
    """InvalidSpec, cleaned up by its TTL, then fixed: the rerun that succeeds is cleaned up
    ttlSecondsAfterFinished after it (cleanedUp from the first failure used to stop it)."""
    s = spec(ttlSecondsAfterFinished=60)
    st = status()

    def step(j: D.JobObservation | None, now: float, gen: int, *problems: str) -> Any:
        nonlocal st
        d = D.decide_training(D.TrainingInputs(s, st, j, None, at(now), gen, problems))
        st = d.status
        return d

    step(None, 0, 1, "spec.command: bad")
    assert step(None, 100, 1, "spec.command: bad").cleanup
    assert step(None, 200, 2).create_job
    step(job(active=2, ready=2, completions=2), 210, 2)
    done = job(complete=True, succeeded=2, completions=2, completion_time=ts(300))
    assert step(done, 300, 2).status.phase == "Succeeded"
    assert not step(done, 359, 2).cleanup
    assert step(done, 360, 2).cleanup and st.cleaned_up is True


# --- right-sizing answers an OOM kill only after it was recorded (review #5) -------------------


def restarting_after_oom(pass_at: float | None = None, **failure: Any) -> TrainingJobStatus:
    """Attempt 0 was OOM-killed at 10 s (the kubelet's time); a right-sizing pass ran at
    `pass_at`, if given; the backoff ends at 40 s."""
    return status(
        phase="Restarting", restarts=1, next_restart_time=ts(40), start_time=ts(0),
        last_failure={"reason": "OOMKilled", "time": ts(10), **failure},
        **({} if pass_at is None else {"recommendations": {"updatedAt": ts(pass_at)}}),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("st", "now", "want"),
    [
        pytest.param(restarting_after_oom(recordedAt=ts(40)), 41,
                     {"phase": "Restarting", "create": False, "requeue": 5},
                     id="no-pass-yet-waits"),
        pytest.param(restarting_after_oom(30, recordedAt=ts(40)), 41,
                     {"phase": "Restarting", "create": False, "requeue": 5,
                      "message": "waiting for right-sizing to answer the OOM kill"},
                     id="a-pass-between-the-kill-and-the-record-does-not-answer"),
        pytest.param(restarting_after_oom(40, recordedAt=ts(40)), 41, {"create": False},
                     id="a-pass-in-the-second-of-the-record-does-not-answer"),
        pytest.param(restarting_after_oom(45, recordedAt=ts(40)), 46,
                     {"phase": "Pending", "create": True}, id="a-pass-after-the-record-answers"),
        pytest.param(restarting_after_oom(recordedAt=ts(40)), 159, {"create": False},
                     id="waits-up-to-120s-from-the-record"),
        pytest.param(restarting_after_oom(recordedAt=ts(40)), 160, {"create": True},
                     id="then-goes-on-without-the-pass"),
        pytest.param(restarting_after_oom(30), 41, {"create": True},
                     id="a-record-without-recordedAt-uses-the-kill-time"),
    ],
)  # fmt: skip
def test_oom_is_answered_only_by_a_pass_after_the_record(
    st: TrainingJobStatus, now: float, want: dict[str, Any]
) -> None:
    d = D.decide_training(
        D.TrainingInputs(spec(rightsizing={"mode": "Auto"}), st, None, None, at(now), 1)
    )
    check(d, want)


def test_a_failure_is_stamped_when_trimtab_records_it() -> None:
    killed = OOM.model_copy(update={"time": ts(10)})
    d = D.decide_training(D.TrainingInputs(
        spec(), status(phase="Running", start_time=ts(0)), job(**FAILED), killed, at(40)
    ))  # fmt: skip
    check(d, {"phase": "Restarting", "recorded": ts(40)})
    assert d.status.last_failure is not None and d.status.last_failure.time == ts(10)
    assert D.oom_unanswered(d.status)


# --- status counts the running Job's workers, not an edited spec.workers (review #6) ------------


@pytest.mark.parametrize(
    ("workers", "st", "j", "want"),
    [
        pytest.param(4, status(phase="Running", start_time=ts(0)),
                     job(active=2, ready=2, completions=2),
                     {"phase": "Running", "message": "2/2 workers running", "workers": 2,
                      "cond": ("Running", "True", "AllWorkersRunning")},
                     id="raised-mid-attempt-still-running"),
        pytest.param(1, status(phase="Starting", start_time=ts(0)),
                     job(active=2, ready=1, completions=2),
                     {"phase": "Starting", "message": "1/2 workers running", "workers": 2},
                     id="cut-mid-attempt-still-starting"),
        pytest.param(4, status(phase="Running", start_time=ts(0)),
                     job(complete=True, succeeded=2, completions=2),
                     {"phase": "Succeeded", "message": "all 2 workers completed", "workers": 2},
                     id="success-counts-the-attempts-workers"),
        pytest.param(4, status(phase="Succeeded", completion_time=ts(0), workers=2), None,
                     {"phase": "Succeeded", "workers": 2},
                     id="a-finished-job-keeps-its-count"),
        pytest.param(4, status(phase="Restarting", restarts=1, next_restart_time=ts(100),
                               start_time=ts(0)), None,
                     {"phase": "Restarting", "workers": 4},
                     id="the-next-attempt-gets-the-new-count"),
        pytest.param(4, status(phase="Running", start_time=ts(0)), job(active=4, ready=4),
                     {"phase": "Running", "workers": 4},
                     id="a-job-without-completions-uses-the-spec"),
    ],
)  # fmt: skip
def test_workers_edited_mid_attempt(
    workers: int, st: TrainingJobStatus, j: D.JobObservation | None, want: dict[str, Any]
) -> None:
    check(D.decide_training(D.TrainingInputs(spec(workers=workers), st, j, None, at(50), 2)),
          want)  # fmt: skip


def test_job_observation_reads_completions() -> None:
    """The count the Job was built with, which the handler passes on (a Job as trimtab builds
    it)."""
    from trimtab.builders.common import Owner
    from trimtab.builders.training import build_job

    owner = Owner("trimtab.io/v1alpha1", "TrainingJob", "llama", "ml", "u")
    manifest = build_job(owner, spec(workers=2), 0)
    assert D.JobObservation.from_manifest(manifest).completions == 2
    assert D.JobObservation.from_manifest({"metadata": {"name": "j"}}).completions is None


# --- suspend with a failed attempt or a pending restart; the deadline while suspended (#7, #8) --


@pytest.mark.parametrize(
    ("s", "st", "j", "failure", "now", "want"),
    [
        pytest.param(spec(suspend=True), status(phase="Running", start_time=ts(0)),
                     job(**FAILED), OOM, 100,
                     {"phase": "Suspended", "restarts": 1, "delete": "llama-r0", "next": ts(110),
                      "failure": (1, 137, "OOMKilled", 0),
                      "cond": ("Restarting", "True", "WorkerFailed"),
                      "cond2": ("Suspended", "True", "SuspendedBySpec"),
                      "message": "attempt 1 follows a resume, not before 2025-06-01T12:01:50Z"},
                     id="a-failed-attempt-seen-with-suspend-is-counted"),
        pytest.param(spec(suspend=True, failurePolicy={"maxRestarts": 0}),
                     status(phase="Running", start_time=ts(0)), job(**FAILED), OOM, 100,
                     {"phase": "Failed", "restarts": 0, "create": False,
                      "cond": ("Failed", "True", "RestartsExhausted")},
                     id="a-failed-attempt-with-no-restart-left-fails-though-suspended"),
        pytest.param(spec(suspend=True), status(phase="Running", start_time=ts(0)),
                     job(deleting=True, **FAILED), None, 100,
                     {"phase": "Suspended", "restarts": 0, "delete": None},
                     id="a-job-already-being-deleted-is-not-counted"),
        pytest.param(spec(suspend=True),
                     status(phase="Restarting", restarts=1, next_restart_time=ts(600),
                            start_time=ts(0)),
                     None, None, 0, {"phase": "Suspended", "next": ts(600)},
                     id="suspend-keeps-a-pending-backoff"),
        pytest.param(spec(),
                     status(phase="Suspended", restarts=1, next_restart_time=ts(600),
                            start_time=ts(0)),
                     None, None, 1,
                     {"phase": "Restarting", "create": False, "requeue": 599,
                      "cond": ("Suspended", "False", "Resumed")},
                     id="resume-waits-out-the-backoff"),
        pytest.param(spec(),
                     status(phase="Restarting", restarts=1, next_restart_time=ts(600),
                            start_time=ts(0)),
                     None, None, 300, {"phase": "Restarting", "create": False, "requeue": 300},
                     id="and-keeps-waiting-after-it"),
        pytest.param(spec(),
                     status(phase="Suspended", restarts=1, next_restart_time=ts(600),
                            start_time=ts(0)),
                     None, None, 700, {"phase": "Pending", "create": True, "restarts": 1},
                     id="resume-after-the-backoff-starts-the-next-attempt"),
        pytest.param(spec(suspend=True, activeDeadlineSeconds=3600),
                     status(phase="Suspended", start_time=ts(0)), None, None, 600,
                     {"phase": "Suspended", "requeue": 3000},
                     id="suspended-looks-again-at-the-deadline"),
        pytest.param(spec(suspend=True), status(phase="Suspended", start_time=ts(0)),
                     None, None, 600, {"phase": "Suspended", "requeue": None},
                     id="suspended-without-deadline-waits-for-a-change"),
        pytest.param(spec(suspend=True, activeDeadlineSeconds=3600, ttlSecondsAfterFinished=60),
                     status(phase="Suspended", start_time=ts(0),
                            conditions=[{"type": "Suspended", "status": "True"}]),
                     None, None, 3600,
                     {"phase": "Failed", "cond": ("Failed", "True", "DeadlineExceeded"),
                      "cond2": ("Suspended", "False", "DeadlineExceeded"),
                      "completion": ts(3600), "requeue": None},
                     id="the-deadline-fails-a-suspended-job"),
        pytest.param(spec(suspend=True, activeDeadlineSeconds=3600),
                     status(phase="Running", start_time=ts(0)), job(active=2, ready=2), None,
                     3700,
                     {"phase": "Failed", "delete": "llama-r0",
                      "cond": ("Failed", "True", "DeadlineExceeded")},
                     id="a-suspend-after-the-deadline-fails-and-stops-the-job"),
        pytest.param(spec(suspend=True, activeDeadlineSeconds=3600),
                     status(phase="Suspended", start_time=ts(0)), job(deleting=True), None,
                     3700, {"phase": "Failed", "delete": None},
                     id="a-job-already-being-deleted-is-not-deleted-again"),
    ],
)  # fmt: skip
def test_suspend_counts_failures_keeps_the_backoff_and_the_deadline(
    s: TrainingJobSpec,
    st: TrainingJobStatus,
    j: D.JobObservation | None,
    failure: WorkerFailure | None,
    now: float,
    want: dict[str, Any],
) -> None:
    check(D.decide_training(D.TrainingInputs(s, st, j, failure, at(now), generation=1)), want)


def test_suspend_and_resume_cannot_run_past_max_restarts() -> None:
    """A GitOps tool toggling suspend: each failed attempt still counts, so maxRestarts 1
    ends the job at the second failure, as it would without the suspensions."""
    on, off = spec(suspend=True, failurePolicy={"maxRestarts": 1}), spec(
        failurePolicy={"maxRestarts": 1, "backoffSeconds": 0, "maxBackoffSeconds": 0}
    )
    st = status(phase="Running", start_time=ts(0))
    d = D.decide_training(D.TrainingInputs(on, st, job(**FAILED), OOM, at(10)))
    assert (d.status.phase, d.status.restarts) == ("Suspended", 1)
    d = D.decide_training(D.TrainingInputs(off, d.status, None, None, at(1000)))
    assert d.create_job and d.status.restarts == 1
    d = D.decide_training(D.TrainingInputs(on, d.status, job(name="llama-r1", **FAILED), OOM,
                                           at(1010)))  # fmt: skip
    assert d.status.phase == "Failed" and d.status.restarts == 1
