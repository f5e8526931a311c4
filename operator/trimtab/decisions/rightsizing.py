"""Right-sizing decisions: CPU and memory requests from decaying usage histograms, the GPU shape
from peak GPU memory, and whether a recommendation moved enough to act on.

Pure: usage, current resources, policy and the time `now` (unix seconds) are arguments."""

from __future__ import annotations

import bisect
import datetime
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from trimtab.api.common import Resources
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.quantity import format_bytes, format_cpu, parse_quantity
from trimtab.api.rightsizing import (
    ContainerRecommendation,
    GpuPolicy,
    GpuShape,
    RecommendationBasis,
    RecommendationsStatus,
    RecommendationState,
    ResourceAmounts,
    RightsizingSpec,
)
from trimtab.api.trainingjob import TrainingJobSpec, WorkerFailure

MiB = 1024**2
GiB = 1024**3
HOUR = 3600.0
DAY = 24 * HOUR

# Defaults when the spec leaves percentile or headroom unset. CPU has no limit, so a burst above
# the request borrows idle CPU instead of failing: a high percentile with little headroom is
# enough. Memory is not compressible: size for the highest recent peak plus headroom.
DEFAULT_CPU_PERCENTILE = 0.95
DEFAULT_CPU_HEADROOM = 0.05
DEFAULT_MEMORY_PERCENTILE = 1.0
DEFAULT_MEMORY_HEADROOM = 0.10
# Half-life of usage weights: a sample a day old counts half as much as one taken now.
HALF_LIFE_S = DAY
# Memory is sized from the peak of each interval, so one quiet hour cannot hide a spike.
PEAK_INTERVAL_S = HOUR
# After an OOM kill the next request is at least this much above the memory it was killed at.
OOM_BUMP_RATIO = 1.2
OOM_MIN_BUMP = 100 * MiB
OOM_MAX_BUMP_RATIO = 2.5
# Kills closer together than this are one episode: the previous bump was not enough.
OOM_CHAIN_S = HOUR
# A recommendation needs a day of history (or the whole window when it is shorter).
MIN_HISTORY_S = DAY
MIN_COVERAGE = 0.9
# Requests below these are noise that only make a pod unschedulable after a restart spike.
MIN_CPU = 0.01
MIN_MEMORY = 16 * MiB


# ---------------------------------------------------------------------------------------------
# Decaying histogram


class DecayingHistogram:
    """A histogram with exponentially growing buckets whose samples lose half their weight every
    `half_life` seconds, as in the Vertical Pod Autoscaler's recommender.

    Instead of decaying every stored weight, a new sample's weight is multiplied by
    2^((t - reference) / half_life); ratios between samples are what percentiles use.

    >>> h = DecayingHistogram(first_bucket=0.01, ratio=1.05, max_value=1000.0, half_life=86400.0)
    >>> for v in (0.2, 0.2, 0.2, 1.0):
    ...     h.add(v, 1.0, 0.0)
    >>> round(h.percentile(0.5), 3), round(h.percentile(0.95), 3)
    (0.216, 1.016)
    >>> h.add(0.2, 1.0, 86400.0 * 10)  # ten half-lives later: old samples weigh 1/1024
    >>> round(h.percentile(0.95), 3)
    0.216
    """

    def __init__(
        self, first_bucket: float, ratio: float, max_value: float, half_life: float
    ) -> None:
        self.first_bucket = first_bucket
        self.ratio = ratio
        self.half_life = half_life
        # Bucket i covers [start(i), start(i+1)), start(i) = first * (ratio^i - 1) / (ratio - 1).
        top = math.log(max_value * (ratio - 1) / first_bucket + 1, ratio)
        self.n_buckets = int(math.ceil(top)) + 1
        self.weights = [0.0] * self.n_buckets
        self.reference: float | None = None
        self.total = 0.0

    def bucket_start(self, i: int) -> float:
        if i <= 0:
            return 0.0
        return self.first_bucket * (self.ratio**i - 1) / (self.ratio - 1)

    def bucket_of(self, value: float) -> int:
        if value < self.first_bucket:
            return 0
        i = int(math.floor(math.log(value * (self.ratio - 1) / self.first_bucket + 1, self.ratio)))
        return min(max(i, 0), self.n_buckets - 1)

    def _rescale(self, new_reference: float) -> None:
        factor = 2.0 ** (((self.reference or 0.0) - new_reference) / self.half_life)
        self.weights = [w * factor for w in self.weights]
        self.total *= factor
        self.reference = new_reference

    def add(self, value: float, weight: float, t: float) -> None:
        if self.reference is None:
            self.reference = t
        # Keep exponents small: move the reference forward once weights grow past 2^50.
        if (t - self.reference) / self.half_life > 50:
            self._rescale(t)
        w = weight * 2.0 ** ((t - self.reference) / self.half_life)
        self.weights[self.bucket_of(value)] += w
        self.total += w

    def subtract(self, value: float, weight: float, t: float) -> None:
        """Undo an `add` of the same value, weight and time (VPA replaces a window's peak so)."""
        if self.reference is None:
            return
        w = weight * 2.0 ** ((t - self.reference) / self.half_life)
        i = self.bucket_of(value)
        self.weights[i] = max(0.0, self.weights[i] - w)
        self.total = max(0.0, self.total - w)

    def is_empty(self) -> bool:
        return self.total <= 0.0

    def percentile(self, p: float) -> float:
        """The upper end of the bucket where the cumulative weight reaches `p` of the total;
        0.0 when empty. p = 1.0 is the upper end of the highest non-empty bucket."""
        if self.total <= 0.0:
            return 0.0
        threshold = p * self.total
        running = 0.0
        last = 0
        for i, w in enumerate(self.weights):
            if w <= 0.0:
                continue
            running += w
            last = i
            if running >= threshold * (1 - 1e-12):
                return self.bucket_start(i + 1)
        return self.bucket_start(last + 1)


def cpu_histogram(half_life: float = HALF_LIFE_S) -> DecayingHistogram:
    """Buckets from 10 millicores growing by 1%, up to 1000 cores: the VPA's 5% buckets round
    every percentile up by 2.5% on average, which is pure slack."""
    return DecayingHistogram(first_bucket=0.01, ratio=1.01, max_value=1000.0, half_life=half_life)


def memory_histogram(half_life: float = HALF_LIFE_S) -> DecayingHistogram:
    """Buckets from 10 MB growing by 1%, up to 1 TB."""
    return DecayingHistogram(first_bucket=1e7, ratio=1.01, max_value=1e12, half_life=half_life)


# ---------------------------------------------------------------------------------------------
# GPU shapes

GpuModel = Literal["A100-40GB", "A100-80GB", "H100-80GB"]
GB = 10**9


@dataclass(frozen=True)
class MigProfile:
    name: str  # as in the resource name nvidia.com/mig-<name>
    slices: int  # compute slices of 7
    memory: int  # bytes: the decimal GB in the name, at or below what the profile really has
    per_gpu: int  # how many instances of this profile one GPU can hold


def _profiles(*specs: str) -> tuple[MigProfile, ...]:
    """Profiles from "<name>x<instances per GPU>", e.g. "1g.5gb x7"."""
    out = []
    for spec in specs:
        name, count = spec.split(" x")
        slices, mem = name.split(".")
        out.append(
            MigProfile(name, int(slices.rstrip("g")), int(mem.rstrip("gb")) * GB, int(count))
        )
    return tuple(out)


