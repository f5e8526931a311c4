"""The rollout state machine (`next_rollout_step`), its status transitions (`apply_action`) and
the replica split, as named tables; plus a walk through a whole canary and a restart."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from trimtab.api.autoscaling import SLOSpec
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.rollout import (
    KnownGoodRevision,
    RolloutSpec,
    RolloutStatus,
    Weights,
)
from trimtab.builders.serving import revision_of
from trimtab.decisions.rollout import (
    Fallback,
    Hold,
    Mirror,
    Pause,
    Promote,
    Rollback,
    RolloutInputs,
    SetWeights,
    apply_action,
    checks_for,
    effective_weights,
    manual_action_done,
    next_rollout_step,
    plan_revisions,
    rollout_conditions,
    routed_revisions,
    spec_with_model,
    split_replicas,
    stable_model,
)
from trimtab.decisions.statistics import AnalysisResult, Check, CheckResult

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
MODEL_A = {"image": "srv:a"}
MODEL_B = {"image": "srv:b"}


def ts(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def spec(**kw: Any) -> RolloutSpec:
    base: dict[str, Any] = {
        "steps": [
            {"weight": 10, "pause": {"duration": "1m"}},
            {"weight": 50, "pause": {"duration": "1m"}},
        ]
    }
    base.update(kw)
    return RolloutSpec.model_validate(base)


def verdict(v: str, samples: int = 500, step_ev: float = -1.0) -> AnalysisResult:
    check = Check("errorRate", "slo", 0.01)
    result = CheckResult(check, 0.001, None, samples, step_ev, step_ev, v)  # type: ignore[arg-type]  # literal from the table
    return AnalysisResult(v, (result,), f"verdict {v}")  # type: ignore[arg-type]  # literal from the table


PASS = verdict("Pass")
NO_LATENCY = AnalysisResult(
    "Inconclusive",
    PASS.results,
    "no data for latency/slo (1 other checks pass)",
    ("latency/slo",),
)
FAIL = verdict("Fail")
SHORT = verdict("Inconclusive", samples=40)

STABLE_A = RolloutStatus(
    stable_revision="a",
    known_good=[KnownGoodRevision(revision="a", model=MODEL_A, promoted_at=ts(-3600))],
)


def in_flight(step: int, since: float = 0.0, weight: int = 10, **kw: Any) -> RolloutStatus:
    return STABLE_A.model_copy(
        update={
            "candidate_revision": "b",
            "candidate_model": MODEL_B,
            "candidate_since": ts(-120),
            "step_index": step,
            "step_since": ts(since),
            "weights": Weights(stable=100 - weight, candidate=weight),
            "phase": "Canary",
            **kw,
        }
    )


CASES = [
    pytest.param(
        spec(),
        RolloutStatus(),
        dict(desired_revision="a"),
        Promote,
        "first revision",
        id="first-revision-promotes-at-once",
    ),
    pytest.param(
        spec(),
        STABLE_A,
        dict(desired_revision="a"),
        Hold,
        "serves all traffic",
        id="steady-state-holds",
    ),
    pytest.param(
        spec(),
        STABLE_A,
        dict(desired_revision="b"),
        SetWeights,
        "starts beside stable a",
        id="new-revision-starts-candidate-at-zero",
    ),
    pytest.param(
        spec(),
        in_flight(-1, weight=0),
        dict(desired_revision="b", candidate_ready=False),
        Hold,
        "waiting for candidate b",
        id="candidate-not-ready-waits",
    ),
    pytest.param(
        spec(progressDeadline="1m"),
        in_flight(-1, weight=0),
        dict(desired_revision="b", candidate_ready=False),
        Rollback,
        "progressDeadline",
        id="progress-deadline-rolls-back",
    ),
    pytest.param(
        spec(),
        in_flight(-1, weight=0),
        dict(desired_revision="b", candidate_ready=True),
        SetWeights,
        "step 1 of 2: 10%",
        id="ready-candidate-enters-step-1",
    ),
    pytest.param(
        spec(),
        in_flight(0, since=-20),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS),
        Hold,
        "20s of 1m",
        id="step-pause-duration-holds",
    ),
    pytest.param(
        spec(),
        in_flight(0, since=-70),
        dict(desired_revision="b", candidate_ready=True, analysis=SHORT),
        Hold,
        "Inconclusive",
        id="too-few-samples-holds-never-passes",
    ),
    pytest.param(
        spec(),
        in_flight(0, since=-70),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS),
        SetWeights,
        "step 2 of 2: 50%",
        id="passing-step-advances",
    ),
    pytest.param(
        spec(),
        in_flight(1, since=-70, weight=50),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS),
        Promote,
        "all 2 steps done",
        id="last-step-promotes",
    ),
    pytest.param(
        spec(),
        in_flight(0, since=-5),
        dict(desired_revision="b", candidate_ready=True, analysis=FAIL),
        Rollback,
        "analysis failed",
        id="failing-analysis-rolls-back",
    ),
    pytest.param(
        spec(),
        in_flight(1, since=-70, weight=50),
        dict(desired_revision="b", candidate_ready=True, analysis=NO_LATENCY),
        Hold,
        "no data for latency/slo",
        id="check-without-data-holds-never-promotes",
    ),
    pytest.param(
        spec(),
        in_flight(0, since=-70),
        dict(desired_revision="b", candidate_ready=True, analysis=None),
        Hold,
        "metrics unavailable: weights frozen at 10%",
        id="no-metrics-freezes-weights",
    ),
    pytest.param(
        spec(paused=True),
        in_flight(0, since=-70),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS),
        Pause,
        "spec.rollout.paused",
        id="paused-spec-pauses",
    ),
    pytest.param(
        spec(paused=True),
        in_flight(0, since=-70),
        dict(desired_revision="b", candidate_ready=True, analysis=FAIL),
        Rollback,
        "analysis failed",
        id="paused-still-rolls-back-on-failure",
    ),
    pytest.param(
        spec(steps=[{"weight": 10, "pause": {"untilPromoted": True}}, {"weight": 50}]),
        in_flight(0, since=-600),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS),
        Pause,
        "promoted by hand",
        id="until-promoted-pauses",
    ),
    pytest.param(
        spec(steps=[{"weight": 10, "pause": {"untilPromoted": True}}, {"weight": 50}]),
        in_flight(0, since=-600),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS, manual="promote"),
        SetWeights,
        "promoted by hand",
        id="manual-promote-advances",
    ),
    pytest.param(
        spec(),
        in_flight(0, since=-1),
        dict(desired_revision="b", candidate_ready=True, analysis=None, manual="promote-full"),
        Promote,
        "promote-full",
        id="manual-promote-full-promotes",
    ),
    pytest.param(
        spec(),
        in_flight(0, since=-1),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS, manual="abort"),
        Rollback,
        "aborted by hand",
        id="manual-abort-rolls-back",
    ),
    pytest.param(
        spec(),
        in_flight(0, since=-1),
        dict(desired_revision="a", candidate_ready=True),
        Rollback,
        "spec went back",
        id="spec-reverted-to-stable-removes-candidate",
    ),
    pytest.param(
        spec(),
        in_flight(0, since=-1),
        dict(desired_revision="c", candidate_ready=True),
        SetWeights,
        "replaces candidate b",
        id="newer-revision-replaces-candidate",
    ),
    pytest.param(
        spec(strategy="Immediate"),
        in_flight(-1, weight=0),
        dict(desired_revision="b", candidate_ready=True),
        Promote,
        "Immediate",
        id="immediate-promotes-when-ready",
    ),
    pytest.param(
        spec(strategy="ShadowThenCanary", router={"type": "istio", "host": "m.example"}),
        in_flight(-1, weight=0),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS),
        Mirror,
        "mirroring 100%",
        id="shadow-starts-mirroring",
    ),
    pytest.param(
        spec(strategy="ShadowThenCanary", router={"type": "istio", "host": "m.example"}),
        in_flight(-1, since=-60, weight=0, weights=Weights(stable=100, mirror_percent=100)),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS),
        Hold,
        "shadow: 1m00s of 5m",
        id="shadow-holds-for-duration",
    ),
    pytest.param(
        spec(strategy="ShadowThenCanary", router={"type": "istio", "host": "m.example"}),
        in_flight(-1, since=-400, weight=0, weights=Weights(stable=100, mirror_percent=100)),
        dict(desired_revision="b", candidate_ready=True, analysis=verdict("Pass", samples=200)),
        Hold,
        "too few mirrored requests: 200 of 500",
        id="shadow-needs-min-requests",
    ),
    pytest.param(
        spec(strategy="ShadowThenCanary", router={"type": "istio", "host": "m.example"}),
        in_flight(-1, since=-400, weight=0, weights=Weights(stable=100, mirror_percent=100)),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS),
        SetWeights,
        "shadow passed",
        id="shadow-passes-into-step-1",
    ),
    # progressDeadline: from creation until first ready, then from when it stopped serving.
    pytest.param(
        spec(steps=[{"weight": 10, "pause": {"untilPromoted": True}}, {"weight": 50}]),
        in_flight(0, since=-3500, candidate_since=ts(-3600), candidate_ready_at=ts(-3550)),
        dict(desired_revision="b", candidate_ready=False),
        Hold,
        "no ready replica (0s of 30m)",
        id="old-candidate-one-unready-observation-holds",
    ),
    pytest.param(
        spec(steps=[{"weight": 10, "pause": {"untilPromoted": True}}, {"weight": 50}]),
        in_flight(0, since=-3500, candidate_since=ts(-3600)),
        dict(desired_revision="b", candidate_ready=False),
        Hold,
        "no ready replica",
        id="status-without-ready-time-past-step-minus-1-holds",
    ),
    pytest.param(
        spec(),
        in_flight(0, since=-3500, candidate_ready_at=ts(-3550), candidate_unready_since=ts(-600)),
        dict(desired_revision="b", candidate_ready=False),
        Hold,
        "10m00s of 30m",
        id="unready-after-serving-within-deadline-holds",
    ),
    pytest.param(
        spec(),
        in_flight(0, since=-3500, candidate_ready_at=ts(-3550), candidate_unready_since=ts(-1800)),
        dict(desired_revision="b", candidate_ready=False),
        Rollback,
        "no ready replica for 30m00s",
        id="unready-after-serving-past-deadline-rolls-back",
    ),
    pytest.param(
        spec(progressDeadline="1m"),
        in_flight(-1, weight=0, candidate_since=ts(-30)),
        dict(desired_revision="b", candidate_ready=False),
        Hold,
        "30s of 1m",
        id="never-ready-within-deadline-waits",
    ),
    # A mesh withholds an unready candidate's share (routed_revisions); status keeps it.
    pytest.param(
        spec(router={"type": "istio", "host": "m.example"}),
        in_flight(0, since=-20, candidate_ready_at=ts(-30)),
        dict(desired_revision="b", candidate_ready=False),
        Hold,
        "its 10% goes to stable a",
        id="mesh-unready-candidate-loses-its-weight",
    ),
    pytest.param(
        spec(router={"type": "istio", "host": "m.example"}),
        in_flight(0, since=-20, candidate_unready_since=ts(-10), held_since=ts(-10)),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS),
        Hold,
        "step 1 of 2 (10%): 10s of 1m",
        id="mesh-candidate-ready-again-resumes-its-step",
    ),
    pytest.param(
        spec(),
        in_flight(0, since=-20, candidate_ready_at=ts(-30)),
        dict(desired_revision="b", candidate_ready=False),
        Hold,
        "no ready replica",
        id="replicas-router-unready-holds-weights",
    ),
    pytest.param(
        spec(),
        in_flight(0, since=-70, held_seconds=30),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS),
        Hold,
        "40s of 1m",
        id="held-time-does-not-count-toward-the-step",
    ),
    # spec.rollout.paused holds every move but a rollback.
    pytest.param(
        spec(paused=True),
        in_flight(-1, weight=0),
        dict(desired_revision="b", candidate_ready=True),
        Pause,
        "before the first step",
        id="paused-at-step-minus-1-does-not-start-step-1",
    ),
    pytest.param(
        spec(
            router={"type": "istio", "host": "m.example"}, strategy="ShadowThenCanary", paused=True
        ),
        in_flight(-1, weight=0),
        dict(desired_revision="b", candidate_ready=True),
        Pause,
        "spec.rollout.paused",
        id="paused-shadow-does-not-start-mirroring",
    ),
    pytest.param(
        spec(
            router={"type": "istio", "host": "m.example"}, strategy="ShadowThenCanary", paused=True
        ),
        in_flight(-1, since=-400, weight=0, weights=Weights(stable=100, mirror_percent=100)),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS),
        Pause,
        "mirror 100%",
        id="paused-shadow-does-not-end",
    ),
    pytest.param(
        spec(strategy="Immediate", paused=True),
        in_flight(-1, weight=0),
        dict(desired_revision="b", candidate_ready=True),
        Pause,
        "spec.rollout.paused",
        id="paused-immediate-does-not-promote",
    ),
    pytest.param(
        spec(paused=True),
        in_flight(0, since=-70),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS, manual="promote"),
        Pause,
        "spec.rollout.paused",
        id="paused-annotation-waits",
    ),
    pytest.param(
        spec(paused=True),
        in_flight(0, since=-70),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS, manual="abort"),
        Rollback,
        "aborted by hand",
        id="paused-abort-rolls-back",
    ),
    pytest.param(
        spec(paused=True),
        in_flight(0, since=-70, candidate_unready_since=ts(-1800)),
        dict(desired_revision="b", candidate_ready=False),
        Rollback,
        "progressDeadline",
        id="paused-unready-past-deadline-rolls-back",
    ),
    pytest.param(
        spec(),
        in_flight(0, since=-3600, held_seconds=3590),
        dict(desired_revision="b", candidate_ready=True, analysis=PASS),
        Hold,
        "10s of 1m",
        id="unpaused-after-long-pause-does-not-advance-at-once",
    ),
    pytest.param(
        spec(),
        STABLE_A.model_copy(update={"failed_revision": "b"}),
        dict(desired_revision="b"),
        Hold,
        "not retried",
        id="failed-revision-not-retried",
    ),
    pytest.param(
        spec(),
        STABLE_A.model_copy(update={"failed_revision": "b", "phase": "FellBack"}),
        dict(desired_revision="b", stable_ready=False),
        Hold,
        "b keeps serving until a has a ready replica",
        id="fallback-target-starting-holds-on-failed",
    ),
    pytest.param(
        spec(),
        STABLE_A.model_copy(update={"failed_revision": "b", "phase": "FellBack"}),
        dict(desired_revision="b", stable_ready=True),
        Hold,
        "not retried",
        id="fallback-target-serving",
    ),
    pytest.param(
        spec(),
        STABLE_A.model_copy(
            update={"failed_revision": "b", "phase": "FellBack", "fallback_since": ts(-1799)}
        ),
        dict(desired_revision="b", stable_ready=False),
        Hold,
        "b keeps serving until a has a ready replica",
        id="fallback-target-starting-within-deadline",
    ),
    pytest.param(
        spec(),
        STABLE_A.model_copy(
            update={"failed_revision": "b", "phase": "FellBack", "fallback_since": ts(-1800)}
        ),
        dict(desired_revision="b", stable_ready=False),
        Hold,
        "fallback to a failed: no ready replica within progressDeadline 30m; b keeps serving",
        id="fallback-target-never-ready-fails-keeps-traffic",
    ),
    pytest.param(
        # A new image while the fallback target still starts: starting c now would move the
        # route to a (no pod yet) and off b, which serves; c waits for a.
        spec(),
        STABLE_A.model_copy(
            update={"failed_revision": "b", "phase": "FellBack", "fallback_since": ts(-60)}
        ),
        dict(desired_revision="c", stable_ready=False),
        Hold,
        "b keeps serving until a has a ready replica; c starts once it is",
        id="a-new-image-waits-for-the-fallback-target",
    ),
    pytest.param(
        spec(),
        STABLE_A.model_copy(
            update={"failed_revision": "b", "phase": "FellBack", "fallback_since": ts(-60)}
        ),
        dict(desired_revision="c", stable_ready=True),
        SetWeights,
        "new revision c",
        id="a-new-image-starts-once-the-fallback-target-serves",
    ),
    pytest.param(
        # The fallback target missed its deadline: c no longer waits for a, which may never
        # come; b (fallen from, still serving) is stable again and c starts beside it.
        spec(),
        STABLE_A.model_copy(
            update={"failed_revision": "b", "phase": "FellBack", "fallback_since": ts(-1800)}
        ),
        dict(desired_revision="c", stable_ready=False),
        SetWeights,
        "the fallback to a failed, so b, which serves, is stable again and c starts beside it",
        id="a-new-image-after-a-failed-fallback-starts-beside-the-revision-that-serves",
    ),
    pytest.param(
        # Status from before the failed mark was dropped on a new start: the spec goes back to
        # the failed b while c is a candidate; no Deployment would be built for b.
        spec(),
        in_flight(0, candidate_revision="c", failed_revision="b"),
        dict(desired_revision="b", candidate_ready=True),
        Rollback,
        "spec went back to b, which failed and is not retried while the spec says it",
        id="back-to-a-failed-revision-mid-rollout-returns-to-stable",
    ),
    pytest.param(
        spec(),
        RolloutStatus(
            stable_revision="b",
            promoted_at=ts(-180),
            known_good=[
                KnownGoodRevision(revision="b", model=MODEL_B),
                KnownGoodRevision(revision="a", model=MODEL_A),
            ],
        ),
        dict(desired_revision="b", analysis=FAIL),
        Fallback,
        "breached its SLO",
        id="breach-in-watch-window-falls-back",
    ),
    pytest.param(
        spec(postPromotion={"automaticFallback": False}),
        RolloutStatus(
            stable_revision="b",
            promoted_at=ts(-180),
            known_good=[
                KnownGoodRevision(revision="b", model=MODEL_B),
                KnownGoodRevision(revision="a", model=MODEL_A),
            ],
        ),
        dict(desired_revision="b", analysis=FAIL),
        Hold,
        "automatic fallback is off",
        id="fallback-off-only-reports",
    ),
    pytest.param(
        spec(),
        RolloutStatus(
            stable_revision="a",
            promoted_at=ts(-180),
            known_good=[KnownGoodRevision(revision="a", model=MODEL_A)],
        ),
        dict(desired_revision="a", analysis=FAIL),
        Hold,
        "no earlier known-good",
        id="breach-without-earlier-revision-holds",
    ),
    pytest.param(
        spec(),
        RolloutStatus(stable_revision="b", promoted_at=ts(-180)),
        dict(desired_revision="b", analysis=None),
        Hold,
        "metrics unavailable while watching",
        id="watch-without-metrics-holds",
    ),
    pytest.param(
        spec(),
        RolloutStatus(stable_revision="b", promoted_at=ts(-601)),
        dict(desired_revision="b", analysis=PASS),
        Hold,
        "known-good",
        id="watch-window-ends",
    ),
]


@pytest.mark.parametrize(("rollout", "status", "inputs", "kind", "reason"), CASES)
def test_next_rollout_step(
    rollout: RolloutSpec, status: RolloutStatus, inputs: dict[str, Any], kind: type, reason: str
) -> None:
    action = next_rollout_step(rollout, status, RolloutInputs(now=T0, **inputs))
    assert isinstance(action, kind), action
    assert reason in action.reason


@pytest.mark.parametrize(
    ("total", "weights", "exact", "in_rollout", "expected"),
    [
        pytest.param(10, Weights(stable=90, candidate=10), True, True, (9, 1), id="mesh-90-10"),
        pytest.param(
            3, Weights(stable=90, candidate=10), True, True, (2, 1), id="mesh-sum-stays-total"
        ),
        pytest.param(7, Weights(stable=50, candidate=50), True, True, (4, 3), id="mesh-half"),
        pytest.param(
            4, Weights(stable=100, mirror_percent=50), True, True, (4, 2), id="shadow-half-copy"
        ),
        pytest.param(
            4, Weights(stable=100, candidate=0), True, True, (3, 1), id="withheld-candidate-floor"
        ),
        pytest.param(10, Weights(stable=90, candidate=10), False, True, (9, 1), id="replica-90"),
        pytest.param(4, Weights(stable=75, candidate=25), False, True, (3, 1), id="replicas-75-25"),
        pytest.param(
            4, Weights(stable=100, mirror_percent=100), True, True, (4, 4), id="shadow-full-copy"
        ),
        pytest.param(0, Weights(stable=90, candidate=10), True, True, (1, 1), id="zero-in-rollout"),
        pytest.param(5, Weights(), True, False, (5, 0), id="no-rollout"),
        pytest.param(
            2, Weights(stable=90, candidate=10), False, True, (2, 1), id="replicas-min-one-each"
        ),
        pytest.param(4, Weights(stable=0, candidate=100), True, True, (1, 4),
                     id="a-100-percent-step-keeps-a-stable-replica-mesh"),
        pytest.param(4, Weights(stable=0, candidate=100), False, True, (1, 4),
                     id="a-100-percent-step-keeps-a-stable-replica-replicas"),
    ],
)  # fmt: skip
def test_split_replicas(
    total: int, weights: Weights, exact: bool, in_rollout: bool, expected: tuple[int, int]
) -> None:
    assert split_replicas(total, weights, exact_weights=exact, in_rollout=in_rollout) == expected


@pytest.mark.parametrize("total", [2, 3, 4, 5, 7, 10, 13, 20, 33])
@pytest.mark.parametrize("weight", [1, 5, 10, 25, 33, 50, 75, 90, 99])
@pytest.mark.parametrize("mesh", [True, False])
def test_split_never_exceeds_the_decided_total(total: int, weight: int, mesh: bool) -> None:
    """Outside shadow, the revisions' replicas add up to the autoscaler's total (so never
    past maxReplicas); without a mesh, but for the candidate's one-replica floor."""
    stable, candidate = split_replicas(
        total,
        Weights(stable=100 - weight, candidate=weight),
        exact_weights=mesh,
        in_rollout=True,
    )
    assert stable >= 1 and candidate >= 1
    floor = not mesh and math.ceil(total * weight / 100 - 0.5) == 0
    assert stable + candidate == total + (1 if floor else 0)


