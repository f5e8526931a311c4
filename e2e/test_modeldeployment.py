"""ModelDeployment on a real API server: the CRD accepts the example and rejects bad specs with
the field named; the operator creates the Deployment and Service with owner references, writes
status, and follows `kubectl scale`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.conftest import dry_run_examples, get_or_none, server_side_apply, wait_until
from trimtab import constants as C
from trimtab.kube.client import KubeClient, KubeError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = yaml.safe_load((ROOT / "examples" / "modeldeployment.yaml").read_text())


def md_path(ns: str, name: str = "") -> str:
    base = f"/apis/{C.GROUP}/{C.VERSION}/namespaces/{ns}/{C.MODELDEPLOYMENT_PLURAL}"
    return f"{base}/{name}" if name else base


def example(ns: str) -> dict[str, Any]:
    doc = copy.deepcopy(EXAMPLE)
    doc["metadata"]["namespace"] = ns
    return doc


async def test_example_reconciles_to_deployment_service_and_status(
    operator: KubeClient, namespace: str
) -> None:
    kube = operator
    doc = example(namespace)
    # `kubectl scale` is checked below; it sets the count only while autoscaling is off.
    doc["spec"].pop("autoscaling", None)
    name = doc["metadata"]["name"]
    created = await kube.request("POST", md_path(namespace), body=doc)
    uid = created["metadata"]["uid"]

    async def deployment() -> dict[str, Any] | None:
        listing = await kube.request(
            "GET",
            f"/apis/apps/v1/namespaces/{namespace}/deployments",
            params={"labelSelector": f"{C.LABEL_OWNER}={name}"},
        )
        items = listing.get("items", [])
        return items[0] if items else None

    deploy = await wait_until(deployment)
    assert deploy["metadata"]["ownerReferences"][0]["uid"] == uid
    assert deploy["metadata"]["labels"][C.LABEL_MANAGED_BY] == "trimtab"
    # The Service is applied after the Deployment: wait for it too.
    service = await wait_until(
        lambda: get_or_none(kube, f"/api/v1/namespaces/{namespace}/services/{name}")
    )
    assert service["metadata"]["ownerReferences"][0]["uid"] == uid
    # A drain takes one of its pods at a time (the API server validates the budget's fields).
    pdb = await wait_until(
        lambda: get_or_none(
            kube, f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets/{name}"
        )
    )
    assert pdb["metadata"]["ownerReferences"][0]["uid"] == uid
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"][C.LABEL_OWNER] == name

    async def status() -> dict[str, Any] | None:
        body = await kube.request("GET", md_path(namespace, name))
        st = body.get("status") or {}
        return st if st.get("observedGeneration") == body["metadata"]["generation"] else None

    st = await wait_until(status)
    assert st["currentRevision"] == deploy["metadata"]["labels"][C.LABEL_REVISION]
    # Pods need not run here: without nodes the phase stays short of Ready.
    assert st["phase"] in ("Pending", "Progressing", "Ready")
    assert {c["type"] for c in st["conditions"]} >= {"Ready", "Progressing", "Degraded"}

    # kubectl scale mdep NAME --replicas=3 goes through the scale subresource.
    await kube.request(
        "PATCH",
        md_path(namespace, name) + "/scale",
        body={"spec": {"replicas": 3}},
        content_type="application/merge-patch+json",
    )

    async def scaled() -> bool:
        d = await deployment()
        return bool(d and d["spec"]["replicas"] == 3)

    await wait_until(scaled)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"replicas": -1}, "spec.replicas", id="negative-replicas"),
        pytest.param({"server": "onnx"}, "spec.server", id="unknown-preset"),
        pytest.param(
            {"resources": {"gpuResourceName": "nvidia.com/gpu"}},
            "gpuResourceName",
            id="cel-gpu-name-without-gpu",
        ),
        # The pod-metadata rules walk the label and annotation maps: they install only because
        # the maps are bounded (64 keys), and here run on a real API server.
        pytest.param({"podMetadata": {"labels": {"trimtab.io/owner": "x"}}},
                     "spec.podMetadata", id="cel-reserved-label"),
        pytest.param({"podMetadata": {"annotations": {"not a key": "x"}}},
                     "spec.podMetadata", id="cel-invalid-annotation-key"),
        pytest.param({"podMetadata": {"labels": {f"team-{i}": "x" for i in range(65)}}},
                     "spec.podMetadata.labels", id="too-many-labels"),
    ],
)
async def test_api_server_rejects_bad_specs_naming_the_field(
    kube: KubeClient, crds: list[str], namespace: str, change: dict[str, Any], field: str
) -> None:
    doc = example(namespace)
    doc["spec"].update(change)
    with pytest.raises(KubeError) as err:
        await server_side_apply(
            kube, md_path(namespace, doc["metadata"]["name"]), doc, dry_run=True
        )
    assert err.value.status == 422
    assert field in err.value.message


async def test_api_server_rejects_a_name_no_service_can_have(
    kube: KubeClient, crds: list[str], namespace: str
) -> None:
    doc = example(namespace)
    doc["metadata"]["name"] = "llama-3.1-8b"
    with pytest.raises(KubeError) as err:
        await server_side_apply(kube, md_path(namespace, "llama-3.1-8b"), doc, dry_run=True)
    assert err.value.status == 422
    assert "metadata.name must be at most 63" in err.value.message


async def test_every_example_is_accepted(
    crds: list[str], kube: KubeClient, namespace: str
) -> None:
    await dry_run_examples(kube, namespace, "modeldeployment*.yaml", md_path)
