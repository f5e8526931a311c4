"""Traffic routing: HTTPRoute and VirtualService manifests checked against the published
Gateway API and Istio CRDs; the routers (through a fake cluster) and their registry; the
rollout spec's CEL rules against the generated CRD."""

from __future__ import annotations

from typing import Any

import jsonschema
import pydantic
import pytest

from tests.validation import (
    ROOT,
    apply_defaults,
    cel_failures,
    crd_schema,
    thirdparty,
    validate_builtin,
    validate_custom,
)
from trimtab import constants as C
from trimtab.api.rollout import (
    GatewayApiRouterSpec,
    HttpRouteTimeouts,
    IstioRouterSpec,
    ReplicasRouterSpec,
    RolloutSpec,
    RouteMatch,
    UrlRewritePath,
    Weights,
)
from trimtab.builders.common import Owner, with_applied_hash
from trimtab.builders.routing import (
    ROUTER,
    Split,
    build_http_route,
    build_released_route,
    build_revision_service,
    build_virtual_service,
    istio_match,
    istio_path_rewrite,
    route_record,
    route_still_named,
    weights_from_http_route,
)
from trimtab.decisions.routing import takeover_losses
from trimtab.routing.base import CannotMirror, RouteTarget
from trimtab.routing.mesh import release_route
from trimtab.routing.registry import ROUTERS, UnknownRouterError, build_router

OWNER = Owner("trimtab.io/v1alpha1", "ModelDeployment", "chat", "prod", "uid-1")
HTTPROUTE_CRD = thirdparty("gateway-api", "standard", "gateway.networking.k8s.io_httproutes.yaml")
VS_CRD = thirdparty("istio", "virtualservices.networking.istio.io.yaml")
MDEP_CRD = ROOT / "crds" / "trimtab.io_modeldeployments.yaml"

GW_OWNED = GatewayApiRouterSpec(
    type="gatewayApi",
    parent_refs=[{"name": "public", "namespace": "gateways", "sectionName": "https"}],  # type: ignore[list-item]  # validated from wire form
    hostnames=["chat.example.com"],
)
GW_EXISTING = GatewayApiRouterSpec(type="gatewayApi", http_route="chat-route")
GW_TIMEOUTS = GW_OWNED.model_copy(
    update={"timeouts": HttpRouteTimeouts(request="10m", backend_request="5m")}
)
ISTIO = IstioRouterSpec(type="istio", host="chat.example.com", gateways=["istio-system/public"])
MATCHES = [
    {"path": {"type": "PathPrefix", "value": "/v1/"},
     "headers": [{"type": "RegularExpression", "name": "X-Model", "value": "chat-.*"}],
     "method": "POST"},
    {"path": {"type": "Exact", "value": "/healthz"},
     "queryParams": [{"type": "Exact", "name": "full", "value": "1"}]},
]  # fmt: skip
GW_MATCHES = GatewayApiRouterSpec.model_validate(
    {"type": "gatewayApi", "parentRefs": [{"name": "public"}], "matches": MATCHES}
)
GW_EXISTING_MATCHES = GatewayApiRouterSpec.model_validate(
    {"type": "gatewayApi", "httpRoute": "chat-route", "matches": MATCHES}
)
ISTIO_MATCHES = ISTIO.model_copy(update={"matches": GW_MATCHES.matches})
# One filter of each type a router takes, in the HTTPRoute's own form.
FILTERS = [
    {"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "set": [{"name": "X-Tenant", "value": "chat"}], "remove": ["X-Debug"]}},
    {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
        "add": [{"name": "X-Served-By", "value": "trimtab"}]}},
    {"type": "URLRewrite", "urlRewrite": {
        "hostname": "llm.internal",
        "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v1"}}},
    {"type": "ExtensionRef", "extensionRef": {
        "group": "gateway.envoyproxy.io", "kind": "HTTPRouteFilter", "name": "auth"}},
]  # fmt: skip
ISTIO_FILTERS = IstioRouterSpec.model_validate(
    {"type": "istio", "host": "chat.example.com", "filters": FILTERS[:3],
     "matches": [{"path": {"type": "PathPrefix", "value": "/openai"}}],
     "timeouts": {"request": "10m"}}
)  # fmt: skip
GW_FILTERS = GatewayApiRouterSpec.model_validate(
    {"type": "gatewayApi", "parentRefs": [{"name": "public"}], "filters": FILTERS,
     "matches": [{"path": {"type": "PathPrefix", "value": "/openai"}}]}
)  # fmt: skip
# A takeover with no matches: every request, which the HTTPRoute CRD writes as PathPrefix /.
GW_EXISTING_FILTERS = GatewayApiRouterSpec.model_validate(
    {"type": "gatewayApi", "httpRoute": "chat-route", "filters": FILTERS}
)
# A match with headers only has the CRD's default path, PathPrefix /, so a prefix is replaced.
GW_HEADER_MATCH_FILTERS = GatewayApiRouterSpec.model_validate(
    {"type": "gatewayApi", "httpRoute": "chat-route", "filters": FILTERS,
     "matches": [{"headers": [{"name": "X-Model", "value": "chat"}]}]}
)  # fmt: skip