def test_effective_weights_of_replica_ratio() -> None:
    assert effective_weights(9, 1) == Weights(stable=90, candidate=10)
    assert effective_weights(0, 0) == Weights()


def test_checks_come_from_the_slo_unless_overridden() -> None:
    slo = SLOSpec(p99_latency_ms=500, max_error_rate=0.02)
    names = {(c.name, c.threshold) for c in checks_for(spec(), slo)}
    assert names == {
        ("errorRate/slo", 0.02),
        ("errorRate/stable", 1.5),
        ("latency/slo", 0.01),
        ("latency/stable", 1.5),
    }
    only_relative = checks_for(spec(), None)
    assert [c.name for c in only_relative] == ["errorRate/stable"]


@pytest.mark.parametrize(
    ("counted_at", "named"),
    [
        pytest.param(None, None, id="counted-at-the-bound"),
        pytest.param(0.5, None, id="a-bucket-at-exactly-the-bound"),
        pytest.param(0.498789, 0.498789, id="nearest-bucket-named"),
    ],
)
def test_latency_checks_name_the_bucket_they_count_at(
    counted_at: float | None, named: float | None
) -> None:
    slo = SLOSpec(p99_latency_ms=500, max_error_rate=0.02)
    checks = checks_for(spec(), slo, counted_at)
    assert {c.name: c.bound_seconds for c in checks} == {
        "errorRate/slo": None,
        "errorRate/stable": None,
        "latency/slo": named,
        "latency/stable": named,
    }


