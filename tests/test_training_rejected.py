"""A TrainingJob whose Job the API server refuses (a value the CRD schema let through, such as a
node selector value that is no label value) fails with InvalidSpec and the server's message,
rather than retrying every 10 s with nothing in status; a fixed spec starts it again. The
emulator does not validate, so a client wrapper plays the API server's 422 for Jobs."""

from __future__ import annotations

import datetime
import logging
from typing import Any

import kopf
import pytest

from tests.conftest import Cluster
from tests.kube_emulator import ApiServerEmulator
from tests.test_name_claims import JOB_PATH, NS, TJ_PATH, training_llama
from trimtab import constants as C
from trimtab.handlers.trainingjob import sync_trainingjob
from trimtab.kube.client import KubeClient, KubeError

INVALID = (
    'Job.batch "llama-r0" is invalid: spec.template.spec.nodeSelector: Invalid value: '
    '"a b": a valid label must be an empty string or consist of alphanumeric characters'
)


class RefusingJobs(KubeClient):
    """The emulator's client, but a Job is refused as an API server refuses an invalid one."""

    def __init__(self, inner: KubeClient, status: int = 422) -> None:
        super().__init__(inner.host, ssl_context=False, keepalive=False)
        self.status = status
        self.refused = 0

    async def create(self, manifest: dict[str, Any]) -> Any:
        if manifest.get("kind") == "Job":
            self.refused += 1
            raise KubeError(self.status, "Invalid", INVALID)
        return await super().create(manifest)


@pytest.mark.parametrize(
    ("status", "fails"),
    [
        pytest.param(422, True, id="invalid-fails-with-the-servers-message"),
        pytest.param(400, True, id="bad-request-fails-too"),
        pytest.param(500, False, id="server-error-is-retried"),
    ],
)
async def test_a_job_the_api_server_refuses_fails_the_trainingjob(
    api: ApiServerEmulator,
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    fails: bool,
) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)
    monkeypatch.setattr(kopf, "warn", lambda *_, message, **__: warnings.append(message))
    await cluster.create(TJ_PATH, training_llama())
    kube = RefusingJobs(cluster.kube, status)
    try:
        if fails:
            assert await sync_trainingjob(kube, NS, "llama", logging.getLogger("t")) == float("inf")
        else:
            with pytest.raises(KubeError):
                await sync_trainingjob(kube, NS, "llama", logging.getLogger("t"))
    finally:
        await kube.close()
    tj = await cluster.get(f"{TJ_PATH}/llama") or {}
    assert await cluster.get(f"{JOB_PATH}/llama-r0") is None
    if not fails:
        assert tj["status"]["phase"] != "Failed"
        return
    assert tj["status"]["phase"] == "Failed"
    assert INVALID in tj["status"]["message"]
    failed = {c["type"]: c for c in tj["status"]["conditions"]}["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", "InvalidSpec")
    assert warnings and INVALID in warnings[0]
    # Until the spec changes it is not tried again (it would be refused alike).
    again = RefusingJobs(cluster.kube, status)
    try:
        await sync_trainingjob(again, NS, "llama", logging.getLogger("t"))
    finally:
        await again.close()
    assert again.refused == 0
    assert ((await cluster.get(f"{TJ_PATH}/llama")) or {})["status"]["phase"] == "Failed"

    # The spec is fixed (a new generation): the job starts over and its Job is created.
    fixed = {"scheduling": {"nodeSelector": {"pool": "a100"}}}
    await cluster.merge(f"{TJ_PATH}/llama", {"spec": fixed})  # the emulator bumps generation
    await sync_trainingjob(cluster.kube, NS, "llama", logging.getLogger("t"))
    tj = await cluster.get(f"{TJ_PATH}/llama") or {}
    assert tj["status"]["phase"] != "Failed", (tj["metadata"]["generation"], tj["status"])
    assert await cluster.get(f"{JOB_PATH}/llama-r0") is not None


SVC_PATH = f"/api/v1/namespaces/{NS}/services"


NOW = datetime.datetime(2025, 6, 1, 12, 0, tzinfo=datetime.UTC)


