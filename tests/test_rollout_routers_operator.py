"""The rollout's mesh routers in the real kopf operator, against the API server emulator and a
real Prometheus scraping one exporter per revision: three ModelDeployments roll out side by
side in one operator run, and every route the operator writes is checked against the published
Gateway API and Istio CRDs.

- gatewayApi with parentRefs, ShadowThenCanary: trimtab creates the HTTPRoute; during the
  shadow phase a RequestMirror filter copies the configured percent to the candidate's Service,
  then the canary step weighs stable/candidate backendRefs, and after promotion the route sends
  100% to the new stable and the old revision's Service goes;
- istio, ShadowThenCanary: the VirtualService carries mirror + mirrorPercentage, then weights,
  then 100% to the new stable;
- gatewayApi taking over an existing HTTPRoute, with a candidate that never becomes ready: the
  user's parents and hostnames stay, the candidate joins at weight 0, and after
  progressDeadline it is rolled back (condition RolledBack, Event) and the route is stable-only;
- with nothing rolling out, an edited router (hostnames) reaches the HTTPRoute, a dropped
  router field (Istio gateways) leaves the VirtualService, and a VirtualService deleted by
  hand is written again;
- a route spec.rollout stops using (router switched to replicas, or spec.rollout removed from
  the taken-over route's resource) is handed back sending everything to the resource's
  Service, and the per-revision Services go;
- istio, a promoted revision that starts failing in its watch window: the fallback rebuilds
  the known-good revision, and the VirtualService keeps sending traffic to the failing one
  until the rebuilt one has a ready replica (a mesh route to a Service without endpoints
  answers nothing), then moves all of it and the failing revision goes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster, wait_for, wait_for_value
from tests.kube_emulator import ApiServerEmulator
from tests.prometheus_fixture import (
    MetricsExporter,
    PodTarget,
    PrometheusServer,
    require_prometheus,
)
from tests.test_modeldeployment_operator import (
    DEPLOY_PATH,
    MD_PATH,
    NS,
    SVC_PATH,
    deployment_controller,
    model,
)
from tests.validation import thirdparty, validate_builtin, validate_custom
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.rollout import ROLLOUT_ACTION_ANNOTATION
from trimtab.builders.serving import deployment_name, revision_of, serving_ports

pytestmark = pytest.mark.prometheus

HTTPROUTE_CRD = thirdparty("gateway-api", "standard", "gateway.networking.k8s.io_httproutes.yaml")
VS_CRD = thirdparty("istio", "virtualservices.networking.istio.io.yaml")
ROUTE_PATH = f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/httproutes"
VS_PATH = f"/apis/networking.istio.io/v1/namespaces/{NS}/virtualservices"

GOOD, NEXT, BROKEN = "srv:1", "srv:2", "srv:never-ready"
GW, MESH, LATE, FALL = "gw", "mesh", "late", "fall"
PARENTS = [{"name": "public", "namespace": "gateways", "sectionName": "http"}]
USER_ROUTE = "late-route"


def body_for(name: str, image: str, rollout: dict[str, Any], prometheus_url: str) -> dict[str, Any]:
    return model(
        name,
        server="generic",
        image=image,
        args=[],
        resources={"cpu": "1"},
        replicas=2,
        slo={"p99LatencyMs": 500, "maxErrorRate": 0.01},
        metrics={"prometheusUrl": prometheus_url, "rateWindow": "2s", "scrapeInterval": "200ms"},
        rollout={
            "analysis": {"interval": "1s", "minRequests": 20},
            "postPromotion": {"watchWindow": "10m"},
            **rollout,
        },
    )


def shadow_rollout(router: dict[str, Any], mirror: int, weight: int) -> dict[str, Any]:
    """Shadow for 3 s (a window the test can observe), then one step held until promoted."""
    return {
        "strategy": "ShadowThenCanary",
        "shadow": {"mirrorPercent": mirror, "duration": "3s", "minRequests": 20},
        "steps": [{"weight": weight, "pause": {"untilPromoted": True}}],
        "router": router,
        "progressDeadline": "60s",
    }


GW_ROLLOUT = shadow_rollout(
    {"type": "gatewayApi", "parentRefs": PARENTS, "hostnames": ["gw.example.com"]}, 50, 30
)
# The Istio route also sets a response header and rewrites the host, in Gateway API's form.
MESH_FILTERS = [
    {"type": "ResponseHeaderModifier",
     "responseHeaderModifier": {"set": [{"name": "Cache-Control", "value": "no-store"}]}},
    {"type": "URLRewrite", "urlRewrite": {"hostname": "mesh.internal"}},
]  # fmt: skip
MESH_ROLLOUT = shadow_rollout(
    {"type": "istio", "host": "mesh.example.com", "gateways": ["istio-system/public"],
     "filters": MESH_FILTERS}, 100, 25,
)  # fmt: skip
FALL_ROLLOUT = {
    "steps": [{"weight": 50, "pause": {"duration": "2s"}}],
    "router": {"type": "istio", "host": "fall.example.com"},
    "postPromotion": {"watchWindow": "10m", "automaticFallback": True},
    "progressDeadline": "60s",
}
# The user's route sets a header trimtab is told to keep, and rewrites a path it is not.
KEEP_HEADER = {"type": "RequestHeaderModifier",
               "requestHeaderModifier": {"set": [{"name": "X-Tenant", "value": "late"}]}}
DROP_REWRITE = {"type": "URLRewrite",
                "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/v1"}}}
LATE_ROLLOUT = {
    "steps": [{"weight": 50}],
    "router": {"type": "gatewayApi", "httpRoute": USER_ROUTE, "filters": [KEEP_HEADER]},
    "progressDeadline": "2s",
}


def revision(image: str) -> str:
    spec = body_for("x", image, {"router": {"type": "replicas"}}, "http://x")["spec"]
    return revision_of(ModelDeploymentSpec.model_validate(spec))


def service(owner: str, image: str) -> str:
    return f"{owner}-{revision(image)}"


def port() -> int:
    spec = body_for("x", GOOD, {"router": {"type": "replicas"}}, "http://x")["spec"]
    return serving_ports(ModelDeploymentSpec.model_validate(spec))[0]


@dataclasses.dataclass
class Scraped:
    prometheus: PrometheusServer
    exporters: dict[tuple[str, str], MetricsExporter]


@contextlib.asynccontextmanager
async def scraped(tmp_path: Path) -> AsyncIterator[Scraped]:
    """A healthy exporter (40 rps, 50 ms, no errors) per rolled-out revision of each owner,
    scraped by a real Prometheus every 200 ms."""
    binary = require_prometheus()
    pods = [(GW, GOOD), (GW, NEXT), (MESH, GOOD), (MESH, NEXT), (LATE, GOOD), (FALL, GOOD)]
    pods.append((FALL, NEXT))
    exporters = [MetricsExporter("generic").start() for _ in pods]
    targets = [
        PodTarget(
            e.address,
            namespace=NS,
            pod=f"{owner}-{revision(image)}-0",
            labels={C.LABEL_OWNER: owner, C.LABEL_REVISION: revision(image)},
        )
        for e, (owner, image) in zip(exporters, pods, strict=True)
    ]
    prometheus = PrometheusServer(targets, tmp_path / "prom", binary=binary).start()
    try:
        for e in exporters:
            e.set_load(40.0, 0.05)
        await asyncio.to_thread(prometheus.wait_for_scrapes)
        yield Scraped(prometheus, dict(zip(pods, exporters, strict=True)))
    finally:
        prometheus.stop()
        for e in exporters:
            e.stop()


def held_back(held: set[tuple[str, str]]) -> Callable[[dict[str, Any]], bool]:
    """For deployment_controller: the broken image's Deployments never become ready, nor
    those of the (owner, revision) pairs in `held` (the test empties it to let them start)."""

    def hold(d: dict[str, Any]) -> bool:
        image = d["spec"]["template"]["spec"]["containers"][0]["image"]
        labels = d["metadata"].get("labels") or {}
        key = (labels.get(C.LABEL_OWNER, ""), labels.get(C.LABEL_REVISION, ""))
        return image == BROKEN or key in held

    return hold


# --- reading what the operator wrote ----------------------------------------------------------


async def rollout_of(cluster: Cluster, name: str) -> dict[str, Any]:
    body = await cluster.get(f"{MD_PATH}/{name}") or {}
    return dict((body.get("status") or {}).get("rollout") or {})


async def wait_rollout(
    cluster: Cluster, name: str, check: Callable[[dict[str, Any]], object], timeout: float = 30.0
) -> dict[str, Any]:
    return await wait_for_value(lambda: rollout_of(cluster, name), check, timeout, 0.25)


async def http_route(cluster: Cluster, name: str) -> dict[str, Any]:
    """The stored HTTPRoute, validated against the published Gateway API CRD."""
    route = await cluster.get(f"{ROUTE_PATH}/{name}")
    assert route is not None, f"no HTTPRoute {name}"
    # In a thread: the operator shares this event loop and keeps running meanwhile.
    await asyncio.to_thread(validate_custom, route, HTTPROUTE_CRD)
    return route


async def virtual_service(cluster: Cluster, name: str) -> dict[str, Any]:
    """The stored VirtualService, validated against Istio's published CRD (which lists no
    apiVersion/kind properties: those are checked by hand, the rest strictly)."""
    vs = await cluster.get(f"{VS_PATH}/{name}")
    assert vs is not None, f"no VirtualService {name}"
    assert (vs["apiVersion"], vs["kind"]) == ("networking.istio.io/v1", "VirtualService")
    body = {k: v for k, v in vs.items() if k not in ("apiVersion", "kind")}
    await asyncio.to_thread(validate_custom, body, VS_CRD, "v1")
    return vs


def backends(route: dict[str, Any]) -> dict[str, int]:
    (rule,) = route["spec"]["rules"]
    return {ref["name"]: ref["weight"] for ref in rule["backendRefs"]}


def mirrors(route: dict[str, Any]) -> list[tuple[str, int]]:
    (rule,) = route["spec"]["rules"]
    return [
        (f["requestMirror"]["backendRef"]["name"], f["requestMirror"]["percent"])
        for f in rule.get("filters", [])
        if f["type"] == "RequestMirror"
    ]


def destinations(vs: dict[str, Any]) -> dict[str, int]:
    (http,) = vs["spec"]["http"]
    return {r["destination"]["host"]: r["weight"] for r in http["route"]}


def fqdn(owner: str, image: str) -> str:
    return f"{service(owner, image)}.{NS}.svc.cluster.local"


async def revision_services(cluster: Cluster, owner: str) -> set[str]:
    """Names of the owner's per-revision Services (each validated as a built-in Service)."""
    listing = await cluster.get(SVC_PATH) or {}
    names = set()
    for svc in listing.get("items", []):
        labels = svc["metadata"].get("labels") or {}
        if labels.get(C.LABEL_OWNER) == owner and C.LABEL_REVISION in labels:
            validate_builtin({k: v for k, v in svc.items() if k != "status"})
            assert svc["spec"]["selector"] == {
                C.LABEL_OWNER: owner,
                C.LABEL_REVISION: labels[C.LABEL_REVISION],
            }
            names.add(svc["metadata"]["name"])
    return names


