"""Right-sizing of TrainingJob workers, the pure parts: the spec the next attempt is built from
(`effective_training_spec`), a worker's resources, the operator's own record of an OOM kill,
the pod pattern of every attempt's workers, and the Job those resources reach."""

from __future__ import annotations

import datetime
import re
from typing import Any

import pytest

from trimtab.api.rightsizing import AppliedResources, RecommendationsStatus, ResourceAmounts
from trimtab.api.trainingjob import TrainingJobSpec, WorkerFailure
from trimtab.builders.common import Owner, child_name
from trimtab.builders.serving import deployment_name
from trimtab.builders.training import (
    build_job,
    build_podgroup,
    job_name,
    job_pod_regex,
    worker_pod_regex,
)
from trimtab.decisions.rightsizing import (
    ContainerUsage,
    GiB,
    effective_training_spec,
    resources_hash,
    with_failure_kill,
    worker_resources,
)
from trimtab.handlers.rightsizing import oom_since_last_pass
from trimtab.metrics.usage import TERMINATED_SERIES, UsageTarget, pod_regex_for, usage_queries

OWNER = Owner("trimtab.io/v1alpha1", "TrainingJob", "llama", "ml", "uid-1")
APPLIED = ResourceAmounts(cpu="1500m", memory="12Gi", memory_limit="12Gi")


def spec(mode: str = "Auto", **resources: Any) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate(
        {
            "image": "ghcr.io/acme/train:1",
            "command": ["train.py"],
            "workers": 4,
            "gpusPerWorker": 8,
            "resources": resources or {"cpu": "4", "memory": "32Gi"},
            "rightsizing": {"mode": mode},
        }
    )


def status_applied_for(written: TrainingJobSpec) -> dict[str, Any]:
    recs = RecommendationsStatus(
        applied=AppliedResources(
            resources=APPLIED,
            applied_at="2025-06-01T12:00:00Z",
            spec_resources_hash=resources_hash(written.resources),
        )
    )
    return {"phase": "Running", "recommendations": recs.to_wire()}


@pytest.mark.parametrize(
    ("tj", "status", "want"),
    [
        pytest.param(spec("Recommend"), status_applied_for(spec()), ("4", "32Gi", None),
                     id="recommend-ignores-applied"),
        pytest.param(spec("Off"), status_applied_for(spec()), ("4", "32Gi", None),
                     id="off-ignores-applied"),
        pytest.param(spec(), status_applied_for(spec()), ("1500m", "12Gi", "12Gi"),
                     id="auto-applied-for-this-spec"),
        pytest.param(spec(cpu="8", memory="32Gi"), status_applied_for(spec()),
                     ("8", "32Gi", None), id="auto-spec-edited-since-user-wins"),
        pytest.param(spec(), {"phase": "Running"}, ("4", "32Gi", None),
                     id="auto-nothing-applied-yet"),
        pytest.param(spec(), None, ("4", "32Gi", None), id="auto-no-status"),
    ],
)  # fmt: skip
def test_effective_training_spec(
    tj: TrainingJobSpec, status: dict[str, Any] | None, want: tuple[str, str, str | None]
) -> None:
    out = effective_training_spec(tj, status)
    assert (out.resources.cpu, out.resources.memory, out.resources.memory_limit) == want
    # Only the resources change: the rest of the attempt is the spec as written.
    assert out.model_copy(update={"resources": tj.resources}) == tj


@pytest.mark.parametrize(
    ("extra", "want"),
    [
        pytest.param({}, (4.0, 32 * GiB, 32 * GiB, 8, "nvidia.com/gpu"), id="gpus-per-worker"),
        pytest.param({"gpusPerWorker": 0}, (4.0, 32 * GiB, 32 * GiB, 0, None), id="cpu-only"),
        pytest.param({"gpusPerWorker": 1, "gpuResourceName": "nvidia.com/mig-3g.40gb"},
                     (4.0, 32 * GiB, 32 * GiB, 1, "nvidia.com/mig-3g.40gb"), id="mig-profile"),
        pytest.param({"resources": {"cpu": "2", "memory": "8Gi", "memoryLimit": "10Gi"}},
                     (2.0, 8 * GiB, 10 * GiB, 8, "nvidia.com/gpu"), id="explicit-memory-limit"),
    ],
)  # fmt: skip
def test_worker_resources(extra: dict[str, Any], want: tuple[Any, ...]) -> None:
    raw = spec().model_dump(by_alias=True, exclude_none=True)
    raw.update(extra)
    r = worker_resources(TrainingJobSpec.model_validate(raw))
    assert (r.cpu, r.memory, r.memory_limit, r.gpu, r.gpu_resource_name) == want


KILL = datetime.datetime(2025, 6, 1, 12, 0, tzinfo=datetime.UTC).timestamp()