# NVIDIA MIG user guide, "Supported MIG Profiles" (the +me media variants size the same), with the
# most instances of each profile one GPU holds.
_MIG_80GB = _profiles(
    "1g.10gb x7", "1g.20gb x4", "2g.20gb x3", "3g.40gb x2", "4g.40gb x1", "7g.80gb x1"
)
MIG_PROFILES: dict[GpuModel, tuple[MigProfile, ...]] = {
    "A100-40GB": _profiles(
        "1g.5gb x7", "1g.10gb x4", "2g.10gb x3", "3g.20gb x2", "4g.20gb x1", "7g.40gb x1"
    ),
    "A100-80GB": _MIG_80GB,
    "H100-80GB": _MIG_80GB,
}
# A whole card's memory as NVML reports it (memory.total): an 80 GB H100 has 81559 MiB.
GPU_MEMORY: dict[GpuModel, int] = {
    "A100-40GB": 40960 * MiB, "A100-80GB": 81920 * MiB, "H100-80GB": 81559 * MiB
}  # fmt: skip
WHOLE_GPU = "nvidia.com/gpu"
# The NVIDIA device plugin's name for a time-sliced GPU when renameByDefault is on.
SHARED_GPU = "nvidia.com/gpu.shared"
_SIZE_IN_NAME = re.compile(r"(\d+)\s*GB")


def gpu_model_from_name(name: str | None, memory_bytes: float | None = None) -> GpuModel | None:
    """Map NVML's device name ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3") to a MIG table,
    or None where trimtab has no table for the card: only the 80 GB H100 (SXM5 "H100 80GB HBM3",
    "H100 PCIe") shares the A100-80GB profiles; the H100 NVL (94 GB), the 96 GB and 64 GB H100s,
    GH200 and H800 partition differently, and a wrong table suggests profiles the card lacks.

    >>> gpu_model_from_name("NVIDIA A100-SXM4-40GB"), gpu_model_from_name("NVIDIA H100 80GB HBM3")
    ('A100-40GB', 'H100-80GB')
    >>> gpu_model_from_name("NVIDIA A100-PCIE", 85e9), gpu_model_from_name("Tesla T4") is None
    ('A100-80GB', True)
    >>> gpu_model_from_name("NVIDIA H100 NVL") is None, gpu_model_from_name("NVIDIA H100 PCIe")
    (True, 'H100-80GB')
    """
    if not name:
        return None
    upper = name.upper()
    sizes = {int(m) for m in _SIZE_IN_NAME.findall(upper)}
    if "A100" in upper:
        big = 80 in sizes or (memory_bytes is not None and memory_bytes > 50 * GB)
        return "A100-80GB" if big else "A100-40GB"
    if not re.search(r"(^|[^A-Z])H100([^A-Z0-9]|$)", upper) or "NVL" in upper:
        return None
    if sizes:
        return "H100-80GB" if sizes == {80} else None
    # No size in the name ("NVIDIA H100 PCIe", "NVIDIA H100 SXM5"): the 80 GB card, unless the
    # memory NVML reports says otherwise (80 GB is 79-86e9 bytes as NVML counts it).
    if memory_bytes is not None and not 75 * GB <= memory_bytes <= 88 * GB:
        return None
    return "H100-80GB"


def current_gpu_slices(gpu_count: int, resource_name: str | None) -> int:
    """Compute slices (of 7 per GPU) the container has now: 7 per whole GPU, a MIG profile's."""
    name = resource_name or WHOLE_GPU
    if name.startswith("nvidia.com/mig-"):
        profile = name.removeprefix("nvidia.com/mig-").split(".")[0]
        return max(1, int(profile.rstrip("g") or 7)) * gpu_count
    return 7 * gpu_count


def suggest_gpu_shape(
    peak_memory: float,
    utilization_p95: float | None,
    current_slices: int,
    policy: GpuPolicy,
    model: GpuModel | None,
) -> GpuShape:
    """The smallest GPU allocation that holds `peak_memory` (plus headroom) and the compute the
    container used (p95 utilization of what it has now, plus headroom).

    Worked examples (headroom 10%, sharing below 30% of one GPU):
      - 7 GB peak, 12% of a whole H100 busy -> needs 7.7 GB and 0.9 of 7 slices: mig-1g.10gb
      - 7 GB peak, 20% busy -> 1.5 slices: mig-2g.20gb (the smallest with two slices)
      - 30 GB peak, 60% busy on an A100-80GB -> 33 GB and 4.6 slices: mig-7g.80gb is a whole GPU,
        so "1 x nvidia.com/gpu"
      - 120 GB peak on H100s -> 132 GB: 2 whole GPUs
      - 6 GB peak, 10% busy, GPU model unknown -> no MIG table, and no known capacity to share
        safely (time-slicing isolates no memory): 1 whole GPU, saying so
      - 4 GPUs (data or tensor parallel), 16 GB and 5% busy in all -> whole GPUs only: one
        process per GPU is the program's shape, not a slice of one
      - 77 GB peak on one H100 (vLLM reserves 90% of the card up front) -> 1 whole GPU: what it
        used on the GPU it has fits that GPU; headroom cannot ask for more than the card
      - 4 GPUs of a model without a table, 360 GB -> 4: without a card's capacity the memory
        cannot be judged, so never fewer GPUs than it has
    """
    needed_memory = peak_memory * (1 + policy.headroom)
    # Without utilization samples (MIG devices have none) keep the compute it has now.
    needed_slices = (
        utilization_p95 * current_slices * (1 + policy.headroom)
        if utilization_p95 is not None
        else float(current_slices)
    )
    low_use = (
        utilization_p95 is not None
        and needed_slices < policy.sharing_utilization_threshold * 7
        and policy.allow_sharing
    )
    memory_text = format_bytes(needed_memory)
    gpu_memory = GPU_MEMORY[model] if model else None
    # A container on several GPUs runs one process (rank, shard) per GPU: NCCL refuses two
    # ranks on one device, and tensor parallelism is set in its arguments. Whole GPUs only.
    multi_gpu = current_slices > 7
    gpus_now = current_slices // 7  # whole GPUs it has (0 on a MIG slice)

    if gpu_memory is not None and needed_memory > gpu_memory:
        by_memory = math.ceil(needed_memory / gpu_memory)
        why = f"peak GPU memory {memory_text} with headroom needs {by_memory} x {model}"
        if gpus_now and by_memory > gpus_now and peak_memory <= gpu_memory * gpus_now:
            # The peak fits the GPUs it has: a server that reserves a share of each card up
            # front (vLLM's 90%) reads close to capacity, which says nothing of needing more.
            by_memory = gpus_now
            why = (
                f"peak GPU memory {format_bytes(peak_memory)} fits the {gpus_now} x {model} it "
                "has (a server that reserves most of a card up front reads near its capacity)"
            )
        count = max(by_memory, math.ceil(needed_slices / 7))
        return GpuShape(
            kind="Whole",
            resource_name=WHOLE_GPU,
            count=count,
            memory=format_bytes(gpu_memory),
            reason=f"{why}: {count} whole GPU(s)",
        )
    if model is not None and policy.allow_mig and not multi_gpu:
        fits = [
            p
            for p in MIG_PROFILES[model]
            if p.memory >= needed_memory and p.slices >= needed_slices and p.slices < 7
        ]
        if fits:
            best = min(fits, key=lambda p: (p.slices, p.memory))
            share = (
                f"; utilization p95 {utilization_p95:.0%}: a time-sliced GPU would also do"
                if low_use and utilization_p95 is not None
                else ""
            )
            return GpuShape(
                kind="Mig",
                resource_name=f"nvidia.com/mig-{best.name}",
                count=1,
                memory=format_bytes(best.memory),
                reason=f"peak GPU memory {memory_text} and {needed_slices:.1f} of 7 compute "
                f"slices fit MIG {best.name} on {model} ({best.per_gpu} per GPU){share}",
            )
    # Say why MIG was not considered when it was allowed: the card is not one trimtab has a
    # profile table for (spec.rightsizing.gpu.gpuModel names it when the metrics do not).
    no_table = "; no MIG table for this GPU model" if model is None and policy.allow_mig else ""
    if low_use and gpu_memory is None and not multi_gpu:
        # Time-slicing isolates no memory: without the card's capacity a co-tenant could run it
        # out of memory, so sharing is suggested only on a card trimtab knows.
        no_table += " and no known capacity to share it safely (set rightsizing.gpu.gpuModel)"
    if low_use and not multi_gpu and gpu_memory is not None and needed_memory <= gpu_memory / 2:
        busy = f"{utilization_p95:.0%}" if utilization_p95 is not None else "unknown"
        return GpuShape(
            kind="TimeSliced",
            resource_name=SHARED_GPU,
            count=1,
            memory=memory_text,
            reason=f"utilization p95 {busy} of {current_slices / 7:g} GPU(s) and peak GPU memory "
            f"{memory_text}: sharing a GPU would do{no_table}",
        )
    count = max(1, math.ceil(needed_slices / 7))
    if multi_gpu and gpu_memory is None and count < gpus_now:
        # Without a card's capacity the memory cannot be judged: fewer GPUs might not hold it.
        count = gpus_now
        no_table += f"; without the card's memory size, not fewer than its {gpus_now}"
    fewer = (
        f"; on fewer GPUs than its {gpus_now} the program's parallelism (ranks, "
        "tensor-parallel size) must change too"
        if multi_gpu and count < gpus_now
        else ""
    )
    return GpuShape(
        kind="Whole",
        resource_name=WHOLE_GPU,
        count=count,
        memory=format_bytes(gpu_memory) if gpu_memory else memory_text,
        reason=f"peak GPU memory {memory_text} and {needed_slices:.1f} of 7 compute slices "
        f"need {count} whole GPU(s){no_table}{fewer}",
    )


