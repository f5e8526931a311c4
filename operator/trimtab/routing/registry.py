"""The explicit registry of traffic routers, keyed by `spec.rollout.router.type`. An unknown
type is an error, never a silent fallback to another router."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trimtab.api.rollout import (
    GatewayApiRouterSpec,
    IstioRouterSpec,
    ReplicasRouterSpec,
)
from trimtab.routing.base import RouterClient, RouteTarget, TrafficRouter
from trimtab.routing.gateway_api import GatewayApiRouter
from trimtab.routing.istio import IstioRouter
from trimtab.routing.replicas import ReplicaRouter

RouterSpec = GatewayApiRouterSpec | IstioRouterSpec | ReplicasRouterSpec
RouterFactory = Callable[[Any, RouteTarget, RouterClient], TrafficRouter]

ROUTERS: dict[str, RouterFactory] = {
    "gatewayApi": GatewayApiRouter,
    "istio": IstioRouter,
    "replicas": ReplicaRouter,
}


class UnknownRouterError(LookupError):
    pass


def build_router(spec: RouterSpec, target: RouteTarget, client: RouterClient) -> TrafficRouter:
    factory = ROUTERS.get(spec.type)
    if factory is None:
        raise UnknownRouterError(f"unknown router type {spec.type!r}; known: {sorted(ROUTERS)}")
    return factory(spec, target, client)
