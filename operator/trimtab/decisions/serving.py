"""What state a ModelDeployment is in, from its Deployments, and whether a spec can work at all.

`serving_state` turns observed Deployment status into phase and conditions;
`find_spec_problems` names what the schema cannot see but the server would trip on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trimtab.api.common import Condition, checked_model
from trimtab.api.modeldeployment import (
    CONDITION_DEGRADED,
    CONDITION_PROGRESSING,
    CONDITION_READY,
    ModelDeploymentSpec,
    Phase,
)
from trimtab.api.quantity import parse_quantity
from trimtab.api.servers import SHM_SERVERS
from trimtab.decisions.conditions import set_condition

_PARALLEL_FLAGS = {
    "vllm": ("--tensor-parallel-size", "-tp"),
    "tgi": ("--num-shard",),
}


def _flag_value(args: Sequence[str], names: Sequence[str]) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def wants_shm(spec: ModelDeploymentSpec) -> bool:
    """A GPU replica of a server that shares memory between processes (SHM_SERVERS) gets a
    memory-backed /dev/shm, unless the spec mounts its own there."""
    return (
        bool(spec.resources.gpu)
        and spec.server in SHM_SERVERS
        and all(m.mount_path != "/dev/shm" for m in spec.volume_mounts)
    )


def checked_spec(raw: Mapping[str, Any]) -> tuple[ModelDeploymentSpec | None, list[str]]:
    """The spec as the operator reads it (None if the models refuse it), and the problems that
    make it unusable, each naming the field (see checked_model)."""
    return checked_model(ModelDeploymentSpec, raw, find_spec_problems)


def find_spec_problems(spec: ModelDeploymentSpec) -> list[str]:
    """Reasons a schema-valid spec still cannot work, each naming the field. Empty means fine.

    >>> from trimtab.api.modeldeployment import ModelDeploymentSpec as S
    >>> find_spec_problems(S(server="vllm", image="v", args=["--tensor-parallel-size", "4"],
    ...                      resources={"gpu": 2}))
    ['spec.args: --tensor-parallel-size 4 needs 4 GPUs per replica but spec.resources.gpu is 2']
    """
    problems: list[str] = []
    res = spec.resources
    if res.cpu and res.cpu_limit and parse_quantity(res.cpu_limit) < parse_quantity(res.cpu):
        problems.append(f"spec.resources.cpuLimit: {res.cpu_limit} is below the request {res.cpu}")
    if (
        res.memory
        and res.memory_limit
        and parse_quantity(res.memory_limit) < parse_quantity(res.memory)
    ):
        problems.append(
            f"spec.resources.memoryLimit: {res.memory_limit} is below the request {res.memory}"
        )
    flags = _PARALLEL_FLAGS.get(spec.server)
    if flags:
        value = _flag_value(spec.args, flags)
        if value is not None:
            if not value.isdigit() or int(value) < 1:
                problems.append(f"spec.args: {flags[0]} {value!r} is not a positive integer")
            elif int(value) > res.gpu:
                problems.append(
                    f"spec.args: {flags[0]} {value} needs {value} GPUs per replica but "
                    f"spec.resources.gpu is {res.gpu}"
                )
    names = [e.name for e in spec.env]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"spec.env: duplicate names {', '.join(dupes)}")
    volumes = {v.name for v in spec.volumes}
    unknown = sorted({m.name for m in spec.volume_mounts} - volumes)
    if unknown:
        problems.append(f"spec.volumeMounts: no volume named {', '.join(unknown)} in spec.volumes")
    paths = [m.mount_path for m in spec.volume_mounts]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        problems.append(f"spec.volumeMounts: {', '.join(twice)} mounted more than once")
    keys = [t.topology_key for t in spec.topology_spread]
    spread_twice = sorted({k for k in keys if keys.count(k) > 1})
    if spread_twice:
        problems.append(f"spec.topologySpread: {', '.join(spread_twice)} given more than once")
    if wants_shm(spec) and "dshm" in volumes:
        problems.append(
            'spec.volumes: the name "dshm" is taken by the /dev/shm trimtab adds for GPU '
            "replicas; rename it, or mount your own volume at /dev/shm"
        )
    return problems


@dataclass(frozen=True)
class DeploymentObservation:
    """What the Deployment controller reported for one revision's Deployment."""

    revision: str
    name: str
    replicas: int  # spec.replicas
    generation: int
    observed_generation: int
    status_replicas: int
    ready_replicas: int
    updated_replicas: int
    available_replicas: int
    # (type, status, reason, message) of the Deployment's conditions
    conditions: tuple[tuple[str, str, str, str], ...] = ()

    @classmethod
    def from_manifest(cls, revision: str, obj: dict[str, Any]) -> DeploymentObservation:
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        meta = obj.get("metadata") or {}
        return cls(
            revision=revision,
            name=str(meta.get("name", "")),
            replicas=int(spec.get("replicas", 1)),
            generation=int(meta.get("generation", 0)),
            observed_generation=int(status.get("observedGeneration", 0)),
            status_replicas=int(status.get("replicas", 0)),
            ready_replicas=int(status.get("readyReplicas", 0)),
            updated_replicas=int(status.get("updatedReplicas", 0)),
            available_replicas=int(status.get("availableReplicas", 0)),
            conditions=tuple(
                (
                    str(c.get("type", "")),
                    str(c.get("status", "")),
                    str(c.get("reason", "")),
                    str(c.get("message", "")),
                )
                for c in status.get("conditions") or []
            ),
        )

    def condition(self, type_: str) -> tuple[str, str, str, str] | None:
        return next((c for c in self.conditions if c[0] == type_), None)


