"""The autoscaling simulator: model servers under a request trace, the baselines trimtab is
measured against, and the `trimtab simulate` / `trimtab demo` commands (simulate/cli.py)."""
