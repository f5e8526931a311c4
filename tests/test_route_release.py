"""Handing back a route spec.rollout no longer names follows status.route, the record of the
route trimtab last wrote, not the spec change kopf reports: a change kopf took for handled
without firing anything (kopf issue 1178), or one made while the operator was down, still
releases the route, from the reconcile, the timer that finds an unreconciled generation, or
the rollout loop."""

from __future__ import annotations

import datetime
import logging
import types
from typing import Any

import kopf
import pytest

from tests.conftest import Cluster
from tests.kube_emulator import ApiServerEmulator
from tests.test_missed_generation import Running
from tests.test_modeldeployment_operator import MD_PATH, NS, SVC_PATH, model
from tests.test_rollout_fresh_replicas import NOW
from tests.test_rollout_retries import _shadowing
from tests.test_rollout_routers_operator import PARENTS, ROUTE_PATH, VS_PATH
from tests.test_rollout_routing import MDEP_CRD
from tests.validation import validate_custom
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.rollout import GatewayApiRouterSpec, IstioRouterSpec
from trimtab.builders.common import Owner
from trimtab.builders.routing import (
    ROUTER,
    Split,
    build_http_route,
    build_revision_service,
    build_virtual_service,
    route_record,
)
from trimtab.builders.serving import serving_ports
from trimtab.handlers import modeldeployment as md_handler
from trimtab.handlers import rollout as rollout_handler
from trimtab.handlers import routes
from trimtab.kube.client import KubeClient, KubeError
from trimtab.metrics.factory import ProviderPool

OWNER = Owner(C.API_VERSION, C.MODELDEPLOYMENT_KIND, "llm", NS, "u1")
GW_USER = {"type": "gatewayApi", "httpRoute": "chat"}
GW_OWNED = {"type": "gatewayApi", "parentRefs": PARENTS}
ISTIO = {"type": "istio", "host": "llm.example.com"}


def record(router: dict[str, Any]) -> dict[str, Any]:
    """status.route as the rollout loop writes it after writing `router`'s route."""
    written = route_record(OWNER, router)
    assert written is not None
    return written


def spec_with(router: dict[str, Any] | None) -> ModelDeploymentSpec:
    extra = {} if router is None else {"rollout": {"router": router}}
    return ModelDeploymentSpec.model_validate(model("llm", **extra)["spec"])


def test_the_record_round_trips_through_the_crd_schema() -> None:
    body = model("llm")
    body["status"] = {"route": record({**GW_USER, "retries": {"attempts": 2}})}
    validate_custom({k: v for k, v in body.items() if k not in ("apiVersion", "kind")}, MDEP_CRD)


async def _routed(
    cluster: Cluster, router: dict[str, Any], then: dict[str, Any], marked: bool = True
) -> Owner:
    """A ModelDeployment whose status records `router`'s route, written (applied, so it
    carries trimtab's mark; unless not `marked`: created by someone else) at 90/10 between
    revisions aaa and bbb (their Services exist), created with spec.rollout.router `router`
    and then changed to `then` (a change no reconcile has seen: generation 2)."""
    created = await cluster.create(MD_PATH, model("llm", rollout={"router": router}))
    owner = Owner(C.API_VERSION, C.MODELDEPLOYMENT_KIND, "llm", NS, created["metadata"]["uid"])
    port = serving_ports(ModelDeploymentSpec.model_validate(created["spec"]))[0]
    parsed = ROUTER.validate_python(router)
    split = Split("aaa", "bbb", port, 90, 10)
    if isinstance(parsed, IstioRouterSpec):
        route = build_virtual_service(owner, parsed, split)
        path = VS_PATH
    else:
        assert isinstance(parsed, GatewayApiRouterSpec)
        route = build_http_route(owner, parsed, split)
        path = ROUTE_PATH
        if parsed.parent_refs is None:  # the user's route: trimtab wrote only its rules
            await cluster.create(ROUTE_PATH, {**route, "spec": {"parentRefs": PARENTS}})
    if marked:
        await cluster.kube.apply(route, adopt=True)
    elif parsed.type == "istio" or parsed.parent_refs is not None:
        await cluster.create(path, route)
    else:
        await cluster.merge(f"{path}/{route['metadata']['name']}", {"spec": route["spec"]})
    for revision in ("aaa", "bbb"):
        await cluster.create(SVC_PATH, build_revision_service(owner, revision, port))
    await cluster.merge(
        f"{MD_PATH}/llm/status",
        {"status": {"observedGeneration": 1, "route": route_record(owner, router)}},
    )
    await cluster.merge(f"{MD_PATH}/llm", {"spec": then})
    return owner