def drive(
    rollout: RolloutSpec,
    status: RolloutStatus,
    seconds: float,
    analysis: AnalysisResult | None,
    **kw: Any,
) -> tuple[RolloutStatus, Any]:
    now = T0 + timedelta(seconds=seconds)
    inputs = RolloutInputs(desired_revision="b", now=now, analysis=analysis, **kw)
    action = next_rollout_step(rollout, status, inputs)
    return (
        apply_action(
            rollout,
            status,
            action,
            now=now,
            desired_model=MODEL_B,
            analysis=analysis,
            inputs=inputs,
        ),
        action,
    )


def restart(status: RolloutStatus) -> RolloutStatus:
    """What a restarted operator reads back: status's wire form is all the state."""
    return RolloutStatus.model_validate(status.to_wire())


def test_a_pause_stops_the_step_clock_across_a_restart() -> None:
    status, _ = drive(spec(), STABLE_A, 0, None)
    status, action = drive(spec(), status, 15, PASS, candidate_ready=True)
    assert status.step_index == 0 and status.candidate_ready_at == ts(15)
    status, action = drive(spec(paused=True), status, 30, PASS, candidate_ready=True)
    assert isinstance(action, Pause) and status.held_since == ts(30)
    assert status.held_since == ts(30)
    status = restart(status)
    status, action = drive(spec(paused=True), status, 3630, PASS, candidate_ready=True)
    assert isinstance(action, Pause) and status.weights.candidate == 10
    status = restart(status)
    # Unpaused after an hour: 15s of the 1m step ran before the pause, none since.
    status, action = drive(spec(), status, 3645, PASS, candidate_ready=True)
    assert isinstance(action, Hold) and "15s of 1m" in action.reason
    assert status.held_since is None
    assert status.held_seconds == 3615
    status, action = drive(spec(), status, 3680, PASS, candidate_ready=True)
    assert isinstance(action, Hold) and "50s of 1m" in action.reason
    status, action = drive(spec(), status, 3695, PASS, candidate_ready=True)
    assert isinstance(action, SetWeights) and status.step_index == 1
    assert status.held_seconds == 0


