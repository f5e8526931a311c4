"""The autoscaling control loop: one kopf daemon per ModelDeployment with spec.autoscaling
(a timer whose interval each resource sets), reading one batch of signals from Prometheus,
asking decide_replicas, scaling the Deployment and recording the decision and why. While a
rollout runs a candidate beside the stable revision, the decision is the total for both, from
signals across both (the stable's alone while the candidate only receives mirrored copies),
and the replicas are split by traffic weight (`split_replicas`).

The loop never scales down blind: when the source fails for any signal, MetricsAvailable goes
False with the source's error text and nothing scales down; the signals still read may scale
up, and with none left the decision holds (or falls back up, if so configured).

It decides every loop but writes status only when the change matters (`status_write_due`: a
scale, a new decision, a signal's or condition's state) or once per refresh period
(TRIMTAB_AUTOSCALING_STATUS_REFRESH_SECONDS); what it decided in between, the recommendation
history above all, it carries in memory (`LoopMemory`). After an operator restart it resumes
from the last written status, so the stabilization windows may miss at most one refresh
period of recommendations."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, cast

import kopf

from trimtab import constants as C
from trimtab.api.autoscaling import (
    AutoscalingSpec,
    AutoscalingStatus,
    MetricsSpec,
    duration_seconds,
)
from trimtab.api.common import Condition
from trimtab.api.modeldeployment import CONDITION_METRICS_AVAILABLE, ModelDeploymentSpec
from trimtab.builders.autoscaling import (
    build_autoscaling_status,
    history_from_status,
    parse_rfc3339,
    status_write_due,
)
from trimtab.builders.common import merge_patch
from trimtab.builders.serving import deployment_name
from trimtab.decisions.autoscaling import AutoscalingInput, decide_replicas
from trimtab.decisions.conditions import set_condition
from trimtab.handlers.modeldeployment import Log, now_rfc3339, parse_spec, plan_for
from trimtab.kube.client import KubeClient, KubeError
from trimtab.kube.resources import DEPLOYMENTS, MODELDEPLOYMENTS
from trimtab.metrics.base import (
    SIGNAL_NAMES,
    QueryResult,
    ResultState,
    Signals,
    read_signals,
)
from trimtab.metrics.factory import ProviderPool
from trimtab.metrics.presets import (
    PresetOptions,
    QueryTarget,
    build_queries,
    overrides_from_spec,
)
from trimtab.observability import DESIRED_REPLICAS, METRICS_AVAILABLE, SCALE_ACTIONS

# The loop's interval when the spec gives none that can be read: the model's default.
DEFAULT_INTERVAL = duration_seconds(str(AutoscalingSpec.model_fields["interval"].default))


def spec_interval(body: Any) -> float:
    """The resource's autoscaling.interval in seconds, for the retry after a failed loop;
    DEFAULT_INTERVAL when it is unset or cannot be read.

    >>> spec_interval({"spec": {"autoscaling": {"interval": "5s"}}})
    5.0
    >>> spec_interval({"spec": {"autoscaling": {"interval": "soon"}}}) == DEFAULT_INTERVAL
    True
    """
    auto = (body.get("spec") or {}).get("autoscaling")
    text = auto.get("interval") if isinstance(auto, dict) else None
    try:
        return duration_seconds(text) if isinstance(text, str) else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def autoscaling_enabled(spec: kopf.Spec, **_: Any) -> bool:
    auto = spec.get("autoscaling")
    return isinstance(auto, dict) and auto.get("enabled", True) is not False


@kopf.daemon(
    C.GROUP,
    C.VERSION,
    C.MODELDEPLOYMENT_PLURAL,
    when=autoscaling_enabled,
    cancellation_timeout=5.0,
)
async def autoscaling_loop(
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: Any,
    logger: Log,
    **_: Any,
) -> None:
    """Run the loop until the resource goes or turns autoscaling off (kopf stops the daemon)."""
    memory = LoopMemory()
    refresh = memo.settings.autoscaling_status_refresh_seconds
    while not stopped:
        interval = spec_interval(body)
        try:
            interval = await autoscale_once(
                memo.kube, memo.metrics_pool, body, logger, memory, refresh
            )
        except Exception:  # one bad loop must not end the daemon; the next one retries
            logger.exception("autoscaling loop failed; retrying in %.0fs", interval)
        await stopped.wait(interval)
    # Autoscaling turned off (or the resource is going): no desired count is being kept.
    meta = body["metadata"]
    for gauge in (DESIRED_REPLICAS, METRICS_AVAILABLE):
        gauge.remove_by_labels({"namespace": meta["namespace"], "name": meta["name"]})


@dataclass
class LoopMemory:
    """What one resource's loop carries from one loop to the next: status.autoscaling as it
    last built it, written or not. The next decision reads its previous state (recommendation
    history, scale times, desired replicas) from here, so a write skipped loses nothing; a new
    daemon (an operator restart) starts empty and reads the last written status instead, which
    is at most one refresh period stale."""

    autoscaling: dict[str, Any] | None = None


_STATE = {
    ResultState.VALUE: "value",
    ResultState.NO_DATA: "noData",
    ResultState.UNAVAILABLE: "unavailable",
}


def _readings(signals: Signals) -> dict[str, tuple[str, float | None, str]]:
    return {
        name: (_STATE[result.state], result.value, result.message)
        for name, result in signals.by_name().items()
    }


async def autoscale_once(
    kube: KubeClient,
    pool: ProviderPool,
    body: Any,
    logger: Log,
    memory: LoopMemory,
    refresh_seconds: float,
) -> float:
    """One loop: read, decide, act, record (when status_write_due says so). Returns the seconds
    until the next loop."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    spec, problems = parse_spec(body.get("spec") or {}, body.get("status") or {})
    if spec is None or problems:
        return DEFAULT_INTERVAL  # the reconcile reports the bad spec
    auto = spec.autoscaling
    if auto is None or not auto.enabled:
        return DEFAULT_INTERVAL
    interval = auto.seconds().interval
    status = dict(body.get("status") or {})
    written: dict[str, Any] = status.get("autoscaling") or {}
    previous = AutoscalingStatus.model_validate(
        memory.autoscaling if memory.autoscaling is not None else written
    )
    # With a candidate beside the stable revision, capacity is decided for both together from
    # signals across both, then split by traffic weight (see split_replicas); while the
    # candidate only receives mirrored copies, from the stable revision's alone.
    plan = plan_for(spec, status)
    revision = plan.stable
    deploy_name = deployment_name(name, revision)
    deploy = await kube.get(DEPLOYMENTS, namespace, deploy_name)
    if deploy is None:
        return interval  # the reconcile has not created this revision yet
    current = int((deploy.get("spec") or {}).get("replicas", 0))
    ready = int((deploy.get("status") or {}).get("readyReplicas", 0))
    candidate = None
    if plan.candidate is not None:
        candidate = await kube.get(DEPLOYMENTS, namespace, deployment_name(name, plan.candidate))
        if previous.desired_replicas is not None:
            current = previous.desired_replicas
        if not plan.mirroring:
            ready += int(((candidate or {}).get("status") or {}).get("readyReplicas", 0))
        ready = min(ready, current)

    signals = await _read(pool, spec, namespace, name, plan.signal_revision)
    now = time.time()
    last_up = previous.last_scale_up_time
    decision = decide_replicas(
        AutoscalingInput(
            signals=signals.to_decision(),
            current_replicas=current,
            ready_replicas=ready,
            spec=auto,
            slo=spec.slo,
            now=now,
            history=history_from_status(previous),
            last_scale_up=parse_rfc3339(last_up) if last_up else None,
            scrape_interval=duration_seconds((spec.metrics or MetricsSpec()).scrape_interval),
        )
    )
    DESIRED_REPLICAS.labels(namespace=namespace, name=name).set(decision.desired_replicas)
    scaled = decision.desired_replicas != current
    resized = False  # any Deployment's replicas set this loop, a new split included
    if plan.candidate is not None:
        stable_n, candidate_n = plan.replicas(decision.desired_replicas)
        for obj, want in ((deploy, stable_n), (candidate, candidate_n)):
            have = int(((obj or {}).get("spec") or {}).get("replicas", -1))
            if obj is not None and have != want:
                await kube.scale(DEPLOYMENTS, namespace, obj["metadata"]["name"], want)
                resized = True
    elif scaled:
        await kube.scale(DEPLOYMENTS, namespace, deploy_name, decision.desired_replicas)
        resized = True
    if scaled:
        direction = "up" if decision.desired_replicas > current else "down"
        SCALE_ACTIONS.labels(namespace=namespace, name=name, direction=direction).inc()
        message = f"{current} -> {decision.desired_replicas}: {decision.reason}"
        kopf.event(
            cast(kopf.Body, body),
            type="Normal",
            reason=f"Scaled{direction.title()}",
            message=message,
        )
        logger.info("scaled %s", message)

    built = build_autoscaling_status(
        auto, decision, _readings(signals), current, ready, now, previous, scaled
    )
    memory.autoscaling = built
    desired: dict[str, Any] = {"autoscaling": built}
    METRICS_AVAILABLE.labels(namespace=namespace, name=name).set(1 if signals.available else 0)
    conditions = [Condition.model_validate(c) for c in status.get("conditions") or []]
    if signals.available:
        cond = set_condition(
            conditions,
            CONDITION_METRICS_AVAILABLE,
            "True",
            "SignalsRead",
            "every queried signal was read",
            now_rfc3339(),
        )
    else:
        cond = set_condition(
            conditions,
            CONDITION_METRICS_AVAILABLE,
            "False",
            "SourceUnavailable",
            signals.error_text()[:1000],
            now_rfc3339(),
        )
        if status_changed(conditions, cond):
            kopf.warn(
                cast(kopf.Body, body),
                reason="MetricsUnavailable",
                message=f"no scale-down until metrics are back: {signals.error_text()}"[:1000],
            )
    desired["conditions"] = [c.to_wire() for c in cond]
    why = status_write_due(
        written,
        built,
        scaled=resized,
        conditions_changed=bool(merge_patch(status, {"conditions": desired["conditions"]})),
        now=now,
        refresh_seconds=refresh_seconds,
    )
    if why is None:
        return interval  # nothing that matters changed; memory carries this loop's decision
    logger.debug("writing status.autoscaling: %s", why)
    changes = merge_patch(status, desired)
    if changes:
        try:
            await kube.patch_status(
                MODELDEPLOYMENTS, namespace, name, changes, meta.get("resourceVersion")
            )
        except KubeError as err:
            if not err.conflict:
                raise
            return min(interval, 1.0)  # status moved under us: redo the loop from fresh
    return interval


