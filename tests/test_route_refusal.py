"""A route the cluster cannot take as it is: its API not served (no Gateway API CRDs, an Istio
before 1.22), another resource's route of that name, or one the API server refuses as written.
The rollout loop used to log the error and try again every interval with nothing in status;
now RouteAccepted says why (with one Warning, and trimtab_route_accepted at 0 for the alert),
the step is not recorded, and the loop goes on once the cluster takes the route."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.conftest import Cluster
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import MD_PATH, NS
from tests.test_rollout_fresh_replicas import NOW
from tests.test_rollout_retries import _shadowing
from tests.test_rollout_routers_operator import PARENTS
from trimtab.handlers import rollout as handler
from trimtab.handlers.routes import KubeRouterClient, route_refusal
from trimtab.kube.client import KubeClient, KubeError, NameTaken
from trimtab.observability import ROUTE_ACCEPTED

ROUTES = f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/httproutes"
NOT_FOUND = "the server could not find the requested resource"


class RoutesNotServed(KubeClient):
    """A cluster without Gateway API's CRDs, until `served` says otherwise: every request for
    an HTTPRoute is a 404."""

    served = False

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        if "gateway.networking.k8s.io" in path and not self.served:
            raise KubeError(404, "NotFound", NOT_FOUND)
        return await super().request(method, path, **kwargs)


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or []}


async def test_an_unserved_route_api_is_said_in_status_and_the_step_waits(
    api: ApiServerEmulator, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _shadowing(cluster, {"type": "gatewayApi", "parentRefs": PARENTS})
    warnings: list[tuple[str, str]] = []
    monkeypatch.setattr(handler.kopf, "warn",
                        lambda *_, reason, message, **__: warnings.append((reason, message)))
    for name in ("event", "info"):
        monkeypatch.setattr(handler.kopf, name, lambda *_, **__: None)
    kube = RoutesNotServed(str(api.url).rstrip("/"), ssl_context=False)
    try:
        for _ in range(2):
            await handler.rollout_once(
                kube, None, NS, "llm", logging.getLogger("t"), now=NOW  # type: ignore[arg-type]
            )
        status = ((await cluster.get(f"{MD_PATH}/llm")) or {})["status"]
        route = conditions(status)["RouteAccepted"]
        assert (route["status"], route["reason"]) == ("False", "RouteAPINotServed")
        assert route["message"] == (
            f"HTTPRoute llm was not written: this cluster does not serve HTTPRoute "
            f"gateway.networking.k8s.io/v1 ({NOT_FOUND}); install Gateway API's HTTPRoute CRD "
            "(gateway.networking.k8s.io/v1), or use spec.rollout.router.type replicas"
        )
        # The shadow did not start: its step is not recorded while no route carries it.
        assert status["rollout"]["phase"] == "Canary"
        assert "mirrorPercent" not in (status["rollout"].get("weights") or {})
        assert [r for r, _ in warnings] == ["RouteNotAccepted"]  # once, not every loop
        assert ROUTE_ACCEPTED.labels(NS, "llm")._value.get() == 0.0

        kube.served = True  # the CRDs installed: the next loop writes the route and goes on
        await handler.rollout_once(
            kube, None, NS, "llm", logging.getLogger("t"), now=NOW  # type: ignore[arg-type]
        )
    finally:
        await kube.close()
    status = ((await cluster.get(f"{MD_PATH}/llm")) or {})["status"]
    assert status["rollout"]["phase"] == "Shadow"
    assert conditions(status)["RouteAccepted"]["reason"] != "RouteAPINotServed"
    assert await cluster.get(f"{ROUTES}/llm") is not None


async def test_another_resources_route_of_that_name_is_said_in_status(
    api: ApiServerEmulator, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _shadowing(cluster, {"type": "gatewayApi", "parentRefs": PARENTS})
    other = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway-config",
             "uid": "0000-other", "controller": True}  # fmt: skip
    await cluster.create(ROUTES, {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "llm", "namespace": NS, "ownerReferences": [other]},
        "spec": {"rules": [{"backendRefs": [{"name": "elsewhere", "port": 80}]}]},
    })  # fmt: skip
    warnings: list[str] = []
    monkeypatch.setattr(handler.kopf, "warn",
                        lambda *_, reason, message, **__: warnings.append(reason))
    for name in ("event", "info"):
        monkeypatch.setattr(handler.kopf, name, lambda *_, **__: None)
    await handler.rollout_once(
        cluster.kube, None, NS, "llm", logging.getLogger("t"), now=NOW  # type: ignore[arg-type]
    )
    status = ((await cluster.get(f"{MD_PATH}/llm")) or {})["status"]
    route = conditions(status)["RouteAccepted"]
    assert (route["status"], route["reason"]) == ("False", "RouteNameTaken")
    assert "HTTPRoute llm was not written" in route["message"]
    assert status["rollout"]["phase"] == "Canary"
    assert warnings == ["RouteNotAccepted"]
    stored = await cluster.get(f"{ROUTES}/llm")
    assert stored["spec"]["rules"][0]["backendRefs"][0]["name"] == "elsewhere"  # left alone


ROUTE = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
         "metadata": {"name": "llm", "namespace": NS}}  # fmt: skip
REFUSALS = [
    pytest.param(KubeError(404, "NotFound", NOT_FOUND), "RouteAPINotServed",
                 "install Istio 1.22 or later (networking.istio.io/v1)", id="api-not-served"),
    pytest.param(NameTaken("VirtualService llm belongs to X"), "RouteNameTaken",
                 "VirtualService llm was not written: VirtualService llm belongs to X",
                 id="name-taken"),
    pytest.param(KubeError(422, "Invalid", "spec.http[0].route: Required value"), "RouteRejected",
                 "the API server refused VirtualService llm: spec.http[0].route", id="refused"),
    pytest.param(KubeError(500, "", "failed to create typed patch object (ns/llm): "
                           ".spec.x: field not declared in schema"), "RouteRejected",
                 "field not declared in schema", id="undeclared-field-left-after-dropping"),
    pytest.param(KubeError(503, "Service Unavailable", "etcd leader changed"), None, "",
                 id="transient-is-retried"),
    pytest.param(KubeError(409, "Conflict", "the object has been modified"), None, "",
                 id="conflict-is-retried"),
]  # fmt: skip


@pytest.mark.parametrize(("err", "reason", "said"), REFUSALS)
def test_route_refusals(err: KubeError, reason: str | None, said: str) -> None:
    client = KubeRouterClient(KubeClient("http://127.0.0.1:9"))
    assert route_refusal(client, err) is None  # not the route's error
    client.refused = (ROUTE, err)
    health = route_refusal(client, err)
    if reason is None:
        assert health is None
        return
    assert health is not None
    assert (health.status, health.reason) == ("False", reason)
    assert said in health.message


def test_only_the_routes_own_error_is_a_refusal() -> None:
    """A Deployment's error in the same loop, after a route write that failed earlier and was
    retried, is not taken for the route's."""
    client = KubeRouterClient(KubeClient("http://127.0.0.1:9"))
    client.refused = (ROUTE, KubeError(404, "NotFound", NOT_FOUND))
    assert route_refusal(client, KubeError(404, "NotFound", NOT_FOUND)) is None
    assert route_refusal(client, ValueError("x")) is None
