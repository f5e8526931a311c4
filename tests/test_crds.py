"""The generated CRDs: no drift from the models, structural, accepted by the schema validator,
and every CEL rule compiles."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, Field

from tests.validation import ROOT, apply_defaults, cel_failures, closed_schema
from trimtab.api import crdgen


def test_regenerating_leaves_no_diff() -> None:
    stale = [
        str(path.relative_to(ROOT))
        for path, text in crdgen.outputs(ROOT).items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"run `make crds`: {stale}"


CRD_FILES = sorted((ROOT / "crds").glob("*.yaml"))


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, sub in (schema.get("properties") or {}).items():
        out += _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        out += _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _walk(schema["additionalProperties"], f"{path}{{}}")
    return out


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_crd_is_structural(path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    for version in crd["spec"]["versions"]:
        root = version["schema"]["openAPIV3Schema"]
        for where, node in _walk(root):
            assert not {"$ref", "anyOf", "oneOf", "allOf", "$defs", "title"} & node.keys(), where
            if not node.get("x-kubernetes-preserve-unknown-fields") and not node.get(
                "x-kubernetes-int-or-string"
            ):
                assert "type" in node, f"{path.name}{where} has no type"
            for rule in node.get("x-kubernetes-validations", []):
                celpy.Environment().compile(rule["rule"])  # raises on a syntax error


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_crd_object_validates(path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    kubernetes_validate.validate(crd, "1.37.0", True)


def test_modeldeployment_crd_shape() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "trimtab.io_modeldeployments.yaml").read_text())
    assert crd["spec"]["names"]["shortNames"] == ["mdep"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:4] == ["Phase", "Ready", "Replicas", "Revision"] and columns[-1] == "Age"


class _Bounded(BaseModel):
    labels: dict[str, str] = Field(default_factory=dict, min_length=1, max_length=64)
    steps: list[int] = Field(default_factory=list, max_length=8)
    weight: float = Field(gt=0, le=100, multiple_of=0.5)


class _Unique(BaseModel):
    # pydantic writes uniqueItems for a set; a structural schema may not use it.
    zones: set[str]


def test_the_models_bounds_reach_the_crd() -> None:
    """A map or list bound pydantic enforces is one the API server enforces too: a CEL rule that
    walks a map without maxProperties makes the API server refuse the whole CRD."""
    schema = crdgen.model_schema(_Bounded)
    labels = schema["properties"]["labels"]
    assert (labels["minProperties"], labels["maxProperties"]) == (1, 64)
    assert schema["properties"]["steps"]["maxItems"] == 8
    weight = schema["properties"]["weight"]
    assert weight["minimum"] == 0 and weight["exclusiveMinimum"] is True
    assert weight["maximum"] == 100 and "exclusiveMaximum" not in weight
    assert weight["multipleOf"] == 0.5


def test_a_constraint_without_a_translation_is_refused_not_dropped() -> None:
    with pytest.raises(crdgen.SchemaError, match="uniqueItems"):
        crdgen.model_schema(_Unique)


def _defaults(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    return [(where, node) for where, node in _walk(schema, path) if "default" in node]


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_every_default_is_valid_where_it_stands(path: Path) -> None:
    """The API server refuses a CRD whose default its own schema or rules would refuse."""
    crd = yaml.safe_load(path.read_text())
    defaults = _defaults(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    assert defaults, f"{path.name} has no defaults"
    for where, node in defaults:
        schema = {k: v for k, v in node.items() if k != "default"}
        value = apply_defaults(schema, copy.deepcopy(node["default"]))
        jsonschema.validate(value, closed_schema(schema))
        failures = list(cel_failures(schema, value, where))
        assert not failures, failures
