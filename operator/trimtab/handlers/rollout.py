"""The rollout control loop: one kopf daemon per ModelDeployment with spec.rollout. Every
analysis interval it reads per-revision request counts in one query, asks next_rollout_step,
acts through the traffic router, retires revisions the rollout is done with, and records why
(status.rollout, conditions, Events, the trimtab_rollout_* metrics).

All state lives in status.rollout (and the route written in status.route), so a restarted
operator resumes at the same step."""

from __future__ import annotations

import contextlib
import datetime
import math
from collections.abc import Callable
from typing import Any, cast

import kopf

from trimtab import constants as C
from trimtab.api.autoscaling import AutoscalingSpec, MetricsSpec, duration_seconds
from trimtab.api.common import Condition
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.rollout import (
    MANUAL_ACTIONS,
    ROLLOUT_ACTION_ANNOTATION,
    GatewayApiRouterSpec,
    ManualAction,
    RolloutSpec,
    RolloutStatus,
    RouterSpec,
    Weights,
)
from trimtab.builders.autoscaling import replicas_for_revision
from trimtab.builders.common import Owner, merge_patch, owner_labels
from trimtab.builders.routing import (
    build_revision_service,
    route_of,
    route_record,
)
from trimtab.builders.serving import revision_of, serving_ports
from trimtab.decisions.rollout import (
    Fallback,
    Hold,
    Mirror,
    Pause,
    Promote,
    RevisionPlan,
    Rollback,
    RolloutAction,
    RolloutInputs,
    SetWeights,
    apply_action,
    carried_evidence,
    checks_for,
    handover,
    latency_bound_seconds,
    manual_action_done,
    next_rollout_step,
    parse_time,
    rollout_conditions,
    routed_revisions,
)
from trimtab.decisions.routing import (
    RouteHealth,
    fields_not_kept_warning,
    refusal_to_report,
    route_condition,
    rule_fields_not_kept,
    takeover_losses,
    takeover_warning,
    warning_due,
)
from trimtab.decisions.serving import DeploymentObservation, revision_serving
from trimtab.decisions.statistics import AnalysisResult, Counts, Metric, evaluate_checks
from trimtab.handlers.modeldeployment import (
    Log,
    apply_revisions,
    now_rfc3339,
    owner_of,
    parse_spec,
    plan_for,
)
from trimtab.handlers.routes import (
    KubeRouterClient,
    delete_revision_services,
    record_route,
    release_stale_route,
    route_lock,
    route_refusal,
)
from trimtab.kube.client import KubeClient, KubeError, patch_status_from
from trimtab.kube.resources import DEPLOYMENTS, MODELDEPLOYMENTS
from trimtab.metrics.base import QueryResult
from trimtab.metrics.factory import ProviderPool
from trimtab.metrics.presets import (
    PresetOptions,
    QueryTarget,
    bucket_bounds_query,
    choose_bucket,
    count_queries,
)
from trimtab.observability import ROLLBACKS, ROLLOUT_WEIGHT, ROUTE_ACCEPTED
from trimtab.routing.base import Json, RouteTarget, TrafficRouter
from trimtab.routing.registry import build_router

DEFAULT_INTERVAL = 15.0


def rollout_configured(spec: kopf.Spec, **_: Any) -> bool:
    return isinstance(spec.get("rollout"), dict)


@kopf.daemon(
    C.GROUP,
    C.VERSION,
    C.MODELDEPLOYMENT_PLURAL,
    when=rollout_configured,
    cancellation_timeout=5.0,
)
async def rollout_loop(
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: Any,
    logger: Log,
    **_: Any,
) -> None:
    """Run the loop until the resource goes or drops spec.rollout (kopf stops the daemon)."""
    meta = body["metadata"]
    for kind in ("rollback", "fallback"):
        # At 0 from the start, so the first one is an increase an alert sees (increase()
        # cannot count a series' first sample).
        ROLLBACKS.labels(meta["namespace"], meta["name"], kind)
    while not stopped:
        interval = DEFAULT_INTERVAL
        try:
            async with route_lock(memo):
                interval = await rollout_once(
                    memo.kube, memo.metrics_pool, meta["namespace"], meta["name"], logger,
                    warned=warnings_posted(memo),
                )  # fmt: skip
        except Exception:  # one bad loop must not end the daemon; the next one retries
            logger.exception("rollout loop failed; retrying in %.0fs", interval)
        await stopped.wait(interval)
    # The resource or its spec.rollout is gone: so are the weights and the route's state.
    for gauge in (ROLLOUT_WEIGHT, ROUTE_ACCEPTED):
        gauge.remove_by_labels({"namespace": meta["namespace"], "name": meta["name"]})