# ---------------------------------------------------------------------------------------------
# CPU and memory

Sample = tuple[float, float]  # (unix seconds, value)


@dataclass(frozen=True)
class ContainerUsage:
    """Usage of one container (all replicas, all revisions) over the window.

    cpu: cores per sample; memory: working-set bytes, the max over each step; oom_kills: the
    times of OOM kills and the memory the container had then (its limit when known);
    memory_at_limit: the steps at which a pod's working set reached its memory limit (within
    LIMIT_BOUND_RATIO) without a kill, with that limit."""

    container: str
    step_seconds: float
    cpu: Sequence[Sample] = ()
    memory: Sequence[Sample] = ()
    oom_kills: Sequence[Sample] = ()
    memory_at_limit: Sequence[Sample] = ()
    gpu_memory: Sequence[Sample] = ()
    gpu_utilization: Sequence[Sample] = ()
    gpu_model: GpuModel | None = None
    # Series a recommendation needs but the metrics source did not have; named in the condition.
    missing_series: tuple[str, ...] = ()
    # GPU series that were absent: CPU and memory are still recommended, the GPU shape is not.
    missing_gpu_series: tuple[str, ...] = ()


@dataclass(frozen=True)
class CurrentResources:
    """What a container runs with now, in numbers."""

    cpu: float | None = None
    memory: float | None = None
    cpu_limit: float | None = None
    memory_limit: float | None = None
    gpu: int = 0
    gpu_resource_name: str | None = None

    @classmethod
    def from_spec(cls, res: Resources) -> CurrentResources:
        def num(q: str | None) -> float | None:
            return float(parse_quantity(q)) if q else None

        return cls(
            cpu=num(res.cpu),
            memory=num(res.memory),
            cpu_limit=num(res.cpu_limit),
            memory_limit=num(res.memory_limit) or num(res.memory),
            gpu=res.gpu,
            gpu_resource_name=res.gpu_resource_name,
        )

    def to_status(self) -> ResourceAmounts:
        return ResourceAmounts(
            cpu=format_cpu(self.cpu) if self.cpu else None,
            memory=format_bytes(self.memory) if self.memory else None,
            cpu_limit=format_cpu(self.cpu_limit) if self.cpu_limit else None,
            memory_limit=format_bytes(self.memory_limit) if self.memory_limit else None,
            gpu=self.gpu or None,
            gpu_resource_name=self.gpu_resource_name if self.gpu else None,
        )


@dataclass(frozen=True)
class Policy:
    """RightsizingSpec with defaults filled in and quantities as numbers."""

    window_s: float
    cpu_percentile: float = DEFAULT_CPU_PERCENTILE
    cpu_headroom: float = DEFAULT_CPU_HEADROOM
    memory_percentile: float = DEFAULT_MEMORY_PERCENTILE
    memory_headroom: float = DEFAULT_MEMORY_HEADROOM
    cpu_min: float = MIN_CPU
    cpu_max: float | None = None
    memory_min: float = MIN_MEMORY
    memory_max: float | None = None
    min_change: float = 0.10
    gpu: GpuPolicy = field(default_factory=GpuPolicy)
    half_life_s: float = HALF_LIFE_S

    @classmethod
    def from_spec(cls, spec: RightsizingSpec) -> Policy:
        def num(q: str | None) -> float | None:
            return float(parse_quantity(q)) if q else None

        return cls(
            window_s=parse_duration(spec.window),
            cpu_percentile=spec.cpu.percentile or DEFAULT_CPU_PERCENTILE,
            cpu_headroom=(
                spec.cpu.headroom if spec.cpu.headroom is not None else DEFAULT_CPU_HEADROOM
            ),
            memory_percentile=spec.memory.percentile or DEFAULT_MEMORY_PERCENTILE,
            memory_headroom=(
                spec.memory.headroom
                if spec.memory.headroom is not None
                else DEFAULT_MEMORY_HEADROOM
            ),
            cpu_min=max(MIN_CPU, num(spec.cpu.min) or 0.0),
            cpu_max=num(spec.cpu.max),
            memory_min=max(MIN_MEMORY, num(spec.memory.min) or 0.0),
            memory_max=num(spec.memory.max),
            min_change=spec.min_change,
            gpu=spec.gpu,
        )


def parse_duration(text: str) -> float:
    """Seconds in "1h30m", "168h", "500ms".

    >>> parse_duration("1h30m"), parse_duration("168h"), parse_duration("500ms")
    (5400.0, 604800.0, 0.5)
    """
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total, number = 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit():
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in units or not number:
            raise ValueError(f"not a duration: {text!r}")
        total += int(number) * units[unit]
        number = ""
        i += len(unit)
    if number:
        raise ValueError(f"not a duration: {text!r}")
    return total


