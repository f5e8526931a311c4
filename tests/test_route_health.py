"""What a Gateway (or istiod) reports on the route a mesh router wrote reaches the
ModelDeployment: the condition RouteAccepted, and a Warning RouteNotAccepted once per refusal.
Before, a route no Gateway accepted left a rollout holding on "too few samples" with nothing in
status saying that no request could reach either revision through the route.

Every route status below is validated against the published HTTPRoute and VirtualService CRDs,
so the cases are ones a real controller can write."""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.conftest import Cluster, wait_for, wait_for_value
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import MD_PATH, NS, deployment_controller, model
from tests.validation import thirdparty, validate_custom
from trimtab.api.common import Condition
from trimtab.decisions.routing import (
    RouteHealth,
    http_route_health,
    route_condition,
    virtual_service_health,
)
from trimtab.handlers import rollout as rollout_handler

HTTPROUTE_CRD = thirdparty("gateway-api", "standard", "gateway.networking.k8s.io_httproutes.yaml")
VS_CRD = thirdparty("istio", "virtualservices.networking.istio.io.yaml")
ROUTE_PATH = f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/httproutes"
T = "2026-11-23T10:00:00Z"
CONTROLLER = "gateway.example.io/controller"
MAIN = {"name": "main", "namespace": "infra"}
EDGE = {"name": "edge", "namespace": "infra", "sectionName": "https"}


def cond(kind: str, status: str, reason: str, message: str = "", generation: int = 1) -> Any:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": T,
        "observedGeneration": generation,
    }


ACCEPTED = cond("Accepted", "True", "Accepted")
RESOLVED = cond("ResolvedRefs", "True", "ResolvedRefs")


def route(parents: list[Any], reported: list[tuple[Any, list[Any]]] | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "llama", "namespace": "ml", "generation": 1},
        "spec": {
            "parentRefs": parents,
            "rules": [{"backendRefs": [{"name": "llama-abc", "port": 8000, "weight": 100}]}],
        },
    }
    if reported is not None:
        body["status"] = {
            "parents": [
                {"parentRef": ref, "controllerName": CONTROLLER, "conditions": conditions}
                for ref, conditions in reported
            ]
        }
    return body


# fmt: off
HTTP_ROUTE_CASES = [
    pytest.param(route([MAIN], None), "Unknown", "Pending", "no report yet from Gateway infra/main",
                 id="no-gateway-has-reported-yet"),
    pytest.param(route([MAIN], [(MAIN, [ACCEPTED, RESOLVED])]), "True", "Accepted",
                 "accepted by Gateway infra/main", id="accepted-and-resolved"),
    pytest.param(route([MAIN], [(MAIN, [ACCEPTED])]), "True", "Accepted",
                 "accepted by Gateway infra/main", id="accepted-without-a-resolvedrefs-report"),
    pytest.param(
        route([MAIN], [(MAIN, [
            cond("Accepted", "False", "NotAllowedByListeners",
                 "no listener allows routes from namespace ml"),
            RESOLVED,
        ])]),
        "False", "NotAllowedByListeners",
        "Gateway infra/main did not accept it (NotAllowedByListeners: no listener allows "
        "routes from namespace ml)",
        id="refused-by-the-listeners"),
    pytest.param(
        route([MAIN], [(MAIN, [
            ACCEPTED, cond("ResolvedRefs", "False", "BackendNotFound", "llama-abc not found"),
        ])]),
        "False", "BackendNotFound",
        "Gateway infra/main cannot resolve its backends (BackendNotFound: llama-abc not found)",
        id="a-backend-service-not-found"),
    pytest.param(route([MAIN, EDGE], [(MAIN, [ACCEPTED, RESOLVED])]), "Unknown", "Pending",
                 "no report yet from Gateway infra/edge section https",
                 id="one-of-two-gateways-silent"),
    pytest.param(
        route([MAIN, EDGE], [
            (MAIN, [ACCEPTED, RESOLVED]),
            (EDGE, [cond("Accepted", "False", "NoMatchingListenerHostname", "")]),
        ]),
        "False", "NoMatchingListenerHostname",
        "Gateway infra/edge section https did not accept it (NoMatchingListenerHostname)",
        id="one-of-two-gateways-refuses"),
    pytest.param(
        route([{"name": "main"}], [(
            {"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": "ml",
             "name": "main"},
            [ACCEPTED, RESOLVED],
        )]),
        "True", "Accepted", "accepted by Gateway ml/main",
        id="defaults-of-the-parent-ref-filled-in"),
    pytest.param(route([MAIN], [({"name": "main", "namespace": "other"}, [ACCEPTED])]),
                 "Unknown", "Pending", "no report yet from Gateway infra/main",
                 id="a-report-for-another-gateway-only"),
    pytest.param(route([MAIN], [(MAIN, [cond("Accepted", "Unknown", "Pending")])]),
                 "Unknown", "Pending", "no report yet from Gateway infra/main",
                 id="acceptance-still-pending"),
]
# fmt: on


