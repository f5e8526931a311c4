"""The only code that talks to the API server: a small async REST client and the resources it
may touch (the RBAC registry the Helm chart's ClusterRole is built from)."""
