"""Serving manifests: golden output for the example, and every preset's Deployment and Service
valid for the Kubernetes API (kubernetes-validate --strict)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import yaml

from tests.validation import ROOT, validate_builtin
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.servers import SERVER_DEFAULTS
from trimtab.builders.common import Owner, child_name
from trimtab.builders.serving import build_deployment, build_service, revision_of
from trimtab.render import RenderError, render_modeldeployment

OWNER = Owner(C.API_VERSION, C.MODELDEPLOYMENT_KIND, "llama-8b", "default", "uid-1")
GOLDEN = ROOT / "tests" / "golden" / "modeldeployment-render.yaml"


def test_example_renders_to_golden_manifests() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "modeldeployment.yaml").read_text())
    rendered = yaml.safe_dump_all(render_modeldeployment(doc), sort_keys=False)
    if os.environ.get("UPDATE_GOLDEN") or not GOLDEN.exists():
        GOLDEN.write_text(rendered)
    assert rendered == GOLDEN.read_text(), "set UPDATE_GOLDEN=1 to accept a deliberate change"


@pytest.mark.parametrize("server", sorted(SERVER_DEFAULTS))
@pytest.mark.parametrize("gpu", [0, 2], ids=["cpu", "gpu"])
def test_every_preset_builds_valid_objects(server: str, gpu: int) -> None:
    spec = ModelDeploymentSpec.model_validate(
        {
            "server": server,
            "image": "example/server:1",
            "resources": {"cpu": "500m", "memory": "2Gi", "gpu": gpu},
            "env": [{"name": "A", "value": "1"}],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        }
    )
    revision = revision_of(spec)
    deploy = build_deployment(OWNER, spec, revision, replicas=3)
    service = build_service(OWNER, spec)
    validate_builtin(deploy)
    validate_builtin(service)
    defaults = SERVER_DEFAULTS[server]
    pod = deploy["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == defaults.readiness_path
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(defaults.metrics_port)
    assert deploy["spec"]["selector"]["matchLabels"] == {
        C.LABEL_OWNER: "llama-8b",
        C.LABEL_REVISION: revision,
    }
    # The Service selects every revision's pods.
    assert set(service["spec"]["selector"].items()) <= set(pod["metadata"]["labels"].items())
    limits = container["resources"]["limits"]
    assert limits["memory"] == "2Gi"  # memory limit = request
    assert "cpu" not in limits  # no CPU limit by default
    if gpu:
        assert limits["nvidia.com/gpu"] == "2"
    else:
        assert "nvidia.com/gpu" not in limits


CLAIM = {"name": "weights", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}
WEIGHTS = {"name": "weights", "mountPath": "/models", "readOnly": True}
OWN_SHM = {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}
ADDED_SHM = ({"name": "dshm", "emptyDir": {"medium": "Memory"}},
             {"name": "dshm", "mountPath": "/dev/shm"})


@pytest.mark.parametrize(
    ("spec", "volumes", "mounts"),
    [
        pytest.param({"server": "vllm", "resources": {"gpu": 1}, "volumes": [CLAIM],
                      "volumeMounts": [WEIGHTS]},
                     [CLAIM, ADDED_SHM[0]], [WEIGHTS, ADDED_SHM[1]],
                     id="weights-on-a-claim-beside-the-added-shm"),
        pytest.param({"server": "vllm", "resources": {"gpu": 1}, "volumes": [CLAIM, OWN_SHM],
                      "volumeMounts": [WEIGHTS, {"name": "shm", "mountPath": "/dev/shm"}]},
                     [CLAIM, OWN_SHM], [WEIGHTS, {"name": "shm", "mountPath": "/dev/shm"}],
                     id="own-shm-replaces-the-added-one"),
        pytest.param({"server": "generic", "volumes": [{"name": "cfg", "configMap": {"name": "c"}}],
                      "volumeMounts": [{"name": "cfg", "mountPath": "/etc/server"}]},
                     [{"name": "cfg", "configMap": {"name": "c"}}],
                     [{"name": "cfg", "mountPath": "/etc/server"}],
                     id="cpu-server-with-a-config"),
        pytest.param({"server": "vllm", "resources": {"gpu": 1}}, [ADDED_SHM[0]],
                     [ADDED_SHM[1]], id="gpu-server-without-volumes"),
        pytest.param({"server": "generic"}, None, None, id="no-volumes-at-all"),
    ],
)  # fmt: skip
def test_volumes_reach_the_server_container(
    spec: dict[str, Any], volumes: list[Any] | None, mounts: list[Any] | None
) -> None:
    parsed = ModelDeploymentSpec.model_validate({"image": "example/server:1", **spec})
    deploy = build_deployment(OWNER, parsed, revision_of(parsed), replicas=1)
    validate_builtin(deploy)
    pod = deploy["spec"]["template"]["spec"]
    assert pod.get("volumes") == volumes
    assert pod["containers"][0].get("volumeMounts") == mounts


def test_priority_class_reaches_the_pods_and_makes_a_revision() -> None:
    plain = ModelDeploymentSpec.model_validate({"image": "srv:1"})
    high = ModelDeploymentSpec.model_validate({"image": "srv:1", "priorityClassName": "serving"})
    deploy = build_deployment(OWNER, high, revision_of(high), replicas=1)
    validate_builtin(deploy)
    assert deploy["spec"]["template"]["spec"]["priorityClassName"] == "serving"
    assert "priorityClassName" not in build_deployment(
        OWNER, plain, revision_of(plain), replicas=1
    )["spec"]["template"]["spec"]
    # A new pod template, so a new revision; unset, the hash is what it was before the field.
    assert revision_of(high) != revision_of(plain)
    assert plain.model_part() == {"image": "srv:1"}


@pytest.mark.parametrize(
    ("spread", "expected"),
    [
        pytest.param([], None, id="none"),
        pytest.param(
            [{"topologyKey": "topology.kubernetes.io/zone"},
             {"topologyKey": "kubernetes.io/hostname", "maxSkew": 2,
              "whenUnsatisfiable": "DoNotSchedule"}],
            [("topology.kubernetes.io/zone", 1, "ScheduleAnyway"),
             ("kubernetes.io/hostname", 2, "DoNotSchedule")],
            id="zones-preferred-nodes-required"),
    ],
)  # fmt: skip
def test_topology_spread_covers_every_revisions_pods(
    spread: list[dict[str, Any]], expected: list[tuple[str, int, str]] | None
) -> None:
    spec = ModelDeploymentSpec.model_validate({"image": "srv:1", "topologySpread": spread})
    deploy = build_deployment(OWNER, spec, revision_of(spec), replicas=4)
    validate_builtin(deploy)
    pod = deploy["spec"]["template"]
    constraints = pod["spec"].get("topologySpreadConstraints")
    if expected is None:
        assert constraints is None
        assert revision_of(spec) == revision_of(ModelDeploymentSpec(image="srv:1"))
        return
    got = [(c["topologyKey"], c["maxSkew"], c["whenUnsatisfiable"]) for c in constraints]
    assert got == expected
    for c in constraints:
        # Every revision's pods count together, and this pod is one of them.
        assert c["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert C.LABEL_REVISION not in c["labelSelector"]["matchLabels"]


def test_pod_metadata_reaches_the_pods_beside_trimtabs_own() -> None:
    spec = ModelDeploymentSpec.model_validate({
        "image": "srv:1",
        "podMetadata": {"labels": {"team": "search", "cost-center": "ml-42"},
                        "annotations": {"vault.hashicorp.com/agent-inject": "true"}},
    })  # fmt: skip
    revision = revision_of(spec)
    deploy = build_deployment(OWNER, spec, revision, replicas=1)
    validate_builtin(deploy)
    meta = deploy["spec"]["template"]["metadata"]
    assert meta["labels"]["team"] == "search" and meta["labels"]["cost-center"] == "ml-42"
    assert meta["labels"][C.LABEL_REVISION] == revision
    assert meta["annotations"]["vault.hashicorp.com/agent-inject"] == "true"
    assert meta["annotations"]["prometheus.io/scrape"] == "true"
    # The selector is trimtab's alone: a pod label change makes a new revision, never a
    # Deployment whose selector no longer matches its pods.
    assert deploy["spec"]["selector"]["matchLabels"] == {
        C.LABEL_OWNER: "llama-8b", C.LABEL_REVISION: revision
    }
    assert revision != revision_of(ModelDeploymentSpec(image="srv:1"))


def test_mig_profile_and_explicit_limits() -> None:
    spec = ModelDeploymentSpec.model_validate(
        {
            "image": "x",
            "resources": {
                "gpu": 1,
                "gpuResourceName": "nvidia.com/mig-3g.40gb",
                "memory": "8Gi",
                "memoryLimit": "12Gi",
                "cpu": "2",
                "cpuLimit": "4",
            },
        }
    )
    container = build_deployment(OWNER, spec, "r", 1)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {
        "cpu": "4",
        "memory": "12Gi",
        "nvidia.com/mig-3g.40gb": "1",
    }


def test_names_stay_dns_labels() -> None:
    name = child_name("a" * 80, "0123456789")
    assert len(name) <= 63 and name.endswith("-0123456789")


def test_render_refuses_what_the_operator_would_degrade() -> None:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "modeldeployment.yaml").read_text())
    doc["spec"]["args"] = ["--tensor-parallel-size", "8"]
    with pytest.raises(RenderError, match="tensor-parallel-size 8"):
        render_modeldeployment(doc)