def warnings_posted(memo: Any) -> dict[str, float]:
    """When each route Warning of this ModelDeployment (a takeover's losses, rule fields the
    route's CRD drops) was last posted (per resource, as its memo is), so one that holds at
    every loop repeats hourly rather than every loop."""
    posted: dict[str, float] | None = getattr(memo, "takeover_warnings", None)
    if posted is None:
        posted = memo.takeover_warnings = {}
    return posted


# --- reading the counts ---------------------------------------------------------------------


def _counts(results: dict[str, QueryResult], role: str) -> dict[Metric, Counts]:
    def value(name: str) -> int | None:
        r = results.get(f"{role}.{name}")
        if r is None or not r.has_value or r.value is None or not math.isfinite(r.value):
            return None
        return max(0, round(r.value))

    out: dict[Metric, Counts] = {}
    requests, errors = value("requests"), value("errors")
    if requests is not None:
        out["errorRate"] = Counts(requests, min(requests, errors or 0))
    seen, fast = value("latencyRequests"), value("latencyFast")
    if seen is not None and fast is not None:
        out["latency"] = Counts(seen, max(0, seen - fast))
    return out


async def analyse(
    pool: ProviderPool,
    spec: ModelDeploymentSpec,
    rollout: RolloutSpec,
    status: RolloutStatus,
    owner: Owner,
    subject: str,
    baseline: str | None,
    since: str,
    now: datetime.datetime,
) -> tuple[AnalysisResult | None, str, str]:
    """(verdict, metrics error, note) on `subject`'s requests since `since`, against the SLO
    and, with a `baseline` revision, against it over the same window. The verdict is None when
    the source failed: the caller must not move weights then."""
    elapsed = max(1, math.ceil((now - parse_time(since)).total_seconds()))
    bound = latency_bound_seconds(rollout, spec.slo)
    options = PresetOptions(
        latency=spec.slo.latency if spec.slo else "e2e",
        model=spec.metrics.model if spec.metrics else None,
    )
    metrics = spec.metrics
    provider = pool.get(metrics.prometheus_url if metrics else None)
    # The latency histogram's bucket nearest the bound: exporters with fixed bounds that are no
    # whole millisecond (TGI's grow by 1.5x) have none at exactly the SLO's.
    latency_le, bucket_note = None, ""
    bounds_query = (
        bucket_bounds_query(spec.server, QueryTarget(owner.namespace, owner.name), options)
        if bound is not None
        else None
    )
    if bound is not None and bounds_query is not None:
        found = await provider.label_values(bounds_query, "le")
        if found.error:
            return None, found.error[:1000], ""
        latency_le, bucket_note = choose_bucket(found.values, bound)
    queries: dict[str, str] = {}
    countable: set[str] = set()
    for role, revision in (("candidate", subject), ("stable", baseline)):
        if revision is None:
            continue
        target = QueryTarget(owner.namespace, owner.name, revision=revision, window=f"{elapsed}s")
        for name, query in count_queries(spec.server, target, bound, options, latency_le).items():
            if query:
                queries[f"{role}.{name}"] = query
                countable.add(name)
    # One query: counts read by separate queries can straddle a scrape, and a histogram's count
    # read a scrape later than its bucket invents slow requests (a false rollback).
    results = await provider.query_together(queries)
    failures = sorted({r.message for r in results.values() if r.is_unavailable})
    if failures:
        return None, "; ".join(failures)[:1000], ""
    candidate = _counts(results, "candidate")
    stable = _counts(results, "stable") if baseline else None
    checks = checks_for(rollout, spec.slo, None if latency_le is None else float(latency_le))
    note = ""
    if bound is not None and "latencyFast" not in countable:
        # The preset has no latency histogram at all (Triton, TorchServe): a known limit of
        # the server, said once in the condition, not a gap in the data.
        checks = [c for c in checks if c.metric != "latency"]
        note = f"latency not judged: the {spec.server} preset exports no latency histogram"
    result = evaluate_checks(
        checks,
        candidate,
        stable,
        carried=carried_evidence(status),
        false_rollback_rate=rollout.analysis.false_rollback_rate,
        min_requests=rollout.analysis.min_requests,
    )
    if result.missing:
        scrape = duration_seconds((spec.metrics or MetricsSpec()).scrape_interval)
        note = missing_data_note(
            result.missing,
            spec.server,
            bound,
            subject,
            baseline,
            window_s=elapsed,
            scrape_s=scrape,
            bucket_note=bucket_note,
        )
    return result, "", note