def at(seconds: float) -> datetime.datetime:
    return NOW + datetime.timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("ttl", "after", "cleaned"),
    [
        pytest.param(0, 0, True, id="ttl-0-at-the-next-step"),
        pytest.param(3600, 60, False, id="not-before-the-ttl"),
        pytest.param(3600, 3600, True, id="once-the-ttl-has-passed"),
    ],
)
async def test_a_refused_job_is_cleaned_up_after_its_ttl(
    api: ApiServerEmulator,
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    ttl: int,
    after: float,
    cleaned: bool,
) -> None:
    """The Service is applied before the Job the API server refuses: the Failed job's TTL
    clean-up deletes it. It never did, for want of a completionTime."""
    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)
    monkeypatch.setattr(kopf, "warn", lambda *_, **__: None)
    body = training_llama()
    body["spec"]["ttlSecondsAfterFinished"] = ttl
    await cluster.create(TJ_PATH, body)
    kube = RefusingJobs(cluster.kube)
    try:
        await sync_trainingjob(kube, NS, "llama", logging.getLogger("t"), now=at(0))
    finally:
        await kube.close()
    status = ((await cluster.get(f"{TJ_PATH}/llama")) or {})["status"]
    assert (status["phase"], status["completionTime"]) == ("Failed", "2025-06-01T12:00:00Z")
    assert await cluster.get(f"{SVC_PATH}/llama") is not None

    await sync_trainingjob(cluster.kube, NS, "llama", logging.getLogger("t"), now=at(after))
    status = ((await cluster.get(f"{TJ_PATH}/llama")) or {})["status"]
    assert (await cluster.get(f"{SVC_PATH}/llama") is None) is cleaned
    assert status.get("cleanedUp") is (True if cleaned else None)
    assert status["phase"] == "Failed"


class NoPodGroupApi(KubeClient):
    """The emulator's client, where the coscheduling CRD is not (or no longer) installed."""

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        if "scheduling.x-k8s.io" in path:
            raise KubeError(404, "NotFound", "the server could not find the requested resource")
        return await super().request(method, path, **kwargs)


@pytest.mark.parametrize(
    ("gang", "taken", "waiting"),
    [
        pytest.param(False, True, "waiting: Service llama belongs to ModelDeployment llama",
                     id="service-name-taken-since"),
        pytest.param(True, False, "waiting: scheduling.gang needs the PodGroup API",
                     id="podgroup-api-gone-since"),
    ],
)  # fmt: skip
async def test_the_step_that_starts_over_checks_names_and_the_podgroup_api(
    api: ApiServerEmulator,
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    gang: bool,
    taken: bool,
    waiting: str,
) -> None:
    """A fixed spec starts over from Failed: that very step waits Pending, saying why, when
    the Service name is another's or the PodGroup API is not served. The checks were skipped
    on it (the stored phase was still Failed), so the apply failed and the step raised."""
    from trimtab.builders.common import Owner, object_meta

    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)
    monkeypatch.setattr(kopf, "warn", lambda *_, **__: None)
    body = training_llama()
    if gang:
        body["spec"]["scheduling"] = {"gang": {"enabled": True}}
    await cluster.create(TJ_PATH, body)
    refusing = RefusingJobs(cluster.kube)
    try:
        await sync_trainingjob(refusing, NS, "llama", logging.getLogger("t"))
    finally:
        await refusing.close()
    assert ((await cluster.get(f"{TJ_PATH}/llama")) or {})["status"]["phase"] == "Failed"
    if taken:
        # A ModelDeployment `llama` took the Service name after the clean-up of the failed job.
        await cluster.kube.request("DELETE", f"{SVC_PATH}/llama")
        other = Owner(C.API_VERSION, C.MODELDEPLOYMENT_KIND, "llama", NS, "md-uid")
        await cluster.create(SVC_PATH, {"metadata": object_meta(other, "llama"),
                                        "spec": {"ports": [{"port": 80}]}})  # fmt: skip
    await cluster.merge(f"{TJ_PATH}/llama", {"spec": {"scheduling": {
        "nodeSelector": {"pool": "a100"}}}})  # fmt: skip

    kube = NoPodGroupApi(cluster.kube.host, ssl_context=False) if gang else cluster.kube
    try:
        delay = await sync_trainingjob(kube, NS, "llama", logging.getLogger("t"))
    finally:
        if gang:
            await kube.close()
    status = ((await cluster.get(f"{TJ_PATH}/llama")) or {})["status"]
    assert status["phase"] == "Pending", status
    assert status["message"].startswith(waiting), status["message"]
    assert delay == 30.0
    assert await cluster.get(f"{JOB_PATH}/llama-r0") is None
