"""Writes the CustomResourceDefinitions (crds/*.yaml and the Helm chart's CRD templates)
from the pydantic models, so the schema the API server enforces is the one the operator parses.

Run `python -m trimtab.api.crdgen [--check]`; `--check` exits 1 when a file would change."""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec, ModelDeploymentStatus
from trimtab.api.trainingjob import TrainingJobSpec, TrainingJobStatus

JSON = dict[str, Any]

# Keys of JSON Schema that mean the same in the API server's OpenAPI v3 subset.
_KEPT = {
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "format",
    "nullable",
}
# Keys that to_structural translates, or that carry nothing the API server checks. Any other key
# is refused rather than dropped: a bound the models enforce but the CRD lost would leave the API
# server accepting what the operator then rejects, and an unbounded map or list that a CEL rule
# walks makes the API server refuse the whole CRD for the rule's estimated cost.
_TRANSLATED = {
    "properties",
    "additionalProperties",
    "items",
    "required",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "title",
}


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    type: str
    json_path: str
    description: str = ""
    priority: int = 0

    def to_wire(self) -> JSON:
        out: JSON = {"name": self.name, "type": self.type, "jsonPath": self.json_path}
        if self.description:
            out["description"] = self.description
        if self.priority:
            out["priority"] = self.priority
        return out


@dataclass(frozen=True)
class CrdDefinition:
    kind: str
    plural: str
    short_names: tuple[str, ...]
    spec_model: type[BaseModel]
    status_model: type[BaseModel]
    printer_columns: tuple[PrinterColumn, ...]
    description: str
    scale: bool = False
    categories: tuple[str, ...] = field(default=("trimtab", "ml"))
    # CEL on metadata.name (the only metadata a CRD's rules can read): the names trimtab derives
    # from it must be valid, or the API server refuses them after the resource was accepted.
    name_rule: JSON = field(default_factory=dict)

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def name(self) -> str:
        return f"{self.plural}.{C.GROUP}"


MODELDEPLOYMENT_CRD = CrdDefinition(
    kind=C.MODELDEPLOYMENT_KIND,
    plural=C.MODELDEPLOYMENT_PLURAL,
    short_names=(C.MODELDEPLOYMENT_SHORT,),
    spec_model=ModelDeploymentSpec,
    status_model=ModelDeploymentStatus,
    description="A model server that trimtab right-sizes, scales from SLO signals and rolls "
    "out safely.",
    scale=True,
    name_rule={
        "rule": "self.metadata.name.size() <= 63 && "
        "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        "message": "metadata.name must be at most 63 lowercase letters, digits and '-', starting "
        "with a letter and ending with a letter or digit (no dots): it names the model's Service "
        "and labels its pods",
    },
    printer_columns=(
        PrinterColumn(
            "Phase", "string", ".status.phase", "Pending, Progressing, Ready or Degraded"
        ),
        PrinterColumn("Ready", "integer", ".status.readyReplicas", "Ready replicas"),
        PrinterColumn("Replicas", "integer", ".status.replicas", "Replicas of all revisions"),
        PrinterColumn("Revision", "string", ".status.currentRevision", "Current revision"),
        PrinterColumn("Age", "date", ".metadata.creationTimestamp"),
    ),
)

TRAININGJOB_CRD = CrdDefinition(
    kind=C.TRAININGJOB_KIND,
    plural=C.TRAININGJOB_PLURAL,
    short_names=(C.TRAININGJOB_SHORT,),
    spec_model=TrainingJobSpec,
    status_model=TrainingJobStatus,
    description="A multi-node training job that trimtab gang-starts, queues through Kueue and "
    "restarts as a whole from its checkpoint on failure.",
    name_rule={
        "rule": "self.metadata.name.size() <= 63",
        "message": "metadata.name must be at most 63 characters: it labels the job's pods",
    },
    printer_columns=(
        PrinterColumn("Phase", "string", ".status.phase", "Pending, Queued, Starting, Running, "
                      "Restarting, Suspended, Succeeded or Failed"),
        PrinterColumn("Workers ready", "integer", ".status.workersReady", "Running workers"),
        PrinterColumn("Restarts", "integer", ".status.restarts", "Whole-job restarts"),
        PrinterColumn("Age", "date", ".metadata.creationTimestamp"),
    ),
)

