"""The real kopf operator against the API server emulator: create, revisions, status from the
Deployment, invalid specs, and no writes on a no-op reconcile."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

from tests.conftest import Cluster, wait_for
from tests.kube_emulator import ApiServerEmulator
from trimtab import constants as C

NS = "team-a"
MD_PATH = f"/apis/{C.GROUP}/{C.VERSION}/namespaces/{NS}/{C.MODELDEPLOYMENT_PLURAL}"
DEPLOY_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments"
SVC_PATH = f"/api/v1/namespaces/{NS}/services"

MODEL: dict[str, Any] = {
    "apiVersion": C.API_VERSION,
    "kind": C.MODELDEPLOYMENT_KIND,
    "metadata": {"name": "llama", "namespace": NS},
    "spec": {
        "server": "vllm",
        "image": "vllm/vllm-openai:v0.6.3",
        "args": ["--model", "meta-llama/Llama-3.1-8B-Instruct"],
        "resources": {"cpu": "4", "memory": "32Gi", "gpu": 1},
        "replicas": 2,
    },
}


def model(name: str = "llama", **spec: Any) -> dict[str, Any]:
    body = copy.deepcopy(MODEL)
    body["metadata"]["name"] = name
    body["spec"].update(spec)
    return body


async def serving_deployments(cluster: Cluster, owner: str) -> list[dict[str, Any]]:
    listing = await cluster.get(DEPLOY_PATH) or {}
    return [
        d
        for d in listing.get("items", [])
        if d["metadata"].get("labels", {}).get(C.LABEL_OWNER) == owner
    ]


async def mark_ready(cluster: Cluster, deployment: dict[str, Any]) -> None:
    """Play the Deployment controller: every replica up to date and ready."""
    replicas = deployment["spec"]["replicas"]
    await cluster.merge(
        f"{DEPLOY_PATH}/{deployment['metadata']['name']}/status",
        {
            "status": {
                "observedGeneration": deployment["metadata"]["generation"],
                "replicas": replicas,
                "readyReplicas": replicas,
                "updatedReplicas": replicas,
                "availableReplicas": replicas,
                "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
                ],
            }
        },
    )


@contextlib.asynccontextmanager
async def deployment_controller(
    cluster: Cluster, held: Callable[[dict[str, Any]], bool] = lambda d: False
) -> AsyncIterator[None]:
    """Play the Deployment controller in the background: every Deployment in the namespace
    whose replicas are not all ready (or whose generation is not observed) becomes ready,
    except those `held` says stay as they are."""

    async def loop() -> None:
        while True:
            listing = await cluster.get(DEPLOY_PATH) or {}
            for d in listing.get("items", []):
                st = d.get("status") or {}
                behind = (
                    st.get("readyReplicas") != d["spec"]["replicas"]
                    or st.get("observedGeneration") != d["metadata"]["generation"]
                )
                if behind and not held(d):
                    with contextlib.suppress(Exception):
                        await mark_ready(cluster, d)
            await asyncio.sleep(0.2)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_create_builds_deployment_service_and_status(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    async with run_operator():
        created = await cluster.create(MD_PATH, model())
        uid = created["metadata"]["uid"]
        deployments = await wait_for(lambda: serving_deployments(cluster, "llama"))
        assert len(deployments) == 1
        deploy = deployments[0]
        labels = deploy["metadata"]["labels"]
        assert labels[C.LABEL_MANAGED_BY] == C.MANAGED_BY
        assert labels[C.LABEL_OWNER] == "llama"
        revision = labels[C.LABEL_REVISION]
        assert deploy["metadata"]["ownerReferences"][0]["uid"] == uid
        container = deploy["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert deploy["spec"]["replicas"] == 2

        service = await wait_for(lambda: cluster.get(f"{SVC_PATH}/llama"))
        assert service["spec"]["selector"][C.LABEL_OWNER] == "llama"
        assert service["metadata"]["ownerReferences"][0]["uid"] == uid

        async def pending() -> dict[str, Any] | None:
            body = await cluster.get(f"{MD_PATH}/llama")
            status = (body or {}).get("status", {})
            return status if status.get("currentRevision") == revision else None

        status = await wait_for(pending)
        assert status["phase"] == "Pending"
        assert status["observedGeneration"] == 1
        assert status["selector"] == f"{C.LABEL_MANAGED_BY}=trimtab,{C.LABEL_OWNER}=llama"

        await mark_ready(cluster, deploy)

        async def ready() -> dict[str, Any] | None:
            body = await cluster.get(f"{MD_PATH}/llama")
            status = (body or {}).get("status", {})
            return status if status.get("phase") == "Ready" else None

        status = await wait_for(ready)
        assert status["readyReplicas"] == 2
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Ready"]["status"] == "True"
        assert conditions["Progressing"]["status"] == "False"
        assert conditions["Degraded"]["status"] == "False"


async def test_model_change_is_a_new_revision_that_replaces_the_old_once_ready(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    async with run_operator():
        await cluster.create(MD_PATH, model())
        first = (await wait_for(lambda: serving_deployments(cluster, "llama")))[0]
        await mark_ready(cluster, first)
        old_revision = first["metadata"]["labels"][C.LABEL_REVISION]

        # Scaling is not a model change: same revision, new replica count.
        await cluster.merge(f"{MD_PATH}/llama", {"spec": {"replicas": 3}})

        async def scaled() -> bool:
            found = await serving_deployments(cluster, "llama")
            return len(found) == 1 and found[0]["spec"]["replicas"] == 3

        await wait_for(scaled)

        await cluster.merge(f"{MD_PATH}/llama", {"spec": {"image": "vllm/vllm-openai:v0.7.0"}})

        async def two() -> list[dict[str, Any]]:
            found = await serving_deployments(cluster, "llama")
            return found if len(found) == 2 else []

        both = await wait_for(two)
        new = next(d for d in both if d["metadata"]["labels"][C.LABEL_REVISION] != old_revision)
        assert new["spec"]["template"]["spec"]["containers"][0]["image"].endswith("v0.7.0")

        # The old revision keeps serving until the new one is ready, then it is retired.
        await mark_ready(cluster, new)

        async def retired() -> bool:
            found = await serving_deployments(cluster, "llama")
            return [d["metadata"]["name"] for d in found] == [new["metadata"]["name"]]

        await wait_for(retired)
        body = await cluster.get(f"{MD_PATH}/llama")
        assert body is not None
        assert body["status"]["currentRevision"] == new["metadata"]["labels"][C.LABEL_REVISION]


async def test_invalid_spec_degrades_with_event_while_others_reconcile(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    async with run_operator():
        # Passes the schema but cannot work: 4-way tensor parallel on 1 GPU.
        await cluster.create(MD_PATH, model("broken", args=["--tensor-parallel-size", "4"]))
        await cluster.create(MD_PATH, model("healthy"))

        async def degraded() -> dict[str, Any] | None:
            body = await cluster.get(f"{MD_PATH}/broken")
            status = (body or {}).get("status", {})
            return status if status.get("phase") == "Degraded" else None

        status = await wait_for(degraded)
        cond = {c["type"]: c for c in status["conditions"]}["Degraded"]
        assert cond["status"] == "True"
        assert cond["reason"] == "InvalidSpec"
        assert "spec.args" in cond["message"] and "tensor-parallel-size" in cond["message"]

        async def warning_event() -> list[dict[str, Any]]:
            events = await cluster.get(f"/api/v1/namespaces/{NS}/events") or {}
            return [
                e
                for e in events.get("items", [])
                if e.get("type") == "Warning"
                and e.get("reason") == "InvalidSpec"
                and e.get("involvedObject", {}).get("name") == "broken"
            ]

        await wait_for(warning_event)
        assert await wait_for(lambda: serving_deployments(cluster, "healthy"))
        assert await serving_deployments(cluster, "broken") == []


async def test_repeated_reconcile_writes_nothing(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    async with run_operator():
        await cluster.create(MD_PATH, model())
        deploy = (await wait_for(lambda: serving_deployments(cluster, "llama")))[0]
        await mark_ready(cluster, deploy)

        async def ready() -> bool:
            body = await cluster.get(f"{MD_PATH}/llama")
            return (body or {}).get("status", {}).get("phase") == "Ready"

        await wait_for(ready)

    # A restart resumes every object: with nothing changed, nothing is written.
    writes_before = len(api.writes)
    async with run_operator() as kube:

        async def resumed() -> bool:
            return kube.writes.total() == 0 and len(api.writes) == writes_before

        # Let the resume handler and the Deployment watch run.
        import asyncio

        await asyncio.sleep(2.0)
        assert await resumed(), (kube.writes, api.writes[writes_before:])
