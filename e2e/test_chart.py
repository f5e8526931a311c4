"""The Helm chart against a real API server (KUBECONFIG): every rendered object, with default and
non-default values, passes a server-side dry-run apply with strict field validation, so admission,
defaulting and schema checks of that cluster accept the chart. Nothing is persisted."""

from __future__ import annotations

from typing import Any

import pytest
from tests.chart_render import render

from trimtab.kube.client import KubeClient, KubeError

VALUE_SETS = [
    pytest.param({}, id="defaults"),
    pytest.param(
        {
            "serviceMonitor": {"enabled": True},
            "modelServerPodMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True, "additionalRuleLabels": {"team": "ml"}},
            "networkPolicy": {
                "enabled": True,
                "egress": [{"ports": [{"port": 443, "protocol": "TCP"}]}],
            },
            "grafanaDashboard": {"enabled": True},
            "gpuAgent": {"enabled": True, "runtimeClassName": ""},
        },
        id="everything",
    ),
    pytest.param({"peering": {"enabled": False}, "operator": {"replicas": 1}}, id="standalone"),
]


async def resource_paths(kube: KubeClient, api_version: str) -> dict[str, tuple[str, bool]] | None:
    """kind -> (plural, namespaced) served under api_version, or None when it is not served."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    try:
        found = await kube.request("GET", base)
    except KubeError as err:
        if err.not_found:
            return None
        raise
    return {
        r["kind"]: (r["name"], r["namespaced"]) for r in found["resources"] if "/" not in r["name"]
    }


async def dry_run_apply(kube: KubeClient, doc: dict[str, Any], namespace: str) -> dict[str, Any]:
    served = await resource_paths(kube, doc["apiVersion"])
    if served is None or doc["kind"] not in served:
        pytest.skip(f"{doc['apiVersion']} {doc['kind']} is not served by this cluster")
    plural, namespaced = served[doc["kind"]]
    api = doc["apiVersion"]
    base = f"/api/{api}" if "/" not in api else f"/apis/{api}"
    if namespaced:
        base += f"/namespaces/{doc['metadata'].get('namespace', namespace)}"
    path = f"{base}/{plural}/{doc['metadata']['name']}"
    return await kube.request(
        "PATCH",
        path,
        params={
            "fieldManager": "trimtab-e2e",
            "force": "true",
            "dryRun": "All",
            "fieldValidation": "Strict",
        },
        body=doc,
        content_type="application/apply-patch+yaml",
    )


@pytest.mark.parametrize("values", VALUE_SETS)
async def test_chart_passes_server_side_dry_run(
    kube: KubeClient, namespace: str, values: dict[str, Any]
) -> None:
    docs = render(values, release="trimtab-e2e", namespace=namespace)
    skipped = []
    for doc in docs:
        served = await resource_paths(kube, doc["apiVersion"])
        if served is None or doc["kind"] not in served:
            skipped.append(f"{doc['apiVersion']} {doc['kind']}")
            continue
        try:
            result = await dry_run_apply(kube, doc, namespace)
        except KubeError as err:
            raise AssertionError(f"{doc['kind']} {doc['metadata']['name']}: {err}") from err
        assert result["kind"] == doc["kind"]
        assert result["metadata"]["name"] == doc["metadata"]["name"]
    # Only optional integrations may be missing from a bare cluster.
    monitoring = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert set(skipped) <= {f"monitoring.coreos.com/v1 {kind}" for kind in monitoring}, skipped


async def test_one_namespace_mode_dry_run(kube: KubeClient, namespace: str) -> None:
    values = {"operator": {"watchNamespace": namespace}}
    for doc in render(values, release="trimtab-e2e", namespace=namespace):
        try:
            await dry_run_apply(kube, doc, namespace)
        except KubeError as err:
            raise AssertionError(f"{doc['kind']} {doc['metadata']['name']}: {err}") from err
