"""The only code that imports kopf: thin handlers that parse, decide, act and write status.

Importing this package registers every handler with kopf (`kopf run -m trimtab.handlers`)."""

from trimtab.handlers import modeldeployment, operator_setup

__all__ = ["modeldeployment", "operator_setup"]
