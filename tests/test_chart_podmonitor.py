"""The chart's model-server PodMonitor against the pods trimtab builds. Prometheus discovers one
target per container port of each pod (kubernetes_sd, role pod); prometheus-operator's
relabeling for a PodMonitor endpoint, then the monitor's own, must leave exactly one target per
model-server pod, at the metrics port and path of its prometheus.io/* annotations, labelled
with what trimtab's queries select by. The relabeling is run here as Prometheus runs it
(anchored regexes, `;`-joined sources, `$n` replacements)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest

from tests.chart_render import NAMESPACE, one, render
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.common import Owner
from trimtab.builders.serving import build_deployment, revision_of
from trimtab.metrics.presets import LabelNames

Labels = dict[str, str]


def _sanitize(name: str) -> str:
    """How kubernetes_sd turns a label or annotation name into a meta label's suffix."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def discovered(pod: dict[str, Any], namespace: str, name: str, ip: str) -> list[Labels]:
    """kubernetes_sd's targets for a running pod: one per container port, with the pod's meta
    labels (and its labels and annotations, present or not)."""
    meta = pod["metadata"]
    common: Labels = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_phase": "Running",
    }
    for key, value in (meta.get("labels") or {}).items():
        common[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
        common[f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}"] = "true"
    for key, value in (meta.get("annotations") or {}).items():
        common[f"__meta_kubernetes_pod_annotation_{_sanitize(key)}"] = value
    host = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    targets = []
    for container in pod["spec"]["containers"]:
        for port in container.get("ports", []):
            targets.append(
                {
                    **common,
                    "__address__": f"{host}:{port['containerPort']}",
                    "__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                }
            )
    return targets


def relabel(labels: Labels, rules: list[dict[str, Any]]) -> Labels | None:
    """Prometheus' relabeling (replace, keep, drop); None when the target is dropped."""
    out = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace").lower()
        sources = rule.get("sourceLabels", [])
        value = rule.get("separator", ";").join(out.get(s, "") for s in sources)
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if action == "keep" and match is None:
            return None
        if action == "drop" and match is not None:
            return None
        if action == "replace" and match is not None:
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule.get("replacement", "$1"))
            result = match.expand(replacement)
            if result:
                out[rule["targetLabel"]] = result
            else:
                out.pop(rule["targetLabel"], None)
    return out


def operator_rules(monitor: dict[str, Any], endpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """What prometheus-operator generates ahead of an endpoint's relabelings for a PodMonitor:
    the selector, the named port, running pods only, the standard target labels and the
    podTargetLabels."""
    spec = monitor["spec"]
    rules: list[dict[str, Any]] = []
    for key, value in spec["selector"].get("matchLabels", {}).items():
        source = f"__meta_kubernetes_pod_label_{_sanitize(key)}"
        rules.append({"action": "keep", "sourceLabels": [source], "regex": value})
    for expr in spec["selector"].get("matchExpressions", []):
        assert expr["operator"] == "Exists", expr  # the only kind the chart writes
        rules.append({"action": "keep", "regex": "true", "sourceLabels": [
            f"__meta_kubernetes_pod_labelpresent_{_sanitize(expr['key'])}"]})  # fmt: skip
    rules += [
        {"action": "keep", "sourceLabels": ["__meta_kubernetes_pod_container_port_name"],
         "regex": endpoint["port"]},
        {"action": "drop", "sourceLabels": ["__meta_kubernetes_pod_phase"],
         "regex": "(Failed|Succeeded)"},
        {"sourceLabels": ["__meta_kubernetes_namespace"], "targetLabel": "namespace"},
        {"sourceLabels": ["__meta_kubernetes_pod_container_name"], "targetLabel": "container"},
        {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "pod"},
    ]  # fmt: skip
    for name in spec.get("podTargetLabels", []):
        rules.append({"sourceLabels": [f"__meta_kubernetes_pod_label_{_sanitize(name)}"],
                      "targetLabel": _sanitize(name), "regex": "(.+)"})  # fmt: skip
    return rules


def scraped(monitor: dict[str, Any], pod: dict[str, Any], ip: str) -> list[Labels]:
    """The targets the monitor leaves for `pod`, with __address__ and __metrics_path__."""
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    rules = operator_rules(monitor, endpoint) + endpoint.get("relabelings", [])
    out = []
    for target in discovered(pod, "ml", "pod-0", ip):
        target["__metrics_path__"] = endpoint.get("path", "/metrics")
        kept = relabel(target, rules)
        if kept is not None:
            out.append(kept)
    return out


def model_pod(spec: dict[str, Any]) -> tuple[dict[str, Any], str]:
    parsed = ModelDeploymentSpec.model_validate(spec)
    revision = revision_of(parsed)
    owner = Owner(C.API_VERSION, C.MODELDEPLOYMENT_KIND, "chat", "ml", "uid-1")
    template: dict[str, Any] = build_deployment(owner, parsed, revision, 1)["spec"]["template"]
    return template, revision


def monitor_for(values: dict[str, Any] | None = None) -> dict[str, Any]:
    base = {"modelServerPodMonitor": {"enabled": True}}
    return one(render({**base, **(values or {})}), "PodMonitor")


@pytest.mark.parametrize(
    ("spec", "ip", "address", "path"),
    [
        pytest.param({"server": "vllm", "image": "vllm/vllm-openai:v0.6.3"}, "10.1.2.3",
                     "10.1.2.3:8000", "/metrics", id="vllm-one-port"),
        pytest.param({"server": "triton", "image": "nvcr.io/nvidia/tritonserver:24.08-py3"},
                     "10.1.2.3", "10.1.2.3:8002", "/metrics", id="triton-own-metrics-port"),
        pytest.param({"server": "generic", "image": "srv:1", "port": 8080, "metricsPort": 9090,
                      "metricsPath": "/stats/prometheus"}, "10.1.2.3",
                     "10.1.2.3:9090", "/stats/prometheus", id="generic-port-and-path"),
        pytest.param({"server": "vllm", "image": "vllm/vllm-openai:v0.6.3"}, "fd00::12",
                     "[fd00::12]:8000", "/metrics", id="ipv6-pod"),
    ],
)  # fmt: skip
def test_one_target_per_model_server_at_its_metrics_endpoint(
    spec: dict[str, Any], ip: str, address: str, path: str
) -> None:
    template, revision = model_pod(spec)
    # A mesh sidecar that also names a port http is not scraped as the model server.
    template["spec"]["containers"].append(
        {"name": "proxy", "ports": [{"name": "http", "containerPort": 15001}]}
    )
    (target,) = scraped(monitor_for(), template, ip)
    assert target["__address__"] == address
    assert target["__metrics_path__"] == path
    names = LabelNames()
    assert target[names.namespace] == "ml"
    assert target[names.owner] == "chat"
    assert target[names.revision] == revision
    assert target["pod"] == "pod-0"


def test_the_operators_own_pods_are_not_model_servers() -> None:
    docs = render({"modelServerPodMonitor": {"enabled": True}})
    monitor = one(docs, "PodMonitor")
    for deployment in (d for d in docs if d["kind"] in ("Deployment", "DaemonSet")):
        assert scraped(monitor, deployment["spec"]["template"], "10.1.2.3") == []


@pytest.mark.parametrize(
    ("values", "namespaces"),
    [
        pytest.param({}, {"any": True}, id="every-namespace"),
        pytest.param({"operator": {"watchNamespace": "ml"}}, {"matchNames": ["ml"]},
                     id="the-watched-namespace"),
    ],
)  # fmt: skip
def test_the_monitor_looks_where_the_operator_watches(
    values: dict[str, Any], namespaces: dict[str, Any]
) -> None:
    monitor = monitor_for(values)
    assert monitor["spec"]["namespaceSelector"] == namespaces
    assert monitor["metadata"]["namespace"] == NAMESPACE


def test_interval_and_labels_come_from_values() -> None:
    monitor = monitor_for(
        {"modelServerPodMonitor": {"enabled": True, "interval": "5s", "scrapeTimeout": "4s",
                                   "labels": {"release": "prom"}}}
    )  # fmt: skip
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("5s", "4s")
    assert monitor["metadata"]["labels"]["release"] == "prom"


def test_off_by_default() -> None:
    assert [d for d in render() if d["kind"] == "PodMonitor"] == []
