"""Every Kubernetes resource trimtab reads or writes, and the verbs it uses on each.

The client refuses a call that is not listed here, so this table is also the operator's RBAC:
the Helm chart's ClusterRole is tested against it. `watch` is listed only where kopf watches
the kind (trimtab's own resources, and the Deployments, Services and Jobs it makes); `create`
wherever trimtab applies an object, since server-side apply creates one that is missing."""

from __future__ import annotations

from dataclasses import dataclass

from trimtab import constants as C


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core API
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    verbs: frozenset[str] = frozenset()
    subresources: frozenset[str] = frozenset()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, sub: str | None = None
    ) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


def _verbs(*names: str) -> frozenset[str]:
    return frozenset(names)


MODELDEPLOYMENTS = Resource(
    C.GROUP,
    C.VERSION,
    C.MODELDEPLOYMENT_PLURAL,
    C.MODELDEPLOYMENT_KIND,
    verbs=_verbs("get", "list", "watch", "patch"),
    subresources=frozenset({"status", "finalizers"}),
)
TRAININGJOBS = Resource(
    C.GROUP,
    C.VERSION,
    C.TRAININGJOB_PLURAL,
    C.TRAININGJOB_KIND,
    verbs=_verbs("get", "list", "watch", "patch"),
    subresources=frozenset({"status", "finalizers"}),
)
DEPLOYMENTS = Resource(
    "apps",
    "v1",
    "deployments",
    "Deployment",
    verbs=_verbs("get", "list", "watch", "create", "patch", "delete"),
    subresources=frozenset({"scale"}),
)
SERVICES = Resource(
    "",
    "v1",
    "services",
    "Service",
    verbs=_verbs("get", "list", "watch", "create", "patch", "delete"),
)
JOBS = Resource(
    "batch", "v1", "jobs", "Job", verbs=_verbs("get", "list", "watch", "create", "patch", "delete")
)
# Pods are listed, and resized in place through their resize subresource (rightsizing.inPlace).
PODS = Resource(
    "",
    "v1",
    "pods",
    "Pod",
    verbs=_verbs("list"),
    subresources=frozenset({"resize"}),
)
PODDISRUPTIONBUDGETS = Resource(
    "policy",
    "v1",
    "poddisruptionbudgets",
    "PodDisruptionBudget",
    verbs=_verbs("get", "list", "create", "patch", "delete"),
)
HTTPROUTES = Resource(
    "gateway.networking.k8s.io",
    "v1",
    "httproutes",
    "HTTPRoute",
    verbs=_verbs("get", "create", "patch", "delete"),
)
VIRTUALSERVICES = Resource(
    "networking.istio.io",
    "v1",
    "virtualservices",
    "VirtualService",
    verbs=_verbs("get", "create", "patch", "delete"),
)
PODGROUPS = Resource(
    "scheduling.x-k8s.io",
    "v1alpha1",
    "podgroups",
    "PodGroup",
    verbs=_verbs("get", "list", "create", "patch", "delete"),
)

# kopf's peering objects: trimtab creates the one its replicas share (kopf only lists, watches
# and patches it), so that two replicas never both act.
CLUSTERKOPFPEERINGS = Resource(
    "kopf.dev",
    "v1",
    "clusterkopfpeerings",
    "ClusterKopfPeering",
    namespaced=False,
    verbs=_verbs("create"),
)
KOPFPEERINGS = Resource(
    "kopf.dev",
    "v1",
    "kopfpeerings",
    "KopfPeering",
    verbs=_verbs("create"),
)

REGISTRY: tuple[Resource, ...] = (
    MODELDEPLOYMENTS,
    TRAININGJOBS,
    DEPLOYMENTS,
    SERVICES,
    JOBS,
    PODS,
    PODDISRUPTIONBUDGETS,
    HTTPROUTES,
    VIRTUALSERVICES,
    PODGROUPS,
    CLUSTERKOPFPEERINGS,
    KOPFPEERINGS,
)


def for_manifest(manifest: dict[str, object]) -> Resource:
    """The registered resource of a manifest, by apiVersion and kind."""
    api_version, kind = manifest.get("apiVersion"), manifest.get("kind")
    for res in REGISTRY:
        if res.api_version == api_version and res.kind == kind:
            return res
    raise LookupError(f"trimtab does not manage {kind} ({api_version})")


# Granted only when peering is on, beside what kopf needs on the same objects.
PEERING = (CLUSTERKOPFPEERINGS, KOPFPEERINGS)


# `finalizers` is never called: the API server checks `update` on it when trimtab creates an
# object whose ownerReference has blockOwnerDeletion (the OwnerReferencesPermissionEnforcement
# admission plugin, on in OpenShift); without it every create there is refused.
SUBRESOURCE_VERBS = {
    "status": ["patch"],
    "scale": ["patch"],
    "finalizers": ["update"],
    "resize": ["patch"],
}


def rbac_rules() -> list[dict[str, list[str]]]:
    """The ClusterRole rules these resources need, one rule per resource (subresources apart);
    the peering objects are left to the chart's peering rules."""
    rules: list[dict[str, list[str]]] = []
    for res in REGISTRY:
        if res in PEERING:
            continue
        rules.append(
            {"apiGroups": [res.group], "resources": [res.plural], "verbs": sorted(res.verbs)}
        )
        for sub in sorted(res.subresources):
            sub_verbs = SUBRESOURCE_VERBS[sub]
            rules.append(
                {"apiGroups": [res.group], "resources": [f"{res.plural}/{sub}"], "verbs": sub_verbs}
            )
    return rules