def oom(
    reason: str = "OOMKilled",
    time: str | None = "2025-06-01T12:00:00Z",
    memory_limit: str | None = "16Gi",
) -> WorkerFailure:
    return WorkerFailure(
        worker=1,
        pod="llama-r0-1-abcde",
        exit_code=137,
        reason=reason,
        time=time,
        memory_limit=memory_limit,
    )


def usage(kills: list[tuple[float, float]]) -> ContainerUsage:
    return ContainerUsage(
        container="trainer",
        step_seconds=300.0,
        memory=[(KILL - 600, 10 * GiB), (KILL - 10, 15 * GiB)],
        oom_kills=kills,
    )


@pytest.mark.parametrize(
    ("failure", "seen", "want"),
    [
        pytest.param(oom(), [], [(KILL, 16 * GiB)], id="unseen-kill-added-at-its-limit"),
        pytest.param(oom(), [(KILL + 45, 16 * GiB)], [(KILL + 45, 16 * GiB)],
                     id="prometheus-saw-it-same-kill"),
        pytest.param(oom(), [(KILL - 7200, 12 * GiB)],
                     [(KILL - 7200, 12 * GiB), (KILL, 16 * GiB)], id="earlier-kill-kept-both"),
        pytest.param(oom(memory_limit=None), [], [(KILL, 15 * GiB)],
                     id="no-limit-recorded-nearest-working-set"),
        pytest.param(oom(reason="Error"), [], [], id="not-an-oom"),
        pytest.param(oom(time=None), [], [], id="no-time"),
        pytest.param(None, [], [], id="no-failure"),
    ],
)  # fmt: skip
def test_with_failure_kill(
    failure: WorkerFailure | None,
    seen: list[tuple[float, float]],
    want: list[tuple[float, float]],
) -> None:
    """A kill is valued at the limit the failed worker had, whatever the next attempt gets: the
    failure carries it, so a raise for this kill cannot re-value it and raise again."""
    assert list(with_failure_kill(usage(seen), failure).oom_kills) == want


def controller_pod_name(job: str, index: int, suffix: str = "x2x9z") -> str:
    """The Job controller's naming of an Indexed Job's pods (podGenerateNameWithIndex)."""
    append = f"-{index}-"
    prefix = job + append
    if len(prefix) > 58:
        prefix = prefix[: 58 - len(append)] + append
    return prefix + suffix


LONG = "a-very-long-training-job-name-for-the-llama-3-70b-finetune"  # 58 characters


@pytest.mark.parametrize(
    ("owner", "pod", "matches"),
    [
        pytest.param("llama", controller_pod_name(job_name("llama", 0), 0), True, id="r0-w0"),
        pytest.param("llama", controller_pod_name(job_name("llama", 7), 15), True, id="r7-w15"),
        pytest.param("llama", "llama-r1-r0-0-abcde", False, id="another-tj-llama-r1"),
        pytest.param("llama", "llama2-r0-0-abcde", False, id="another-tj-llama2"),
        pytest.param("llama", "llama-0123456789-7d9f8c6b5-x2x9z", False, id="a-modeldeployment"),
        pytest.param("llama", "llama-r0-0", False, id="no-random-suffix"),
        pytest.param(LONG, controller_pod_name(job_name(LONG, 0), 0), True, id="long-name-r0"),
        pytest.param(LONG, controller_pod_name(job_name(LONG, 12), 999), True,
                     id="long-name-cut-by-job-controller"),
        pytest.param("Llama.v2", controller_pod_name(job_name("Llama.v2", 0), 1), True,
                     id="name-made-dns-label"),
    ],
)  # fmt: skip
def test_worker_pod_regex(owner: str, pod: str, matches: bool) -> None:
    assert bool(re.fullmatch(worker_pod_regex(owner), pod)) is matches


@pytest.mark.parametrize(
    ("job", "pod", "matches"),
    [
        pytest.param("llama-r0", controller_pod_name("llama-r0", 3), True, id="short"),
        pytest.param("llama-r0", controller_pod_name("llama-r1", 3), False, id="other-attempt"),
        pytest.param(job_name(LONG, 0), controller_pod_name(job_name(LONG, 0), 0), True,
                     id="cut-by-job-controller-index-0"),
        pytest.param(job_name(LONG, 0), controller_pod_name(job_name(LONG, 0), 1234), True,
                     id="cut-by-job-controller-index-1234"),
        # Cut that far, two attempts' pods are named alike (the cut takes "-r<n>" off): the
        # Job controller leaves nothing to tell them apart by name.
    ],
)  # fmt: skip
def test_job_pod_regex(job: str, pod: str, matches: bool) -> None:
    """The pods of one attempt, as the diagnosis reads their GPU use: a long Job name is cut by
    the Job controller, and the cut name must still match."""
    assert bool(re.fullmatch(job_pod_regex(job), pod)) is matches