SPLITS = [
    pytest.param(Split("aaa", None, 8000), id="stable-only"),
    pytest.param(Split("aaa", "bbb", 8000, 90, 10), id="canary-10"),
    pytest.param(Split("aaa", "bbb", 8000, 100, 0, 50), id="shadow-50"),
    pytest.param(Split("aaa", "bbb", 8000, 50, 50, 100), id="canary-and-mirror"),
]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(
    "router",
    [
        pytest.param(GW_OWNED, id="owned"),
        pytest.param(GW_EXISTING, id="existing"),
        pytest.param(GW_TIMEOUTS, id="owned-with-timeouts"),
        pytest.param(GW_MATCHES, id="owned-with-matches"),
        pytest.param(GW_EXISTING_MATCHES, id="existing-with-matches"),
        pytest.param(GW_FILTERS, id="owned-with-filters"),
        pytest.param(GW_EXISTING_FILTERS, id="existing-with-filters"),
        pytest.param(GW_HEADER_MATCH_FILTERS, id="header-match-with-prefix-rewrite"),
    ],
)
def test_http_route_fits_the_published_schema(split: Split, router: GatewayApiRouterSpec) -> None:
    route = build_http_route(OWNER, router, split)
    validate_custom(route, HTTPROUTE_CRD)
    # The rule takes what router.matches says, in the CRD's own form; without, every request.
    wanted = [m.to_wire() for m in router.matches] if router.matches else None
    assert route["spec"]["rules"][0].get("matches") == wanted
    timeouts = route["spec"]["rules"][0].get("timeouts")
    assert timeouts == (
        {"request": "10m", "backendRequest": "5m"} if router.timeouts is not None else None
    )
    refs = route["spec"]["rules"][0]["backendRefs"]
    assert sum(r["weight"] for r in refs) == 100
    filters = [
        f for f in route["spec"]["rules"][0].get("filters", []) if f["type"] == "RequestMirror"
    ]
    assert bool(filters) == bool(split.mirror_percent)
    if filters:
        assert filters[0]["requestMirror"]["percent"] == split.mirror_percent
        assert filters[0]["requestMirror"]["backendRef"]["name"] == "chat-bbb"
    # Someone else's route: no ownerReference, only the rules are ours.
    assert ("ownerReferences" in route["metadata"]) == (router.parent_refs is not None)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(
    "router",
    [
        pytest.param(GW_OWNED, id="no-filters"),
        pytest.param(GW_FILTERS, id="owned"),
        pytest.param(GW_EXISTING_FILTERS, id="taken-over"),
    ],
)
def test_http_route_carries_the_routers_filters_before_the_mirror(
    split: Split, router: GatewayApiRouterSpec
) -> None:
    """router.filters are the rule's filters at every weight, in their order; trimtab's mirror
    comes after them, so a mirrored request is the one the candidate gets in the canary."""
    route = build_http_route(OWNER, router, split)
    filters = route["spec"]["rules"][0].get("filters", [])
    mine = FILTERS if router.filters else []
    mirror = [{"type": "RequestMirror", "requestMirror": {
        "backendRef": {"name": "chat-bbb", "port": 8000}, "percent": split.mirror_percent}}]
    assert filters == mine + (mirror if split.mirror_percent else [])  # fmt: skip
    # The mirror is still read back as trimtab's, the user's filters are not taken for one.
    weights, mirror_percent = weights_from_http_route(route, "chat")
    assert mirror_percent == split.mirror_percent
    assert sum(weights.values()) == 100


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(
    "router",
    [
        pytest.param(ISTIO, id="every-request"),
        pytest.param(ISTIO_MATCHES, id="matches"),
        pytest.param(ISTIO_FILTERS, id="filters"),
    ],
)
def test_virtual_service_fits_the_published_schema(split: Split, router: IstioRouterSpec) -> None:
    vs = build_virtual_service(OWNER, router, split)
    # Istio's published schema lists no apiVersion/kind properties; check the rest strictly.
    assert (vs["apiVersion"], vs["kind"]) == ("networking.istio.io/v1", "VirtualService")
    body = {k: v for k, v in vs.items() if k not in ("apiVersion", "kind")}
    validate_custom(body, VS_CRD, version="v1")
    http = vs["spec"]["http"][0]
    if router is ISTIO_MATCHES:
        assert http["match"] == [
            {"uri": {"regex": "/v1(/.*)?"}, "headers": {"x-model": {"regex": "chat-.*"}},
             "method": {"exact": "POST"}},
            {"uri": {"exact": "/healthz"}, "queryParams": {"full": {"exact": "1"}}},
        ]  # fmt: skip
    assert ("match" in http) == bool(router.matches)
    if router.filters:
        assert http["headers"] == {
            "request": {"set": {"X-Tenant": "chat"}, "remove": ["X-Debug"]},
            "response": {"add": {"X-Served-By": "trimtab"}},
        }
        assert http["rewrite"] == {
            "authority": "llm.internal",
            "uriRegexRewrite": {"match": "^/openai(/.*)?$", "rewrite": "/v1\\1"},
        }
    else:
        assert "headers" not in http and "rewrite" not in http
    # Gateway API's request timeout is the Istio route's timeout.
    assert http.get("timeout") == ("10m" if router.timeouts is not None else None)
    assert sum(r["weight"] for r in http["route"]) == 100
    assert ("mirror" in http) == bool(split.mirror_percent)
    if split.mirror_percent:
        assert http["mirrorPercentage"] == {"value": float(split.mirror_percent)}
        assert http["mirror"]["host"] == "chat-bbb.prod.svc.cluster.local"


