"""The only code that imports kopf: thin handlers that parse, decide, act and write status.

Importing this package registers every handler with kopf (`kopf run -m trimtab.handlers`)."""

# kopf runs start-up handlers in registration order: operator_setup's, which fills memo with the
# shared clients, registers before trainingjob's (the modules import in this order).
from trimtab.handlers import (
    autoscaling,
    modeldeployment,
    operator_setup,
    rightsizing,
    rollout,
    trainingjob,
)

__all__ = [
    "autoscaling",
    "modeldeployment",
    "operator_setup",
    "rightsizing",
    "rollout",
    "trainingjob",
]
