"""Runs every benchmark (`make bench`), or the ones named: `python -m bench autoscaling canary`.

Each bench/bench_<name>.py has `main() -> int`: it prints a table and writes
bench/results/<name>.json."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = sorted(
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules([str(here)])
        if m.name.startswith("bench_")
    )
    chosen = argv or names
    unknown = set(chosen) - set(names)
    if unknown:
        print(f"unknown benchmarks: {', '.join(sorted(unknown))}; have {', '.join(names)}")
        return 2
    failed = 0
    for name in chosen:
        print(f"\n=== bench {name} ===", flush=True)
        module = importlib.import_module(f"bench.bench_{name}")
        failed += 1 if module.main() else 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