@dataclass(frozen=True)
class Recommendation:
    """recommend_resources' answer for one container; numbers in cores and bytes."""

    container: str
    state: RecommendationState
    message: str
    current: CurrentResources
    cpu: float | None = None
    memory: float | None = None
    gpu_shape: GpuShape | None = None
    samples: int = 0
    expected_samples: int = 0
    confidence: float = 0.0
    oom_kills: int = 0
    peak_cpu: float | None = None
    peak_memory: float | None = None
    peak_gpu_memory: float | None = None
    gpu_utilization_p95: float | None = None
    missing_series: tuple[str, ...] = ()
    policy: Policy | None = None
    # Set when the CPU request was capped (at the CPU limit): why, in a sentence.
    cpu_capped: str = ""

    def resources(self) -> CurrentResources | None:
        """The container's resources with this recommendation applied: memory limit = request,
        CPU limit left as it was (none by default), GPUs unchanged (shapes are only suggested)."""
        if self.state != "Recommended" or self.cpu is None or self.memory is None:
            return None
        return CurrentResources(
            cpu=self.cpu,
            memory=self.memory,
            cpu_limit=self.current.cpu_limit,
            memory_limit=self.memory,
            gpu=self.current.gpu,
            gpu_resource_name=self.current.gpu_resource_name,
        )

    def to_status(self, window: str) -> ContainerRecommendation:
        p = self.policy
        applied = self.resources()
        basis = (
            RecommendationBasis(
                window=window,
                samples=self.samples,
                expected_samples=self.expected_samples,
                cpu_percentile=p.cpu_percentile,
                memory_percentile=p.memory_percentile,
                cpu_headroom=p.cpu_headroom,
                memory_headroom=p.memory_headroom,
                confidence=round(self.confidence, 3),
                oom_kills=self.oom_kills,
                peak_cpu=format_cpu(self.peak_cpu) if self.peak_cpu else None,
                peak_memory=format_bytes(self.peak_memory) if self.peak_memory else None,
                peak_gpu_memory=(
                    format_bytes(self.peak_gpu_memory) if self.peak_gpu_memory else None
                ),
                gpu_utilization_p95=(
                    round(self.gpu_utilization_p95, 3)
                    if self.gpu_utilization_p95 is not None
                    else None
                ),
                cpu_capped=self.cpu_capped or None,
            )
            if p is not None
            else None
        )
        return ContainerRecommendation(
            container=self.container,
            state=self.state,
            message=self.message,
            current=self.current.to_status(),
            recommended=applied.to_status() if applied else None,
            basis=basis,
            gpu_shape=self.gpu_shape,
            missing_series=list(self.missing_series),
        )


def _in_window(samples: Iterable[Sample], start: float, now: float) -> list[Sample]:
    return [(t, v) for t, v in samples if start < t <= now and math.isfinite(v) and v >= 0]


def interval_peaks(samples: Iterable[Sample], interval: float) -> list[Sample]:
    """The max of each `interval`-long bucket, stamped with the bucket's start.

    >>> interval_peaks([(0, 1.0), (10, 3.0), (3600, 2.0)], 3600)
    [(0.0, 3.0), (3600.0, 2.0)]
    """
    peaks: dict[float, float] = {}
    for t, v in samples:
        start = math.floor(t / interval) * interval
        peaks[start] = max(v, peaks.get(start, v))
    return sorted((float(k), v) for k, v in peaks.items())


def oom_floor(oom_kills: Iterable[Sample]) -> float:
    """The least memory that avoids a repeat of the OOM kills given (time, memory at the kill).

    A kill says only that the container wanted more than it had, not how much more. The first
    bump is the VPA's (1.2x, or +100 MiB, whichever is more); a kill within an hour of the
    previous one, at a higher limit, means the bump was too small, so the ratio squares each
    time (1.2, 1.44, 2.07, capped at 2.5): a step change costs two or three kills, not one per
    20%. Kills at the same limit (a crash loop before any bump was applied) tell no more than
    the first: they do not chain.

    >>> oom_floor([(0.0, 1000 * MiB)]) / MiB
    1200.0
    >>> oom_floor([(0.0, 200 * MiB)]) / MiB
    300.0
    >>> round(oom_floor([(0.0, 1000 * MiB), (600.0, 1200 * MiB)]) / MiB)
    1728
    >>> oom_floor([(0.0, 1000 * MiB), (300.0, 1000 * MiB), (600.0, 1000 * MiB)]) / MiB
    1200.0
    >>> crash_loop = [(0.0, 1000 * MiB), (1500.0, 1000 * MiB), (3000.0, 1000 * MiB)]
    >>> round(oom_floor([*crash_loop, (3700.0, 1200 * MiB)]) / MiB)
    1728
    """
    floor = 0.0
    ratio = OOM_BUMP_RATIO
    previous: Sample | None = None
    for t, memory in sorted(oom_kills):
        if previous is not None and t - previous[0] <= OOM_CHAIN_S and memory <= previous[1]:
            # The same limit killed again: the bump for it is not tried yet. The chain runs
            # from this latest kill, so a crash loop longer than the hour still chains.
            previous = (t, previous[1])
            continue
        chained = previous is not None and t - previous[0] <= OOM_CHAIN_S
        ratio = min(ratio * ratio, OOM_MAX_BUMP_RATIO) if chained else OOM_BUMP_RATIO
        floor = max(floor, memory * ratio, memory + OOM_MIN_BUMP)
        previous = (t, memory)
    return floor


def _clamp(value: float, low: float, high: float | None) -> float:
    value = max(value, low)
    return min(value, high) if high is not None else value


def cpu_target(samples: Sequence[Sample], policy: Policy) -> float:
    """The CPU percentile of a decaying histogram of the samples (each weighs 1 at its time)."""
    hist = cpu_histogram(policy.half_life_s)
    for t, v in samples:
        hist.add(v, 1.0, t)
    return hist.percentile(policy.cpu_percentile)


def memory_target(samples: Sequence[Sample], policy: Policy) -> float:
    """The memory percentile of the hourly peaks of `samples` (the window's, as
    recommend_resources trims them; decayed, for a percentile below 1.0). Every peak in the
    window counts, however old: memory is not compressible, so a weekly peak must still be
    covered six days later, and `window` is what says how far back a peak matters (168h: a
    week's peaks; 72h: a level left three days ago is forgotten)."""
    peaks = interval_peaks(samples, PEAK_INTERVAL_S)
    if policy.memory_percentile >= 1.0:
        return max(v for _, v in peaks)
    hist = memory_histogram(policy.half_life_s)
    for t, v in peaks:
        hist.add(v, 1.0, t)
    return hist.percentile(policy.memory_percentile)


