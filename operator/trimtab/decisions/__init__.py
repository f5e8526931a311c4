"""Pure decision logic: numbers and parsed specs in, a decision with its reason out.

No kopf, no Kubernetes client, no HTTP and no clock: time is always an argument."""