def replicaset_pod_name(deployment: str, template_hash: str, suffix: str = "x2x9z") -> str:
    """The ReplicaSet controller's naming of its pods: generateName `<deployment>-<hash>-`, cut
    to 58 characters, then 5 random ones."""
    return f"{deployment}-{template_hash}-"[:58] + suffix


@pytest.mark.parametrize("length", [1, 20, 35, 36, 37, 45, 52, 63])
@pytest.mark.parametrize("template_hash", ["6d4cf56db6", "7d9f8c6b5", "5b4c"])
def test_modeldeployment_pod_regex_survives_the_58_character_cut(
    length: int, template_hash: str
) -> None:
    """Right-sizing reads a ModelDeployment's pods by name: any name the CRD accepts (up to 63
    characters) must match its own pods and not those of a longer name that starts with it."""
    name = ("m" + "odel-" * 13)[:length].rstrip("-") or "m"
    prefix = child_name(name, "0" * 10)[: -len("-" + "0" * 10)]
    deployment = deployment_name(name, "0123456789")
    rx = pod_regex_for(prefix)
    assert re.fullmatch(rx, replicaset_pod_name(deployment, template_hash)), (name, rx)
    other = deployment_name(name + "x", "0123456789")
    if len(name) < 52:  # a longer name that child_name does not trim back to this one
        assert not re.fullmatch(rx, replicaset_pod_name(other, template_hash)), (name, rx)


def test_job_pods_read_oom_kills_from_terminated_reason() -> None:
    """A Job pod is never restarted: its kill shows in the terminated reason, not restarts."""
    job_pods = UsageTarget("ml", worker_pod_regex("llama"), "trainer", restarts_in_place=False)
    oom = usage_queries(job_pods, 300, "2m")["oom"]
    assert TERMINATED_SERIES in oom and "restarts_total" not in oom
    served = usage_queries(UsageTarget("ml", "chat-.*", "server"), 300, "2m")
    assert TERMINATED_SERIES not in served["oom"] and "last_terminated_reason" in served["oom"]
    assert "restarts_total" in served["restarts"]


def test_next_attempt_job_and_podgroup_carry_the_applied_resources() -> None:
    raw = spec().model_dump(by_alias=True, exclude_none=True)
    raw["scheduling"] = {"gang": {"enabled": True}}
    gang = TrainingJobSpec.model_validate(raw)
    effective = effective_training_spec(gang, status_applied_for(gang))
    job = build_job(OWNER, effective, restarts=1)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["cpu"] == "1500m"
    assert container["resources"]["requests"]["memory"] == "12Gi"
    assert container["resources"]["limits"]["memory"] == "12Gi"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # The gang's minimum is four workers of the applied size.
    group = build_podgroup(OWNER, effective, restarts=1)
    assert group["spec"]["minResources"]["memory"] == "48Gi"
    assert group["spec"]["minResources"]["cpu"] == "6"


@pytest.mark.parametrize(
    ("status", "want"),
    [
        pytest.param({"lastFailure": {"reason": "OOMKilled", "time": "2025-06-01T12:00:00Z"},
                      "recommendations": {"updatedAt": "2025-06-01T11:58:00Z"}}, True,
                     id="kill-after-last-pass-runs-now"),
        pytest.param({"lastFailure": {"reason": "OOMKilled", "time": "2025-06-01T12:00:00Z"},
                      "recommendations": {"updatedAt": "2025-06-01T12:01:00Z"}}, False,
                     id="kill-already-seen-by-a-pass"),
        pytest.param({"lastFailure": {"reason": "OOMKilled", "time": "2025-06-01T12:00:00Z"}},
                     True, id="kill-before-any-pass"),
        pytest.param({"lastFailure": {"reason": "Error", "time": "2025-06-01T12:00:00Z"},
                      "recommendations": {"updatedAt": "2025-06-01T11:58:00Z"}}, False,
                     id="not-an-oom-waits-for-the-interval"),
        pytest.param({}, False, id="no-failure"),
        pytest.param({"lastFailure": {"reason": "OOMKilled", "time": "2025-06-01T12:00:10Z",
                                      "recordedAt": "2025-06-01T12:00:40Z"},
                      "recommendations": {"updatedAt": "2025-06-01T12:00:30Z"}}, True,
                     id="a-pass-before-the-record-never-saw-the-kill-runs-now"),
        pytest.param({"lastFailure": {"reason": "OOMKilled", "time": "2025-06-01T12:00:10Z",
                                      "recordedAt": "2025-06-01T12:00:40Z"},
                      "recommendations": {"updatedAt": "2025-06-01T12:00:41Z"}}, False,
                     id="a-pass-after-the-record-answered-it"),
    ],
)  # fmt: skip
def test_oom_since_last_pass(status: dict[str, Any], want: bool) -> None:
    """A TrainingJob's OOM kill (status.lastFailure) starts a right-sizing pass at once rather
    than an interval later, so the raise can reach the next attempt's Job."""
    assert oom_since_last_pass(status) is want