async def _update(cluster: Cluster, body: dict[str, Any], old: dict[str, Any]) -> None:
    """kopf's update handler on `body`, with `old` the essence kopf last handled."""
    await md_handler.reconcile_modeldeployment(
        body=kopf.Body(body),
        spec=kopf.Spec(kopf.Body(body)),
        patch=kopf.Patch(),
        memo=types.SimpleNamespace(kube=cluster.kube),
        logger=logging.getLogger("t"),
        serving_deployments={},
        old=old,
        diff=(),
    )


async def _revision_services(cluster: Cluster) -> set[str]:
    listing = await cluster.get(SVC_PATH) or {}
    return {
        s["metadata"]["name"]
        for s in listing.get("items", [])
        if C.LABEL_REVISION in (s["metadata"].get("labels") or {})
    }


async def _converge(cluster: Cluster, kube: KubeClient | None = None) -> None:
    """The timer that reconciles a generation kopf took for handled (no update fired)."""
    body = await cluster.get(f"{MD_PATH}/llm")
    assert body is not None
    await md_handler.converge_modeldeployment(
        body=kopf.Body(body),
        spec=kopf.Spec(kopf.Body(body)),
        patch=kopf.Patch(),
        memo=types.SimpleNamespace(kube=kube or cluster.kube),
        logger=logging.getLogger("t"),
        stopped=Running(),
        serving_deployments={},
    )


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    posted: list[tuple[str, str]] = []

    def event(*_: Any, reason: str, message: str, **__: Any) -> None:
        posted.append((reason, message))

    for module in (md_handler, routes, rollout_handler):
        monkeypatch.setattr(module.kopf, "event", event)
        monkeypatch.setattr(module.kopf, "warn", event)
        monkeypatch.setattr(module.kopf, "info", lambda *_, **__: None)
    return posted


@pytest.mark.parametrize(
    ("router", "then", "released_rules", "services_left"),
    [
        pytest.param(GW_USER, {"rollout": None},
                     [{"backendRefs": [{"name": "llm", "port": 8000}]}], set(),
                     id="rollout-removed-users-route"),
        pytest.param(GW_USER, {"rollout": {"router": {"type": "replicas", "httpRoute": None}}},
                     [{"backendRefs": [{"name": "llm", "port": 8000}]}], set(),
                     id="replica-router-now"),
        pytest.param(GW_USER, {"rollout": {"router": {"type": "gatewayApi", "httpRoute": "web"}}},
                     [{"backendRefs": [{"name": "llm", "port": 8000}]}], {"llm-aaa", "llm-bbb"},
                     id="another-route-keeps-the-revision-services"),
    ],
)  # fmt: skip
async def test_a_change_no_handler_saw_releases_the_route(
    api: ApiServerEmulator,
    cluster: Cluster,
    events: list[tuple[str, str]],
    router: dict[str, Any],
    then: dict[str, Any],
    released_rules: list[dict[str, Any]],
    services_left: set[str],
) -> None:
    """No update handler ran (kopf took the change for handled): the timer that reconciles the
    missed generation finds the recorded route no longer named, points it at the resource's
    Service, removes the per-revision Services when no mesh router is left, and clears the
    record."""
    await _routed(cluster, router, then)
    await _converge(cluster)

    route = await cluster.get(f"{ROUTE_PATH}/chat")
    assert route is not None
    assert route["spec"]["rules"] == released_rules
    assert route["spec"]["parentRefs"] == PARENTS  # the user's parts of the route stay
    assert await _revision_services(cluster) == services_left
    status = (await cluster.get(f"{MD_PATH}/llm") or {})["status"]
    assert "route" not in status
    assert status["observedGeneration"] == 2
    assert [r for r, _ in events if r == "RouteReleased"] == ["RouteReleased"]
    assert "HTTPRoute chat sends all traffic to Service llm" in dict(events)["RouteReleased"]