def test_revision_service_is_a_valid_service() -> None:
    svc = build_revision_service(OWNER, "bbb", 8000)
    validate_builtin(svc)
    assert svc["spec"]["selector"] == {"trimtab.io/owner": "chat", "trimtab.io/revision": "bbb"}


def test_split_rejects_inconsistent_weights() -> None:
    with pytest.raises(ValueError, match="sum to 100"):
        Split("a", "b", 80, 90, 20)
    with pytest.raises(ValueError, match="needs a candidate"):
        Split("a", None, 80, 90, 10)


REPLICAS = ReplicasRouterSpec(type="replicas")
GW_OWNED_RENAMED = GW_OWNED.model_copy(update={"http_route": "chat-public"})
GW_TAKES_OVER_OWN = GatewayApiRouterSpec(type="gatewayApi", http_route="chat")


@pytest.mark.parametrize(
    ("before", "after", "released"),
    [
        pytest.param(None, GW_OWNED, None, id="rollout-added-nothing-recorded"),
        pytest.param(GW_OWNED, None, ("HTTPRoute", "chat"), id="rollout-removed-owned"),
        pytest.param(GW_EXISTING, None, ("HTTPRoute", "chat-route"), id="rollout-removed-users"),
        pytest.param(GW_EXISTING, REPLICAS, ("HTTPRoute", "chat-route"), id="to-replicas"),
        pytest.param(ISTIO, GW_OWNED, ("VirtualService", "chat"), id="istio-to-gateway-api"),
        pytest.param(GW_OWNED, GW_OWNED_RENAMED, ("HTTPRoute", "chat"), id="route-renamed"),
        pytest.param(GW_OWNED, GW_TAKES_OVER_OWN, None, id="same-route-taken-over"),
        pytest.param(
            GW_OWNED,
            GW_OWNED.model_copy(update={"hostnames": ["x.example.com"]}),
            None,
            id="hostnames-edited",
        ),
        pytest.param(ISTIO, ISTIO.model_copy(update={"gateways": []}), None, id="istio-edited"),
        pytest.param(REPLICAS, None, None, id="replicas-removed"),
    ],
)
def test_route_still_named(before: Any, after: Any, released: tuple[str, str] | None) -> None:
    """The route status.route records for `before` is handed back once `after` is the
    router (None: spec.rollout removed) unless `after` still writes it."""
    record = None if before is None else route_record(OWNER, before.to_wire())
    assert route_still_named(OWNER, record, after) is (released is None)
    if released is not None:
        assert record is not None and (record["kind"], record["name"]) == released
        assert ROUTER.validate_python(record["router"]) == before  # what the release rebuilds


@pytest.mark.parametrize(
    "router",
    [
        pytest.param(GW_OWNED, id="owned-http-route"),
        pytest.param(GW_EXISTING, id="users-http-route"),
        pytest.param(ISTIO, id="virtual-service"),
        pytest.param(GW_EXISTING_MATCHES, id="users-http-route-with-matches"),
        pytest.param(ISTIO_MATCHES, id="virtual-service-with-matches"),
        pytest.param(GW_EXISTING_FILTERS, id="users-http-route-with-filters"),
    ],
)
def test_released_route_sends_everything_to_the_resources_service(router: Any) -> None:
    route = build_released_route(OWNER, router, 8000)
    if route["kind"] == "HTTPRoute":
        validate_custom(route, HTTPROUTE_CRD)
        # Handed back, the route still takes only the requests router.matches named.
        rule: dict[str, Any] = {"backendRefs": [{"name": "chat", "port": 8000}]}
        if router.filters:  # its header changes and rewrites go on working too
            rule = {**rule, "filters": FILTERS}
        if router.matches:
            rule = {"matches": MATCHES, **rule}
        assert route["spec"]["rules"] == [rule]
        # The user's route: only the rules are written, parents and hostnames stay theirs.
        assert ("parentRefs" in route["spec"]) == (router.parent_refs is not None)
    else:
        validate_custom({k: v for k, v in route.items() if k not in ("apiVersion", "kind")},
                        VS_CRD, version="v1")  # fmt: skip
        (http,) = route["spec"]["http"]
        assert ("match" in http) == bool(router.matches)
        assert http["route"] == [
            {"destination": {"host": "chat.prod.svc.cluster.local", "port": {"number": 8000}},
             "weight": 100}
        ]  # fmt: skip
        assert "mirror" not in http


