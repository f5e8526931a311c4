"""A TrainingJob whose Job the API server refuses (a value the CRD schema let through, such as a
node selector value that is no label value) fails with InvalidSpec and the server's message,
rather than retrying every 10 s with nothing in status; a fixed spec starts it again. The
emulator does not validate, so a client wrapper plays the API server's 422 for Jobs."""

from __future__ import annotations

import logging
from typing import Any

import kopf
import pytest

from tests.conftest import Cluster
from tests.kube_emulator import ApiServerEmulator
from tests.test_name_claims import JOB_PATH, NS, TJ_PATH, training_llama
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