def missing_data_note(
    missing: tuple[str, ...],
    server: str,
    bound: float | None,
    subject: str,
    baseline: str | None,
    *,
    window_s: float = math.inf,
    scrape_s: float = 0.0,
    bucket_note: str = "",
) -> str:
    """Why configured checks had no data (they hold the step: no data is never a pass). A
    window of fewer than two scrapes has no increase() yet: every step starts that way."""
    if window_s < 2 * scrape_s:
        return (
            f"no data yet for {', '.join(missing)}: the {window_s:g}s counted so far span "
            f"fewer than two scrapes (spec.metrics.scrapeInterval {scrape_s:g}s); the step holds"
        )
    why: list[str] = []
    if any(m.startswith("latency") for m in missing) and bound is not None:
        if bucket_note:
            why.append(
                f"the {server} latency histogram has {bucket_note}; set "
                "analysis.latency.p99LatencyMs within 5% of one of its bucket bounds"
            )
        else:
            why.append(
                f"the {server} metrics of {subject}"
                + (f" or {baseline}" if baseline else "")
                + f" have no latency histogram bucket at le={bound:g}s (set "
                "analysis.latency.p99LatencyMs to one of the histogram's bucket bounds)"
            )
    if any(m.startswith("errorRate") for m in missing):
        why.append(
            f"no request counter series for {subject}" + (f" or {baseline}" if baseline else "")
        )
    return f"no data for {', '.join(missing)}: {'; '.join(why)}; the step holds"


# --- one loop -------------------------------------------------------------------------------


