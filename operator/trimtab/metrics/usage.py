"""Container usage history for right-sizing: range queries over the window against cAdvisor,
kube-state-metrics and a GPU source (trimtab's gpu-agent, else dcgm-exporter).

A series that is absent is named in the answer, never filled in; an unreachable Prometheus is
"unavailable", so the caller keeps what it had rather than sizing from nothing."""

from __future__ import annotations

import asyncio
import datetime
import math
from dataclasses import dataclass
from typing import Any

import requests
from prometheus_api_client.exceptions import PrometheusApiClientException

from trimtab.builders.common import GENERATE_NAME_LIMIT, literal_regex
from trimtab.decisions.rightsizing import ContainerUsage, GpuModel, gpu_model_from_name
from trimtab.metrics.base import in_thread
from trimtab.metrics.connection import NO_SETTINGS, Connection, CredentialsUnreadable, connect

CPU_SERIES = "container_cpu_usage_seconds_total"
MEMORY_SERIES = "container_memory_working_set_bytes"
OOM_SERIES = "kube_pod_container_status_last_terminated_reason"
# The reason of a container that stays terminated: a Job pod (restartPolicy Never) is never
# restarted, so an OOM kill there shows here and never in the restart counter.
TERMINATED_SERIES = "kube_pod_container_status_terminated_reason"
RESTARTS_SERIES = "kube_pod_container_status_restarts_total"
# The memory limit each pod's container had: an OOM kill is valued at the limit of the pod that
# was killed, at the time it was killed, never at the limit in force now (after a raise, the
# same old kill would be valued at the raised limit and raise it again, without end).
LIMITS_SERIES = "kube_pod_container_resource_limits"
AGENT_GPU_MEMORY = "trimtab_gpu_memory_used_bytes"
AGENT_GPU_UTIL = "trimtab_gpu_utilization_ratio"
DCGM_GPU_MEMORY = "DCGM_FI_DEV_FB_USED"  # MiB
DCGM_GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"  # percent
# A window is read in about this many steps (168h -> 5-minute steps).
TARGET_POINTS = 2016
MIN_STEP_S = 1
# A working set at least this share of its pod's memory limit is at the limit: the kernel keeps
# it there by reclaiming page cache (see decisions.rightsizing.limit_bound).
LIMIT_BOUND_RATIO = 0.97


@dataclass(frozen=True)
class UsageTarget:
    """Which container to read: pods of one workload by a regular expression on their names."""

    namespace: str
    pod_regex: str
    container: str
    # False for Job pods (restartPolicy Never): an OOM kill ends the pod instead of restarting
    # the container, so kills are read from the terminated reason of each pod.
    restarts_in_place: bool = True


