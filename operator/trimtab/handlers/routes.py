"""The routes a ModelDeployment's mesh router writes (an HTTPRoute or a VirtualService): the
client the routers write through, the lock their writers share, and handing a route back once
spec.rollout stops naming it.

Which route trimtab routes through is recorded in status.route each time the rollout loop
writes it, with the router that wrote it. Handing a route back follows that record, not the
spec change that kopf reports: kopf can take a change that lands while a create's handlers
finish for handled without firing anything (kopf issue 1178), and a change made while the
operator is down arrives only as the spec it led to. The reconcile (on every spec change, at
start-up, and from the timer that finds a generation no reconcile took up) and every rollout
loop compare the record with the spec and release a route the spec no longer names, so the
route never keeps pointing at per-revision Services that are about to go."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import kopf
from pydantic import ValidationError

from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.rollout import GatewayApiRouterSpec, IstioRouterSpec
from trimtab.builders.common import Owner, merge_patch, owner_labels
from trimtab.builders.routing import ROUTE_KINDS, ROUTER, route_of, route_still_named
from trimtab.builders.serving import serving_ports
from trimtab.decisions.routing import RouteHealth
from trimtab.kube.client import KubeClient, KubeError, NameTaken
from trimtab.kube.resources import MODELDEPLOYMENTS, SERVICES, for_manifest
from trimtab.routing.base import Json
from trimtab.routing.mesh import release_route

Log = logging.Logger | logging.LoggerAdapter[Any]


def route_lock(memo: Any) -> asyncio.Lock:
    """The lock one ModelDeployment's route writers share (kopf gives each resource its own
    memo): a loop that read spec.rollout before it changed finishes before a route the change
    releases is rewritten, so the loop never writes it back."""
    lock: asyncio.Lock | None = getattr(memo, "route_lock", None)
    if lock is None:
        lock = memo.route_lock = asyncio.Lock()
    return lock


class KubeRouterClient:
    """trimtab.kube's client as the RouterClient the routers write through. `route_read`, if
    given, sees each route as read before it is applied over (the takeover check);
    `route_written` each route as applied and as the API server stored it. `applied` lists
    the routes applied through this client, in order."""

    def __init__(
        self,
        kube: KubeClient,
        route_read: Callable[[Json | None], None] | None = None,
        route_written: Callable[[Json, Json], None] | None = None,
    ) -> None:
        self.kube = kube
        self.route_read = route_read
        self.route_written = route_written
        self.applied: list[Json] = []
        # The route apply that failed last, and how: see route_refusal.
        self.refused: tuple[Json, KubeError] | None = None

    async def apply(self, manifest: Json) -> Json:
        # The route spec.rollout.router names is the user's request to write it: one without a
        # controller is adopted, one another resource controls is still refused. The per-revision
        # Services are named by trimtab and adopted only when labelled for this resource.
        route = manifest.get("kind") in ROUTE_KINDS
        # A rule field the cluster's route CRD does not declare is left out rather than
        # failing the whole route; route_written sees what was stored and reports it.
        try:
            stored = await self.kube.apply(
                manifest,
                adopt=route,
                before_write=self.route_read if route else None,
                drop_undeclared=route,
            )
        except KubeError as err:
            if route:
                self.refused = (manifest, err)
            raise
        if route:
            self.applied.append(manifest)
            if self.route_written is not None:
                self.route_written(manifest, stored)
        return stored

    async def get_object(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> Json | None:
        res = for_manifest({"apiVersion": api_version, "kind": kind})
        return await self.kube.get(res, namespace, name)

    async def delete_object(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        res = for_manifest({"apiVersion": api_version, "kind": kind})
        return await self.kube.delete(res, namespace, name)

    async def scale(self, kind: str, namespace: str, name: str, replicas: int) -> None:
        res = for_manifest({"apiVersion": "apps/v1", "kind": kind})
        await self.kube.scale(res, namespace, name, replicas)


# What serves each route kind, for a cluster that does not.
ROUTE_API_NEEDED = {
    "HTTPRoute": "Gateway API's HTTPRoute CRD (gateway.networking.k8s.io/v1)",
    "VirtualService": "Istio 1.22 or later (networking.istio.io/v1)",
}


def route_refusal(client: KubeRouterClient, err: Exception) -> RouteHealth | None:
    """What to say in `RouteAccepted` when `err` is the API server refusing the route the
    client last applied for good (None: not a route's refusal, or one worth trying again as it
    is): its API not served (an apply that would create the route is answered 404 only when
    the kind or the namespace is missing), another resource's route of that name, or a route
    the API server refuses as written."""
    if client.refused is None or client.refused[1] is not err or not isinstance(err, KubeError):
        return None
    manifest = client.refused[0]
    kind = str(manifest.get("kind"))
    what = f"{kind} {manifest['metadata']['name']}"
    if isinstance(err, NameTaken):
        return RouteHealth("False", "RouteNameTaken", f"{what} was not written: {err.message}")
    if err.not_found:
        return RouteHealth(
            "False",
            "RouteAPINotServed",
            f"{what} was not written: this cluster does not serve {kind} "
            f"{manifest.get('apiVersion')} ({err.message}); install "
            f"{ROUTE_API_NEEDED.get(kind, 'its CRD')}, or use spec.rollout.router.type "
            "replicas",
        )
    if err.rejected:
        return RouteHealth(
            "False", "RouteRejected", f"the API server refused {what}: {err.message}"
        )
    return None


async def delete_revision_services(kube: KubeClient, owner: Owner, keep: frozenset[str]) -> None:
    """Delete the owner's per-revision Services (a mesh router's) but those of `keep`."""
    for svc in await kube.list(SERVICES, owner.namespace, owner_labels(owner)):
        revision = (svc["metadata"].get("labels") or {}).get(C.LABEL_REVISION)
        if revision and revision not in keep:
            await kube.delete(SERVICES, owner.namespace, svc["metadata"]["name"])


async def record_route(kube: KubeClient, body: Json, record: Json) -> None:
    """Write `record` to status.route unless `body` (a fresh read) holds it already; the
    record is replaced whole, so no field of an earlier router stays in it."""
    current = (body.get("status") or {}).get("route") or {}
    patch = merge_patch(current, record, remove_missing=True)
    if not patch:
        return
    meta = body["metadata"]
    await kube.patch_status(MODELDEPLOYMENTS, meta["namespace"], meta["name"], {"route": patch})


async def release_stale_route(
    kube: KubeClient,
    body: Json,
    owner: Owner,
    spec: ModelDeploymentSpec,
    logger: Log,
    unrecorded: Json | None = None,
) -> bool:
    """Hand back the route status.route records once `spec` (the spec of `body`, a fresh read)
    no longer routes through it, and so the route `unrecorded` names (one an earlier trimtab
    wrote without recording it, from the spec kopf last handled): its rules send everything to
    the Service named after the resource (see build_released_route), and without a mesh router
    left the per-revision Services go. The record is then cleared. True when a route was dealt
    with so (the caller's read of status may be stale), False when the spec names them all.

    A route that is gone stays gone; one another resource has taken since, or that carries no
    mark of trimtab's, is left to its owner. A route the API server refuses as the old router
    leaves it (Warning RouteNotReleased), or one recorded with a router this operator cannot
    read, is left as it is, and so are the per-revision Services it may still send traffic to.
    The caller holds route_lock."""
    recorded = (body.get("status") or {}).get("route")
    router_now = spec.rollout.router if spec.rollout is not None else None
    stale: list[Json] = []
    for record in (recorded, unrecorded):
        if (
            isinstance(record, dict)
            and not route_still_named(owner, record, router_now)
            and all(_named(record) != _named(other) for other in stale)
        ):
            stale.append(record)
    if not stale:
        return False
    routes_left_on_services = False
    for record in stale:
        if not await _release_one(kube, body, owner, spec, record, logger):
            routes_left_on_services = True
    if not routes_left_on_services and route_of(owner, router_now) is None:
        await delete_revision_services(kube, owner, frozenset())
    if any(r is recorded for r in stale):
        await kube.patch_status(MODELDEPLOYMENTS, owner.namespace, owner.name, {"route": None})
    return True


def _named(record: Json) -> tuple[Any, Any]:
    return record.get("kind"), record.get("name")


async def _release_one(
    kube: KubeClient,
    body: Json,
    owner: Owner,
    spec: ModelDeploymentSpec,
    record: Json,
    logger: Log,
) -> bool:
    """Release the route `record` names (see release_stale_route); False when it was left
    as it is, possibly still sending traffic to the per-revision Services."""
    what = f"{record.get('kind')} {record.get('name')}"
    try:
        router = ROUTER.validate_python(record.get("router") or {})
    except ValidationError as err:
        logger.warning(
            "status.route names %s with a router this operator cannot read (%s): the route "
            "is left as it is", what, err.errors()[0].get("msg"),
        )  # fmt: skip
        return False
    if not isinstance(router, GatewayApiRouterSpec | IstioRouterSpec):
        return True
    try:
        released = await release_route(
            owner, router, serving_ports(spec)[0], KubeRouterClient(kube)
        )
    except NameTaken as err:
        logger.info("route not released: %s", err.message)
        return True
    except KubeError as err:
        if not err.rejected:
            raise  # the API server could not answer: tried again, the record kept
        # The API server refuses the route as the old router leaves it (its CRD changed
        # since): nothing better can be written, and the resource's own reconcile goes on.
        message = (
            f"{what} was not handed back: the API server refused the route as spec.rollout "
            f"left it ({err.message}); point it at Service {owner.name} or delete it (the "
            "per-revision Services it may send traffic to stay until then)"
        )
        logger.warning(message)
        kopf.warn(cast(kopf.Body, body), reason="RouteNotReleased", message=message)
        return False
    if released is not None:
        message = (
            f"{released.kind} {released.name} sends all traffic to Service {owner.name}: "
            "spec.rollout no longer routes through it"
        )
        logger.info(message)
        kopf.event(cast(kopf.Body, body), type="Normal", reason="RouteReleased", message=message)
    return True