async def rollout_once(
    kube: KubeClient,
    pool: ProviderPool,
    namespace: str,
    name: str,
    logger: Log,
    now: datetime.datetime | None = None,
    warned: dict[str, float] | None = None,
) -> float:
    """One loop: observe, decide, act, record. Returns the seconds until the next loop.
    `warned` remembers the takeover Warnings posted (see warning_due); None posts each."""
    body = await kube.get(MODELDEPLOYMENTS, namespace, name)
    if body is None or body.get("metadata", {}).get("deletionTimestamp"):
        return DEFAULT_INTERVAL
    parsed, problems = parse_spec(body.get("spec") or {}, body.get("status") or {})
    if parsed is None or problems or parsed.rollout is None:
        return DEFAULT_INTERVAL  # the reconcile reports a bad spec
    owner = owner_of(cast(kopf.Body, body))
    # A route the spec no longer names is handed back before the one it names is recorded in
    # its place; then this loop goes on from a fresh read.
    if await release_stale_route(kube, body, owner, parsed, logger):
        return 1.0
    rollout = parsed.rollout
    interval = duration_seconds(rollout.analysis.interval)
    now = now or datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    status = dict(body.get("status") or {})
    before = RolloutStatus.model_validate(status.get("rollout") or {})
    annotations = body["metadata"].get("annotations") or {}
    raw_manual = annotations.get(ROLLOUT_ACTION_ANNOTATION)
    manual = cast(ManualAction, raw_manual) if raw_manual in MANUAL_ACTIONS else None

    listed = await kube.list(DEPLOYMENTS, namespace, owner_labels(owner))
    observed = {
        o.revision: o
        for o in (
            DeploymentObservation.from_manifest(
                d["metadata"].get("labels", {}).get(C.LABEL_REVISION, ""), d
            )
            for d in listed
        )
        if o.revision
    }
    ready = frozenset(r for r, o in observed.items() if revision_serving(o))
    candidate = before.candidate_revision
    candidate_ready = candidate is not None and candidate in ready

    analysis: AnalysisResult | None = None
    metrics_error, note = "", ""
    judged = False
    if (
        candidate is not None
        and candidate_ready
        and rollout.strategy != "Immediate"
        and (before.step_index >= 0 or before.weights.mirror_percent > 0)
        and before.step_since is not None
    ):
        judged = True
        analysis, metrics_error, note = await analyse(
            pool, parsed, rollout, before, owner, candidate, before.stable_revision,
            before.step_since, now,
        )  # fmt: skip
    elif candidate is None and before.promoted_at is not None and before.stable_revision:
        judged = True
        analysis, metrics_error, note = await analyse(
            pool, parsed, rollout, before, owner, before.stable_revision, None,
            before.promoted_at, now,
        )  # fmt: skip

    inputs = RolloutInputs(
        desired_revision=revision_of(parsed),
        now=now,
        candidate_ready=candidate_ready,
        analysis=analysis,
        manual=manual,
        stable_ready=before.stable_revision is None or before.stable_revision in ready,
    )
    action = next_rollout_step(rollout, before, inputs)
    after = apply_action(
        rollout,
        before,
        action,
        now=now,
        desired_model=parsed.model_part(),
        analysis=analysis,
        inputs=inputs,
    )
    if judged:
        # The analysis took a while (one Prometheus round): the autoscaler may have scaled
        # since this loop read status, and applying the replicas read then would undo it.
        fresh = await kube.get(MODELDEPLOYMENTS, namespace, name)
        if fresh is not None:
            status["autoscaling"] = (fresh.get("status") or {}).get("autoscaling")
    status_after = {**status, "rollout": after.to_wire()}
    plan_after = plan_for(parsed, status_after)
    total = replicas_for_revision(parsed, status)
    handover = _handover(parsed, rollout, after, plan_after, observed, total, now)

    moved = not isinstance(action, Hold | Pause)
    mesh = rollout.router.type != "replicas"
    route_health: RouteHealth | None = None
    # The route each write reads is checked for rules the takeover would drop, so the loop
    # reads it once.
    posted = {} if warned is None else warned
    check = _takeover_check(body, owner, rollout.router, posted, now, logger)
    written = _kept_check(body, rollout.router, posted, now, logger)
    client = KubeRouterClient(kube, route_read=check, route_written=written)
    refused = False
    try:
        if moved:
            await apply_revisions(kube, owner, parsed, status_after)
            warning, route_health = await _route(
                kube, client, parsed, rollout, owner, before, after, action, total, ready,
                handover,
            )  # fmt: skip
            if warning:
                note = f"{note}; {warning}" if note else warning
                kopf.warn(cast(kopf.Body, body), reason="MirrorNotAsAsked", message=warning)
                logger.warning("%s", warning)
        elif mesh:
            # Nothing moved, but the route is re-asserted at the weights status holds, so a
            # router added to or edited in spec.rollout (hostnames, gateways), a route deleted
            # or edited by hand, or one a restarted operator never wrote converges within one
            # loop; and after a fallback, traffic moves to the rebuilt revision once it serves.
            # The applies are reads when nothing differs.
            route_health = await _route_as_status_says(
                kube, client, parsed, rollout, owner, after, total, ready, handover
            )
    except KubeError as err:
        # A route the cluster cannot take as it is (its API not served, another's of that
        # name, refused as written) says so in RouteAccepted, and the step is not recorded:
        # the next loop tries again. Anything else is the loop's to log and retry.
        route_health = route_refusal(client, err)
        if route_health is None:
            raise
        refused = True
    finally:
        if client.applied:
            # Recorded at once (also when a later write of this loop failed), not with the
            # step below, which is not written when status.rollout changed meanwhile: a route
            # written and not recorded would not be released.
            record = route_record(owner, body["spec"]["rollout"].get("router"))
            if record is not None:
                await record_route(kube, body, record)
    _report_route(body, status, route_health, logger)
    _route_gauge(namespace, name, route_health, mesh)
    if refused:  # _report_route has posted the Warning, once per reason
        assert route_health is not None

        def refusal_patch(current: dict[str, Any]) -> dict[str, Any]:
            conditions = [Condition.model_validate(c) for c in current.get("conditions") or []]
            wire = [c.to_wire() for c in route_condition(conditions, route_health, True,
                                                         now_rfc3339())]  # fmt: skip
            return {"conditions": wire} if wire != current.get("conditions") else {}

        await write_rollout_status(kube, body, refusal_patch)
        return interval

    def status_patch(current: dict[str, Any]) -> dict[str, Any]:
        """What to write over `current` status: the rollout part, and the conditions list
        (which a merge patch replaces whole) rebuilt on `current`'s conditions."""
        stamp = now_rfc3339()
        conditions = rollout_conditions(
            [Condition.model_validate(c) for c in current.get("conditions") or []],
            after,
            action,
            metrics_error if judged else "",
            note,
            stamp,
        )
        conditions = route_condition(conditions, route_health, mesh, stamp)
        out: dict[str, Any] = {}
        rollout_patch = replace_patch(current.get("rollout") or {}, after.to_wire())
        if rollout_patch:
            out["rollout"] = rollout_patch
        wire_conditions = [c.to_wire() for c in conditions]
        if wire_conditions != current.get("conditions"):
            out["conditions"] = wire_conditions
        return out

    if not await write_rollout_status(kube, body, status_patch):
        return 1.0  # the rollout moved under us: redo the loop from a fresh read

    stale = set(observed) - plan_after.keep
    if stale or moved:
        # Not while the promoted revision's replicas start: the previous one still serves.
        await retire(
            kube, owner, plan_after.keep, observed, plan_after.stable in ready and not handover,
            mesh=mesh, logger=logger,
        )  # fmt: skip
    _record(body, namespace, name, before, after, action, metrics_error, logger)
    if raw_manual is not None and manual_action_done(raw_manual, manual, action, before, after):
        await remove_manual_action(kube, namespace, name, raw_manual)
    return interval


