"""The only code that imports kopf: thin handlers that parse, decide, act and write status.

Importing this package registers every handler with kopf (`kopf run -m trimtab.handlers`)."""

from trimtab.handlers import (
    autoscaling,
    modeldeployment,
    operator_setup,  # first: its start-up handler sets up memo
    rollout,
    trainingjob,
)

__all__ = ["autoscaling", "modeldeployment", "operator_setup", "rollout", "trainingjob"]