def status_changed(before: list[Condition], after: list[Condition]) -> bool:
    """Whether MetricsAvailable flipped (Events only on a change, not every loop)."""

    def get(conds: list[Condition]) -> str | None:
        return next((c.status for c in conds if c.type == CONDITION_METRICS_AVAILABLE), None)

    return get(before) != get(after)


async def _read(
    pool: ProviderPool,
    spec: ModelDeploymentSpec,
    namespace: str,
    name: str,
    revision: str | None,
) -> Signals:
    metrics = spec.metrics
    try:
        target = QueryTarget(
            namespace, name, revision=revision, window=metrics.rate_window if metrics else "1m"
        )
        options = PresetOptions(
            queue_metric=metrics.queue_metric if metrics else None,
            running_metric=metrics.running_metric if metrics else None,
            latency=spec.slo.latency if spec.slo else "e2e",
            model=metrics.model if metrics else None,
        )
        queries = build_queries(
            spec.server, target, overrides_from_spec(metrics.queries if metrics else None), options
        )
    except ValueError as err:
        # An override that cannot even be rendered is as good as a source that is down.
        return Signals.from_results({n: QueryResult.unavailable(str(err)) for n in SIGNAL_NAMES})
    provider = pool.get(metrics.prometheus_url if metrics else None)
    try:
        return await read_signals(provider, queries, source=spec.server)
    except asyncio.CancelledError:
        raise
