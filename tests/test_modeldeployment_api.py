"""ModelDeployment's schema: what it accepts, and that each bad spec is rejected with a message
naming the field, by the CRD schema (as the API server would) and by the pydantic model."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from tests.validation import ROOT, validate_custom
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.serving import revision_of

CRD = ROOT / "crds" / "trimtab.io_modeldeployments.yaml"
BASE: dict[str, Any] = {
    "apiVersion": "trimtab.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "m", "namespace": "ns"},
    "spec": {"server": "vllm", "image": "vllm/vllm-openai:v0.6.3", "resources": {"gpu": 1}},
}


def with_spec(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        target = doc["spec"]
        *parents, last = dotted.split("__")
        for p in parents:
            target = target.setdefault(p, {})
        target[last] = value
    return doc


def test_minimal_spec_is_valid_and_defaults_apply() -> None:
    validate_custom(BASE, CRD)
    spec = ModelDeploymentSpec.model_validate(BASE["spec"])
    assert spec.replicas == 1
    assert spec.probes.startup_timeout_seconds == 900


INVALID = [
    pytest.param(with_spec(unknown=1), "unknown", id="unknown-field"),
    pytest.param(with_spec(server="onnx"), "server", id="unknown-server-preset"),
    pytest.param(with_spec(image=""), "image", id="empty-image"),
    pytest.param(with_spec(replicas=-1), "replicas", id="negative-replicas"),
    pytest.param(with_spec(port=70000), "port", id="port-out-of-range"),
    pytest.param(with_spec(resources__cpu="four"), "cpu", id="cpu-not-a-quantity"),
    pytest.param(with_spec(resources__memory="-1Gi"), "memory", id="negative-memory"),
    pytest.param(with_spec(resources__gpu=-1), "gpu", id="negative-gpu"),
    pytest.param(
        with_spec(resources={"gpuResourceName": "nvidia.com/mig-1g.10gb"}),
        "gpuResourceName",
        id="gpu-name-without-gpus",
    ),
    pytest.param(
        with_spec(env=[{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]),
        "valueFrom",
        id="env-value-and-valueFrom",
    ),
    pytest.param(
        with_spec(metricsPort=9000, port=8000), "metricsPort", id="vllm-split-metrics-port"
    ),
    pytest.param(
        with_spec(probes__readinessPath="health"), "readinessPath", id="relative-probe-path"
    ),
    pytest.param(
        with_spec(tolerations=[{"operator": "Maybe"}]), "operator", id="bad-toleration-op"
    ),
    pytest.param(
        with_spec(volumeMounts=[{"name": "weights", "mountPath": "/models"}]),
        "volumeMounts",
        id="mount-of-a-volume-not-in-volumes",
    ),
    pytest.param(
        with_spec(volumes=[{"name": "weights", "hostPath": {"path": "/models"}}]),
        "hostPath",
        id="host-path-volume",
    ),
    pytest.param(
        with_spec(volumes=[{"name": "weights"}]), "volumes", id="volume-without-a-source"
    ),
    pytest.param(
        with_spec(priorityClassName="High_Priority"), "priorityClassName", id="bad-priority-class"
    ),
    pytest.param(
        with_spec(topologySpread=[{"topologyKey": "zone", "whenUnsatisfiable": "Never"}]),
        "whenUnsatisfiable",
        id="unknown-when-unsatisfiable",
    ),
    pytest.param(
        with_spec(topologySpread=[{"topologyKey": "a b"}]), "topologyKey", id="bad-topology-key"
    ),
    pytest.param(
        with_spec(podMetadata={"labels": {"trimtab.io/revision": "x"}}),
        "podMetadata",
        id="pod-label-trimtab-selects-on",
    ),
    pytest.param(
        with_spec(podMetadata={"labels": {"app.kubernetes.io/managed-by": "helm"}}),
        "podMetadata",
        id="pod-label-managed-by",
    ),
    pytest.param(
        with_spec(podMetadata={"annotations": {"prometheus.io/scrape": "false"}}),
        "podMetadata",
        id="pod-annotation-trimtab-writes",
    ),
    pytest.param(
        with_spec(podMetadata={"labels": {"team name": "search"}}),
        "podMetadata",
        id="pod-label-key-not-a-qualified-name",
    ),
    pytest.param(
        with_spec(podMetadata={"labels": {"team": "search/ranking"}}),
        "labels",
        id="pod-label-value-with-a-slash",
    ),
    pytest.param(
        with_spec(volumes=[{"name": "w", "emptyDir": {}}],
                  volumeMounts=[{"name": "w", "mountPath": "models"}]),
        "mountPath",
        id="relative-mount-path",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("doc", "field"), INVALID)
def test_invalid_spec_rejected_by_crd_schema_naming_the_field(
    doc: dict[str, Any], field: str
) -> None:
    with pytest.raises((jsonschema.ValidationError, AssertionError)) as err:
        validate_custom(doc, CRD)
    text = str(err.value)
    if isinstance(err.value, jsonschema.ValidationError):
        text += " " + "/".join(str(p) for p in err.value.absolute_path)
    assert field in text


@pytest.mark.parametrize(("doc", "field"), INVALID)
def test_invalid_spec_rejected_by_model_naming_the_field(doc: dict[str, Any], field: str) -> None:
    try:
        spec = ModelDeploymentSpec.model_validate(doc["spec"])
    except ValidationError as err:
        assert field in str(err) or any(field in str(e["loc"]) for e in err.errors())
        return
    # A cross-field rule only CEL enforces: the operator's feasibility check must catch it.
    from trimtab.decisions.serving import find_spec_problems

    problems = find_spec_problems(spec)
    cel_only = {"gpuResourceName", "valueFrom", "metricsPort", "volumes"}
    assert field in cel_only or problems, f"{field} accepted by the model"


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        pytest.param("llama-31-8b", True, id="dns-label"),
        pytest.param("m" * 63, True, id="63-characters"),
        pytest.param("m" * 64, False, id="64-characters-too-long-for-a-label"),
        pytest.param("llama-3.1-8b", False, id="dot-not-allowed-in-a-service-name"),
        pytest.param("7b-chat", False, id="service-name-must-start-with-a-letter"),
    ],
)
def test_names_must_make_a_valid_service_name(name: str, accepted: bool) -> None:
    """The Service is named after the ModelDeployment and its pods carry the name as a label: a
    name the API server accepts for the resource but not for those is refused up front."""
    doc = copy.deepcopy(BASE)
    doc["metadata"]["name"] = name
    if accepted:
        validate_custom(doc, CRD)
        return
    with pytest.raises(AssertionError, match="metadata.name must be at most 63"):
        validate_custom(doc, CRD)


def test_revision_ignores_replicas_but_not_image() -> None:
    a = ModelDeploymentSpec.model_validate(BASE["spec"])
    b = ModelDeploymentSpec.model_validate({**BASE["spec"], "replicas": 5})
    c = ModelDeploymentSpec.model_validate({**BASE["spec"], "image": "vllm/vllm-openai:v0.7"})
    assert revision_of(a) == revision_of(b)
    assert revision_of(a) != revision_of(c)


def test_pod_metadata_keys_the_api_server_accepts() -> None:
    doc = with_spec(podMetadata={
        "labels": {"team": "search", "example.com/cost-center": "ml-42"},
        "annotations": {"vault.hashicorp.com/agent-inject": "true", "note": "a b / c"},
    })  # fmt: skip
    validate_custom(doc, CRD)
    ModelDeploymentSpec.model_validate(doc["spec"])


def test_volumes_are_part_of_the_revision_and_absent_ones_change_no_hash() -> None:
    """An operator upgrade that adds spec.volumes must not give every existing ModelDeployment
    a new revision (a rollout of every model at once)."""
    a = ModelDeploymentSpec.model_validate(BASE["spec"])
    empty = ModelDeploymentSpec.model_validate({**BASE["spec"], "volumes": [], "volumeMounts": []})
    claim = {"name": "w", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}
    mounted = ModelDeploymentSpec.model_validate(
        {**BASE["spec"], "volumes": [claim], "volumeMounts": [{"name": "w", "mountPath": "/m"}]}
    )
    # The hash trimtab gave this spec before spec.volumes existed.
    assert revision_of(a) == revision_of(empty) == "b74a8b1f27"
    assert revision_of(mounted) != revision_of(a)


def test_wire_roundtrip_is_camel_case() -> None:
    spec = ModelDeploymentSpec.model_validate(
        {"image": "x", "resources": {"cpuLimit": "2", "cpu": "1"}, "nodeSelector": {"a": "b"}}
    )
    wire = spec.to_wire()
    assert wire["resources"]["cpuLimit"] == "2"
    assert wire["nodeSelector"] == {"a": "b"}
