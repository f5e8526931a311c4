"""The ModelDeployment custom resource: a model server that trimtab sizes, scales and rolls out.

`ModelDeploymentSpec.model_fields_for_revision` names the part of the spec whose change
is a new revision."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, StringConstraints

from trimtab import constants as C
from trimtab.api.autoscaling import AutoscalingSpec, AutoscalingStatus, MetricsSpec, SLOSpec
from trimtab.api.common import (
    QUALIFIED_NAME,
    Condition,
    EnvVar,
    LabelValue,
    PodMetadataBase,
    ReservedKeys,
    Resources,
    StatusModel,
    StrictModel,
    Toleration,
    Volume,
    VolumeMount,
    pod_metadata_rules,
)
from trimtab.api.rightsizing import RecommendationsStatus, ServingRightsizingSpec
from trimtab.api.rollout import RolloutSpec, RolloutStatus, RouteRecord
from trimtab.api.servers import ServerPreset


class Probes(StrictModel):
    """Overrides for the preset's health checks. Model servers load weights for minutes, so a
    startup probe guards liveness until the first success."""

    readiness_path: str | None = Field(default=None, pattern=r"^/")
    liveness_path: str | None = Field(default=None, pattern=r"^/")
    startup_timeout_seconds: int = Field(
        default=900, ge=10, le=7200, description="How long a replica may take to load its model."
    )


# Pod labels trimtab's selectors rest on, and pod annotations it writes itself.
SERVING_POD_KEYS = ReservedKeys(
    labels=(C.LABEL_MANAGED_BY, C.LABEL_NAME),
    label_prefixes=(f"{C.GROUP}/",),
    labels_why="trimtab's (its selectors rest on them)",
    annotation_prefixes=(f"{C.GROUP}/", "prometheus.io/"),
    annotations_why="written by trimtab (the scrape annotations from the server's metrics port "
    "and path)",
)


class PodMetadata(PodMetadataBase):
    """Labels and annotations the server's pods carry besides trimtab's own: a team or cost
    label, an agent's annotation (log shipping, secrets injection, a sidecar's settings)."""

    reserved: ClassVar[ReservedKeys] = SERVING_POD_KEYS
    model_config = ConfigDict(json_schema_extra=pod_metadata_rules(SERVING_POD_KEYS))


class TopologySpread(StrictModel):
    """Spread the model's replicas over the values of a node label: nodes
    (`kubernetes.io/hostname`) or zones (`topology.kubernetes.io/zone`), so that one node or
    zone going down takes only its share of them."""

    topology_key: str = Field(
        min_length=1,
        max_length=317,
        pattern=QUALIFIED_NAME,
        description="The node label whose values replicas spread over.",
    )
    max_skew: int = Field(
        default=1, ge=1, le=100, description="Most replicas one value may have over another."
    )
    when_unsatisfiable: Literal["ScheduleAnyway", "DoNotSchedule"] = Field(
        default="ScheduleAnyway",
        description="ScheduleAnyway: a preference (a replica still starts where GPUs are free); "
        "DoNotSchedule: a rule (it stays pending instead).",
    )


class DisruptionBudgetSpec(StrictModel):
    """How many of the model's pods a voluntary disruption (a node drain, a cluster upgrade,
    the cluster autoscaler removing a node) may take at once: a PodDisruptionBudget over every
    revision's pods. Pods that are not ready can always be evicted, so a crashing replica never
    blocks a drain."""

    enabled: bool = Field(default=True, description="Write the PodDisruptionBudget.")
    max_unavailable: int = Field(
        default=1,
        ge=1,
        le=1000,
        description="Pods an eviction may leave unavailable at once. With one replica the "
        "eviction is allowed (a drain is never blocked for good).",
    )


class ModelDeploymentSpec(StrictModel):
    """What to serve and on what. Fields marked "model" define a revision."""

    # The part of the spec that defines what runs in the pod; a change to any of these is a
    # new revision. Replicas and policy fields (autoscaling, rollout) are not.
    model_fields_for_revision: ClassVar[tuple[str, ...]] = (
        "server",
        "image",
        "command",
        "args",
        "env",
        "port",
        "metrics_port",
        "metrics_path",
        "probes",
        "resources",
        "node_selector",
        "tolerations",
        "service_account_name",
        "volumes",
        "volume_mounts",
        "priority_class_name",
        "topology_spread",
        "pod_metadata",
    )

    server: ServerPreset = Field(
        default="generic",
        description="Model server preset: ports, probes and the metrics trimtab reads.",
    )
    image: str = Field(
        min_length=1, max_length=512, pattern=r"^[^\s]+$", description="(model) Container image."
    )
    command: list[Annotated[str, StringConstraints(max_length=4096)]] | None = Field(
        default=None, max_length=64, description="(model) Overrides the image entrypoint."
    )
    args: list[Annotated[str, StringConstraints(max_length=4096)]] = Field(
        default_factory=list, max_length=256, description="(model) Arguments to the server."
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=256,
        description="(model) Environment variables.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    port: int | None = Field(
        default=None, ge=1, le=65535, description="(model) Serving port; defaults from the preset."
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="(model) Metrics port; defaults from the preset."
    )
    metrics_path: str | None = Field(
        default=None, pattern=r"^/", description="(model) Metrics path."
    )
    probes: Probes = Field(default_factory=Probes, description="(model) Health check overrides.")
    resources: Resources = Field(
        default_factory=Resources, description="(model) Per-replica resources."
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict, max_length=64, description="(model) Node labels."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="(model) Tolerations."
    )
    service_account_name: str | None = Field(
        default=None, description="(model) Pod service account."
    )
    priority_class_name: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        max_length=253,
        description="(model) PriorityClass of the pods: serving above batch and training, so "
        "the scheduler preempts those for a replica rather than leave it pending.",
    )
    pod_metadata: PodMetadata = Field(
        default_factory=PodMetadata,
        description="(model) Extra labels and annotations of the server's pods.",
    )
    topology_spread: list[TopologySpread] = Field(
        default_factory=list,
        max_length=8,
        description="(model) Spread replicas over nodes or zones (topology spread constraints "
        "over every revision's pods).",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["topologyKey"],
        },
    )
    volumes: list[Volume] = Field(
        default_factory=list,
        max_length=32,
        description="(model) Pod volumes: model weights on a claim, a config, a secret.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list,
        max_length=32,
        description="(model) Where the server's container mounts spec.volumes.",
    )
    replicas: int = Field(default=1, ge=0, le=1000, description="Replicas when autoscaling is off.")
    rightsizing: ServingRightsizingSpec = Field(
        default_factory=ServingRightsizingSpec,
        description="Right-sizing of CPU, memory and GPU from usage (policy, not a revision).",
    )
    disruption_budget: DisruptionBudgetSpec = Field(
        default_factory=DisruptionBudgetSpec,
        description="Limit on pods evicted at once by drains and upgrades (policy).",
    )
    slo: SLOSpec | None = Field(
        default=None, description="Service-level objective the autoscaler keeps (policy)."
    )
    autoscaling: AutoscalingSpec | None = Field(
        default=None, description="Scaling from SLO signals; needs slo (policy)."
    )
    metrics: MetricsSpec | None = Field(
        default=None, description="Where the SLO signals come from (policy)."
    )
    rollout: RolloutSpec | None = Field(
        default=None,
        description="Progressive delivery of new revisions; unset: a new revision replaces "
        "the old one once ready (policy).",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.server != 'vllm' || !has(self.metricsPort) || !has(self.port) "
                    "|| self.metricsPort == self.port",
                    "message": "vllm serves metrics on its API port: metricsPort must equal port",
                    "fieldPath": ".metricsPort",
                },
                {
                    "rule": "!has(self.volumeMounts) || self.volumeMounts.all(m, "
                    "has(self.volumes) && self.volumes.exists(v, v.name == m.name))",
                    "message": "volumeMounts names a volume that is not in volumes",
                    "fieldPath": ".volumeMounts",
                },
                {
                    "rule": "!has(self.autoscaling) || !self.autoscaling.enabled || has(self.slo)",
                    "message": "autoscaling needs slo: trimtab scales to keep the SLO",
                    "fieldPath": ".autoscaling",
                },
                {
                    # At zero no model server runs, so only a query on the gateway's metrics
                    # sees the requests that should wake it.
                    "rule": "!has(self.autoscaling) || !has(self.autoscaling.scaleToZero) || "
                    "(has(self.metrics) && has(self.metrics.queries) && "
                    "(has(self.metrics.queries.arrivalRate) || "
                    "has(self.metrics.queries.queueDepth)))",
                    "message": "scaleToZero needs metrics.queries.arrivalRate or queueDepth on "
                    "the gateway's or ingress' metrics: at 0 replicas the model server's own "
                    "series are gone, and nothing else would wake it",
                    "fieldPath": ".autoscaling.scaleToZero",
                },
            ]
        }
    )

    def model_part(self) -> dict[str, Any]:
        """The revision-defining fields as they are on the wire, defaults left out: a field
        added in a later trimtab version must not change every existing revision's hash."""
        wire = self.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True, mode="json")
        keys = {(self.model_fields[f].alias or f) for f in self.model_fields_for_revision}
        return {k: v for k, v in wire.items() if k in keys}