async def test_release_route_leaves_a_deleted_route_deleted() -> None:
    """A route that is gone stays gone, one without trimtab's mark is not trimtab's to write
    over, and one released already is not written (nor reported) again."""
    cluster = FakeCluster()
    assert await release_route(OWNER, GW_EXISTING, 8000, cluster) is None
    assert cluster.objects == {}
    users = {"metadata": {"name": "chat-route"}, "spec": {"rules": []}}
    cluster.objects[("HTTPRoute", "chat-route")] = users
    assert await release_route(OWNER, GW_EXISTING, 8000, cluster) is None
    assert cluster.objects[("HTTPRoute", "chat-route")] is users
    marked = {"metadata": {"name": "chat-route", "annotations": {C.ANNOTATION_APPLIED: "x"}},
              "spec": {"rules": []}}  # fmt: skip
    cluster.objects[("HTTPRoute", "chat-route")] = marked
    ref = await release_route(OWNER, GW_EXISTING, 8000, cluster)
    assert ref is not None and ref.name == "chat-route"
    released = cluster.objects[("HTTPRoute", "chat-route")]
    assert released["spec"]["rules"][0]["backendRefs"] == [{"name": "chat", "port": 8000}]
    # As the API server stores it: the apply carried its hash.
    cluster.objects[("HTTPRoute", "chat-route")] = with_applied_hash(released)
    assert await release_route(OWNER, GW_EXISTING, 8000, cluster) is None