async def test_a_route_another_resource_took_is_left_to_it(
    api: ApiServerEmulator, cluster: Cluster, events: list[tuple[str, str]]
) -> None:
    await _routed(cluster, GW_OWNED, {"rollout": None})
    other = {"apiVersion": C.API_VERSION, "kind": C.MODELDEPLOYMENT_KIND, "name": "other",
             "uid": "u-other", "controller": True}  # fmt: skip
    taken = await cluster.merge(
        f"{ROUTE_PATH}/llm", {"metadata": {"ownerReferences": [other]}}
    )
    await _converge(cluster)

    route = await cluster.get(f"{ROUTE_PATH}/llm")
    assert route is not None and route["spec"]["rules"] == taken["spec"]["rules"]
    assert await _revision_services(cluster) == set()
    assert "route" not in (await cluster.get(f"{MD_PATH}/llm") or {})["status"]
    assert not [r for r, _ in events if r == "RouteReleased"]


async def test_a_route_without_trimtabs_mark_is_left_alone(
    api: ApiServerEmulator, cluster: Cluster, events: list[tuple[str, str]]
) -> None:
    """Its rules are not trimtab's (it never wrote them, or the route was replaced whole
    since): nothing is written over them."""
    await _routed(cluster, GW_USER, {"rollout": None}, marked=False)
    before = await cluster.get(f"{ROUTE_PATH}/chat")
    await _converge(cluster)
    assert await cluster.get(f"{ROUTE_PATH}/chat") == before
    assert "route" not in (await cluster.get(f"{MD_PATH}/llm") or {})["status"]
    assert not [r for r, _ in events if r == "RouteReleased"]


async def test_a_route_deleted_since_stays_deleted(
    api: ApiServerEmulator, cluster: Cluster, events: list[tuple[str, str]]
) -> None:
    await _routed(cluster, ISTIO, {"rollout": None})
    await cluster.kube.request("DELETE", f"{VS_PATH}/llm")
    await _converge(cluster)

    assert await cluster.get(f"{VS_PATH}/llm") is None
    assert "route" not in (await cluster.get(f"{MD_PATH}/llm") or {})["status"]
    assert not [r for r, _ in events if r == "RouteReleased"]


class RefusesRoutes(KubeClient):
    """An API server whose HTTPRoute CRD (changed since the route was written) refuses the
    route as the old router leaves it."""

    async def apply(self, manifest: dict[str, Any], adopt: bool = False, **kwargs: Any) -> Any:
        if manifest.get("kind") == "HTTPRoute":
            raise KubeError(422, "Invalid", "spec.rules[0].backendRefs: Invalid value")
        return await super().apply(manifest, adopt=adopt, **kwargs)


async def test_a_route_the_api_server_refuses_is_reported_and_left(
    api: ApiServerEmulator, cluster: Cluster, events: list[tuple[str, str]]
) -> None:
    """Nothing better than the released route can be written: a Warning says what to do by
    hand, the record goes, and the reconcile of the resource itself goes on."""
    await _routed(cluster, GW_USER, {"rollout": None})
    before = await cluster.get(f"{ROUTE_PATH}/chat")
    kube = RefusesRoutes(cluster.url, ssl_context=False, keepalive=False)
    try:
        await _converge(cluster, kube)
    finally:
        await kube.close()
    assert await cluster.get(f"{ROUTE_PATH}/chat") == before
    status = (await cluster.get(f"{MD_PATH}/llm") or {})["status"]
    assert "route" not in status and status["observedGeneration"] == 2
    (message,) = [m for r, m in events if r == "RouteNotReleased"]
    assert message.startswith("HTTPRoute chat was not handed back: the API server refused")
    assert "point it at Service llm or delete it" in message
    # The route may still send traffic to them: they stay.
    assert await _revision_services(cluster) == {"llm-aaa", "llm-bbb"}


async def test_a_record_this_operator_cannot_read_is_dropped(
    api: ApiServerEmulator, cluster: Cluster, events: list[tuple[str, str]]
) -> None:
    """A record from an operator version with router fields this one does not know: the
    route cannot be rebuilt as that router would leave it, so it is left as it is (and
    logged); the record goes, so it is not tried at every reconcile."""
    await _routed(cluster, GW_USER, {"rollout": None})
    await cluster.merge(
        f"{MD_PATH}/llm/status", {"status": {"route": {"router": {"type": "linkerd"}}}}
    )
    before = await cluster.get(f"{ROUTE_PATH}/chat")
    await _converge(cluster)

    assert await cluster.get(f"{ROUTE_PATH}/chat") == before
    assert "route" not in (await cluster.get(f"{MD_PATH}/llm") or {})["status"]
    assert await _revision_services(cluster) == {"llm-aaa", "llm-bbb"}  # it may use them