def limit_bound(
    memory: Sequence[Sample], at_limit: Sequence[Sample]
) -> tuple[list[Sample], float]:
    """The memory samples to size from with headroom, and the limit that peaks at the limit hold.

    A working set at its memory limit without an OOM kill is the kernel reclaiming page cache
    (weights read through mmap, files written) to stay under the limit: what the container needs
    is at most that limit, and headroom on top would raise the limit, which the cache then
    fills, and so on without end (a ratchet). Such a step holds memory at its limit (no less:
    how much of it is cache is unknown) and adds no headroom; a step whose working set is above
    the limit named there came from another pod and counts as usual.

    >>> GB = 1e9
    >>> limit_bound([(0.0, 1.0 * GB), (300.0, 1.99 * GB)], [(300.0, 2.0 * GB)])
    ([(0.0, 1000000000.0)], 2000000000.0)
    >>> limit_bound([(300.0, 3.0 * GB)], [(300.0, 2.0 * GB)])  # another pod's peak
    ([(300.0, 3000000000.0)], 2000000000.0)
    """
    limits = dict(at_limit)
    kept = [(t, v) for t, v in memory if t not in limits or v > limits[t]]
    return kept, max(limits.values(), default=0.0)


def _answer_kills(
    base: Recommendation,
    cpu: Sequence[Sample],
    memory: Sequence[Sample],
    ooms: Sequence[Sample],
    policy: Policy,
    short: str,
) -> Recommendation:
    """OOM kills in a history too short to size from: memory rises for them at once (a new
    workload killed in its first hours would otherwise be killed again, attempt after attempt,
    until a day of samples came in); CPU stays as it is, which the kills say nothing about (set
    from the samples there are only when the container has no CPU request)."""
    memory_value = max(max((v for _, v in memory), default=0.0), oom_floor(ooms))
    memory_value *= 1 + policy.memory_headroom
    memory_value = _clamp(memory_value, policy.memory_min, policy.memory_max)
    memory_value = float(parse_quantity(format_bytes(memory_value)))
    cpu_value = base.current.cpu
    if cpu_value is None:
        if not cpu:
            return replace(base, message=short)
        cpu_value = _clamp(
            cpu_target(cpu, policy) * (1 + policy.cpu_headroom), policy.cpu_min, policy.cpu_max
        )
        cpu_value = float(parse_quantity(format_cpu(cpu_value)))
    return replace(
        base,
        state="Recommended",
        message=(
            f"memory {format_bytes(memory_value)} after {len(ooms)} OOM kill(s); "
            f"cpu {format_cpu(cpu_value)} kept: {short}"
        ),
        cpu=cpu_value,
        memory=memory_value,
        peak_cpu=max((v for _, v in cpu), default=None),
        peak_memory=max((v for _, v in memory), default=None),
    )