def revision_serving(obs: DeploymentObservation | None) -> bool:
    """Whether a revision's Deployment has a ready replica. Every pod of a revision's
    Deployment serves that revision's model: its template changes only with a policy change of
    the same model (or an operator upgrade's pod builder), so old pods still ready during such a
    roll serve it as well as new ones; and a scale not yet observed (observedGeneration behind)
    takes no ready replica away. Later steps' extra replicas need not all be ready: the
    deadline is for starting, not scaling.

    >>> def obs(**kw):
    ...     base = dict(revision="b", name="m-b", replicas=3, generation=2,
    ...                 observed_generation=2, status_replicas=3, ready_replicas=3,
    ...                 updated_replicas=3, available_replicas=3)
    ...     return DeploymentObservation(**{**base, **kw})
    >>> revision_serving(obs()), revision_serving(obs(generation=3))
    (True, True)
    >>> revision_serving(obs(status_replicas=4, updated_replicas=1))  # template rolling
    True
    >>> revision_serving(obs(ready_replicas=0, available_replicas=0)), revision_serving(None)
    (False, False)
    """
    return obs is not None and obs.ready_replicas >= 1


@dataclass(frozen=True)
class ServingState:
    phase: Phase
    message: str
    replicas: int
    ready_replicas: int
    updated_replicas: int
    conditions: list[Condition]
    # The current revision is fully ready: older revisions may now be retired.
    current_ready: bool