@pytest.mark.parametrize(("body", "status", "reason", "says"), HTTP_ROUTE_CASES)
def test_http_route_health(body: dict[str, Any], status: str, reason: str, says: str) -> None:
    validate_custom(body, HTTPROUTE_CRD)
    health = http_route_health(body)
    assert (health.status, health.reason) == (status, reason)
    assert health.message.startswith("HTTPRoute llama: ")
    assert says in health.message


def test_a_route_without_parents_is_served_by_no_gateway() -> None:
    # Only the takeover of a user's route can write one (the CRD allows it).
    body = route([], None)
    del body["spec"]["parentRefs"]
    validate_custom(body, HTTPROUTE_CRD)
    assert http_route_health(body).reason == "NoParents"


def virtual_service(status: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "llama", "namespace": "ml"},
        "spec": {"hosts": ["llama.example.com"], "http": [{"name": "trimtab", "route": [
            {"destination": {"host": "llama-abc.ml.svc.cluster.local"}, "weight": 100}]}]},
    }  # fmt: skip
    if status is not None:
        body["status"] = status
    return body


def analysis(level: str, code: str, name: str) -> dict[str, Any]:
    return {
        "level": level,
        "type": {"code": code, "name": name},
        "documentationUrl": f"https://istio.io/latest/docs/reference/config/analysis/{code.lower()}/",
    }


MISSING_GATEWAY = analysis("ERROR", "IST0101", "ReferencedResourceNotFound")
HOST_CONFLICT = analysis("WARNING", "IST0109", "ConflictingMeshGatewayVirtualServiceHosts")
RECONCILED = {"type": "Reconciled", "status": "True", "lastTransitionTime": T}
BEHIND = {"type": "Reconciled", "status": "False", "message": "2/3 proxies up to date"}

# fmt: off
VIRTUAL_SERVICE_CASES = [
    pytest.param(None, "True", "NoErrorsReported", id="istiod-writes-no-status"),
    pytest.param({"validationMessages": [MISSING_GATEWAY]}, "False", "ReferencedResourceNotFound",
                 id="analysis-finds-a-missing-gateway"),
    pytest.param({"validationMessages": [HOST_CONFLICT]}, "True", "NoErrorsReported",
                 id="a-warning-is-not-a-refusal"),
    pytest.param({"conditions": [RECONCILED]}, "True", "Reconciled", id="reconciled-by-istiod"),
    pytest.param({"conditions": [BEHIND]}, "Unknown", "Pending", id="not-yet-on-every-proxy"),
]
# fmt: on


@pytest.mark.parametrize(("status", "expected", "reason"), VIRTUAL_SERVICE_CASES)
def test_virtual_service_health(status: dict[str, Any] | None, expected: str, reason: str) -> None:
    body = virtual_service(status)
    # Istio's CRD lists no apiVersion/kind properties; the rest is checked strictly.
    unlisted = ("apiVersion", "kind")
    validate_custom({k: v for k, v in body.items() if k not in unlisted}, VS_CRD, "v1")
    health = virtual_service_health(body)
    assert (health.status, health.reason) == (expected, reason)
    assert health.message.startswith("VirtualService llama: ")


BAD = RouteHealth("False", "NotAllowedByListeners", "HTTPRoute llama: refused")
GOOD = RouteHealth("True", "Accepted", "HTTPRoute llama: accepted by Gateway infra/main")


@pytest.mark.parametrize(
    ("before", "health", "routed", "after"),
    [
        pytest.param([], BAD, True, ("False", "NotAllowedByListeners"), id="refused"),
        pytest.param([], None, True, None, id="no-route-written-nothing-known"),
        pytest.param([BAD], None, True, ("False", "NotAllowedByListeners"),
                     id="no-route-written-keeps-the-last-report"),
        pytest.param([BAD], GOOD, True, ("True", "Accepted"), id="accepted-again"),
        pytest.param([BAD], None, False, None, id="replica-router-has-no-route"),
    ],
)  # fmt: skip
def test_route_condition(
    before: list[RouteHealth],
    health: RouteHealth | None,
    routed: bool,
    after: tuple[str, str] | None,
) -> None:
    conditions: list[Condition] = []
    for earlier in before:
        conditions = route_condition(conditions, earlier, True, T)
    out = route_condition(conditions, health, routed, "2026-11-23T10:01:00Z")
    found = [(c.status, c.reason) for c in out if c.type == "RouteAccepted"]
    assert found == ([] if after is None else [after])


