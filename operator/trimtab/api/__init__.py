"""The custom resources' types: pydantic models that are the single source of truth.

`crdgen` turns them into CustomResourceDefinitions; the operator parses specs with them."""