class FakeCluster:
    """Stores applied objects by (kind, name) and records scales, as the API server would."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.scales: dict[str, int] = {}
        self.deleted: list[tuple[str, str]] = []

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        key = (manifest["kind"], manifest["metadata"]["name"])
        self.objects[key] = manifest
        return manifest

    async def get_object(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        return self.objects.get((kind, name))

    async def delete_object(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        self.deleted.append((kind, name))
        return self.objects.pop((kind, name), None) is not None

    async def scale(self, kind: str, namespace: str, name: str, replicas: int) -> None:
        self.scales[name] = replicas
        self.objects[(kind, name)] = {"status": {"readyReplicas": replicas}}


def target(total: int = 10) -> RouteTarget:
    return RouteTarget(OWNER, 8000, "aaa", "bbb", Weights(), total_replicas=total)


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        pytest.param(GW_OWNED, "HTTPRoute", id="gateway-api"),
        pytest.param(ISTIO, "VirtualService", id="istio"),
    ],
)
async def test_mesh_routers_set_and_read_weights(spec: Any, kind: str) -> None:
    cluster = FakeCluster()
    router = build_router(spec, target(), cluster)
    assert router.exact_weights
    assert await router.get_weights() is None
    await router.reconcile()
    assert ("Service", "chat-aaa") in cluster.objects and ("Service", "chat-bbb") in cluster.objects
    await router.set_weights(75, 25, 0)
    assert await router.get_weights() == Weights(stable=75, candidate=25)
    await router.set_weights(100, 0, 40)
    assert await router.get_weights() == Weights(stable=100, candidate=0, mirror_percent=40)
    await router.finalize()
    assert await router.get_weights() == Weights()
    assert ("Service", "chat-bbb") in cluster.deleted


async def test_replica_router_splits_by_replicas_and_cannot_mirror() -> None:
    cluster = FakeCluster()
    router = build_router(ReplicasRouterSpec(type="replicas"), target(10), cluster)
    assert not router.exact_weights
    await router.set_weights(75, 25, 0)
    assert cluster.scales == {"chat-aaa": 8, "chat-bbb": 2}
    assert await router.get_weights() == Weights(stable=80, candidate=20)
    with pytest.raises(CannotMirror, match="cannot mirror"):
        await router.set_weights(100, 0, 50)
    await router.finalize()
    assert cluster.scales == {"chat-aaa": 10, "chat-bbb": 0}


def test_registry_is_explicit() -> None:
    assert sorted(ROUTERS) == ["gatewayApi", "istio", "replicas"]
    bogus = ReplicasRouterSpec.model_construct(type="linkerd")  # type: ignore[arg-type]  # a type no model allows
    with pytest.raises(UnknownRouterError, match="linkerd"):
        build_router(bogus, target(), FakeCluster())


# --- the rollout spec's CEL rules, run on the generated CRD --------------------------------


def rollout_failures(rollout: dict[str, Any]) -> list[str]:
    schema = crd_schema(MDEP_CRD)["properties"]["spec"]["properties"]["rollout"]
    # The API server fills in defaults before it runs the rules.
    return list(cel_failures(schema, apply_defaults(schema, rollout)))


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        pytest.param({"steps": [{"weight": 10}, {"weight": 50}]}, None, id="increasing-ok"),
        pytest.param({}, None, id="all-defaults-ok"),
        pytest.param(
            {"steps": [{"weight": 50}, {"weight": 10}]}, "strictly increasing", id="decreasing"
        ),
        pytest.param(
            {"steps": [{"weight": 20}, {"weight": 20}]}, "strictly increasing", id="equal"
        ),
        pytest.param(
            {"strategy": "ShadowThenCanary", "router": {"type": "replicas"}},
            "cannot mirror",
            id="replicas-cannot-shadow",
        ),
        pytest.param(
            {"shadow": {"mirrorPercent": 50}, "router": {"type": "replicas"}},
            "cannot mirror",
            id="replicas-with-shadow-block",
        ),
        pytest.param(
            {"strategy": "ShadowThenCanary", "router": {"type": "istio", "host": "m"}},
            None,
            id="istio-can-shadow",
        ),
        pytest.param(
            {"strategy": "ShadowThenCanary"},
            "cannot mirror",
            id="default-router-is-replicas-cannot-shadow",
        ),
        pytest.param(
            {"shadow": {"mirrorPercent": 50}},
            "cannot mirror",
            id="default-router-with-shadow-block",
        ),
        pytest.param(
            {"shadow": {"mirrorPercent": 50}, "router": {"type": "istio", "host": "m"}},
            "applies only to strategy ShadowThenCanary",
            id="shadow-block-under-canary",
        ),
        pytest.param(
            {
                "strategy": "Immediate",
                "shadow": {"duration": "1m"},
                "router": {"type": "istio", "host": "m"},
            },
            "applies only to strategy ShadowThenCanary",
            id="shadow-block-under-immediate",
        ),
        pytest.param(
            {
                "strategy": "ShadowThenCanary",
                "shadow": {"mirrorPercent": 50},
                "router": {"type": "istio", "host": "m"},
            },
            None,
            id="shadow-block-with-shadow-then-canary",
        ),
        pytest.param(
            {"router": {"type": "gatewayApi"}}, "needs httpRoute", id="gateway-needs-route"
        ),
        pytest.param({"router": {"type": "istio"}}, "needs host", id="istio-needs-host"),
        pytest.param(
            {"router": {"type": "replicas", "host": "m"}}, "host applies only", id="foreign-field"
        ),
        pytest.param(
            {"steps": [{"weight": 10, "pause": {"duration": "1m", "untilPromoted": True}}]},
            "not both",
            id="pause-both",
        ),
        pytest.param(
            {"router": {"type": "istio", "host": "m", "matches": MATCHES}}, None,
            id="istio-matches-ok"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r", "matches": [
                {"path": {"type": "RegularExpression", "value": "^/v[0-9]+"}}]}},
            None, id="regex-path-is-not-checked-as-a-path"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r",
                        "matches": [{"path": {"value": "v1"}}]}},
            "is absolute", id="relative-path"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r",
                        "matches": [{"path": {"type": "Exact", "value": "/a/../b"}}]}},
            "is absolute", id="dot-dot-segment"),
        pytest.param(
            {"router": {"type": "istio", "host": "m",
                        "matches": [{"path": {"value": "/a b"}}]}},
            "URL path characters", id="space-in-path"),
        pytest.param(
            {"router": {"type": "istio", "host": "m", "matches": [{"headers": [
                {"name": "X-Model", "value": "a"}, {"name": "x-model", "value": "b"}]}]}},
            "header is matched at most once", id="header-twice-in-two-cases"),
        pytest.param(
            {"router": {"type": "istio", "host": "m", "matches": [{"queryParams": [
                {"name": "a", "value": "1"}, {"name": "a", "value": "2"}]}]}},
            "query parameter is matched at most once", id="query-parameter-twice"),
        pytest.param(
            {"router": {"type": "replicas", "matches": MATCHES}},
            "matches applies only", id="replicas-has-no-route-to-match-in"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r", "filters": FILTERS}},
            None, id="filters-ok"),
        pytest.param(
            {"router": {"type": "istio", "host": "m", "filters": FILTERS[:3]}},
            None, id="istio-filters-ok"),
        pytest.param(
            {"router": {"type": "istio", "host": "m", "filters": FILTERS[3:]}},
            "ExtensionRef names a Gateway API", id="istio-has-no-extension-filters"),
        pytest.param(
            {"router": {"type": "istio", "host": "m", "timeouts": {"request": "10m"}}},
            None, id="istio-request-timeout"),
        pytest.param(
            {"router": {"type": "istio", "host": "m",
                        "timeouts": {"request": "10m", "backendRequest": "5m"}}},
            "per-try timeout, which is part of its retry policy",
            id="istio-backend-timeout-needs-retries"),
        pytest.param(
            {"router": {"type": "istio", "host": "m", "retries": {"attempts": 3},
                        "timeouts": {"request": "10m", "backendRequest": "5m"}}},
            None, id="istio-backend-timeout-is-the-per-try-timeout"),
        pytest.param(
            {"router": {"type": "istio", "host": "m", "retries": {"attempts": 0},
                        "timeouts": {"backendRequest": "5m"}}},
            "per-try timeout, which is part of its retry policy",
            id="istio-per-try-timeout-without-retries"),
        pytest.param(
            {"router": {"type": "istio", "host": "m", "retries": {"attempts": 0}}},
            None, id="istio-retries-off"),
        pytest.param(
            {"router": {"type": "istio", "host": "m",
                        "retries": {"attempts": 0, "codes": [503]}}},
            "attempts 0 turns retries off", id="istio-codes-with-retries-off"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r",
                        "retries": {"attempts": 2, "codes": [500, 503], "backoff": "250ms"}}},
            None, id="gateway-retries"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r", "retries": {"attempts": 0}}},
            "Gateway API's retry takes 1 or more", id="gateway-retry-cannot-be-off"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r", "retries": {"backoff": "0s"}}},
            "retries.backoff is at least 1ms", id="zero-backoff"),
        pytest.param(
            {"router": {"type": "replicas", "retries": {"attempts": 1}}},
            "retries applies only", id="replicas-have-no-route-to-retry"),
        pytest.param(
            {"router": {"type": "istio", "host": "m", "filters": [FILTERS[2]],
                        "matches": [{"path": {"type": "Exact", "value": "/v1"}}]}},
            "ReplacePrefixMatch rewrite needs", id="istio-prefix-rewrite-of-an-exact-path"),
        pytest.param(
            {"router": {"type": "replicas", "filters": FILTERS[:1]}},
            "filters applies only", id="replicas-have-no-route-to-filter"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r", "filters": [
                {"type": "URLRewrite", "requestHeaderModifier": {"remove": ["a"]}}]}},
            "urlRewrite is set exactly when type is URLRewrite", id="settings-of-another-type"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r", "filters": [
                {"type": "ExtensionRef", "extensionRef": {"group": "", "kind": "F", "name": "a"},
                 "urlRewrite": {"hostname": "a"}}]}},
            "urlRewrite is set exactly when type is URLRewrite", id="two-settings"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r",
                        "filters": [FILTERS[0], FILTERS[0]]}},
            "RequestHeaderModifier at most once", id="header-modifier-twice"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r",
                        "filters": [FILTERS[3], FILTERS[3]]}},
            None, id="extension-ref-may-repeat"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r", "filters": [FILTERS[2]],
                        "matches": [{"path": {"type": "Exact", "value": "/v1"}}]}},
            "ReplacePrefixMatch rewrite needs", id="prefix-rewrite-of-an-exact-path"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r", "filters": [FILTERS[2]],
                        "matches": [{"path": {"value": "/a"}}, {"path": {"value": "/b"}}]}},
            "ReplacePrefixMatch rewrite needs", id="prefix-rewrite-of-two-matches"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r", "filters": [FILTERS[2]],
                        "matches": [{"path": {"value": "/a"}}]}},
            None, id="prefix-rewrite-of-one-prefix"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r", "filters": [
                {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath"}}}]}},
            "replaceFullPath is set exactly", id="full-path-without-a-path"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r", "filters": [
                {"type": "URLRewrite", "urlRewrite": {"path": {
                    "type": "ReplaceFullPath", "replacePrefixMatch": "/a"}}}]}},
            "replacePrefixMatch is set exactly", id="prefix-value-on-a-full-path-rewrite"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r", "filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [
                    {"name": "X-A", "value": "1"}, {"name": "x-a", "value": "2"}]}}]}},
            "a header is named at most once", id="header-set-twice-in-two-cases"),
        pytest.param(
            {"router": {"type": "gatewayApi", "httpRoute": "r", "filters": [
                {"type": "ResponseHeaderModifier",
                 "responseHeaderModifier": {"remove": ["X-A", "x-a"]}}]}},
            "a header is named at most once", id="header-removed-twice"),
    ],
)  # fmt: skip
def test_rollout_cel_rules(rollout: dict[str, Any], message: str | None) -> None:
    failures = rollout_failures(rollout)
    if message is None:
        assert failures == []
        RolloutSpec.model_validate(rollout)  # the model agrees
    elif "applies only to strategy ShadowThenCanary" in message:
        # The API server rejects new ones; one stored before the rule keeps being served, its
        # shadow block ignored, instead of the whole ModelDeployment failing to parse.
        assert any(message in f for f in failures), failures
        assert RolloutSpec.model_validate(rollout).shadow_or_default() is None
    else:
        assert any(message in f for f in failures), failures
        with pytest.raises(pydantic.ValidationError):
            RolloutSpec.model_validate(rollout)


def test_weights_outside_0_100_rejected_by_schema() -> None:
    doc = {
        "apiVersion": "trimtab.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": "d"},
        "spec": {"image": "srv:1", "rollout": {"steps": [{"weight": 101}]}},
    }
    with pytest.raises(Exception, match="101"):
        validate_custom(doc, MDEP_CRD)
    doc["spec"]["rollout"] = {"steps": [{"weight": 10}, {"weight": 100}]}
    validate_custom(doc, MDEP_CRD)


@pytest.mark.parametrize(
    ("timeouts", "error"),
    [
        pytest.param({"request": "10m", "backendRequest": "5m"}, None, id="backend-within-request"),
        pytest.param({"request": "0s", "backendRequest": "5m"}, None, id="request-disabled"),
        pytest.param({"request": "30s", "backendRequest": "5m"}, "at most timeouts.request",
                     id="backend-longer-than-request"),
        pytest.param({"request": "soon"}, "does not match", id="not-a-duration"),
        pytest.param({"request": "100000s"}, "does not match", id="over-five-digits"),
    ],
)  # fmt: skip
def test_route_timeouts_are_checked_as_the_httproute_crd_does(
    timeouts: dict[str, str], error: str | None
) -> None:
    """A pair the published HTTPRoute CRD would refuse fails at the ModelDeployment, not at every
    rollout loop's apply of the route."""
    body = {
        "apiVersion": "trimtab.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "chat", "namespace": "prod"},
        "spec": {
            "image": "srv:1",
            "slo": {"p99LatencyMs": 500},
            "rollout": {"router": {"type": "gatewayApi", "httpRoute": "chat-route",
                                   "timeouts": timeouts}},
        },
    }  # fmt: skip
    if error is None:
        validate_custom(body, MDEP_CRD)
    else:
        with pytest.raises((AssertionError, jsonschema.ValidationError), match=error):
            validate_custom(body, MDEP_CRD)


