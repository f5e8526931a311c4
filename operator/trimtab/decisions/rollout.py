"""The rollout state machine: which traffic action comes next for a ModelDeployment's
revisions (`next_rollout_step`), how status changes once it is done (`apply_action`), and how
replicas split between stable and candidate (`split_replicas`).

Pure: the clock, the candidate's readiness and the analysis verdict are arguments."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from trimtab.api.autoscaling import SLOSpec, duration_seconds
from trimtab.api.common import Condition, ConditionStatus
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.rollout import (
    CONDITION_FALLBACK_APPLIED,
    CONDITION_ROLLED_BACK,
    CONDITION_ROLLOUT_PAUSED,
    CONDITION_ROLLOUT_PROGRESSING,
    AnalysisVerdict,
    CheckEvidence,
    KnownGoodRevision,
    ManualAction,
    RolloutPhase,
    RolloutSpec,
    RolloutStatus,
    Weights,
)
from trimtab.decisions.conditions import get_condition, set_condition
from trimtab.decisions.statistics import AnalysisResult, Check

# Verdicts kept in status; a rollout of hours at 15 s would otherwise outgrow an object.
MAX_VERDICTS = 100
# p99 <= T means at most 1% of requests are slower than T.
LATENCY_SHARE = 0.01


# --- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetWeights:
    """Send `candidate` percent to the candidate. With `start`, a new candidate revision begins
    (created beside the stable one at weight 0)."""

    stable: int
    candidate: int
    step_index: int
    reason: str
    start: str | None = None
    # Acted on the rollout-action annotation (which is then removed).
    by_hand: bool = False
    # With start, after a fallback whose target missed progressDeadline: the revision fallen
    # from, which serves, is stable again, and `start` is canaried beside it.
    abandon_fallback: bool = False
    kind: Literal["SetWeights"] = "SetWeights"


@dataclass(frozen=True)
class Mirror:
    """Copy `percent` of requests to the candidate; responses to copies are discarded."""

    percent: int
    reason: str
    kind: Literal["Mirror"] = "Mirror"


@dataclass(frozen=True)
class Promote:
    """The candidate (or the first revision) becomes stable and takes all traffic."""

    revision: str
    reason: str
    by_hand: bool = False
    kind: Literal["Promote"] = "Promote"


@dataclass(frozen=True)
class Rollback:
    """All traffic back to stable; the candidate is removed. `mark_failed`: not retried until
    the spec changes (False when the spec itself went back to the stable revision)."""

    reason: str
    mark_failed: bool = True
    kind: Literal["Rollback"] = "Rollback"


@dataclass(frozen=True)
class Hold:
    """Weights stay as they are. `end_watch`: the post-promotion window closed cleanly."""

    reason: str
    end_watch: bool = False
    # With end_watch: the window closed cleanly and the stable revision becomes known-good.
    known_good: bool = False
    # The fallback target missed progressDeadline (traffic stays on the revision fallen from).
    fallback_failed: bool = False
    # The spec went back to the stable revision: the failed revision's mark is dropped, so
    # setting the spec to it again is a retry.
    forget_failed: bool = False
    kind: Literal["Hold"] = "Hold"


@dataclass(frozen=True)
class Pause:
    """Weights stay until a person acts (promote annotation, or spec.rollout.paused unset)."""

    reason: str
    kind: Literal["Pause"] = "Pause"


@dataclass(frozen=True)
class Fallback:
    """The promoted revision breached its SLO in the watch window: go back to `to_revision`."""

    to_revision: str
    reason: str
    kind: Literal["Fallback"] = "Fallback"


RolloutAction = SetWeights | Mirror | Promote | Rollback | Hold | Pause | Fallback


@dataclass(frozen=True)
class RolloutInputs:
    """What the control loop observed this round.

    analysis: the verdict on the subject (candidate, or the promoted revision while watched);
    None when metrics are unavailable. manual: the rollout-action annotation, if set.
    stable_ready: the stable revision has a ready replica (False while a revision rebuilt by a
    fallback starts)."""

    desired_revision: str
    now: datetime
    candidate_ready: bool = False
    stable_ready: bool = True
    analysis: AnalysisResult | None = None
    manual: ManualAction | None = None


# --- helpers ------------------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def format_time(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _elapsed(since: str | None, now: datetime) -> float:
    return 0.0 if since is None else max(0.0, (now - parse_time(since)).total_seconds())


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def checks_for(
    spec: RolloutSpec, slo: SLOSpec | None, counted_at: float | None = None
) -> list[Check]:
    """The checks a rollout runs: absolute ones need a bound (analysis or spec.slo), relative
    ones a ratio. Latency is judged as the share of requests over the p99 bound, or over
    `counted_at`, the histogram bucket nearest it, which the latency checks then name."""
    checks: list[Check] = []
    err = spec.analysis.error_rate
    max_error = err.max if err.max is not None else (slo.max_error_rate if slo else None)
    if max_error is not None:
        checks.append(Check("errorRate", "slo", max_error))
    if err.max_ratio_to_stable is not None:
        checks.append(Check("errorRate", "stable", err.max_ratio_to_stable))
    bound = latency_bound_seconds(spec, slo)
    if bound is not None:
        at = counted_at if counted_at != bound else None
        checks.append(Check("latency", "slo", LATENCY_SHARE, at))
        ratio = spec.analysis.latency.max_ratio_to_stable
        if ratio is not None:
            checks.append(Check("latency", "stable", ratio, at))
    return checks


def latency_bound_seconds(spec: RolloutSpec, slo: SLOSpec | None) -> float | None:
    ms = spec.analysis.latency.p99_latency_ms
    if ms is None and slo is not None:
        ms = slo.p99_latency_ms
    return None if ms is None else ms / 1000.0


def carried_evidence(status: RolloutStatus) -> dict[str, float]:
    return {e.name: e.log_evidence for e in status.carried_evidence}


def _step_weights(
    spec: RolloutSpec, index: int, reason: str, *, by_hand: bool = False
) -> SetWeights:
    weight = spec.steps[index].weight
    return SetWeights(100 - weight, weight, index, reason, by_hand=by_hand)


def _advance(
    spec: RolloutSpec, status: RolloutStatus, why: str, *, by_hand: bool = False
) -> RolloutAction:
    nxt = status.step_index + 1
    if nxt >= len(spec.steps):
        assert status.candidate_revision is not None
        return Promote(
            status.candidate_revision, f"{why}; all {len(spec.steps)} steps done", by_hand
        )
    return _step_weights(
        spec,
        nxt,
        f"{why}; step {nxt + 1} of {len(spec.steps)}: {spec.steps[nxt].weight}%",
        by_hand=by_hand,
    )


# --- the state machine ----------------------------------------------------------------------


def next_rollout_step(
    spec: RolloutSpec, status: RolloutStatus, inputs: RolloutInputs
) -> RolloutAction:
    """Decide the next traffic action. Safety first: an abort, a missed progress deadline or a
    failing analysis roll back before anything else is considered (a pause included), and
    missing metrics freeze the weights (never promote blind). A step's clock (step_elapsed)
    leaves out time paused or with the candidate unready.

    Worked examples (steps 10% / 50%, each pausing 1m; analysis every 15s):
    - no stable revision yet -> Promote (the first revision has nothing to compare with)
    - spec revision b, stable a, no candidate -> SetWeights(100, 0, start=b): b starts at 0%
    - candidate b never ready, created 30m ago (progressDeadline 30m) -> Rollback
    - candidate ready before, now without a ready replica for 2m -> Hold (a mesh router
      sends its 10% to stable until it is ready again: routed_revisions); for 30m -> Rollback
    - spec.rollout.paused, analysis not failing -> Pause (at any step, shadow included)
    - candidate ready, step -1 -> SetWeights(90, 10, step 0)
    - step 0 for 20s, analysis Pass -> Hold("step 1: 20s of 1m00s")
    - step 0 for 70s, analysis Inconclusive (40 of 100 requests) -> Hold(too few requests)
    - step 0 for 70s, analysis Pass -> SetWeights(50, 50, step 1)
    - step 1 (the last) for 70s, Pass -> Promote(b)
    - any step, analysis Fail -> Rollback(with the failing checks)
    - any step, metrics unavailable -> Hold("metrics unavailable: weights frozen at 10%")
    - promoted 3m ago (watch 10m), analysis Fail, known-good [b, a] -> Fallback(to a)
    - fell back from b to a, a not ready yet, spec revision c -> Hold (c starts once a serves);
      a not ready within progressDeadline -> SetWeights(start=c, abandon_fallback): b, which
      serves, is stable again and c is canaried beside it
    """
    desired = inputs.desired_revision
    now = inputs.now
    candidate = status.candidate_revision
    stable = status.stable_revision

    if stable is None:
        return Promote(desired, f"first revision {desired}: nothing to compare with")

    if candidate is None:
        if status.phase == "FellBack" and not inputs.stable_ready and desired != stable:
            # The revision fallen from serves until the fallback target is ready; a candidate
            # started now would move traffic to the target before it has a pod.
            held = _watch(spec, status, inputs)
            if isinstance(held, Hold) and not held.fallback_failed:
                return replace(held, reason=f"{held.reason}; {desired} starts once it is")
            failed = status.failed_revision
            if isinstance(held, Hold) and failed is not None and desired != failed:
                # The target will not come: waiting for it would hold the new revision for
                # good, and starting beside it would route to a revision with no pod. The
                # revision fallen from, which still serves, is the one to measure against.
                return SetWeights(
                    100,
                    0,
                    -1,
                    f"new revision {desired}: the fallback to {stable} failed, so {failed}, "
                    f"which serves, is stable again and {desired} starts beside it",
                    start=desired,
                    abandon_fallback=True,
                )
        if (
            desired == stable
            and status.failed_revision is not None
            and (status.phase != "FellBack" or inputs.stable_ready)
        ):
            held = _watch(spec, status, inputs)
            if isinstance(held, Hold):
                return replace(held, forget_failed=True)
            return held
        if desired != stable and desired != status.failed_revision:
            unwatched = (
                f"; {stable} had not finished its watch window and does not become known-good"
                if status.promoted_at is not None
                else ""
            )
            return SetWeights(
                100,
                0,
                -1,
                f"new revision {desired}: starts beside stable {stable}{unwatched}",
                start=desired,
            )
        return _watch(spec, status, inputs)

    # A candidate is in flight.
    if desired == stable:
        return Rollback(
            f"spec went back to stable revision {stable}: candidate {candidate} removed",
            mark_failed=False,
        )
    if desired != candidate:
        if desired == status.failed_revision:
            # plan_revisions builds no Deployment for a failed revision: starting it would wait
            # for pods that never come. Back to the stable revision, which serves meanwhile.
            return Rollback(
                f"spec went back to {desired}, which failed and is not retried while the spec "
                f"says it: candidate {candidate} removed, stable {stable} serves",
                mark_failed=False,
            )
        return SetWeights(
            100, 0, -1, f"new revision {desired} replaces candidate {candidate}", start=desired
        )
    if inputs.manual == "abort":
        return Rollback(f"candidate {candidate} aborted by hand")
    deadline = duration_seconds(spec.progress_deadline)
    mesh = spec.router.type != "replicas"
    if not inputs.candidate_ready:
        if not has_served(status):
            waited = _elapsed(status.candidate_since, now)
            if waited >= deadline:
                return Rollback(
                    f"candidate {candidate} not ready within progressDeadline "
                    f"{spec.progress_deadline}"
                )
            return Hold(
                f"waiting for candidate {candidate} to be ready ({_fmt(waited)} of "
                f"{spec.progress_deadline})"
            )
        unready = _elapsed(status.candidate_unready_since or format_time(now), now)
        if unready >= deadline:
            return Rollback(
                f"candidate {candidate} has had no ready replica for {_fmt(unready)} "
                f"(progressDeadline {spec.progress_deadline})"
            )
        if mesh and status.weights.candidate > 0:
            # routed_revisions sends its share to stable while it has no ready replica.
            return Hold(
                f"candidate {candidate} has no ready replica ({_fmt(unready)} of "
                f"{spec.progress_deadline}): its {status.weights.candidate}% goes to stable "
                f"{stable} until it is ready again; step clock stopped"
            )
        return Hold(
            f"candidate {candidate} has no ready replica ({_fmt(unready)} of "
            f"{spec.progress_deadline}); step clock stopped"
        )
    analysis = inputs.analysis
    if analysis is not None and analysis.verdict == "Fail":
        return Rollback(f"analysis failed: {analysis.reason}")
    if spec.paused:
        # Holds everything but a rollback: the annotation waits (abort acted above).
        where = (
            "before the first step"
            if status.step_index == -1 and not status.weights.mirror_percent
            else f"at {status.weights.candidate}% (mirror {status.weights.mirror_percent}%)"
        )
        return Pause(f"paused by spec.rollout.paused {where}")
    if spec.strategy == "Immediate":
        return Promote(candidate, "strategy Immediate: candidate is ready")
    if inputs.manual == "promote-full":
        return Promote(candidate, "promoted by hand (promote-full)", by_hand=True)

    shadow = spec.shadow_or_default()
    in_shadow = shadow is not None and status.step_index == -1
    if in_shadow and shadow is not None:
        if status.weights.mirror_percent != shadow.mirror_percent:
            return Mirror(
                shadow.mirror_percent,
                f"candidate ready: mirroring {shadow.mirror_percent}% of requests to {candidate}",
            )
        if inputs.manual == "promote":
            return _step_weights(spec, 0, "shadow ended by hand; step 1", by_hand=True)
        if analysis is None:
            return Hold("metrics unavailable: mirroring continues, weights frozen")
        elapsed = step_elapsed(status, now)
        needed = duration_seconds(shadow.duration)
        if elapsed < needed:
            return Hold(f"shadow: {_fmt(elapsed)} of {shadow.duration}")
        samples = min((r.samples for r in analysis.results), default=0)
        if samples < shadow.min_requests:
            return Hold(f"shadow: too few mirrored requests: {samples} of {shadow.min_requests}")
        if analysis.verdict != "Pass":
            return Hold(f"shadow: {analysis.reason}")
        return _step_weights(
            spec,
            0,
            f"shadow passed ({samples} requests); step 1 of {len(spec.steps)}: "
            f"{spec.steps[0].weight}%",
        )

    if status.step_index == -1:
        return _step_weights(
            spec,
            0,
            f"candidate {candidate} ready; step 1 of {len(spec.steps)}: {spec.steps[0].weight}%",
        )
    index = min(status.step_index, len(spec.steps) - 1)
    if inputs.manual == "promote":
        return _advance(
            spec, status, f"step {status.step_index + 1} promoted by hand", by_hand=True
        )
    weight = status.weights.candidate
    if analysis is None:
        return Hold(f"metrics unavailable: weights frozen at {weight}%")
    step = spec.steps[index]
    label = f"step {status.step_index + 1} of {len(spec.steps)} ({weight}%)"
    if step.pause is not None and step.pause.until_promoted:
        return Pause(f"{label} waits to be promoted by hand")
    pause = (
        step.pause.duration
        if step.pause is not None and step.pause.duration is not None
        else spec.analysis.interval
    )
    elapsed = step_elapsed(status, now)
    if elapsed < duration_seconds(pause):
        return Hold(f"{label}: {_fmt(elapsed)} of {pause}")
    if analysis.verdict != "Pass":
        return Hold(f"{label}: {analysis.reason}")
    return _advance(spec, status, f"{label} passed")


def has_served(status: RolloutStatus) -> bool:
    """The candidate has had a ready replica: noted, or implied by any step past the start
    (which only a ready candidate reaches; a status written before candidateReadyAt existed)."""
    return (
        status.candidate_ready_at is not None
        or status.step_index >= 0
        or status.weights.mirror_percent > 0
    )


def step_elapsed(status: RolloutStatus, now: datetime) -> float:
    """Seconds the current step (or shadow) has run, not counting time it was held (paused,
    or the candidate without a ready replica and its traffic withheld).

    >>> st = RolloutStatus(step_since="2025-01-01T00:00:00Z", held_seconds=60,
    ...                    held_since="2025-01-01T00:04:00Z")
    >>> step_elapsed(st, parse_time("2025-01-01T00:05:00Z"))
    180.0
    """
    held = status.held_seconds + (_elapsed(status.held_since, now) if status.held_since else 0)
    return max(0.0, _elapsed(status.step_since, now) - held)


def _watch(spec: RolloutSpec, status: RolloutStatus, inputs: RolloutInputs) -> RolloutAction:
    """No candidate: the stable revision serves all, and may still be inside its watch."""
    stable = status.stable_revision
    if status.promoted_at is None:
        if status.phase == "FellBack" and not inputs.stable_ready:
            waited = _elapsed(status.fallback_since, inputs.now) if status.fallback_since else 0
            if waited >= duration_seconds(spec.progress_deadline):
                return Hold(
                    f"fallback to {stable} failed: no ready replica within progressDeadline "
                    f"{spec.progress_deadline}; {status.failed_revision} keeps serving (it "
                    f"moves to {stable} once {stable} is ready)",
                    fallback_failed=True,
                )
            return Hold(
                f"fell back to {stable}: {status.failed_revision} keeps serving until {stable} "
                "has a ready replica"
            )
        if status.failed_revision is not None and inputs.desired_revision == status.failed_revision:
            return Hold(
                f"revision {status.failed_revision} failed and is not retried; stable {stable} "
                "serves all traffic; change the spec to try again"
            )
        return Hold(f"stable revision {stable} serves all traffic")
    window = duration_seconds(spec.post_promotion.watch_window)
    elapsed = _elapsed(status.promoted_at, inputs.now)
    analysis = inputs.analysis
    failing = analysis is not None and analysis.verdict == "Fail"
    passed = not failing and (
        status.watch_verdict == "Pass" or (analysis is not None and analysis.verdict == "Pass")
    )
    if elapsed >= window and status.watch_verdict == "Fail":
        return Hold(
            f"watch window {spec.post_promotion.watch_window} passed: {stable} breached its SLO "
            "in it and does not become known-good",
            end_watch=True,
        )
    if elapsed >= window and (passed or window == 0):
        return Hold(
            f"watch window {spec.post_promotion.watch_window} passed: {stable} is known-good",
            end_watch=True,
            known_good=True,
        )
    if elapsed >= window and not failing:
        return Hold(
            f"watch window {spec.post_promotion.watch_window} passed without a passing verdict "
            f"on {stable} ({analysis.reason if analysis else 'metrics unavailable'}): it stays "
            "watched, and not known-good, until analysis passes"
        )
    if analysis is None:
        return Hold(
            f"metrics unavailable while watching {stable} ({_fmt(elapsed)} of "
            f"{spec.post_promotion.watch_window})"
        )
    if analysis.verdict != "Fail":
        return Hold(f"watching {stable}: {_fmt(elapsed)} of {spec.post_promotion.watch_window}")
    if not spec.post_promotion.automatic_fallback:
        return Hold(f"{stable} breaches its SLO ({analysis.reason}); automatic fallback is off")
    # A revision joins knownGood only when its window closes, so [0] is the one before.
    earlier = [k for k in status.known_good if k.revision != stable]
    if not earlier:
        return Hold(
            f"{stable} breaches its SLO ({analysis.reason}); no earlier known-good "
            "revision to fall back to"
        )
    return Fallback(
        earlier[0].revision,
        f"{stable} breached its SLO {_fmt(elapsed)} after promotion: {analysis.reason}",
    )


def routed_revisions(
    status: RolloutStatus,
    serving: frozenset[str],
    handover: tuple[str, int] | None = None,
) -> tuple[str, str | None, Weights] | None:
    """(stable, candidate, weights) a mesh router should send traffic to now, given the
    revisions that have a ready replica; None before the first revision.

    Status says where traffic should go; this says where it can. A mesh would otherwise send
    requests to a Service with no endpoints. A candidate without a ready replica (a crash, a
    node drain) gets no share until it has one again; status keeps its step's weight, so its
    replicas stay sized for the step and the share returns as soon as it serves. After a
    fallback the known-good revision is rebuilt from nothing, so until it serves, traffic
    stays on the revision fallen back from (it answers, if badly, where a revision without
    endpoints would answer nothing).

    >>> canary = RolloutStatus(stable_revision="a", candidate_revision="b",
    ...                        weights=Weights(stable=50, candidate=50))
    >>> routed_revisions(canary, frozenset({"a"}))[2]
    Weights(stable=100, candidate=0, mirror_percent=0)
    >>> routed_revisions(canary, frozenset({"a", "b"}))[2]
    Weights(stable=50, candidate=50, mirror_percent=0)

    >>> fell = RolloutStatus(stable_revision="a", failed_revision="b", phase="FellBack")
    >>> routed_revisions(fell, frozenset({"b"}))[:2]
    ('b', None)
    >>> routed_revisions(fell, frozenset({"a", "b"}))[:2]
    ('a', None)
    >>> routed_revisions(fell, frozenset())[:2]  # neither serves: route where status says
    ('a', None)
    >>> promoted = RolloutStatus(stable_revision="b", phase="Watching")
    >>> routed_revisions(promoted, frozenset({"a", "b"}), handover=("a", 80))
    ('b', 'a', Weights(stable=20, candidate=80, mirror_percent=0))
    """
    stable = status.stable_revision
    if stable is None:
        return None
    failed = status.failed_revision
    if (
        status.phase == "FellBack"
        and status.candidate_revision is None
        and failed is not None
        and stable not in serving
        and failed in serving
    ):
        return failed, None, Weights()
    candidate, weights = status.candidate_revision, status.weights
    if candidate is None and handover is not None:
        # A promotion's handover (see `handover`): the previous stable keeps its share.
        return stable, handover[0], Weights(stable=100 - handover[1], candidate=handover[1])
    if candidate is not None and weights.candidate > 0 and candidate not in serving:
        weights = Weights(stable=100, candidate=0, mirror_percent=weights.mirror_percent)
    return stable, candidate, weights


def handover_share(
    status: RolloutStatus,
    stable_ready: int,
    stable_target: int,
    outgoing_ready: int,
    now: datetime,
    limit_s: float,
) -> int | None:
    """Percent of traffic the previous stable revision keeps while the promoted one's replicas
    start; None when there is no handover (or it is over).

    A promotion moves all traffic at once to a revision that may have only the replicas of its
    last step; its others start then. Until they are ready the previous stable revision keeps
    the share its ready replicas carry, and it is removed only after: once the promoted one
    has its replicas ready, or `limit_s` after the promotion (a GPU pool too full for both
    revisions at once must not wait forever).

    >>> from datetime import timedelta
    >>> t0 = parse_time("2025-01-01T00:00:00Z")
    >>> st = RolloutStatus(stable_revision="b", promoted_at="2025-01-01T00:00:00Z",
    ...                    phase="Watching")
    >>> handover_share(st, 1, 5, 4, t0 + timedelta(seconds=30), 120)
    80
    >>> handover_share(st, 5, 5, 4, t0 + timedelta(seconds=30), 120) is None  # full
    True
    >>> handover_share(st, 1, 5, 4, t0 + timedelta(seconds=130), 120) is None  # time is up
    True
    """
    if status.candidate_revision is not None or status.phase != "Watching":
        return None
    if status.promoted_at is None or outgoing_ready <= 0 or stable_ready >= stable_target:
        return None
    if _elapsed(status.promoted_at, now) >= limit_s:
        return None
    return round(100 * outgoing_ready / (outgoing_ready + max(0, stable_ready)))


def handover(
    status: RolloutStatus,
    plan: RevisionPlan,
    ready_replicas: Mapping[str, int],
    total: int,
    now: datetime,
    limit_s: float,
) -> tuple[str, int] | None:
    """(previous stable revision, percent it keeps) while a promoted revision's replicas start
    (`handover_share`); None otherwise. `ready_replicas`: each running revision's ready count;
    the previous stable is the revision the plan no longer keeps with the most ready ones.

    >>> st = RolloutStatus(stable_revision="b", promoted_at="2025-01-01T00:00:00Z",
    ...                    phase="Watching")
    >>> plan = plan_revisions("b", True, st)
    >>> handover(st, plan, {"a": 4, "b": 1}, 5, parse_time("2025-01-01T00:00:30Z"), 120)
    ('a', 80)
    """
    outgoing = {r: n for r, n in ready_replicas.items() if r not in plan.keep and n > 0}
    if not outgoing or plan.stable not in ready_replicas:
        return None
    previous = max(outgoing, key=lambda r: outgoing[r])
    share = handover_share(
        status, ready_replicas[plan.stable], plan.replicas(total)[0], outgoing[previous], now,
        limit_s,
    )  # fmt: skip
    return None if share is None else (previous, share)


# --- status after an action -----------------------------------------------------------------


def _verdicts(
    status: RolloutStatus, analysis: AnalysisResult | None, now: str, subject: str | None
) -> list[AnalysisVerdict]:
    out = list(status.verdicts)
    if analysis is not None:
        for r in analysis.results:
            out.append(
                AnalysisVerdict(
                    metric=r.check.metric,
                    against=r.check.against,
                    value=None if r.value is None else round(r.value, 6),
                    baseline=None if r.baseline is None else round(r.baseline, 6),
                    threshold=r.check.threshold,
                    bound_seconds=r.check.bound_seconds,
                    samples=r.samples,
                    evidence=round(r.log_evidence, 3),
                    verdict=r.verdict,
                    time=now,
                    revision=subject,
                    step=status.step_index if status.candidate_revision else None,
                )
            )
    return out[-MAX_VERDICTS:]


def _phase_in_flight(weights: Weights) -> RolloutPhase:
    return "Shadow" if weights.mirror_percent and not weights.candidate else "Canary"


def apply_action(
    spec: RolloutSpec,
    status: RolloutStatus,
    action: RolloutAction,
    *,
    now: datetime,
    desired_model: dict[str, Any],
    analysis: AnalysisResult | None = None,
    inputs: RolloutInputs | None = None,
) -> RolloutStatus:
    """The status after `action` was carried out (weights set, objects written). Everything a
    restarted operator needs to resume lives here.

    Worked example: status step 0 at 10% with carried evidence {} and an analysis whose
    errorRate/slo step evidence is -1.2; action SetWeights(50, 50, 1) -> step 1, weights
    50/50, step_since now, carried {errorRate/slo: -1.2}, verdicts + this round's."""
    stamp = format_time(now)
    subject = status.candidate_revision or status.stable_revision
    data = status.model_copy(deep=True)
    # A failed fallback is over with any move but the Hold that says it still is.
    data.fallback_failed_at = None
    data.verdicts = _verdicts(status, analysis, stamp, subject)
    if status.candidate_revision is None and status.promoted_at and analysis is not None:
        if analysis.verdict == "Fail":
            data.watch_verdict = "Fail"
        elif analysis.verdict == "Pass" and status.watch_verdict is None:
            data.watch_verdict = "Pass"
    data.reason = action.reason
    if isinstance(action, SetWeights):
        if action.start is not None:
            _clear_candidate(data)
            # The spec moved on from the revision that failed: setting it back later is a
            # deliberate retry, which plan_revisions and this machine then both allow.
            if action.start != status.failed_revision:
                data.failed_revision = None
            if action.abandon_fallback and status.failed_revision is not None:
                # Its model is not in status (the fallback replaced it): its Deployment is
                # left as it is until the new revision is promoted and retires it.
                data.stable_revision = status.failed_revision
                data.stable_model = None
                data.failed_revision = None
                data.fallback_since = None
            data.candidate_revision = action.start
            data.candidate_model = desired_model
            data.candidate_since = stamp
            data.verdicts = []
            # A stable revision still in its watch window did not finish it: it does not
            # become known-good (a rollback of this candidate still returns to it).
            data.promoted_at = None
            data.watch_verdict = None
        elif analysis is not None:
            # The finished step's evidence is carried into the next as a product (log sum).
            carried = carried_evidence(status)
            for r in analysis.results:
                carried[r.check.name] = carried.get(r.check.name, 0.0) + r.step_log_evidence
            data.carried_evidence = [
                CheckEvidence(name=k, log_evidence=round(v, 6)) for k, v in sorted(carried.items())
            ]
        data.weights = Weights(stable=action.stable, candidate=action.candidate, mirror_percent=0)
        data.step_index = action.step_index
        _new_step(data, stamp)
        data.phase = "Canary"
    elif isinstance(action, Mirror):
        data.weights = Weights(stable=100, candidate=0, mirror_percent=action.percent)
        _new_step(data, stamp)
        data.phase = "Shadow"
    elif isinstance(action, Promote):
        model = status.candidate_model if status.candidate_revision else desired_model
        # Known-good only once its watch window closes cleanly (Hold(known_good=True)).
        data.stable_model = model or desired_model
        data.stable_revision = action.revision
        data.failed_revision = None
        data.fallback_since = None
        _clear_candidate(data)
        data.promoted_at = stamp
        data.watch_verdict = None
        data.phase = "Watching"
    elif isinstance(action, Rollback):
        if action.mark_failed:
            data.failed_revision = status.candidate_revision
        _clear_candidate(data)
        data.phase = "RolledBack" if action.mark_failed else "Stable"
        stable = status.stable_revision
        if (
            stable is not None
            and status.promoted_at is None
            and all(k.revision != stable for k in status.known_good)
        ):
            # The candidate cut the stable revision's watch short (or it never had one): it
            # serves alone again, so its watch starts again, and a clean window makes it
            # known-good, rather than leaving an older revision the only one to fall back to.
            data.promoted_at = stamp
            data.watch_verdict = None
    elif isinstance(action, Fallback):
        data.failed_revision = status.stable_revision
        data.known_good = [k for k in status.known_good if k.revision != status.stable_revision]
        data.stable_revision = action.to_revision
        data.stable_model = next(
            (k.model for k in status.known_good if k.revision == action.to_revision), None
        )
        data.promoted_at = None
        data.watch_verdict = None
        data.fallback_since = stamp
        data.weights = Weights()
        data.phase = "FellBack"
    elif isinstance(action, Pause):
        data.phase = "Paused"
    elif isinstance(action, Hold):
        data.fallback_failed_at = (
            (status.fallback_failed_at or stamp) if action.fallback_failed else None
        )
        if action.forget_failed:
            data.failed_revision = None
        if status.phase == "FellBack" and status.fallback_since is None:
            # Written by a version that did not record it: the deadline counts from now.
            data.fallback_since = stamp
        if action.end_watch and action.known_good and status.stable_revision is not None:
            entry = KnownGoodRevision(
                revision=status.stable_revision,
                model=stable_model(status) or desired_model,
                promoted_at=status.promoted_at,
            )
            rest = [k for k in status.known_good if k.revision != status.stable_revision]
            data.known_good = [entry, *rest][: spec.known_good_history]
        if action.end_watch:
            data.promoted_at = None
            data.watch_verdict = None
            data.phase = "Stable"
        elif status.candidate_revision is not None:
            data.phase = "Paused" if spec.paused else _phase_in_flight(status.weights)
    if inputs is not None and not (isinstance(action, SetWeights) and action.start):
        _track_holds(spec, data, inputs.candidate_ready, now)
    if inputs is not None and inputs.stable_ready and not isinstance(action, Fallback):
        data.fallback_since = None  # the fallback target serves: its deadline is met
    return data


