"""Manifests for serving a ModelDeployment: one Deployment per revision and the Service in
front of all of them.

A revision is the hash of the model part of the spec; its Deployment's pod template never
changes, so an old revision keeps serving until the new one is ready."""

from __future__ import annotations

import math

from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.servers import SERVER_DEFAULTS
from trimtab.builders.common import (
    Manifest,
    Owner,
    child_name,
    container_resources,
    content_hash,
    object_meta,
)
from trimtab.decisions.serving import wants_shm

CONTAINER_NAME = "server"
SHM_VOLUME = "dshm"
SHM_PATH = "/dev/shm"


def revision_of(spec: ModelDeploymentSpec) -> str:
    """The revision a spec defines: a hash of its model part only, so scaling or policy edits
    never restart pods."""
    return content_hash(spec.model_part())


def deployment_name(owner_name: str, revision: str) -> str:
    return child_name(owner_name, revision)


def serving_ports(spec: ModelDeploymentSpec) -> tuple[int, int, str]:
    """(serving port, metrics port, metrics path) after preset defaults."""
    defaults = SERVER_DEFAULTS[spec.server]
    port = spec.port or defaults.port
    metrics_port = spec.metrics_port or (
        port if defaults.metrics_port == defaults.port else defaults.metrics_port
    )
    return port, metrics_port, spec.metrics_path or defaults.metrics_path


def revision_labels(owner: Owner, revision: str) -> dict[str, str]:
    return {
        C.LABEL_OWNER: owner.name,
        C.LABEL_REVISION: revision,
    }


def build_container(spec: ModelDeploymentSpec) -> Manifest:
    defaults = SERVER_DEFAULTS[spec.server]
    port, metrics_port, _ = serving_ports(spec)
    ports: list[Manifest] = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    if metrics_port != port:
        ports.append({"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"})

    res = spec.resources
    resources = container_resources(
        res.cpu, res.memory, res.cpu_limit, res.memory_limit,
        res.gpu_resource_name or "nvidia.com/gpu", res.gpu,
    )  # fmt: skip

    readiness = spec.probes.readiness_path or defaults.readiness_path
    liveness = spec.probes.liveness_path or defaults.liveness_path
    container: Manifest = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "ports": ports,
        "readinessProbe": {
            "httpGet": {"path": readiness, "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": liveness, "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        # Liveness starts only after the model has loaded, however long that takes.
        "startupProbe": {
            "httpGet": {"path": liveness, "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": max(1, math.ceil(spec.probes.startup_timeout_seconds / 10)),
        },
    }
    if spec.command is not None:
        container["command"] = list(spec.command)
    if spec.args:
        container["args"] = list(spec.args)
    if spec.env:
        container["env"] = [e.to_wire() for e in spec.env]
    if resources:
        container["resources"] = resources
    mounts = [m.to_wire() for m in spec.volume_mounts]
    if wants_shm(spec):
        mounts.append({"name": SHM_VOLUME, "mountPath": SHM_PATH})
    if mounts:
        container["volumeMounts"] = mounts
    return container


def build_deployment(
    owner: Owner, spec: ModelDeploymentSpec, revision: str, replicas: int
) -> Manifest:
    """The Deployment of one revision. Only `replicas` may differ between two builds of the same
    revision; the pod template is a function of the revision alone."""
    _, metrics_port, metrics_path = serving_ports(spec)
    labels = revision_labels(owner, revision)
    pod_spec: Manifest = {
        "containers": [build_container(spec)],
        # Model servers drain in-flight generations; 30 s cuts long completions.
        "terminationGracePeriodSeconds": 60,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in spec.tolerations]
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.topology_spread:
        # Over every revision's pods (the Service's selector): the model's serving capacity,
        # whichever revision holds it, is what a node or zone outage must not take at once.
        pod_spec["topologySpreadConstraints"] = [
            {
                "topologyKey": t.topology_key,
                "maxSkew": t.max_skew,
                "whenUnsatisfiable": t.when_unsatisfiable,
                "labelSelector": {
                    "matchLabels": {C.LABEL_OWNER: owner.name, C.LABEL_MANAGED_BY: C.MANAGED_BY}
                },
            }
            for t in spec.topology_spread
        ]
    volumes = [v.to_wire() for v in spec.volumes]
    if wants_shm(spec):
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
    if volumes:
        pod_spec["volumes"] = volumes
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(
            owner,
            deployment_name(owner.name, revision),
            labels={**labels, C.LABEL_NAME: owner.name, C.LABEL_COMPONENT: "model-server"},
        ),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            # A model loads for minutes: the deadline starts counting after the startup timeout.
            "progressDeadlineSeconds": spec.probes.startup_timeout_seconds + 300,
            "revisionHistoryLimit": 2,
            "template": {
                "metadata": {
                    # The spec's own first: trimtab's keys are refused there, and win anyway.
                    "labels": {
                        **spec.pod_metadata.labels,
                        **labels,
                        C.LABEL_MANAGED_BY: C.MANAGED_BY,
                        C.LABEL_NAME: owner.name,
                    },
                    "annotations": {
                        **spec.pod_metadata.annotations,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(metrics_port),
                        "prometheus.io/path": metrics_path,
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def build_service(
    owner: Owner, spec: ModelDeploymentSpec, revision: str | None = None
) -> Manifest:
    """The Service named after the resource. It selects every revision's pods, so traffic
    keeps flowing while revisions change; or only `revision`'s (see
    `RevisionPlan.service_revision`: the stable one while a mesh route weighs a candidate)."""
    port, metrics_port, _ = serving_ports(spec)
    ports: list[Manifest] = [
        {"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}
    ]
    if metrics_port != port:
        ports.append(
            {"name": "metrics", "port": metrics_port, "targetPort": "metrics", "protocol": "TCP"}
        )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(owner, owner.name, labels={C.LABEL_NAME: owner.name}),
        "spec": {
            "type": "ClusterIP",
            "selector": {
                C.LABEL_OWNER: owner.name,
                C.LABEL_MANAGED_BY: C.MANAGED_BY,
                **({C.LABEL_REVISION: revision} if revision else {}),
            },
            "ports": ports,
        },
    }


def build_disruption_budget(owner: Owner, spec: ModelDeploymentSpec) -> Manifest:
    """The PodDisruptionBudget named after the resource, over the pods of every revision (the
    Service's selector): a drain takes at most `maxUnavailable` of them at once, and waits for
    a replacement to be ready before the next. `AlwaysAllow` lets a pod that is not ready be
    evicted regardless, so a crash-looping replica never holds a node drain."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(owner, owner.name, labels={C.LABEL_NAME: owner.name}),
        "spec": {
            "maxUnavailable": spec.disruption_budget.max_unavailable,
            "selector": {"matchLabels": {C.LABEL_OWNER: owner.name,
                                         C.LABEL_MANAGED_BY: C.MANAGED_BY}},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }  # fmt: skip


def selector_string(owner: Owner) -> str:
    """status.selector for the scale subresource: every pod of every revision."""
    return f"{C.LABEL_MANAGED_BY}={C.MANAGED_BY},{C.LABEL_OWNER}={owner.name}"
