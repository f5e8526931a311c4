"""The operator's own Prometheus metrics: reconciles, API calls and the decisions it takes.

Served on /metrics by `trimtab run`; the Grafana dashboard in the chart charts these names."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

BUILD_INFO = Gauge(
    "trimtab_build_info",
    "1 for each running operator process (active or standing by), labelled with its version; "
    "its absence is the operator down or not scraped.",
    ["version"],
)
RECONCILES = Counter(
    "trimtab_reconcile_total", "Reconciles by kind and result.", ["kind", "result"]
)
RECONCILE_SECONDS = Histogram(
    "trimtab_reconcile_duration_seconds",
    "Time to reconcile one object.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
API_REQUESTS = Counter(
    "trimtab_api_requests_total", "Requests to the Kubernetes API.", ["method", "code"]
)
API_WRITES = Counter(
    "trimtab_api_writes_total", "Writes sent to the Kubernetes API.", ["verb", "kind"]
)
DESIRED_REPLICAS = Gauge(
    "trimtab_autoscaling_desired_replicas",
    "Replicas the autoscaler wants.",
    ["namespace", "name"],
)
METRICS_AVAILABLE = Gauge(
    "trimtab_metrics_available",
    "The MetricsAvailable condition of a ModelDeployment's autoscaling loop: 1 every signal was "
    "read, 0 the source failed (no scale-down until it is back).",
    ["namespace", "name"],
)
SCALE_ACTIONS = Counter(
    "trimtab_scale_actions_total", "Scale actions taken.", ["namespace", "name", "direction"]
)
ROLLOUT_WEIGHT = Gauge(
    "trimtab_rollout_weight", "Traffic weight per revision.", ["namespace", "name", "revision"]
)
ROLLBACKS = Counter(
    "trimtab_rollbacks_total", "Rollbacks and fallbacks.", ["namespace", "name", "kind"]
)
ROUTE_ACCEPTED = Gauge(
    "trimtab_route_accepted",
    "The RouteAccepted condition of a ModelDeployment with a mesh router: 1 the route's Gateways "
    "accepted it, 0 one refused it, -1 one has not reported.",
    ["namespace", "name"],
)
IN_PLACE_CPU = Gauge(
    "trimtab_in_place_cpu_request_cores",
    "The CPU request trimtab resizes a ModelDeployment's running pods to in place.",
    ["namespace", "name"],
)
IN_PLACE_RESIZES = Counter(
    "trimtab_in_place_resizes_total",
    "In-place pod resizes sent, by result (ok, refused, unsupported, forbidden, gone, changed).",
    ["namespace", "name", "result"],
)

TRAINING_PHASE = Gauge(
    "trimtab_trainingjob_status_phase",
    "A TrainingJob's phase: 1 for the one it is in, 0 for the others.",
    ["namespace", "name", "phase"],
)
TRAINING_RESTARTS = Gauge(
    "trimtab_trainingjob_restarts",
    "Whole-job restarts of a TrainingJob so far (status.restarts).",
    ["namespace", "name"],
)

# The series one ModelDeployment owns, by its namespace and name.
PER_RESOURCE = (
    DESIRED_REPLICAS,
    METRICS_AVAILABLE,
    SCALE_ACTIONS,
    ROLLOUT_WEIGHT,
    ROLLBACKS,
    ROUTE_ACCEPTED,
    IN_PLACE_CPU,
    IN_PLACE_RESIZES,
)


def forget_resource(namespace: str, name: str) -> None:
    """Remove every series of a ModelDeployment that is gone: left, they would be served for
    as long as the operator runs, one more set per resource ever created."""
    for metric in PER_RESOURCE:
        metric.remove_by_labels({"namespace": namespace, "name": name})


def export_training(
    namespace: str, name: str, phase: str, restarts: int, phases: Iterable[str]
) -> None:
    """A TrainingJob's phase (one of `phases`) and restarts, as its status says."""
    for each in phases:
        TRAINING_PHASE.labels(namespace, name, each).set(1 if each == phase else 0)
    TRAINING_RESTARTS.labels(namespace, name).set(restarts)


def forget_training(namespace: str, name: str) -> None:
    """Remove the series of a TrainingJob that is gone (its own: a ModelDeployment of the same
    name keeps its series)."""
    for metric in (TRAINING_PHASE, TRAINING_RESTARTS):
        metric.remove_by_labels({"namespace": namespace, "name": name})