def _new_step(data: RolloutStatus, stamp: str) -> None:
    data.step_since = stamp
    data.held_seconds = 0
    data.held_since = None


def _track_holds(spec: RolloutSpec, data: RolloutStatus, ready: bool, now: datetime) -> None:
    """Record when the candidate first served, when it stopped serving, and when the step's
    clock stopped (paused, or unready after it had served) or runs again."""
    if data.candidate_revision is None:
        return
    stamp = format_time(now)
    if ready:
        data.candidate_ready_at = data.candidate_ready_at or stamp
        data.candidate_unready_since = None
    elif has_served(data):
        data.candidate_unready_since = data.candidate_unready_since or stamp
    held = spec.paused or data.candidate_unready_since is not None
    if held:
        data.held_since = data.held_since or stamp
    elif data.held_since is not None:
        data.held_seconds += int(_elapsed(data.held_since, now))
        data.held_since = None


def _clear_candidate(data: RolloutStatus) -> None:
    data.candidate_revision = None
    data.candidate_model = None
    data.candidate_since = None
    data.candidate_ready_at = None
    data.candidate_unready_since = None
    data.held_since = None
    data.held_seconds = 0
    data.step_since = None
    data.step_index = -1
    data.carried_evidence = []
    data.weights = Weights()


def stable_model(status: RolloutStatus) -> dict[str, Any] | None:
    """The model part that rebuilds the stable revision (the spec may describe the candidate):
    status.stableModel, or (a status written before it existed) the known-good entry."""
    if status.stable_model is not None:
        return status.stable_model
    return next((k.model for k in status.known_good if k.revision == status.stable_revision), None)


