"""Table tests for decisions/rightsizing.py and the rightsizing API fields."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.validation import ROOT, validate_custom
from trimtab.api.common import Resources
from trimtab.api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus
from trimtab.api.quantity import parse_quantity
from trimtab.api.rightsizing import (
    AppliedResources,
    GpuPolicy,
    RecommendationsStatus,
    ResourceAmounts,
    RightsizingSpec,
)
from trimtab.builders.serving import revision_of
from trimtab.decisions.rightsizing import (
    DAY,
    GB,
    HOUR,
    MIG_PROFILES,
    ContainerUsage,
    CurrentResources,
    GiB,
    GpuModel,
    MiB,
    Policy,
    Recommendation,
    cpu_histogram,
    effective_resources,
    gpu_model_from_name,
    moved,
    oom_floor,
    parse_duration,
    recommend_resources,
    resources_hash,
    suggest_gpu_shape,
)

STEP = 300.0
WEEK = 7 * DAY
NOW = 1_700_000_000.0
CRD = ROOT / "crds" / "trimtab.io_modeldeployments.yaml"


def series(
    values: Sequence[float], end: float = NOW, step: float = STEP
) -> list[tuple[float, float]]:
    start = end - step * (len(values) - 1)
    return [(start + i * step, v) for i, v in enumerate(values)]


def steady(n: int, cpu: float, mem: float, seed: int = 1) -> ContainerUsage:
    rng = random.Random(seed)
    return ContainerUsage(
        "server",
        STEP,
        cpu=series([max(0.0, cpu + rng.gauss(0, cpu * 0.05)) for _ in range(n)]),
        memory=series([mem + rng.uniform(0, mem * 0.01) for _ in range(n)]),
    )


POLICY = Policy(window_s=WEEK)
CURRENT = CurrentResources(cpu=2.0, memory=8 * GiB, memory_limit=8 * GiB)


@pytest.mark.parametrize(
    ("usage", "policy", "state", "cpu_range", "mem_range", "message"),
    [
        pytest.param(
            steady(100, 0.5, 2 * GiB), POLICY, "InsufficientData", None, None,
            "insufficient data (100 of 288 samples)", id="too-little-history",
        ),
        pytest.param(
            steady(2016, 0.5, 2 * GiB), POLICY, "Recommended", (0.54, 0.58),
            (2.2 * GiB, 2.25 * GiB), "cpu", id="steady-week",
        ),
        pytest.param(
            steady(300, 0.5, 2 * GiB), POLICY, "Recommended", (0.54, 0.58),
            (2.2 * GiB, 2.25 * GiB), "", id="just-over-a-day",
        ),
        pytest.param(
            ContainerUsage(
                "server", STEP, cpu=steady(2016, 0.5, GiB).cpu,
                missing_series=("container_memory_working_set_bytes",),
            ),
            POLICY, "MissingMetrics", None, None,
            "no data for container_memory_working_set_bytes", id="missing-series-named",
        ),
        pytest.param(
            steady(2016, 0.5, 2 * GiB),
            Policy(window_s=WEEK, cpu_percentile=0.5, cpu_headroom=0.0, memory_headroom=0.0),
            "Recommended", (0.49, 0.52), (2.0 * GiB, 2.03 * GiB), "", id="percentile-override",
        ),
        pytest.param(
            steady(2016, 0.5, 2 * GiB),
            Policy(window_s=WEEK, cpu_min=1.0, memory_max=1.5 * GiB),
            "Recommended", (1.0, 1.0), (1.5 * GiB, 1.5 * GiB), "", id="bounds-clamp",
        ),
        pytest.param(
            steady(2016, 0.001, 1 * MiB), POLICY, "Recommended", (0.01, 0.01),
            (16 * MiB, 16 * MiB), "", id="floors-for-idle",
        ),
        pytest.param(
            steady(287, 0.5, 2 * GiB), Policy(window_s=DAY), "Recommended", (0.54, 0.58),
            (2.2 * GiB, 2.25 * GiB), "", id="a-day-window-survives-a-missed-scrape",
        ),
        pytest.param(
            steady(230, 0.5, 2 * GiB), Policy(window_s=DAY), "InsufficientData", None, None,
            "insufficient data (230 of 259 samples)", id="a-day-window-needs-90-percent",
        ),
    ],
)
def test_recommend_resources(
    usage: ContainerUsage,
    policy: Policy,
    state: str,
    cpu_range: tuple[float, float] | None,
    mem_range: tuple[float, float] | None,
    message: str,
) -> None:
    rec = recommend_resources(usage, CURRENT, policy, NOW)
    assert rec.state == state
    assert message in rec.message
    if cpu_range is None:
        assert rec.cpu is None and rec.memory is None and rec.resources() is None
        return
    assert rec.cpu is not None and rec.memory is not None and mem_range is not None
    assert cpu_range[0] <= rec.cpu <= cpu_range[1]
    assert mem_range[0] <= rec.memory <= mem_range[1]
    res = rec.resources()
    assert res is not None and res.memory_limit == res.memory  # limit = request for memory
    assert res.cpu_limit is None  # no CPU limit is added


def _killed(usage: ContainerUsage, *kills: tuple[float, float]) -> ContainerUsage:
    return ContainerUsage("server", STEP, usage.cpu, usage.memory, oom_kills=list(kills))


@pytest.mark.parametrize(
    ("usage", "current", "cpu", "memory", "message"),
    [
        pytest.param(
            _killed(steady(24, 0.5, 2 * GiB), (NOW - HOUR, 2 * GiB)), CURRENT, 2.0,
            2.64 * GiB, "memory 2704Mi after 1 OOM kill(s); cpu 2 kept: insufficient data "
            "(24 of 288 samples)", id="two-hours-in-a-kill-at-2GiB",
        ),
        pytest.param(
            _killed(steady(24, 0.5, 3 * GiB), (NOW - HOUR, 2 * GiB)), CURRENT, 2.0,
            3.03 * 1.1 * GiB, "after 1 OOM kill(s)", id="a-peak-above-the-kill-counts-too",
        ),
        pytest.param(
            _killed(steady(24, 0.5, 2 * GiB), (NOW - 2 * HOUR, 2 * GiB),
                    (NOW - HOUR, 2.4 * GiB)), CURRENT, 2.0, 2.4 * GiB * 1.44 * 1.1,
            "after 2 OOM kill(s)", id="a-second-kill-within-the-hour-bumps-harder",
        ),
        pytest.param(
            _killed(steady(24, 0.5, 2 * GiB), (NOW - HOUR, 2 * GiB)),
            CurrentResources(memory=2 * GiB, memory_limit=2 * GiB), None, 2.64 * GiB,
            "after 1 OOM kill(s)", id="no-cpu-request-takes-it-from-the-samples",
        ),
        pytest.param(
            _killed(ContainerUsage("server", STEP, cpu=[], memory=steady(24, 0.5, GiB).memory),
                    (NOW - HOUR, GiB)),
            CurrentResources(memory=GiB, memory_limit=GiB), None, None,
            "insufficient data", id="no-cpu-request-and-no-cpu-samples-waits",
        ),
    ],
)  # fmt: skip
def test_an_oom_kill_is_answered_before_a_day_of_history(
    usage: ContainerUsage,
    current: CurrentResources,
    cpu: float | None,
    memory: float | None,
    message: str,
) -> None:
    """A workload killed in its first hours: memory rises for the kill at once (a TrainingJob's
    next attempt, a crash-looping server's next revision) instead of waiting for 288 samples;
    CPU, which a kill says nothing about, stays."""
    rec = recommend_resources(usage, current, POLICY, NOW)
    assert message in rec.message, rec.message
    if memory is None:
        assert rec.state == "InsufficientData" and rec.resources() is None
        return
    assert rec.state == "Recommended"
    assert rec.memory == pytest.approx(memory, rel=0.01)
    if cpu is not None:
        assert rec.cpu == cpu
    else:
        assert rec.cpu is not None and 0.5 <= rec.cpu <= 0.6  # p95 of the samples, +5%
    assert rec.confidence < 0.1
    res = rec.resources()
    assert res is not None and res.memory_limit == res.memory


def test_oom_kill_bumps_memory_above_the_limit() -> None:
    usage = steady(2016, 0.5, 2 * GiB)
    killed = ContainerUsage(
        "server", STEP, usage.cpu, usage.memory, oom_kills=[(NOW - HOUR, 2 * GiB)]
    )
    plain = recommend_resources(usage, CURRENT, POLICY, NOW)
    bumped = recommend_resources(killed, CURRENT, POLICY, NOW)
    assert plain.memory is not None and bumped.memory is not None
    assert bumped.memory >= 2 * GiB * 1.2 * 1.1 > plain.memory
    assert bumped.oom_kills == 1 and "OOM" in bumped.message



@pytest.mark.parametrize(
    ("window_days", "kill_days_ago", "bumped"),
    [
        pytest.param(7, 6, True, id="kill-6-days-ago-in-168h-window-holds"),
        pytest.param(3, 6, False, id="kill-6-days-ago-outside-72h-window-forgotten"),
    ],
)
def test_oom_kill_holds_for_the_window(window_days: int, kill_days_ago: int, bumped: bool) -> None:
    usage = steady(2016, 0.5, 2 * GiB)
    killed = ContainerUsage(
        "server", STEP, usage.cpu, usage.memory, oom_kills=[(NOW - kill_days_ago * DAY, 2 * GiB)]
    )
    rec = recommend_resources(killed, CURRENT, Policy(window_s=window_days * DAY), NOW)
    assert rec.memory is not None
    assert (rec.memory >= 2 * GiB * 1.2 * 1.1) is bumped


def _level_then(old: float, new: float, days_ago: float, n: int = 2016) -> ContainerUsage:
    values = [old if i < n - days_ago * 288 else new for i in range(n)]
    return ContainerUsage("server", STEP, series([0.5] * n), series(values))


def _weekly_spike(n: int = 2016) -> ContainerUsage:
    # One hour at 6 GiB six days ago (a weekly batch), 3 GiB otherwise.
    values = [6 * GiB if n - 6 * 288 <= i < n - 6 * 288 + 12 else 3 * GiB for i in range(n)]
    return ContainerUsage("server", STEP, series([0.5] * n), series(values))


@pytest.mark.parametrize(
    ("usage", "window_days", "low", "high"),
    [
        pytest.param(_weekly_spike(), 7, 6.6 * GiB, 6.7 * GiB,
                     id="weekly-peak-6-days-ago-kept-by-168h-window"),
        pytest.param(_weekly_spike(), 3, 3.3 * GiB, 3.4 * GiB,
                     id="weekly-peak-outside-72h-window-forgotten"),
        pytest.param(_level_then(6 * GiB, 3 * GiB, 5), 3, 3.3 * GiB, 3.4 * GiB,
                     id="level-left-5-days-ago-forgotten-by-72h-window"),
        pytest.param(_level_then(6 * GiB, 3 * GiB, 5), 7, 6.6 * GiB, 6.7 * GiB,
                     id="level-left-5-days-ago-kept-by-168h-window"),
    ],
)  # fmt: skip
def test_memory_peaks_are_kept_for_the_window(
    usage: ContainerUsage, window_days: int, low: float, high: float
) -> None:
    """Memory is sized for the highest peak of the whole window, however old: a weekly peak
    forgotten after four days (the horizon before) meant a shrink and a weekly OOM kill."""
    rec = recommend_resources(usage, CURRENT, Policy(window_s=window_days * DAY), NOW)
    assert rec.memory is not None and low <= rec.memory <= high


@pytest.mark.parametrize(
    ("at_limit_every", "low_gib", "high_gib", "held"),
    [
        # The working set sits at its 2 GiB limit at every step, no kill: memory stays 2 GiB.
        # Headroom on top (2.2 GiB), applied by Auto, would be filled by cache again: a ratchet.
        pytest.param(1, 2.0, 2.0, True, id="always-at-the-limit-holds-it"),
        # At the limit now and then, 1.5 GiB otherwise: the limit still holds (not 1.65 GiB).
        pytest.param(12, 2.0, 2.0, True, id="at-the-limit-hourly-holds-it"),
        # Never at the limit: the peak plus headroom, as ever.
        pytest.param(0, 1.65, 1.67, False, id="below-the-limit-peak-plus-headroom"),
    ],
)
def test_a_working_set_at_its_limit_holds_memory_there(
    at_limit_every: int, low_gib: float, high_gib: float, held: bool
) -> None:
    limit = 2 * GiB
    bound = [at_limit_every and i % at_limit_every == 0 for i in range(2016)]
    memory = series([0.99 * limit if b else 1.5 * GiB for b in bound])
    usage = ContainerUsage(
        "server",
        STEP,
        cpu=series([0.5] * 2016),
        memory=memory,
        memory_at_limit=[(t, limit) for (t, _), b in zip(memory, bound, strict=True) if b],
    )
    current = CurrentResources(cpu=0.5, memory=limit, memory_limit=limit)
    rec = recommend_resources(usage, current, POLICY, NOW)
    assert rec.memory is not None
    assert low_gib * GiB <= rec.memory <= high_gib * GiB, rec.memory / GiB
    assert ("held at the limit" in rec.message) is held, rec.message
    assert rec.peak_memory == max(v for _, v in memory)


def test_an_oom_kill_at_the_limit_still_raises_it() -> None:
    """A kill says the limit was not enough, whatever the working set showed before it."""
    limit = 2 * GiB
    memory = series([0.99 * limit] * 2016)
    usage = ContainerUsage(
        "server", STEP, cpu=series([0.5] * 2016), memory=memory,
        memory_at_limit=[(t, limit) for t, _ in memory], oom_kills=[(NOW - 3600, limit)],
    )  # fmt: skip
    current = CurrentResources(cpu=0.5, memory=limit, memory_limit=limit)
    rec = recommend_resources(usage, current, POLICY, NOW)
    assert rec.memory is not None and rec.memory >= limit * 1.2


def test_daily_peak_is_kept() -> None:
    """A one-hour daily spike to 5 GiB over a 2 GiB base is what memory is sized for."""
    values = [5 * GiB if (i % 288) < 12 else 2 * GiB for i in range(2016)]
    usage = ContainerUsage("server", STEP, series([0.5] * 2016), series(values))
    rec = recommend_resources(usage, CURRENT, POLICY, NOW)
    assert rec.memory is not None and rec.memory >= 5 * GiB * 1.1


@pytest.mark.parametrize(
    ("kills", "expected_mib"),
    [
        pytest.param([], 0, id="none"),
        pytest.param([(0.0, 1000 * MiB)], 1200, id="ratio-1.2"),
        pytest.param([(0.0, 200 * MiB)], 300, id="min-100MiB"),
        pytest.param([(0.0, 1000 * MiB), (600.0, 1200 * MiB)], 1728, id="chained-squares"),
        pytest.param(
            [(0.0, 1000 * MiB), (600.0, 1200 * MiB), (1200.0, 1728 * MiB)],
            1728 * 2.0736, id="third-in-a-row",
        ),
        pytest.param([(0.0, 1000 * MiB), (7200.0, 1000 * MiB)], 1200, id="apart-no-chain"),
        pytest.param(
            [(0.0, 1000 * MiB), (300.0, 1000 * MiB), (600.0, 1000 * MiB)], 1200,
            id="crash-loop-at-one-limit-no-chain",
        ),
        pytest.param(
            [(0.0, 1000 * MiB), (300.0, 1000 * MiB), (900.0, 1200 * MiB)], 1728,
            id="killed-again-after-the-bump-chains",
        ),
        pytest.param(
            [(0.0, 1000 * MiB), (1500.0, 1000 * MiB), (3000.0, 1000 * MiB),
             (3700.0, 1200 * MiB)], 1728,
            id="a-crash-loop-longer-than-the-hour-chains-from-its-last-kill",
        ),
    ],
)
def test_oom_floor(kills: list[tuple[float, float]], expected_mib: float) -> None:
    assert oom_floor(kills) / MiB == pytest.approx(expected_mib)


GPU_POLICY = GpuPolicy()


@pytest.mark.parametrize(
    ("peak_gb", "util", "slices", "model", "policy", "kind", "resource", "count"),
    [
        pytest.param(7, 0.12, 7, "H100-80GB", GPU_POLICY, "Mig", "nvidia.com/mig-1g.10gb", 1,
                     id="small-model-on-h100-mig-1g"),
        pytest.param(7, 0.2, 7, "H100-80GB", GPU_POLICY, "Mig", "nvidia.com/mig-2g.20gb", 1,
                     id="two-slices-of-compute-mig-2g"),
        pytest.param(7, 0.5, 7, "H100-80GB", GPU_POLICY, "Mig", "nvidia.com/mig-4g.40gb", 1,
                     id="compute-bound-needs-4-slices"),
        pytest.param(15, 0.2, 7, "A100-40GB", GPU_POLICY, "Mig", "nvidia.com/mig-3g.20gb", 1,
                     id="a100-40-3g.20gb"),
        pytest.param(4, 0.1, 7, "A100-40GB", GPU_POLICY, "Mig", "nvidia.com/mig-1g.5gb", 1,
                     id="a100-40-1g.5gb"),
        pytest.param(17, 0.1, 7, "A100-80GB", GPU_POLICY, "Mig", "nvidia.com/mig-1g.20gb", 1,
                     id="a100-80-1g.20gb"),
        pytest.param(30, 0.6, 7, "A100-80GB", GPU_POLICY, "Whole", "nvidia.com/gpu", 1,
                     id="busy-needs-whole-gpu"),
        pytest.param(120, 0.9, 14, "H100-80GB", GPU_POLICY, "Whole", "nvidia.com/gpu", 2,
                     id="two-gpus-by-memory"),
        pytest.param(30, 0.9, 28, "H100-80GB", GPU_POLICY, "Whole", "nvidia.com/gpu", 4,
                     id="four-gpus-by-compute"),
        pytest.param(6, 0.1, 7, None, GPU_POLICY, "Whole", "nvidia.com/gpu", 1,
                     id="unknown-model-low-use-does-not-share-blind"),
        pytest.param(85, 0.05, 7, None, GPU_POLICY, "Whole", "nvidia.com/gpu", 1,
                     id="unknown-model-85gb-never-shared"),
        pytest.param(16, 0.05, 28, "A100-80GB", GPU_POLICY, "Whole", "nvidia.com/gpu", 1,
                     id="four-ranks-idle-whole-gpus-not-a-mig-slice"),
        pytest.param(16, 0.05, 28, "A100-80GB", GpuPolicy(allow_mig=False), "Whole",
                     "nvidia.com/gpu", 1, id="four-ranks-idle-not-time-sliced"),
        pytest.param(6, 0.1, 7, "H100-80GB", GpuPolicy(allow_mig=False), "TimeSliced",
                     "nvidia.com/gpu.shared", 1, id="mig-disallowed-shares"),
        pytest.param(6, 0.1, 7, "H100-80GB", GpuPolicy(allow_mig=False, allow_sharing=False),
                     "Whole", "nvidia.com/gpu", 1, id="nothing-allowed-whole"),
        pytest.param(6, 1.0, 3, "A100-80GB", GPU_POLICY, "Mig", "nvidia.com/mig-4g.40gb", 1,
                     id="mig-3g-saturated-grows-to-4g"),
        pytest.param(6, None, 3, "A100-80GB", GPU_POLICY, "Mig", "nvidia.com/mig-3g.40gb", 1,
                     id="mig-without-samples-keeps-its-slices"),
        pytest.param(6, None, 7, "H100-80GB", GPU_POLICY, "Whole", "nvidia.com/gpu", 1,
                     id="no-utilization-assumes-busy"),
        # vLLM reserves gpu_memory_utilization (0.9) of the card up front: 0.9 x 81559 MiB.
        pytest.param(76.97, 0.4, 7, "H100-80GB", GPU_POLICY, "Whole", "nvidia.com/gpu", 1,
                     id="vllm-pool-on-one-h100-stays-one"),
        pytest.param(81.2, 0.4, 7, "H100-80GB", GPU_POLICY, "Whole", "nvidia.com/gpu", 1,
                     id="a-95-percent-pool-stays-one"),
        pytest.param(150, 0.4, 14, "H100-80GB", GPU_POLICY, "Whole", "nvidia.com/gpu", 2,
                     id="pools-on-two-gpus-stay-two"),
        pytest.param(360, 0.2, 28, None, GPU_POLICY, "Whole", "nvidia.com/gpu", 4,
                     id="unknown-card-four-gpus-never-fewer"),
        pytest.param(8, 0.05, 28, None, GpuPolicy(allow_mig=False), "Whole", "nvidia.com/gpu",
                     4, id="unknown-card-idle-ranks-kept"),
    ],
)
def test_suggest_gpu_shape(
    peak_gb: float, util: float | None, slices: int, model: str | None, policy: GpuPolicy,
    kind: str, resource: str, count: int,
) -> None:
    shape = suggest_gpu_shape(peak_gb * GB, util, slices, policy, model)  # type: ignore[arg-type]  # str for the Literal
    assert (shape.kind, shape.resource_name, shape.count) == (kind, resource, count), shape.reason


def test_low_use_mig_also_mentions_sharing() -> None:
    shape = suggest_gpu_shape(7 * GB, 0.12, 7, GPU_POLICY, "H100-80GB")
    assert shape.kind == "Mig" and "time-sliced GPU would also do" in shape.reason


def test_mig_tables_have_the_real_profile_names() -> None:
    assert [p.name for p in MIG_PROFILES["A100-40GB"]] == [
        "1g.5gb", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"
    ]
    for model in ("A100-80GB", "H100-80GB"):  # a tuple of Literals: indexes the table typed
        assert [p.name for p in MIG_PROFILES[model]] == [
            "1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"
        ]


@pytest.mark.parametrize(
    ("name", "memory", "expected"),
    [
        pytest.param("NVIDIA A100-SXM4-40GB", None, "A100-40GB", id="a100-40"),
        pytest.param("NVIDIA A100 80GB PCIe", None, "A100-80GB", id="a100-80-pcie"),
        pytest.param("NVIDIA H100 80GB HBM3", None, "H100-80GB", id="h100"),
        pytest.param("NVIDIA H100 80GB HBM3", 85.5e9, "H100-80GB", id="h100-sxm5-with-memory"),
        pytest.param("NVIDIA H100 PCIe", None, "H100-80GB", id="h100-pcie-80gb"),
        pytest.param("NVIDIA H100 PCIe", 85e9, "H100-80GB", id="h100-pcie-with-memory"),
        pytest.param("H100 SXM5 80GB", None, "H100-80GB", id="h100-sxm5-80gb-dcgm-style"),
        pytest.param("NVIDIA H100 NVL", 100e9, None, id="h100-nvl-94gb-not-tabled"),
        pytest.param("NVIDIA H100 NVL", None, None, id="h100-nvl-no-memory-not-tabled"),
        pytest.param("NVIDIA H100 96GB HBM3", None, None, id="h100-96gb-not-tabled"),
        pytest.param("NVIDIA H100 64GB HBM2e", None, None, id="h100-64gb-not-tabled"),
        pytest.param("NVIDIA H100", 100e9, None, id="h100-unsized-name-96gb-memory-not-tabled"),
        pytest.param("NVIDIA GH200 480GB", None, None, id="gh200-not-tabled"),
        pytest.param("NVIDIA H800", None, None, id="h800-not-tabled"),
        pytest.param("Tesla T4", None, None, id="no-mig"),
    ],
)
def test_gpu_model_from_name(name: str, memory: float | None, expected: str | None) -> None:
    assert gpu_model_from_name(name, memory) == expected


@pytest.mark.parametrize(
    ("model", "profile", "per_gpu"),
    [
        pytest.param("A100-40GB", "1g.5gb", 7, id="a100-40-1g.5gb-x7"),
        pytest.param("A100-40GB", "1g.10gb", 4, id="a100-40-1g.10gb-x4"),
        pytest.param("A100-40GB", "3g.20gb", 2, id="a100-40-3g.20gb-x2"),
        pytest.param("A100-80GB", "2g.20gb", 3, id="a100-80-2g.20gb-x3"),
        pytest.param("H100-80GB", "1g.10gb", 7, id="h100-1g.10gb-x7"),
        pytest.param("H100-80GB", "1g.20gb", 4, id="h100-1g.20gb-x4"),
        pytest.param("H100-80GB", "4g.40gb", 1, id="h100-4g.40gb-x1"),
    ],
)
def test_mig_instances_per_gpu(model: GpuModel, profile: str, per_gpu: int) -> None:
    found = {p.name: p.per_gpu for p in MIG_PROFILES[model]}
    assert found[profile] == per_gpu


def test_mig_shape_says_how_many_fit_per_gpu_and_unknown_model_says_no_table() -> None:
    mig = suggest_gpu_shape(7 * GB, 0.12, 7, GPU_POLICY, "H100-80GB")
    assert "1g.10gb on H100-80GB (7 per GPU)" in mig.reason
    unknown = suggest_gpu_shape(6 * GB, 0.1, 7, GPU_POLICY, None)
    assert unknown.kind == "Whole" and "no MIG table for this GPU model" in unknown.reason
    assert "no known capacity to share it safely" in unknown.reason
    ranks = suggest_gpu_shape(16 * GB, 0.05, 28, GPU_POLICY, "A100-80GB")
    assert "parallelism (ranks, tensor-parallel size) must change too" in ranks.reason
    busy_unknown = suggest_gpu_shape(30 * GB, 0.9, 7, GPU_POLICY, None)
    assert busy_unknown.kind == "Whole" and "no MIG table" in busy_unknown.reason


def test_gpu_shape_in_recommendation() -> None:
    usage = steady(2016, 0.5, 2 * GiB)
    with_gpu = ContainerUsage(
        "server", STEP, usage.cpu, usage.memory,
        gpu_memory=series([6 * GB] * 2016), gpu_utilization=series([0.12] * 2016),
        gpu_model="H100-80GB",
    )
    current = CurrentResources(cpu=2.0, memory=8 * GiB, gpu=1)
    rec = recommend_resources(with_gpu, current, POLICY, NOW)
    assert rec.gpu_shape is not None and rec.gpu_shape.resource_name == "nvidia.com/mig-1g.10gb"
    status = rec.to_status("168h")
    assert status.basis is not None and status.basis.peak_gpu_memory is not None
    assert status.recommended is not None and status.recommended.gpu == 1  # shape only suggested


@pytest.mark.parametrize(
    ("current", "cpu", "memory", "expected"),
    [
        pytest.param(CurrentResources(cpu=1.0, memory=GiB), 1.05, GiB, False, id="5pct-no"),
        pytest.param(CurrentResources(cpu=1.0, memory=GiB), 1.11, GiB, True, id="11pct-cpu"),
        pytest.param(CurrentResources(cpu=1.0, memory=GiB), 1.0, 0.85 * GiB, True, id="down-15"),
        pytest.param(CurrentResources(), 1.0, GiB, True, id="nothing-set-before"),
    ],
)
def test_moved(current: CurrentResources, cpu: float, memory: float, expected: bool) -> None:
    from trimtab.decisions.rightsizing import Recommendation

    rec = Recommendation("c", "Recommended", "", current, cpu=cpu, memory=memory)
    assert moved(rec, 0.10) is expected


def test_effective_resources_and_revision() -> None:
    spec = ModelDeploymentSpec(image="i", resources=Resources(cpu="2", memory="8Gi"))
    applied = RecommendationsStatus(
        applied=AppliedResources(
            resources=ResourceAmounts(cpu="600m", memory="2253Mi", memory_limit="2253Mi"),
            applied_at="2024-01-01T00:00:00Z",
            spec_resources_hash=resources_hash(spec.resources),
        )
    )
    assert effective_resources(spec.resources, "Recommend", applied) == spec.resources
    auto = effective_resources(spec.resources, "Auto", applied)
    assert (auto.cpu, auto.memory, auto.memory_limit) == ("600m", "2253Mi", "2253Mi")
    # The resized spec is a new revision; the rightsizing policy itself never is.
    resized = spec.model_copy(update={"resources": auto})
    assert revision_of(resized) != revision_of(spec)
    policy_only = spec.model_copy(update={"rightsizing": RightsizingSpec(mode="Auto")})
    assert revision_of(policy_only) == revision_of(spec)
    # A user's edit of spec.resources wins over the applied recommendation.
    edited = Resources(cpu="3", memory="8Gi")
    assert effective_resources(edited, "Auto", applied) == edited


def test_histogram_decay_and_resolution() -> None:
    h = cpu_histogram()
    for i in range(100):
        h.add(1.0, 1.0, i * 60.0)
    assert 1.0 <= h.percentile(0.95) <= 1.011
    h.add(3.0, 1.0, 30 * DAY)  # much later: the old samples have nearly no weight
    assert h.percentile(0.5) > 2.9
    assert math.isclose(cpu_histogram().percentile(0.9), 0.0)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [pytest.param("168h", 604800, id="week"), pytest.param("1h30m", 5400, id="compound"),
     pytest.param("250ms", 0.25, id="millis")],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_crd_accepts_rightsizing_and_recommendations(tmp_path: Path) -> None:
    rec = recommend_resources(steady(2016, 0.5, 2 * GiB), CURRENT, POLICY, NOW)
    status = ModelDeploymentStatus(
        recommendations=RecommendationsStatus(
            updated_at="2024-01-01T00:00:00Z", containers=[rec.to_status("168h")]
        )
    )
    obj = {
        "apiVersion": "trimtab.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": "ml"},
        "spec": {
            "image": "i",
            "rightsizing": {
                "mode": "Auto",
                "window": "72h",
                "cpu": {"percentile": 0.9, "headroom": 0.1, "min": "100m", "max": "8"},
                "memory": {"max": "64Gi"},
                "gpu": {"allowSharing": False, "gpuModel": "H100-80GB"},
            },
        },
        "status": status.to_wire(),
    }
    validate_custom(obj, CRD)
    bad = {**obj, "spec": {"image": "i", "rightsizing": {"mode": "Sometimes"}}}
    with pytest.raises(Exception, match="Sometimes"):
        validate_custom(bad, CRD)


@pytest.mark.parametrize(
    ("cpu_limit", "cores", "want_cpu", "capped"),
    [
        pytest.param(2.0, 2.0, 2.0, True, id="throttled-at-limit-capped-to-limit"),
        pytest.param(4.0, 2.0, 2.1, False, id="limit-above-usage-not-capped"),
        pytest.param(None, 2.0, 2.1, False, id="no-cpu-limit-not-capped"),
    ],
)
def test_cpu_request_never_exceeds_the_cpu_limit(
    cpu_limit: float | None, cores: float, want_cpu: float, capped: bool
) -> None:
    """A container throttled at cpuLimit 2 asks for 2 cores + 5%: a 2.1 request over a 2 limit
    would be a revision the API server rejects, so it is capped and the reason says why."""
    usage = ContainerUsage(
        "server", STEP, series([cores] * 2016), series([2 * GiB] * 2016)
    )
    current = CurrentResources(cpu=1.0, memory=8 * GiB, cpu_limit=cpu_limit)
    rec = recommend_resources(usage, current, POLICY, NOW)
    res = rec.resources()
    assert res is not None and res.cpu == pytest.approx(want_cpu, abs=0.03)
    assert res.cpu_limit == cpu_limit
    if cpu_limit is not None:
        assert res.cpu is not None and res.cpu <= cpu_limit
    status = rec.to_status("168h")
    assert status.basis is not None
    assert ("raise the limit" in rec.message) is capped
    assert (status.basis.cpu_capped is not None) is capped


def _chat_sizing(mode: str, **kw: Any) -> Any:
    """The right-sizing handler's inputs for a ModelDeployment `chat` at 1 core and 2 GiB."""
    from trimtab.handlers import rightsizing as handler
    from trimtab.kube.resources import MODELDEPLOYMENTS
    from trimtab.metrics.usage import UsageTarget

    return handler.Sizing(
        resource=MODELDEPLOYMENTS,
        rightsizing=RightsizingSpec(mode=mode),  # type: ignore[arg-type]  # str for the Literal
        spec_resources=Resources(cpu="1", memory="2Gi"),
        current=CurrentResources(cpu=1.0, memory=2 * GiB, memory_limit=2 * GiB),
        target=UsageTarget("ml", "chat-.*", "server"),
        applied_reason="NewRevision",
        applied_note="rolled out as a new revision",
        **kw,
    )


async def test_a_recommendation_that_drifts_is_told_each_time_it_has_moved_far_enough(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Recommend mode, CPU use climbing about 8% a pass from 1.15 to 2.0 cores over a 1-core
    request: each pass moves less than minChange (10%) from the last, so comparing with the
    previous pass told only the first move. The handler keeps what it last told
    (`announced`) and tells again once the recommendation is 10% away from that."""
    import logging
    from types import SimpleNamespace

    from trimtab.handlers import rightsizing as handler
    from trimtab.metrics.usage import UsageAnswer

    told: list[str] = []
    monkeypatch.setattr(handler.kopf, "event", lambda *_, **kw: told.append(kw["message"]))
    levels = [1.15, 1.24, 1.34, 1.45, 1.56, 1.69, 1.82, 1.97]
    level = {"cpu": levels[0]}

    class Reader:
        async def read(self, *_: Any, **__: Any) -> UsageAnswer:
            return UsageAnswer(steady(2016, level["cpu"], 2 * GiB, seed=3))

    monkeypatch.setattr(handler, "make_reader", lambda memo: Reader())
    sizing = _chat_sizing("Recommend", fire_reconcile=False)
    body = {"metadata": {"name": "chat", "namespace": "ml"}}
    previous = RecommendationsStatus()
    recommended: list[float] = []
    for cpu in levels:
        level["cpu"] = cpu
        patch = SimpleNamespace(status={}, metadata=SimpleNamespace(annotations={}))
        await handler._rightsize(
            body, previous, patch, SimpleNamespace(), logging.getLogger("t"), sizing, NOW
        )  # type: ignore[arg-type]  # a plain dict and namespaces stand in for kopf's
        previous = RecommendationsStatus.model_validate(patch.status["recommendations"])
        rec = previous.containers[0].recommended
        assert rec is not None and rec.cpu is not None
        recommended.append(float(parse_quantity(rec.cpu)))
    assert recommended[-1] / recommended[0] > 1.6  # it did drift, slowly
    assert 4 <= len(told) <= 6, told  # about every 10%, not once
    announced = previous.containers[0].announced
    assert announced is not None and announced.cpu is not None
    assert abs(float(parse_quantity(announced.cpu)) - recommended[-1]) / recommended[-1] <= 0.1


@pytest.mark.parametrize(
    ("rollout", "applied"),
    [
        pytest.param({}, True, id="no-rollout-applies"),
        pytest.param({"stableRevision": "a"}, True, id="between-rollouts-applies"),
        pytest.param({"stableRevision": "a", "candidateRevision": "b"}, False,
                     id="a-candidate-under-analysis-holds-it"),
    ],
)  # fmt: skip
async def test_auto_waits_for_a_rollout_in_progress(
    monkeypatch: pytest.MonkeyPatch, rollout: dict[str, str], applied: bool
) -> None:
    """A new revision mid-canary would replace the candidate being analysed and start the
    rollout over; Auto holds the apply until the rollout ends, and says so."""
    import logging
    from types import SimpleNamespace

    from trimtab.handlers import rightsizing as handler
    from trimtab.metrics.usage import UsageAnswer

    monkeypatch.setattr(handler.kopf, "event", lambda *_, **__: None)

    class Reader:
        async def read(self, *_: Any, **__: Any) -> UsageAnswer:
            return UsageAnswer(steady(2016, 3.0, 2 * GiB))  # far over the 1-core request

    written: dict[str, Any] = {}

    class Kube:
        async def patch_status(self, *args: Any) -> None:
            written.update(args[-1])  # {"recommendations": ...}, before the reconcile fires

    monkeypatch.setattr(handler, "make_reader", lambda memo: Reader())
    held = handler._rollout_in_progress({"rollout": rollout})
    sizing = _chat_sizing("Auto", fire_reconcile=True, apply_held=held)
    patch = SimpleNamespace(status={}, metadata=SimpleNamespace(annotations={}))
    await handler._rightsize(
        {"metadata": {"name": "chat", "namespace": "ml"}}, RecommendationsStatus(), patch,
        SimpleNamespace(kube=Kube()), logging.getLogger("t"), sizing, NOW,
    )  # type: ignore[arg-type]  # a plain dict and namespaces stand in for kopf's
    out = written.get("recommendations") or patch.status.get("recommendations")
    assert out is not None  # written at once (an apply) or through kopf's patch
    status = RecommendationsStatus.model_validate(out)
    cond = {c.type: c for c in status.conditions}["RecommendationApplied"]
    if applied:
        assert status.applied is not None and cond.status == "True"
        assert patch.metadata.annotations  # the reconcile is fired to roll it out
    else:
        assert status.applied is None and not patch.metadata.annotations
        assert (cond.status, cond.reason) == ("False", "WaitingForRollout")
        assert "revision b is being rolled out" in cond.message


async def test_an_apply_whose_status_write_is_refused_posts_no_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Auto writes the applied resources to status before it fires the reconcile; when the API
    server refuses that write, no RecommendationApplied Event tells of an apply that did not
    happen (it used to be posted first)."""
    import logging
    from types import SimpleNamespace

    from trimtab.handlers import rightsizing as handler
    from trimtab.kube.client import KubeError
    from trimtab.metrics.usage import UsageAnswer

    told: list[str] = []
    monkeypatch.setattr(handler.kopf, "event", lambda *_, **kw: told.append(kw["reason"]))

    class Reader:
        async def read(self, *_: Any, **__: Any) -> UsageAnswer:
            return UsageAnswer(steady(2016, 3.0, 2 * GiB))

    class Refusing:
        async def patch_status(self, *_: Any) -> None:
            raise KubeError(409, "Conflict", "the object has been modified")

    monkeypatch.setattr(handler, "make_reader", lambda memo: Reader())
    sizing = _chat_sizing("Auto", fire_reconcile=True)
    patch = SimpleNamespace(status={}, metadata=SimpleNamespace(annotations={}))
    with pytest.raises(KubeError):
        await handler._rightsize(
            {"metadata": {"name": "chat", "namespace": "ml"}}, RecommendationsStatus(), patch,
            SimpleNamespace(kube=Refusing()), logging.getLogger("t"), sizing, NOW,
        )  # type: ignore[arg-type]  # a plain dict and namespaces stand in for kopf's
    assert handler.EVENT_APPLIED not in told


MOVES = [
    # (memory now, recommended, OOM kills in the window, minChange) -> moved
    pytest.param(2 * GiB, 2.64 * GiB, 1, 0.35, True, id="oom-raise-beats-a-large-min-change"),
    pytest.param(2 * GiB, 2.4 * GiB, 1, 0.5, True, id="oom-bump-without-headroom"),
    pytest.param(200 * MiB, 300 * MiB, 1, 0.9, True, id="oom-bump-of-100mib"),
    pytest.param(2 * GiB, 2.1 * GiB, 1, 0.35, False, id="a-kill-long-answered-small-drift-waits"),
    pytest.param(2 * GiB, 2.64 * GiB, 0, 0.35, False, id="no-kill-min-change-holds"),
    pytest.param(2 * GiB, 2.64 * GiB, 0, 0.10, True, id="no-kill-beyond-min-change"),
]  # fmt: skip


@pytest.mark.parametrize(("now", "recommended", "kills", "min_change", "expected"), MOVES)
def test_an_oom_raise_is_not_held_by_min_change(
    now: float, recommended: float, kills: int, min_change: float, expected: bool
) -> None:
    """In Auto mode only a recommendation that `moved` is applied: a raise for a kill at the
    limit the pod has now must be, or the pod is killed at that limit again and again."""
    rec = Recommendation("server", "Recommended", "", CurrentResources(cpu=1.0, memory=now),
                         cpu=1.0, memory=recommended, oom_kills=kills)  # fmt: skip
    assert moved(rec, min_change) is expected
