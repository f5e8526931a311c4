"""Istio router: weighted destinations, `mirror` and `mirrorPercentage` in a VirtualService."""

from __future__ import annotations

from trimtab.api.rollout import IstioRouterSpec
from trimtab.builders.routing import (
    Split,
    build_virtual_service,
    weights_from_virtual_service,
)
from trimtab.decisions.routing import RouteHealth, virtual_service_health
from trimtab.routing.base import Json, RouterClient, RouteTarget
from trimtab.routing.mesh import MeshRouter


class IstioRouter(MeshRouter):
    def __init__(self, spec: IstioRouterSpec, target: RouteTarget, client: RouterClient):
        super().__init__(target, client)
        self.spec = spec

    def build_route(self, split: Split) -> Json:
        return build_virtual_service(self.target.owner, self.spec, split)

    def read_route(self, route: Json) -> tuple[dict[str, int], int]:
        return weights_from_virtual_service(route)

    def read_health(self, route: Json) -> RouteHealth:
        return virtual_service_health(route)