def gateway_api_prefix_match(prefix: str, path: str) -> bool:
    """Gateway API's PathPrefix, written from its definition: the prefix's path elements
    (a trailing '/' ignored) are the first elements of the request path."""
    want = [e for e in prefix.rstrip("/").split("/")]
    have = path.split("/")
    return have[: len(want)] == want


@pytest.mark.parametrize("prefix", ["/", "/v1", "/v1/", "/v1/chat", "/a.b", "/a-b~c"])
def test_an_istio_path_prefix_matches_what_gateway_api_matches(prefix: str) -> None:
    """Istio's `prefix` is a string prefix (`/v1` would take `/v1beta`); the regex the Istio
    router writes instead takes exactly the paths Gateway API's PathPrefix takes."""
    import re

    uri = istio_match(RouteMatch.model_validate({"path": {"value": prefix}}))["uri"]
    paths = ["/", "/v1", "/v1/", "/v1/chat", "/v1/chat/x", "/v1beta", "/v10", "/a.b", "/axb",
             "/a.b/c", "/a-b~c", "/a-b~cd", "/chat"]  # fmt: skip
    for path in paths:
        if "prefix" in uri:
            istio = path.startswith(uri["prefix"])
        else:
            istio = re.fullmatch(uri["regex"], path) is not None  # RE2 full match, as Envoy's
        assert istio == gateway_api_prefix_match(prefix, path), (prefix, path, uri)