# --- replicas -------------------------------------------------------------------------------


def split_replicas(
    total: int, weights: Weights, *, exact_weights: bool, in_rollout: bool
) -> tuple[int, int]:
    """(stable, candidate) replicas for `total` replicas of capacity chosen by the autoscaler.

    Capacity follows traffic: the candidate gets total * weight replicas, rounded (halves
    down), and the stable the rest, so the two add up to `total` (and never past
    maxReplicas). During a rollout each
    side keeps at least one replica (the candidate must become ready before it gets traffic):
    with a mesh that replica comes out of `total` once it is 2 or more; without one (the
    replica ratio is the split) a step whose share rounds to no replica gets one on top, the
    one case but shadow where the sum exceeds `total`. Shadow with a mesh: the stable keeps
    all of `total` (it answers every request) and the candidate gets a copy sized for the
    mirrored share,
    ceil(total * mirror); the autoscaler then reads the stable revision's signals only, so the
    copies do not count as demand (RevisionPlan.signal_revision).

    Worked examples:
    - total 10, 90/10 -> (9, 1); total 4, 75/25 -> (3, 1); total 3, 90/10, mesh -> (2, 1)
    - total 3, 90/10, replicas router -> (3, 1): the candidate's floor, on top (25%, not 33%)
    - total 4, shadow 100% mirror, mesh -> (4, 4): the candidate sees every request as a copy
    - total 0 (scaled to zero), in rollout -> (1, 1); no rollout, total 5 -> (5, 0)
    - total 4, a 100% step -> (1, 4): the stable keeps one replica to roll back to
    """
    if not in_rollout:
        return total, 0
    if exact_weights and weights.mirror_percent and not weights.candidate:
        return max(total, 1), max(math.ceil(total * weights.mirror_percent / 100.0 - 1e-9), 1)
    # Halves round down: a canary's share errs small.
    cand_n = math.ceil(total * weights.candidate / 100.0 - 0.5)
    if weights.stable > 0 and total >= 2:
        # With a mesh the weights hold whatever the replicas, so the candidate's floor comes
        # out of the total; without one the replica ratio is the split, and taking a replica
        # from the stable would send the candidate more than its step's share.
        cand_n = min(max(cand_n, 1 if exact_weights else 0), total - 1)
    # The stable keeps a replica even at a 100% step: a rollback there must have a pod to
    # send traffic back to (on top of `total`, as the candidate's floor is).
    stable_n = max(total - cand_n, 1)
    return stable_n, max(cand_n, 1)


