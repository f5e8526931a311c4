"""trimtab's benchmarks: each module bench_*.py compares trimtab with baselines side by side."""