@pytest.mark.parametrize("kind", ["RequestMirror", "RequestRedirect", "CORS"])
def test_filters_trimtab_does_not_take_are_refused_by_the_schema(kind: str) -> None:
    """The mirror is trimtab's own (shadow traffic) and a redirect sends nothing to a
    backend, so neither is a filter of the rule trimtab writes."""
    body = {
        "apiVersion": "trimtab.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "chat", "namespace": "prod"},
        "spec": {"image": "srv:1", "rollout": {"router": {
            "type": "gatewayApi", "httpRoute": "r", "filters": [{"type": kind}]}}},
    }  # fmt: skip
    with pytest.raises(jsonschema.ValidationError, match=kind):
        validate_custom(body, MDEP_CRD)
    with pytest.raises(pydantic.ValidationError):
        RolloutSpec.model_validate(body["spec"]["rollout"])


# --- what a takeover of the user's route would drop -----------------------------------------

TAKEOVER = {"type": "gatewayApi", "httpRoute": "chat-route"}
REWRITE = FILTERS[2]
MIRROR_OURS = {"type": "RequestMirror", "requestMirror": {
    "backendRef": {"name": "chat-bbb", "port": 8000}, "percent": 10}}
MIRROR_THEIRS = {"type": "RequestMirror", "requestMirror": {
    "backendRef": {"name": "audit-log", "port": 80}}}


def rules(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"rules": list(rules)}}