# Every CRD the project ships; other kinds add themselves here.
CRDS: list[CrdDefinition] = [MODELDEPLOYMENT_CRD, TRAININGJOB_CRD]


class SchemaError(ValueError):
    """A model uses a construct that has no structural-schema equivalent."""


def _resolve(schema: JSON, defs: JSON) -> JSON:
    """Inline a $ref, keeping sibling keys (description, default) of the referring schema."""
    if "$ref" not in schema:
        return schema
    name = schema["$ref"].rsplit("/", 1)[-1]
    target = copy.deepcopy(defs[name])
    for key, value in schema.items():
        if key != "$ref":
            target[key] = value
    return _resolve(target, defs)


def _merge_union(schema: JSON, defs: JSON, path: str) -> JSON:
    """A discriminated union becomes one object schema: the union of the branches' fields, the
    discriminator restricted to its values, CEL rules that forbid another branch's fields, and
    each branch's own rules, which hold only where the discriminator names it."""
    discriminator = schema.get("discriminator", {}).get("propertyName")
    if discriminator is None:
        raise SchemaError(f"{path}: unions need a discriminator to become a structural schema")
    branches = [_resolve(b, defs) for b in schema["oneOf"]]
    props: JSON = {}
    owners: dict[str, list[str]] = {}
    values: list[str] = []
    required_everywhere: set[str] | None = None
    for branch in branches:
        tag_schema = branch["properties"][discriminator]
        tag_values = tag_schema.get("enum") or [tag_schema.get("const")]
        values.extend(str(v) for v in tag_values)
        for name, sub in branch.get("properties", {}).items():
            if name == discriminator:
                continue
            props.setdefault(name, sub)
            owners.setdefault(name, []).extend(str(v) for v in tag_values)
        required = set(branch.get("required", []))
        required_everywhere = (
            required if required_everywhere is None else required_everywhere & required
        )
    merged: JSON = {
        "type": "object",
        "properties": {discriminator: {"type": "string", "enum": values}, **props},
        "required": sorted((required_everywhere or set()) | {discriminator}),
    }
    rules = []
    for name, tags in owners.items():
        if len(tags) == len(values):
            continue
        allowed = " || ".join(f"self.{discriminator} == '{t}'" for t in tags)
        rules.append(
            {
                "rule": f"!has(self.{name}) || {allowed}",
                "message": f"{name} applies only when {discriminator} is {' or '.join(tags)}",
            }
        )
    for branch in branches:
        tag_schema = branch["properties"][discriminator]
        tag = (tag_schema.get("enum") or [tag_schema.get("const")])[0]
        for name in branch.get("required", []):
            if name != discriminator and name not in (required_everywhere or set()):
                rules.append(
                    {
                        "rule": f"self.{discriminator} != '{tag}' || has(self.{name})",
                        "message": f"{discriminator} {tag} needs {name}",
                    }
                )
        # A branch's own rules hold for it alone.
        for own in branch.get("x-kubernetes-validations", []):
            rules.append(
                {**own, "rule": f"self.{discriminator} != '{tag}' || ({own['rule']})"}
            )
    if rules:
        merged["x-kubernetes-validations"] = rules
    for key in ("description",):
        if key in schema:
            merged[key] = schema[key]
    return merged


