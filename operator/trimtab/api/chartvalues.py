"""The Helm chart's values as a pydantic model: the single source of `values.schema.json`, so
`helm install` rejects a misspelt or mistyped value before anything reaches the cluster.

Run `python -m trimtab.api.chartvalues [--check]` to regenerate the schema (or check it)."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trimtab.api.common import HTTP_HEADER_NAME, HTTP_HEADER_VALUE, header_problem

JSON = dict[str, Any]

SCHEMA_PATH = Path("charts") / "trimtab" / "values.schema.json"

# Kubernetes objects passed through verbatim (resources, affinity, tolerations): the API server
# validates them, so the chart schema only checks that they are objects or lists of objects.
KubeObject = dict[str, Any]
Labels = dict[str, str]
DNS_SUBDOMAIN = r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
DNS_LABEL = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DURATION = r"^([0-9]+(ms|s|m|h))+$"


class Values(BaseModel):
    """Base for every values section: unknown keys are an error (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Image(Values):
    repository: str = Field(default="ghcr.io/trimtab/trimtab", min_length=1)
    tag: str = Field(default="", description="Image tag; empty means the chart's appVersion.")
    digest: str = Field(
        default="",
        pattern=r"^$|^sha256:[a-f0-9]{64}$",
        description="Image digest; when set it wins over the tag.",
    )
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class Crds(Values):
    install: bool = Field(
        default=True,
        description=(
            "Install the trimtab and kopf peering CRDs (kept on uninstall, never pruned);"
            " only one release per cluster can own them."
        ),
    )


class SecretKey(Values):
    name: str = Field(default="", pattern=DNS_SUBDOMAIN, description="Secret name.")
    key: str = Field(default="", pattern=r"^$|^[-._a-zA-Z0-9]+$", description="Key in it.")


class BasicAuth(Values):
    username: str = Field(default="", description="Empty: no basic auth.")
    passwordSecret: SecretKey = Field(
        default_factory=SecretKey, description="The password: a Secret key, {name, key}."
    )


class CaBundle(Values):
    configMap: str = Field(default="", pattern=DNS_SUBDOMAIN, description="A ConfigMap's name.")
    secret: str = Field(default="", pattern=DNS_SUBDOMAIN, description="Or a Secret's name.")
    key: str = Field(default="ca.crt", pattern=r"^[-._a-zA-Z0-9]+$")


class PrometheusClient(Values):
    serviceAccountToken: bool = Field(
        default=False,
        description="Send the operator's ServiceAccount token as a bearer token (OpenShift's "
        "thanos-querier, Prometheus behind kube-rbac-proxy).",
    )
    bearerTokenSecret: SecretKey = Field(
        default_factory=SecretKey, description="A bearer token from a Secret key, {name, key}."
    )
    basicAuth: BasicAuth = Field(default_factory=BasicAuth)
    headers: Labels = Field(
        default_factory=dict,
        description="Headers on every query, e.g. {X-Scope-OrgID: team-a} (a Mimir, Cortex or "
        "Thanos tenant).",
        json_schema_extra={
            "propertyNames": {"pattern": HTTP_HEADER_NAME},
            "additionalProperties": {"type": "string", "pattern": HTTP_HEADER_VALUE},
        },
    )

    @field_validator("headers")
    @classmethod
    def _header_names_and_values(cls, value: Labels) -> Labels:
        for name, text in value.items():
            if problem := header_problem(name, text):
                raise ValueError(problem)
        return value
    ca: CaBundle = Field(
        default_factory=CaBundle, description="CA bundle that signs Prometheus' certificate."
    )
    clientCertSecret: str = Field(
        default="",
        pattern=DNS_SUBDOMAIN,
        description="A kubernetes.io/tls Secret: the client certificate for mutual TLS.",
    )
    insecureSkipVerify: bool = Field(
        default=False, description="Do not check Prometheus' certificate (test clusters only)."
    )


class Operator(Values):
    replicas: int = Field(
        default=2, ge=1, le=10, description="Operator pods; kopf peering keeps one active."
    )
    watchNamespace: str = Field(
        default="",
        pattern=DNS_LABEL,
        description="Watch only this namespace (RBAC becomes a Role there); empty: all.",
    )
    prometheusUrl: str = Field(
        default="http://prometheus-operated.monitoring.svc:9090",
        pattern=r"^https?://[^\s]+$",
        description="Prometheus the operator queries for SLO and usage metrics.",
    )
    prometheusClient: PrometheusClient = Field(
        default_factory=PrometheusClient,
        description="How the operator authenticates to prometheusUrl and checks its "
        "certificate; sent to that URL's host and port only.",
    )
    logLevel: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metricsPort: int = Field(default=8080, ge=1, le=65535, description="Serves /metrics.")
    healthPort: int = Field(default=8081, ge=1, le=65535, description="Serves /healthz.")
    listenAddress: str = Field(
        default="0.0.0.0",
        pattern=r"^[0-9A-Fa-f.:]+$",
        description="Address the operator's /metrics and /healthz (and the GPU agent's) listen "
        "on: 0.0.0.0, or :: on a cluster whose pods are reached over IPv6.",
    )
    extraEnv: list[KubeObject] = Field(
        default_factory=list, description="Extra container env entries (EnvVar objects)."
    )
    resources: KubeObject = Field(
        default_factory=lambda: {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"memory": "512Mi"},
        }
    )
    nodeSelector: Labels = Field(default_factory=dict)
    tolerations: list[KubeObject] = Field(default_factory=list)
    affinity: KubeObject = Field(
        default_factory=dict,
        description="Pod affinity; empty: prefer spreading the replicas over nodes.",
    )
    priorityClassName: str = Field(default="", pattern=DNS_SUBDOMAIN)
    podAnnotations: Labels = Field(default_factory=dict)
    podLabels: Labels = Field(default_factory=dict)