# Phases: one word for `kubectl get mdep`; conditions carry the detail.
Phase = Literal[
    "Pending",  # objects written; no replica of the current revision has been observed yet
    "Progressing",  # the current revision is rolling out; fewer ready replicas than desired
    "Ready",  # every desired replica of the current revision is ready and serving
    "Degraded",  # the spec cannot work, or the rollout stopped making progress
]

# Condition types:
CONDITION_READY = "Ready"  # True: all desired replicas of the current revision are ready
CONDITION_PROGRESSING = "Progressing"  # True: a revision or scale change is still rolling out
CONDITION_DEGRADED = "Degraded"  # True: trimtab cannot reach the desired state without a change
# True: the autoscaler's last loop read its signals; False: the source failed (message has the
# error) and no scale-down happens until it is back.
CONDITION_METRICS_AVAILABLE = "MetricsAvailable"


class ModelDeploymentStatus(StatusModel):
    phase: Phase | None = None
    message: str | None = None
    observed_generation: int | None = None
    replicas: int | None = Field(default=None, description="Replicas of all revisions.")
    ready_replicas: int | None = None
    updated_replicas: int | None = Field(
        default=None, description="Replicas of the current revision."
    )
    current_revision: str | None = None
    selector: str | None = Field(default=None, description="Label selector (scale subresource).")
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    recommendations: RecommendationsStatus | None = Field(
        default=None, description="Right-sizing recommendations per container (rightsizing timer)."
    )
    autoscaling: AutoscalingStatus | None = Field(
        default=None, description="The autoscaler's last decision and its inputs."
    )
    rollout: RolloutStatus | None = Field(
        default=None, description="Revisions, weights, verdicts and known-good history."
    )
    route: RouteRecord | None = Field(
        default=None,
        description="The route trimtab routes through (a mesh router's HTTPRoute or "
        "VirtualService), released when spec.rollout stops naming it.",
    )
