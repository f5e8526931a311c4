"""Schema checks the tests share: built-in kinds through kubernetes-validate, custom objects
through jsonschema on a CRD's openAPIV3Schema (unknown fields rejected), and CEL rules through
cel-python, so a manifest that would fail in a cluster fails here first."""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
# The published CRDs of the APIs trimtab writes objects for (data, Apache-2.0; versions and
# sources in the READMEs there), vendored so the tests need nothing outside the repository.
THIRDPARTY = ROOT / "tests" / "thirdparty-crds"
K8S_VERSION = "1.37.0"


def closed_schema(schema: Any) -> Any:
    """A copy of `schema` with additionalProperties: false wherever properties are listed and
    nothing else allows extras, since the API server would prune unknown fields silently."""
    if isinstance(schema, dict):
        out = {k: closed_schema(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        if out.get("x-kubernetes-list-type") == "set":
            out["uniqueItems"] = True  # the API server refuses a duplicate in a set list
        if out.get("type") == "object" and out.get("x-kubernetes-int-or-string"):
            out.pop("type")
        # OpenAPI v3.0 (what CRDs use) spells exclusive bounds as booleans; JSON Schema as numbers.
        for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if out.get(bound) is True:
                out[bound] = out.pop(limit)
            elif out.get(bound) is False:
                out.pop(bound)
        if out.get("nullable") and isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if out.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return out
    if isinstance(schema, list):
        return [closed_schema(v) for v in schema]
    return schema


def undeclared_fields(schema: Any, value: Any, path: str = "") -> Iterator[str]:
    """The fields of `value` that a CRD's structural schema does not declare, as the API
    server names them when it refuses a server-side apply ("field not declared in schema"):
    `.spec.rules[0].retry`, an associative list's element by its keys
    (`.ports[port=80,protocol="TCP"]`)."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if path == "" and key in ("apiVersion", "kind", "metadata"):
                continue
            if props is not None and key in props:
                yield from undeclared_fields(props[key], item, f"{path}.{key}")
            elif isinstance(extra, dict):
                yield from undeclared_fields(extra, item, f"{path}.{key}")
            elif props is not None or extra is False:
                yield f"{path}.{key}"
    elif isinstance(value, list):
        keys = schema.get("x-kubernetes-list-map-keys")
        for i, item in enumerate(value):
            if schema.get("x-kubernetes-list-type") == "map" and keys and isinstance(item, dict):
                named = ",".join(
                    f"{k}={json.dumps(item[k])}" for k in sorted(keys) if k in item
                )
                where = f"{path}[{named}]"
            else:
                where = f"{path}[{i}]"
            yield from undeclared_fields(schema.get("items"), item, where)


def crd_without(source: Path, dest: Path, *fields: tuple[str, ...]) -> Path:
    """A copy of the CRD at `source` without the properties whose names end a chain of
    `fields` (("requestMirror", "percent"): every requestMirror's percent), written to `dest`:
    a CRD older than the published one, as a cluster may still run."""

    def strip(schema: Any, chain: tuple[str, ...]) -> None:
        if isinstance(schema, list):
            for item in schema:
                strip(item, chain)
            return
        if not isinstance(schema, dict):
            return
        props = schema.get("properties")
        if isinstance(props, dict):
            for name in list(props):
                here = (*chain, name)
                if any(here[-len(f) :] == f for f in fields):
                    del props[name]
                else:
                    strip(props[name], here)
        for key, value in schema.items():
            if key != "properties":
                strip(value, chain)

    crd = copy.deepcopy(load_crd(source))
    for version in crd["spec"]["versions"]:
        strip(version["schema"]["openAPIV3Schema"], ())
    dest.write_text(yaml.safe_dump(crd))
    return dest


@functools.cache
def load_crd(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, path
    crd: dict[str, Any] = docs[0]
    return crd


def crd_schema(path: Path, version: str | None = None) -> dict[str, Any]:
    crd = load_crd(path)
    versions = crd["spec"]["versions"]
    chosen = next(
        v for v in versions if (version is None and v.get("storage")) or v["name"] == version
    )
    return _python_patterns(copy.deepcopy(chosen["schema"]["openAPIV3Schema"]))


def _python_patterns(schema: Any) -> Any:
    """Go's regexp takes flags anywhere (`^(?i)abort`, in the PrometheusRule CRD); Python's
    only at the start. `^(?i)` and `(?i)^` mean the same: move the flags first."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "pattern" and isinstance(value, str):
                schema[key] = re.sub(r"^\^\((\?[a-z]+)\)", r"(\1)^", value)
            else:
                _python_patterns(value)
    elif isinstance(schema, list):
        for item in schema:
            _python_patterns(item)
    return schema


def validate_custom(obj: dict[str, Any], crd_path: Path, version: str | None = None) -> None:
    """Raise jsonschema.ValidationError when `obj` does not fit the CRD (unknown fields too),
    and AssertionError when one of its CEL rules fails."""
    if version is None:
        version = obj.get("apiVersion", "").rsplit("/", 1)[-1] or None
    schema = crd_schema(crd_path, version)
    body = {k: v for k, v in obj.items() if k != "metadata"}
    closed = closed_schema(schema)
    closed["properties"]["metadata"] = {"type": "object"}
    jsonschema.validate({**body, "metadata": obj.get("metadata", {})}, closed)
    failures = list(cel_failures(schema, apply_defaults(schema, obj)))
    assert not failures, failures


def validate_builtin(obj: dict[str, Any]) -> None:
    """kubernetes-validate --strict for built-in kinds: types and unknown fields."""
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _lower_ascii(text: Any) -> Any:
    """Kubernetes CEL's `lowerAscii()` (its strings extension library, which cel-python lacks):
    only A-Z change, as there."""
    return celpy.celtypes.StringType(
        "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in str(text))
    )


# Functions of Kubernetes CEL that rules trimtab writes use and cel-python does not have.
KUBERNETES_CEL_FUNCTIONS = {"lowerAscii": _lower_ascii}


@functools.cache
def _program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule), functions=KUBERNETES_CEL_FUNCTIONS)


def cel_failures(schema: dict[str, Any], value: Any, path: str = "") -> Iterator[str]:
    """Evaluate every x-kubernetes-validations rule in `schema` against `value`, as the API
    server does (rules on absent fields are not run). Yields 'path: message' per failure."""
    for rule in schema.get("x-kubernetes-validations", []):
        try:
            result = _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as err:
            yield f"{path or '.'}: rule {rule['rule']!r} errored: {err}"
            continue
        if not bool(result):
            yield f"{path or '.'}: {rule.get('message', rule['rule'])}"
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                yield from cel_failures(sub, value[name], f"{path}.{name}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, sub_value in value.items():
                yield from cel_failures(extra, sub_value, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from cel_failures(schema["items"], item, f"{path}[{i}]")


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Fill schema defaults as the API server does on admission (objects that are present)."""
    if isinstance(value, dict):
        out = dict(value)
        for name, sub in (schema.get("properties") or {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(sub, out[name])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def thirdparty(*parts: str) -> Path:
    return THIRDPARTY.joinpath(*parts)
