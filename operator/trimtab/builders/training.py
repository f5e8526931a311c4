"""Manifests for running a TrainingJob: one Indexed Job per attempt, the headless Service that
gives workers stable DNS names, and the coscheduling PodGroup for an all-or-nothing start.

An attempt's Job is named after the restart count, so a restart is a new Job and never a
mutation of a running one (a Job's pod template is immutable, and Kueue owns `suspend`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from trimtab import constants as C
from trimtab.api.quantity import format_bytes, format_cpu, parse_quantity
from trimtab.api.trainingjob import TrainingJobSpec
from trimtab.builders.common import (
    GENERATE_NAME_LIMIT,
    Manifest,
    Owner,
    child_name,
    container_resources,
    literal_regex,
    object_meta,
)

CONTAINER_NAME = "trainer"
COMPONENT = "training-worker"
LABEL_RESTART = f"{C.GROUP}/restart"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PODGROUP_LABEL = "scheduling.x-k8s.io/pod-group"
PODGROUP_API_VERSION = "scheduling.x-k8s.io/v1alpha1"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
RESTART_ENV = "TRIMTAB_RESTART_COUNT"
# Indexed Job pods get the hostname `<job>-<index>`, which must stay a DNS label (63): leave
# room for "-" and a four-digit index.
JOB_NAME_LIMIT = 58
SHM_PATH = "/dev/shm"


def _dns_label(name: str, limit: int = 63) -> str:
    """A DNS-1035 label from a resource name (which may hold dots or start with a digit)."""
    label = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = f"tj-{label}"
    return label[:limit].rstrip("-")


def job_name(owner_name: str, restarts: int) -> str:
    """`<name>-r<restarts>`: each attempt its own Job."""
    return child_name(_dns_label(owner_name), f"r{restarts}", limit=JOB_NAME_LIMIT)


# The Job controller names an Indexed Job's pods `<job>-<index>-<5 random>`, cutting the job
# name so that `<job>-<index>-` stays within 58 characters. Up to this many characters of the
# name the cut never happens (47 + "-r1000" + "-999-" = 58), so the pattern is exact.
EXACT_POD_PREFIX = 47


def worker_pod_regex(owner_name: str) -> str:
    """A regular expression (full match) for the worker pods of every attempt of a TrainingJob,
    as cAdvisor and kube-state-metrics name them.

    >>> rx = worker_pod_regex("llama")
    >>> [bool(re.fullmatch(rx, p)) for p in ("llama-r0-0-x2x9z", "llama-r12-3-abcde")]
    [True, True]
    >>> [bool(re.fullmatch(rx, p)) for p in ("llama-r1-r0-0-abcde", "llama2-r0-0-abcde")]
    [False, False]

    A name longer than EXACT_POD_PREFIX may be cut by the Job controller anywhere after that
    point, so only its first EXACT_POD_PREFIX characters are matched exactly."""
    label = _dns_label(owner_name)
    tail = r"-[0-9]+-[a-z0-9]{5}"
    if len(label) <= EXACT_POD_PREFIX:
        return literal_regex(label) + r"-r[0-9]+" + tail
    return literal_regex(label[:EXACT_POD_PREFIX]) + r"[-a-z0-9]*" + tail


def job_pod_regex(job: str, max_index_digits: int = 4) -> str:
    """A regular expression (full match) for the pods of one Job attempt, as the Job controller
    names them: `<job>-<index>-<5 random>`, the job name cut where `<job>-<index>-` would pass
    GENERATE_NAME_LIMIT characters (podGenerateNameWithIndex).

    >>> import re; rx = job_pod_regex("llama-r0")
    >>> [bool(re.fullmatch(rx, p)) for p in ("llama-r0-3-x2x9z", "llama-r0-3-x2x9z-1")]
    [True, False]
    """
    branches = [literal_regex(job) + r"-[0-9]+-"]
    for digits in range(1, max_index_digits + 1):
        append = digits + 2  # "-<index>-"
        if len(job) + append > GENERATE_NAME_LIMIT:
            cut = job[: GENERATE_NAME_LIMIT - append]
            branches.append(literal_regex(cut) + rf"-[0-9]{{{digits}}}-")
    body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
    return body + "[a-z0-9]{5}"


def service_name(owner_name: str) -> str:
    """The headless Service; also the pods' `subdomain`."""
    return _dns_label(owner_name)


