"""Names two resources both want: trimtab never applies over an object another resource
controls, or one it did not make, and says so in status.

A ModelDeployment and a TrainingJob called `llama` in one namespace both want Service `llama`;
before, the second one's apply took it over (selector, ports, a second controller reference),
and the ModelDeployment's Service, which selects `trimtab.io/owner=llama`, took in the
training workers."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Cluster, wait_for, wait_for_value
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import MD_PATH, NS, SVC_PATH, model, serving_deployments
from tests.test_training_operator import trainingjob
from trimtab import constants as C
from trimtab.builders.common import Owner, claim_problem, object_meta
from trimtab.handlers import modeldeployment
from trimtab.kube.client import NameTaken
from trimtab.kube.resources import SERVICES

# The two kinds in one namespace (the ModelDeployment tests').
TJ_PATH = f"/apis/{C.GROUP}/{C.VERSION}/namespaces/{NS}/{C.TRAININGJOB_PLURAL}"
JOB_PATH = f"/apis/batch/v1/namespaces/{NS}/jobs"


def training_llama() -> dict[str, Any]:
    body = trainingjob()
    body["metadata"]["namespace"] = NS
    return body


MD = Owner(C.API_VERSION, C.MODELDEPLOYMENT_KIND, "llama", NS, "md-uid")
TJ = Owner(C.API_VERSION, C.TRAININGJOB_KIND, "llama", NS, "tj-uid")
EARLIER_MD = Owner(C.API_VERSION, C.MODELDEPLOYMENT_KIND, "llama", NS, "old-uid")


def service(meta: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {}}


def orphan(labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "llama", "namespace": NS}
    if labels is not None:
        meta["labels"] = labels
    return service(meta)


OURS = service(object_meta(MD, "llama"))
USER_ROUTE = {"kind": "HTTPRoute", "metadata": {"name": "llama", "namespace": NS}}
NOT_CONTROLLER = service(
    {"name": "llama", "ownerReferences": [{**TJ.reference(), "controller": False}]}
)


@pytest.mark.parametrize(
    ("manifest", "current", "adopt", "want"),
    [
        pytest.param(OURS, None, False, None, id="nothing-there-yet"),
        pytest.param(OURS, OURS, False, None, id="ours-by-uid"),
        pytest.param(
            OURS, service(object_meta(TJ, "llama")), False,
            "Service llama belongs to TrainingJob llama, not to this ModelDeployment",
            id="another-kind-of-the-same-name",
        ),
        pytest.param(
            OURS, service(object_meta(TJ, "llama")), True,
            "Service llama belongs to TrainingJob llama, not to this ModelDeployment",
            id="adopt-never-takes-from-another-controller",
        ),
        pytest.param(
            OURS, service(object_meta(EARLIER_MD, "llama")), False,
            "Service llama still belongs to an earlier ModelDeployment of this name that the "
            "garbage collector has not removed yet",
            id="an-earlier-resource-of-this-name",
        ),
        pytest.param(
            OURS, orphan({C.LABEL_MANAGED_BY: C.MANAGED_BY, C.LABEL_OWNER: "llama"}), False,
            None, id="orphan-made-for-this-owner-is-adopted",
        ),
        pytest.param(
            OURS, orphan({C.LABEL_MANAGED_BY: C.MANAGED_BY, C.LABEL_OWNER: "mistral"}), False,
            "Service llama exists and was not made by trimtab for this ModelDeployment",
            id="orphan-made-for-another-owner",
        ),
        pytest.param(
            OURS, orphan({C.LABEL_OWNER: "llama"}), False,
            "Service llama exists and was not made by trimtab for this ModelDeployment",
            id="orphan-with-only-the-owner-label",
        ),
        pytest.param(
            OURS, orphan(), False,
            "Service llama exists and was not made by trimtab for this ModelDeployment",
            id="the-users-own-object",
        ),
        pytest.param(OURS, orphan(), True, None, id="the-users-own-object-adopted-when-asked"),
        pytest.param(
            OURS, NOT_CONTROLLER, False,
            "Service llama exists and was not made by trimtab for this ModelDeployment",
            id="a-non-controller-reference-is-no-claim",
        ),
        pytest.param(USER_ROUTE, service(object_meta(TJ, "llama")), False, None,
                     id="a-manifest-without-controller-claims-nothing"),
    ],
)  # fmt: skip
def test_claim_problem(
    manifest: dict[str, Any], current: dict[str, Any] | None, adopt: bool, want: str | None
) -> None:
    assert claim_problem(manifest, current, adopt) == want


async def test_apply_leaves_another_owners_object_alone(
    api: ApiServerEmulator, cluster: Cluster
) -> None:
    kube = cluster.kube
    theirs = service(object_meta(TJ, "llama"))
    theirs["spec"] = {"clusterIP": "None", "selector": {C.LABEL_OWNER: "llama"}}
    await kube.create(theirs)
    writes = len(api.writes)
    mine = service(object_meta(MD, "llama"))
    mine["spec"] = {"selector": {C.LABEL_OWNER: "llama", C.LABEL_REVISION: "abc"}}
    with pytest.raises(NameTaken) as err:
        await kube.apply(mine)
    assert err.value.status == 409 and err.value.reason == "NameTaken"
    assert not err.value.conflict  # not a race that a fresh read would settle
    assert "belongs to TrainingJob llama" in err.value.message
    assert len(api.writes) == writes
    stored = await kube.get(SERVICES, NS, "llama")
    assert stored is not None
    assert stored["spec"]["selector"] == {C.LABEL_OWNER: "llama"}
    assert [r["uid"] for r in stored["metadata"]["ownerReferences"]] == ["tj-uid"]


async def _condition(cluster: Cluster, name: str, type_: str) -> dict[str, Any] | None:
    body = await cluster.get(f"{MD_PATH}/{name}") or {}
    conditions = {c["type"]: c for c in (body.get("status") or {}).get("conditions") or []}
    return conditions.get(type_)


async def _events(cluster: Cluster, name: str, reason: str) -> list[dict[str, Any]]:
    events = await cluster.get(f"/api/v1/namespaces/{NS}/events") or {}
    return [
        e
        for e in events.get("items", [])
        if e.get("reason") == reason and e.get("involvedObject", {}).get("name") == name
    ]


async def test_a_modeldeployment_waits_for_a_name_a_trainingjob_holds(
    api: ApiServerEmulator,
    cluster: Cluster,
    run_operator: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The TrainingJob came first: the ModelDeployment creates nothing, is Degraded with
    NameTaken (one Warning, however often it retries), and takes the name once it is free."""
    monkeypatch.setattr(modeldeployment, "NAME_TAKEN_RETRY_SECONDS", 1)
    async with run_operator():
        tj = await cluster.create(TJ_PATH, training_llama())
        held = await wait_for(lambda: cluster.get(f"{SVC_PATH}/llama"))
        await wait_for(lambda: cluster.get(f"{JOB_PATH}/llama-r0"))

        await cluster.create(MD_PATH, model("llama"))
        degraded = await wait_for_value(
            lambda: _condition(cluster, "llama", "Degraded"),
            lambda c: c is not None and c["reason"] == "NameTaken",
        )
        assert degraded is not None and degraded["status"] == "True"
        assert degraded["message"] == (
            "Service llama belongs to TrainingJob llama, not to this ModelDeployment"
        )
        await wait_for(lambda: _events(cluster, "llama", "NameTaken"))
        # Several retries later: still one Warning, nothing created, the Service untouched.
        await wait_for_value(lambda: _retries(cluster), lambda n: n >= 3)
        assert len(await _events(cluster, "llama", "NameTaken")) == 1
        assert await serving_deployments(cluster, "llama") == []
        now = await cluster.get(f"{SVC_PATH}/llama")
        assert now is not None and now["spec"] == held["spec"]
        assert [r["uid"] for r in now["metadata"]["ownerReferences"]] == [tj["metadata"]["uid"]]

        # The TrainingJob's clean-up (or the garbage collector) frees the name.
        await cluster.kube.request("DELETE", f"{SVC_PATH}/llama")
        assert await wait_for(lambda: serving_deployments(cluster, "llama"))
        md = await cluster.get(f"{MD_PATH}/llama")
        assert md is not None
        taken = await wait_for(lambda: cluster.get(f"{SVC_PATH}/llama"))
        assert [r["uid"] for r in taken["metadata"]["ownerReferences"]] == [md["metadata"]["uid"]]
        await wait_for_value(
            lambda: _condition(cluster, "llama", "Degraded"),
            lambda c: c is not None and c["status"] == "False",
        )