class Peering(Values):
    enabled: bool = Field(
        default=True,
        description=(
            "Run the replicas in a kopf peering so only one acts; off: --standalone (and"
            " operator.replicas 1)."
        ),
    )
    name: str = Field(
        default="", pattern=DNS_SUBDOMAIN, description="Peering object name; empty: fullname."
    )


class ServiceAccount(Values):
    create: bool = True
    name: str = Field(
        default="",
        pattern=DNS_SUBDOMAIN,
        description="Empty: the fullname. Required when create is false (the RBAC is bound to "
        "it).",
    )
    annotations: Labels = Field(default_factory=dict)


class Rbac(Values):
    create: bool = Field(
        default=True, description="Create the (Cluster)Role and binding the operator needs."
    )
    aggregateToDefaultRoles: bool = Field(
        default=True,
        description="Let Kubernetes' admin and edit roles create and change ModelDeployments "
        "and TrainingJobs, and view read them (aggregated ClusterRoles).",
    )


class PodDisruptionBudget(Values):
    enabled: bool = True
    minAvailable: int = Field(default=1, ge=0)


class ServiceMonitor(Values):
    enabled: bool = Field(
        default=False, description="Create a prometheus-operator ServiceMonitor for /metrics."
    )
    interval: str = Field(default="30s", pattern=DURATION)
    scrapeTimeout: str = Field(default="10s", pattern=DURATION)
    labels: Labels = Field(
        default_factory=dict, description="Labels your Prometheus' serviceMonitorSelector wants."
    )


class ModelServerPodMonitor(Values):
    enabled: bool = Field(
        default=False,
        description="Create a prometheus-operator PodMonitor that scrapes every "
        "ModelDeployment's pods with the labels trimtab's queries select by.",
    )
    interval: str = Field(
        default="15s",
        pattern=DURATION,
        description="Scrape interval: the autoscaler reacts one scrape plus one loop late.",
    )
    scrapeTimeout: str = Field(default="10s", pattern=DURATION)
    labels: Labels = Field(
        default_factory=dict, description="Labels your Prometheus' podMonitorSelector wants."
    )


class PrometheusRule(Values):
    enabled: bool = Field(
        default=False,
        description="Ship trimtab's alerts (alerts/trimtab.rules.yaml) as a prometheus-operator "
        "PrometheusRule. They read the operator's metrics: scrape it (serviceMonitor).",
    )
    labels: Labels = Field(
        default_factory=dict, description="Labels your Prometheus' ruleSelector wants."
    )
    additionalRuleLabels: Labels = Field(
        default_factory=dict,
        description="Labels added to every alert (e.g. a team for Alertmanager's routing); an "
        "alert's own severity wins.",
    )


class NetworkPolicy(Values):
    enabled: bool = Field(default=False, description="Restrict the operator pods' traffic.")
    metricsFrom: list[KubeObject] = Field(
        default_factory=list,
        description="NetworkPolicyPeers allowed to scrape /metrics; empty: any pod.",
    )
    egress: list[KubeObject] = Field(
        default_factory=list,
        description="NetworkPolicyEgressRules; empty: egress is not restricted. When set, add "
        "the API server and Prometheus (DNS is always allowed). Name the API server by its "
        "endpoints (`kubectl get endpointslices -n default -l "
        "kubernetes.io/service-name=kubernetes`: often port 6443), not the kubernetes "
        "Service's IP and 443: many network plugins check egress after that address is "
        "translated.",
    )