def podgroup_name(owner_name: str, restarts: int) -> str:
    """One PodGroup per attempt, so a restarted gang never inherits the old one's counts."""
    return job_name(owner_name, restarts)


def master_addr(owner: Owner, restarts: int) -> str:
    """The DNS name of worker 0 (`<job>-0.<service>`): resolvable from every worker in the
    namespace as soon as the pod exists, because the Service publishes unready addresses."""
    return f"{job_name(owner.name, restarts)}-0.{service_name(owner.name)}"


def worker_labels(owner: Owner, restarts: int) -> dict[str, str]:
    return {
        C.LABEL_MANAGED_BY: C.MANAGED_BY,
        C.LABEL_OWNER: owner.name,
        C.LABEL_COMPONENT: COMPONENT,
        LABEL_RESTART: str(restarts),
    }


def _resources(spec: TrainingJobSpec) -> Manifest:
    # An OOM kill of one worker restarts the whole job: the memory limit defaults to the
    # request, so a worker is never the one the node picks when it runs short.
    res = spec.resources
    return container_resources(
        res.cpu, res.memory, res.cpu_limit, res.memory_limit,
        spec.gpu_resource, spec.gpus_per_worker,
    )  # fmt: skip


def distributed_env(owner: Owner, spec: TrainingJobSpec, restarts: int) -> list[Manifest]:
    """The rendezvous environment. NODE_RANK comes from the pod's completion index; torchrun's
    own `PET_*` variables are set too, so a plain `torchrun train.py` in a script works."""
    nproc = spec.processes_per_worker
    port = str(spec.distributed.rendezvous_port)
    env: list[Manifest] = [
        {
            "name": "NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
            },
        },
        {"name": "MASTER_ADDR", "value": master_addr(owner, restarts)},
        {"name": "MASTER_PORT", "value": port},
        {"name": "NNODES", "value": str(spec.workers)},
        {"name": "NPROC_PER_NODE", "value": str(nproc)},
        # PyTorch's meaning: every process of the job, not the number of pods.
        {"name": "WORLD_SIZE", "value": str(spec.workers * nproc)},
        {"name": "PET_NNODES", "value": str(spec.workers)},
        {"name": "PET_NPROC_PER_NODE", "value": str(nproc)},
        {"name": "PET_NODE_RANK", "value": "$(NODE_RANK)"},
        {"name": "PET_MASTER_ADDR", "value": "$(MASTER_ADDR)"},
        {"name": "PET_MASTER_PORT", "value": "$(MASTER_PORT)"},
        {"name": RESTART_ENV, "value": str(restarts)},
    ]
    if spec.checkpoint is not None:
        env.append({"name": spec.checkpoint.env_var, "value": spec.checkpoint.directory})
    return env


def torchrun_args(spec: TrainingJobSpec) -> list[str]:
    """torchrun's flags with the static rendezvous on worker 0. trimtab owns restarts, so
    torchrun never restarts its processes itself (--max-restarts=0): a failure ends the pod and
    the whole job restarts from the checkpoint."""
    return [
        f"--nnodes={spec.workers}",
        f"--nproc-per-node={spec.processes_per_worker}",
        "--node-rank=$(NODE_RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "--max-restarts=0",
    ]


def _command_and_args(spec: TrainingJobSpec) -> tuple[list[str] | None, list[str]]:
    resume: list[str] = []
    if spec.checkpoint is not None and spec.checkpoint.arg:
        resume = [spec.checkpoint.arg, spec.checkpoint.directory]
    if spec.distributed.launcher == "torchrun":
        return ["torchrun"], [*torchrun_args(spec), *(spec.command or []), *spec.args, *resume]
    return (list(spec.command) if spec.command is not None else None), [*spec.args, *resume]