def effective_weights(stable_replicas: int, candidate_replicas: int) -> Weights:
    """The split a replica-ratio router achieves with these ready replica counts."""
    total = stable_replicas + candidate_replicas
    if total == 0:
        return Weights()
    cand = round(100 * candidate_replicas / total)
    return Weights(stable=100 - cand, candidate=cand, mirror_percent=0)


# --- which revisions run --------------------------------------------------------------------


@dataclass(frozen=True)
class RevisionPlan:
    """The revisions that run for a ModelDeployment and how traffic splits between them, from
    the spec's revision and status.rollout. The reconcile, the autoscaler and the rollout loop
    all build Deployments and replica counts from this one answer, so they never disagree.

    stable_model: the model part that rebuilds the stable revision when the spec describes
    another one (None when the spec is the stable revision, or when status lacks it)."""

    stable: str
    candidate: str | None
    weights: Weights
    rollout: bool
    exact_weights: bool
    stable_from_spec: bool
    stable_model: dict[str, Any] | None = None
    # A candidate that status still names but the spec no longer does; it keeps running
    # until the rollout loop replaces or removes it.
    outgoing: str | None = None

    @property
    def status_revision(self) -> str:
        """The revision whose readiness the phase and Ready condition report."""
        return self.candidate or self.stable

    @property
    def keep(self) -> frozenset[str]:
        return frozenset(r for r in (self.stable, self.candidate, self.outgoing) if r)

    @property
    def mirroring(self) -> bool:
        """The candidate receives copies of requests only (shadow)."""
        return bool(self.candidate and self.weights.mirror_percent and not self.weights.candidate)

    @property
    def signal_revision(self) -> str | None:
        """The revision whose signals measure user demand for the autoscaler; None: all of
        them. During a canary, user requests are split over both revisions, so both count;
        while mirroring, the candidate's requests are copies of the stable's (counting them
        would double the demand), so only the stable's do. Without a candidate every revision
        that still runs serves users: the previous stable during a handover, the revision fallen
        back from until the known-good one serves. Without spec.rollout, the old
        revision serves through the shared Service until the new one is ready (then it is
        retired): all revisions count, or the new one, cold-starting, would be sized blind
        and then for the share of traffic its first ready pods get.

        >>> plan_revisions("a", True, RolloutStatus(stable_revision="a")).signal_revision is None
        True
        >>> plan_revisions("b", False, RolloutStatus()).signal_revision is None
        True
        >>> shadow = RolloutStatus(stable_revision="a", candidate_revision="b",
        ...                        weights=Weights(stable=100, mirror_percent=100))
        >>> plan_revisions("b", True, shadow, exact_weights=True).signal_revision
        'a'
        >>> canary = shadow.model_copy(update={"weights": Weights(stable=90, candidate=10)})
        >>> plan_revisions("b", True, canary, exact_weights=True).signal_revision is None
        True
        """
        if self.rollout and self.mirroring:
            return self.stable
        return None

    @property
    def service_revision(self) -> str | None:
        """The one revision the Service named after the resource selects; None: every
        revision's pods. With a mesh router and a candidate in flight, only the route sends
        the candidate requests: callers of the Service itself (in-cluster clients, an Ingress,
        sidecars the route does not cover) reach the stable revision, so a shadow candidate
        never answers a real request and a canary gets no share beyond its weight. Otherwise
        all: the replica router splits by pods behind this Service, and after a promotion or a
        fallback the revision still serving keeps answering until it is retired.

        >>> canary = RolloutStatus(stable_revision="a", candidate_revision="b",
        ...                        weights=Weights(stable=90, candidate=10))
        >>> plan_revisions("b", True, canary, exact_weights=True).service_revision
        'a'
        >>> plan_revisions("b", True, canary, exact_weights=False).service_revision is None
        True
        >>> promoted = RolloutStatus(stable_revision="b", phase="Watching")
        >>> plan_revisions("b", True, promoted, exact_weights=True).service_revision is None
        True
        """
        if self.rollout and self.exact_weights and (self.candidate or self.outgoing):
            return self.stable
        return None

    def replicas(self, total: int) -> tuple[int, int]:
        """(stable, candidate) replicas for `total` replicas of capacity."""
        return split_replicas(
            total,
            self.weights,
            exact_weights=self.exact_weights,
            in_rollout=bool(self.candidate),
        )


