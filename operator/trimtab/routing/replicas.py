"""No-mesh router: the one Service selects every revision's pods, so traffic follows the
ratio of ready replicas. Weights are approximate, and copies (mirroring) are impossible."""

from __future__ import annotations

from dataclasses import replace

from trimtab.api.rollout import ReplicasRouterSpec, Weights
from trimtab.builders.serving import deployment_name
from trimtab.decisions.rollout import effective_weights, split_replicas
from trimtab.decisions.routing import RouteHealth
from trimtab.routing.base import CannotMirror, RouterClient, RouteTarget


class ReplicaRouter:
    exact_weights = False

    def __init__(self, spec: ReplicasRouterSpec, target: RouteTarget, client: RouterClient):
        self.spec = spec
        self.target = target
        self.client = client

    def replicas_for(self, weights: Weights) -> tuple[int, int]:
        t = self.target
        return split_replicas(
            t.total_replicas,
            weights,
            exact_weights=False,
            in_rollout=t.candidate_revision is not None,
        )

    async def _scale(self, weights: Weights) -> None:
        t = self.target
        stable_n, cand_n = self.replicas_for(weights)
        ns = t.owner.namespace
        await self.client.scale(
            "Deployment", ns, deployment_name(t.owner.name, t.stable_revision), stable_n
        )
        if t.candidate_revision is not None:
            await self.client.scale(
                "Deployment", ns, deployment_name(t.owner.name, t.candidate_revision), cand_n
            )

    async def reconcile(self) -> None:
        await self._scale(self.target.weights)

    async def set_weights(self, stable: int, candidate: int, mirror_percent: int) -> Weights | None:
        if mirror_percent:
            raise CannotMirror(
                "router replicas cannot mirror traffic: it splits by replica count behind one "
                "Service; use router gatewayApi or istio for shadow traffic"
            )
        weights = Weights(stable=stable, candidate=candidate)
        await self._scale(weights)
        self.target = replace(self.target, weights=weights)
        return None  # no routing object: the replica counts are the split

    async def get_weights(self) -> Weights | None:
        t = self.target
        ns = t.owner.namespace
        stable = await self.client.get_object(
            "apps/v1", "Deployment", ns, deployment_name(t.owner.name, t.stable_revision)
        )
        if stable is None:
            return None
        ready_s = int(stable.get("status", {}).get("readyReplicas") or 0)
        ready_c = 0
        if t.candidate_revision is not None:
            cand = await self.client.get_object(
                "apps/v1", "Deployment", ns, deployment_name(t.owner.name, t.candidate_revision)
            )
            ready_c = int((cand or {}).get("status", {}).get("readyReplicas") or 0)
        return effective_weights(ready_s, ready_c)

    async def finalize(self) -> None:
        """The candidate's replicas go to zero; the stable one gets the whole capacity."""
        t = self.target
        if t.candidate_revision is not None:
            await self.client.scale(
                "Deployment",
                t.owner.namespace,
                deployment_name(t.owner.name, t.candidate_revision),
                0,
            )
        self.target = replace(self.target, candidate_revision=None, weights=Weights())
        await self._scale(Weights())

    def health(self) -> RouteHealth | None:
        return None  # no routing object: the one Service always routes