async def resource_service_selects(cluster: Cluster, owner: str) -> str | None:
    """The one revision the Service named after the resource selects; None: all of them."""
    svc = await cluster.get(f"{SVC_PATH}/{owner}")
    assert svc is not None, f"no Service {owner}"
    selector = svc["spec"]["selector"]
    assert {k: v for k, v in selector.items() if k != C.LABEL_REVISION} == {
        C.LABEL_OWNER: owner,
        C.LABEL_MANAGED_BY: C.MANAGED_BY,
    }
    return selector.get(C.LABEL_REVISION)


async def released_to_shared_service(
    cluster: Cluster, owner: str, route_name: str, filters: list[dict[str, Any]] | None = None
) -> bool:
    """The route sends everything to the Service named after the resource (through the
    router's `filters`), no per-revision Service is left, and the RouteReleased Event is
    posted."""
    route = await cluster.get(f"{ROUTE_PATH}/{route_name}")
    rule: dict[str, Any] = {"backendRefs": [{"name": owner, "port": port()}]}
    if filters:
        rule["filters"] = filters
    return (
        route is not None
        and route["spec"]["rules"] == [rule]
        and not await revision_services(cluster, owner)
        and "RouteReleased" in await event_reasons(cluster, owner)
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    await wait_for(check, timeout=timeout, interval=0.25)


async def event_reasons(cluster: Cluster, name: str) -> list[str]:
    events = await cluster.get(f"/api/v1/namespaces/{NS}/events") or {}
    return [
        e.get("reason", "")
        for e in events.get("items", [])
        if e.get("involvedObject", {}).get("name") == name
    ]


async def promote_by_hand(cluster: Cluster, name: str) -> None:
    await cluster.merge(
        f"{MD_PATH}/{name}",
        {"metadata": {"annotations": {ROLLOUT_ACTION_ANNOTATION: "promote"}}},
    )


# --- the three rollouts -----------------------------------------------------------------------


async def gateway_api_shadow_then_canary(cluster: Cluster, url: str) -> None:
    a, b = revision(GOOD), revision(NEXT)
    sa, sb = service(GW, GOOD), service(GW, NEXT)
    await cluster.create(MD_PATH, body_for(GW, GOOD, GW_ROLLOUT, url))
    await wait_rollout(cluster, GW, lambda ro: ro.get("stableRevision") == a)

    async def stable_route() -> bool:
        route = await cluster.get(f"{ROUTE_PATH}/{GW}")
        return route is not None and backends(route) == {sa: 100}

    await eventually(stable_route)
    route = await http_route(cluster, GW)
    # Created from parentRefs: trimtab owns the whole route, parents and hostnames included.
    assert route["spec"]["parentRefs"] == PARENTS
    assert route["spec"]["hostnames"] == ["gw.example.com"]
    assert route["metadata"]["ownerReferences"][0]["name"] == GW
    assert all(ref["port"] == port() for ref in route["spec"]["rules"][0]["backendRefs"])
    assert mirrors(route) == []

    await cluster.merge(f"{MD_PATH}/{GW}", {"spec": {"image": NEXT}})
    shadow = await wait_rollout(
        cluster, GW, lambda ro: ro.get("candidateRevision") == b and ro.get("phase") == "Shadow"
    )
    assert shadow["weights"] == {"stable": 100, "candidate": 0, "mirrorPercent": 50}
    route = await http_route(cluster, GW)
    assert backends(route) == {sa: 100, sb: 0}
    assert mirrors(route) == [(sb, 50)]
    assert await revision_services(cluster, GW) == {sa, sb}
    # Callers of the resource's own Service reach the stable revision only: a shadow candidate
    # answers no real request.
    assert await resource_service_selects(cluster, GW) == a

    # Shadow passes (3 s, enough mirrored requests, analysis Pass): the canary step, no mirror.
    step = await wait_rollout(cluster, GW, lambda ro: ro.get("stepIndex") == 0)
    assert step["weights"] == {"stable": 70, "candidate": 30, "mirrorPercent": 0}
    assert any(v["verdict"] == "Pass" for v in step["verdicts"]), step["verdicts"]
    route = await http_route(cluster, GW)
    assert backends(route) == {sa: 70, sb: 30}
    assert mirrors(route) == []

    await wait_rollout(cluster, GW, lambda ro: ro.get("phase") == "Paused")
    await promote_by_hand(cluster, GW)
    promoted = await wait_rollout(
        cluster, GW, lambda ro: ro.get("stableRevision") == b and not ro.get("candidateRevision")
    )
    assert promoted["weights"] == {"stable": 100, "candidate": 0, "mirrorPercent": 0}

    # The previous stable keeps the share of its ready replicas until b's are all ready (the
    # Deployment controller here makes them so within moments): then all of it is b's.
    async def handed_over() -> bool:
        return backends(await http_route(cluster, GW)) == {sb: 100}

    await eventually(handed_over)
    route = await http_route(cluster, GW)
    assert mirrors(route) == []
    assert route["spec"]["parentRefs"] == PARENTS

    async def old_service_gone() -> bool:
        return await revision_services(cluster, GW) == {sb}

    await eventually(old_service_gone)
    # Promoted: the resource's Service selects every revision's pods again.
    assert await resource_service_selects(cluster, GW) is None

    async def events_posted() -> bool:  # kopf posts Events in the background
        reasons = set(await event_reasons(cluster, GW))
        return reasons >= {"RolloutStarted", "TrafficMirrored", "TrafficShifted", "RolloutPromoted"}

    await eventually(events_posted)

    # With nothing rolling out, an edit to the router in spec.rollout reaches the route.
    hostnames = ["gw.example.com", "chat.example.com"]
    router = {**GW_ROLLOUT["router"], "hostnames": hostnames}
    await cluster.merge(f"{MD_PATH}/{GW}", {"spec": {"rollout": {"router": router}}})

    async def hostnames_applied() -> bool:
        route = await cluster.get(f"{ROUTE_PATH}/{GW}")
        return route is not None and route["spec"].get("hostnames") == hostnames

    await eventually(hostnames_applied)
    route = await http_route(cluster, GW)
    assert backends(route) == {sb: 100}

    async def recorded() -> bool:  # status.route: what to release when the spec moves on
        status = (await cluster.get(f"{MD_PATH}/{GW}") or {}).get("status") or {}
        return status.get("route") == {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "name": GW,
            "router": router,
        }  # fmt: skip

    await eventually(recorded)

    # Back to the replica router: the route trimtab created is handed back pointing at the
    # resource's Service (every revision's pods), and the per-revision Services go.
    # (The replica router cannot mirror, so the shadow phase goes too.)
    replicas = {"type": "replicas", "parentRefs": None, "hostnames": None}
    await cluster.merge(
        f"{MD_PATH}/{GW}",
        {"spec": {"rollout": {"strategy": "Canary", "shadow": None, "router": replicas}}},
    )
    await eventually(lambda: released_to_shared_service(cluster, GW, GW))
    route = await http_route(cluster, GW)
    assert route["spec"]["parentRefs"] == PARENTS
    assert route["spec"]["hostnames"] == hostnames
    assert "route" not in ((await cluster.get(f"{MD_PATH}/{GW}") or {}).get("status") or {})


async def istio_shadow_then_canary(cluster: Cluster, url: str, held: set[tuple[str, str]]) -> None:
    a, b = revision(GOOD), revision(NEXT)
    ha, hb = fqdn(MESH, GOOD), fqdn(MESH, NEXT)
    await cluster.create(MD_PATH, body_for(MESH, GOOD, MESH_ROLLOUT, url))
    await wait_rollout(cluster, MESH, lambda ro: ro.get("stableRevision") == a)

    async def stable_vs() -> bool:
        vs = await cluster.get(f"{VS_PATH}/{MESH}")
        return vs is not None and destinations(vs) == {ha: 100}

    await eventually(stable_vs)
    vs = await virtual_service(cluster, MESH)
    assert vs["spec"]["hosts"] == ["mesh.example.com"]
    assert vs["spec"]["gateways"] == ["istio-system/public"]
    assert "mirror" not in vs["spec"]["http"][0]
    assert vs["spec"]["http"][0]["headers"] == {"response": {"set": {"Cache-Control": "no-store"}}}
    assert vs["spec"]["http"][0]["rewrite"] == {"authority": "mesh.internal"}

    await cluster.merge(f"{MD_PATH}/{MESH}", {"spec": {"image": NEXT}})
    await wait_rollout(
        cluster, MESH, lambda ro: ro.get("candidateRevision") == b and ro.get("phase") == "Shadow"
    )
    vs = await virtual_service(cluster, MESH)
    http = vs["spec"]["http"][0]
    assert destinations(vs) == {ha: 100, hb: 0}
    assert http["mirror"] == {"host": hb, "port": {"number": port()}}
    assert http["mirrorPercentage"] == {"value": 100.0}
    assert await revision_services(cluster, MESH) == {service(MESH, GOOD), service(MESH, NEXT)}

    step = await wait_rollout(cluster, MESH, lambda ro: ro.get("stepIndex") == 0)
    assert step["weights"] == {"stable": 75, "candidate": 25, "mirrorPercent": 0}
    vs = await virtual_service(cluster, MESH)
    assert destinations(vs) == {ha: 75, hb: 25}
    assert "mirror" not in vs["spec"]["http"][0]
    assert "mirrorPercentage" not in vs["spec"]["http"][0]
    assert vs["spec"]["http"][0]["rewrite"] == {"authority": "mesh.internal"}  # at every weight

    await wait_rollout(cluster, MESH, lambda ro: ro.get("phase") == "Paused")

    # The candidate loses its ready replicas (a crash): its 25% goes to the stable revision
    # rather than to a Service without endpoints, and comes back once it is ready again.
    held.add((MESH, b))
    await cluster.merge(
        f"{DEPLOY_PATH}/{deployment_name(MESH, b)}/status",
        {"status": {"readyReplicas": 0, "availableReplicas": 0}},
    )

    withheld = await wait_rollout(cluster, MESH, lambda ro: ro.get("candidateUnreadySince"))
    # Status keeps the step (and its replicas); only the route withholds the share.
    assert withheld["stepIndex"] == 0 and withheld["weights"]["candidate"] == 25
    assert withheld["heldSince"] and "no ready replica" in withheld["reason"]

    async def withheld_vs() -> bool:
        vs = await cluster.get(f"{VS_PATH}/{MESH}")
        return vs is not None and destinations(vs) == {ha: 100, hb: 0}

    await eventually(withheld_vs)
    held.discard((MESH, b))
    resumed = await wait_rollout(cluster, MESH, lambda ro: "candidateUnreadySince" not in ro)
    assert resumed["weights"]["candidate"] == 25 and resumed["stepSince"] == step["stepSince"]

    async def resumed_vs() -> bool:
        vs = await cluster.get(f"{VS_PATH}/{MESH}")
        return vs is not None and destinations(vs) == {ha: 75, hb: 25}

    await eventually(resumed_vs)
    await wait_rollout(cluster, MESH, lambda ro: ro.get("phase") == "Paused")
    await promote_by_hand(cluster, MESH)
    await wait_rollout(
        cluster, MESH, lambda ro: ro.get("stableRevision") == b and not ro.get("candidateRevision")
    )

    async def mesh_handed_over() -> bool:  # once b's replicas are all ready
        return destinations(await virtual_service(cluster, MESH)) == {hb: 100}

    await eventually(mesh_handed_over)

    # A VirtualService deleted by hand comes back at the weights status holds.
    await cluster.kube.request("DELETE", f"{VS_PATH}/{MESH}")

    async def recreated() -> bool:
        vs = await cluster.get(f"{VS_PATH}/{MESH}")
        return vs is not None and destinations(vs) == {hb: 100}

    await eventually(recreated)

    async def old_service_gone() -> bool:
        return await revision_services(cluster, MESH) == {service(MESH, NEXT)}

    await eventually(old_service_gone)

    # A router field dropped from spec.rollout goes from the route too. Every field the route
    # still gets is on it already: only the applied hash shows that it is stale.
    await cluster.merge(f"{MD_PATH}/{MESH}", {"spec": {"rollout": {"router": {"gateways": None}}}})

    async def gateways_dropped() -> bool:
        vs = await cluster.get(f"{VS_PATH}/{MESH}")
        return vs is not None and "gateways" not in vs["spec"] and destinations(vs) == {hb: 100}

    await eventually(gateways_dropped)


async def taken_over_route_and_progress_deadline(cluster: Cluster, url: str) -> None:
    a, broken = revision(GOOD), revision(BROKEN)
    sa, sx = service(LATE, GOOD), service(LATE, BROKEN)
    # The user's route, with parents and hostnames trimtab must leave alone.
    await cluster.create(
        ROUTE_PATH,
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": USER_ROUTE, "namespace": NS},
            "spec": {
                "parentRefs": PARENTS,
                "hostnames": ["late.example.com"],
                "rules": [
                    {
                        "backendRefs": [{"name": "legacy", "port": 80}],
                        "filters": [KEEP_HEADER, DROP_REWRITE],
                    }
                ],
            },
        },
    )
    await cluster.create(MD_PATH, body_for(LATE, GOOD, LATE_ROLLOUT, url))
    await wait_rollout(cluster, LATE, lambda ro: ro.get("stableRevision") == a)

    async def taken_over() -> bool:
        route = await cluster.get(f"{ROUTE_PATH}/{USER_ROUTE}")
        return route is not None and backends(route) == {sa: 100}

    await eventually(taken_over)
    route = await http_route(cluster, USER_ROUTE)
    assert route["spec"]["parentRefs"] == PARENTS
    assert route["spec"]["hostnames"] == ["late.example.com"]
    # The user's route: never owned by (so never garbage-collected with) the ModelDeployment.
    assert "ownerReferences" not in route["metadata"]
    # The filter router.filters lists stays; the one it does not is named in a Warning.
    assert route["spec"]["rules"][0]["filters"] == [KEEP_HEADER]

    async def losses_reported() -> bool:
        return "RouteRulesReplaced" in await event_reasons(cluster, LATE)

    await eventually(losses_reported)
    events = await cluster.get(f"/api/v1/namespaces/{NS}/events") or {}
    (warning,) = [e for e in events["items"] if e.get("reason") == "RouteRulesReplaced"]
    assert warning["type"] == "Warning"
    assert "filter URLRewrite" in warning["message"]
    assert "RequestHeaderModifier" not in warning["message"]
    # A GitOps tool syncs the user's rules back: trimtab takes the rules again (the fight is
    # the user's to end), and does not repeat the same Warning at every loop.
    await cluster.merge(
        f"{ROUTE_PATH}/{USER_ROUTE}",
        {"spec": {"rules": [{"backendRefs": [{"name": "legacy", "port": 80}],
                             "filters": [KEEP_HEADER, DROP_REWRITE]}]}},
    )  # fmt: skip

    async def retaken() -> bool:
        route = await cluster.get(f"{ROUTE_PATH}/{USER_ROUTE}")
        rules = (route or {}).get("spec", {}).get("rules", [])
        return [r.get("filters") for r in rules] == [[KEEP_HEADER]]

    await eventually(retaken)
    assert (await event_reasons(cluster, LATE)).count("RouteRulesReplaced") == 1

    await cluster.merge(f"{MD_PATH}/{LATE}", {"spec": {"image": BROKEN}})
    await wait_rollout(cluster, LATE, lambda ro: ro.get("candidateRevision") == broken)
    route = await http_route(cluster, USER_ROUTE)
    assert backends(route) == {sa: 100, sx: 0}  # beside stable at 0% until ready
    assert route["spec"]["parentRefs"] == PARENTS

    rolled = await wait_rollout(cluster, LATE, lambda ro: ro.get("phase") == "RolledBack")
    assert rolled["stableRevision"] == a and rolled["failedRevision"] == broken
    assert not rolled.get("candidateRevision")
    assert "progressDeadline 2s" in rolled["reason"]
    body = await cluster.get(f"{MD_PATH}/{LATE}") or {}
    conds = {c["type"]: c for c in body["status"]["conditions"]}
    assert conds["RolledBack"]["status"] == "True"
    assert "not ready within progressDeadline" in conds["RolledBack"]["message"]

    async def event_posted() -> bool:  # kopf posts Events in the background
        return "RolledBack" in await event_reasons(cluster, LATE)

    await eventually(event_posted)
    route = await http_route(cluster, USER_ROUTE)
    assert backends(route) == {sa: 100}
    assert route["spec"]["hostnames"] == ["late.example.com"]

    async def candidate_gone() -> bool:
        listing = await cluster.get(DEPLOY_PATH) or {}
        revisions = {
            d["metadata"]["labels"].get(C.LABEL_REVISION)
            for d in listing.get("items", [])
            if d["metadata"]["labels"].get(C.LABEL_OWNER) == LATE
        }
        return revisions == {a} and await revision_services(cluster, LATE) == {sa}

    await eventually(candidate_gone)
    # Once the rules are trimtab's, later loops find nothing to report.
    assert (await event_reasons(cluster, LATE)).count("RouteRulesReplaced") == 1

    # spec.rollout removed: the user's route gets rules that send everything to the resource's
    # Service, its header still set; its parents and hostnames stay, and it is still not owned.
    await cluster.merge(f"{MD_PATH}/{LATE}", {"spec": {"rollout": None}})
    await eventually(
        lambda: released_to_shared_service(cluster, LATE, USER_ROUTE, filters=[KEEP_HEADER])
    )
    route = await http_route(cluster, USER_ROUTE)
    assert route["spec"]["parentRefs"] == PARENTS
    assert route["spec"]["hostnames"] == ["late.example.com"]
    assert "ownerReferences" not in route["metadata"]


