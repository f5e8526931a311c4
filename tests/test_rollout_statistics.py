"""The sequential tests behind canary analysis: worked values, verdict rules, the
false-rollback rate over many seeded good canaries, and power on a 1% -> 2% error increase."""

from __future__ import annotations

import math
import random

import pytest

from trimtab.decisions.statistics import (
    Check,
    Counts,
    combined_log_evidence,
    evaluate_checks,
    log_evalue_vs_share,
    log_evalue_vs_stable,
)


def binomial(rng: random.Random, n: int, p: float) -> int:
    """Exact binomial draw by geometric skips: O(n p), cheap for the small shares used here."""
    if n <= 0 or p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    log_q = math.log1p(-p)
    hits, position = 0, 0
    while True:
        position += int(math.log(1.0 - rng.random()) / log_q) + 1
        if position > n:
            return hits
        hits += 1


@pytest.mark.parametrize(
    ("counts", "p0", "low", "high"),
    [
        pytest.param(Counts(1000, 0), 0.01, -9.0, -3.0, id="clean-candidate-is-evidence-for-null"),
        pytest.param(Counts(1000, 10), 0.01, -4.0, 0.0, id="exactly-at-slo-no-case"),
        pytest.param(Counts(1000, 50), 0.01, 30.0, 50.0, id="five-times-slo-strong-case"),
        pytest.param(Counts(0, 0), 0.01, 0.0, 0.0, id="no-requests-no-evidence"),
        pytest.param(Counts(10, 1), 0.0, 1.0, 20.0, id="zero-slo-floored-not-infinite"),
    ],
)
def test_log_evalue_vs_share(counts: Counts, p0: float, low: float, high: float) -> None:
    value = log_evalue_vs_share(counts, p0)
    assert low <= value <= high


@pytest.mark.parametrize(
    ("candidate", "stable", "ratio", "low", "high"),
    [
        pytest.param(Counts(1000, 1), Counts(9000, 9), 1.5, -3.0, 0.0, id="same-share"),
        pytest.param(Counts(1000, 10), Counts(9000, 9), 1.5, 5.3, 10.0, id="ten-times-stable"),
        pytest.param(Counts(1000, 0), Counts(9000, 0), 1.5, 0.0, 0.0, id="no-bad-requests"),
        pytest.param(Counts(0, 0), Counts(9000, 9), 1.5, 0.0, 0.0, id="no-candidate-traffic"),
        pytest.param(Counts(1000, 3), Counts(9000, 18), 1.5, -3.0, 0.0, id="within-ratio"),
    ],
)
def test_log_evalue_vs_stable(
    candidate: Counts, stable: Counts, ratio: float, low: float, high: float
) -> None:
    assert low <= log_evalue_vs_stable(candidate, stable, ratio) <= high


CHECKS = [
    Check("errorRate", "slo", 0.01),
    Check("errorRate", "stable", 1.5),
    Check("latency", "slo", 0.01),
    Check("latency", "stable", 1.5),
]