class GrafanaDashboard(Values):
    enabled: bool = Field(
        default=False, description="Ship the dashboard as a ConfigMap for Grafana's sidecar."
    )
    namespace: str = Field(default="", pattern=DNS_LABEL, description="Empty: the release's.")
    labels: Labels = Field(default_factory=lambda: {"grafana_dashboard": "1"})


class GpuAgent(Values):
    enabled: bool = Field(
        default=False, description="Run the NVML agent on GPU nodes (per-pod GPU usage)."
    )
    port: int = Field(
        default=9835, ge=1, le=65535, description="/metrics and /healthz (the agent's --port)."
    )
    runtimeClassName: str = Field(
        default="nvidia",
        pattern=DNS_SUBDOMAIN,
        description="RuntimeClass exposing every GPU (the GPU Operator's `nvidia`); empty: the"
        " node's default runtime.",
    )
    nodeSelector: Labels = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[KubeObject] = Field(
        default_factory=lambda: [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    )
    resources: KubeObject = Field(
        default_factory=lambda: {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "128Mi"},
        }
    )
    priorityClassName: str = Field(default="", pattern=DNS_SUBDOMAIN)


class SecurityContext(Values):
    runAsUser: int | None = Field(
        default=65532,
        ge=1,
        description="The uid the operator and GPU agent run as (the image's USER). null on "
        "OpenShift: its restricted-v2 SCC assigns one from the namespace's range and refuses "
        "any other.",
    )
    runAsGroup: int | None = Field(
        default=65532,
        ge=1,
        description="Their gid, and the pods' fsGroup. null on OpenShift, as runAsUser.",
    )


class ChartValues(Values):
    """Everything `helm install -f values.yaml` accepts."""

    image: Image = Field(default_factory=Image)
    imagePullSecrets: list[KubeObject] = Field(default_factory=list)
    nameOverride: str = Field(default="", pattern=DNS_LABEL)
    fullnameOverride: str = Field(default="", pattern=DNS_LABEL)
    crds: Crds = Field(default_factory=Crds)
    operator: Operator = Field(default_factory=Operator)
    peering: Peering = Field(default_factory=Peering)
    serviceAccount: ServiceAccount = Field(default_factory=ServiceAccount)
    rbac: Rbac = Field(default_factory=Rbac)
    podDisruptionBudget: PodDisruptionBudget = Field(default_factory=PodDisruptionBudget)
    serviceMonitor: ServiceMonitor = Field(default_factory=ServiceMonitor)
    modelServerPodMonitor: ModelServerPodMonitor = Field(default_factory=ModelServerPodMonitor)
    prometheusRule: PrometheusRule = Field(default_factory=PrometheusRule)
    networkPolicy: NetworkPolicy = Field(default_factory=NetworkPolicy)
    grafanaDashboard: GrafanaDashboard = Field(default_factory=GrafanaDashboard)
    gpuAgent: GpuAgent = Field(default_factory=GpuAgent)
    securityContext: SecurityContext = Field(default_factory=SecurityContext)
    # Helm passes a parent chart's globals down to every subchart; accept them.
    global_: KubeObject = Field(default_factory=dict, alias="global")


def _inline(schema: Any, defs: JSON) -> Any:
    """Replace every $ref by its definition, so the schema reads top-down without $defs."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            target = copy.deepcopy(defs[schema["$ref"].rsplit("/", 1)[-1]])
            siblings = {k: v for k, v in schema.items() if k != "$ref"}
            return _inline({**target, **siblings}, defs)
        return {k: _inline(v, defs) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def _strip_titles(schema: Any) -> Any:
    """pydantic titles repeat the key names; they only add noise to a schema people read."""
    if isinstance(schema, dict):
        out = {k: _strip_titles(v) for k, v in schema.items() if k != "title"}
        if "properties" in schema:
            out["properties"] = {k: _strip_titles(v) for k, v in schema["properties"].items()}
        return out
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


def values_schema() -> JSON:
    """The chart's values.schema.json: JSON Schema draft 7, self-contained."""
    raw = ChartValues.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    body = _strip_titles(_inline(raw, defs))
    return {"$schema": "http://json-schema.org/draft-07/schema#", "title": "trimtab", **body}


def render_schema() -> str:
    return json.dumps(values_schema(), indent=2, sort_keys=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="project root")
    parser.add_argument("--check", action="store_true", help="fail if the schema would change")
    args = parser.parse_args(argv)
    path = args.root / SCHEMA_PATH
    text = render_schema()
    current = path.read_text() if path.exists() else None
    if current == text:
        return 0
    if args.check:
        sys.stderr.write(f"{path} is stale, run `python -m trimtab.api.chartvalues`\n")
        return 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