async def test_the_rollout_loop_releases_the_old_route_then_records_the_new(
    api: ApiServerEmulator, cluster: Cluster, events: list[tuple[str, str]]
) -> None:
    """The router changed from Istio to Gateway API while the rollout runs: the loop hands
    the VirtualService back before it writes the HTTPRoute, keeps the per-revision Services
    the new route needs, and records the HTTPRoute with its router in place of the
    VirtualService; an edit of the router rewrites the record whole."""
    await _shadowing(cluster, ISTIO)
    log = logging.getLogger("t")
    no_pool: Any = None  # the first loop starts the shadow, judging nothing
    await rollout_handler.rollout_once(cluster.kube, no_pool, NS, "llm", log, now=NOW)
    status = (await cluster.get(f"{MD_PATH}/llm") or {})["status"]
    assert status["route"] == {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                               "name": "llm", "router": ISTIO}  # fmt: skip
    services = await _revision_services(cluster)
    assert len(services) == 2

    gateway = {**GW_OWNED, "hostnames": ["llm.example.com"]}
    istio_gone = {**gateway, "host": None}
    await cluster.merge(f"{MD_PATH}/llm", {"spec": {"rollout": {"router": istio_gone}}})
    later = NOW + datetime.timedelta(seconds=15)
    # Nothing listens on the discard port: the analysis finds its source unavailable and the
    # weights hold, so the loop re-asserts the route as status says.
    pool = ProviderPool("http://127.0.0.1:9", timeout_s=2.0)
    try:
        wait = await rollout_handler.rollout_once(cluster.kube, pool, NS, "llm", log, now=later)
        assert wait == 1.0  # released; the loop goes on from a fresh read
        vs = await cluster.get(f"{VS_PATH}/llm")
        assert vs is not None
        (destination,) = [r["destination"] for r in vs["spec"]["http"][0]["route"]]
        assert destination["host"] == f"llm.{NS}.svc.cluster.local"
        assert "route" not in (await cluster.get(f"{MD_PATH}/llm") or {})["status"]
        assert await cluster.get(f"{ROUTE_PATH}/llm") is None

        await rollout_handler.rollout_once(cluster.kube, pool, NS, "llm", log, now=later)
        status = (await cluster.get(f"{MD_PATH}/llm") or {})["status"]
        assert status["route"]["kind"] == "HTTPRoute"
        assert status["route"]["router"] == gateway
        assert await cluster.get(f"{ROUTE_PATH}/llm") is not None
        assert await _revision_services(cluster) == services

        unnamed = {**GW_OWNED, "hostnames": None}
        await cluster.merge(f"{MD_PATH}/llm", {"spec": {"rollout": {"router": unnamed}}})
        await rollout_handler.rollout_once(cluster.kube, pool, NS, "llm", log, now=later)
        status = (await cluster.get(f"{MD_PATH}/llm") or {})["status"]
        assert status["route"]["router"] == GW_OWNED  # hostnames gone from the record
    finally:
        await pool.close()
    assert [r for r, _ in events if r == "RouteReleased"] == ["RouteReleased"]


@pytest.mark.parametrize(
    ("loop_ran_here", "released"),
    [
        pytest.param(True, True, id="a-rollout-loop-ran-here-so-the-body-may-be-stale"),
        pytest.param(False, False, id="no-route-writer-ran-and-the-body-has-no-record"),
    ],
)  # fmt: skip
async def test_the_reconcile_reads_a_record_written_after_its_body(
    api: ApiServerEmulator,
    cluster: Cluster,
    events: list[tuple[str, str]],
    loop_ran_here: bool,
    released: bool,
) -> None:
    """kopf hands the reconcile the body of the change (spec.rollout removed), read before a
    rollout loop, still on the old spec, wrote the route and recorded it. The record is read
    fresh under the route lock whenever a route writer has run for the resource in this
    process; otherwise nothing can have been recorded since, and nothing is read."""
    owner = await _routed(cluster, GW_USER, {"rollout": None})
    body = await cluster.get(f"{MD_PATH}/llm")
    assert body is not None
    stale = {**body, "status": {k: v for k, v in body["status"].items() if k != "route"}}
    memo = types.SimpleNamespace(kube=cluster.kube)
    if loop_ran_here:
        routes.route_lock(memo)
    await md_handler.release_route_not_named(
        cluster.kube, stale, owner, spec_with(None), memo, logging.getLogger("t")
    )
    route = await cluster.get(f"{ROUTE_PATH}/chat")
    assert route is not None
    rules = [{"backendRefs": [{"name": "llm", "port": 8000}]}]
    assert (route["spec"]["rules"] == rules) is released
    assert ("route" in (await cluster.get(f"{MD_PATH}/llm") or {})["status"]) is not released