def test_an_unready_candidate_loses_its_traffic_until_ready_again() -> None:
    mesh = spec(router={"type": "istio", "host": "m.example"})
    status, _ = drive(mesh, STABLE_A, 0, None)
    status, _ = drive(mesh, status, 15, PASS, candidate_ready=True)
    assert status.weights == Weights(stable=90, candidate=10)
    status, action = drive(mesh, status, 30, None, candidate_ready=False)
    assert isinstance(action, Hold) and "its 10% goes to stable a" in action.reason
    # Status keeps the step's weight (and so its replicas); the route withholds it.
    assert status.weights == Weights(stable=90, candidate=10) and status.step_index == 0
    assert routed_revisions(status, frozenset({"a"})) == ("a", "b", Weights())
    assert status.step_since == ts(15) and status.candidate_unready_since == ts(30)
    status = restart(status)
    status, action = drive(mesh, status, 600, None, candidate_ready=False)
    assert isinstance(action, Hold) and "9m30s of 30m" in action.reason
    status, action = drive(mesh, status, 615, PASS, candidate_ready=True)
    assert routed_revisions(status, frozenset({"a", "b"}))[2].candidate == 10
    assert status.step_since == ts(15) and status.held_seconds == 585
    assert status.candidate_unready_since is None
    # 15s before and 15s after the outage count; the step needs 1m.
    status, action = drive(mesh, status, 630, PASS, candidate_ready=True)
    assert isinstance(action, Hold) and "30s of 1m" in action.reason
    status, action = drive(mesh, status, 2500, None, candidate_ready=False)
    status, action = drive(mesh, status, 2500 + 1800, None, candidate_ready=False)
    assert isinstance(action, Rollback) and status.failed_revision == "b"


