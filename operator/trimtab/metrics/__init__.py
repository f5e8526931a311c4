"""Where numbers come from: the MetricsProvider protocol, the Prometheus provider and the
PromQL presets per model server."""
