"""A Deployment of a revision that runs, deleted by hand (or pruned by a tool), is created again
at once, as a ReplicaSet's deleted pod is; before, it stayed gone until the ModelDeployment
next changed or the operator restarted. One the ModelDeployment is done with stays gone. The
same holds for the Service named after the resource."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.conftest import Cluster, wait_for
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import (
    DEPLOY_PATH,
    MD_PATH,
    NS,
    model,
    serving_deployments,
)
from trimtab import constants as C
from trimtab.handlers import modeldeployment as handler


async def test_a_deleted_deployment_of_the_running_revision_is_created_again(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    async with run_operator():
        await cluster.create(MD_PATH, model())
        first = (await wait_for(lambda: serving_deployments(cluster, "llama")))[0]
        revision = first["metadata"]["labels"][C.LABEL_REVISION]
        await cluster.kube.request("DELETE", f"{DEPLOY_PATH}/{first['metadata']['name']}")

        async def recreated() -> dict[str, Any] | None:
            found = await serving_deployments(cluster, "llama")
            again = [d for d in found if d["metadata"]["uid"] != first["metadata"]["uid"]]
            return again[0] if again else None

        again = await wait_for(recreated, timeout=10)
        assert again["metadata"]["labels"][C.LABEL_REVISION] == revision
        assert again["spec"] == first["spec"]
        events = await cluster.get(f"/api/v1/namespaces/{NS}/events") or {}
        reasons = [e.get("reason") for e in events.get("items", [])]
        assert "RevisionRecreated" in reasons


@pytest.mark.parametrize(
    ("revision", "recreated"),
    [
        pytest.param(None, True, id="the-running-revision"),
        pytest.param("0123456789", False, id="a-revision-it-is-done-with"),
    ],
)
async def test_only_a_revision_that_runs_is_restored(
    api: ApiServerEmulator,
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    revision: str | None,
    recreated: bool,
) -> None:
    monkeypatch.setattr(handler.kopf, "event", lambda *_, **__: None)
    created = await cluster.create(MD_PATH, model())
    spec, _ = handler.parse_spec(created["spec"])
    assert spec is not None
    running = handler.revision_of(spec)
    restored = await handler.restore_deleted_revision(
        cluster.kube, NS, "llama", revision or running, logging.getLogger("t")
    )
    assert restored is recreated
    names = [d["metadata"]["labels"][C.LABEL_REVISION]
             for d in await serving_deployments(cluster, "llama")]  # fmt: skip
    assert names == ([running] if recreated else [])


SERVICE_PATH = f"/api/v1/namespaces/{NS}/services"


async def test_a_deleted_service_of_the_resource_is_created_again(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    async with run_operator():
        await cluster.create(MD_PATH, model())
        first = await wait_for(lambda: cluster.get(f"{SERVICE_PATH}/llama"))
        await cluster.kube.request("DELETE", f"{SERVICE_PATH}/llama")

        async def recreated() -> dict[str, Any] | None:
            found = await cluster.get(f"{SERVICE_PATH}/llama")
            return found if found and found["metadata"]["uid"] != first["metadata"]["uid"] else None

        again = await wait_for(recreated, timeout=10)
        assert again["spec"]["selector"] == first["spec"]["selector"]
        assert again["spec"]["ports"] == first["spec"]["ports"]
        events = await cluster.get(f"/api/v1/namespaces/{NS}/events") or {}
        assert "ServiceRecreated" in [e.get("reason") for e in events.get("items", [])]


@pytest.mark.parametrize(
    ("owner_uid", "recreated"),
    [
        pytest.param(None, True, id="its-modeldeployment"),
        pytest.param("uid-of-an-earlier-one", False, id="an-earlier-modeldeployment-of-the-name"),
    ],
)
async def test_only_the_service_of_the_resource_that_exists_is_restored(
    api: ApiServerEmulator,
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    owner_uid: str | None,
    recreated: bool,
) -> None:
    monkeypatch.setattr(handler.kopf, "event", lambda *_, **__: None)
    created = await cluster.create(MD_PATH, model())
    restored = await handler.restore_deleted_service(
        cluster.kube, NS, "llama", owner_uid or created["metadata"]["uid"], logging.getLogger("t")
    )
    assert restored is recreated
    service = await cluster.get(f"{SERVICE_PATH}/llama")
    assert (service is not None) is recreated
    if recreated:
        assert service is not None
        assert service["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]


def test_only_a_modeldeployments_own_service_is_followed() -> None:
    def service(kind: str) -> Any:
        return {"metadata": {"ownerReferences": [{"kind": kind, "controller": True, "uid": "u"}]}}

    assert handler._owned_by_modeldeployment(service("ModelDeployment"))
    assert not handler._owned_by_modeldeployment(service("TrainingJob"))
    assert not handler._owned_by_modeldeployment({"metadata": {}})


class TerminatingNamespace:
    """A client whose every write answers as the NamespaceLifecycle admission plugin does in a
    namespace being deleted (reads go through)."""

    def __init__(self, kube: Any) -> None:
        self.kube = kube

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kube, name)

    async def apply(self, manifest: dict[str, Any], *_: Any, **__: Any) -> Any:
        from trimtab.kube.client import KubeError

        raise KubeError(
            403, "Forbidden",
            f"{manifest['kind'].lower()}s \"{manifest['metadata']['name']}\" is forbidden: "
            f"unable to create new content in namespace {NS} because it is being terminated",
            {"details": {"causes": [{"reason": "NamespaceTerminating",
                                     "message": f"namespace {NS} is being terminated"}]}},
        )  # fmt: skip


async def test_nothing_is_restored_in_a_namespace_being_deleted(
    api: ApiServerEmulator, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The namespace's deletion removes a Deployment or the Service before the
    ModelDeployment is marked for deletion: the restore finds the namespace refusing new
    content, and lets it go instead of failing (an error logged per deleted object)."""
    monkeypatch.setattr(handler.kopf, "event", lambda *_, **__: None)
    created = await cluster.create(MD_PATH, model())
    spec, _ = handler.parse_spec(created["spec"])
    assert spec is not None
    kube = TerminatingNamespace(cluster.kube)
    log = logging.getLogger("t")
    running = handler.revision_of(spec)
    assert await handler.restore_deleted_revision(kube, NS, "llama", running, log) is False
    uid = created["metadata"]["uid"]
    assert await handler.restore_deleted_service(kube, NS, "llama", uid, log) is False
