"""The TrafficRouter protocol (after Flagger's pkg/router `SetRoutes`), what a router is
built for (RouteTarget), and the narrow cluster interface routers write through.

Routers never hold state of their own: the weights they are built with come from status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from trimtab.api.rollout import Weights
from trimtab.builders.common import Owner
from trimtab.decisions.routing import RouteHealth

Json = dict[str, Any]


class RouterClient(Protocol):
    """The calls routers make; the handler adapts trimtab.kube's client to it, so routing
    depends on no HTTP code and tests can pass a fake."""

    async def apply(self, manifest: Json) -> Json: ...

    async def get_object(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> Json | None: ...

    async def delete_object(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> bool: ...

    async def scale(self, kind: str, namespace: str, name: str, replicas: int) -> None: ...


class CannotMirror(ValueError):
    """The router has no way to copy traffic (the replica-ratio router)."""


@dataclass(frozen=True)
class RouteTarget:
    """One ModelDeployment's revisions as the router should see them this loop."""

    owner: Owner
    port: int
    stable_revision: str
    candidate_revision: str | None
    weights: Weights
    # Capacity the autoscaler (or spec.replicas) chose for both revisions together.
    total_replicas: int = 1


@runtime_checkable
class TrafficRouter(Protocol):
    """Writes the objects that split traffic. Every method is idempotent."""

    # True when weights are exact (a mesh); False when approximated by replica counts.
    exact_weights: bool

    async def reconcile(self) -> None:
        """Create or update what routing needs (per-revision Services, the route) at the
        target's current weights."""

    async def set_weights(self, stable: int, candidate: int, mirror_percent: int) -> Weights | None:
        """Send `candidate` percent to the candidate and mirror `mirror_percent` to it. Returns
        the split the routing object the cluster stored carries (a field its schema does not
        know is left out), or None where there is no such object."""

    async def get_weights(self) -> Weights | None:
        """The split the cluster applies now; None when the routing object is missing."""

    async def finalize(self) -> None:
        """Remove what only the rollout needed (the candidate's Service), leaving the stable
        revision reachable."""

    def health(self) -> RouteHealth | None:
        """What the route's controller reported on the route as this router last wrote it
        (the write's answer, no extra read); None before a write, or where there is no
        routing object (the replica router)."""
