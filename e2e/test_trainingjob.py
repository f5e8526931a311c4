"""TrainingJob on a real API server: the CRD accepts the examples and rejects bad specs with the
field named; the operator creates the Indexed Job and the headless Service with owner
references and the torchrun environment, and follows the Job's suspend flag (Kueue's admission)
in status. Pods never need to run: a control plane without GPU nodes is enough."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

import trimtab.handlers.trainingjob  # noqa: F401  # registers the TrainingJob handlers with kopf
from e2e.conftest import dry_run_examples, get_or_none, server_side_apply, wait_until
from trimtab import constants as C
from trimtab.kube.client import KubeClient, KubeError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = yaml.safe_load((ROOT / "examples" / "trainingjob.yaml").read_text())


def tj_path(ns: str, name: str = "") -> str:
    base = f"/apis/{C.GROUP}/{C.VERSION}/namespaces/{ns}/{C.TRAININGJOB_PLURAL}"
    return f"{base}/{name}" if name else base


def example(ns: str, **spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(EXAMPLE)
    doc["metadata"]["namespace"] = ns
    doc["spec"].update(spec)
    return doc


async def test_example_runs_as_indexed_job_with_service_and_status(
    operator: KubeClient, namespace: str
) -> None:
    kube = operator
    doc = example(namespace)
    name = doc["metadata"]["name"]
    created = await kube.request("POST", tj_path(namespace), body=doc)
    uid = created["metadata"]["uid"]

    jobs = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    job = await wait_until(lambda: get_or_none(kube, f"{jobs}/{name}-r0"))
    assert job["metadata"]["ownerReferences"][0]["uid"] == uid
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MASTER_ADDR"]["value"] == f"{name}-r0-0.{name}"
    assert env["WORLD_SIZE"]["value"] == "16"
    assert pod["subdomain"] == name

    service = await kube.request("GET", f"/api/v1/namespaces/{namespace}/services/{name}")
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["ownerReferences"][0]["uid"] == uid

    async def phase(want: str) -> dict[str, Any] | None:
        body = await kube.request("GET", tj_path(namespace, name))
        status = body.get("status") or {}
        return status if status.get("phase") == want else None

    # Kueue (if installed) has not admitted it: no LocalQueue team-a exists in this namespace.
    status = await wait_until(lambda: phase("Queued"))
    assert {c["type"] for c in status["conditions"]} >= {"Queued"}

    # Play Kueue's admission where Kueue is not installed (it would suspend the Job again):
    # the Job is unsuspended; no node runs the pods, so the job is Starting.
    if job["spec"].get("suspend") and not await get_or_none(kube, "/apis/kueue.x-k8s.io"):
        await kube.request(
            "PATCH",
            f"{jobs}/{name}-r0",
            body={"spec": {"suspend": False}},
            content_type="application/merge-patch+json",
        )
        status = await wait_until(lambda: phase("Starting"))
        assert status["workersReady"] == 0
        assert status["startTime"]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        pytest.param({"workers": 0}, "spec.workers", id="zero-workers"),
        pytest.param({"failurePolicy": {"maxRestarts": -1}}, "maxRestarts",
                     id="unlimited-restarts-without-deadline"),
        pytest.param({"checkpoint": {"directory": "/elsewhere"}}, "checkpoint.directory",
                     id="checkpoint-not-on-a-volume"),
        pytest.param({"gpuResourceName": ""}, "gpuResourceName", id="empty-gpu-resource"),
        pytest.param({"podMetadata": {"labels": {"trimtab.io/owner": "x"}}},
                     "spec.podMetadata", id="cel-reserved-label"),
        pytest.param({"podMetadata": {"annotations": {f"a{i}": "x" for i in range(65)}}},
                     "spec.podMetadata.annotations", id="too-many-annotations"),
    ],
)
async def test_crd_rejects_bad_specs_naming_the_field(
    crds: list[str], kube: KubeClient, namespace: str, spec: dict[str, Any], field: str
) -> None:
    doc = example(namespace, **spec)
    if "failurePolicy" in spec:
        # Unlimited restarts are refused only without a deadline.
        del doc["spec"]["activeDeadlineSeconds"]
    with pytest.raises(KubeError) as err:
        await server_side_apply(
            kube, tj_path(namespace, doc["metadata"]["name"]), doc, dry_run=True
        )
    assert err.value.status == 422
    assert field in err.value.message


async def test_every_example_is_accepted(
    crds: list[str], kube: KubeClient, namespace: str
) -> None:
    await dry_run_examples(kube, namespace, "trainingjob*.yaml", tj_path)


async def test_a_modeldeployment_of_the_same_name_waits_for_the_service(
    operator: KubeClient, namespace: str
) -> None:
    """Both kinds want Service `<name>`: the TrainingJob that has it keeps it; the
    ModelDeployment is Degraded (NameTaken), creates no Deployment, and takes nothing."""
    from e2e.test_modeldeployment import example as md_example
    from e2e.test_modeldeployment import md_path

    kube = operator
    doc = example(namespace)
    name = doc["metadata"]["name"]
    created = await kube.request("POST", tj_path(namespace), body=doc)
    services = f"/api/v1/namespaces/{namespace}/services"
    held = await wait_until(lambda: get_or_none(kube, f"{services}/{name}"))

    md = md_example(namespace)
    md["metadata"]["name"] = name
    await kube.request("POST", md_path(namespace), body=md)

    async def degraded() -> dict[str, Any] | None:
        body = await kube.request("GET", md_path(namespace, name))
        conditions = {c["type"]: c for c in (body.get("status") or {}).get("conditions") or []}
        cond = conditions.get("Degraded")
        return cond if cond and cond.get("reason") == "NameTaken" else None

    cond = await wait_until(degraded)
    assert cond["status"] == "True"
    assert "belongs to TrainingJob" in cond["message"]
    deployments = await kube.request(
        "GET",
        f"/apis/apps/v1/namespaces/{namespace}/deployments",
        params={"labelSelector": f"{C.LABEL_OWNER}={name},{C.LABEL_REVISION}"},
    )
    assert deployments["items"] == []
    service = await kube.request("GET", f"{services}/{name}")
    assert service["spec"]["selector"] == held["spec"]["selector"]
    assert [r["uid"] for r in service["metadata"]["ownerReferences"]] == [
        created["metadata"]["uid"]
    ]
