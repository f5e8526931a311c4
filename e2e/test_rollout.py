"""Progressive delivery on a real cluster with the Gateway API CRDs installed (skipped when they
are absent): the operator writes the HTTPRoute for the stable revision, reports that no Gateway
has accepted it (the one it names does not exist), adds the candidate at weight 0 after an image
change, and, where pods can run, moves it to the first step's weight.

No Prometheus is needed: starting a candidate and its first step need readiness only."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from e2e.conftest import get_or_none, wait_until
from trimtab import constants as C
from trimtab.builders.routing import revision_service_name
from trimtab.kube.client import KubeClient

GATEWAY_API = "gateway.networking.k8s.io/v1"


def md_path(ns: str, name: str = "") -> str:
    base = f"/apis/{C.GROUP}/{C.VERSION}/namespaces/{ns}/{C.MODELDEPLOYMENT_PLURAL}"
    return f"{base}/{name}" if name else base


# A filter of the rule trimtab writes, which the real HTTPRoute CRD must take as it is.
NO_STORE = {
    "type": "ResponseHeaderModifier",
    "responseHeaderModifier": {"set": [{"name": "Cache-Control", "value": "no-store"}]},
}
REWRITE = {"type": "URLRewrite", "urlRewrite": {"hostname": "web.internal"}}


def canary(ns: str) -> dict[str, Any]:
    return {
        "apiVersion": C.API_VERSION,
        "kind": C.MODELDEPLOYMENT_KIND,
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "server": "generic",
            "image": "nginx:1.27",
            "port": 80,
            "metricsPort": 80,
            "probes": {"readinessPath": "/", "livenessPath": "/"},
            "resources": {"cpu": "50m", "memory": "64Mi"},
            "replicas": 2,
            "rollout": {
                "steps": [{"weight": 25, "pause": {"untilPromoted": True}}],
                "analysis": {"interval": "2s"},
                "router": {
                    "type": "gatewayApi",
                    "parentRefs": [{"name": "trimtab-e2e-gw"}],
                    "filters": [NO_STORE],
                },
            },
        },
    }


@pytest.fixture
async def gateway_api(kube: KubeClient) -> None:
    """Skips, before the operator starts, unless the cluster serves HTTPRoute at v1 (the
    version trimtab writes; Gateway API releases before 1.0 served only v1beta1)."""
    group = await get_or_none(kube, f"/apis/{GATEWAY_API}")
    if "httproutes" not in {r["name"] for r in (group or {}).get("resources", [])}:
        pytest.skip(f"this cluster does not serve httproutes at {GATEWAY_API}")


async def rollout_field(kube: KubeClient, ns: str, field: str) -> Any:
    body = await kube.request("GET", md_path(ns, "web"))
    return ((body.get("status") or {}).get("rollout") or {}).get(field)


async def route_weights(kube: KubeClient, ns: str) -> dict[str, int]:
    route = await get_or_none(kube, f"/apis/{GATEWAY_API}/namespaces/{ns}/httproutes/web")
    if route is None:
        return {}
    return {
        ref["name"]: int(ref.get("weight", 1))
        for rule in route.get("spec", {}).get("rules", [])
        for ref in rule.get("backendRefs", [])
    }


async def stable_route(kube: KubeClient, ns: str) -> str:
    """Waits for the stable revision and for the HTTPRoute to send it all traffic; returns the
    revision's Service."""
    a = await wait_until(lambda: rollout_field(kube, ns, "stableRevision"))
    stable_svc = revision_service_name("web", a)

    async def route_for_stable() -> bool:
        return await route_weights(kube, ns) == {stable_svc: 100}

    await wait_until(route_for_stable)
    return stable_svc


async def test_image_change_adds_candidate_to_the_http_route(
    gateway_api: None, operator: KubeClient, namespace: str
) -> None:
    kube = operator

    await kube.request("POST", md_path(namespace), body=canary(namespace))
    stable_svc = await stable_route(kube, namespace)
    route = await kube.request("GET", f"/apis/{GATEWAY_API}/namespaces/{namespace}/httproutes/web")
    assert route["spec"]["rules"][0]["filters"] == [NO_STORE]

    # The Gateway the route names does not exist, so no controller reports on the route.
    async def route_accepted() -> dict[str, Any] | None:
        body = await kube.request("GET", md_path(namespace, "web"))
        conditions = (body.get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "RouteAccepted"), None)

    reported = await wait_until(route_accepted)
    assert (reported["status"], reported["reason"]) == ("Unknown", "Pending"), reported
    assert "Gateway" in reported["message"] and "trimtab-e2e-gw" in reported["message"]

    await kube.request(
        "PATCH",
        md_path(namespace, "web"),
        body={"spec": {"image": "nginx:1.27-alpine"}},
        content_type="application/merge-patch+json",
    )

    b = await wait_until(lambda: rollout_field(kube, namespace, "candidateRevision"))
    cand_svc = revision_service_name("web", b)

    async def candidate_at_zero() -> bool:
        return await route_weights(kube, namespace) == {stable_svc: 100, cand_svc: 0}

    await wait_until(candidate_at_zero)
    service = await kube.request("GET", f"/api/v1/namespaces/{namespace}/services/{cand_svc}")
    assert service["spec"]["selector"][C.LABEL_REVISION] == b

    # The first step needs a ready candidate pod: only where nodes can run nginx.
    async def first_step() -> bool:
        return await route_weights(kube, namespace) == {stable_svc: 75, cand_svc: 25}

    with contextlib.suppress(AssertionError):
        await wait_until(first_step, timeout=180)
        return
    pytest.skip("the candidate's pods did not become ready (no nodes?): step weights unchecked")


