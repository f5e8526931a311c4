"""B4: canary analysis. Time from a bad canary's first request to its rollback, false rollbacks
over many good canaries, and power on a 1% -> 2% error increase, for trimtab's sequential test
and three baselines judging the same simulated samples.

Setup: 100 requests/s, 10% of them on the canary, Prometheus scraping every 15 s. Stable: 0.1%
errors, latency lognormal (median 200 ms, sigma 0.35: p99 450 ms). SLO: p99 <= 500 ms and
errors <= 1%. Judges:
- trimtab: `decisions.statistics.evaluate_checks` every 15 s on counts since the canary began
  (errors and requests over 500 ms; against the SLO and against stable at 1.5x), alpha 1%.
- Flagger-style: every 1 min, the last minute's error rate > 1% or p99 > 500 ms is a failed
  check; rollback at 5 failed checks (threshold 5).
- Argo-style: every 5 min, the last 5 minutes' error rate or p99 over the SLO is a failed
  measurement; rollback when failures exceed failureLimit 3.
- Mann-Whitney: every 1 min, one-sided Mann-Whitney U tests (latency, and errors as 0/1) of
  the last minute, canary vs stable, p < 0.01 rolls back (a Kayenta-style judge).

Run: `python -m bench canary` (or `make bench`). Pure Python; seeded, so reruns agree."""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trimtab.decisions.statistics import Check, Counts, evaluate_checks

RPS = 100
CANARY_SHARE = 0.10
SCRAPE_S = 15
SLO_P99_S = 0.5
SLO_ERRORS = 0.01
STABLE_MEDIAN_S = 0.2
SIGMA = 0.35
BAD_HORIZON_S = 1800
GOOD_HORIZON_S = 600
BAD_RUNS = 60
GOOD_RUNS = 300
POWER_RUNS = 100
OUT = Path(__file__).parent / "results" / "canary.json"


@dataclass(frozen=True)
class Scenario:
    name: str
    canary_errors: float
    stable_errors: float = 0.001
    canary_latency_factor: float = 1.0
    horizon_s: int = BAD_HORIZON_S


BAD = [
    Scenario("errors_0.1pct_to_5pct", 0.05),
    Scenario("errors_0.1pct_to_1pct", 0.01),
    Scenario("p99_plus_50pct", 0.001, canary_latency_factor=1.5),
]
GOOD = Scenario("good", 0.001, horizon_s=GOOD_HORIZON_S)
POWER = Scenario("errors_1pct_to_2pct", 0.02, stable_errors=0.01, horizon_s=600)


def binomial(rng: random.Random, n: int, p: float) -> int:
    """Exact binomial draw by geometric skips, O(n p)."""
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


@dataclass
class Second:
    """One second of traffic: per revision, latencies of every request and the error count."""

    canary_lat: list[float]
    stable_lat: list[float]
    canary_err: int
    stable_err: int


def simulate(s: Scenario, seed: int) -> list[Second]:
    rng = random.Random(seed)
    mu_s = math.log(STABLE_MEDIAN_S)
    mu_c = mu_s + math.log(s.canary_latency_factor)
    seconds = []
    for _ in range(s.horizon_s):
        n_c = binomial(rng, RPS, CANARY_SHARE)
        n_s = RPS - n_c
        seconds.append(
            Second(
                [rng.lognormvariate(mu_c, SIGMA) for _ in range(n_c)],
                [rng.lognormvariate(mu_s, SIGMA) for _ in range(n_s)],
                binomial(rng, n_c, s.canary_errors),
                binomial(rng, n_s, s.stable_errors),
            )
        )
    return seconds


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def _window(data: list[Second], start: int, end: int) -> tuple[list[float], list[float], int, int]:
    part = data[max(start, 0) : end]
    return (
        [x for s in part for x in s.canary_lat],
        [x for s in part for x in s.stable_lat],
        sum(s.canary_err for s in part),
        sum(s.stable_err for s in part),
    )


Judge = Callable[[list[Second], random.Random], int | None]