async def _retries(cluster: Cluster) -> int:
    """How many times kopf has retried the ModelDeployment's reconcile (its progress record)."""
    import json

    md = await cluster.get(f"{MD_PATH}/llama") or {}
    annotations = md.get("metadata", {}).get("annotations") or {}
    for key, value in annotations.items():
        if key.startswith(C.KOPF_ANNOTATION_PREFIX) and "reconcile_modeldeployment" in key:
            return int(json.loads(value).get("retries") or 0)
    return 0


async def test_a_trainingjob_waits_for_a_name_a_modeldeployment_holds(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    """The ModelDeployment came first: the TrainingJob stays Pending and says why, creates no
    Job (whose workers the ModelDeployment's Service would select), and leaves the Service as
    it is."""
    async with run_operator():
        md = await cluster.create(MD_PATH, model("llama"))
        await wait_for(lambda: serving_deployments(cluster, "llama"))
        held = await wait_for(lambda: cluster.get(f"{SVC_PATH}/llama"))

        await cluster.create(TJ_PATH, training_llama())

        async def pending() -> dict[str, Any] | None:
            body = await cluster.get(f"{TJ_PATH}/llama") or {}
            status = body.get("status") or {}
            return status if status.get("phase") == "Pending" else None

        status = await wait_for(pending)
        assert status["message"] == (
            "waiting: Service llama belongs to ModelDeployment llama, not to this TrainingJob"
        )
        warned = await wait_for(lambda: _events(cluster, "llama", "NameTaken"))
        assert warned[0]["involvedObject"]["kind"] == C.TRAININGJOB_KIND
        assert await cluster.get(f"{JOB_PATH}/llama-r0") is None
        now = await cluster.get(f"{SVC_PATH}/llama")
        assert now is not None and now["spec"] == held["spec"]
        assert [r["uid"] for r in now["metadata"]["ownerReferences"]] == [md["metadata"]["uid"]]


async def test_a_trainingjob_recreated_before_its_old_job_is_gone_waits_for_it(
    api: ApiServerEmulator, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleted and created again under one name: the earlier TrainingJob's Job `llama-r0` is
    still there (the garbage collector removes it soon). The new one waits Pending and takes
    the name once it is free; it used to fail for good with InvalidSpec."""
    import logging

    import kopf

    from trimtab.handlers.trainingjob import sync_trainingjob

    monkeypatch.setattr(kopf, "event", lambda *_, **__: None)  # no operator runs: no poster
    earlier = Owner(C.API_VERSION, C.TRAININGJOB_KIND, "llama", NS, "earlier-uid")
    await cluster.create(
        JOB_PATH,
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": object_meta(earlier, "llama-r0"),
         "spec": {"template": {"spec": {"containers": []}}}},
    )  # fmt: skip
    created = await cluster.create(TJ_PATH, training_llama())
    log = logging.getLogger("test")

    await sync_trainingjob(cluster.kube, NS, "llama", log)
    body = await cluster.get(f"{TJ_PATH}/llama") or {}
    assert body["status"]["phase"] == "Pending"
    assert body["status"]["message"] == (
        "waiting: Job llama-r0 still belongs to an earlier TrainingJob of this name that the "
        "garbage collector has not removed yet"
    )
    held = await cluster.get(f"{JOB_PATH}/llama-r0")
    assert held is not None
    assert [r["uid"] for r in held["metadata"]["ownerReferences"]] == ["earlier-uid"]

    await cluster.kube.request("DELETE", f"{JOB_PATH}/llama-r0")
    await sync_trainingjob(cluster.kube, NS, "llama", log)
    job = await cluster.get(f"{JOB_PATH}/llama-r0")
    assert job is not None
    assert [r["uid"] for r in job["metadata"]["ownerReferences"]] == [created["metadata"]["uid"]]
