"""TrainingJob spec validation: the generated CRD (schema and CEL) and the pydantic model accept
good specs and reject bad ones naming the field, and the examples validate."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest
import yaml

from tests.validation import ROOT, thirdparty, validate_builtin, validate_custom
from trimtab import constants as C
from trimtab.api.trainingjob import TrainingJobSpec
from trimtab.builders.common import Owner
from trimtab.builders.training import build_all
from trimtab.decisions.training import find_spec_problems

CRD = ROOT / "crds" / "trimtab.io_trainingjobs.yaml"


def tj(**spec: Any) -> dict[str, Any]:
    """A TrainingJob with `spec` over a minimal one; a None value removes that field."""
    base: dict[str, Any] = {"image": "ghcr.io/acme/train:1", "command": ["train.py"], "workers": 2}
    base.update(spec)
    base = {k: v for k, v in base.items() if v is not None}
    return {
        "apiVersion": "trimtab.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "llama", "namespace": "ml"},
        "spec": base,
    }


def rejection(obj: dict[str, Any]) -> str:
    """The CRD's complaint about `obj`, or '' when it is accepted."""
    try:
        validate_custom(obj, CRD)
    except jsonschema.ValidationError as err:
        return f"{'.'.join(str(p) for p in err.absolute_path)}: {err.message}"
    except AssertionError as err:
        return str(err)
    return ""


CKPT = {
    "volumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "llama-ckpt"}}],
    "volumeMounts": [{"name": "ckpt", "mountPath": "/ckpt"}],
    "checkpoint": {"directory": "/ckpt/run1"},
}


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param({}, id="minimal"),
        pytest.param({"gpusPerWorker": 8, **CKPT}, id="gpus-and-checkpoint-on-pvc"),
        pytest.param({"gpusPerWorker": 1, "gpuResourceName": "nvidia.com/mig-3g.40gb"}, id="mig"),
        pytest.param({"checkpoint": {"directory": "s3://bucket/run"}}, id="checkpoint-uri"),
        pytest.param(
            {"failurePolicy": {"maxRestarts": -1}, "activeDeadlineSeconds": 86400},
            id="unlimited-restarts-with-deadline",
        ),
        pytest.param(
            {"scheduling": {"queueName": "team-a", "gang": {"enabled": True}}}, id="kueue-and-gang"
        ),
        pytest.param(
            {
                "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}],
                "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
            },
            id="emptydir-shm",
        ),
        pytest.param({"resources": {"cpu": "16", "memory": "64Gi"}}, id="cpu-memory"),
        pytest.param(
            {"command": None, "distributed": {"launcher": "none"}}, id="entrypoint-without-torchrun"
        ),
        pytest.param(
            {
                "volumes": [
                    {"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt.v2"}},
                    {"name": "cfg", "configMap": {"name": "train.config"}},
                    {"name": "tok", "secret": {"secretName": "hf-token.prod"}},
                ],
                "volumeMounts": [{"name": "ckpt", "mountPath": "/ckpt"}],
            },
            id="object-names-with-dots-as-kubernetes-allows",
        ),
    ],
)
def test_accepted(spec: dict[str, Any]) -> None:
    obj = tj(**spec)
    assert rejection(obj) == ""
    TrainingJobSpec.model_validate(obj["spec"])


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        pytest.param("llama-3.1-8b", True, id="dots-allowed-service-name-is-derived"),
        pytest.param("t" * 63, True, id="63-characters"),
        pytest.param("t" * 64, False, id="64-characters-too-long-for-a-label"),
    ],
)
def test_names_must_fit_a_label(name: str, accepted: bool) -> None:
    """The name labels every pod (trimtab.io/owner): a label value has at most 63 characters."""
    obj = tj()
    obj["metadata"]["name"] = name
    assert (rejection(obj) == "") == accepted
    if not accepted:
        assert "metadata.name must be at most 63" in rejection(obj)


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        pytest.param({"workers": 0}, "workers", id="zero-workers"),
        pytest.param({"workers": None}, "workers", id="no-workers"),
        pytest.param(
            {"gpusPerWorker": 8, "gpuResourceName": ""},
            "gpuResourceName",
            id="gpus-without-resource-name",
        ),
        pytest.param(
            {"gpuResourceName": "nvidia.com/gpu"},
            "gpuResourceName",
            id="resource-name-without-gpus",
        ),
        pytest.param({"resources": {"gpu": 8}}, "resources.gpu", id="gpus-in-resources"),
        pytest.param(
            {"failurePolicy": {"maxRestarts": -1}},
            "maxRestarts",
            id="unlimited-restarts-never-finish",
        ),
        pytest.param(
            {"failurePolicy": {"neverRetryExitCodes": [0]}},
            "neverRetryExitCodes",
            id="exit-code-zero-never-retried",
        ),
        pytest.param(
            {"failurePolicy": {"backoffSeconds": 60, "maxBackoffSeconds": 10}},
            "maxBackoffSeconds",
            id="backoff-cap-below-start",
        ),
        pytest.param(
            {"checkpoint": {"directory": "/ckpt"}},
            "checkpoint.directory",
            id="checkpoint-not-on-a-volume",
        ),
        pytest.param(
            {"checkpoint": {"directory": "relative/dir"}}, "directory", id="checkpoint-relative"
        ),
        pytest.param(
            {"volumeMounts": [{"name": "x", "mountPath": "/x"}]},
            "volumeMounts",
            id="mount-without-volume",
        ),
        pytest.param(
            {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]},
            "hostPath",
            id="hostpath-not-allowed",
        ),
        pytest.param(
            {
                "volumes": [
                    {"name": "v", "emptyDir": {}, "persistentVolumeClaim": {"claimName": "c"}}
                ]
            },
            "exactly one",
            id="two-volume-sources",
        ),
        pytest.param({"distributed": {"launcher": "mpirun"}}, "launcher", id="unknown-launcher"),
        pytest.param({"distributed": {"rendezvousPort": 70000}}, "rendezvousPort", id="bad-port"),
        pytest.param({"replicas": 3}, "replicas", id="unknown-field"),
        pytest.param({"command": None}, "command", id="torchrun-without-a-script"),
    ],
)
def test_rejected_naming_the_field(spec: dict[str, Any], names: str) -> None:
    obj = tj(**spec)
    complaint = rejection(obj)
    assert names in complaint, complaint


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param({"workers": 0}, id="zero-workers"),
        pytest.param({"gpusPerWorker": 8, "gpuResourceName": ""}, id="empty-resource-name"),
        pytest.param({"failurePolicy": {"neverRetryExitCodes": [0]}}, id="exit-code-zero"),
        pytest.param({"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}, id="hostpath"),
        pytest.param({"replicas": 3}, id="unknown-field"),
    ],
)
def test_model_rejects_schema_errors_too(spec: dict[str, Any]) -> None:
    """The operator parses with the same types, so a spec the schema refuses never reaches a
    builder through another path (a test, the simulator) either."""
    with pytest.raises(pydantic.ValidationError):
        TrainingJobSpec.model_validate(tj(**spec)["spec"])


