"""Request traces for the simulator: the Azure LLM inference trace CSV (TIMESTAMP,
ContextTokens, GeneratedTokens), time-scaling, and seeded synthetic step and burst traces.

Synthetic traces draw token counts from the bundled Azure trace; only arrivals are made up."""

from __future__ import annotations

import csv
import functools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

BUNDLED_TRACE = "azure-llm-2023-code.csv"


@dataclass(frozen=True, slots=True)
class Request:
    arrival: float  # seconds from the trace's start
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Trace:
    name: str
    requests: tuple[Request, ...]  # sorted by arrival

    @property
    def duration(self) -> float:
        return self.requests[-1].arrival if self.requests else 0.0

    def time_scaled(self, factor: float) -> Trace:
        """The same requests arriving `factor` times faster (factor 4: an hour in 15 minutes)."""
        if factor <= 0:
            raise ValueError("time scale must be positive")
        scaled = tuple(
            Request(r.arrival / factor, r.prompt_tokens, r.output_tokens) for r in self.requests
        )
        return Trace(f"{self.name} x{factor:g}", scaled)


def _parse_timestamp(text: str) -> float:
    # Azure writes 7 fractional digits ("18:17:03.9799600"); datetime takes at most 6.
    head, _, frac = text.strip().partition(".")
    stamp = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    return stamp + (float("0." + frac) if frac else 0.0)


def parse_azure_csv(lines: Iterable[str], name: str) -> Trace:
    """Parse the Azure LLM trace format; arrivals become seconds from the first request."""
    reader = csv.DictReader(lines)
    missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{name}: not an Azure LLM trace, missing columns {sorted(missing)}")
    rows: list[tuple[float, int, int]] = []
    for row in reader:
        rows.append(
            (
                _parse_timestamp(row["TIMESTAMP"]),
                int(row["ContextTokens"]),
                int(row["GeneratedTokens"]),
            )
        )
    if not rows:
        raise ValueError(f"{name}: the trace has no requests")
    rows.sort()
    start = rows[0][0]
    return Trace(name, tuple(Request(t - start, p, o) for t, p, o in rows))


def load_trace(path: Path) -> Trace:
    with path.open(newline="") as handle:
        return parse_azure_csv(handle, path.name)


@functools.cache
def bundled_trace() -> Trace:
    """The Azure LLM 2023 "code" trace shipped with trimtab (see data/ATTRIBUTION.md)."""
    text = resources.files("trimtab").joinpath("data", BUNDLED_TRACE).read_text()
    return parse_azure_csv(text.splitlines(), BUNDLED_TRACE)


def _poisson_arrivals(rng: random.Random, segments: Sequence[tuple[float, float]]) -> list[float]:
    """Arrival times of a piecewise-constant Poisson process; segments are (length s, rate/s)."""
    times: list[float] = []
    start = 0.0
    for length, rate in segments:
        t = start
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= start + length:
                break
            times.append(t)
        start += length
    return times


def _with_tokens(name: str, times: list[float], rng: random.Random, pool: Trace) -> Trace:
    sizes = [(r.prompt_tokens, r.output_tokens) for r in pool.requests]
    return Trace(name, tuple(Request(t, *rng.choice(sizes)) for t in times))


def step_trace(
    seed: int,
    base_rate: float,
    factor: float = 5.0,
    before: float = 180.0,
    during: float = 300.0,
    after: float = 240.0,
    pool: Trace | None = None,
) -> Trace:
    """Poisson arrivals at `base_rate`, then `factor` times that for `during` seconds, then back."""
    rng = random.Random(seed)
    segments = [(before, base_rate), (during, base_rate * factor), (after, base_rate)]
    return _with_tokens(
        f"step {factor:g}x", _poisson_arrivals(rng, segments), rng, pool or bundled_trace()
    )


def burst_trace(
    seed: int,
    base_rate: float,
    factor: float = 5.0,
    burst: float = 45.0,
    period: float = 180.0,
    duration: float = 900.0,
    pool: Trace | None = None,
) -> Trace:
    """Poisson arrivals at `base_rate` with `factor`x bursts of `burst` seconds; each period's
    burst starts at a seeded random offset, so the bursts cannot be learned from a clock."""
    rng = random.Random(seed)
    segments: list[tuple[float, float]] = []
    n = max(1, math.ceil(duration / period))
    for _ in range(n):
        offset = rng.uniform(0.2, 0.8) * (period - burst)
        segments += [
            (offset, base_rate),
            (burst, base_rate * factor),
            (period - burst - offset, base_rate),
        ]
    return _with_tokens(
        f"burst {factor:g}x", _poisson_arrivals(rng, segments), rng, pool or bundled_trace()
    )