def to_structural(schema: JSON, defs: JSON, path: str = "") -> JSON:
    """Translate pydantic's JSON Schema into the structural OpenAPI v3 schema of a CRD."""
    schema = _resolve(schema, defs)
    if "oneOf" in schema:
        schema = _merge_union(schema, defs, path)
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise SchemaError(
                f"{path}: only Optional[X] unions are supported, got {schema['anyOf']}"
            )
        inner = dict(_resolve(options[0], defs))
        for key, value in schema.items():
            if key != "anyOf":
                inner[key] = value
        if inner.get("default", 0) is None:
            del inner["default"]
        schema = inner
        if "oneOf" in schema:
            schema = _merge_union(schema, defs, path)
    if "const" in schema:
        schema = {**schema, "enum": [schema["const"]]}
        schema.setdefault("type", "string")
    unknown = sorted(
        k for k in schema if k not in _KEPT | _TRANSLATED and not k.startswith("x-kubernetes-")
    )
    if unknown:
        raise SchemaError(f"{path}: no structural-schema translation for {unknown}")
    out: JSON = {k: v for k, v in schema.items() if k in _KEPT}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-"):
            out[key] = copy.deepcopy(value)
    if "exclusiveMinimum" in schema:
        out["minimum"], out["exclusiveMinimum"] = schema["exclusiveMinimum"], True
    if "exclusiveMaximum" in schema:
        out["maximum"], out["exclusiveMaximum"] = schema["exclusiveMaximum"], True
    kind = schema.get("type")
    if kind is None and "enum" in schema:
        out["type"] = "string"
    elif kind is None and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise SchemaError(f"{path}: schema has no type: {schema}")
    if kind == "object":
        if "properties" in schema:
            out["properties"] = {
                name: to_structural(sub, defs, f"{path}.{name}")
                for name, sub in schema["properties"].items()
            }
            if schema.get("required"):
                out["required"] = list(schema["required"])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = to_structural(extra, defs, f"{path}[*]")
        elif "properties" not in schema and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["x-kubernetes-preserve-unknown-fields"] = True
    if kind == "array":
        out["items"] = to_structural(schema.get("items", {}), defs, f"{path}[]")
    return out


def model_schema(model: type[BaseModel]) -> JSON:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return to_structural(raw, defs, model.__name__)


def build_crd(definition: CrdDefinition) -> JSON:
    spec_schema = model_schema(definition.spec_model)
    spec_schema.pop("default", None)
    status_schema = model_schema(definition.status_model)
    root: JSON = {
        "type": "object",
        "description": definition.description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "required": ["spec"],
    }
    if definition.name_rule:
        root["x-kubernetes-validations"] = [definition.name_rule]
    subresources: JSON = {"status": {}}
    if definition.scale:
        subresources["scale"] = {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": definition.name,
            "labels": {C.LABEL_NAME: "trimtab", "app.kubernetes.io/part-of": "trimtab"},
        },
        "spec": {
            "group": C.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": definition.kind,
                "listKind": f"{definition.kind}List",
                "plural": definition.plural,
                "singular": definition.singular,
                "shortNames": list(definition.short_names),
                "categories": list(definition.categories),
            },
            "versions": [
                {
                    "name": C.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "additionalPrinterColumns": [c.to_wire() for c in definition.printer_columns],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


HEADER = "# Generated by `python -m trimtab.api.crdgen` from operator/trimtab/api. Do not edit.\n"


def render_crd(definition: CrdDefinition) -> str:
    return HEADER + yaml.safe_dump(build_crd(definition), sort_keys=False, width=100)


def render_chart_crd(definition: CrdDefinition) -> str:
    """The same CRD as a chart template: installed only with crds.install and when no other
    release (or a hand) installed it (`trimtab.installCrd`), kept on uninstall
    (Helm) and never pruned (Argo CD, which honours resource-policy only on deleting the
    Application: a render without the CRDs would otherwise prune them, and with them every
    ModelDeployment and TrainingJob)."""
    crd = build_crd(definition)
    crd["metadata"]["annotations"] = {
        "helm.sh/resource-policy": "keep",
        "argocd.argoproj.io/sync-options": "Prune=false",
    }
    body = yaml.safe_dump(crd, sort_keys=False, width=100)
    gate = f'include "trimtab.installCrd" (dict "root" $ "name" "{crd["metadata"]["name"]}")'
    return f"{HEADER}{{{{- if {gate} }}}}\n{body}{{{{- end }}}}\n"


def outputs(root: Path) -> dict[Path, str]:
    files: dict[Path, str] = {}
    for definition in CRDS:
        files[root / "crds" / f"{C.GROUP}_{definition.plural}.yaml"] = render_crd(definition)
        chart_crds = root / "charts" / "trimtab" / "templates" / "crds"
        files[chart_crds / f"{C.GROUP}_{definition.plural}.yaml"] = render_chart_crd(definition)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="project root")
    parser.add_argument("--check", action="store_true", help="fail if any file would change")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs(args.root).items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        sys.stderr.write("CRDs are stale, run `make crds`: " + ", ".join(map(str, stale)) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
