"""TrainingJob manifests: the Indexed Job, headless Service and PodGroup are valid for their
APIs (kubernetes-validate --strict, the published PodGroup CRD) and carry the torchrun wiring."""

from __future__ import annotations

from typing import Any

import pytest

from tests.validation import thirdparty, validate_builtin, validate_custom
from trimtab import constants as C
from trimtab.api.trainingjob import TrainingJobSpec
from trimtab.builders import training as B
from trimtab.builders.common import Owner

OWNER = Owner(C.API_VERSION, C.TRAININGJOB_KIND, "llama", "ml", "uid-1")
PODGROUP_CRD = thirdparty("scheduler-plugins", "scheduling.x-k8s.io_podgroups.yaml")

FULL: dict[str, Any] = {
    "image": "ghcr.io/acme/train:1",
    "command": ["train.py"],
    "args": ["--epochs", "3"],
    "env": [{"name": "HF_HOME", "value": "/ckpt/hf"}],
    "workers": 2,
    "gpusPerWorker": 8,
    "resources": {"cpu": "32", "memory": "200Gi"},
    "volumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "llama-ckpt"}}],
    "volumeMounts": [{"name": "ckpt", "mountPath": "/ckpt"}],
    "checkpoint": {"directory": "/ckpt/run1", "arg": "--resume-from"},
    "scheduling": {
        "queueName": "team-a",
        "priorityClassName": "training",
        "gang": {"enabled": True, "scheduleTimeoutSeconds": 600},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "failurePolicy": {"maxRestarts": 5, "neverRetryExitCodes": [2, 3]},
    "podMetadata": {
        "labels": {"team": "search"},
        "annotations": {"sidecar.istio.io/inject": "false"},
    },
}


def spec(**over: Any) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate({**FULL, **over})


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize(
    "s",
    [
        pytest.param(spec(), id="full"),
        pytest.param(
            TrainingJobSpec(
                image="busybox",
                command=["sh", "-c", "true"],
                workers=1,
                distributed={"launcher": "none"},
            ),
            id="minimal-no-launcher",
        ),
        pytest.param(spec(gpusPerWorker=0, scheduling={}, failurePolicy={}), id="cpu-only"),
    ],
)
def test_manifests_validate(s: TrainingJobSpec) -> None:
    objs = B.build_all(OWNER, s, restarts=3, active_deadline_seconds=3600)
    kinds = [o["kind"] for o in objs]
    assert kinds[0] == "Service" and kinds[-1] == "Job"
    for obj in objs:
        if obj["kind"] == "PodGroup":
            validate_custom(obj, PODGROUP_CRD)
        else:
            validate_builtin(obj)


def test_indexed_job_owns_no_retries() -> None:
    job = B.build_job(OWNER, spec(), restarts=2)
    js = job["spec"]
    assert job["metadata"]["name"] == "llama-r2"
    assert js["completionMode"] == "Indexed"
    assert js["completions"] == js["parallelism"] == 2
    assert js["backoffLimit"] == 0
    assert js["template"]["spec"]["restartPolicy"] == "Never"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert job["metadata"]["labels"][B.LABEL_RESTART] == "2"


def test_torchrun_environment_and_command_line() -> None:
    job = B.build_job(OWNER, spec(), restarts=1)
    env = env_of(job)
    assert env["MASTER_ADDR"] == "llama-r1-0.llama"
    assert env["MASTER_PORT"] == "29500"
    assert env["WORLD_SIZE"] == "16"
    assert env["NPROC_PER_NODE"] == "8"
    assert env["NNODES"] == "2"
    assert env["NODE_RANK"] == {
        "fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        }
    }
    assert env["TRIMTAB_CHECKPOINT_DIR"] == "/ckpt/run1"
    assert env["TRIMTAB_RESTART_COUNT"] == "1"
    assert env["HF_HOME"] == "/ckpt/hf"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["torchrun"]
    assert container["args"] == [
        "--nnodes=2",
        "--nproc-per-node=8",
        "--node-rank=$(NODE_RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "--max-restarts=0",
        "train.py",
        "--epochs",
        "3",
        "--resume-from",
        "/ckpt/run1",
    ]
    # Variables referenced as $(NAME) must come earlier in the list to expand.
    names = [e["name"] for e in container["env"]]
    assert names.index("NODE_RANK") < names.index("PET_NODE_RANK")
    assert container["resources"] == {
        "requests": {"cpu": "32", "memory": "200Gi", "nvidia.com/gpu": "8"},
        "limits": {"memory": "200Gi", "nvidia.com/gpu": "8"},
    }


def test_pods_get_stable_dns_through_the_headless_service() -> None:
    s = spec()
    job = B.build_job(OWNER, s, restarts=0)
    svc = B.build_service(OWNER, s)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert job["spec"]["template"]["spec"]["subdomain"] == svc["metadata"]["name"]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())


def test_kueue_job_is_created_suspended_with_the_queue_label() -> None:
    job = B.build_job(OWNER, spec(), restarts=0)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    unqueued = B.build_job(OWNER, spec(scheduling={}), restarts=0)
    assert unqueued["spec"]["suspend"] is False
    assert "kueue.x-k8s.io/queue-name" not in unqueued["metadata"]["labels"]


