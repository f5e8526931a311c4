"""Gateway API router: weighted backendRefs and a RequestMirror filter in an HTTPRoute."""

from __future__ import annotations

from trimtab.api.rollout import GatewayApiRouterSpec
from trimtab.builders.routing import (
    Split,
    build_http_route,
    weights_from_http_route,
)
from trimtab.decisions.routing import RouteHealth, http_route_health
from trimtab.routing.base import Json, RouterClient, RouteTarget
from trimtab.routing.mesh import MeshRouter


class GatewayApiRouter(MeshRouter):
    def __init__(self, spec: GatewayApiRouterSpec, target: RouteTarget, client: RouterClient):
        super().__init__(target, client)
        self.spec = spec

    def build_route(self, split: Split) -> Json:
        return build_http_route(self.target.owner, self.spec, split)

    def read_route(self, route: Json) -> tuple[dict[str, int], int]:
        return weights_from_http_route(route, self.target.owner.name)

    def read_health(self, route: Json) -> RouteHealth:
        return http_route_health(route)