def judge_trimtab(data: list[Second], rng: random.Random) -> int | None:
    """Every 15 s, on what Prometheus scraped by then (scrapes at a random phase)."""
    checks = [
        Check("errorRate", "slo", SLO_ERRORS),
        Check("errorRate", "stable", 1.5),
        Check("latency", "slo", 0.01),
        Check("latency", "stable", 1.5),
    ]
    phase = rng.randrange(SCRAPE_S)
    acc = {"cn": 0, "ce": 0, "cs": 0, "sn": 0, "se": 0, "ss": 0}
    scraped = dict(acc)
    upto = 0
    for t in range(SCRAPE_S, len(data) + 1, SCRAPE_S):
        last_scrape = t - ((t - phase) % SCRAPE_S)
        while upto < last_scrape:
            s = data[upto]
            acc["cn"] += len(s.canary_lat)
            acc["ce"] += s.canary_err
            acc["cs"] += sum(1 for x in s.canary_lat if x > SLO_P99_S)
            acc["sn"] += len(s.stable_lat)
            acc["se"] += s.stable_err
            acc["ss"] += sum(1 for x in s.stable_lat if x > SLO_P99_S)
            upto += 1
        scraped = dict(acc)
        result = evaluate_checks(
            checks,
            {
                "errorRate": Counts(scraped["cn"], scraped["ce"]),
                "latency": Counts(scraped["cn"], scraped["cs"]),
            },
            {
                "errorRate": Counts(scraped["sn"], scraped["se"]),
                "latency": Counts(scraped["sn"], scraped["ss"]),
            },
            carried={},
            false_rollback_rate=0.01,
            min_requests=100,
        )
        if result.verdict == "Fail":
            return t
    return None


def _threshold_judge(interval: int, limit: int) -> Judge:
    """Flagger/Argo style: each interval, the last interval's error rate and p99 against the
    SLO; roll back once `limit` checks have failed."""

    def judge(data: list[Second], rng: random.Random) -> int | None:
        failures = 0
        for t in range(interval, len(data) + 1, interval):
            lat, _, err, _ = _window(data, t - interval, t)
            rate = err / len(lat) if lat else 0.0
            p99 = _p99(lat)
            if rate > SLO_ERRORS or (p99 is not None and p99 > SLO_P99_S):
                failures += 1
                if failures >= limit:
                    return t
        return None

    return judge


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def mann_whitney_greater(x: list[float], y: list[float]) -> float:
    """One-sided p-value that x tends to exceed y (normal approximation, tie-corrected)."""
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return 1.0
    pooled = sorted([(v, 0) for v in x] + [(v, 1) for v in y])
    ranks_x = 0.0
    tie_term = 0.0
    i = 0
    n = n1 + n2
    while i < n:
        j = i
        while j + 1 < n and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        avg = (i + j) / 2.0 + 1.0
        size = j - i + 1
        tie_term += size**3 - size
        ranks_x += avg * sum(1 for k in range(i, j + 1) if pooled[k][1] == 0)
        i = j + 1
    u = ranks_x - n1 * (n1 + 1) / 2.0
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1)))
    if var <= 0:
        return 1.0
    return _normal_sf((u - n1 * n2 / 2.0 - 0.5) / math.sqrt(var))


def _binary_mw_greater(x_bad: int, n1: int, y_bad: int, n2: int) -> float:
    """Mann-Whitney on 0/1 outcomes from counts (ranks of the two tie groups)."""
    n = n1 + n2
    ones = x_bad + y_bad
    zeros = n - ones
    if n1 == 0 or n2 == 0 or ones == 0 or zeros == 0:
        return 1.0
    ranks_x = (n1 - x_bad) * (zeros + 1) / 2.0 + x_bad * (zeros + (ones + 1) / 2.0)
    u = ranks_x - n1 * (n1 + 1) / 2.0
    tie_term = (zeros**3 - zeros) + (ones**3 - ones)
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1)))
    return _normal_sf((u - n1 * n2 / 2.0 - 0.5) / math.sqrt(var))


