"""The CRDs' CEL rules stay within the API server's cost budget, by the estimator in
cel_cost.py, whose port is checked first against the costs Kubernetes' own tests expect."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.cel_cost import (
    CRD_COST_LIMIT,
    RULE_COST_LIMIT,
    CompileError,
    Decl,
    Unsupported,
    crd_rule_costs,
    crd_rules,
    decl_from_schema,
    rule_cost,
    unguarded_fields,
)
from tests.validation import ROOT

CRD_FILES = sorted((ROOT / "crds").glob("*.yaml"))


def _array(item_type: str, max_items: int | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": {"type": item_type}}
    if max_items is not None:
        schema["maxItems"] = max_items
    return schema


def _map(value: dict[str, Any], max_props: int | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": value}
    if max_props is not None:
        schema["maxProperties"] = max_props
    return schema


def _string(max_length: int | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if max_length is not None:
        schema["maxLength"] = max_length
    return schema


def _strings_map(limit: int | None) -> dict[str, Any]:
    return _map(_string(limit), limit)


def _array_of_number_maps(limit: int | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": _map({"type": "number"}, limit)}
    if limit is not None:
        schema["maxItems"] = limit
    return schema


# Kubernetes' TestCostEstimation (apiextensions-apiserver schema/cel compilation_test.go): each
# rule's estimated cost on its schema without limits, and with maxItems, maxProperties and
# maxLength set to `limit`.
K8S_EXPECTED = [
    ("number array with all", lambda n: _array("number", n), "self.all(x, true)",
     4718591, 10, 32),
    ("string array with all", lambda n: _array("string", n), "self.all(x, true)",
     3145727, 20, 62),
    ("boolean array with all", lambda n: _array("boolean", n), "self.all(x, true)",
     1887437, 5, 17),
    ("map of numbers with all", lambda n: _map({"type": "number"}, n), "self.all(x, true)",
     1348169, 10, 32),
    ("map of strings with all", lambda n: _map({"type": "string"}, n), "self.all(x, true)",
     1179647, 3, 11),
    ("map of booleans with all", lambda n: _map({"type": "boolean"}, n), "self.all(x, true)",
     943718, 100, 302),
    ("string with contains", _string, "self.contains('test')", 314574, 10, 5),
    ("string with startsWith", _string, "self.startsWith('test')", 2, 15, 2),
    ("string with endsWith", _string, "self.endsWith('test')", 2, 30, 2),
    ("concat string", _string, 'size(self + "hello") > size("hello")', 314578, 4, 7),
    ("index of array with numbers", lambda n: _array("number", n), "self[1] == 0.0",
     2, 5000, 2),
    ("index of array with strings", lambda n: _array("string", n), "self[1] == self[1]",
     314577, 8, 314577),
    ("O(n^2) loop with numbers", lambda n: _array("number", n),
     "self.all(x, self.all(y, true))", None, 10, 352),
    ("O(n^3) loop with numbers", lambda n: _array("number", n),
     "self.all(x, self.all(y, self.all(z, true)))", None, 10, 3552),
    ("regex matches simple", _string, 'self.matches("x")', 314574, 50, 22),
    ("regex matches empty string", _string, '"".matches("(((((((((())))))))))[0-9]")',
     7, 10, 7),
    ("regex matches empty regex", _string, 'self.matches("")', 1, 100, 1),
    ("map of strings with value length", _strings_map, "self.all(x, x.contains(self[x]))",
     2752507, 10, 72),
    ("set string maxLength to zero", _string, 'self == "x"', 2, 0, 1),
    ("set maxLength greater than estimated maxLength", lambda n: _array("number", n),
     "self.all(x, x == 0.0)", 6291454, 3 * 1024 * 2048, 25165826),
    ("array of number maps with all", _array_of_number_maps, "self.all(x, x.y == 25.2)",
     6291452, 12, 74),
    ("index of array of number maps", _array_of_number_maps, "self[0].x > 2.0", 4, 3000, 4),
    ("extended library lowerAscii", _string, "self.lowerAscii() == 'lower!'", 314575, 10, 6),
]  # fmt: skip


@pytest.mark.parametrize(
    ("schema_of", "rule", "unbounded", "limit", "bounded"),
    [pytest.param(*case[1:], id=case[0]) for case in K8S_EXPECTED],
)
def test_estimates_match_kubernetes(
    schema_of: Any, rule: str, unbounded: int | None, limit: int, bounded: int
) -> None:
    if unbounded is not None:
        assert rule_cost(rule, decl_from_schema(schema_of(None))) == unbounded
    assert rule_cost(rule, decl_from_schema(schema_of(limit))) == bounded


def test_an_unmodelled_construct_is_refused_not_priced_at_zero() -> None:
    with pytest.raises(Unsupported):
        rule_cost("self.split(',').size() > 0", decl_from_schema(_string(10)))
    with pytest.raises(Unsupported):
        rule_cost("oldSelf == self", decl_from_schema(_string(10)))


OBJECT = {
    "type": "object",
    "properties": {"replicas": {"type": "integer"}, "name": {"type": "string", "maxLength": 8}},
}


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param("!has(self.replica) || self.replicas > 0", id="has() of a missing field"),
        pytest.param("self.nmae.size() > 0", id="a missing field"),
        pytest.param("self.replicas == '1'", id="int == string"),
        pytest.param("self.name < 3", id="string < int"),
    ],
)
def test_a_rule_that_does_not_type_check_is_refused(rule: str) -> None:
    with pytest.raises(CompileError):
        rule_cost(rule, decl_from_schema(OBJECT))


def test_map_keys_read_as_empty_strings_so_a_key_regex_costs_per_entry() -> None:
    """Why a map a rule walks needs maxProperties: the API server sizes keys at zero, but charges
    each entry the regex, and without maxProperties counts 393,215 entries in 3 MiB."""
    rule = "self.all(k, k.matches('^[a-z]+$'))"
    unbounded = rule_cost(rule, decl_from_schema(_map({"type": "string"}, None)))
    # Per entry: 2 (loop condition) + 1 (accumulator) + 1 (k) + 1 x ceil(8 x 0.25) (matches).
    assert unbounded == 393215 * 6 + 2
    assert rule_cost(rule, decl_from_schema(_map({"type": "string"}, 64))) == 64 * 6 + 2


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_every_rule_is_within_the_api_servers_budget(path: Any) -> None:
    crd = yaml.safe_load(path.read_text())
    costs = list(crd_rule_costs(crd))
    assert costs, f"{path.name} has no CEL rules to check"
    over = [c for c in costs if c.total > RULE_COST_LIMIT]
    assert not over, "\n".join(
        f"{c.path}: {c.total:,} > {RULE_COST_LIMIT:,} ({c.cost:,} x {c.cardinality}): {c.rule}"
        for c in over
    )
    total = sum(c.total for c in costs)
    assert total <= CRD_COST_LIMIT, f"{path.name}: rules cost {total:,} in all"


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_every_rules_field_path_names_a_field_of_its_schema(path: Any) -> None:
    """The API server refuses a CRD whose rule names a fieldPath its schema does not have."""
    crd = yaml.safe_load(path.read_text())
    paths = [(r, r.rule["fieldPath"]) for r in crd_rules(crd) if "fieldPath" in r.rule]
    assert paths, f"{path.name}: no rule names a fieldPath"
    for found, field_path in paths:
        decl: Decl | None = found.decl
        for part in field_path.removeprefix(".").split("."):
            decl = decl.fields.get(part) if decl is not None else None
        assert decl is not None, f"{found.path}: {field_path} is not in the schema"


GUARDED = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"type": "string", "enum": ["Rewrite", "Plain"]},
        "limit": {"type": "integer"},
        "port": {"type": "integer", "default": 8000},
        "rewrite": {
            "type": "object",
            "properties": {"path": {"type": "string", "maxLength": 64}},
        },
        "items": {
            "type": "array",
            "maxItems": 4,
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "weight": {"type": "integer"},
                },
            },
        },
    },
    "x-kubernetes-validations": [
        {"rule": "has(self.rewrite) == (self.type == 'Rewrite')", "message": "tag"},
    ],
}


@pytest.mark.parametrize(
    ("rule", "unguarded"),
    [
        pytest.param("self.limit > 0", ["self.limit"], id="an optional field, unguarded"),
        pytest.param("!has(self.limit) || self.limit > 0", [], id="guarded before"),
        pytest.param("self.limit > 0 || !has(self.limit)", [], id="guarded after: || absorbs"),
        pytest.param("has(self.limit) && self.limit > 0", [], id="guarded by &&"),
        pytest.param("has(self.limit) ? self.limit > 0 : true", [], id="guarded by ?:"),
        pytest.param("self.port > 0", [], id="a defaulted field is always there"),
        pytest.param("self.type == 'Plain' || has(self.rewrite.path)", ["self.rewrite"],
                     id="has() reads its operand"),
        pytest.param("self.type != 'Rewrite' || !has(self.rewrite.path) || "
                     "self.rewrite.path.startsWith('/')", [],
                     id="a discriminator implies its branch's field"),
        pytest.param("!has(self.items) || self.items.all(i, i.name != '')", [],
                     id="a required field of an item"),
        pytest.param("self.items.all(i, i.weight > 0)", ["self.items", "i.weight"],
                     id="an optional list and its items' optional field"),
        pytest.param("!has(self.items) || size(self.items) == 0 || !has(self.items[0].weight) "
                     "|| self.items[0].weight > 0", [], id="guarded through an index"),
    ],
)  # fmt: skip
def test_unguarded_reads_of_optional_fields_are_found(rule: str, unguarded: list[str]) -> None:
    """On an object without the field the API server's evaluation fails, refusing it."""
    assert unguarded_fields(rule, decl_from_schema(GUARDED)) == unguarded


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_no_rule_reads_an_optional_field_without_a_guard(path: Any) -> None:
    crd = yaml.safe_load(path.read_text())
    found = [
        f"{r.path}: {fields} in {r.rule['rule']}"
        for r in crd_rules(crd)
        if (fields := unguarded_fields(r.rule["rule"], r.decl))
    ]
    assert not found, "\n".join(found)