def recommend_resources(
    usage: ContainerUsage, current: CurrentResources, policy: Policy, now: float
) -> Recommendation:
    """Requests for one container from its usage over `policy.window_s` before `now`.

    CPU request: the CPU percentile (default p95) of a decaying histogram (24 h half-life),
    plus headroom (default 5%); no CPU limit is added (a CPU limit already set caps the request).
    Memory request and limit: the highest hourly working-set peak of the window (default
    percentile 1.0), plus headroom (default 10%), and never less than 1.2x (or +100 MiB) the
    limit of an OOM kill in the window. Bounds from the spec clamp both. GPUs: see
    `suggest_gpu_shape`.

    Worked examples (window 168h, 5-minute samples, so 2016 expected and 288 needed):
      - 100 samples -> InsufficientData, "insufficient data (100 of 288 samples)", nothing set
      - the same with an OOM kill at a 2 GiB limit -> memory 2.64 GiB (the 1.2x bump, +10%),
        CPU as it is: a kill is answered at once, however short the history
      - a week at 0.5 cores, peaks 1.0, 2 GiB steady -> cpu ~0.53 (p95 of the samples, +5%),
        memory 2.2 GiB (2 GiB peak +10%), confidence 1.0
      - the same with an OOM kill at a 2 GiB limit -> memory >= 2.4 GiB (the bump)
      - no working-set series -> MissingMetrics naming container_memory_working_set_bytes
    """
    start = now - policy.window_s
    cpu = _in_window(usage.cpu, start, now)
    memory = _in_window(usage.memory, start, now)
    ooms = _in_window(usage.oom_kills, start, now)
    step = max(usage.step_seconds, 1.0)
    expected = max(1, int(policy.window_s // step))
    # A day of samples, or for a window of a day or less 90% of it: a missed scrape or a
    # Prometheus restart must not keep a short window from ever being covered.
    needed = max(1, int(min(policy.window_s * MIN_COVERAGE, MIN_HISTORY_S) // step))
    samples = min(len(cpu), len(memory)) if cpu and memory else max(len(cpu), len(memory))
    span = (cpu[-1][0] - cpu[0][0] + step) if cpu else 0.0
    confidence = min(1.0, samples / expected, span / policy.window_s)
    base = Recommendation(
        container=usage.container,
        state="InsufficientData",
        message="",
        current=current,
        samples=samples,
        expected_samples=expected,
        confidence=confidence,
        oom_kills=len(ooms),
        missing_series=usage.missing_series + usage.missing_gpu_series,
        policy=policy,
    )

    if usage.missing_series:
        return replace(
            base,
            state="MissingMetrics",
            message="no data for " + ", ".join(base.missing_series),
        )
    if samples < needed:
        short = f"insufficient data ({samples} of {needed} samples)"
        if ooms:
            return _answer_kills(base, cpu, memory, ooms, policy, short)
        return replace(base, message=short)

    cpu_value = cpu_target(cpu, policy) * (1 + policy.cpu_headroom)
    cpu_value = _clamp(cpu_value, policy.cpu_min, policy.cpu_max)
    # Every kill in the window holds memory up, as every peak does: each is valued at the limit
    # it happened at, so one already answered by a raise asks for no more than that raise.
    at_limit = _in_window(usage.memory_at_limit, start, now)
    sized, held = limit_bound(memory, at_limit)
    memory_value = max(memory_target(sized, policy) if sized else 0.0, oom_floor(ooms))
    memory_value *= 1 + policy.memory_headroom
    held_at_limit = held >= memory_value
    memory_value = max(memory_value, held)
    memory_value = _clamp(memory_value, policy.memory_min, policy.memory_max)
    # Round as the API server would write them, so status and the next revision agree.
    cpu_value = float(parse_quantity(format_cpu(cpu_value)))
    memory_value = float(parse_quantity(format_bytes(memory_value)))
    # A request above the container's CPU limit is rejected by the API server: cap it, and say
    # that usage at the limit means throttling, which only a higher limit (the user's) cures.
    cpu_capped = ""
    if current.cpu_limit and cpu_value > current.cpu_limit:
        cpu_capped = (
            f"capped at the CPU limit {format_cpu(current.cpu_limit)} (usage asks "
            f"{format_cpu(cpu_value)}); the container is throttled, raise the limit"
        )
        cpu_value = current.cpu_limit

    gpu_shape = None
    peak_gpu = None
    util_p95 = None
    gpu_mem = _in_window(usage.gpu_memory, start, now)
    if current.gpu and gpu_mem:
        peak_gpu = max(v for _, v in gpu_mem)
        utils = sorted(v for _, v in _in_window(usage.gpu_utilization, start, now))
        util_p95 = utils[min(len(utils) - 1, int(0.95 * len(utils)))] if utils else None
        model = policy.gpu.gpu_model or usage.gpu_model
        gpu_shape = suggest_gpu_shape(
            peak_gpu,
            util_p95,
            current_gpu_slices(current.gpu, current.gpu_resource_name),
            policy.gpu,
            model,
        )
    parts = [f"cpu {format_cpu(cpu_value)}", f"memory {format_bytes(memory_value)}"]
    if cpu_capped:
        parts[0] += f" ({cpu_capped})"
    if ooms:
        parts.append(f"after {len(ooms)} OOM kill(s)")
    if held_at_limit:
        parts.append(
            f"memory held at the limit {format_bytes(held)} its working set reached without an "
            "OOM kill (page cache the kernel reclaims; no headroom on top)"
        )
    if gpu_shape is not None:
        parts.append(f"GPU {gpu_shape.count} x {gpu_shape.resource_name}")
    elif current.gpu and usage.missing_gpu_series:
        parts.append("no GPU shape: no data for " + ", ".join(usage.missing_gpu_series))
    return replace(
        base,
        state="Recommended",
        message=", ".join(parts),
        cpu=cpu_value,
        memory=memory_value,
        cpu_capped=cpu_capped,
        gpu_shape=gpu_shape,
        peak_cpu=max(v for _, v in cpu),
        peak_memory=max(v for _, v in memory),
        peak_gpu_memory=peak_gpu,
        gpu_utilization_p95=util_p95,
    )


# ---------------------------------------------------------------------------------------------
# Acting on a recommendation


def relative_change(current: float | None, recommended: float | None) -> float:
    """|recommended - current| / current; infinite when there is no current value.

    >>> relative_change(1.0, 1.2), relative_change(None, 1.0)
    (0.19999999999999996, inf)
    """
    if recommended is None:
        return 0.0
    if not current:
        return math.inf
    return abs(recommended - current) / current


def moved(rec: Recommendation, min_change: float) -> bool:
    """True when CPU or memory moves by more than `min_change` of what the container has now
    (10% by default): worth an Event, and in Auto mode a new revision.

    >>> r = Recommendation("c", "Recommended", "", CurrentResources(cpu=1.0, memory=1e9),
    ...                    cpu=1.05, memory=1.2e9)
    >>> moved(r, 0.10), moved(r, 0.25)
    (True, False)

    A raise of memory for an OOM kill at the limit it has now (the bump, 1.2x or +100 MiB) moves
    it whatever `min_change` says: the pod would be killed again at the same limit.

    >>> from dataclasses import replace
    >>> killed = replace(r, memory=1.2e9, oom_kills=1)
    >>> moved(killed, 0.5), moved(replace(killed, oom_kills=0), 0.5)
    (True, False)
    """
    if rec.state != "Recommended":
        return False
    now = rec.current.memory
    if rec.oom_kills and now and rec.memory is not None:
        bump = max(now * OOM_BUMP_RATIO, now + OOM_MIN_BUMP)
        if rec.memory >= bump * (1 - 1e-9):
            return True
    return (
        relative_change(rec.current.cpu, rec.cpu) > min_change
        or relative_change(rec.current.memory, rec.memory) > min_change
    )


def moved_since(
    previous: ContainerRecommendation | None, rec: Recommendation, min_change: float
) -> bool:
    """True when the recommendation differs by more than `min_change` from the one the last
    Event told (`announced`), or none was told yet: with `moved` (a move of that much from what
    the container has), an Event is posted once per move, not on every timer tick, and a
    recommendation that drifts a little each pass is told again once it has moved that far.

    >>> from trimtab.api.rightsizing import ResourceAmounts as A
    >>> told = ContainerRecommendation(container="c", state="Recommended",
    ...     recommended=A(cpu="1300m", memory="1Gi"), announced=A(cpu="1200m", memory="1Gi"))
    >>> r = Recommendation("c", "Recommended", "", CurrentResources(cpu=1.0, memory=2**30),
    ...                    cpu=1.4, memory=2**30)
    >>> moved_since(told, r, 0.10), moved_since(told, replace(r, cpu=1.3), 0.10)
    (True, False)
    """
    if rec.state != "Recommended":
        return False
    prev = previous.announced if previous is not None else None
    if prev is None:
        return True

    def num(q: str | None) -> float | None:
        return float(parse_quantity(q)) if q else None

    return (
        relative_change(num(prev.cpu), rec.cpu) > min_change
        or relative_change(num(prev.memory), rec.memory) > min_change
    )


def resources_with(spec: Resources, applied: ResourceAmounts) -> Resources:
    """spec.resources with an applied recommendation's CPU and memory (GPUs stay as specified).
    The CPU request never exceeds spec's CPU limit, which the API server would reject.

    >>> r = resources_with(Resources(cpu="1", cpu_limit="2"), ResourceAmounts(cpu="2100m"))
    >>> r.cpu, r.cpu_limit
    ('2', '2')
    """
    cpu = applied.cpu or spec.cpu
    if cpu and spec.cpu_limit and parse_quantity(cpu) > parse_quantity(spec.cpu_limit):
        cpu = spec.cpu_limit
    return spec.model_copy(
        update={
            "cpu": cpu,
            "memory": applied.memory or spec.memory,
            "memory_limit": applied.memory_limit or applied.memory or spec.memory_limit,
        }
    )


def resources_hash(spec: Resources) -> str:
    """A short hash of spec.resources as on the wire, to notice a user's edit."""
    canonical = json.dumps(spec.to_wire(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def effective_resources(
    spec: Resources, mode: str, recommendations: RecommendationsStatus | None
) -> Resources:
    """The resources pods should run with: spec.resources, or in Auto mode the applied
    recommendation from status as long as spec.resources has not been edited since (a user's
    edit wins until the next recommendation moves).

    Worked examples:
      - mode Recommend, anything applied    -> spec.resources
      - mode Auto, applied for this spec    -> spec.resources with the applied cpu and memory
      - mode Auto, spec.resources edited    -> spec.resources (the hash no longer matches)
    """
    if mode != "Auto" or recommendations is None or recommendations.applied is None:
        return spec
    if recommendations.applied.spec_resources_hash != resources_hash(spec):
        return spec
    return resources_with(spec, recommendations.applied.resources)


def _recommendations(status: Mapping[str, Any] | None) -> RecommendationsStatus | None:
    raw = (status or {}).get("recommendations")
    return RecommendationsStatus.model_validate(raw) if raw else None


def effective_spec(
    spec: ModelDeploymentSpec, status: Mapping[str, Any] | None
) -> ModelDeploymentSpec:
    """The spec pods run with: `spec` with `effective_resources` in place of spec.resources.
    Reconcile and status must both take the revision from this, so an applied recommendation
    is a new revision that goes through the normal rollout."""
    recs = _recommendations(status)
    resources = effective_resources(spec.resources, spec.rightsizing.mode, recs)
    if resources == spec.resources:
        return spec
    return spec.model_copy(update={"resources": resources})


# ---------------------------------------------------------------------------------------------
# TrainingJob workers

# A kill the operator saw (status.lastFailure) and one Prometheus saw are the same when
# Prometheus' is this close after it: kube-state-metrics is scraped every 30-60 s.
KILL_MATCH_S = 120.0


def effective_training_spec(
    spec: TrainingJobSpec, status: Mapping[str, Any] | None
) -> TrainingJobSpec:
    """The spec the NEXT attempt's Job is built from: `spec` with `effective_resources` in
    place of spec.resources. A Job's pod template is immutable and a running job is never
    restarted only to resize, so an applied recommendation waits for the next Job the operator
    creates anyway (after a failure, or on resume after a suspend).

    Worked examples (spec.resources cpu 4, memory 32Gi; applied cpu 1500m, memory 12Gi):
      - mode Recommend                     -> spec unchanged
      - mode Auto, applied for this spec   -> cpu 1500m, memory 12Gi, memoryLimit 12Gi
      - mode Auto, spec.resources edited   -> spec unchanged (the user's edit wins)
      - mode Auto, nothing applied yet     -> spec unchanged
    """
    resources = effective_resources(
        spec.resources, spec.rightsizing.mode, _recommendations(status)
    )
    if resources == spec.resources:
        return spec
    return spec.model_copy(update={"resources": resources})


def worker_resources(spec: TrainingJobSpec) -> CurrentResources:
    """What one worker container requests: CPU and memory from spec.resources, GPUs from
    gpusPerWorker (a TrainingJob's resources.gpu is always 0).

    >>> s = TrainingJobSpec.model_validate({"image": "i", "command": ["t.py"], "workers": 4,
    ...     "gpusPerWorker": 8, "resources": {"cpu": "16", "memory": "64Gi"}})
    >>> r = worker_resources(s); (r.cpu, r.memory / GiB, r.gpu, r.gpu_resource_name)
    (16.0, 64.0, 8, 'nvidia.com/gpu')
    """
    return replace(
        CurrentResources.from_spec(spec.resources),
        gpu=spec.gpus_per_worker,
        gpu_resource_name=spec.gpu_resource if spec.gpus_per_worker else None,
    )


def with_failure_kill(usage: ContainerUsage, failure: WorkerFailure | None) -> ContainerUsage:
    """`usage` with the TrainingJob's last worker failure added as an OOM kill when it was one
    and Prometheus did not see it. A Job's pods are deleted when the attempt fails, often
    before kube-state-metrics scrapes the terminated pod, so the operator's own record of the
    failure is the one that does not get lost. The kill is valued at the memory limit the
    failed worker had (recorded in the failure), else the working set nearest the kill; never
    at the limit the next attempt gets, which a raise for this very kill has already moved.

    Worked examples (a kill at 12:00:00 of a worker with a 16 GiB limit):
      - lastFailure OOMKilled 12:00:00, Prometheus saw none   -> one kill at 12:00:00, 16 GiB
      - the same, Prometheus saw one at 12:00:45              -> still one kill (the same one)
      - the same, no limit recorded, 15 GiB working set then -> one kill at 12:00:00, 15 GiB
      - lastFailure reason Error (exit 1)                     -> usage unchanged
    """
    if failure is None or failure.reason != "OOMKilled" or not failure.time:
        return usage
    try:
        stamp = datetime.datetime.fromisoformat(failure.time.replace("Z", "+00:00"))
    except ValueError:
        return usage
    t = stamp.timestamp()
    match_s = max(KILL_MATCH_S, usage.step_seconds)
    if any(t - 1.0 <= seen <= t + match_s for seen, _ in usage.oom_kills):
        return usage
    at_kill = float(parse_quantity(failure.memory_limit)) if failure.memory_limit else None
    if at_kill is None:
        near = sorted(usage.memory, key=lambda p: abs(p[0] - t))
        if not near:
            return usage
        at_kill = near[0][1]
    return replace(usage, oom_kills=sorted([*usage.oom_kills, (t, at_kill)]))


# ---------------------------------------------------------------------------------------------
# In-place CPU: between revisions, running pods' CPU requests follow usage within the day

# What the pods use now: the busiest pod's peak over the last 15 minutes (three 5-minute steps).
IN_PLACE_RECENT_S = 15 * 60.0
# What they used at this time on earlier days, over the next 15 minutes: a rise that comes every
# afternoon is met before it starts, not one pass after.
IN_PLACE_AHEAD_S = 15 * 60.0
IN_PLACE_DAYS = 7
IN_PLACE_HEADROOM = 0.20
# A pod is resized up when the target is more than 5% above its request, and down only when it
# is more than 15% below: a raise is wanted at once, a cut can wait for a clear drop (noise in
# the usage would otherwise resize a steady workload several times a day for nothing).
IN_PLACE_MIN_RAISE = 0.05
IN_PLACE_MIN_CUT = 0.15


@dataclass(frozen=True)
class InPlaceCpu:
    """in_place_cpu's answer: the CPU request (cores) running pods should have now, or None
    when the revision sets no CPU request (there is nothing to resize under)."""

    request: float | None
    reason: str
    recent_peak: float | None = None
    same_time_peak: float | None = None
    days: int = 0


def in_place_cpu(
    samples: Sequence[Sample],
    now: float,
    ceiling: float | None,
    floor: float = MIN_CPU,
    step_s: float = 300.0,
) -> InPlaceCpu:
    """The CPU request running pods of a revision follow within the day: the larger of what the
    busiest pod used in the last 15 minutes and what it used in the next 15 minutes of earlier
    days (the median over up to 7 days of each day's peak there, so one day's burst does not
    hold the request up every day after), plus 20%, between `floor` and `ceiling` (the
    revision's own request, which the scheduler placed the pod with). With no recent usage it
    is the ceiling: never smaller blind.

    `samples` are the busiest pod's cores at each step, in time order (the right-sizing pass's
    CPU series).

    Worked examples (ceiling 2 cores):
      - last 15 min peak 0.5, earlier days 0.4 at this time   -> 0.6 (0.5 + 20%)
      - last 15 min 0.5, earlier days 1.5 in the next 15 min  -> 1.8 (the afternoon rise)
      - last 15 min 1.9                                       -> 2 (the ceiling)
      - no sample in the last 15 min (Prometheus lost them)   -> 2
      - ceiling None (the revision requests no CPU)           -> None
    """
    if ceiling is None:
        return InPlaceCpu(None, "the revision sets no CPU request")
    times = [t for t, _ in samples]

    def values(start: float, end: float) -> list[float]:
        """The usable values in (start, end]."""
        lo, hi = bisect.bisect_right(times, start), bisect.bisect_right(times, end)
        return [v for _, v in samples[lo:hi] if math.isfinite(v) and v >= 0]

    recent_since = now - max(IN_PLACE_RECENT_S, 2 * step_s)
    recent = values(recent_since, now)
    if not recent:
        return InPlaceCpu(
            ceiling,
            f"no CPU usage in the last {_minutes(now - recent_since)}: the revision's request",
        )
    recent_peak = max(recent)
    daily: list[float] = []
    for d in range(1, IN_PLACE_DAYS + 1):
        start = now - d * DAY
        then = values(start, start + IN_PLACE_AHEAD_S)
        if then:
            daily.append(max(then))
    same_time = sorted(daily)[len(daily) // 2] if daily else None
    level = max(recent_peak, same_time or 0.0)
    wanted = level * (1 + IN_PLACE_HEADROOM)
    request = min(max(wanted, floor), ceiling)
    why = f"{format_cpu(recent_peak)} in the last {_minutes(now - recent_since)}"
    if same_time is not None:
        why += (
            f", {format_cpu(same_time)} in the next {_minutes(IN_PLACE_AHEAD_S)} on earlier "
            f"days (median of {len(daily)})"
        )
    why += f", +{IN_PLACE_HEADROOM:.0%}"
    if wanted > ceiling:
        why += f"; capped at the revision's request {format_cpu(ceiling)}"
    return InPlaceCpu(request, why, recent_peak, same_time, len(daily))


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f}m"


def in_place_due(current: float | None, target: float) -> bool:
    """Whether a pod at `current` cores is resized to `target`: up by more than 5%, or down by
    more than 15%.

    >>> in_place_due(1.0, 1.04), in_place_due(1.0, 1.06), in_place_due(1.0, 0.9)
    (False, True, False)
    >>> in_place_due(1.0, 0.8), in_place_due(None, 0.5)
    (True, True)
    """
    if not current:
        return True
    if target >= current:
        return (target - current) / current > IN_PLACE_MIN_RAISE
    return (current - target) / current > IN_PLACE_MIN_CUT


@dataclass(frozen=True)
class PodCpuResize:
    """One pod to resize: its container's index in spec.containers and the requests."""

    pod: str
    index: int
    current: str
    target: str


@dataclass(frozen=True)
class CpuResizePlan:
    resizes: list[PodCpuResize] = field(default_factory=list)
    # Pods close enough to the target already (`in_place_due` is False).
    settled: list[str] = field(default_factory=list)
    # Pods left alone, with why (Guaranteed QoS, a resize policy that restarts, not running).
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Pods whose last resize the kubelet has not carried out: (pod, reason, message).
    pending: list[tuple[str, str, str]] = field(default_factory=list)


def resize_pending(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """Why the kubelet has not carried out a pod's resize yet: the PodResizePending condition's
    reason (Deferred: no room on the node now; Infeasible: never on this node) and message, or
    status.resize of Kubernetes before 1.33; None when nothing is pending."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodResizePending" and cond.get("status") == "True":
            return str(cond.get("reason") or "Pending"), str(cond.get("message") or "")
    legacy = status.get("resize")
    if legacy in ("Deferred", "Infeasible"):
        return str(legacy), ""
    return None


def plan_cpu_resizes(
    pods: Iterable[Mapping[str, Any]], container: str, target: float, exact: bool = False
) -> CpuResizePlan:
    """Which running pods get their `container`'s CPU request set to `target` in place.

    Left alone: a pod being deleted or not Running (it starts with the revision's request); a
    Guaranteed pod (its QoS class cannot change in place, and a request below its limit would);
    a container whose CPU resize policy restarts it (trimtab never restarts a pod to resize);
    a container without a CPU request (adding one changes the QoS class). A pod close enough to
    the target (`in_place_due`: 5% below it, 15% above it) is settled. Pending resizes are
    reported, not retried differently. `exact` (pods going back to their revision's request)
    resizes every pod not at the target: no hysteresis, since nothing follows afterwards.

    Worked examples (target 600m):
      - Running, request 2                         -> resize 2 -> 600m
      - Running, request 650m                      -> settled (8% above: a cut waits for 15%)
      - Running, request 560m                      -> resize (a raise of 7%)
      - Running, qosClass Guaranteed               -> skipped
      - Running, resizePolicy cpu RestartContainer -> skipped
      - Pending (not scheduled yet)                -> skipped
    """
    resizes: list[PodCpuResize] = []
    settled: list[str] = []
    skipped: list[tuple[str, str]] = []
    pending: list[tuple[str, str, str]] = []
    wanted = format_cpu(target)
    for pod in pods:
        meta = pod.get("metadata") or {}
        name = str(meta.get("name") or "")
        status = pod.get("status") or {}
        if meta.get("deletionTimestamp"):
            skipped.append((name, "being deleted"))
            continue
        if status.get("phase") != "Running":
            skipped.append((name, f"phase {status.get('phase') or 'unknown'}"))
            continue
        if status.get("qosClass") == "Guaranteed":
            skipped.append((name, "Guaranteed QoS class cannot change in place"))
            continue
        containers = (pod.get("spec") or {}).get("containers") or []
        index = next((i for i, c in enumerate(containers) if c.get("name") == container), None)
        if index is None:
            skipped.append((name, f"no container {container}"))
            continue
        spec_c = containers[index]
        restarts = any(
            p.get("resourceName") == "cpu" and p.get("restartPolicy") == "RestartContainer"
            for p in spec_c.get("resizePolicy") or []
        )
        if restarts:
            skipped.append((name, "its CPU resize policy restarts the container"))
            continue
        current = ((spec_c.get("resources") or {}).get("requests") or {}).get("cpu")
        if not current:
            skipped.append((name, "no CPU request"))
            continue
        waiting = resize_pending(pod)
        if waiting is not None:
            pending.append((name, *waiting))
        now_cpu = float(parse_quantity(str(current)))
        if abs(now_cpu - target) >= 0.0005 if exact else in_place_due(now_cpu, target):
            resizes.append(PodCpuResize(name, index, str(current), wanted))
        else:
            settled.append(name)
    return CpuResizePlan(resizes, settled, skipped, pending)


# Why a resize was refused (the handler's classification of the API server's answer), worst
# first, and the CPUResizedInPlace reason each gives.
IN_PLACE_REFUSALS = {"unsupported": "Unsupported", "forbidden": "Forbidden", "refused": "Refused"}


def in_place_verdict(
    target: InPlaceCpu, plan: CpuResizePlan, resized: int, refusals: Mapping[str, str]
) -> tuple[Literal["True", "False"], str, str]:
    """The CPUResizedInPlace condition (status, reason, message) after a pass that followed
    usage: `resized` of `plan.resizes` were accepted; `refusals` maps each kind of refusal
    (IN_PLACE_REFUSALS) to the first message of that kind.

    Worked examples (target 600m, one pod resized from 2):
      - accepted                                  -> True  Following "1 pod(s) at 600m: ..."
      - the API server has no pods/resize         -> False Unsupported (its message)
      - accepted, the kubelet defers it           -> False Deferred "1 pod(s) wait for ..."
      - accepted, a Guaranteed pod beside it      -> True  Following "...; 1 left alone (...)"
      - every pod Guaranteed (none can follow)    -> False NotResizable "3 pod(s) left ..."
    """
    for kind, reason in IN_PLACE_REFUSALS.items():
        if kind in refusals:
            return "False", reason, refusals[kind]
    if plan.pending:
        pod, reason, message = plan.pending[0]
        text = f"{len(plan.pending)} pod(s) wait for the kubelet, e.g. {pod}: {reason}"
        return "False", reason, text + (f" ({message})" if message else "")
    done = len(plan.settled) + resized
    if done == 0 and not plan.resizes and plan.skipped:
        pod, why = plan.skipped[0]
        return "False", "NotResizable", (
            f"no pod can follow usage in place: {len(plan.skipped)} pod(s) left alone, e.g. "
            f"{pod}: {why}"
        )
    cpu = format_cpu(target.request) if target.request is not None else "unset"
    skipped = f"; {len(plan.skipped)} left alone ({plan.skipped[0][1]})" if plan.skipped else ""
    return "True", "Following", f"{done} pod(s) at {cpu}: {target.reason}{skipped}"