def judge_mann_whitney(data: list[Second], rng: random.Random) -> int | None:
    for t in range(60, len(data) + 1, 60):
        c_lat, s_lat, c_err, s_err = _window(data, t - 60, t)
        if mann_whitney_greater(c_lat, s_lat) < 0.01:
            return t
        if _binary_mw_greater(c_err, len(c_lat), s_err, len(s_lat)) < 0.01:
            return t
    return None


JUDGES: dict[str, Judge] = {
    "trimtab": judge_trimtab,
    "flagger_style": _threshold_judge(60, 5),
    "argo_style": _threshold_judge(300, 4),  # failureLimit 3: the 4th failure fails
    "mann_whitney": judge_mann_whitney,
}


def run_all() -> dict[str, dict[str, object]]:
    outcomes: dict[str, dict[str, list[int | None]]] = {j: {} for j in JUDGES}
    plan = [(s, BAD_RUNS) for s in BAD] + [(GOOD, GOOD_RUNS), (POWER, POWER_RUNS)]
    for scenario_index, (scenario, runs) in enumerate(plan):
        for seed in range(runs):
            data = simulate(scenario, seed * 1000 + scenario_index)
            for name, judge in JUDGES.items():
                rng = random.Random(seed * 7919 + scenario_index)
                outcomes[name].setdefault(scenario.name, []).append(judge(data, rng))
    results: dict[str, dict[str, object]] = {}
    for name, by_scenario in outcomes.items():
        medians: dict[str, float | None] = {}
        detected: dict[str, float] = {}
        for s in BAD:
            times = by_scenario[s.name]
            # Undetected runs count as the horizon, so the median is honest about misses.
            filled = [t if t is not None else s.horizon_s for t in times]
            share = sum(t is not None for t in times) / len(times)
            medians[s.name] = statistics.median(filled) if share >= 0.5 else None
            detected[s.name] = round(share, 3)
        good = by_scenario[GOOD.name]
        power = by_scenario[POWER.name]
        results[name] = {
            "median_seconds_to_rollback": medians,
            "detected_within_30min": detected,
            "false_rollback_rate": round(sum(t is not None for t in good) / len(good), 4),
            "power_1pct_to_2pct_10min": round(sum(t is not None for t in power) / len(power), 3),
        }
    return results


def main() -> int:
    started = time.monotonic()
    results = run_all()
    flagger = results["flagger_style"]["median_seconds_to_rollback"]
    trimtab = results["trimtab"]["median_seconds_to_rollback"]
    assert isinstance(flagger, dict) and isinstance(trimtab, dict)
    speedup = {
        k: (round(flagger[k] / trimtab[k], 1) if flagger[k] and trimtab[k] else None)
        for k in trimtab
    }
    doc = {
        "setup": {
            "rps": RPS,
            "canary_share": CANARY_SHARE,
            "scrape_interval_s": SCRAPE_S,
            "slo": {"p99_seconds": SLO_P99_S, "error_rate": SLO_ERRORS},
            "bad_runs_per_scenario": BAD_RUNS,
            "bad_horizon_s": BAD_HORIZON_S,
            "good_runs": GOOD_RUNS,
            "good_horizon_s": GOOD_HORIZON_S,
            "power_runs": POWER_RUNS,
        },
        "judges": results,
        "trimtab_speedup_vs_flagger_style": speedup,
        "seconds": round(time.monotonic() - started, 1),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    scen = [s.name for s in BAD]
    header = f"{'judge':<14}" + "".join(f"{n:>24}" for n in scen) + f"{'false rb':>10}{'power':>8}"
    print("median seconds to rollback (null: under half detected in 30 min)")
    print(header)
    for name, r in results.items():
        med = r["median_seconds_to_rollback"]
        assert isinstance(med, dict)
        cells = "".join(f"{str(med[n]):>24}" for n in scen)
        print(f"{name:<14}{cells}{r['false_rollback_rate']:>10}{r['power_1pct_to_2pct_10min']:>8}")
    print(f"trimtab speed-up vs Flagger-style: {speedup}")
    print(f"wrote {OUT} in {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
