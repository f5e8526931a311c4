"""The real kopf operator against the API server emulator for TrainingJob: create -> Job and
Service with the torchrun env; a failed Job -> a new Job with the restart count incremented;
restarts exhausted -> Failed; Kueue suspend -> Queued, admission -> Running; suspend and resume;
TTL clean-up that leaves what trimtab does not own."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from prometheus_client import REGISTRY

import trimtab.handlers.trainingjob  # noqa: F401  # registers the TrainingJob handlers with kopf
from tests.conftest import Cluster, wait_for
from tests.kube_emulator import ApiServerEmulator
from trimtab import constants as C

NS = "ml"
TJ_PATH = f"/apis/{C.GROUP}/{C.VERSION}/namespaces/{NS}/{C.TRAININGJOB_PLURAL}"
JOB_PATH = f"/apis/batch/v1/namespaces/{NS}/jobs"
SVC_PATH = f"/api/v1/namespaces/{NS}/services"
POD_PATH = f"/api/v1/namespaces/{NS}/pods"
PVC_PATH = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"

TJ: dict[str, Any] = {
    "apiVersion": C.API_VERSION,
    "kind": C.TRAININGJOB_KIND,
    "metadata": {"name": "llama", "namespace": NS},
    "spec": {
        "image": "ghcr.io/acme/train:1",
        "command": ["train.py"],
        "workers": 2,
        "gpusPerWorker": 8,
        "volumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "llama-ckpt"}}],
        "volumeMounts": [{"name": "ckpt", "mountPath": "/ckpt"}],
        "checkpoint": {"directory": "/ckpt/run1"},
        # The backoff is the window in which the test sees phase Restarting: wide enough for a
        # poll on a loaded machine, short enough for a quick test.
        "failurePolicy": {"maxRestarts": 1, "backoffSeconds": 4, "maxBackoffSeconds": 4},
    },
}


def trainingjob(**spec: Any) -> dict[str, Any]:
    body = copy.deepcopy(TJ)
    body["spec"].update(spec)
    return body


async def status_of(cluster: Cluster, name: str = "llama") -> dict[str, Any]:
    body = await cluster.get(f"{TJ_PATH}/{name}") or {}
    return dict(body.get("status") or {})


def gauge(metric: str, **labels: str) -> float | None:
    """An operator metric of the TrainingJob `llama`, as it exports it."""
    return REGISTRY.get_sample_value(metric, {"namespace": NS, "name": "llama", **labels})


def phase_is(cluster: Cluster, phase: str, **fields: Any) -> Any:
    async def probe() -> dict[str, Any] | None:
        status = await status_of(cluster)
        if status.get("phase") != phase:
            return None
        return status if all(status.get(k) == v for k, v in fields.items()) else None

    return probe


async def set_job_status(cluster: Cluster, name: str, status: dict[str, Any]) -> None:
    """Play the Job controller."""
    await cluster.merge(f"{JOB_PATH}/{name}/status", {"status": status})


async def fail_worker(cluster: Cluster, job: str, index: int, code: int, reason: str) -> None:
    """Play the kubelet and the Job controller: worker `index` exits with `code`, the Job fails."""
    pod = f"{job}-{index}-abcde"
    await cluster.create(
        POD_PATH,
        {
            "metadata": {
                "name": pod,
                "labels": {"batch.kubernetes.io/job-name": job},
                "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
            },
            "spec": {"containers": [{"name": "trainer", "image": "x"}]},
        },
    )
    await cluster.merge(
        f"{POD_PATH}/{pod}/status",
        {
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "state": {
                            "terminated": {
                                "exitCode": code,
                                "reason": reason,
                                "finishedAt": "2025-06-01T12:00:00Z",
                            }
                        },
                    }
                ],
            }
        },
    )
    await set_job_status(
        cluster,
        job,
        {
            "failed": 1,
            "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"},
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"},
            ],
        },
    )


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


async def test_create_builds_job_and_service_then_runs(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    async with run_operator():
        created = await cluster.create(TJ_PATH, trainingjob())
        uid = created["metadata"]["uid"]
        job = await wait_for(lambda: cluster.get(f"{JOB_PATH}/llama-r0"))
        assert job["metadata"]["ownerReferences"][0]["uid"] == uid
        assert job["spec"]["completionMode"] == "Indexed"
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
        assert job["spec"]["backoffLimit"] == 0
        assert job["spec"]["suspend"] is False
        env = env_of(job)
        assert env["MASTER_ADDR"] == "llama-r0-0.llama"
        assert env["MASTER_PORT"] == "29500"
        assert env["WORLD_SIZE"] == "16"
        assert env["NPROC_PER_NODE"] == "8"
        assert env["TRIMTAB_CHECKPOINT_DIR"] == "/ckpt/run1"
        assert "job-completion-index" in env["NODE_RANK"]["fieldRef"]["fieldPath"]

        service = await wait_for(lambda: cluster.get(f"{SVC_PATH}/llama"))
        assert service["spec"]["clusterIP"] == "None"
        assert service["metadata"]["ownerReferences"][0]["uid"] == uid

        # The Job exists and no worker runs yet.
        await wait_for(phase_is(cluster, "Starting", restarts=0, workers=2, workersReady=0))
        await set_job_status(cluster, "llama-r0", {"active": 2, "ready": 1,
                                                   "startTime": "2025-06-01T12:00:00Z"})
        await wait_for(phase_is(cluster, "Starting", workersReady=1))
        await set_job_status(cluster, "llama-r0", {"active": 2, "ready": 2})
        status = await wait_for(phase_is(cluster, "Running", workersReady=2))
        assert status["startTime"]  # first seen admitted, before the Job controller said so
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Running"]["status"] == "True"
        assert status["observedGeneration"] == 1


async def test_failed_job_restarts_then_exhausts(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    async with run_operator():
        await cluster.create(TJ_PATH, trainingjob())
        await wait_for(lambda: cluster.get(f"{JOB_PATH}/llama-r0"))
        await set_job_status(cluster, "llama-r0", {"active": 2, "ready": 2})
        await wait_for(phase_is(cluster, "Running"))

        await fail_worker(cluster, "llama-r0", index=1, code=137, reason="OOMKilled")
        status = await wait_for(phase_is(cluster, "Restarting", restarts=1))
        assert status["lastFailure"]["worker"] == 1
        assert status["lastFailure"]["exitCode"] == 137
        assert status["lastFailure"]["reason"] == "OOMKilled"
        assert "restart 1 of 1 from /ckpt/run1" in status["message"]

        # The failed attempt's Job goes; after the backoff the next attempt is a new Job.
        async def replaced() -> dict[str, Any] | None:
            old = await cluster.get(f"{JOB_PATH}/llama-r0")
            new = await cluster.get(f"{JOB_PATH}/llama-r1")
            return new if old is None and new is not None else None

        new = await wait_for(replaced)
        assert env_of(new)["TRIMTAB_RESTART_COUNT"] == "1"
        assert env_of(new)["MASTER_ADDR"] == "llama-r1-0.llama"
        assert new["metadata"]["labels"]["trimtab.io/restart"] == "1"

        await set_job_status(cluster, "llama-r1", {"active": 2, "ready": 2})
        status = await wait_for(phase_is(cluster, "Running", restarts=1))
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Restarting"]["status"] == "False"
        # The metrics the chart's training alerts read.
        assert gauge("trimtab_trainingjob_restarts") == 1
        assert gauge("trimtab_trainingjob_status_phase", phase="Running") == 1
        assert gauge("trimtab_trainingjob_status_phase", phase="Failed") == 0

        await fail_worker(cluster, "llama-r1", index=0, code=1, reason="Error")
        status = await wait_for(phase_is(cluster, "Failed"))
        assert status["restarts"] == 1
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Failed"]["reason"] == "RestartsExhausted"
        assert "worker 0 exited with code 1" in conditions["Failed"]["message"]
        assert "gave up after 1 restarts" in status["message"]
        # The failed Job stays for its logs; no third attempt.
        assert await cluster.get(f"{JOB_PATH}/llama-r1") is not None
        assert await cluster.get(f"{JOB_PATH}/llama-r2") is None
        assert gauge("trimtab_trainingjob_status_phase", phase="Failed") == 1
        assert gauge("trimtab_trainingjob_status_phase", phase="Running") == 0

        # Deleted: its series go with it.
        await cluster.kube.request("DELETE", f"{TJ_PATH}/llama")

        async def forgotten() -> bool:
            return gauge("trimtab_trainingjob_status_phase", phase="Failed") is None

        await wait_for(forgotten)
        assert gauge("trimtab_trainingjob_restarts") is None


async def test_kueue_suspend_is_queued_and_admission_runs(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    async with run_operator():
        await cluster.create(TJ_PATH, trainingjob(scheduling={"queueName": "team-a"}))
        job = await wait_for(lambda: cluster.get(f"{JOB_PATH}/llama-r0"))
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        status = await wait_for(phase_is(cluster, "Queued"))
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Queued"]["reason"] == "WaitingForAdmission"

        # Kueue admits the workload by unsuspending the Job; the Job controller starts pods.
        await cluster.merge(f"{JOB_PATH}/llama-r0", {"spec": {"suspend": False}})
        await set_job_status(cluster, "llama-r0", {"active": 2, "ready": 2})
        status = await wait_for(phase_is(cluster, "Running", workersReady=2))
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Queued"]["status"] == "False"
        assert conditions["Queued"]["reason"] == "Admitted"


async def test_suspend_deletes_the_job_and_resume_recreates_it(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    async with run_operator():
        await cluster.create(TJ_PATH, trainingjob())
        await wait_for(lambda: cluster.get(f"{JOB_PATH}/llama-r0"))
        await cluster.merge(f"{TJ_PATH}/llama", {"spec": {"suspend": True}})
        await wait_for(phase_is(cluster, "Suspended"))

        async def gone() -> bool:
            return await cluster.get(f"{JOB_PATH}/llama-r0") is None

        await wait_for(gone)
        assert await cluster.get(f"{SVC_PATH}/llama") is not None
        await cluster.merge(f"{TJ_PATH}/llama", {"spec": {"suspend": False}})
        await wait_for(lambda: cluster.get(f"{JOB_PATH}/llama-r0"))
        status = await wait_for(phase_is(cluster, "Starting", restarts=0))
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Suspended"]["status"] == "False"


async def test_ttl_cleans_up_only_what_it_owns(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    async with run_operator():
        await cluster.create(
            PVC_PATH,
            {
                "metadata": {"name": "llama-ckpt", "labels": {C.LABEL_OWNER: "llama"}},
                "spec": {"accessModes": ["ReadWriteMany"],
                         "resources": {"requests": {"storage": "1Ti"}}},
            },
        )
        # Same labels, not owned: a user's Service that happens to match the selector.
        await cluster.create(
            SVC_PATH,
            {
                "metadata": {
                    "name": "llama-tensorboard",
                    "labels": {C.LABEL_MANAGED_BY: C.MANAGED_BY, C.LABEL_OWNER: "llama"},
                },
                "spec": {"ports": [{"port": 6006}]},
            },
        )
        await cluster.create(TJ_PATH, trainingjob(ttlSecondsAfterFinished=1))
        await wait_for(lambda: cluster.get(f"{JOB_PATH}/llama-r0"))
        await wait_for(lambda: cluster.get(f"{SVC_PATH}/llama"))
        await set_job_status(
            cluster,
            "llama-r0",
            {
                "succeeded": 2,
                "completionTime": "2025-06-01T13:00:00Z",
                "conditions": [{"type": "Complete", "status": "True"}],
            },
        )
        status = await wait_for(phase_is(cluster, "Succeeded"))
        assert status["completionTime"] == "2025-06-01T13:00:00Z"

        # The completion time above is long past, so the TTL is due on the next step.
        status = await wait_for(phase_is(cluster, "Succeeded", cleanedUp=True))

        async def cleaned() -> bool:
            return (
                await cluster.get(f"{JOB_PATH}/llama-r0") is None
                and await cluster.get(f"{SVC_PATH}/llama") is None
            )

        await wait_for(cleaned)
        assert await cluster.get(f"{PVC_PATH}/llama-ckpt") is not None
        assert await cluster.get(f"{SVC_PATH}/llama-tensorboard") is not None
        assert await cluster.get(f"{TJ_PATH}/llama") is not None


async def test_gang_podgroup_per_attempt(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    pg_path = f"/apis/scheduling.x-k8s.io/v1alpha1/namespaces/{NS}/podgroups"
    async with run_operator():
        created = await cluster.create(
            TJ_PATH, trainingjob(scheduling={"gang": {"enabled": True}})
        )
        pg = await wait_for(lambda: cluster.get(f"{pg_path}/llama-r0"))
        assert pg["spec"]["minMember"] == 2
        job = await wait_for(lambda: cluster.get(f"{JOB_PATH}/llama-r0"))
        service = await wait_for(lambda: cluster.get(f"{SVC_PATH}/llama"))

        # `trimtab render` prints what the operator creates: the same objects, field for field
        # (less what the API server stamps and the applied-hash annotation).
        from trimtab.render import render

        def essence(obj: dict[str, Any]) -> tuple[Any, ...]:
            meta = obj["metadata"]
            return (obj["kind"], meta["name"], meta.get("labels"), meta["ownerReferences"],
                    obj["spec"])  # fmt: skip

        rendered = render(created)
        assert [essence(o) for o in rendered] == [essence(o) for o in (service, pg, job)]
        pod = job["spec"]["template"]
        assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "llama-r0"
        assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"

        await fail_worker(cluster, "llama-r0", index=0, code=1, reason="Error")
        await wait_for(lambda: cluster.get(f"{pg_path}/llama-r1"))

        async def old_gone() -> bool:
            return await cluster.get(f"{pg_path}/llama-r0") is None

        await wait_for(old_gone)


async def test_a_clean_up_that_fails_is_tried_again(
    api: ApiServerEmulator, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TTL is due and the API server refuses the first delete: cleanedUp stays unset, so
    the next step deletes everything and only then says it is done (it used to be written
    before the deletes, and a failed one was never tried again)."""
    import logging

    from trimtab.handlers.trainingjob import sync_trainingjob
    from trimtab.kube.client import KubeClient, KubeError

    class RefusesOneDelete(KubeClient):
        refused = False

        async def delete(self, *args: Any, **kwargs: Any) -> bool:
            if not RefusesOneDelete.refused:
                RefusesOneDelete.refused = True
                raise KubeError(503, "ServiceUnavailable", "etcd leader changed")
            return await super().delete(*args, **kwargs)

    import kopf

    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)  # no operator runs: no poster
    kube = RefusesOneDelete(str(api.url).rstrip("/"), ssl_context=False)
    log = logging.getLogger("test")
    try:
        await cluster.create(TJ_PATH, trainingjob(ttlSecondsAfterFinished=1))
        await sync_trainingjob(kube, NS, "llama", log)  # creates the Job and the Service
        assert await cluster.get(f"{JOB_PATH}/llama-r0") is not None
        await set_job_status(cluster, "llama-r0", {
            "succeeded": 2, "completionTime": "2025-06-01T13:00:00Z",
            "conditions": [{"type": "Complete", "status": "True"}],
        })  # fmt: skip
        with pytest.raises(KubeError):  # Succeeded long ago: the TTL is due at once
            await sync_trainingjob(kube, NS, "llama", log)
        assert (await status_of(cluster))["phase"] == "Succeeded"
        assert "cleanedUp" not in await status_of(cluster)
        assert await cluster.get(f"{JOB_PATH}/llama-r0") is not None

        await sync_trainingjob(kube, NS, "llama", log)
        assert (await status_of(cluster))["cleanedUp"] is True
        assert await cluster.get(f"{JOB_PATH}/llama-r0") is None
        assert await cluster.get(f"{SVC_PATH}/llama") is None
    finally:
        await kube.close()


