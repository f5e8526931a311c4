"""What the Gateway API and Istio routers share: per-revision Services and a route object
rebuilt from the target at every write, so a restarted operator converges from status alone."""

from __future__ import annotations

from dataclasses import replace

from trimtab import constants as C
from trimtab.api.rollout import GatewayApiRouterSpec, IstioRouterSpec, Weights
from trimtab.builders.common import Owner, is_applied, with_applied_hash
from trimtab.builders.routing import (
    RouteRef,
    Split,
    build_released_route,
    build_revision_service,
    revision_service_name,
    route_of,
)
from trimtab.decisions.routing import RouteHealth
from trimtab.routing.base import Json, RouterClient, RouteTarget


class MeshRouter:
    """Base of the routers whose weights are exact. Subclasses build and read the route."""

    exact_weights = True

    def __init__(self, target: RouteTarget, client: RouterClient) -> None:
        self.target = target
        self.client = client
        self.stored: Json | None = None  # the route as the last write returned it

    # --- to implement ---------------------------------------------------------------------
    def build_route(self, split: Split) -> Json:
        raise NotImplementedError

    def read_route(self, route: Json) -> tuple[dict[str, int], int]:
        raise NotImplementedError

    def read_health(self, route: Json) -> RouteHealth:
        raise NotImplementedError

    def route_owned(self) -> bool:
        return True

    # --- shared ---------------------------------------------------------------------------
    def _split(self, weights: Weights) -> Split:
        t = self.target
        return Split(
            stable_revision=t.stable_revision,
            candidate_revision=t.candidate_revision,
            port=t.port,
            stable_weight=weights.stable,
            candidate_weight=weights.candidate,
            mirror_percent=weights.mirror_percent,
        )

    async def _apply_services(self) -> None:
        t = self.target
        for revision in (t.stable_revision, t.candidate_revision):
            if revision is not None:
                await self.client.apply(build_revision_service(t.owner, revision, t.port))

    async def reconcile(self) -> None:
        await self._apply_services()
        self.stored = await self.client.apply(self.build_route(self._split(self.target.weights)))

    async def set_weights(self, stable: int, candidate: int, mirror_percent: int) -> Weights | None:
        weights = Weights(stable=stable, candidate=candidate, mirror_percent=mirror_percent)
        # Services first: a route pointing at a Service that does not exist yet drops traffic.
        await self._apply_services()
        self.stored = await self.client.apply(self.build_route(self._split(weights)))
        self.target = replace(self.target, weights=weights)
        return self._weights_of(self.stored)

    def health(self) -> RouteHealth | None:
        return None if self.stored is None else self.read_health(self.stored)

    async def get_weights(self) -> Weights | None:
        route = self.build_route(self._split(self.target.weights))
        meta = route["metadata"]
        current = await self.client.get_object(
            route["apiVersion"], route["kind"], meta["namespace"], meta["name"]
        )
        return None if current is None else self._weights_of(current)

    def _weights_of(self, current: Json) -> Weights:
        """The split a stored route carries, for this target's two revisions."""
        by_service, mirror = self.read_route(current)
        t = self.target
        stable = by_service.get(revision_service_name(t.owner.name, t.stable_revision), 0)
        candidate = (
            by_service.get(revision_service_name(t.owner.name, t.candidate_revision), 0)
            if t.candidate_revision
            else 0
        )
        total = stable + candidate
        if total == 0:
            return Weights(stable=0, candidate=0, mirror_percent=mirror)
        cand_pct = round(100 * candidate / total)
        return Weights(stable=100 - cand_pct, candidate=cand_pct, mirror_percent=mirror)

    async def finalize(self) -> None:
        """All traffic to stable, then the candidate's Service goes."""
        t = self.target
        self.stored = await self.client.apply(
            self.build_route(
                Split(t.stable_revision, None, t.port, stable_weight=100, candidate_weight=0)
            )
        )
        if t.candidate_revision is not None:
            await self.client.delete_object(
                "v1",
                "Service",
                t.owner.namespace,
                revision_service_name(t.owner.name, t.candidate_revision),
            )
        self.target = replace(self.target, candidate_revision=None, weights=Weights())


async def release_route(
    owner: Owner,
    router: GatewayApiRouterSpec | IstioRouterSpec,
    port: int,
    client: RouterClient,
) -> RouteRef | None:
    """Point the route `router` wrote at the Service named after the resource (see
    build_released_route), once spec.rollout stops routing through it. A route that is gone
    is left gone, and one without trimtab's `trimtab.io/applied` mark is left as it is: trimtab
    never wrote it (or it was replaced whole since), so its rules are not trimtab's to hand
    back. Returns the route released, or None (also for one released already)."""
    ref = route_of(owner, router)
    if ref is None:
        return None
    current = await client.get_object(ref.api_version, ref.kind, owner.namespace, ref.name)
    if current is None:
        return None
    if C.ANNOTATION_APPLIED not in ((current.get("metadata") or {}).get("annotations") or {}):
        return None
    released = build_released_route(owner, router, port)
    if is_applied(with_applied_hash(released), current):
        return None  # released already
    await client.apply(released)
    return ref
