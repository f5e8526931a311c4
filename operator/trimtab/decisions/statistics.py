"""Sequential tests for canary analysis: mixture likelihood-ratio e-processes for a share of
bad requests (errors, or requests over the latency bound), against the SLO and against stable.

Pure. An e-process is looked at as often as we like: by Ville's inequality the chance that a
candidate as good as the null ever crosses log(1/alpha) is at most alpha, so judging every
analysis interval does not inflate false rollbacks the way repeated fixed-sample tests do.

The two tests:

* against the SLO (one sample): the candidate's n requests hold x bad ones; the null is
  "share <= p0". The statistic is a mixture over alternatives p1 = m * p0 of the binomial
  likelihood ratio (p1/p0)^x ((1-p1)/(1-p0))^(n-x); for any true share <= p0 each factor has
  expectation <= 1, so the mixture is a nonnegative supermartingale that starts at 1.
* against stable (two samples): treat bad requests as Poisson counts with means
  p_c*N_c and p_s*N_s. Given the total K = x_c + x_s, the candidate's part is
  Binomial(K, pi) with pi = p_c N_c / (p_c N_c + p_s N_s); the unknown stable share drops
  out. The null "p_c <= r * p_s" becomes "pi <= pi0 = r N_c / (r N_c + N_s)", tested with the
  same mixture over ratios rho1 = m * r. The traffic split must be fixed while counts
  accumulate, so each canary step is its own test and finished steps' evidence is carried
  as a product (a restarted martingale multiplied onto a stopped one stays valid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

# Alternatives of the mixture, as multiples of the null share (or ratio). Wide on purpose: a
# 1.25x drift and a 30x outage are both caught, at the price of log(len) nats of evidence.
MULTIPLIERS: tuple[float, ...] = (1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
# A null share of exactly 0 would make one bad request infinite evidence; floor it.
MIN_NULL_SHARE = 1e-6

Verdict = Literal["Pass", "Fail", "Inconclusive"]
Against = Literal["slo", "stable"]
Metric = Literal["errorRate", "latency"]


@dataclass(frozen=True)
class Counts:
    """Requests and the bad ones among them (errors, or slower than the latency bound)."""

    requests: int
    bad: int

    @property
    def share(self) -> float | None:
        return self.bad / self.requests if self.requests > 0 else None


def _log_binomial_lr(x: int, n: int, p1: float, p0: float) -> float:
    return x * math.log(p1 / p0) + (n - x) * math.log((1.0 - p1) / (1.0 - p0))


def _log_mean_exp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))


def log_evalue_vs_share(counts: Counts, p0: float) -> float:
    """log e-value against "the share of bad requests is at most p0".

    Worked examples (p0 = 1%):
    - 0 bad of 1000: about -4.4 (evidence for the null; a later breach must make up for it)
    - 10 bad of 1000: about -1.8 (exactly at the SLO: no case against it)
    - 50 bad of 1000: about 39 (5x the SLO: far past log(1/0.01) = 4.6)
    """
    p0 = min(max(p0, MIN_NULL_SHARE), 1.0 - MIN_NULL_SHARE)
    x, n = counts.bad, counts.requests
    if n <= 0:
        return 0.0
    terms = [
        _log_binomial_lr(x, n, p0 * m, p0) for m in MULTIPLIERS if p0 * m < 1.0 - MIN_NULL_SHARE
    ]
    if not terms:  # p0 so close to 1 that no worse share exists: nothing can breach it
        return 0.0
    # Alternatives p1 >= 1 are dropped: their weight depends on p0 only, never on the data.
    return _log_mean_exp(terms)


def log_evalue_vs_stable(candidate: Counts, stable: Counts, max_ratio: float) -> float:
    """log e-value against "candidate share <= max_ratio * stable share", conditional on the
    total number of bad requests (so the stable share need not be known).

    Worked examples (max_ratio = 1.5, 10% of traffic on the candidate):
    - candidate 1 bad of 1000, stable 9 bad of 9000: about -1.0 (same share: no case)
    - candidate 10 bad of 1000, stable 9 bad of 9000: about 6.3 (10x: past log(1/0.01))
    - no bad requests anywhere: 0.0 (no information either way)
    """
    if candidate.requests <= 0 or stable.requests <= 0:
        return 0.0
    total = candidate.bad + stable.bad
    if total == 0:
        return 0.0
    nc, ns = float(candidate.requests), float(stable.requests)
    pi0 = max_ratio * nc / (max_ratio * nc + ns)
    terms = []
    for m in MULTIPLIERS:
        rho = max_ratio * m
        pi1 = rho * nc / (rho * nc + ns)
        terms.append(_log_binomial_lr(candidate.bad, total, pi1, pi0))
    return _log_mean_exp(terms)


@dataclass(frozen=True)
class Check:
    """One check with its threshold resolved: a share for `slo`, a ratio for `stable`."""

    metric: Metric
    against: Against
    threshold: float

    @property
    def name(self) -> str:
        return f"{self.metric}/{self.against}"


@dataclass(frozen=True)
class CheckResult:
    check: Check
    value: float | None  # candidate's share
    baseline: float | None  # stable's share (relative checks)
    samples: int  # candidate requests in this step
    log_evidence: float  # carried from earlier steps plus this step
    step_log_evidence: float  # this step alone (what is carried when the step ends)
    verdict: Verdict


@dataclass(frozen=True)
class AnalysisResult:
    """The round's verdict: Fail if any check fails, Inconclusive if any lacks samples."""

    verdict: Verdict
    results: tuple[CheckResult, ...]
    reason: str