def _wants_shm(spec: TrainingJobSpec) -> bool:
    """NCCL and DataLoader workers share memory through /dev/shm, which is 64 MiB in a
    container by default: multi-GPU jobs get a memory-backed one unless the spec mounts its own."""
    return spec.gpus_per_worker > 0 and all(m.mount_path != SHM_PATH for m in spec.volume_mounts)


def build_container(owner: Owner, spec: TrainingJobSpec, restarts: int) -> Manifest:
    command, args = _command_and_args(spec)
    ours = distributed_env(owner, spec, restarts)
    # The spec's env wins over ours. An entry that replaces one of ours takes its place, so
    # ours that refer to it (PET_MASTER_PORT=$(MASTER_PORT)) expand to the spec's value: the
    # kubelet expands $(VAR) only from entries before. The others follow ours, in order, so
    # `$(MASTER_ADDR)` expands in them.
    users = {e.name: e.to_wire() for e in spec.env}
    replaced = [users.get(e["name"], e) for e in ours]
    taken = {e["name"] for e in ours}
    env = replaced + [e.to_wire() for e in spec.env if e.name not in taken]
    container: Manifest = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "env": env,
        "ports": [
            {
                "name": "rendezvous",
                "containerPort": spec.distributed.rendezvous_port,
                "protocol": "TCP",
            }
        ],
    }
    if command is not None:
        container["command"] = command
    if args:
        container["args"] = args
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    mounts = [m.to_wire() for m in spec.volume_mounts]
    if _wants_shm(spec):
        mounts.append({"name": "dshm", "mountPath": SHM_PATH})
    if mounts:
        container["volumeMounts"] = mounts
    return container


def build_job(
    owner: Owner,
    spec: TrainingJobSpec,
    restarts: int,
    active_deadline_seconds: int | None = None,
) -> Manifest:
    """The Indexed Job of attempt `restarts`: one pod per worker, no retries of its own.

    `active_deadline_seconds` is what is left of the TrainingJob's deadline, so the Job
    controller stops the workers on time even while the operator is down."""
    name = job_name(owner.name, restarts)
    labels = worker_labels(owner, restarts)
    job_labels = {**labels}
    if spec.scheduling.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = spec.scheduling.queue_name
    pod_labels = {**labels}
    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "subdomain": service_name(owner.name),
        "containers": [build_container(owner, spec, restarts)],
        # Give the program time to write a last checkpoint on SIGTERM.
        "terminationGracePeriodSeconds": 120,
    }
    sched = spec.scheduling
    if sched.gang.enabled:
        pod_labels[PODGROUP_LABEL] = podgroup_name(owner.name, restarts)
        pod_spec["schedulerName"] = sched.gang.scheduler_name
    if sched.priority_class_name:
        pod_spec["priorityClassName"] = sched.priority_class_name
    if sched.node_selector:
        pod_spec["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in sched.tolerations]
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    volumes = [v.to_wire() for v in spec.volumes]
    if _wants_shm(spec):
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    if volumes:
        pod_spec["volumes"] = volumes
    # The spec's labels first: trimtab's keys are refused there, and win anyway.
    pod_metadata: Manifest = {"labels": {**spec.pod_metadata.labels, **pod_labels}}
    if spec.pod_metadata.annotations:
        pod_metadata["annotations"] = dict(spec.pod_metadata.annotations)

    job_spec: Manifest = {
        "completionMode": "Indexed",
        "completions": spec.workers,
        "parallelism": spec.workers,
        # trimtab restarts the whole job; a Job-level retry would restart one worker alone,
        # which cannot rejoin a static rendezvous.
        "backoffLimit": 0,
        # Kueue admits a queued Job by setting suspend to false; without a queue it runs now.
        "suspend": bool(sched.queue_name),
        "template": {"metadata": pod_metadata, "spec": pod_spec},
    }
    codes = spec.failure_policy.never_retry_exit_codes
    if codes:
        # The Job's Failed condition then says which exit code and index ended it
        # (reason PodFailurePolicy), even after the pods are gone.
        job_spec["podFailurePolicy"] = {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER_NAME,
                        "operator": "In",
                        "values": sorted(set(codes)),
                    },
                }
            ]
        }
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = max(1, active_deadline_seconds)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(owner, name, labels={**job_labels, C.LABEL_NAME: owner.name}),
        "spec": job_spec,
    }