@pytest.mark.parametrize(
    ("old_router", "released"),
    [
        pytest.param(GW_USER, True, id="kopfs-last-handled-spec-names-the-route"),
        pytest.param(None, False, id="nothing-names-a-route"),
    ],
)  # fmt: skip
async def test_a_route_written_before_routes_were_recorded(
    api: ApiServerEmulator,
    cluster: Cluster,
    events: list[tuple[str, str]],
    old_router: dict[str, Any] | None,
    released: bool,
) -> None:
    """An operator upgraded from a version that kept no status.route: the router changed
    while it was down, so status has no record. kopf's update carries the spec it last handled
    (`old`), whose route is released as a recorded one would be."""
    await _routed(cluster, GW_USER, {"rollout": None})
    body = await cluster.merge(f"{MD_PATH}/llm/status", {"status": {"route": None}})
    old = {"spec": {"rollout": {"router": old_router}}} if old_router else {"spec": {}}
    await _update(cluster, body, old)
    route = await cluster.get(f"{ROUTE_PATH}/chat")
    assert route is not None
    rules = [{"backendRefs": [{"name": "llm", "port": 8000}]}]
    assert (route["spec"]["rules"] == rules) is released
    assert (await _revision_services(cluster) == set()) is released
    assert bool([r for r, _ in events if r == "RouteReleased"]) is released


async def test_an_unrecorded_route_is_released_beside_a_recorded_one(
    api: ApiServerEmulator, cluster: Cluster, events: list[tuple[str, str]]
) -> None:
    """The operator was upgraded while the router changed from Istio to Gateway API, and kopf
    starts the rollout loop before the update handler: the loop has written and recorded the
    HTTPRoute by the time the reconcile sees kopf's `old` spec. Its VirtualService, which the
    earlier trimtab never recorded, is still released; the record of the HTTPRoute stays."""
    gateway = {**GW_OWNED, "host": None}
    await _routed(cluster, ISTIO, {"rollout": {"router": gateway}})
    body = await cluster.merge(
        f"{MD_PATH}/llm/status", {"status": {"route": record(GW_OWNED)}}
    )
    await _update(cluster, body, {"spec": {"rollout": {"router": ISTIO}}})
    vs = await cluster.get(f"{VS_PATH}/llm")
    assert vs is not None
    (destination,) = [r["destination"] for r in vs["spec"]["http"][0]["route"]]
    assert destination["host"] == f"llm.{NS}.svc.cluster.local"
    status = (await cluster.get(f"{MD_PATH}/llm") or {})["status"]
    assert status["route"]["kind"] == "HTTPRoute"
    assert await _revision_services(cluster) == {"llm-aaa", "llm-bbb"}
    assert [r for r, _ in events if r == "RouteReleased"] == ["RouteReleased"]


async def test_a_route_written_is_recorded_when_the_loop_then_fails(
    api: ApiServerEmulator,
    cluster: Cluster,
    events: list[tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop wrote the route and then failed (an API error after the write, the daemon
    cancelled): the route is recorded all the same, or a later change would never release it."""
    await _shadowing(cluster, ISTIO)
    route = rollout_handler._route

    async def routes_then_fails(*args: Any, **kwargs: Any) -> Any:
        await route(*args, **kwargs)
        raise RuntimeError("the API server went away after the route was written")

    monkeypatch.setattr(rollout_handler, "_route", routes_then_fails)
    no_pool: Any = None  # the first loop starts the shadow, judging nothing
    with pytest.raises(RuntimeError):
        await rollout_handler.rollout_once(
            cluster.kube, no_pool, NS, "llm", logging.getLogger("t"), now=NOW
        )
    assert await cluster.get(f"{VS_PATH}/llm") is not None
    status = (await cluster.get(f"{MD_PATH}/llm") or {})["status"]
    assert status["route"] == {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                               "name": "llm", "router": ISTIO}  # fmt: skip
    assert status["rollout"]["phase"] == "Canary"  # the step itself was not recorded