def fail_threshold(false_rollback_rate: float, checks: int) -> float:
    """log e-value at which a check fails: the target rate split evenly over the checks
    (Bonferroni), e.g. 1% over 4 checks -> log(400) = 5.99."""
    return math.log(max(checks, 1) / false_rollback_rate)


def evaluate_checks(
    checks: Sequence[Check],
    candidate: dict[Metric, Counts],
    stable: dict[Metric, Counts] | None,
    *,
    carried: dict[str, float],
    false_rollback_rate: float,
    min_requests: int,
) -> AnalysisResult:
    """Judge the candidate on counts accumulated since the current step began.

    `candidate[metric]` and `stable[metric]` are this step's counts; a metric missing from
    `candidate` skips its checks (no data is never a pass: the step's sample floor still
    applies to the checks that ran). `carried` holds each check's log evidence from earlier
    steps. A Fail needs evidence past `fail_threshold`, at any sample size (a 30x outage need
    not wait); a Pass needs `min_requests` candidate requests and no Fail.

    Worked example: checks errorRate/slo (1%) and errorRate/stable (1.5x), alpha 1%: the
    threshold is log(2/0.01) = 5.3. Candidate 60 errors of 1000, stable 9 of 9000: both
    checks pass 5.3 -> Fail. Candidate 1 of 1000: Pass. Candidate 0 of 40 with
    min_requests 100: Inconclusive ("40 of 100 requests").
    """
    runnable = [
        c
        for c in checks
        if c.metric in candidate and (c.against == "slo" or (stable and c.metric in stable))
    ]
    limit = fail_threshold(false_rollback_rate, len(runnable))
    results: list[CheckResult] = []
    for check in runnable:
        cand = candidate[check.metric]
        if check.against == "slo":
            step_ev = log_evalue_vs_share(cand, check.threshold)
            baseline = None
        else:
            assert stable is not None
            base = stable[check.metric]
            step_ev = log_evalue_vs_stable(cand, base, check.threshold)
            baseline = base.share
        total = carried.get(check.name, 0.0) + step_ev
        if total >= limit:
            verdict: Verdict = "Fail"
        elif cand.requests < min_requests:
            verdict = "Inconclusive"
        else:
            verdict = "Pass"
        results.append(
            CheckResult(check, cand.share, baseline, cand.requests, total, step_ev, verdict)
        )
    failed = [r for r in results if r.verdict == "Fail"]
    if failed:
        return AnalysisResult("Fail", tuple(results), "; ".join(_describe(r) for r in failed))
    if not results:
        return AnalysisResult("Inconclusive", (), "no metric has data for the candidate")
    short = [r for r in results if r.verdict == "Inconclusive"]
    if short:
        samples = min(r.samples for r in short)
        return AnalysisResult(
            "Inconclusive",
            tuple(results),
            f"too few candidate requests: {samples} of {min_requests}",
        )
    return AnalysisResult("Pass", tuple(results), f"{len(results)} checks pass")


def _describe(result: CheckResult) -> str:
    check = result.check
    value = "n/a" if result.value is None else f"{result.value:.4f}"
    if check.against == "slo":
        return (
            f"{check.metric} {value} over the SLO share {check.threshold:g} "
            f"({result.samples} requests, log evidence {result.log_evidence:.1f})"
        )
    base = "n/a" if result.baseline is None else f"{result.baseline:.4f}"
    return (
        f"{check.metric} {value} vs stable {base}, over {check.threshold:g}x "
        f"({result.samples} requests, log evidence {result.log_evidence:.1f})"
    )