async def remove_manual_action(kube: KubeClient, namespace: str, name: str, read: str) -> bool:
    """Remove the rollout-action annotation, but only if it still holds what this loop read
    and acted on (a JSON patch that tests the value first): one set to something else while
    the loop ran stays, for the next loop to act on. False when it had changed (or gone)."""
    key = ROLLOUT_ACTION_ANNOTATION.replace("~", "~0").replace("/", "~1")
    path = f"/metadata/annotations/{key}"
    try:
        await kube.json_patch(
            MODELDEPLOYMENTS,
            namespace,
            name,
            [{"op": "test", "path": path, "value": read}, {"op": "remove", "path": path}],
        )
    except KubeError as err:
        if err.invalid or err.not_found:
            return False
        raise
    return True


async def write_rollout_status(
    kube: KubeClient,
    body: Json,
    status_patch: Callable[[dict[str, Any]], dict[str, Any]],
    attempts: int = 5,
) -> bool:
    """Record what this loop did. Other writers (the Deployment watch's status, the
    autoscaler) write other parts of status all the time, so a write from this loop's read can
    be refused (409) without anything of the rollout's having changed: then the patch is
    rebuilt on a fresh read and sent again (patch_status_from). The loop has acted already
    (Deployments, routes); losing its record to such a race would have the next loop act again
    and, while the race lasts, never record the step. False when status.rollout itself changed
    meanwhile (the caller redoes the loop) or the races outlast `attempts`."""
    read = (body.get("status") or {}).get("rollout") or {}

    def compute(current: Json) -> Json | None:
        status = dict(current.get("status") or {})
        if (status.get("rollout") or {}) != read:
            return None
        return status_patch(status)

    try:
        return await patch_status_from(kube, MODELDEPLOYMENTS, body, compute, attempts)
    except KubeError as err:
        if not err.conflict:
            raise
        return False