def plan_revisions(
    desired: str,
    rollout: bool,
    status: RolloutStatus,
    *,
    exact_weights: bool = False,
) -> RevisionPlan:
    """Which revisions run, from the spec's revision `desired` and status.rollout.

    Worked examples:
    - no spec.rollout -> stable = desired, no candidate (a new revision replaces the old once
      ready, as without progressive delivery)
    - rollout, status has no stable yet -> stable = desired: the first revision is stable at once
    - stable a, desired a -> stable a, no candidate
    - stable a, desired b -> candidate b beside a, at status's weights when status already
      names b as the candidate, else at 100/0 (b starts without traffic)
    - stable a, desired b, failedRevision b -> no candidate: b is not retried
    - stable a, candidate b in status, desired c -> candidate c at 100/0; b is `outgoing`
    """
    if not rollout or status.stable_revision is None:
        return RevisionPlan(desired, None, Weights(), rollout, exact_weights, True)
    stable = status.stable_revision
    candidate = desired if desired not in (stable, status.failed_revision) else None
    weights = (
        status.weights
        if candidate is not None and status.candidate_revision == candidate
        else Weights()
    )
    outgoing = (
        status.candidate_revision if status.candidate_revision not in (candidate, None) else None
    )
    from_spec = stable == desired
    return RevisionPlan(
        stable,
        candidate,
        weights,
        rollout,
        exact_weights,
        from_spec,
        None if from_spec else stable_model(status),
        outgoing,
    )