def test_a_whole_canary_then_a_fallback() -> None:
    rollout = spec()
    status, action = drive(rollout, STABLE_A, 0, None)
    assert isinstance(action, SetWeights) and status.candidate_revision == "b"
    assert status.candidate_model == MODEL_B and stable_model(status) == MODEL_A
    status, action = drive(rollout, status, 15, PASS, candidate_ready=True)
    assert status.weights == Weights(stable=90, candidate=10) and status.step_index == 0
    status, action = drive(rollout, status, 30, PASS, candidate_ready=True)
    assert isinstance(action, Hold)
    # Restart: status is all the state; a round-trip through the wire form changes nothing.
    status = RolloutStatus.model_validate(status.to_wire())
    status, action = drive(rollout, status, 80, PASS, candidate_ready=True)
    assert status.weights.candidate == 50 and status.step_index == 1
    assert {e.name for e in status.carried_evidence} == {"errorRate/slo"}
    status, action = drive(rollout, status, 150, PASS, candidate_ready=True)
    assert isinstance(action, Promote)
    assert status.stable_revision == "b" and status.candidate_revision is None
    # b is known-good only once its watch window closes cleanly; it is rebuilt from stableModel.
    assert [k.revision for k in status.known_good] == ["a"] and stable_model(status) == MODEL_B
    assert status.phase == "Watching" and status.weights == Weights()
    assert len(status.verdicts) >= 4
    status, action = drive(rollout, status, 200, FAIL)
    assert isinstance(action, Fallback) and action.to_revision == "a"
    assert status.stable_revision == "a" and status.failed_revision == "b"
    assert status.phase == "FellBack" and stable_model(status) == MODEL_A
    # The rebuilt known-good revision starts from nothing: traffic stays on b meanwhile.
    status, action = drive(rollout, status, 215, PASS, stable_ready=False)
    assert isinstance(action, Hold) and "b keeps serving until a" in action.reason
    assert routed_revisions(status, frozenset({"b"})) == ("b", None, Weights())
    status, action = drive(rollout, status, 230, PASS)
    assert isinstance(action, Hold) and "not retried" in action.reason
    assert routed_revisions(status, frozenset({"a", "b"})) == ("a", None, Weights())


@pytest.mark.parametrize(
    ("status", "serving", "expected"),
    [
        pytest.param(RolloutStatus(), frozenset({"a"}), None, id="no-revision-yet"),
        pytest.param(
            RolloutStatus(stable_revision="a", phase="FellBack", failed_revision="b"),
            frozenset({"b"}),
            ("b", None, Weights()),
            id="fell-back-target-starting",
        ),
        pytest.param(
            RolloutStatus(stable_revision="a", phase="FellBack", failed_revision="b"),
            frozenset({"a", "b"}),
            ("a", None, Weights()),
            id="fell-back-target-serving",
        ),
        pytest.param(
            RolloutStatus(stable_revision="a", phase="FellBack", failed_revision="b"),
            frozenset(),
            ("a", None, Weights()),
            id="nothing-serving-routes-as-status-says",
        ),
        pytest.param(
            RolloutStatus(stable_revision="a", phase="RolledBack", failed_revision="b"),
            frozenset({"b"}),
            ("a", None, Weights()),
            id="rolled-back-candidate-never-gets-traffic-back",
        ),
        pytest.param(
            RolloutStatus(
                stable_revision="a",
                candidate_revision="c",
                phase="Canary",
                weights=Weights(stable=90, candidate=10),
            ),
            frozenset({"a", "c"}),
            ("a", "c", Weights(stable=90, candidate=10)),
            id="canary-as-status-says",
        ),
    ],
)
def test_routed_revisions(
    status: RolloutStatus,
    serving: frozenset[str],
    expected: tuple[str, str | None, Weights] | None,
) -> None:
    assert routed_revisions(status, serving) == expected