@pytest.mark.parametrize(
    ("candidate", "stable", "carried", "expected", "reason_part"),
    [
        pytest.param(
            {"errorRate": Counts(1000, 1), "latency": Counts(1000, 5)},
            {"errorRate": Counts(9000, 9), "latency": Counts(9000, 45)},
            {},
            "Pass",
            "4 checks pass",
            id="good-candidate-passes",
        ),
        pytest.param(
            {"errorRate": Counts(40, 0), "latency": Counts(40, 0)},
            {"errorRate": Counts(360, 0), "latency": Counts(360, 2)},
            {},
            "Inconclusive",
            "40 of 100",
            id="too-few-samples-is-never-a-pass",
        ),
        pytest.param(
            {"errorRate": Counts(60, 20), "latency": Counts(60, 0)},
            {"errorRate": Counts(540, 1), "latency": Counts(540, 2)},
            {},
            "Fail",
            "errorRate",
            id="outage-fails-before-the-sample-floor",
        ),
        pytest.param(
            {"errorRate": Counts(1000, 1), "latency": Counts(1000, 90)},
            {"errorRate": Counts(9000, 9), "latency": Counts(9000, 45)},
            {},
            "Fail",
            "latency",
            id="slow-candidate-fails-latency",
        ),
        pytest.param(
            {"errorRate": Counts(1000, 1)},
            {"errorRate": Counts(9000, 9)},
            {},
            "Inconclusive",
            "no data for latency/slo, latency/stable (2 other checks pass)",
            id="latency-without-data-holds-never-passes",
        ),
        pytest.param(
            {"errorRate": Counts(1000, 60)},
            {"errorRate": Counts(9000, 9)},
            {},
            "Fail",
            "errorRate",
            id="latency-without-data-still-fails-on-errors",
        ),
        pytest.param(
            {"errorRate": Counts(1000, 1), "latency": Counts(1000, 2)},
            {"errorRate": Counts(9000, 9)},
            {},
            "Inconclusive",
            "no data for latency/stable",
            id="stable-without-latency-data-holds",
        ),
        pytest.param(
            {"errorRate": Counts(1000, 1), "latency": Counts(1000, 2)},
            None,
            {},
            "Pass",
            "2 checks pass",
            id="no-baseline-relative-checks-do-not-apply",
        ),
        pytest.param(
            # 2% errors alone (about 1.2 nats) stay under log(400) = 6; with 5 nats carried
            # from the previous step they cross it.
            {"errorRate": Counts(1000, 20), "latency": Counts(1000, 5)},
            {"errorRate": Counts(9000, 180), "latency": Counts(9000, 45)},
            {"errorRate/slo": 5.0},
            "Fail",
            "errorRate",
            id="carried-evidence-from-earlier-steps-counts",
        ),
        pytest.param({}, None, {}, "Inconclusive", "no metric", id="no-data-at-all"),
        pytest.param(
            # 2.4% errors against the 1% SLO: 4.67 nats, past log(100) alone, but three of the
            # four checks have no data this round. They count in the mean at their carried
            # evidence (0 here), as they would with data showing nothing, so it holds: the
            # level does not drop to log(100) whenever the other checks' data goes missing.
            {"errorRate": Counts(1000, 24)},
            {"latency": Counts(9000, 45)},
            {},
            "Inconclusive",
            "no data for errorRate/stable, latency/slo, latency/stable",
            id="checks-without-data-still-count-in-the-mean",
        ),
        pytest.param(
            # 2.7% errors: 7.9 nats, past log(400) = 6.0, fails with three checks missing.
            {"errorRate": Counts(1000, 27)},
            {"latency": Counts(9000, 45)},
            {},
            "Fail",
            "errorRate",
            id="one-check-past-the-four-check-level-fails-alone",
        ),
        pytest.param(
            # 2.4% errors against a stable at 0.6%, with 1 nat carried on each error check:
            # errorRate/slo about 5.7 and errorRate/stable about 5.9, each short of
            # log(400) = 6 alone; the mean of the four e-values (the latency ones near 0)
            # is about e^5.1, past 1/0.01.
            {"errorRate": Counts(1000, 24), "latency": Counts(1000, 10)},
            {"errorRate": Counts(9000, 54), "latency": Counts(9000, 90)},
            {"errorRate/slo": 1.0, "errorRate/stable": 1.0},
            "Fail",
            "errorRate",
            id="evidence-split-over-two-checks-adds-up",
        ),
    ],
)
def test_evaluate_checks(
    candidate: dict[str, Counts],
    stable: dict[str, Counts] | None,
    carried: dict[str, float],
    expected: str,
    reason_part: str,
) -> None:
    result = evaluate_checks(
        CHECKS,
        candidate,  # type: ignore[arg-type]  # literal keys in test tables
        stable,  # type: ignore[arg-type]  # literal keys in test tables
        carried=carried,
        false_rollback_rate=0.01,
        min_requests=100,
    )
    assert result.verdict == expected
    assert reason_part in result.reason


@pytest.mark.parametrize(
    ("log_evidences", "expected"),
    [
        pytest.param([], 0.0, id="no-checks-no-evidence"),
        pytest.param([0.0, 0.0, 0.0, 0.0], 0.0, id="no-information-anywhere"),
        pytest.param([math.log(400), -50.0, -50.0, -50.0], math.log(100), id="one-check-alone"),
        pytest.param([math.log(200), math.log(200)], math.log(200), id="two-checks-agree"),
        pytest.param([1000.0, 0.0], 1000.0 - math.log(2), id="huge-evidence-no-overflow"),
        pytest.param([-1000.0, -1000.0], -1000.0, id="tiny-evidence-no-underflow"),
    ],
)
def test_combined_log_evidence(log_evidences: list[float], expected: float) -> None:
    assert combined_log_evidence(log_evidences) == pytest.approx(expected)