def build_service(owner: Owner, spec: TrainingJobSpec) -> Manifest:
    """Headless, and publishing unready addresses: workers resolve `<job>-0.<service>` while
    worker 0 is still starting, which is when the rendezvous happens."""
    port = spec.distributed.rendezvous_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(
            owner,
            service_name(owner.name),
            labels={C.LABEL_NAME: owner.name, C.LABEL_COMPONENT: COMPONENT},
        ),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {
                C.LABEL_MANAGED_BY: C.MANAGED_BY,
                C.LABEL_OWNER: owner.name,
                C.LABEL_COMPONENT: COMPONENT,
            },
            "ports": [{"name": "rendezvous", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def _gang_min_resources(spec: TrainingJobSpec) -> dict[str, str]:
    """What the whole gang requests, so the coscheduler rejects a gang that cannot fit before
    it binds any pod."""
    requests: dict[str, str] = _resources(spec).get("requests", {})
    out: dict[str, str] = {}
    for name, value in requests.items():
        total = parse_quantity(value) * Decimal(spec.workers)
        if name == "cpu":
            out[name] = format_cpu(float(total))
        elif name == "memory":
            out[name] = format_bytes(float(total))
        else:
            out[name] = str(int(total))
    return out


def build_podgroup(owner: Owner, spec: TrainingJobSpec, restarts: int) -> Manifest:
    """The coscheduling PodGroup of one attempt: no worker binds until all of them can."""
    pg_spec: Manifest = {"minMember": spec.workers}
    min_resources = _gang_min_resources(spec)
    if min_resources:
        pg_spec["minResources"] = min_resources
    if spec.scheduling.gang.schedule_timeout_seconds is not None:
        pg_spec["scheduleTimeoutSeconds"] = spec.scheduling.gang.schedule_timeout_seconds
    return {
        "apiVersion": PODGROUP_API_VERSION,
        "kind": "PodGroup",
        "metadata": object_meta(
            owner,
            podgroup_name(owner.name, restarts),
            labels={C.LABEL_NAME: owner.name, LABEL_RESTART: str(restarts)},
        ),
        "spec": pg_spec,
    }


def build_all(
    owner: Owner, spec: TrainingJobSpec, restarts: int, active_deadline_seconds: int | None = None
) -> list[Manifest]:
    """Everything one attempt needs, in the order to create it: Service, PodGroup, Job."""
    out = [build_service(owner, spec)]
    if spec.scheduling.gang.enabled:
        out.append(build_podgroup(owner, spec, restarts))
    out.append(build_job(owner, spec, restarts, active_deadline_seconds))
    return out


@dataclass(frozen=True)
class Attempt:
    """The objects of one attempt, as the reconcile creates them: the headless Service (applied),
    the PodGroup when the gang is scheduled together (applied), and the Job (created once)."""

    service: Manifest
    podgroup: Manifest | None
    job: Manifest

    def manifests(self) -> list[Manifest]:
        """In the order they are created: the Service and PodGroup before the Job's pods."""
        return [m for m in (self.service, self.podgroup, self.job) if m is not None]


def build_attempt(
    owner: Owner, spec: TrainingJobSpec, restarts: int, active_deadline_seconds: int | None
) -> Attempt:
    return Attempt(
        service=build_service(owner, spec),
        podgroup=build_podgroup(owner, spec, restarts) if spec.scheduling.gang.enabled else None,
        job=build_job(owner, spec, restarts, active_deadline_seconds),
    )