def test_rollback_marks_the_candidate_failed() -> None:
    status, _ = drive(spec(), in_flight(0), 10, FAIL, candidate_ready=True)
    assert status.failed_revision == "b" and status.candidate_revision is None
    assert status.weights == Weights() and status.phase == "RolledBack"


def test_verdicts_are_capped() -> None:
    status = in_flight(0, since=0)
    for i in range(120):
        status, _ = drive(spec(), status, 1 + i * 0.1, PASS, candidate_ready=True)
    assert len(status.verdicts) == 100


# --- which revisions run (plan_revisions) and rebuilding the stable one -----------------------


def _plan_status(**fields: Any) -> RolloutStatus:
    return RolloutStatus.model_validate(fields)


@pytest.mark.parametrize(
    ("desired", "rollout", "status", "stable", "candidate", "weights", "keep"),
    [
        pytest.param(
            "b", False, {"stableRevision": "a"}, "b", None, (100, 0), {"b"}, id="no-rollout"
        ),
        pytest.param("a", True, {}, "a", None, (100, 0), {"a"}, id="first-revision-stable"),
        pytest.param("a", True, {"stableRevision": "a"}, "a", None, (100, 0), {"a"}, id="steady"),
        pytest.param(
            "b", True, {"stableRevision": "a"}, "a", "b", (100, 0), {"a", "b"}, id="new-at-zero"
        ),
        pytest.param(
            "b",
            True,
            {
                "stableRevision": "a",
                "candidateRevision": "b",
                "weights": {"stable": 75, "candidate": 25},
            },
            "a",
            "b",
            (75, 25),
            {"a", "b"},
            id="in-flight-keeps-weights",
        ),  # fmt: skip
        pytest.param(
            "b",
            True,
            {"stableRevision": "a", "failedRevision": "b"},
            "a",
            None,
            (100, 0),
            {"a"},
            id="failed-not-retried",
        ),  # fmt: skip
        pytest.param(
            "c",
            True,
            {
                "stableRevision": "a",
                "candidateRevision": "b",
                "weights": {"stable": 50, "candidate": 50},
            },
            "a",
            "c",
            (100, 0),
            {"a", "b", "c"},
            id="replaced-candidate-outgoing",
        ),  # fmt: skip
    ],
)
def test_plan_revisions(
    desired: str,
    rollout: bool,
    status: dict[str, Any],
    stable: str,
    candidate: str | None,
    weights: tuple[int, int],
    keep: set[str],
) -> None:
    plan = plan_revisions(desired, rollout, _plan_status(**status))
    assert (plan.stable, plan.candidate) == (stable, candidate)
    assert (plan.weights.stable, plan.weights.candidate) == weights
    assert plan.keep == keep
    assert plan.status_revision == (candidate or stable)


def test_plan_rebuilds_stable_from_known_good_model() -> None:
    old = ModelDeploymentSpec(image="srv:1", replicas=4, args=["--x"])
    new = ModelDeploymentSpec(image="srv:2", replicas=4)
    status = _plan_status(
        stableRevision="a",
        knownGood=[{"revision": "a", "model": old.model_part()}],
    )
    plan = plan_revisions("b", True, status)
    assert not plan.stable_from_spec and plan.stable_model == old.model_part()
    rebuilt = spec_with_model(new, plan.stable_model)
    assert (rebuilt.image, rebuilt.args, rebuilt.replicas) == ("srv:1", ["--x"], 4)
    assert revision_of(rebuilt) == revision_of(old)
    # 4 replicas at 75/25 without a mesh: the replica ratio is the traffic split.
    in_flight = plan_revisions(
        "b",
        True,
        _plan_status(
            stableRevision="a", candidateRevision="b", weights={"stable": 75, "candidate": 25}
        ),
    )
    assert in_flight.replicas(4) == (3, 1)


def promoted(rollout: RolloutSpec, at: float = 0.0) -> RolloutStatus:
    """b promoted over known-good a at `at` seconds."""
    return apply_action(
        rollout,
        in_flight(1, since=at - 70, weight=50),
        Promote("b", "steps done"),
        now=T0 + timedelta(seconds=at),
        desired_model=MODEL_B,
    )


def test_known_good_history_of_one_still_falls_back() -> None:
    rollout = spec(knownGoodHistory=1)
    status = promoted(rollout)
    assert [k.revision for k in status.known_good] == ["a"]
    status, action = drive(rollout, status, 30, FAIL)
    assert isinstance(action, Fallback) and action.to_revision == "a"
    assert stable_model(status) == MODEL_A and status.fallback_since == ts(30)


def test_a_clean_watch_window_makes_the_revision_known_good() -> None:
    rollout = spec(knownGoodHistory=1)
    status = promoted(rollout)
    status, action = drive(rollout, status, 60, PASS)
    assert status.watch_verdict == "Pass" and [k.revision for k in status.known_good] == ["a"]
    status, action = drive(rollout, status, 601, None)
    assert isinstance(action, Hold) and action.known_good and status.phase == "Stable"
    assert [(k.revision, k.model) for k in status.known_good] == [("b", MODEL_B)]


def test_a_breach_with_fallback_off_never_becomes_known_good() -> None:
    rollout = spec(postPromotion={"automaticFallback": False})
    status = promoted(rollout)
    status, action = drive(rollout, status, 30, FAIL)
    assert isinstance(action, Hold) and "automatic fallback is off" in action.reason
    status, action = drive(rollout, status, 60, PASS)
    assert status.watch_verdict == "Fail"
    status, action = drive(rollout, status, 660, PASS)
    assert isinstance(action, Hold) and action.end_watch and not action.known_good
    assert "does not become known-good" in action.reason
    assert [k.revision for k in status.known_good] == ["a"] and status.phase == "Stable"