def test_combined_evidence_fails_whenever_a_bonferroni_split_would() -> None:
    # A check alone past log(checks / rate) puts the mean of e-values past 1 / rate, whatever
    # the other checks hold: the joint test never passes what the split test would fail.
    rng = random.Random(7)
    for _ in range(2000):
        k = rng.randint(1, 6)
        others = [rng.uniform(-30.0, 10.0) for _ in range(k - 1)]
        alone = math.log(k / 0.01) + rng.uniform(0.0, 5.0)
        assert combined_log_evidence([alone, *others]) >= math.log(100) - 1e-9


def simulate(
    seed: int, p_candidate: float, p_stable: float, seconds: int = 600, split: float = 0.1
) -> int | None:
    """A canary at `split` of 100 rps judged every 15 s (the default analysis interval) on
    counts since it started; returns the second of the first Fail, or None."""
    rng = random.Random(seed)
    cand, stab = Counts(0, 0), Counts(0, 0)
    checks = [Check("errorRate", "slo", 0.01), Check("errorRate", "stable", 1.5)]
    spread = math.sqrt(1500 * split * (1.0 - split))
    for t in range(15, seconds + 1, 15):
        # The split's jitter (normal approximation: cheap at any split); its mean is `split`.
        n_c = min(1500, max(0, round(rng.gauss(1500 * split, spread))))
        n_s = 1500 - n_c
        cand = Counts(cand.requests + n_c, cand.bad + binomial(rng, n_c, p_candidate))
        stab = Counts(stab.requests + n_s, stab.bad + binomial(rng, n_s, p_stable))
        result = evaluate_checks(
            checks,
            {"errorRate": cand},
            {"errorRate": stab},
            carried={},
            false_rollback_rate=0.01,
            min_requests=100,
        )
        if result.verdict == "Fail":
            return t
    return None


@pytest.mark.parametrize(
    ("p_candidate", "p_stable", "split"),
    [
        pytest.param(0.001, 0.001, 0.1, id="errors-0.1pct-split-10"),
        pytest.param(0.01, 0.01, 0.1, id="errors-at-slo-1pct-split-10"),
        pytest.param(0.0005, 0.0005, 0.05, id="errors-0.05pct-split-5"),
        pytest.param(0.005, 0.005, 0.25, id="errors-0.5pct-split-25"),
        pytest.param(0.001, 0.001, 0.5, id="errors-0.1pct-split-50"),
        # The nulls' edges: the candidate exactly 1.5x the stable (the relative check's worst
        # good case), and exactly at the SLO while also 1.5x the stable (both at once).
        pytest.param(0.0015, 0.001, 0.1, id="candidate-at-ratio-edge-split-10"),
        pytest.param(0.003, 0.002, 0.5, id="candidate-at-ratio-edge-split-50"),
        pytest.param(0.01, 0.01 / 1.5, 0.25, id="candidate-at-slo-and-ratio-edge-split-25"),
    ],
)
def test_false_rollback_rate_stays_under_target(
    p_candidate: float, p_stable: float, split: float
) -> None:
    # 400 seeded good canaries, each checked 40 times: a fixed-sample test at 1% per look
    # would roll back far more than 1% of them; the sequential test must not.
    runs = 400
    rollbacks = sum(
        simulate(seed, p_candidate, p_stable, split=split) is not None for seed in range(runs)
    )
    assert rollbacks / runs <= 0.01


def test_a_fixed_sample_test_at_every_look_would_not_hold_the_target() -> None:
    # The contrast the sequential test is for: a per-look binomial test at 1% on the same
    # good canaries (0.1% errors at 10%, stable at the same rate) rolls back far more often.
    runs = 200
    rollbacks = 0
    for seed in range(runs):
        rng = random.Random(seed)
        x_c = x_s = 0
        for _ in range(40):
            n_c = binomial(rng, 1500, 0.1)
            x_c += binomial(rng, n_c, 0.001)
            x_s += binomial(rng, 1500 - n_c, 0.001)
            total = x_c + x_s
            p_value = sum(
                math.comb(total, j) * 0.1**j * 0.9 ** (total - j) for j in range(x_c, total + 1)
            )
            if total and p_value < 0.01:
                rollbacks += 1
                break
    assert rollbacks / runs > 0.02


def test_power_on_errors_1pct_to_2pct_within_10_minutes() -> None:
    runs = 100
    detected = [simulate(10_000 + seed, 0.02, 0.01) for seed in range(runs)]
    assert sum(t is not None for t in detected) / runs >= 0.95


def test_outage_detected_in_the_first_intervals() -> None:
    times = sorted(t for s in range(50) if (t := simulate(20_000 + s, 0.05, 0.001)) is not None)
    assert len(times) == 50
    assert times[len(times) // 2] <= 30
