"""An OOM kill is valued at the memory limit its pod had when it was killed: Auto mode bumps
memory once for a kill, never again for the same kill after the limit was raised. The reader
answers from a model of the workload's pods (no Prometheus: a week of passes in milliseconds)."""

from __future__ import annotations

from typing import Any

import pytest

from trimtab.decisions.rightsizing import (
    CurrentResources,
    GiB,
    Policy,
    moved,
    recommend_resources,
)
from trimtab.metrics.usage import (
    CPU_SERIES,
    LIMITS_SERIES,
    MEMORY_SERIES,
    RESTARTS_SERIES,
    UsageReader,
    UsageTarget,
    pod_regex_for,
)

TARGET = UsageTarget("ml", pod_regex_for("chat"), "server")


WEEK_S = 7 * 24 * 3600.0
T0 = 1_700_000_000.0
FIRST_POD = "chat-0123456789-7d9f8c6b5-x2x9z"


class ReplayedRollouts(UsageReader):
    """Answers the reader's range queries from a model of a workload's pods, as kube-state-metrics
    and cAdvisor would: one pod per revision, each with the memory limit it was created with;
    the first pod was OOM-killed once, an hour before T0. Working set 1.8 GiB (cAdvisor misses
    the spike that killed it). No Prometheus: the loop below runs a week of passes in
    milliseconds."""

    def __init__(self, first_limit: float | None) -> None:
        super().__init__("http://127.0.0.1:9")
        # (pod, created at, memory limit or None when the container has none)
        self.pods: list[tuple[str, float, float | None]] = [(FIRST_POD, T0 - WEEK_S, first_limit)]
        self.kill_at = T0 - 3600.0

    async def _range(self, promql: str, start: float, end: float, step_s: int) -> Any:
        times = [start + step_s * (i + 1) for i in range(int((end - start) // step_s))]

        def flat(value: float, since: float = start) -> list[list[Any]]:
            return [[t, str(value)] for t in times if t >= since]

        if LIMITS_SERIES in promql and MEMORY_SERIES in promql:
            # Steps at the limit: the 1.8 GiB working set is under 97% of every limit here.
            assert all(limit is None or 1.8 * GiB < 0.97 * limit for _, _, limit in self.pods)
            return []
        if LIMITS_SERIES in promql:
            return [
                {"metric": {"pod": pod}, "values": flat(limit, born)}
                for pod, born, limit in self.pods
                if limit is not None
            ]
        if "OOMKilled" in promql:  # the last termination: an OOM kill, from the kill on
            killed = [[t, "1" if t >= self.kill_at else "0"] for t in times]
            return [{"metric": {"pod": FIRST_POD}, "values": killed}]
        if RESTARTS_SERIES in promql:  # each pod's restart counter: 1 from the kill on
            return [
                {
                    "metric": {"pod": pod},
                    "values": [
                        [t, "1" if pod == FIRST_POD and t >= self.kill_at else "0"]
                        for t in times
                        if t >= born
                    ],
                }
                for pod, born, _ in self.pods
            ]
        if CPU_SERIES in promql:
            return [{"metric": {}, "values": flat(0.5)}]
        if MEMORY_SERIES in promql:
            return [{"metric": {}, "values": flat(1.8 * GiB)}]
        return []


@pytest.mark.parametrize(
    ("first_limit", "valued_at"),
    [
        pytest.param(2 * GiB, 2 * GiB, id="kill-valued-at-its-pods-limit"),
        pytest.param(None, 1.8 * GiB, id="no-limit-series-nearest-working-set"),
    ],
)
async def test_kill_is_valued_at_the_limit_it_happened_at(
    first_limit: float | None, valued_at: float
) -> None:
    reader = ReplayedRollouts(first_limit)
    # A later revision runs with a raised limit: the old kill still counts at its own.
    reader.pods.append(("chat-abcdef0123-7d9f8c6b5-aaaaa", T0 - 600, 8 * GiB))
    answer = await reader.read(TARGET, WEEK_S, T0)
    await reader.close()
    assert answer.usage is not None and answer.usage.missing_series == ()
    assert answer.usage.oom_kills == [(pytest.approx(reader.kill_at, abs=300), valued_at)]


async def test_auto_after_one_kill_bumps_memory_once_then_holds() -> None:
    """Auto mode, one pass every 5 minutes after one OOM kill at a 2 GiB limit: each applied
    recommendation is a new pod with the new limit. The kill stays in the window for days, but
    it is valued at the 2 GiB it happened at, so memory goes to 2 GiB x 1.2 x 1.1 once and stays
    there (valued at the limit in force now, it grew 1.32x per pass without end)."""
    reader = ReplayedRollouts(2 * GiB)
    current = CurrentResources(cpu=1.0, memory=2 * GiB, memory_limit=2 * GiB)
    policy = Policy(window_s=WEEK_S)
    applied: list[float] = []
    limits: list[float] = []
    for i in range(8):
        now = T0 + 300.0 * i
        answer = await reader.read(TARGET, WEEK_S, now)
        assert answer.usage is not None and len(answer.usage.oom_kills) == 1
        rec = recommend_resources(answer.usage, current, policy, now)
        resized = rec.resources()
        if moved(rec, policy.min_change) and resized is not None:
            current = resized
            applied.append(now)
            reader.pods.append((f"chat-{i:010d}-7d9f8c6b5-x{i}", now, resized.memory_limit))
        assert current.memory_limit is not None
        limits.append(current.memory_limit)
    await reader.close()
    assert applied == [T0]
    assert limits[0] == pytest.approx(2 * GiB * 1.2 * 1.1, rel=0.01)
    assert set(limits) == {limits[0]}