def test_the_warning_is_sent_once_per_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    monkeypatch.setattr(rollout_handler.kopf, "warn", lambda *_, **kw: sent.append(kw["reason"]))
    log = logging.getLogger("t")
    refused = {"conditions": [c.to_wire() for c in route_condition([], BAD, True, T)]}
    rollout_handler._report_route({}, {}, BAD, log)
    rollout_handler._report_route({}, refused, BAD, log)  # the same refusal: no second one
    other = RouteHealth("False", "BackendNotFound", "HTTPRoute llama: backend gone")
    rollout_handler._report_route({}, refused, other, log)  # a new reason: one more
    rollout_handler._report_route({}, refused, GOOD, log)
    assert sent == ["RouteNotAccepted", "RouteNotAccepted"]


def route_gauge(name: str) -> float | None:
    """trimtab_route_accepted as the operator's /metrics would serve it (same process)."""
    return REGISTRY.get_sample_value("trimtab_route_accepted", {"namespace": NS, "name": name})


async def _condition(cluster: Cluster, name: str) -> dict[str, Any] | None:
    body = await cluster.get(f"{MD_PATH}/{name}") or {}
    conditions = (body.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "RouteAccepted"), None)


async def test_the_gateways_report_reaches_the_modeldeployment(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    """A Gateway refuses the route trimtab wrote, then accepts it once fixed: the condition
    follows within a loop, and one Warning is sent for the refusal, not one per loop."""
    body = model(
        "gw",
        server="generic",
        image="srv:1",
        args=[],
        replicas=1,
        resources={"cpu": "1"},
        slo={"p99LatencyMs": 500},
        # No Prometheus answers: analysis holds, and the route is still written each loop.
        metrics={"prometheusUrl": "http://127.0.0.1:9"},
        rollout={
            "analysis": {"interval": "1s"},
            "router": {"type": "gatewayApi", "parentRefs": [MAIN]},
        },
    )
    async with run_operator(), deployment_controller(cluster):
        await cluster.create(MD_PATH, body)
        written = await wait_for(lambda: cluster.get(f"{ROUTE_PATH}/gw"), timeout=20)
        assert written["spec"]["parentRefs"] == [MAIN]
        pending = await wait_for(lambda: _condition(cluster, "gw"), timeout=10)
        assert (pending["status"], pending["reason"]) == ("Unknown", "Pending")

        async def report(conditions: list[Any]) -> None:
            current = await cluster.get(f"{ROUTE_PATH}/gw")
            assert current is not None
            status = {"parents": [
                {"parentRef": MAIN, "controllerName": CONTROLLER, "conditions": conditions}]}
            validate_custom({**copy.deepcopy(current), "status": status}, HTTPROUTE_CRD)
            await cluster.merge(f"{ROUTE_PATH}/gw/status", {"status": status})  # fmt: skip

        refusal = cond("Accepted", "False", "NotAllowedByListeners", "namespace ml not allowed")
        await report([refusal, RESOLVED])
        got = await wait_for_value(
            lambda: _condition(cluster, "gw"), lambda c: c and c["status"] == "False", timeout=10
        )
        assert got["reason"] == "NotAllowedByListeners"
        assert "namespace ml not allowed" in got["message"]
        assert route_gauge("gw") == 0.0  # an alert on trimtab_route_accepted == 0 fires
        await asyncio.sleep(2.5)  # loops that find the same refusal send no second Warning
        await report([ACCEPTED, RESOLVED])
        got = await wait_for_value(
            lambda: _condition(cluster, "gw"), lambda c: c and c["status"] == "True", timeout=10
        )
        assert got["reason"] == "Accepted"
        assert route_gauge("gw") == 1.0
        events = await cluster.get(f"/api/v1/namespaces/{NS}/events") or {}
        warned = [e for e in events.get("items", []) if e.get("reason") == "RouteNotAccepted"]
        assert len(warned) == 1
        assert "namespace ml not allowed" in warned[0]["message"]
