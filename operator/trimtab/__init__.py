"""trimtab: a Kubernetes operator that keeps ML workloads on their SLOs at the lowest cost.

The package is split by purity: `api`, `decisions` and `builders` never talk to a cluster."""

__version__ = "0.1.0"