def spec_with_model(spec: ModelDeploymentSpec, model: dict[str, Any]) -> ModelDeploymentSpec:
    """`spec` with its model part replaced by `model` (a known-good revision's, from status):
    the policy parts (replicas, autoscaling, rollout) stay the spec's own.

    >>> from trimtab.builders.common import content_hash
    >>> old = ModelDeploymentSpec(image="a:1", replicas=2)
    >>> new = ModelDeploymentSpec(image="a:2", replicas=5)
    >>> back = spec_with_model(new, old.model_part())
    >>> (back.image, back.replicas, back.model_part() == old.model_part())
    ('a:1', 5, True)
    """
    wire = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    model_keys = {
        spec.model_fields[f].alias or f for f in ModelDeploymentSpec.model_fields_for_revision
    }
    policy = {k: v for k, v in wire.items() if k not in model_keys}
    return ModelDeploymentSpec.model_validate({**policy, **model})


# --- conditions and manual actions -----------------------------------------------------------


def manual_action_done(
    raw: str,
    manual: ManualAction | None,
    action: RolloutAction,
    before: RolloutStatus,
    after: RolloutStatus,
) -> bool:
    """Whether the rollout-action annotation has been acted on (or can never be)."""
    if manual is None:
        return True  # not a known action: removed, with a warning Event from _record
    if before.candidate_revision is None:
        return True  # nothing in flight to act on
    if manual == "abort":
        return isinstance(action, Rollback)
    if manual == "promote-full":
        return isinstance(action, Promote)
    # Only a move made for the annotation: the automatic start of step 1 is not one.
    return (
        isinstance(action, SetWeights | Promote) and action.by_hand
    ) or after.candidate_revision != before.candidate_revision