def test_no_verdict_in_the_window_keeps_watching() -> None:
    rollout = spec()
    status = promoted(rollout)
    status, action = drive(rollout, status, 660, None)
    assert isinstance(action, Hold) and not action.end_watch
    assert "stays watched" in action.reason and status.phase == "Watching"
    status, action = drive(rollout, status, 700, SHORT)
    assert not action.end_watch
    status, action = drive(rollout, status, 760, FAIL)
    assert isinstance(action, Fallback) and action.to_revision == "a"


def test_a_zero_watch_window_is_known_good_at_once() -> None:
    rollout = spec(postPromotion={"watchWindow": "0s"})
    status, action = drive(rollout, promoted(rollout), 15, None)
    assert isinstance(action, Hold) and action.known_good
    assert [k.revision for k in status.known_good] == ["b", "a"]


def test_a_new_candidate_mid_watch_leaves_the_stable_unverified() -> None:
    rollout = spec()
    status = promoted(rollout)
    status, _ = drive(rollout, status, 60, PASS)
    now = T0 + timedelta(seconds=120)
    inputs = RolloutInputs(desired_revision="c", now=now)
    action = next_rollout_step(rollout, status, inputs)
    assert isinstance(action, SetWeights) and action.start == "c"
    assert "does not become known-good" in action.reason
    status = apply_action(rollout, status, action, now=now, desired_model={"image": "srv:c"})
    assert status.promoted_at is None and status.watch_verdict is None
    assert [k.revision for k in status.known_good] == ["a"] and stable_model(status) == MODEL_B
    # c is rolled back: b serves alone again, so its watch starts again, and a clean window
    # makes it known-good (a later breach falls back to b, not to the older a).
    now = T0 + timedelta(seconds=150)
    status = apply_action(
        rollout, status, Rollback("aborted", mark_failed=True), now=now,
        desired_model={"image": "srv:c"},
    )
    assert status.promoted_at == ts(150) and status.phase == "RolledBack"
    status, _ = drive(rollout, status, 200, PASS)
    status, action = drive(rollout, status, 760, None)
    assert isinstance(action, Hold) and action.known_good
    assert [k.revision for k in status.known_good] == ["b", "a"]


def test_a_fallback_target_that_never_serves_fails_once_and_says_so() -> None:
    status = STABLE_A.model_copy(
        update={"failed_revision": "b", "phase": "FellBack", "fallback_since": ts(0)}
    )
    status, action = drive(spec(), status, 1800, None, stable_ready=False)
    assert isinstance(action, Hold) and action.fallback_failed
    assert status.fallback_failed_at == ts(1800) and status.phase == "FellBack"
    assert routed_revisions(status, frozenset({"b"})) == ("b", None, Weights())
    conds = {c.type: c for c in rollout_conditions([], status, action, "", "", ts(1800))}
    assert conds["FallbackApplied"].status == "False"
    assert conds["FallbackApplied"].reason == "FallbackFailed"
    status, action = drive(spec(), status, 1815, None, stable_ready=False)
    assert status.fallback_failed_at == ts(1800)
    # a comes up late after all: traffic moves, the failure is over.
    status, action = drive(spec(), status, 1830, None, stable_ready=True)
    assert status.fallback_failed_at is None and status.fallback_since is None
    assert routed_revisions(status, frozenset({"a", "b"})) == ("a", None, Weights())


@pytest.mark.parametrize(
    ("manual", "action", "before", "after", "done"),
    [
        pytest.param(
            "promote",
            SetWeights(90, 10, 0, "candidate b ready; step 1"),
            in_flight(-1, weight=0),
            in_flight(0),
            False,
            id="automatic-step-1-leaves-promote-for-later",
        ),
        pytest.param(
            "promote",
            SetWeights(50, 50, 1, "step 1 promoted by hand", by_hand=True),
            in_flight(0),
            in_flight(1, weight=50),
            True,
            id="promote-acted-on",
        ),
        pytest.param(
            "promote",
            Promote("b", "step 2 promoted by hand", by_hand=True),
            in_flight(1, weight=50),
            STABLE_A,
            True,
            id="promote-at-last-step-promotes",
        ),
        pytest.param(
            "promote",
            Pause("paused by spec.rollout.paused"),
            in_flight(0),
            in_flight(0),
            False,
            id="promote-waits-while-paused",
        ),
        pytest.param(
            "promote",
            SetWeights(100, 0, -1, "new revision c replaces candidate b", start="c"),
            in_flight(0),
            in_flight(-1, weight=0, candidate_revision="c"),
            True,
            id="promote-for-a-replaced-candidate-is-dropped",
        ),
        pytest.param(
            "promote",
            Rollback("analysis failed"),
            in_flight(0),
            STABLE_A,
            True,
            id="promote-for-a-rolled-back-candidate-is-dropped",
        ),
        pytest.param(
            "abort",
            Hold("waiting"),
            in_flight(0),
            in_flight(0),
            False,
            id="abort-not-yet-acted",
        ),
        pytest.param("promote", Hold("steady"), STABLE_A, STABLE_A, True, id="nothing-in-flight"),
    ],
)
def test_manual_action_done(
    manual: Any, action: Any, before: RolloutStatus, after: RolloutStatus, done: bool
) -> None:
    assert manual_action_done(manual, manual, action, before, after) is done


@pytest.mark.parametrize(
    ("weights", "serving", "routed"),
    [
        pytest.param(
            Weights(stable=50, candidate=50),
            {"a", "b"},
            Weights(stable=50, candidate=50),
            id="both-serve-as-status-says",
        ),
        pytest.param(
            Weights(stable=50, candidate=50), {"a"}, Weights(), id="unready-candidate-gets-none"
        ),
        pytest.param(
            Weights(stable=100, mirror_percent=50),
            {"a"},
            Weights(stable=100, mirror_percent=50),
            id="shadow-mirror-unchanged",
        ),
    ],
)
def test_routed_revisions_withholds_an_unready_candidates_share(
    weights: Weights, serving: set[str], routed: Weights
) -> None:
    status = RolloutStatus(stable_revision="a", candidate_revision="b", weights=weights)
    assert routed_revisions(status, frozenset(serving)) == ("a", "b", routed)
    # Replicas follow status, not the route: the candidate keeps its step's share.
    assert plan_revisions("b", True, status, exact_weights=True).replicas(10)[1] >= (
        weights.candidate // 10
    )