async def test_a_job_admitted_late_is_given_only_the_deadline_left(
    api: ApiServerEmulator, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TrainingJob first started 1000 s ago (an earlier attempt); this attempt's Job was
    created with the whole hour and admitted just now. The Job controller counts
    activeDeadlineSeconds from admission, so the Job is patched to the 2600 s left, and its
    workers stop at the deadline even if the operator is down by then."""
    import datetime
    import logging

    import kopf

    from trimtab.handlers.trainingjob import sync_trainingjob

    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)  # no operator runs: no poster
    log = logging.getLogger("test")
    await cluster.create(TJ_PATH, trainingjob(activeDeadlineSeconds=3600,
                                              scheduling={"queueName": "team-a"}))  # fmt: skip
    await sync_trainingjob(cluster.kube, NS, "llama", log)
    job = await cluster.get(f"{JOB_PATH}/llama-r0")
    assert job is not None and job["spec"]["suspend"] is True
    assert job["spec"]["activeDeadlineSeconds"] == 3600

    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    stamp = lambda t: t.isoformat().replace("+00:00", "Z")  # noqa: E731
    await cluster.merge(
        f"{TJ_PATH}/llama/status",
        {"status": {"startTime": stamp(now - datetime.timedelta(seconds=1000))}},
    )
    await cluster.merge(f"{JOB_PATH}/llama-r0", {"spec": {"suspend": False}})  # Kueue admits
    await set_job_status(cluster, "llama-r0", {"active": 2, "startTime": stamp(now)})
    await sync_trainingjob(cluster.kube, NS, "llama", log, now=now)
    job = await cluster.get(f"{JOB_PATH}/llama-r0")
    assert job is not None and job["spec"]["activeDeadlineSeconds"] == 2600
    await sync_trainingjob(cluster.kube, NS, "llama", log, now=now)  # once: nothing more
    job = await cluster.get(f"{JOB_PATH}/llama-r0")
    assert job is not None and job["spec"]["activeDeadlineSeconds"] == 2600


async def test_a_gang_without_the_podgroup_api_waits_and_says_what_is_missing(
    api: ApiServerEmulator, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the coscheduling CRD is not installed every PodGroup apply is a 404: the job used
    to sit Pending ("creating the Job") with the error only in the operator's log. It now
    waits with the reason in status, creates nothing, and goes on once the API is served."""
    import logging

    import kopf

    from trimtab.handlers.trainingjob import sync_trainingjob
    from trimtab.kube.client import KubeClient, KubeError

    served = {"podgroups": False}

    class Cluster404(KubeClient):
        async def request(self, method: str, path: str, **kwargs: Any) -> Any:
            if "scheduling.x-k8s.io" in path and not served["podgroups"]:
                raise KubeError(404, "NotFound", "the server could not find the requested resource")
            return await super().request(method, path, **kwargs)

    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)  # no operator runs: no poster
    kube = Cluster404(str(api.url).rstrip("/"), ssl_context=False)
    log = logging.getLogger("test")
    pg_path = f"/apis/scheduling.x-k8s.io/v1alpha1/namespaces/{NS}/podgroups"
    try:
        await cluster.create(TJ_PATH, trainingjob(scheduling={"gang": {"enabled": True}}))
        await sync_trainingjob(kube, NS, "llama", log)
        status = await status_of(cluster)
        assert status["phase"] == "Pending"
        assert status["message"].startswith(
            "waiting: scheduling.gang needs the PodGroup API (scheduling.x-k8s.io/v1alpha1)"
        )
        assert await cluster.get(f"{JOB_PATH}/llama-r0") is None

        served["podgroups"] = True
        await sync_trainingjob(kube, NS, "llama", log)
        assert await cluster.get(f"{JOB_PATH}/llama-r0") is not None
        assert await cluster.get(f"{pg_path}/llama-r0") is not None
    finally:
        await kube.close()