def rollout_conditions(
    conditions: list[Condition],
    after: RolloutStatus,
    action: RolloutAction,
    metrics_error: str,
    note: str,
    now: str,
) -> list[Condition]:
    """The four rollout conditions after this loop (their meaning is in api/rollout.py)."""
    in_flight = after.candidate_revision is not None
    reason_text = (after.reason or "")[:1000]
    status: ConditionStatus = "True" if in_flight else "False"
    if in_flight and metrics_error:
        status, reason = "False", "MetricsUnavailable"
        message = (
            f"weights frozen at {after.weights.candidate}% (mirror "
            f"{after.weights.mirror_percent}%), nothing is promoted until metrics are back: "
            f"{metrics_error}"
        )
    elif in_flight and isinstance(action, Pause):
        status, reason, message = "False", "Paused", reason_text
    elif in_flight:
        reason = "Analysing" if after.step_index >= 0 else "Starting"
        message = f"{reason_text}; {note}" if note else reason_text
    else:
        reason, message = after.phase, reason_text
    conds = set_condition(
        conditions, CONDITION_ROLLOUT_PROGRESSING, status, reason, message[:1000], now
    )
    paused = after.phase == "Paused"
    conds = set_condition(
        conds,
        CONDITION_ROLLOUT_PAUSED,
        "True" if paused else "False",
        "Paused" if paused else "NotPaused",
        reason_text if paused else "",
        now,
    )
    conds = sticky_condition(
        conds,
        CONDITION_ROLLED_BACK,
        after.phase == "RolledBack",
        "RolledBack",
        reason_text if isinstance(action, Rollback) else None,
        now,
    )
    if after.fallback_failed_at is not None:
        return set_condition(
            conds, CONDITION_FALLBACK_APPLIED, "False", "FallbackFailed", reason_text, now
        )
    failed_before = get_condition(conds, CONDITION_FALLBACK_APPLIED)
    recovered = failed_before is not None and failed_before.reason == "FallbackFailed"
    return sticky_condition(
        conds,
        CONDITION_FALLBACK_APPLIED,
        after.phase == "FellBack",
        "FellBack",
        # After a failed fallback recovers, say what holds now rather than nothing.
        reason_text if isinstance(action, Fallback) or recovered else None,
        now,
    )


def sticky_condition(
    conds: list[Condition],
    type_: str,
    active: bool,
    reason: str,
    fresh_message: str | None,
    now: str,
) -> list[Condition]:
    """A condition whose message says why it became True and keeps saying so while it holds
    (the rollout's reason moves on to "not retried" while the cause stays the same)."""
    if not active:
        return set_condition(conds, type_, "False", "NotApplied", "", now)
    current = get_condition(conds, type_)
    message = fresh_message
    if message is None:
        message = current.message if current and current.status == "True" else ""
    return set_condition(conds, type_, "True", reason, message or "", now)