async def _route(
    kube: KubeClient,
    client: KubeRouterClient,
    spec: ModelDeploymentSpec,
    rollout: RolloutSpec,
    owner: Owner,
    before: RolloutStatus,
    after: RolloutStatus,
    action: RolloutAction,
    total: int,
    ready: frozenset[str],
    handover: tuple[str, int] | None = None,
) -> tuple[str, RouteHealth | None]:
    """Carry out `action` on the traffic router (the Deployments are applied already);
    `ready` holds the revisions with a ready replica. Returns a warning when the route the
    cluster stored does not mirror what was asked ("" otherwise), and what the route's
    controller reports on the route as last written (None: no route written)."""
    port = serving_ports(spec)[0]

    def router(stable: str, candidate: str | None, weights: Weights) -> TrafficRouter:
        target = RouteTarget(owner, port, stable, candidate, weights, total_replicas=total)
        return build_router(rollout.router, target, client)

    mesh = rollout.router.type != "replicas"
    if isinstance(action, SetWeights | Mirror):
        assert after.stable_revision is not None
        old = before.candidate_revision
        if before.stable_revision and old is not None and old != after.candidate_revision:
            await router(before.stable_revision, old, before.weights).finalize()
        # Where traffic can go: a candidate without a ready replica gets none yet.
        routed = routed_revisions(after, ready) if mesh else None
        w = routed[2] if routed is not None else after.weights
        moving = router(after.stable_revision, after.candidate_revision, w)
        stored = await moving.set_weights(w.stable, w.candidate, w.mirror_percent)
        if w.mirror_percent and stored is not None and stored.mirror_percent != w.mirror_percent:
            # Gateway API CRDs before v1.3 lack requestMirror.percent (the route is written
            # without it): the gateway then copies every request.
            return (
                f"the route stored mirrors {stored.mirror_percent}% of requests, not the "
                f"{w.mirror_percent}% asked: this cluster's route CRD does not keep the mirror "
                "percentage (Gateway API before v1.3), so the candidate receives a copy of "
                "every request"
            ), moving.health()
        return "", moving.health()
    if isinstance(action, Rollback):
        if before.stable_revision and before.candidate_revision:
            leaving = router(before.stable_revision, before.candidate_revision, before.weights)
            await leaving.finalize()
            return "", leaving.health()
    elif isinstance(action, Promote | Fallback):
        assert after.stable_revision is not None
        first = before.stable_revision is None
        if mesh:
            health = await _route_as_status_says(
                kube, client, spec, rollout, owner, after, total, ready, handover
            )
            return "", health
        if not first:
            # The replica router only scales, which apply_revisions has done for a first one.
            await router(after.stable_revision, None, Weights()).reconcile()
    return "", None


async def _route_as_status_says(
    kube: KubeClient,
    client: KubeRouterClient,
    spec: ModelDeploymentSpec,
    rollout: RolloutSpec,
    owner: Owner,
    status: RolloutStatus,
    total: int,
    ready: frozenset[str],
    handover: tuple[str, int] | None = None,
) -> RouteHealth | None:
    """Write a mesh route at the weights `status` holds, except that after a fallback the
    rebuilt known-good revision gets traffic only once it serves (routed_revisions): until
    then the route stays on the revision fallen back from, and the rebuilt one's Service is
    created ahead so that it has endpoints by the time the route moves. During a handover
    (`handover_share`) the previous stable revision keeps the share its ready replicas carry.
    Returns what the route's controller reports on the route (None: nothing written)."""
    routed = routed_revisions(status, ready, handover)
    if routed is None:
        return None
    stable, candidate, weights = routed
    port = serving_ports(spec)[0]
    if status.stable_revision is not None and stable != status.stable_revision:
        await kube.apply(build_revision_service(owner, status.stable_revision, port))
    target = RouteTarget(owner, port, stable, candidate, weights, total_replicas=total)
    router = build_router(rollout.router, target, client)
    await router.reconcile()
    return router.health()


def _takeover_check(
    body: Json,
    owner: Owner,
    router: RouterSpec,
    posted: dict[str, float],
    now: datetime.datetime,
    logger: Log,
) -> Callable[[Json | None], None] | None:
    """For a user's HTTPRoute that trimtab takes over (httpRoute without parentRefs): what
    sees the route before trimtab writes its one rule over it, and sends a Warning naming
    what of its rules that drops (takeover_losses). It is found once, at the takeover, and
    again only if something puts such rules back (a GitOps tool syncing the user's route,
    which then fights trimtab for the rules), then at most hourly."""
    if not isinstance(router, GatewayApiRouterSpec) or router.parent_refs is not None:
        return None
    ref = route_of(owner, router)
    assert ref is not None

    def check(route: Json | None) -> None:
        losses = takeover_losses(route or {}, router, owner.name)
        if not losses:
            return
        message = takeover_warning(ref.name, losses)
        if warning_due(message, posted, now.timestamp()):
            kopf.warn(cast(kopf.Body, body), reason="RouteRulesReplaced", message=message)
            logger.warning("%s", message)

    return check