async def test_clean_up_takes_the_podgroups_of_a_gang_since_turned_off(
    api: ApiServerEmulator, cluster: Cluster
) -> None:
    """An attempt ran as a gang, then scheduling.gang was turned off: the TTL clean-up still
    deletes that attempt's PodGroup (it looked for PodGroups only while gang was on)."""
    import logging

    from trimtab.api.trainingjob import TrainingJobSpec
    from trimtab.builders.common import Owner
    from trimtab.builders.training import build_podgroup
    from trimtab.handlers.trainingjob import cleanup

    created = await cluster.create(TJ_PATH, trainingjob())
    owner = Owner(C.API_VERSION, C.TRAININGJOB_KIND, "llama", NS, created["metadata"]["uid"])
    with_gang = trainingjob(scheduling={"gang": {"enabled": True}})
    gang = TrainingJobSpec.model_validate(with_gang["spec"])
    await cluster.kube.create(build_podgroup(owner, gang, 0))
    now_off = TrainingJobSpec.model_validate(trainingjob()["spec"])
    deleted = await cleanup(cluster.kube, owner, now_off, logging.getLogger("t"))
    assert "PodGroup/llama-r0" in deleted


@pytest.mark.parametrize(
    "left",
    [
        pytest.param("job", id="old-job-kept-until-its-pods-are-gone"),
        pytest.param("pod", id="old-worker-still-stopping"),
    ],
)
async def test_the_next_attempt_waits_until_the_failed_one_is_gone(
    api: ApiServerEmulator, cluster: Cluster, monkeypatch: pytest.MonkeyPatch, left: str
) -> None:
    """Attempt 0 fails; a worker is still in its grace period, writing a last checkpoint. A
    Foreground delete keeps `llama-r0` until its pods are gone (played by a finalizer here), or
    the worker pod outlives its Job: either way `llama-r1`, which resumes from that checkpoint,
    is created only once it is gone, and status says what it waits for."""
    import datetime
    import logging

    import kopf

    from trimtab.builders.training import COMPONENT, LABEL_RESTART
    from trimtab.handlers.trainingjob import sync_trainingjob

    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)  # no operator runs: no poster
    log = logging.getLogger("test")
    t0 = datetime.datetime.now(datetime.UTC).replace(microsecond=0)

    def at(seconds: float) -> datetime.datetime:
        return t0 + datetime.timedelta(seconds=seconds)

    await cluster.create(TJ_PATH, trainingjob())
    await sync_trainingjob(cluster.kube, NS, "llama", log, now=at(0))
    stopping = "llama-r0-1-abcde"
    if left == "job":
        await cluster.merge(f"{JOB_PATH}/llama-r0", {"metadata": {"finalizers": ["test/hold"]}})
    else:
        labels = {C.LABEL_MANAGED_BY: C.MANAGED_BY, C.LABEL_OWNER: "llama",
                  C.LABEL_COMPONENT: COMPONENT, LABEL_RESTART: "0"}  # fmt: skip
        await cluster.create(POD_PATH, {"metadata": {"name": stopping, "labels": labels},
                                        "spec": {"containers": [{"name": "trainer",
                                                                 "image": "x"}]}})  # fmt: skip
        await cluster.merge(f"{POD_PATH}/{stopping}/status", {"status": {"phase": "Running"}})
    await fail_worker(cluster, "llama-r0", index=0, code=1, reason="Error")
    await sync_trainingjob(cluster.kube, NS, "llama", log, now=at(1))
    status = await status_of(cluster)
    assert (status["phase"], status["restarts"]) == ("Restarting", 1)

    # The 4 s backoff is long over, and attempt 0 is not gone yet.
    for seconds in (10, 60):
        assert await sync_trainingjob(cluster.kube, NS, "llama", log, now=at(seconds)) == 5.0
        assert await cluster.get(f"{JOB_PATH}/llama-r1") is None
        status = await status_of(cluster)
        assert status["phase"] == "Restarting"
        what = "Job llama-r0" if left == "job" else f"pod {stopping}"
        assert status["message"] == (
            "waiting for the earlier attempt to stop before attempt 1 starts (its workers may "
            f"still be writing the checkpoint): {what} not gone yet"
        )

    if left == "job":
        await cluster.merge(f"{JOB_PATH}/llama-r0", {"metadata": {"finalizers": None}})
        assert await cluster.get(f"{JOB_PATH}/llama-r0") is None
    else:
        await cluster.merge(f"{POD_PATH}/{stopping}/status", {"status": {"phase": "Failed"}})
    await sync_trainingjob(cluster.kube, NS, "llama", log, now=at(70))
    new = await cluster.get(f"{JOB_PATH}/llama-r1")
    assert new is not None and env_of(new)["TRIMTAB_RESTART_COUNT"] == "1"
    assert (await status_of(cluster))["phase"] == "Pending"