async def test_removing_the_rollout_hands_the_route_back(
    gateway_api: None, operator: KubeClient, namespace: str
) -> None:
    """Needs no running pods: the first revision is stable at once; dropping spec.rollout points
    the HTTPRoute at the resource's Service (the one status.route records, which the real
    status schema must keep) and removes the per-revision Services."""
    kube = operator

    await kube.request("POST", md_path(namespace), body=canary(namespace))
    await stable_route(kube, namespace)

    async def recorded() -> bool:
        body = await kube.request("GET", md_path(namespace, "web"))
        route = (body.get("status") or {}).get("route") or {}
        return (route.get("kind"), route.get("name")) == ("HTTPRoute", "web") and route.get(
            "router"
        ) == canary(namespace)["spec"]["rollout"]["router"]

    await wait_until(recorded)
    await kube.request(
        "PATCH",
        md_path(namespace, "web"),
        body={"spec": {"rollout": None}},
        content_type="application/merge-patch+json",
    )

    async def released() -> bool:
        route = await kube.request(
            "GET", f"/apis/{GATEWAY_API}/namespaces/{namespace}/httproutes/web"
        )
        refs = [
            (ref["name"], ref.get("port"))
            for rule in route.get("spec", {}).get("rules", [])
            for ref in rule.get("backendRefs", [])
        ]
        services = await kube.request("GET", f"/api/v1/namespaces/{namespace}/services")
        per_revision = [
            s["metadata"]["name"]
            for s in services.get("items", [])
            if C.LABEL_REVISION in (s["metadata"].get("labels") or {})
        ]
        return refs == [("web", 80)] and not per_revision

    await wait_until(released)
    body = await kube.request("GET", md_path(namespace, "web"))
    assert "route" not in (body.get("status") or {})


async def test_taking_over_a_route_names_what_its_rules_lose(
    gateway_api: None, operator: KubeClient, namespace: str
) -> None:
    """Needs no running pods: the user's route (rewriting the host, setting a header) is taken
    over with only the header filter listed; the rules keep it, and a Warning names the
    rewrite they lose."""
    kube = operator
    routes = f"/apis/{GATEWAY_API}/namespaces/{namespace}/httproutes"
    await kube.request(
        "POST",
        routes,
        body={
            "apiVersion": GATEWAY_API,
            "kind": "HTTPRoute",
            "metadata": {"name": "users-route", "namespace": namespace},
            "spec": {
                "parentRefs": [{"name": "trimtab-e2e-gw"}],
                "rules": [
                    {"backendRefs": [{"name": "legacy", "port": 80}],
                     "filters": [NO_STORE, REWRITE]}
                ],
            },
        },
    )  # fmt: skip
    body = canary(namespace)
    body["spec"]["rollout"]["router"] = {
        "type": "gatewayApi", "httpRoute": "users-route", "filters": [NO_STORE]
    }  # fmt: skip
    await kube.request("POST", md_path(namespace), body=body)
    a = await wait_until(lambda: rollout_field(kube, namespace, "stableRevision"))

    async def taken_over() -> dict[str, Any] | None:
        route = await kube.request("GET", f"{routes}/users-route")
        (rule,) = route["spec"]["rules"]
        names = [ref["name"] for ref in rule.get("backendRefs", [])]
        return route if names == [revision_service_name("web", a)] else None

    route = await wait_until(taken_over)
    assert route["spec"]["rules"][0]["filters"] == [NO_STORE]
    assert route["spec"]["parentRefs"][0]["name"] == "trimtab-e2e-gw"  # still the user's
    assert not route["metadata"].get("ownerReferences")

    async def warned() -> dict[str, Any] | None:
        events = await kube.request("GET", f"/api/v1/namespaces/{namespace}/events")
        return next(
            (e for e in events.get("items", []) if e.get("reason") == "RouteRulesReplaced"),
            None,
        )

    warning = await wait_until(warned)
    assert warning["type"] == "Warning"
    assert warning["involvedObject"]["name"] == "web"
    assert "filter URLRewrite" in warning["message"]


async def crd_keeps_retry(kube: KubeClient) -> bool:
    """Whether the cluster's HTTPRoute CRD has a rule's `retry` (the experimental channel, or
    the standard one from Gateway API v1.7)."""
    crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    crd = await kube.request("GET", f"{crds}/httproutes.gateway.networking.k8s.io")
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    rules = v1["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["rules"]
    return "retry" in rules["items"]["properties"]


async def test_a_route_retry_is_written_or_its_loss_reported(
    gateway_api: None, operator: KubeClient, namespace: str
) -> None:
    """Needs no running pods. Where the HTTPRoute CRD has a rule's retry, the route carries
    the spec's; where it does not, the API server refuses an apply that sets it (field not
    declared in schema), trimtab writes the route without it, and a Warning says so."""
    kube = operator
    keeps = await crd_keeps_retry(kube)
    retry = {"attempts": 1, "codes": [503], "backoff": "250ms"}
    body = canary(namespace)
    body["spec"]["rollout"]["router"]["retries"] = retry
    await kube.request("POST", md_path(namespace), body=body)
    await stable_route(kube, namespace)
    route = await kube.request("GET", f"/apis/{GATEWAY_API}/namespaces/{namespace}/httproutes/web")
    assert route["spec"]["rules"][0].get("retry") == (retry if keeps else None)

    async def warned() -> dict[str, Any] | None:
        events = await kube.request("GET", f"/api/v1/namespaces/{namespace}/events")
        return next(
            (e for e in events.get("items", []) if e.get("reason") == "RouteFieldsDropped"),
            None,
        )

    if keeps:
        assert await warned() is None
        return
    warning = await wait_until(warned)
    assert warning["type"] == "Warning"
    assert "drops a rule's retry" in warning["message"]