def test_gang_podgroup_ties_to_the_pods() -> None:
    s = spec()
    job = B.build_job(OWNER, s, restarts=4)
    pg = B.build_podgroup(OWNER, s, restarts=4)
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == pg["metadata"]["name"]
    assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
    assert pg["spec"]["minMember"] == 2
    assert pg["spec"]["scheduleTimeoutSeconds"] == 600
    # Two workers of 32 cores, 200Gi and 8 GPUs each.
    assert pg["spec"]["minResources"] == {"cpu": "64", "memory": "400Gi", "nvidia.com/gpu": "16"}
    no_gang = B.build_job(OWNER, spec(scheduling={}), restarts=0)["spec"]["template"]
    assert "scheduling.x-k8s.io/pod-group" not in no_gang["metadata"]["labels"]
    assert "schedulerName" not in no_gang["spec"]


def test_pod_metadata_reaches_the_workers_beside_trimtabs_own() -> None:
    job = B.build_job(OWNER, spec(), restarts=2)
    meta = job["spec"]["template"]["metadata"]
    assert meta["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert meta["labels"] == {
        "team": "search",
        **B.worker_labels(OWNER, 2),
        "scheduling.x-k8s.io/pod-group": B.podgroup_name("llama", 2),
    }
    # The Job's own labels (which Kueue reads) stay trimtab's: podMetadata is the pods'.
    assert "team" not in job["metadata"]["labels"]
    bare = B.build_job(OWNER, spec(podMetadata={}), restarts=2)["spec"]["template"]["metadata"]
    assert "annotations" not in bare and "team" not in bare["labels"]


def test_never_retry_exit_codes_fail_the_job_through_pod_failure_policy() -> None:
    job = B.build_job(OWNER, spec(), restarts=0)
    assert job["spec"]["podFailurePolicy"]["rules"] == [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2, 3]},
        }
    ]
    plain = B.build_job(OWNER, spec(failurePolicy={}), restarts=0)
    assert "podFailurePolicy" not in plain["spec"]


def test_gpu_workers_get_a_memory_backed_dev_shm_unless_they_mount_one() -> None:
    pod = B.build_job(OWNER, spec(), restarts=0)["spec"]["template"]["spec"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    own = spec(
        volumes=[*FULL["volumes"], {"name": "shm", "emptyDir": {"medium": "Memory"}}],
        volumeMounts=[*FULL["volumeMounts"], {"name": "shm", "mountPath": "/dev/shm"}],
    )
    pod = B.build_job(OWNER, own, restarts=0)["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["ckpt", "shm"]


def test_spec_env_overrides_ours() -> None:
    job = B.build_job(OWNER, spec(env=[{"name": "MASTER_PORT", "value": "1234"}]), restarts=0)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert [e["value"] for e in container["env"] if e["name"] == "MASTER_PORT"] == ["1234"]


def test_an_overridden_variable_comes_before_what_refers_to_it() -> None:
    """The kubelet expands $(VAR) only from entries before it: a MASTER_PORT from the spec
    takes the place of ours, so PET_MASTER_PORT=$(MASTER_PORT) expands to it (placed after,
    it was left as the literal "$(MASTER_PORT)"); the spec's other entries follow ours."""
    s = spec(env=[{"name": "HF_HOME", "value": "/cache/$(MASTER_ADDR)"},
                  {"name": "MASTER_PORT", "value": "1234"}])  # fmt: skip
    env = B.build_job(OWNER, s, restarts=0)["spec"]["template"]["spec"]["containers"][0]["env"]
    names = [e["name"] for e in env]
    assert names.count("MASTER_PORT") == 1
    assert names.index("MASTER_PORT") < names.index("PET_MASTER_PORT")
    assert env[names.index("MASTER_PORT")]["value"] == "1234"
    assert names.index("HF_HOME") > names.index("MASTER_ADDR")
    assert names[-1] == "HF_HOME"


def test_launcher_none_runs_the_command_as_is() -> None:
    s = spec(command=["python", "-m", "pkg.train"], distributed={"launcher": "none"})
    container = B.build_job(OWNER, s, restarts=0)["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "pkg.train"]
    assert container["args"] == ["--epochs", "3", "--resume-from", "/ckpt/run1"]


def test_processes_per_worker_override() -> None:
    s = spec(distributed={"processesPerWorker": 4})
    assert env_of(B.build_job(OWNER, s, restarts=0))["WORLD_SIZE"] == "8"


def test_deadline_is_passed_to_the_job() -> None:
    job = B.build_job(OWNER, spec(), restarts=0, active_deadline_seconds=90)
    assert job["spec"]["activeDeadlineSeconds"] == 90


@pytest.mark.parametrize(
    ("name", "restarts", "want"),
    [
        pytest.param("llama", 0, "llama-r0", id="short"),
        pytest.param("a" * 63, 12, "a" * 54 + "-r12", id="long-trimmed-for-hostnames"),
        pytest.param("team.llama", 1, "team-llama-r1", id="dots"),
        pytest.param("7b-run", 0, "tj-7b-run-r0", id="leading-digit"),
    ],
)
def test_job_names_fit_pod_hostnames(name: str, restarts: int, want: str) -> None:
    got = B.job_name(name, restarts)
    assert got == want
    assert len(f"{got}-999") <= 63