def _kept_check(
    body: Json, router: RouterSpec, posted: dict[str, float], now: datetime.datetime, logger: Log
) -> Callable[[Json, Json], None] | None:
    """For an HTTPRoute with router.timeouts or router.retries: what sees the route as written
    and as stored, and sends a Warning when the API server dropped either from the rule
    (rule_fields_not_kept), at once and then at most hourly while it keeps dropping it (the
    route is written at every loop)."""
    if not isinstance(router, GatewayApiRouterSpec) or (
        router.timeouts is None and router.retries is None
    ):
        return None

    def check(asked: Json, stored: Json) -> None:
        if asked.get("kind") != "HTTPRoute":
            return
        fields = rule_fields_not_kept(asked, stored)
        if not fields:
            return
        message = fields_not_kept_warning(str(asked["metadata"]["name"]), fields)
        if warning_due(message, posted, now.timestamp()):
            kopf.warn(cast(kopf.Body, body), reason="RouteFieldsDropped", message=message)
            logger.warning("%s", message)

    return check


def _report_route(body: Json, status: Json, health: RouteHealth | None, logger: Log) -> None:
    """A Warning when the route's controller starts refusing the route (or refuses it for a
    new reason; see `refusal_to_report`): the condition says it too, but an Event reaches
    `kubectl describe` and alerting on Warnings."""
    conditions = [Condition.model_validate(c) for c in status.get("conditions") or []]
    message = refusal_to_report(conditions, health)
    if message is not None:
        kopf.warn(cast(kopf.Body, body), reason="RouteNotAccepted", message=message)
        logger.warning("%s", message)


ROUTE_GAUGE_VALUES = {"True": 1.0, "False": 0.0, "Unknown": -1.0}


def _route_gauge(namespace: str, name: str, health: RouteHealth | None, mesh: bool) -> None:
    """trimtab_route_accepted follows the RouteAccepted condition, for alerts on a refused
    route (`trimtab_route_accepted == 0`); no series without a route (the replica router)."""
    if not mesh:
        with contextlib.suppress(KeyError):
            ROUTE_ACCEPTED.remove(namespace, name)
    elif health is not None:
        ROUTE_ACCEPTED.labels(namespace, name).set(ROUTE_GAUGE_VALUES[health.status])


def _handover(
    spec: ModelDeploymentSpec,
    rollout: RolloutSpec,
    after: RolloutStatus,
    plan: RevisionPlan,
    observed: dict[str, DeploymentObservation],
    total: int,
    now: datetime.datetime,
) -> tuple[str, int] | None:
    """`handover` on what this loop observed; the wait is bounded by twice the cold start (at
    most progressDeadline)."""
    cold_start = (spec.autoscaling or AutoscalingSpec()).seconds().cold_start
    limit = min(2 * cold_start, duration_seconds(rollout.progress_deadline))
    ready = {r: o.ready_replicas for r, o in observed.items()}
    return handover(after, plan, ready, total, now, limit)


async def retire(
    kube: KubeClient,
    owner: Owner,
    keep: frozenset[str],
    observed: dict[str, DeploymentObservation],
    stable_serving: bool,
    *,
    mesh: bool,
    logger: Log,
) -> list[str]:
    """Delete the Deployments (and per-revision Services) of revisions the rollout is done
    with, once the stable revision serves: after a fallback, the broken revision keeps
    answering until the known-good one it was rebuilt from is up."""
    if not stable_serving:
        return []
    gone: list[str] = []
    for revision, obs in sorted(observed.items()):
        if revision not in keep and await kube.delete(DEPLOYMENTS, owner.namespace, obs.name):
            gone.append(revision)
            logger.info("retired revision %s of %s/%s", revision, owner.namespace, owner.name)
    if mesh:
        await delete_revision_services(kube, owner, keep)
    return gone


# --- status, conditions, Events, metrics ------------------------------------------------------


