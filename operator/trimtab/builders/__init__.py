"""Pure builders: a parsed spec in, Kubernetes manifests (plain dicts) out.

Nothing here reads a clock, a cluster or the network, so every builder is a golden test."""
