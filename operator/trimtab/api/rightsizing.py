"""The `rightsizing` part of ModelDeployment and TrainingJob specs, and the recommendations
trimtab writes to `status.recommendations`.

Policy only: none of these fields is part of a revision; an applied recommendation is."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trimtab.api.common import Condition, Duration, Quantity, StatusModel, StrictModel

RightsizingMode = Literal[
    "Off",  # trimtab reads no usage and writes no recommendation
    "Recommend",  # recommendations go to status and Events; the pods keep their requests
    "Auto",  # a recommendation that moves is applied as a new revision (rolled out); between
    # revisions a ModelDeployment's CPU request follows usage in place (inPlace.cpu)
]

DEFAULT_WINDOW = "168h"
# A recommendation that moves by more than this fraction of the current value is news: an Event,
# and in Auto mode a new revision. Smaller moves are noise and would only churn pods.
DEFAULT_MIN_CHANGE = 0.10


class ResourcePolicy(StrictModel):
    """How one resource is sized: which usage percentile, how much headroom, within what bounds."""

    percentile: float | None = Field(
        default=None,
        ge=0.5,
        le=1.0,
        description="Percentile of the decaying usage histogram (CPU) or of the usage peaks "
        "(memory) to size for. Defaults: CPU 0.95, memory 1.0 (the highest recent peak).",
    )
    headroom: float | None = Field(
        default=None,
        ge=0.0,
        le=2.0,
        description="Fraction added on top of the percentile. Defaults: CPU 0.05, memory 0.10.",
    )
    min: Quantity | None = Field(default=None, description="Never recommend less than this.")
    max: Quantity | None = Field(default=None, description="Never recommend more than this.")


class GpuPolicy(StrictModel):
    """Which GPU shapes trimtab may suggest. GPU shapes are only suggested, never applied: a MIG
    profile or a time-sliced GPU exists only where the node pool was partitioned for it."""

    headroom: float = Field(
        default=0.10, ge=0.0, le=2.0, description="Fraction added to the peak GPU memory."
    )
    allow_mig: bool = Field(default=True, description="Suggest MIG profiles.")
    allow_sharing: bool = Field(
        default=True, description="Suggest a time-sliced (shared) GPU when utilization is low."
    )
    sharing_utilization_threshold: float = Field(
        default=0.30,
        gt=0.0,
        le=1.0,
        description="Peak (p95) GPU utilization below which sharing a GPU would do.",
    )
    gpu_model: Literal["A100-40GB", "A100-80GB", "H100-80GB"] | None = Field(
        default=None,
        description="GPU model whose MIG profiles to consider; taken from the agent's metrics "
        "when unset.",
    )


class RightsizingSpec(StrictModel):
    """Right-sizing of CPU, memory and GPU from observed usage."""

    mode: RightsizingMode = Field(
        default="Recommend",
        description="Off, Recommend (status and Events only) or Auto (apply as a new revision).",
    )
    window: Duration = Field(
        default=DEFAULT_WINDOW, description="History to read; older usage is not considered."
    )
    min_change: float = Field(
        default=DEFAULT_MIN_CHANGE,
        ge=0.0,
        le=1.0,
        description="Relative move that counts as a change (Event; new revision in Auto).",
    )
    cpu: ResourcePolicy = Field(default_factory=ResourcePolicy, description="CPU request policy.")
    memory: ResourcePolicy = Field(
        default_factory=ResourcePolicy, description="Memory request (= limit) policy."
    )
    gpu: GpuPolicy = Field(default_factory=GpuPolicy, description="GPU shape suggestions.")


class InPlaceSpec(StrictModel):
    """What trimtab resizes in running pods, without a restart, between revisions (Kubernetes
    in-place pod resize: on by default since 1.33, stable since 1.35). Auto mode only."""

    cpu: bool = Field(
        default=True,
        description="Follow CPU usage within the day: every pass sets the running pods' CPU "
        "request to what the busiest pod used in the last 15 minutes or, on earlier days, in "
        "the next 15 minutes (+20%), never above the revision's request. CPU has no limit by "
        "default, so this changes only the CPU share under contention and what the scheduler "
        "counts as taken; pods are never restarted for it.",
    )


class ServingRightsizingSpec(RightsizingSpec):
    """A ModelDeployment's right-sizing: the revision's requests, and in-place resizes within
    the day between revisions."""

    in_place: InPlaceSpec = Field(
        default_factory=InPlaceSpec,
        description="In Auto mode, resize running pods in place between revisions.",
    )


# ---------------------------------------------------------------------------------------------
# status.recommendations

RecommendationState = Literal[
    "Recommended",  # enough history: `recommended` is what trimtab would set
    "InsufficientData",  # too little history; `recommended` is unset and nothing changes
    "MissingMetrics",  # a series trimtab needs is absent; the condition names it
]

# Condition types under status.recommendations.conditions:
CONDITION_USAGE_AVAILABLE = "UsageAvailable"  # True: every series right-sizing reads has data
CONDITION_RECOMMENDATION_APPLIED = "RecommendationApplied"  # True: Auto applied the latest one
# True: the running pods' CPU requests follow usage in place; False: held or refused (why).
CONDITION_CPU_RESIZED_IN_PLACE = "CPUResizedInPlace"


class ResourceAmounts(StatusModel):
    """Requests and limits of one container, as quantities."""

    cpu: str | None = None
    memory: str | None = None
    cpu_limit: str | None = None
    memory_limit: str | None = None
    gpu: int | None = None
    gpu_resource_name: str | None = None


class RecommendationBasis(StatusModel):
    """What a recommendation was computed from, so it can be checked by hand."""

    window: str
    samples: int = Field(description="Usage samples seen in the window.")
    expected_samples: int = Field(description="Samples a full window would have.")
    cpu_percentile: float
    memory_percentile: float
    cpu_headroom: float
    memory_headroom: float
    confidence: float = Field(description="0..1: history length over the window.")
    oom_kills: int = Field(default=0, description="OOM kills seen in the window.")
    peak_cpu: str | None = None
    peak_memory: str | None = None
    peak_gpu_memory: str | None = None
    gpu_utilization_p95: float | None = None
    cpu_capped: str | None = Field(
        default=None,
        description="Why the CPU request is below what usage asks, e.g. capped at the CPU limit "
        "(a request above the limit is rejected by the API server).",
    )


class GpuShape(StatusModel):
    """The smallest GPU allocation the observed peak GPU memory fits in."""

    kind: Literal["Whole", "Mig", "TimeSliced"]
    resource_name: str = Field(description='e.g. "nvidia.com/gpu", "nvidia.com/mig-3g.40gb".')
    count: int
    memory: str = Field(description="GPU memory this shape provides per unit.")
    reason: str


class ContainerRecommendation(StatusModel):
    container: str
    state: RecommendationState
    message: str = ""
    current: ResourceAmounts = Field(default_factory=ResourceAmounts)
    recommended: ResourceAmounts | None = None
    announced: ResourceAmounts | None = Field(
        default=None,
        description="The recommendation the last RecommendationChanged Event told: the next "
        "Event waits for a move of more than minChange from it, so a slow drift is told too.",
    )
    basis: RecommendationBasis | None = None
    gpu_shape: GpuShape | None = None
    missing_series: list[str] = Field(default_factory=list)


class AppliedResources(StatusModel):
    """In Auto mode: the resources trimtab serves with instead of spec.resources. Kept in status
    so spec stays what Git says (Argo CD sees no drift), and a new revision is rolled out."""

    resources: ResourceAmounts
    applied_at: str
    spec_resources_hash: str = Field(
        description="Hash of spec.resources when applied; a user edit of spec.resources wins."
    )


class InPlaceStatus(StatusModel):
    """The CPU request trimtab last resized the running pods of a revision to, and why."""

    container: str
    revision: str
    cpu: str = Field(description="The request the pods were resized to.")
    ceiling: str = Field(description="The revision's own request: in-place never goes above.")
    reason: str
    recent_peak: str | None = Field(
        default=None, description="The busiest pod's CPU in the last 15 minutes."
    )
    same_time_peak: str | None = Field(
        default=None,
        description="The median, over earlier days, of each day's peak in the next 15 minutes.",
    )
    days: int = Field(default=0, description="Earlier days with usage at this time of day.")
    pods: int = Field(default=0, description="Running pods of the revision at this request.")
    pending: int = Field(
        default=0, description="Pods whose resize the kubelet has not carried out yet."
    )
    updated_at: str


class RecommendationsStatus(StatusModel):
    """Written only by the right-sizing timer."""

    updated_at: str | None = None
    containers: list[ContainerRecommendation] = Field(
        default_factory=list,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["container"],
        },
    )
    applied: AppliedResources | None = None
    in_place: InPlaceStatus | None = Field(
        default=None,
        description="Auto mode: the CPU request running pods were resized to in place.",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