def serving_state(
    current_revision: str,
    deployments: Sequence[DeploymentObservation],
    previous: Sequence[Condition],
    generation: int,
    now: str,
) -> ServingState:
    """Phase and conditions from the Deployments of every revision.

    Worked examples (current revision "b", desired 2 replicas):
      - no Deployment "b" observed yet            -> Pending
      - "b" ready 1 of 2, "a" ready 2             -> Progressing ("1 of 2 ready")
      - "b" ready 2 of 2                          -> Ready, current_ready
      - "b" Progressing=False ProgressDeadlineExceeded -> Degraded, with the controller's message
      - "b" scaled to 0                           -> Ready ("scaled to zero")
    """
    current = next((d for d in deployments if d.revision == current_revision), None)
    total = sum(d.status_replicas for d in deployments)
    ready = sum(d.ready_replicas for d in deployments)
    updated = current.ready_replicas if current else 0

    if current is None or current.observed_generation < current.generation:
        phase: Phase = "Pending"
        message = f"waiting for the Deployment of revision {current_revision}"
    else:
        deadline = current.condition("Progressing")
        failure = current.condition("ReplicaFailure")
        if deadline and deadline[1] == "False":
            phase, message = (
                "Degraded",
                f"revision {current_revision}: {deadline[2]}: {deadline[3]}",
            )
        elif failure and failure[1] == "True":
            phase, message = "Degraded", f"revision {current_revision}: {failure[2]}: {failure[3]}"
        elif current.replicas == 0:
            phase, message = "Ready", "scaled to zero"
        elif (
            current.ready_replicas >= current.replicas
            and current.updated_replicas >= current.replicas
        ):
            phase, message = (
                "Ready",
                f"{current.ready_replicas} of {current.replicas} replicas ready",
            )
        elif current.status_replicas == 0 and current.ready_replicas == 0 and ready == 0:
            phase, message = "Pending", f"0 of {current.replicas} replicas started"
        else:
            phase, message = (
                "Progressing",
                f"{current.ready_replicas} of {current.replicas} replicas of revision "
                f"{current_revision} ready",
            )

    conds = list(previous)
    reason = {
        "Pending": "Waiting",
        "Progressing": "RollingOut",
        "Ready": "AllReplicasReady",
        "Degraded": "Failing",
    }[phase]
    conds = set_condition(
        conds,
        CONDITION_READY,
        "True" if phase == "Ready" else "False",
        reason,
        message,
        now,
        generation,
    )
    conds = set_condition(
        conds,
        CONDITION_PROGRESSING,
        "True" if phase in ("Pending", "Progressing") else "False",
        reason,
        message,
        now,
        generation,
    )
    conds = set_condition(
        conds,
        CONDITION_DEGRADED,
        "True" if phase == "Degraded" else "False",
        reason,
        message if phase == "Degraded" else "",
        now,
        generation,
    )
    return ServingState(
        phase=phase,
        message=message,
        replicas=total,
        ready_replicas=ready,
        updated_replicas=updated,
        conditions=conds,
        current_ready=phase == "Ready",
    )


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects an object with
    `labels`, as the API server evaluates it. An empty selector selects everything (a
    PodDisruptionBudget's, in policy/v1); a missing one selects nothing.

    >>> pod = {"app": "llama", "tier": "serving"}
    >>> selects({"matchLabels": {"app": "llama"}}, pod), selects({}, pod), selects(None, pod)
    (True, True, False)
    >>> selects({"matchExpressions": [{"key": "tier", "operator": "NotIn",
    ...                                "values": ["batch"]}]}, pod)
    True
    >>> selects({"matchExpressions": [{"key": "team", "operator": "Exists"}]}, pod)
    False
    """
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def controlled_by(meta: Mapping[str, Any], owner_uid: str) -> bool:
    """Whether an object's metadata names `owner_uid` as its controller."""
    refs = meta.get("ownerReferences") or []
    return any(r.get("controller") and r.get("uid") == owner_uid for r in refs)


def other_disruption_budget(
    budgets: Sequence[Mapping[str, Any]], pod_labels: Mapping[str, str], owner_uid: str
) -> str | None:
    """The name of a PodDisruptionBudget that someone else made and that already covers the
    model's pods (`pod_labels`), or None. The eviction API refuses to evict a pod that more
    than one budget covers (every node drain would then stop at it), so trimtab writes its
    own only where none does.

    >>> mine = {"metadata": {"name": "llama", "ownerReferences": [
    ...     {"uid": "u1", "controller": True}]}, "spec": {"selector": {}}}
    >>> theirs = {"metadata": {"name": "llama-pdb"},
    ...           "spec": {"selector": {"matchLabels": {"team": "search"}}}}
    >>> other_disruption_budget([mine, theirs], {"team": "search"}, "u1")
    'llama-pdb'
    >>> other_disruption_budget([mine, theirs], {"team": "ads"}, "u1") is None
    True
    """
    for budget in budgets:
        meta = budget.get("metadata") or {}
        if controlled_by(meta, owner_uid):
            continue
        if selects((budget.get("spec") or {}).get("selector"), pod_labels):
            return str(meta.get("name", ""))
    return None


@dataclass(frozen=True)
class BudgetPlan:
    """What to do with the resource's PodDisruptionBudget, from the namespace's budgets."""

    write: bool  # apply trimtab's
    delete: bool  # remove the one trimtab made
    other: str | None  # a budget someone else made that covers the pods


def plan_disruption_budget(
    budgets: Sequence[Mapping[str, Any]],
    pod_labels: Mapping[str, str],
    owner_uid: str,
    enabled: bool,
) -> BudgetPlan:
    """Write trimtab's budget when it is enabled and no other covers the pods; otherwise
    remove the one trimtab made, if any.

    >>> mine = {"metadata": {"name": "llama", "ownerReferences": [
    ...     {"uid": "u1", "controller": True}]}, "spec": {"selector": {}}}
    >>> theirs = {"metadata": {"name": "team"}, "spec": {"selector": {}}}
    >>> plan_disruption_budget([mine], {}, "u1", True)
    BudgetPlan(write=True, delete=False, other=None)
    >>> plan_disruption_budget([mine, theirs], {}, "u1", True)
    BudgetPlan(write=False, delete=True, other='team')
    >>> plan_disruption_budget([mine, theirs], {}, "u1", False)
    BudgetPlan(write=False, delete=True, other=None)
    """
    other = other_disruption_budget(budgets, pod_labels, owner_uid) if enabled else None
    write = enabled and other is None
    ours = any(controlled_by(b.get("metadata") or {}, owner_uid) for b in budgets)
    return BudgetPlan(write=write, delete=ours and not write, other=other)