@pytest.mark.parametrize(
    ("route", "router", "losses"),
    [
        pytest.param(rules({"backendRefs": [{"name": "legacy", "port": 80}]}), TAKEOVER, [],
                     id="another-backend-is-what-a-takeover-replaces"),
        pytest.param({}, TAKEOVER, [], id="route-not-found"),
        pytest.param(rules({"filters": [REWRITE]}), TAKEOVER, ["filter URLRewrite"],
                     id="filter-not-listed"),
        pytest.param(rules({"filters": [REWRITE]}), {**TAKEOVER, "filters": [REWRITE]}, [],
                     id="filter-listed"),
        pytest.param(rules({"filters": [FILTERS[3]]}), TAKEOVER,
                     ["filter ExtensionRef auth"], id="extension-ref-named"),
        pytest.param(rules({"filters": [MIRROR_OURS]}), TAKEOVER, [],
                     id="trimtabs-own-mirror"),
        pytest.param(rules({"filters": [MIRROR_THEIRS]}), TAKEOVER,
                     ["filter RequestMirror audit-log"], id="the-users-mirror"),
        pytest.param(rules({"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}),
                     TAKEOVER, [], id="the-default-match-is-every-request"),
        pytest.param(rules({"matches": [{"path": {"value": "/v1"}, "method": "POST",
                                         "headers": [{"name": "X-Model", "value": "a"}]}]}),
                     TAKEOVER, ["match POST PathPrefix /v1 (X-Model)"], id="match-not-listed"),
        pytest.param(rules({"matches": [{"path": {"type": "PathPrefix", "value": "/v1"},
                                         "headers": [{"type": "Exact", "name": "X-Model",
                                                      "value": "a"}]}]}),
                     {**TAKEOVER, "matches": [{"path": {"value": "/v1"},
                                               "headers": [{"name": "X-Model", "value": "a"}]}]},
                     [], id="match-listed-defaults-compared-filled"),
        pytest.param(rules({"backendRefs": [{"name": "chat-aaa"}]},
                           {"matches": [{"path": {"value": "/v2"}}],
                            "backendRefs": [{"name": "embeddings"}]}),
                     TAKEOVER, ["match PathPrefix /v2"], id="another-rule-would-go"),
        pytest.param(rules({"timeouts": {"request": "10m"}}), TAKEOVER,
                     ['timeouts {"request": "10m"}'], id="timeouts-not-listed"),
        pytest.param(rules({"timeouts": {"request": "10m"}}),
                     {**TAKEOVER, "timeouts": {"request": "10m"}}, [], id="timeouts-listed"),
        pytest.param(rules({"retry": {"attempts": 2, "codes": [503]}}), TAKEOVER,
                     ['retry {"attempts": 2, "codes": [503]}'], id="retry-not-listed"),
        pytest.param(rules({"retry": {"codes": [504, 503]}}),
                     {**TAKEOVER, "retries": {"codes": [503, 504]}}, [],
                     id="retry-listed-codes-are-a-set"),
        pytest.param(rules({"filters": [REWRITE]}, {"filters": [REWRITE]}), TAKEOVER,
                     ["filter URLRewrite"], id="said-once"),
    ],
)  # fmt: skip
def test_takeover_losses(route: dict[str, Any], router: dict[str, Any], losses: list[str]) -> None:
    spec = GatewayApiRouterSpec.model_validate(router)
    assert takeover_losses(route, spec, "chat") == losses
    # What trimtab writes with that router, as the API server stores it (the HTTPRoute CRD's
    # defaults filled in), loses nothing of itself, at any split.
    schema = crd_schema(HTTPROUTE_CRD)
    for split in SPLITS:
        stored = apply_defaults(schema, build_http_route(OWNER, spec, split.values[0]))
        assert takeover_losses(stored, spec, "chat") == []


def gateway_api_prefix_rewrite(prefix: str, replacement: str, path: str) -> str:
    """Gateway API's ReplacePrefixMatch, written from its definition (the spec's table): the
    matched prefix's path elements give way to the replacement's, trailing slashes of both
    ignored, and "/" when nothing is left."""
    rest = path[len(prefix.rstrip("/")):]
    return (replacement.rstrip("/") + rest) or "/"


@pytest.mark.parametrize(
    ("prefix", "replacement"),
    [("/foo", "/xyz"), ("/foo", "/xyz/"), ("/foo/", "/xyz"), ("/foo/", "/xyz/"), ("/foo", ""),
     ("/foo", "/"), ("/", "/xyz"), ("/", ""), ("/", "/"), ("/a.b", "/c~d"), ("/v1", "/a-b")],
)  # fmt: skip
def test_an_istio_prefix_rewrite_rewrites_as_gateway_api_does(
    prefix: str, replacement: str
) -> None:
    """The spec's table (`/foo/bar` under `/foo` to `/xyz` is `/xyz/bar`, `/foo` to `` is `/`)
    and more: the regex rewrite the Istio router writes gives Gateway API's path for every
    path the match takes, as RE2 would (one anchored replacement)."""
    import re

    match = RouteMatch.model_validate({"path": {"value": prefix}})
    rewrite = istio_path_rewrite(
        UrlRewritePath(type="ReplacePrefixMatch", replace_prefix_match=replacement), [match]
    )
    uri = istio_match(match)["uri"]
    for path in ["/", "/foo", "/foo/", "/foo/bar", "/foo/bar/", "/a.b", "/a.b/c", "/v1",
                 "/v1/chat", "/x"]:  # fmt: skip
        taken = path.startswith(uri["prefix"]) if "prefix" in uri else bool(
            re.fullmatch(uri["regex"], path)
        )
        if not taken:
            continue
        # RE2's \1 is Python's \g<1>; an unmatched group is empty in both.
        istio = re.sub(rewrite["match"], rewrite["rewrite"].replace("\\1", "\\g<1>"), path,
                       count=1)  # fmt: skip
        assert istio == gateway_api_prefix_rewrite(prefix, replacement, path), (path, rewrite)


def test_an_istio_full_path_rewrite_replaces_the_whole_path() -> None:
    import re

    rewrite = istio_path_rewrite(
        UrlRewritePath(type="ReplaceFullPath", replace_full_path="/v1/chat/completions"), None
    )
    for path in ["/", "/openai/deployments/chat", "/v1/completions/"]:
        assert re.sub(rewrite["match"], rewrite["rewrite"], path, count=1) == (
            "/v1/chat/completions"
        )


def test_a_disabled_request_timeout_writes_none_on_istio() -> None:
    """Gateway API's "0s" is no timeout, Istio's default; its CRD takes only >= 1ms."""
    router = ISTIO.model_copy(update={"timeouts": HttpRouteTimeouts(request="0s")})
    vs = build_virtual_service(OWNER, router, Split("aaa", None, 8000))
    assert "timeout" not in vs["spec"]["http"][0]
    body = {k: v for k, v in vs.items() if k not in ("apiVersion", "kind")}
    validate_custom(body, VS_CRD, version="v1")
