"""The TrainingJob custom resource: a multi-node training run that trimtab gang-starts, queues
through Kueue, restarts as a whole from its checkpoint on failure, explains and cleans up.

Spec fields are validated by the schema and CEL rules here, so bad input names its field."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, get_args

from pydantic import ConfigDict, Field, StringConstraints

from trimtab import constants as C
from trimtab.api.common import (
    Condition,
    DNSLabel,
    EnvVar,
    LabelValue,
    PodMetadataBase,
    ReservedKeys,
    Resources,
    StatusModel,
    StrictModel,
    Toleration,
    Volume,
    VolumeMount,
    pod_metadata_rules,
)
from trimtab.api.rightsizing import RecommendationsStatus, RightsizingSpec

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_RENDEZVOUS_PORT = 29500
# The scheduler name the scheduler-plugins Helm chart gives its second scheduler.
DEFAULT_GANG_SCHEDULER = "scheduler-plugins-scheduler"
DEFAULT_CHECKPOINT_ENV = "TRIMTAB_CHECKPOINT_DIR"

_EnvName = Annotated[
    str, StringConstraints(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=253)
]
_Arg = Annotated[str, StringConstraints(max_length=4096)]
_ExitCode = Annotated[int, Field(ge=1, le=255)]


# --- policies --------------------------------------------------------------------------------


class Distributed(StrictModel):
    """How the processes of a worker find each other."""

    launcher: Literal["torchrun", "none"] = Field(
        default="torchrun",
        description="torchrun: the container runs `torchrun <rendezvous flags> <command> <args>`. "
        "none: the command runs as is, with the same environment (MASTER_ADDR, ...).",
    )
    rendezvous_port: int = Field(
        default=DEFAULT_RENDEZVOUS_PORT, ge=1, le=65535, description="MASTER_PORT on worker 0."
    )
    processes_per_worker: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Processes per worker (torchrun --nproc-per-node); defaults to gpusPerWorker, "
        "or 1 without GPUs.",
    )


class Gang(StrictModel):
    """All-or-nothing scheduling through the scheduler-plugins coscheduling PodGroup."""

    enabled: bool = Field(default=False, description="Create a PodGroup with minMember = workers.")
    scheduler_name: str = Field(
        default=DEFAULT_GANG_SCHEDULER,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="The scheduler that runs the Coscheduling plugin.",
    )
    schedule_timeout_seconds: int | None = Field(
        default=None, ge=1, le=86400, description="How long a partial gang may wait."
    )


class Scheduling(StrictModel):
    queue_name: DNSLabel | None = Field(
        default=None,
        description="Kueue LocalQueue. The Job is created suspended and runs once Kueue admits it.",
    )
    priority_class_name: str | None = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253
    )
    gang: Gang = Field(default_factory=Gang)
    node_selector: dict[str, LabelValue] = Field(default_factory=dict, max_length=64)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)


class FailurePolicy(StrictModel):
    """trimtab restarts the whole job (every worker) from the checkpoint on any worker failure."""

    max_restarts: int = Field(
        default=3,
        ge=-1,
        le=1000,
        description="Whole-job restarts after a failure; -1 is unlimited and needs "
        "activeDeadlineSeconds.",
    )
    never_retry_exit_codes: list[_ExitCode] = Field(
        default_factory=list,
        max_length=64,
        description="Exit codes that mean the program cannot succeed (bad config, a bug): the "
        "job fails at once instead of restarting.",
    )
    backoff_seconds: int = Field(
        default=10, ge=0, le=3600, description="Wait before the first restart; doubles each time."
    )
    max_backoff_seconds: int = Field(default=300, ge=0, le=86400, description="Cap on the wait.")

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.maxBackoffSeconds >= self.backoffSeconds",
                    "message": "failurePolicy.maxBackoffSeconds must be at least backoffSeconds",
                    "fieldPath": ".maxBackoffSeconds",
                }
            ]
        }
    )


class Checkpoint(StrictModel):
    """Where the program saves and resumes: trimtab passes the directory to every start, so a
    restart continues from the last checkpoint instead of step 0."""

    directory: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^(/|[a-z][a-z0-9+.-]*://)",
        description="An absolute path on a mounted volume (a PVC), or a URI such as s3://b/run.",
    )
    env_var: _EnvName = Field(
        default=DEFAULT_CHECKPOINT_ENV,
        description="Environment variable that carries the directory to every worker.",
    )
    arg: str | None = Field(
        default=None,
        pattern=r"^-",
        max_length=128,
        description='A flag appended to args with the directory, e.g. "--resume-from".',
    )


# --- the spec ---------------------------------------------------------------------------------

# Volume sources a checkpoint directory cannot be on: each attempt is new pods, and these
# start empty (emptyDir) or are read-only copies of API objects (configMap, secret), so a
# restart would resume from nothing. A deny-list: a persistent source added to Volume later
# (nfs, csi) needs no change here, and tests/test_training_api.py makes whoever adds a source
# say which kind it is (ephemeral, projected and downwardAPI volumes would belong here).
NON_PERSISTENT_VOLUME_SOURCES = ("emptyDir", "configMap", "secret")


def _checkpoint_mount_rule(mount_ok: str) -> str:
    """A CEL rule: the mount that holds checkpoint.directory (the deepest whose mountPath
    contains it) satisfies `mount_ok`, an expression of `m`."""

    def holds(m: str) -> str:
        return (
            f"(self.checkpoint.directory == {m}.mountPath "
            f"|| self.checkpoint.directory.startsWith({m}.mountPath + '/'))"
        )

    return (
        "!has(self.checkpoint) || !self.checkpoint.directory.startsWith('/') "
        f"|| !has(self.volumeMounts) || self.volumeMounts.all(m, !{holds('m')} "
        f"|| self.volumeMounts.exists(n, n.mountPath.size() > m.mountPath.size() "
        f"&& {holds('n')}) || ({mount_ok}))"
    )


_WRITABLE_CHECKPOINT_MOUNT = _checkpoint_mount_rule(
    "!(has(m.readOnly) && m.readOnly) && (!has(self.volumes) || self.volumes.all(v, "
    "v.name != m.name || !has(v.persistentVolumeClaim) "
    "|| !(has(v.persistentVolumeClaim.readOnly) && v.persistentVolumeClaim.readOnly)))"
)
_PERSISTENT_CHECKPOINT_MOUNT = _checkpoint_mount_rule(
    "!has(self.volumes) || self.volumes.all(v, v.name != m.name || !("
    + " || ".join(f"has(v.{source})" for source in NON_PERSISTENT_VOLUME_SOURCES)
    + "))"
)


# Worker pod labels trimtab's selectors and the gang scheduler rest on, those the Job
# controller and Kueue set or read on pods, and the annotations they write.
WORKER_POD_KEYS = ReservedKeys(
    labels=(C.LABEL_MANAGED_BY, C.LABEL_NAME, C.LABEL_COMPONENT, "job-name", "controller-uid"),
    label_prefixes=(f"{C.GROUP}/", "batch.kubernetes.io/", "kueue.x-k8s.io/",
                    "scheduling.x-k8s.io/"),  # fmt: skip
    labels_why="set by trimtab, the Job controller, Kueue or the gang scheduler",
    annotation_prefixes=(f"{C.GROUP}/", "batch.kubernetes.io/", "kueue.x-k8s.io/"),
    annotations_why="written by trimtab, the Job controller or Kueue (the worker's rank is "
    "the job-completion-index annotation)",
)


class WorkerPodMetadata(PodMetadataBase):
    """Labels and annotations the workers carry besides trimtab's own: a team or cost label,
    an agent's annotation (a sidecar left out, log shipping, a scrape of the trainer's own
    metrics through prometheus.io/*)."""

    reserved: ClassVar[ReservedKeys] = WORKER_POD_KEYS
    model_config = ConfigDict(json_schema_extra=pod_metadata_rules(WORKER_POD_KEYS))


class TrainingJobSpec(StrictModel):
    """What to train and how to keep it running."""

    image: str = Field(min_length=1, max_length=512, pattern=r"^[^\s]+$")
    command: list[_Arg] | None = Field(
        default=None,
        max_length=64,
        description="With launcher torchrun: what torchrun runs, e.g. [train.py] or "
        "[-m, pkg.train]. With launcher none: the container command.",
    )
    args: list[_Arg] = Field(default_factory=list, max_length=256)
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=256,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    workers: int = Field(ge=1, le=1000, description="Pods (nodes); each is one torchrun node.")
    gpus_per_worker: int = Field(
        default=0, ge=0, le=64, description="GPUs per worker, and torchrun processes per worker."
    )
    gpu_resource_name: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$",
        description=f'GPU extended resource; default "{DEFAULT_GPU_RESOURCE}".',
    )
    resources: Resources = Field(
        default_factory=Resources,
        description="CPU and memory per worker. GPUs come from gpusPerWorker.",
    )
    volumes: list[Volume] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    volume_mounts: list[VolumeMount] = Field(default_factory=list, max_length=32)
    distributed: Distributed = Field(default_factory=Distributed)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy)
    checkpoint: Checkpoint | None = None
    pod_metadata: WorkerPodMetadata = Field(
        default_factory=WorkerPodMetadata,
        description="Extra labels and annotations of the workers (from the next attempt on, "
        "like every spec change while a Job runs).",
    )
    service_account_name: str | None = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Wall time from the first start, across restarts."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description="Delete the Job, Service and PodGroup this long after the job finished "
        "(never the TrainingJob, the checkpoint PVC or anything else).",
    )
    suspend: bool = Field(
        default=False, description="Stop the workers (the checkpoint stays); false resumes."
    )
    rightsizing: RightsizingSpec = Field(
        default_factory=RightsizingSpec,
        description="Right-sizing of CPU, memory and GPU from the workers' usage.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.gpusPerWorker > 0 || !has(self.gpuResourceName)",
                    "message": "gpuResourceName is set but gpusPerWorker is 0",
                    "fieldPath": ".gpuResourceName",
                },
                {
                    "rule": "!has(self.resources) || !has(self.resources.gpu) "
                    "|| self.resources.gpu == 0",
                    "message": "resources.gpu is not used by TrainingJob: set gpusPerWorker "
                    "(and gpuResourceName)",
                    "fieldPath": ".resources.gpu",
                },
                {
                    "rule": "!has(self.failurePolicy) || self.failurePolicy.maxRestarts >= 0 "
                    "|| has(self.activeDeadlineSeconds)",
                    "message": "failurePolicy.maxRestarts -1 (unlimited) can never finish a "
                    "failing job: set activeDeadlineSeconds",
                    "fieldPath": ".failurePolicy.maxRestarts",
                },
                {
                    "rule": "!has(self.checkpoint) || !self.checkpoint.directory.startsWith('/') "
                    "|| (has(self.volumeMounts) && self.volumeMounts.exists(m, "
                    "self.checkpoint.directory == m.mountPath "
                    "|| self.checkpoint.directory.startsWith(m.mountPath + '/')))",
                    "message": "checkpoint.directory must be on a volume in volumeMounts, or a "
                    "restart loses it",
                    "fieldPath": ".checkpoint.directory",
                },
                {
                    "rule": _WRITABLE_CHECKPOINT_MOUNT,
                    "message": "checkpoint.directory is on a readOnly mount (or a readOnly "
                    "persistentVolumeClaim): the workers could not save a checkpoint there",
                    "fieldPath": ".checkpoint.directory",
                },
                {
                    "rule": _PERSISTENT_CHECKPOINT_MOUNT,
                    "message": "checkpoint.directory is on an emptyDir, configMap or secret "
                    "volume, which every restart's new pods get empty or read-only, so a restart "
                    "would resume from nothing: put it on a persistentVolumeClaim",
                    "fieldPath": ".checkpoint.directory",
                },
                {
                    "rule": "has(self.command) || (has(self.distributed) "
                    "&& self.distributed.launcher == 'none')",
                    "message": "command is what torchrun runs (e.g. [train.py]): set it, or set "
                    "distributed.launcher to none to run the image's entrypoint",
                    "fieldPath": ".command",
                },
                {
                    "rule": "!has(self.volumeMounts) || self.volumeMounts.all(m, "
                    "has(self.volumes) && self.volumes.exists(v, v.name == m.name))",
                    "message": "volumeMounts names a volume that is not in volumes",
                    "fieldPath": ".volumeMounts",
                },
            ]
        }
    )

    @property
    def gpu_resource(self) -> str:
        return self.gpu_resource_name or DEFAULT_GPU_RESOURCE

    @property
    def processes_per_worker(self) -> int:
        """torchrun's --nproc-per-node: one process per GPU unless overridden."""
        return self.distributed.processes_per_worker or max(1, self.gpus_per_worker)


# --- status -----------------------------------------------------------------------------------

# Phases: one word for `kubectl get tj`; conditions carry the detail.
Phase = Literal[
    "Pending",  # accepted; trimtab has not created this attempt's Job yet
    "Queued",  # the Job exists but is suspended: Kueue has not admitted it (or took it back)
    "Starting",  # admitted; not every worker is running yet (image pulls, gang scheduling)
    "Running",  # every worker of the current attempt is running
    "Restarting",  # an attempt failed; trimtab waits out the backoff, then starts the next one
    "Suspended",  # spec.suspend is true: no worker runs, the checkpoint and Service stay
    "Succeeded",  # every worker exited 0; terminal
    "Failed",  # gave up (never-retry exit code, restarts exhausted, deadline, bad spec); terminal
]
PHASES: tuple[str, ...] = get_args(Phase)
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed"})

# Condition types:
CONDITION_QUEUED = "Queued"  # True: the Job waits for Kueue admission; no worker runs
CONDITION_RUNNING = "Running"  # True: all workers of the current attempt are running
CONDITION_RESTARTING = "Restarting"  # True: an attempt failed and the next one is pending
CONDITION_SUCCEEDED = "Succeeded"  # True: the job completed; nothing will run again
CONDITION_FAILED = "Failed"  # True: trimtab gave up; the reason says why; nothing will run again
CONDITION_SUSPENDED = "Suspended"  # True: spec.suspend stopped the workers; resume restarts them
CONDITION_TYPES = (
    CONDITION_QUEUED,
    CONDITION_RUNNING,
    CONDITION_RESTARTING,
    CONDITION_SUCCEEDED,
    CONDITION_FAILED,
    CONDITION_SUSPENDED,
)


class WorkerFailure(StatusModel):
    """The first worker that failed in an attempt, as the kubelet reported it."""

    worker: int | None = Field(default=None, description="Completion index (NODE_RANK).")
    pod: str | None = None
    exit_code: int | None = None
    reason: str = Field(default="", description='e.g. "Error", "OOMKilled", "DeadlineExceeded".')
    message: str = ""
    restart: int | None = Field(default=None, description="The attempt (restart count) it ended.")
    time: str | None = Field(
        default=None, description="When the worker ended, as the kubelet reported it."
    )
    recorded_at: str | None = Field(
        default=None,
        description="When trimtab recorded the failure. An OOM kill counts as answered by "
        "right-sizing only once a pass has run after this: a pass between the kill and this "
        "time could not see it.",
    )
    memory_limit: str | None = Field(
        default=None,
        description="The failed container's memory limit: what an OOM kill is valued at when "
        "right-sizing, whatever the limit is now.",
    )


class Diagnosis(StatusModel):
    """What the GPU metrics say about the running job, in a sentence."""

    gpu_utilization: float | None = Field(default=None, description="Mean over the window, 0..1.")
    memory_used_ratio: float | None = Field(
        default=None, description="Peak GPU memory used over memory total, 0..1."
    )
    window_seconds: int | None = None
    message: str = ""
    time: str | None = None


class TrainingJobStatus(StatusModel):
    phase: Phase | None = None
    message: str | None = None
    observed_generation: int | None = None
    restarts: int = Field(default=0, description="Whole-job restarts so far.")
    workers: int | None = None
    workers_ready: int | None = None
    start_time: str | None = Field(default=None, description="When workers first ran.")
    completion_time: str | None = None
    next_restart_time: str | None = Field(
        default=None, description="While Restarting: when the next attempt is created."
    )
    last_failure: WorkerFailure | None = None
    diagnosis: Diagnosis | None = None
    recommendations: RecommendationsStatus | None = Field(
        default=None, description="Right-sizing recommendations for the workers."
    )
    cleaned_up: bool | None = Field(
        default=None, description="TTL clean-up deleted the Job, Service and PodGroup."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