def replace_patch(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that makes `current` equal `desired`: keys only in `current` removed."""
    return merge_patch(current, desired, remove_missing=True)


def _record(
    body: Json,
    namespace: str,
    name: str,
    before: RolloutStatus,
    after: RolloutStatus,
    action: RolloutAction,
    metrics_error: str,
    logger: Log,
) -> None:
    """Events for every weight change, promotion, rollback and fallback, and the metrics."""
    obj = cast(kopf.Body, body)
    stable, candidate = after.stable_revision, after.candidate_revision

    def weights(status: RolloutStatus) -> None:
        if status.stable_revision:
            ROLLOUT_WEIGHT.labels(namespace, name, status.stable_revision).set(
                status.weights.stable
            )
        if status.candidate_revision:
            ROLLOUT_WEIGHT.labels(namespace, name, status.candidate_revision).set(
                status.weights.candidate
            )

    def forget(revision: str | None) -> None:
        if revision and revision not in (stable, candidate):
            with contextlib.suppress(KeyError):
                ROLLOUT_WEIGHT.remove(namespace, name, revision)

    weights(after)
    forget(before.stable_revision)
    forget(before.candidate_revision)
    reason_text = action.reason[:1000]
    if isinstance(action, SetWeights):
        w = after.weights
        if action.start is not None:
            kopf.event(
                obj,
                type="Normal",
                reason="RolloutStarted",
                message=f"candidate {candidate} beside stable {stable} at 0%: {reason_text}",
            )
        else:
            kopf.event(
                obj,
                type="Normal",
                reason="TrafficShifted",
                message=f"stable {stable} {w.stable}% / candidate {candidate} {w.candidate}%: "
                f"{reason_text}",
            )
    elif isinstance(action, Mirror):
        kopf.event(
            obj,
            type="Normal",
            reason="TrafficMirrored",
            message=f"{action.percent}% of requests copied to {candidate}: {reason_text}",
        )
    elif isinstance(action, Promote):
        kopf.event(
            obj,
            type="Normal",
            reason="RolloutPromoted",
            message=f"{action.revision} is stable and takes 100%: {reason_text}",
        )
    elif isinstance(action, Rollback):
        if action.mark_failed:
            ROLLBACKS.labels(namespace, name, "rollback").inc()
        kopf.event(
            obj,
            type="Warning" if action.mark_failed else "Normal",
            reason="RolledBack",
            message=f"{before.candidate_revision} removed, {stable} takes 100%: {reason_text}",
        )
    elif isinstance(action, Fallback):
        ROLLBACKS.labels(namespace, name, "fallback").inc()
        kopf.event(
            obj,
            type="Warning",
            reason="FallbackApplied",
            message=f"{before.stable_revision} -> known-good {action.to_revision}: {reason_text}",
        )
    elif isinstance(action, Pause) and before.phase != "Paused":
        kopf.event(obj, type="Normal", reason="RolloutPaused", message=reason_text)
    elif isinstance(action, Hold) and action.end_watch and action.known_good:
        kopf.event(obj, type="Normal", reason="RevisionKnownGood", message=reason_text)
    elif isinstance(action, Hold) and action.end_watch:
        kopf.event(obj, type="Warning", reason="WatchEndedWithBreach", message=reason_text)
    elif isinstance(action, Hold) and action.fallback_failed and before.fallback_failed_at is None:
        kopf.event(obj, type="Warning", reason="FallbackFailed", message=reason_text)
    was_frozen = before.reason is not None and before.reason.startswith("metrics unavailable")
    if metrics_error and candidate and not was_frozen:
        kopf.event(
            obj,
            type="Warning",
            reason="RolloutMetricsUnavailable",
            message=f"weights frozen at {after.weights.candidate}%: {metrics_error}"[:1000],
        )
    raw = ((body.get("metadata") or {}).get("annotations") or {}).get(ROLLOUT_ACTION_ANNOTATION)
    if raw is not None and raw not in MANUAL_ACTIONS:
        kopf.event(
            obj,
            type="Warning",
            reason="UnknownRolloutAction",
            message=f"{ROLLOUT_ACTION_ANNOTATION}={raw!r} removed; use one of "
            f"{', '.join(MANUAL_ACTIONS)}",
        )
    if not isinstance(action, Hold | Pause):
        logger.info("rollout %s/%s: %s: %s", namespace, name, action.kind, action.reason)
