"""A discrete-event simulator of model servers under a request trace, and the baseline
autoscalers trimtab is measured against."""
