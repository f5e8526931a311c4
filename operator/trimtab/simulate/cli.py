"""`trimtab simulate` and `trimtab demo`: replay a request trace through trimtab's autoscaler
and the baselines, and print the scores (a table and a timeline, or JSON) and, for simulate
with matplotlib installed, write a PNG of load, replicas and p99 per policy.

Neither needs a cluster or a network; the demo uses the bundled example and Azure trace."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.simulate.compare import POLICIES, Scenario, Score, run_all
from trimtab.simulate.engine import RunResult
from trimtab.simulate.traces import Trace, bundled_trace, load_trace

EXAMPLE = "modeldeployment.yaml"
DEMO_TIME_SCALE = 4.0


def load_spec(text: str, source: str) -> ModelDeploymentSpec:
    docs = [d for d in yaml.safe_load_all(text) if d]
    mdeps = [d for d in docs if isinstance(d, dict) and d.get("kind") == "ModelDeployment"]
    if not mdeps:
        raise ValueError(f"{source}: no ModelDeployment in the file")
    return ModelDeploymentSpec.model_validate(mdeps[0].get("spec") or {})


def _parser(prog: str, demo: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    if not demo:
        parser.add_argument(
            "-f", "--filename", required=True, type=Path, help="ModelDeployment YAML"
        )
        parser.add_argument("--trace", required=True, type=Path, help="Azure LLM trace CSV")
        parser.add_argument(
            "--time-scale",
            type=float,
            default=1.0,
            help="replay the trace this many times faster (default 1)",
        )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for service-time jitter and phases"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    plots = parser.add_mutually_exclusive_group()
    plots.add_argument(
        "--plot",
        type=Path,
        help="write the PNG of load, replicas and p99 per policy here (needs the 'plot' extra)"
        + (
            ""
            if demo
            else "; by default TRACE.png in the working directory, when matplotlib is installed"
        ),
    )
    plots.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument(
        "--prefill", type=float, default=8000.0, help="prefill tokens/s per replica"
    )
    parser.add_argument("--decode", type=float, default=40.0, help="decode tokens/s per request")
    parser.add_argument(
        "--cold-start", type=float, help="simulated cold start (s); default from spec"
    )
    parser.add_argument(
        "--scrape-interval",
        type=float,
        default=None,
        help="Prometheus scrape (s); default: the spec's metrics.scrapeInterval (15s)",
    )
    return parser


def report_json(trace: Trace, scenario: Scenario, scores: dict[str, Score]) -> dict[str, Any]:
    return {
        "trace": trace.name,
        "requests": len(trace.requests),
        "duration_s": round(trace.duration, 1),
        "slo_p99_ms": scenario.slo.p99_latency_ms,
        "slo_latency": scenario.slo.latency,
        "policies": {name: score.to_json() for name, score in scores.items()},
    }


def _table(scores: dict[str, Score]) -> str:
    header = (
        f"{'policy':<12} {'SLO-viol s':>10} {'req>SLO':>8} {'replica-s':>10} "
        f"{'actions':>8} {'p99 s':>7}"
    )
    rows = [header, "-" * len(header)]
    for name, s in scores.items():
        p99 = f"{s.p99_latency_s:7.2f}" if math.isfinite(s.p99_latency_s) else "    inf"
        rows.append(
            f"{name:<12} {s.slo_violation_seconds:>10d} {s.requests_over_slo:>8.2%} "
            f"{s.replica_seconds:>10.0f} {s.scale_actions:>8d} {p99}"
        )
    return "\n".join(rows)


def _sparkline(values: list[float], top: float) -> str:
    marks = " .:-=+*#%@"
    if top <= 0:
        return " " * len(values)
    return "".join(
        marks[min(len(marks) - 1, math.ceil(v / top * (len(marks) - 1)))] for v in values
    )


def _timeline(results: dict[str, RunResult], trace: Trace, width: int = 72) -> str:
    """One character per time bucket: load, then each policy's replicas and SLO misses."""
    horizon = max(r.horizon for r in results.values())
    step = horizon / width
    load = [0.0] * width
    for req in trace.requests:
        load[min(width - 1, int(req.arrival / step))] += 1
    lines = [f"timeline: {width} columns of {step:.0f}s; replicas scale 0..max, ! = SLO missed"]
    lines.append(f"{'load':<12} |{_sparkline(load, max(load))}|")
    top = max((p.replicas for r in results.values() for p in r.timeline), default=1)
    for name, result in results.items():
        reps = [0.0] * width
        for p in result.timeline:
            i = min(width - 1, int(p.time / step))
            reps[i] = max(reps[i], p.replicas)
        misses = [False] * width
        for arrival, latency in result.latencies:
            if latency > result.slo_s:
                misses[min(width - 1, int(arrival / step))] = True
        lines.append(f"{name:<12} |{_sparkline(reps, top)}| max {int(max(reps))}")
        lines.append(f"{'':<12} |{''.join('!' if m else ' ' for m in misses)}|")
    return "\n".join(lines)