def test_printer_columns_and_short_name() -> None:
    crd = yaml.safe_load(CRD.read_text().split("\n", 1)[1])
    assert crd["spec"]["names"]["shortNames"] == ["tj"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Workers ready",
        "Restarts",
        "Age",
    ]


def examples() -> list[Path]:
    return sorted((ROOT / "examples").glob("trainingjob*.yaml"))


@pytest.mark.parametrize("path", examples(), ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    found = [d for d in docs if d.get("kind") == "TrainingJob"]
    assert found
    for doc in found:
        assert rejection(copy.deepcopy(doc)) == ""
        spec = TrainingJobSpec.model_validate(doc["spec"])
        # The operator would run it: no spec problem, and what it builds is valid.
        assert find_spec_problems(spec) == []
        owner = Owner(C.API_VERSION, C.TRAININGJOB_KIND, doc["metadata"]["name"], "default", "u")
        for obj in build_all(owner, spec, restarts=0):
            if obj["kind"] == "PodGroup":
                validate_custom(obj, thirdparty("scheduler-plugins",
                                                "scheduling.x-k8s.io_podgroups.yaml"))
            else:
                validate_builtin(obj)


def test_there_is_an_example() -> None:
    assert examples()


@pytest.mark.parametrize(
    ("pod_metadata", "complaint"),
    [
        pytest.param({"labels": {"team": "search", "example.com/cost-center": "ml-42"},
                      "annotations": {"sidecar.istio.io/inject": "false",
                                      "prometheus.io/scrape": "true",
                                      "prometheus.io/port": "9400"}},
                     None, id="team-labels-sidecar-off-and-the-trainers-own-scrape"),
        pytest.param({"labels": {"trimtab.io/restart": "9"}}, "labels: trimtab.io/*",
                     id="trimtabs-restart-label"),
        pytest.param({"labels": {"scheduling.x-k8s.io/pod-group": "other"}}, "labels:",
                     id="another-gang"),
        pytest.param({"labels": {"kueue.x-k8s.io/queue-name": "team-b"}}, "labels:",
                     id="kueue-would-queue-each-pod-alone"),
        pytest.param({"labels": {"job-name": "x"}}, "labels:", id="job-controllers-label"),
        pytest.param({"labels": {"app.kubernetes.io/component": "x"}}, "labels:",
                     id="trimtabs-component-label"),
        pytest.param({"annotations": {"batch.kubernetes.io/job-completion-index": "3"}},
                     "annotations:", id="a-workers-rank"),
        pytest.param({"annotations": {"kueue.x-k8s.io/workload": "w"}}, "annotations:",
                     id="kueues-annotation"),
        pytest.param({"labels": {"team name": "a"}}, "label or annotation key", id="bad-key"),
    ],
)  # fmt: skip
def test_pod_metadata(pod_metadata: dict[str, Any], complaint: str | None) -> None:
    """A worker's labels and annotations beside trimtab's: the keys trimtab, the Job
    controller, Kueue and the gang scheduler act on are refused, by the CRD and the model."""
    obj = tj(podMetadata=pod_metadata)
    if complaint is None:
        assert rejection(obj) == ""
        TrainingJobSpec.model_validate(obj["spec"])
    else:
        assert complaint in rejection(obj)
        with pytest.raises(pydantic.ValidationError, match=complaint.rstrip(":*")):
            TrainingJobSpec.model_validate(obj["spec"])


def checkpoint_on(volume: dict[str, Any], directory: str = "/ckpt/run1",
                  **mount: Any) -> dict[str, Any]:
    """A checkpoint directory under /ckpt, mounted from `volume` (named ckpt)."""
    return {
        "volumes": [{"name": "ckpt", **volume}],
        "volumeMounts": [{"name": "ckpt", "mountPath": "/ckpt", **mount}],
        "checkpoint": {"directory": directory},
    }  # fmt: skip


PVC = {"persistentVolumeClaim": {"claimName": "llama-ckpt"}}
READ_ONLY = "is on a readOnly mount"
NOT_PERSISTENT = "is on an emptyDir, configMap or secret volume"


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        pytest.param(checkpoint_on(PVC), None, id="pvc"),
        pytest.param(checkpoint_on(PVC, directory="/ckpt"), None, id="pvc-mount-itself"),
        pytest.param(checkpoint_on(PVC, readOnly=False), None, id="pvc-readonly-false"),
        pytest.param(checkpoint_on(PVC, subPath="runs"), None, id="pvc-sub-path"),
        pytest.param(checkpoint_on({"emptyDir": {}}), NOT_PERSISTENT, id="emptydir"),
        pytest.param(checkpoint_on({"emptyDir": {"medium": "Memory"}}), NOT_PERSISTENT,
                     id="emptydir-in-memory"),
        pytest.param(checkpoint_on({"configMap": {"name": "c"}}), NOT_PERSISTENT,
                     id="configmap"),
        pytest.param(checkpoint_on({"secret": {"secretName": "s"}}), NOT_PERSISTENT,
                     id="secret"),
        pytest.param(checkpoint_on(PVC, readOnly=True), READ_ONLY, id="readonly-mount"),
        pytest.param(checkpoint_on({"persistentVolumeClaim": {"claimName": "c",
                                                              "readOnly": True}}),
                     READ_ONLY, id="readonly-claim"),
        pytest.param({"volumes": [{"name": "ckpt", **PVC}, {"name": "tmp", "emptyDir": {}}],
                      "volumeMounts": [{"name": "ckpt", "mountPath": "/ckpt"},
                                       {"name": "tmp", "mountPath": "/ckpt/tmp"}],
                      "checkpoint": {"directory": "/ckpt/tmp/run1"}},
                     NOT_PERSISTENT, id="on-a-scratch-mount-inside-the-claim"),
        pytest.param({"volumes": [{"name": "ckpt", **PVC}, {"name": "tmp", "emptyDir": {}}],
                      "volumeMounts": [{"name": "tmp", "mountPath": "/scratch"},
                                       {"name": "ckpt", "mountPath": "/scratch/ckpt"}],
                      "checkpoint": {"directory": "/scratch/ckpt/run1"}},
                     None, id="on-a-claim-mounted-inside-a-scratch-mount"),
        pytest.param({"volumes": [{"name": "ckpt", **PVC}, {"name": "tmp", "emptyDir": {}}],
                      "volumeMounts": [{"name": "ckpt", "mountPath": "/ckpt"},
                                       {"name": "tmp", "mountPath": "/ckpt-tmp"}],
                      "checkpoint": {"directory": "/ckpt/run1"}},
                     None, id="a-mount-that-only-shares-a-prefix-does-not-count"),
        pytest.param(checkpoint_on({"emptyDir": {}}, directory="s3://bucket/run"), None,
                     id="a-uri-needs-no-volume"),
    ],
)  # fmt: skip
def test_checkpoint_directory_must_be_writable_and_outlive_the_pods(
    spec: dict[str, Any], complaint: str | None
) -> None:
    """Every restart is new pods: an emptyDir starts empty, a configMap or secret is a
    read-only copy, and a readOnly mount cannot be written, so a restart would resume from
    nothing. The mount that holds the directory is the deepest one whose path contains it."""
    got = rejection(tj(**spec))
    if complaint is None:
        assert got == ""
    else:
        assert complaint in got and "checkpoint.directory" in got, got


def test_every_volume_source_is_sorted_into_persistent_or_not() -> None:
    """The checkpoint rule rejects the sources in NON_PERSISTENT_VOLUME_SOURCES and accepts
    the others: a source added to Volume must be sorted here first (an ephemeral volume, a
    projected or downwardAPI one is not persistent; nfs or csi is)."""
    from trimtab.api.common import Volume
    from trimtab.api.trainingjob import NON_PERSISTENT_VOLUME_SOURCES

    persistent = {"persistentVolumeClaim"}
    sources = {(f.alias or n) for n, f in Volume.model_fields.items() if n != "name"}
    assert sources == persistent | set(NON_PERSISTENT_VOLUME_SOURCES)