def test_withholding_while_paused_stays_paused() -> None:
    """A paused Istio canary whose candidate loses its ready replicas: the route withholds its
    weight, and the rollout stays Paused (no flip to Canary and back, no second Paused Event)."""
    rollout = spec(router={"type": "istio", "host": "m.example"}, paused=True)
    status = in_flight(0, since=-60, candidate_ready_at=ts(-100), phase="Paused")
    status, action = drive(rollout, status, 0, PASS, candidate_ready=False)
    assert isinstance(action, Hold) and status.phase == "Paused"
    assert routed_revisions(status, frozenset({"a"}))[2] == Weights()
    status, action = drive(rollout, status, 15, PASS, candidate_ready=False)
    assert status.phase == "Paused"
    conds = {c.type: c for c in rollout_conditions([], status, action, "", "", ts(15))}
    assert conds["RolloutPaused"].status == "True"


def test_a_new_image_after_a_failed_fallback_is_canaried_beside_the_revision_that_serves() -> None:
    """a never came up after the fallback from b. Before, c started beside a: the route went
    to a, which had no pod, and off b, which served. Now b is stable again (a is retired once
    b serves) and c walks its steps against b."""
    failed = STABLE_A.model_copy(
        update={
            "failed_revision": "b",
            "phase": "FellBack",
            "fallback_since": ts(0),
            "fallback_failed_at": ts(1800),
        }
    )
    now = T0 + timedelta(seconds=2000)
    inputs = RolloutInputs(desired_revision="c", now=now, stable_ready=False)
    action = next_rollout_step(spec(), failed, inputs)
    assert isinstance(action, SetWeights) and action.start == "c" and action.abandon_fallback
    status = apply_action(
        spec(), failed, action, now=now, desired_model={"image": "srv:c"}, inputs=inputs
    )
    assert (status.stable_revision, status.candidate_revision) == ("b", "c")
    assert status.failed_revision is None and status.phase == "Canary"
    assert status.fallback_since is None and status.fallback_failed_at is None
    assert status.promoted_at is None and [k.revision for k in status.known_good] == ["a"]
    # b's model is not in status: its Deployment is left as it is, never rebuilt as a's.
    assert stable_model(status) is None
    plan = plan_revisions("c", True, status, exact_weights=True)
    assert (plan.stable, plan.candidate, plan.keep) == ("b", "c", frozenset({"b", "c"}))
    assert plan.stable_model is None
    assert routed_revisions(status, frozenset({"b"})) == ("b", "c", Weights())
    # c serves: its first step, judged against b.
    later = RolloutInputs(
        desired_revision="c",
        now=now + timedelta(seconds=15),
        candidate_ready=True,
        stable_ready=True,
    )
    step = next_rollout_step(spec(), restart(status), later)
    assert isinstance(step, SetWeights) and step.step_index == 0 and step.candidate == 10


def test_a_failed_fallback_that_recovers_says_what_holds_now() -> None:
    failed = STABLE_A.model_copy(
        update={"failed_revision": "b", "phase": "FellBack", "fallback_since": ts(0)}
    )
    status, action = drive(spec(), failed, 1800, None, stable_ready=False)
    conds = rollout_conditions([], status, action, "", "", ts(1800))
    status, action = drive(spec(), status, 1830, None, stable_ready=True)
    conds = {c.type: c for c in rollout_conditions(conds, status, action, "", "", ts(1830))}
    assert conds["FallbackApplied"].status == "True"
    assert conds["FallbackApplied"].message != ""


def test_any_move_but_the_failed_fallback_hold_clears_it() -> None:
    status = in_flight(0).model_copy(update={"fallback_failed_at": ts(0)})
    after = apply_action(
        spec(), status, Promote("b", "steps done"), now=T0, desired_model=MODEL_B
    )
    assert after.fallback_failed_at is None


def test_a_fallback_written_without_fallback_since_gets_a_deadline() -> None:
    """Status from a version that did not record fallbackSince: the deadline counts from the
    first loop that reads it, so a fallback target that never serves is still reported."""
    old = STABLE_A.model_copy(update={"failed_revision": "b", "phase": "FellBack"})
    status, action = drive(spec(), old, 100, None, stable_ready=False)
    assert status.fallback_since == ts(100) and not action.fallback_failed
    status, action = drive(spec(), status, 100 + 1800, None, stable_ready=False)
    assert isinstance(action, Hold) and action.fallback_failed


def test_a_failed_revision_is_retried_once_the_spec_has_moved_away_from_it() -> None:
    """b was rolled back (failed). Setting the spec to c, or back to the stable a, drops the
    mark: setting it to b afterwards is a deliberate retry, which starts b as a candidate
    (plan_revisions builds it too). Before, the mark stayed until a promotion: b came back as
    a candidate without a Deployment and rolled back 30 minutes later, "not ready"."""
    rolled_back = STABLE_A.model_copy(update={"failed_revision": "b", "phase": "RolledBack"})
    for moved_to in ("a", "c"):
        now = T0 + timedelta(seconds=10)
        inputs = RolloutInputs(desired_revision=moved_to, now=now, stable_ready=True)
        action = next_rollout_step(spec(), rolled_back, inputs)
        status = apply_action(
            spec(), rolled_back, action, now=now, desired_model={"image": moved_to}
        )
        assert status.failed_revision is None, (moved_to, action)
        if moved_to == "c":
            status = apply_action(
                spec(), status, Rollback("c aborted", mark_failed=False), now=now,
                desired_model={"image": "c"},
            )  # fmt: skip
        retry = RolloutInputs(desired_revision="b", now=now, stable_ready=True)
        action = next_rollout_step(spec(), status, retry)
        assert isinstance(action, SetWeights) and action.start == "b", (moved_to, action)
        assert plan_revisions("b", True, status).candidate == "b"