def _q(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def step_for(window_s: float) -> int:
    """Seconds per point so a window is about TARGET_POINTS points.

    >>> step_for(168 * 3600), step_for(20)
    (300, 1)
    """
    return max(MIN_STEP_S, int(window_s // TARGET_POINTS))


def usage_queries(target: UsageTarget, step_s: int, rate_window: str) -> dict[str, str]:
    """The PromQL for one container, evaluated at each step of a range query.

    CPU: the busiest replica's peak rate within the step (the rate over the rate window, every
    quarter of it: a point every 5 minutes would otherwise read 2 minutes of them and miss a
    burst in between); memory: the busiest replica's working-set peak within the step
    (max_over_time, so a spike between points is not lost), and GPU memory the same way;
    OOM kills, per pod: a restart
    whose last termination reason is OOMKilled (for Job pods: a pod terminated OOMKilled), and
    each pod's memory limit to value its kills at; kube-state-metrics: whether it reports the
    container at all (its restart counter), so "no kills" is told from "no source"; GPU: trimtab's
    agent in bytes and 0..1, or dcgm-exporter in MiB and percent (its pod-mapping labels
    namespace/pod/container, or exported_* where the scrape renamed them)."""
    sel = (
        f"namespace={_q(target.namespace)},pod=~{_q(target.pod_regex)},"
        f"container={_q(target.container)}"
    )
    exported = (
        f"exported_namespace={_q(target.namespace)},exported_pod=~{_q(target.pod_regex)},"
        f"exported_container={_q(target.container)}"
    )
    # Peaks are read over the step, but never over less than the rate window: a step shorter
    # than the scrape interval (a short `window`) would hold no sample at most points.
    step = f"{max(step_s, _seconds(rate_window))}s"
    resolution = f"{max(1, _seconds(rate_window) // 4)}s"
    # OOM kills of containers restarted in place, per pod: the restart counter at each point
    # ("restarts") and whether the last termination was an OOM kill ("oom"). `_restart_kills`
    # counts each rise of the counter: an increase() over windows as long as the step lost a
    # restart whose two bracketing scrapes fell in adjacent windows (about one in step/scrape),
    # and told a crash loop's restarts apart only by window. The counter also says whether
    # kube-state-metrics reports the container at all.
    oom = f"max by (pod) ({OOM_SERIES}{{{sel},reason=\"OOMKilled\"}})"
    if not target.restarts_in_place:
        # One series per killed pod, present from the kill until the pod is deleted.
        oom = f"max by (pod) ({TERMINATED_SERIES}{{{sel},reason=\"OOMKilled\"}} == 1)"
    limit = f"max by (pod) ({LIMITS_SERIES}{{{sel},resource=\"memory\"}})"
    return {
        "cpu": (
            f"max(max_over_time(rate({CPU_SERIES}{{{sel}}}[{rate_window}])"
            f"[{step}:{resolution}]))"
        ),
        "memory": f"max(max_over_time({MEMORY_SERIES}{{{sel}}}[{step}]))",
        "restarts": f"max by (pod) ({RESTARTS_SERIES}{{{sel}}})",
        "oom": oom,
        "memory_limit": limit,
        # The limit of each pod whose working-set peak in the step reached it.
        "memory_at_limit": (
            f"max({limit} and on(pod) (max by (pod) (max_over_time({MEMORY_SERIES}{{{sel}}}"
            f"[{step}])) >= {LIMIT_BOUND_RATIO} * {limit}))"
        ),
        # GPU memory is sized from its peak, like memory: each GPU's peak within the step,
        # summed over the pod's GPUs (or MIG instances) once each: `max by` the device first,
        # so an exporter two scrape jobs read (their job/instance labels differ) is not counted
        # twice.
        "gpu_memory_agent": (
            f"max(sum by (pod) (max by (pod, gpu) "
            f"(max_over_time({AGENT_GPU_MEMORY}{{{sel}}}[{step}]))))"
        ),
        "gpu_util_agent": f"max(avg by (pod) ({AGENT_GPU_UTIL}{{{sel}}}))",
        "gpu_model_agent": f"count by (gpu_model) ({AGENT_GPU_MEMORY}{{{sel}}})",
        # dcgm-exporter's pod labels as it writes them, or as a scrape with honorLabels false
        # renames them (exported_*): whichever has the series.
        "gpu_memory_dcgm": (
            f"(max(sum by (pod) (max by (pod, gpu, GPU_I_ID) "
            f"(max_over_time({DCGM_GPU_MEMORY}{{{sel}}}[{step}]))))"
            f" or max(sum by (exported_pod) (max by (exported_pod, gpu, GPU_I_ID) "
            f"(max_over_time({DCGM_GPU_MEMORY}{{{exported}}}[{step}]))))) * 1048576"
        ),
        "gpu_util_dcgm": (
            f"(max(avg by (pod) ({DCGM_GPU_UTIL}{{{sel}}}))"
            f" or max(avg by (exported_pod) ({DCGM_GPU_UTIL}{{{exported}}}))) / 100"
        ),
        "gpu_model_dcgm": (
            f"count by (modelName) ({DCGM_GPU_MEMORY}{{{sel}}})"
            f" or count by (modelName) ({DCGM_GPU_MEMORY}{{{exported}}})"
        ),
    }


@dataclass(frozen=True)
class UsageAnswer:
    """The usage, or why there is none: `unavailable` holds the source's error text."""

    usage: ContainerUsage | None
    unavailable: str = ""


Points = list[tuple[float, float]]


def _points(result: Any) -> Points:
    """The points of a range query answer with at most one series (after max())."""
    out: Points = []
    for series in result or []:
        for t, v in series.get("values") or []:
            value = float(v)
            if math.isfinite(value):
                out.append((float(t), value))
    return sorted(out)


def _label_values(result: Any, label: str) -> list[str]:
    values = (s.get("metric", {}).get(label) for s in result or [])
    return [str(v) for v in values if v]


class UsageReader:
    """Range queries on one Prometheus, run in worker threads under a deadline."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        rate_window: str = "2m",
        connection: Connection = NO_SETTINGS,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.rate_window = rate_window
        self._client = connect(self.url, connection, timeout_s)

    async def close(self) -> None:
        self._client._session.close()

    async def _range(self, promql: str, start: float, end: float, step_s: int) -> Any:
        """The answer, or the exception the query ended with (`in_thread`)."""
        return await in_thread(
            lambda: self._client.custom_query_range(
                promql,
                datetime.datetime.fromtimestamp(start, datetime.UTC),
                datetime.datetime.fromtimestamp(end, datetime.UTC),
                f"{step_s}s",
            ),
            self.timeout_s,
        )

    async def read(
        self,
        target: UsageTarget,
        window_s: float,
        now: float,
        wants_gpu: bool = False,
    ) -> UsageAnswer:
        """Usage of `target` over (now - window_s, now]. Each OOM kill carries the memory limit
        its pod had when it was killed (kube-state-metrics), else the working set nearest it."""
        step_s = step_for(window_s)
        # The rate needs a few scrapes inside its window, whatever the step.
        queries = usage_queries(target, step_s, self.rate_window)
        if not wants_gpu:
            queries = {k: v for k, v in queries.items() if not k.startswith("gpu_")}
        start = now - window_s
        keys = list(queries)
        # Every query runs to its end even when one fails: a query left running past this call
        # would outlive the handler that asked (and fail later, unobserved).
        answers = await asyncio.gather(
            *(self._range(queries[k], start, now, step_s) for k in keys), return_exceptions=True
        )
        try:
            for answer in answers:
                if isinstance(answer, BaseException):
                    raise answer
        except TimeoutError:
            return UsageAnswer(
                None, f"Prometheus at {self.url} did not answer within {self.timeout_s:g}s"
            )
        except PrometheusApiClientException as exc:
            return UsageAnswer(None, f"Prometheus rejected a usage query: {exc}")
        except CredentialsUnreadable as exc:
            return UsageAnswer(None, f"no query sent to {self.url}: {exc}")
        except requests.RequestException as exc:
            return UsageAnswer(None, f"cannot reach Prometheus at {self.url}: {type(exc).__name__}")
        except (ValueError, KeyError) as exc:
            return UsageAnswer(None, f"unreadable answer from {self.url}: {exc}")
        by_key = dict(zip(keys, answers, strict=True))

        cpu = _points(by_key["cpu"])
        memory = _points(by_key["memory"])
        missing = []
        if not cpu:
            missing.append(CPU_SERIES)
        if not memory:
            missing.append(MEMORY_SERIES)
        restarts = _points_by_pod(by_key["restarts"])
        if not restarts:
            # No restart counter for pods that have CPU samples: kube-state-metrics is not
            # scraped (or not for this namespace), so an empty OOM answer means nothing.
            missing.append(RESTARTS_SERIES)
        limits = _points_by_pod(by_key["memory_limit"])
        kills: list[tuple[float, str]] = []
        if target.restarts_in_place:
            reasons = _points_by_pod(by_key["oom"])
            for pod, counter in restarts.items():
                kills += [(t, pod) for t in _restart_kills(counter, reasons.get(pod, []), start)]
        else:
            kills = [(points[0][0], pod) for pod, points in _points_by_pod(by_key["oom"]).items()]
        valued = [
            ((t, _at_or_before(limits.get(pod, []), t) or _nearest(memory, t)), pod)
            for t, pod in sorted(kills)
        ]
        ooms: Points = [kill for kill, _ in valued]
        if target.restarts_in_place:
            # A Deployment's replicas killed by one spike; a Job's pods are each an attempt.
            ooms = _one_per_spike(valued, step_s)
        gpu_memory: Points = []
        gpu_util: Points = []
        gpu_model: GpuModel | None = None
        missing_gpu: list[str] = []
        if wants_gpu:
            gpu_memory = _points(by_key["gpu_memory_agent"])
            if gpu_memory:
                gpu_util = _points(by_key["gpu_util_agent"])
                names = _label_values(by_key["gpu_model_agent"], "gpu_model")
            else:
                gpu_memory = _points(by_key["gpu_memory_dcgm"])
                gpu_util = _points(by_key["gpu_util_dcgm"])
                names = _label_values(by_key["gpu_model_dcgm"], "modelName")
            gpu_model = next((m for m in map(gpu_model_from_name, names) if m), None)
            if not gpu_memory:
                missing_gpu = [f"{AGENT_GPU_MEMORY} or {DCGM_GPU_MEMORY}"]
        usage = ContainerUsage(
            container=target.container,
            step_seconds=float(step_s),
            cpu=cpu,
            memory=memory,
            oom_kills=ooms,
            memory_at_limit=_points(by_key["memory_at_limit"]),
            gpu_memory=gpu_memory,
            gpu_utilization=gpu_util,
            gpu_model=gpu_model,
            missing_series=tuple(missing),
            missing_gpu_series=tuple(missing_gpu),
        )
        return UsageAnswer(usage)


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return int(duration[:-1]) * units[duration[-1]] if duration[-1] in units else int(duration)


def _restart_kills(counter: Points, oom: Points, start: float) -> list[float]:
    """When one pod's container was OOM-killed: each rise of its restart counter between two
    points, as many times as it rose, when its last termination at the later point was an OOM
    kill. A pod whose series begins inside the window (created then) with restarts already
    counted was killed before its first scrape; one present from the window's start had them
    before the window.

    >>> _restart_kills([(0.0, 0.0), (300.0, 1.0), (600.0, 1.0), (900.0, 3.0)],
    ...                [(0.0, 0.0), (300.0, 1.0), (600.0, 1.0), (900.0, 1.0)], 0.0)
    [300.0, 900.0, 900.0]
    >>> _restart_kills([(0.0, 0.0), (300.0, 1.0)], [(300.0, 0.0)], 0.0)  # another reason
    []
    >>> _restart_kills([(600.0, 1.0), (900.0, 1.0)], [(600.0, 1.0)], 0.0)  # killed at once
    [600.0]
    >>> _restart_kills([(300.0, 4.0), (600.0, 4.0)], [(300.0, 1.0)], 0.0)  # before the window
    []
    """
    reason = dict(oom)
    out: list[float] = []
    for i, (t, value) in enumerate(counter):
        if i == 0:
            step = counter[1][0] - t if len(counter) > 1 else math.inf
            before = 0.0 if t - start > step else value
        else:
            before = counter[i - 1][1]
        if value > before and reason.get(t) == 1:
            out += [t] * round(value - before)
    return out


def _one_per_spike(kills: list[tuple[tuple[float, float], str]], step_s: float) -> Points:
    """Kills of several pods within one step are one event (one spike killed every replica),
    valued at the highest memory among them; kills of one pod are each an event.

    >>> _one_per_spike([((0.0, 2.0), "a"), ((0.0, 3.0), "b"), ((600.0, 2.0), "a")], 300)
    [(0.0, 3.0), (600.0, 2.0)]
    >>> _one_per_spike([((0.0, 2.0), "a"), ((0.0, 2.0), "a"), ((300.0, 2.0), "b")], 300)
    [(0.0, 2.0), (0.0, 2.0)]
    """
    out: Points = []
    group: list[tuple[tuple[float, float], str]] = []

    def close() -> None:
        if group:
            per_pod = max(sum(1 for _, p in group if p == pod) for _, pod in group)
            out.extend([(group[0][0][0], max(v for (_, v), _ in group))] * per_pod)

    for kill in kills:
        if group and kill[0][0] - group[0][0][0] > step_s:
            close()
            group = []
        group.append(kill)
    close()
    return out


def _points_by_pod(result: Any) -> dict[str, Points]:
    """The points of each series of a `by (pod)` range answer.

    >>> _points_by_pod([{"metric": {"pod": "a"}, "values": [[6, "1"], [5, "2"]]},
    ...                 {"metric": {}, "values": [[9, "1"]]}])
    {'a': [(5.0, 2.0), (6.0, 1.0)], '': [(9.0, 1.0)]}
    """
    out: dict[str, Points] = {}
    for series in result or []:
        pod = str((series.get("metric") or {}).get("pod") or "")
        out[pod] = sorted(out.get(pod, []) + _points([series]))
    return out


def _at_or_before(points: Points, t: float) -> float | None:
    """The last value at or before `t` (the limit the pod ran with then), else the first after.

    >>> _at_or_before([(0.0, 2.0), (10.0, 3.0)], 5.0), _at_or_before([(10.0, 3.0)], 5.0)
    (2.0, 3.0)
    >>> _at_or_before([], 5.0) is None
    True
    """
    before = [v for s, v in points if s <= t]
    if before:
        return before[-1]
    return points[0][1] if points else None


def _nearest(points: Points, t: float) -> float:
    if not points:
        return 0.0
    return min(points, key=lambda p: abs(p[0] - t))[1]


# A ReplicaSet's pods are named by generateName `<replicaset>-`, cut to GENERATE_NAME_LIMIT;
# the ReplicaSet is `<deployment>-<pod-template-hash>`, the hash up to 10 characters. The
# Deployment is `<prefix>-<revision>` (10 hex characters).
REVISION_CHARS = 10
MAX_TEMPLATE_HASH = 10


def pod_regex_for(deployment_prefix: str) -> str:
    """Pods of the Deployments whose names are `<prefix>-<revision>`: the ReplicaSet hash and the
    pod suffix follow, unless the name was cut at 58 characters before the random suffix (a
    prefix of more than 35 characters), when only what is left of them does.

    >>> import re; bool(re.fullmatch(pod_regex_for("chat"), "chat-0123456789-7d9f8c6b5-x2x9z"))
    True
    >>> bool(re.fullmatch(pod_regex_for("chat"), "chatty-0123456789-7d9f8c6b5-x2x9z"))
    False
    """
    prefix = literal_regex(deployment_prefix)
    revision = rf"[0-9a-f]{{{REVISION_CHARS}}}"
    template_hash = rf"[a-z0-9]{{1,{MAX_TEMPLATE_HASH}}}"
    whole = f"{prefix}-{revision}-{template_hash}-[a-z0-9]{{5}}"
    room = GENERATE_NAME_LIMIT - len(deployment_prefix)
    if room >= 1 + REVISION_CHARS + 1 + MAX_TEMPLATE_HASH + 1:
        return whole
    # Cut: the first `room` characters of "-<revision>-<hash>-", then the random suffix.
    shape = ["-"] + ["[0-9a-f]"] * REVISION_CHARS + ["-"] + ["[-a-z0-9]"] * (MAX_TEMPLATE_HASH + 1)
    return f"(?:{whole}|{prefix}{''.join(shape[:room])}[a-z0-9]{{5}})"