def _plot(path: Path, results: dict[str, RunResult], trace: Trace) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'trimtab[plot]'); no PNG written"
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(11, 8))
    horizon = max(r.horizon for r in results.values())
    bins = int(horizon // 10) + 1
    load = [0] * bins
    for req in trace.requests:
        load[int(req.arrival // 10)] += 1
    axes[0].plot([i * 10 for i in range(bins)], [c / 10 for c in load], color="black")
    axes[0].set_ylabel("requests/s")
    for name, result in results.items():
        # trimtab drawn thick and on top, so the eye finds it among the baselines.
        style = {"linewidth": 2.5, "zorder": 5} if name == "trimtab" else {"linewidth": 1.0}
        axes[1].step(
            [p.time for p in result.timeline],
            [p.replicas for p in result.timeline],
            where="post",
            label=name,
            **style,
        )
        per_bin: dict[int, list[float]] = {}
        for arrival, latency in result.latencies:
            per_bin.setdefault(int(arrival // 10), []).append(latency)
        xs = sorted(per_bin)
        p99 = [sorted(per_bin[x])[max(0, math.ceil(0.99 * len(per_bin[x])) - 1)] for x in xs]
        axes[2].plot([x * 10 for x in xs], [min(v, 120.0) for v in p99], label=name, **style)
    slo = next(iter(results.values())).slo_s
    axes[2].axhline(slo, color="red", linestyle="--", label="SLO")
    # Log scale: the SLO is seconds, misses reach minutes; both must be readable.
    axes[2].set_yscale("log")
    axes[1].set_ylabel("replicas (starting + ready)")
    axes[2].set_ylabel("p99 latency (s, 10 s bins)")
    axes[2].set_xlabel("seconds")
    axes[1].legend(loc="upper right", fontsize="small")
    fig.suptitle(f"{trace.name}: load, replicas and p99 per policy (SLO {slo:g} s, dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _scenario(args: argparse.Namespace, spec: ModelDeploymentSpec) -> Scenario:
    return Scenario.from_spec(
        spec,
        prefill_tokens_per_s=args.prefill,
        decode_tokens_per_s=args.decode,
        cold_start=args.cold_start,
        scrape_interval=args.scrape_interval,
    )


def _run(
    args: argparse.Namespace, spec: ModelDeploymentSpec, trace: Trace
) -> tuple[Scenario, dict[str, Score], dict[str, RunResult]] | None:
    try:
        scenario = _scenario(args, spec)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    out = run_all(scenario, trace, args.seed)
    return scenario, {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}


def simulate_main(argv: Sequence[str]) -> int:
    """`trimtab simulate -f MODELDEPLOYMENT.yaml --trace TRACE.csv [--time-scale X] [--seed N]
    [--json] [--plot FILE.png | --no-plot]`. With matplotlib installed it writes a PNG by
    default (default_plot_path)."""
    args = _parser("trimtab simulate", demo=False).parse_args(list(argv))
    try:
        spec = load_spec(args.filename.read_text(), str(args.filename))
        trace = load_trace(args.trace)
        if args.time_scale != 1.0:
            trace = trace.time_scaled(args.time_scale)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ran = _run(args, spec, trace)
    if ran is None:
        return 2
    scenario, scores, results = ran
    if args.json:
        print(json.dumps(report_json(trace, scenario, scores), indent=None))
    else:
        print(_header(trace, scenario))
        print(_table(scores))
        print()
        print(_timeline(results, trace))
    return _maybe_plot(args, results, trace, by_default=True)


def _header(trace: Trace, scenario: Scenario) -> str:
    s = scenario.server
    return (
        f"trace {trace.name}: {len(trace.requests)} requests over {trace.duration:.0f}s; "
        f"SLO p99 {scenario.slo.latency} <= {scenario.slo.p99_latency_ms} ms\n"
        f"server: {s.max_concurrency} slots, prefill {s.prefill_tokens_per_s:g} tok/s, decode "
        f"{s.decode_tokens_per_s:g} tok/s, cold start {s.cold_start:g}s; scrape "
        f"{scenario.metrics.scrape_interval:g}s\n"
    )


def default_plot_path(trace: Trace) -> Path:
    """Where `trimtab simulate` writes its PNG unless told: the working directory, named after
    the trace ("azure-code.csv x4" -> azure-code-x4.png).

    >>> default_plot_path(Trace("azure-code.csv x4", ()))
    PosixPath('azure-code-x4.png')
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", trace.name.replace(".csv", "")).strip("-.")
    return Path(f"{name or 'trace'}.png")


def _maybe_plot(
    args: argparse.Namespace,
    results: dict[str, RunResult],
    trace: Trace,
    by_default: bool = False,
) -> int:
    """Write the PNG: to --plot, or (with `by_default`, unless --no-plot) to
    default_plot_path when matplotlib is installed. Where it went is printed, to stderr with
    --json so stdout stays one JSON object."""
    path: Path | None = args.plot
    if path is None and by_default and not args.no_plot:
        if importlib.util.find_spec("matplotlib") is None:
            if not args.json:
                print("\nno PNG: matplotlib is not installed (pip install 'trimtab[plot]')")
            return 0
        path = default_plot_path(trace)
    if path is None:
        return 0
    problem = _plot(path, results, trace)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    if args.json:
        print(f"wrote {path}", file=sys.stderr)
    else:
        print(f"\nwrote {path}")
    return 0


def example_text(start: Path | None = None) -> tuple[str, str]:
    """The example ModelDeployment: the repository's examples/ when run inside a checkout,
    else the copy shipped in the package."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "examples" / EXAMPLE
        if candidate.is_file() and (folder / "pyproject.toml").is_file():
            return candidate.read_text(), str(candidate)
    return resources.files("trimtab").joinpath(
        "data", EXAMPLE
    ).read_text(), f"trimtab/data/{EXAMPLE}"


def _replicas_at(result: RunResult, time: float) -> int:
    """Replicas (starting or ready) the run had asked for at `time`, from its timeline."""
    count = result.timeline[0].replicas if result.timeline else 0
    for point in result.timeline:
        if point.time > time:
            break
        count = point.replicas
    return count


SHORT = {"hpa_cpu": "hpa", "keda_queue": "keda", "knative_kpa": "kpa", "oracle": "oracle"}


def _reasons(results: dict[str, RunResult], limit: int = 24) -> list[str]:
    """trimtab's decisions that changed the replicas, with their reasons, oldest first, and
    what each baseline had asked for at that moment."""
    trimtab = results["trimtab"]
    others = [name for name in results if name != "trimtab"]
    lines = [
        f"  {'time':>7}  {'trimtab':>7}  "
        + " ".join(f"{SHORT.get(n, n):>6}" for n in others)
        + "  trimtab's reason"
    ]
    last = trimtab.timeline[0].replicas if trimtab.timeline else None
    changes: list[str] = []
    for decision in trimtab.decisions:
        if decision.replicas != last:
            beside = " ".join(f"{_replicas_at(results[n], decision.time):>6d}" for n in others)
            changes.append(
                f"  {decision.time:6.0f}s  {last or 0:>2d} -> {decision.replicas:<2d}  {beside}  "
                f"{decision.reason}"
            )
            last = decision.replicas
    if len(changes) > limit:
        skipped = len(changes) - limit
        changes = (
            changes[: limit // 2] + [f"  ... {skipped} more changes ..."] + changes[-limit // 2 :]
        )
    return lines + changes


def demo_main(argv: Sequence[str]) -> int:
    """`trimtab demo`: the example ModelDeployment on the bundled Azure LLM trace (time-scaled
    x4 so it loads several replicas), trimtab's decisions and why, beside the baselines."""
    args = _parser("trimtab demo", demo=True).parse_args(list(argv))
    text, source = example_text()
    spec = load_spec(text, source)
    trace = bundled_trace().time_scaled(DEMO_TIME_SCALE)
    ran = _run(args, spec, trace)
    if ran is None:
        return 2
    scenario, scores, results = ran
    if args.json:
        print(json.dumps(report_json(trace, scenario, scores)))
        return _maybe_plot(args, results, trace)
    print(
        f"trimtab demo: {source} on the Azure LLM 2023 code trace (CC-BY 4.0, "
        f"Patel et al., Splitwise, ISCA 2024), {DEMO_TIME_SCALE:g}x faster\n"
    )
    print(_header(trace, scenario))
    print(
        "What trimtab decided, and why (each change of replicas; beside it, the replicas each "
        "baseline had asked for then):"
    )
    print("\n".join(_reasons(results)))
    print()
    print(_table(scores))
    t, k = scores["trimtab"], scores["keda_queue"]
    h, o = scores["hpa_cpu"], scores["oracle"]
    print(
        f"\ntrimtab vs KEDA-style: {_ratio(t.slo_violation_seconds, k.slo_violation_seconds)} the "
        f"SLO-violation seconds at {_ratio(t.replica_seconds, k.replica_seconds)} the cost; vs "
        f"HPA on CPU: {_ratio(t.slo_violation_seconds, h.slo_violation_seconds)} the violations; "
        f"cost {_ratio(t.replica_seconds, o.replica_seconds)} the clairvoyant oracle's."
    )
    print()
    print(_timeline(results, trace))
    return _maybe_plot(args, results, trace)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else ("1.00x" if a == 0 else "inf")


__all__ = ["POLICIES", "demo_main", "simulate_main"]