async def istio_fallback_waits_for_the_rebuilt_revision(
    cluster: Cluster, scraped: Scraped, held: set[tuple[str, str]]
) -> None:
    a, b = revision(GOOD), revision(NEXT)
    ha, hb = fqdn(FALL, GOOD), fqdn(FALL, NEXT)
    # a must finish a (short) watch window to be known-good, the target of b's fallback.
    first = {**FALL_ROLLOUT, "postPromotion": {"watchWindow": "2s", "automaticFallback": True}}
    await cluster.create(MD_PATH, body_for(FALL, GOOD, first, scraped.prometheus.url))
    await wait_rollout(
        cluster, FALL, lambda ro: [k["revision"] for k in ro.get("knownGood", [])] == [a], 30
    )
    await cluster.merge(
        f"{MD_PATH}/{FALL}",
        {"spec": {"image": NEXT, "rollout": {"postPromotion": {"watchWindow": "10m"}}}},
    )
    await wait_rollout(
        cluster, FALL, lambda ro: ro.get("stableRevision") == b and ro.get("phase") == "Watching"
    )

    async def promoted_route() -> bool:
        vs = await cluster.get(f"{VS_PATH}/{FALL}")
        return vs is not None and destinations(vs) == {hb: 100}

    await eventually(promoted_route)
    # a was retired at promotion; when rebuilt, its pods will not be ready until released.
    held.add((FALL, a))
    scraped.exporters[(FALL, NEXT)].set_load(40.0, 0.05, error_ratio=0.3)
    fell = await wait_rollout(cluster, FALL, lambda ro: ro.get("phase") == "FellBack", 30)
    assert fell["stableRevision"] == a and fell["failedRevision"] == b
    # The rebuilt a exists but serves nothing yet: the route stays on b, b is not retired.
    for _ in range(8):  # several 1 s loops
        vs = await virtual_service(cluster, FALL)
        assert destinations(vs) == {hb: 100}
        await asyncio.sleep(0.5)
    # b keeps its Service; a's is there ahead, so it has endpoints when the route moves.
    assert await revision_services(cluster, FALL) == {service(FALL, NEXT), service(FALL, GOOD)}
    waiting = await rollout_of(cluster, FALL)
    assert f"{b} keeps serving until {a} has a ready replica" in waiting["reason"]

    held.discard((FALL, a))

    async def moved_to_a() -> bool:
        vs = await cluster.get(f"{VS_PATH}/{FALL}")
        return vs is not None and destinations(vs) == {ha: 100}

    await eventually(moved_to_a)
    await virtual_service(cluster, FALL)

    async def b_gone() -> bool:
        listing = await cluster.get(DEPLOY_PATH) or {}
        revisions = {
            d["metadata"]["labels"].get(C.LABEL_REVISION)
            for d in listing.get("items", [])
            if d["metadata"]["labels"].get(C.LABEL_OWNER) == FALL
        }
        return revisions == {a} and await revision_services(cluster, FALL) == {service(FALL, GOOD)}

    await eventually(b_gone)


async def test_mesh_routers_shadow_canary_promote_fallback_and_progress_deadline(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any, tmp_path: Path
) -> None:
    held: set[tuple[str, str]] = set()
    async with (
        scraped(tmp_path) as metrics,
        deployment_controller(cluster, held_back(held)),
        run_operator(),
    ):
        url = metrics.prometheus.url
        await asyncio.gather(
            gateway_api_shadow_then_canary(cluster, url),
            istio_shadow_then_canary(cluster, url, held),
            taken_over_route_and_progress_deadline(cluster, url),
            istio_fallback_waits_for_the_rebuilt_revision(cluster, metrics, held),
        )
