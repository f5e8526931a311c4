"""The API server's static cost estimate of a CRD's CEL validation rules: cel-go's checker cost
model with Kubernetes' schema size estimator and library call costs, ported for the subset of
CEL trimtab's CRDs use, so a rule that a real API server would refuse for its cost fails here.

A CRD is refused when one rule's estimated cost, times the most times it can run (the maxItems
and maxProperties of the lists and maps around it), exceeds 10,000,000, or when those add up to
more than 100,000,000 over the whole schema. Sizes the schema does not bound are estimated from
the 3 MiB request limit, which is what makes an unbounded map or string expensive. A construct
this port does not model raises `Unsupported` instead of costing nothing."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from celpy import celparser
from lark import Token, Tree

# k8s.io/apiextensions-apiserver validation: StaticEstimatedCostLimit and
# StaticEstimatedCRDCostLimit.
RULE_COST_LIMIT = 10_000_000
CRD_COST_LIMIT = 100_000_000
# k8s.io/apiserver/pkg/cel DefaultMaxRequestSizeBytes.
MAX_REQUEST_SIZE = 3 * 1024 * 1024
MAX_UINT = 2**64 - 1

# cel-go common/cost.go.
SELECT_AND_IDENT_COST = 1
CONST_COST = 0
LIST_CREATE_BASE_COST = 10
MAP_CREATE_BASE_COST = 30
STRING_TRAVERSAL_COST_FACTOR = 0.1
REGEX_STRING_LENGTH_COST_FACTOR = 0.25
# Kubernetes sets PresenceTestHasCost(false): has() costs its operand only.
PRESENCE_TEST_COST = 0

ACCUMULATOR = "@result"


class Unsupported(ValueError):
    """A rule uses CEL this port does not model; extend the port rather than guess."""


class CompileError(ValueError):
    """The API server would refuse the rule before costing it: it does not type-check against
    the schema (a field the schema lacks, operands of different types)."""


# --- Sizes and costs: ranges with saturating arithmetic, as cel-go's SizeEstimate/CostEstimate.


def _add(x: int, y: int) -> int:
    return min(x + y, MAX_UINT)


def _mul(x: int, y: int) -> int:
    return min(x * y, MAX_UINT)


def _by_factor(x: int, factor: float) -> int:
    value = math.ceil(float(x) * factor)
    return MAX_UINT if value >= 2**64 else value


@dataclass(frozen=True)
class Range:
    lo: int
    hi: int

    def __add__(self, other: Range) -> Range:
        return Range(_add(self.lo, other.lo), _add(self.hi, other.hi))

    def times(self, other: Range) -> Range:
        return Range(_mul(self.lo, other.lo), _mul(self.hi, other.hi))

    def by_factor(self, factor: float) -> Range:
        return Range(_by_factor(self.lo, factor), _by_factor(self.hi, factor))

    def union(self, other: Range) -> Range:
        return Range(min(self.lo, other.lo), max(self.hi, other.hi))


def fixed(n: int) -> Range:
    return Range(n, n)


UNKNOWN = Range(0, MAX_UINT)
ZERO = fixed(0)


# --- Schema to CEL declarations (k8s.io/apiserver/pkg/cel/common/schemas.go SchemaDeclType).


@dataclass
class Decl:
    """A schema node as the API server types it for CEL: its kind, the most elements (characters,
    items, entries) it can hold, and the least bytes it takes serialized."""

    kind: str  # object, map, list, string, int, double, bool
    max_elements: int = 0
    min_size: int = 0
    fields: dict[str, Decl] = field(default_factory=dict)
    elem: Decl | None = None  # list items, map values
    key: Decl | None = None  # map keys
    # Fields every object of this schema has by the time rules run: required, or defaulted.
    always: frozenset[str] = frozenset()
    # Fields a valid object has when a discriminator has a value, from its own rules of the
    # form `self.D != 'V' || has(self.F)`: (D, V) -> {F}.
    implied: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)


MIN_SIZES = {"string": 2, "int": 1, "double": 1, "bool": 4}  # apiservercel Min*Size


def decl_from_schema(schema: dict[str, Any], resource_root: bool = False) -> Decl:
    if schema.get("x-kubernetes-int-or-string") or schema.get("format"):
        raise Unsupported(f"schema {schema} (int-or-string and formats are not modelled)")
    if resource_root:
        schema = _with_type_and_object_meta(schema)
    kind = schema.get("type")
    if kind == "array":
        items = decl_from_schema(schema["items"])
        max_items = schema.get("maxItems")
        if max_items is None:
            max_items = (MAX_REQUEST_SIZE - 2) // (items.min_size + 1)
        return Decl("list", max_elements=max_items, min_size=2, elem=items)
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            values = decl_from_schema(extra)
            max_props = schema.get("maxProperties")
            if max_props is None:
                max_props = (MAX_REQUEST_SIZE - 2) // (values.min_size + 6)
            # The keys' type is the shared StringType, whose MaxElements is 0.
            return Decl("map", max_props, 2, elem=values, key=Decl("string", 0, 2))
        required = set(schema.get("required", []))
        fields: dict[str, Decl] = {}
        min_size = 2
        for name, sub in schema.get("properties", {}).items():
            decl = decl_from_schema(sub)
            fields[name] = decl
            if name in required and "default" not in sub:
                min_size += len(name) + decl.min_size + 4
        always = frozenset(n for n, sub in schema.get("properties", {}).items()
                           if n in required or "default" in sub)  # fmt: skip
        if resource_root:
            always |= {"apiVersion", "kind", "metadata"}
        implied: dict[tuple[str, str], frozenset[str]] = {}
        for rule in schema.get("x-kubernetes-validations", []):
            if match := _TAG_NEEDS.fullmatch(rule["rule"]):
                tag = (match["tag"] or match["tag2"], match["value"] or match["value2"])
                needed = match["field"] or match["field2"]
                implied[tag] = implied.get(tag, frozenset()) | {needed}
        return Decl("object", 0, min_size, fields=fields, always=always, implied=implied)
    if kind == "string":
        if "maxLength" in schema:
            most = schema["maxLength"] * 4  # maxLength counts runes, the estimate bytes
        elif "enum" in schema:
            most = max(len(str(v)) for v in schema["enum"])
        else:
            most = MAX_REQUEST_SIZE - 2
        return Decl("string", most, MIN_SIZES["string"])
    if kind in ("integer", "number", "boolean"):
        name = {"integer": "int", "number": "double", "boolean": "bool"}[kind]
        return Decl(name, 0, MIN_SIZES[name])
    raise Unsupported(f"schema type {kind!r}")


_TAG_NEEDS = re.compile(
    r"self\.(?P<tag>\w+) != '(?P<value>[^']*)' \|\| has\(self\.(?P<field>\w+)\)"
    r"|has\(self\.(?P<field2>\w+)\) == \(self\.(?P<tag2>\w+) == '(?P<value2>[^']*)'\)"
)


def _with_type_and_object_meta(schema: dict[str, Any]) -> dict[str, Any]:
    """At a resource's root, rules may read apiVersion, kind and metadata.name/generateName;
    the API server swaps in plain strings for them unless the schema declares all four."""
    props = dict(schema.get("properties", {}))
    meta = props.get("metadata", {}).get("properties", {})
    if all(p in props for p in ("kind", "apiVersion")) and {"name", "generateName"} <= set(meta):
        return schema
    props["kind"] = {"type": "string"}
    props["apiVersion"] = {"type": "string"}
    # A name is generated from generateName before an object is validated.
    props["metadata"] = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "generateName": {"type": "string"}},
        "required": ["name"],
    }
    return {**schema, "properties": props}


# --- The expression tree, macros expanded as cel-go's parser expands them.

_ids = iter(range(1, 1 << 62))


@dataclass(eq=False)
class Expr:
    id: int = field(default_factory=lambda: next(_ids), init=False)


@dataclass(eq=False)
class Lit(Expr):
    value: Any
    kind: str  # string, bytes, int, uint, double, bool, null


@dataclass(eq=False)
class Ident(Expr):
    name: str


@dataclass(eq=False)
class Select(Expr):
    operand: Expr
    field: str
    test_only: bool = False


@dataclass(eq=False)
class Call(Expr):
    function: str
    args: list[Expr]
    target: Expr | None = None


@dataclass(eq=False)
class ListLit(Expr):
    elements: list[Expr]


@dataclass(eq=False)
class Comprehension(Expr):
    iter_var: str
    iter_range: Expr
    accu_init: Expr
    loop_condition: Expr
    loop_step: Expr
    result: Expr


_BINARY = {
    "relation_lt": "_<_", "relation_le": "_<=_", "relation_gt": "_>_", "relation_ge": "_>=_",
    "relation_eq": "_==_", "relation_ne": "_!=_", "relation_in": "@in",
    "addition_add": "_+_", "addition_sub": "_-_",
    "multiplication_mul": "_*_", "multiplication_div": "_/_", "multiplication_mod": "_%_",
}  # fmt: skip

_PARSER = celparser.CELParser()


def parse(rule: str) -> Expr:
    return _convert(_PARSER.parse(rule))


def _accu() -> Ident:
    return Ident(ACCUMULATOR)


def _macro(name: str, target: Expr, args: list[Expr]) -> Expr:
    if not isinstance(args[0], Ident):
        raise Unsupported(f"{name}() needs a simple name first")
    var = args[0].name
    if name == "all":
        return Comprehension(var, target, Lit(True, "bool"),
                             Call("@not_strictly_false", [_accu()]),
                             Call("_&&_", [_accu(), args[1]]), _accu())  # fmt: skip
    if name == "exists":
        return Comprehension(var, target, Lit(False, "bool"),
                             Call("@not_strictly_false", [Call("!_", [_accu()])]),
                             Call("_||_", [_accu(), args[1]]), _accu())  # fmt: skip
    if name == "exists_one":
        step = Call("_?_:_", [args[1], Call("_+_", [_accu(), Lit(1, "int")]), _accu()])
        return Comprehension(var, target, Lit(0, "int"), Lit(True, "bool"), step,
                             Call("_==_", [_accu(), Lit(1, "int")]))  # fmt: skip
    if name == "filter":
        step = Call("_?_:_", [args[1], Call("_+_", [_accu(), ListLit([args[0]])]), _accu()])
        return Comprehension(var, target, ListLit([]), Lit(True, "bool"), step, _accu())
    if name == "map" and len(args) == 2:
        step = Call("_+_", [_accu(), ListLit([args[1]])])
        return Comprehension(var, target, ListLit([]), Lit(True, "bool"), step, _accu())
    raise Unsupported(f"macro {name}")


_MACROS = {"all", "exists", "exists_one", "filter", "map"}


def _children(tree: Tree[Any]) -> list[Any]:
    return [c for c in tree.children if c is not None]


def _convert(node: Any) -> Expr:
    if isinstance(node, Token):
        raise Unsupported(f"token {node!r}")
    kids = _children(node)
    rule = node.data
    if rule == "expr":
        if len(kids) == 1:
            return _convert(kids[0])
        return Call("_?_:_", [_convert(k) for k in kids])
    if rule in ("conditionalor", "conditionaland"):
        if len(kids) == 1:
            return _convert(kids[0])
        op = "_||_" if rule == "conditionalor" else "_&&_"
        return Call(op, [_convert(kids[0]), _convert(kids[1])])
    if rule in ("relation", "addition", "multiplication"):
        if len(kids) == 1:
            return _convert(kids[0])
        operator, rhs = kids
        return Call(_BINARY[operator.data], [_convert(_children(operator)[0]), _convert(rhs)])
    if rule == "unary":
        if len(kids) == 1:
            return _convert(kids[0])
        op = "!_" if kids[0].data == "unary_not" else "-_"
        return Call(op, [_convert(kids[1])])
    if rule in ("member", "primary", "paren_expr"):
        return _convert(kids[0])
    if rule == "member_dot":
        return Select(_convert(kids[0]), str(kids[1]))
    if rule == "member_dot_arg":
        target = _convert(kids[0])
        name = str(kids[1])
        args = [_convert(e) for e in _children(kids[2])] if len(kids) > 2 else []
        if name in _MACROS:
            return _macro(name, target, args)
        return Call(name, args, target)
    if rule == "member_index":
        return Call("_[_]", [_convert(kids[0]), _convert(kids[1])])
    if rule == "ident":
        return Ident(str(kids[0]))
    if rule == "ident_arg":
        name = str(kids[0])
        args = [_convert(e) for e in _children(kids[1])] if len(kids) > 1 else []
        if name == "has":
            if len(args) != 1 or not isinstance(args[0], Select):
                raise Unsupported("has() takes one field selection")
            return Select(args[0].operand, args[0].field, test_only=True)
        return Call(name, args)
    if rule == "list_lit":
        return ListLit([_convert(e) for e in _children(kids[0])] if kids else [])
    if rule == "literal":
        return _literal(kids[0])
    raise Unsupported(f"grammar rule {rule}")


def _literal(token: Token) -> Lit:
    text = str(token)
    if token.type in ("STRING_LIT", "MLSTRING_LIT"):
        return Lit(_unquote(text), "string")
    if token.type == "INT_LIT":
        return Lit(int(text, 0), "int")
    if token.type == "UINT_LIT":
        return Lit(int(text[:-1], 0), "uint")
    if token.type == "FLOAT_LIT":
        return Lit(float(text), "double")
    if token.type == "BOOL_LIT":
        return Lit(text == "true", "bool")
    if token.type == "NULL_LIT":
        return Lit(None, "null")
    raise Unsupported(f"literal {text}")


_ESCAPE = re.compile(
    r"""\\(?:[abfnrtv"'\\?`]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3})"""
)


def _unquote(text: str) -> str:
    raw = text[0] in "rR"
    if raw:
        text = text[1:]
    quote = 3 if text[:3] in ('"""', "'''") else 1
    body = text[quote:-quote]
    if raw:
        return body
    # Each escape is one character: only the string's length matters here.
    return _ESCAPE.sub("x", body)


# --- Types, as far as the cost model needs them to pick an overload.


@dataclass(frozen=True)
class Type:
    kind: str  # object, map, list, string, bytes, int, uint, double, bool, null, duration, dyn
    decl: Decl | None = None
    elem: Type | None = None


def _type_of_decl(decl: Decl) -> Type:
    if decl.kind == "list":
        assert decl.elem is not None
        return Type("list", decl, _type_of_decl(decl.elem))
    if decl.kind == "map":
        assert decl.elem is not None
        return Type("map", decl, _type_of_decl(decl.elem))
    return Type(decl.kind, decl)


SCALARS = {"bool", "double", "duration", "int", "timestamp", "uint"}
# Functions whose cost is cel-go's default: 1 plus their arguments.
CONSTANT_TIME = {
    "size": "int", "duration": "duration", "timestamp": "timestamp", "int": "int",
    "uint": "uint", "double": "double", "string": "string", "@not_strictly_false": "bool",
    "!_": "bool", "-_": None, "_-_": None, "_*_": None, "_/_": None, "_%_": None,
}  # fmt: skip
STRING_PREDICATES = {"matches", "contains", "startsWith", "endsWith"}
# Kubernetes' library estimator: a traversal of the target string, and a result as long.
STRING_TRAVERSALS = {"lowerAscii", "upperAscii", "trim"}
COMPARISONS = {"_<_", "_<=_", "_>_", "_>=_"}


@dataclass
class _Local:
    path: list[str]
    size: Range | None
    type: Type
    entry: tuple[str, Range, Range] | None = None  # container kind, key size, value size


class Coster:
    """cel-go's checker coster (checker/cost.go) with Kubernetes' CRD size estimator."""

    def __init__(self, root: Decl) -> None:
        self.root = root
        self.paths: dict[int, list[str]] = {}
        self.sizes: dict[int, Range] = {}
        self.entries: dict[int, tuple[str, Range, Range]] = {}
        self.types: dict[int, Type] = {}
        self.locals: dict[str, list[_Local]] = {"self": []}
        # Selections of an object's field that the object may lack (not required, no default).
        self.optional: set[int] = set()
        # Fields a comparison of a discriminator implies, when it is true: `x.type == 'V'`.
        self.tag_facts: dict[int, frozenset[str]] = {}

    # Kubernetes' sizeEstimator: follow the path from `self` through the schema.
    def _estimate_size(self, path: list[str]) -> Range | None:
        if not path:
            return None
        node: Decl | None = self.root
        for name in path[1:]:
            if node is None:
                return None
            if name in ("@items", "@values"):
                node = node.elem
            elif name == "@keys":
                node = node.key
            else:
                node = node.fields.get(name)
        if node is None:
            return None
        return Range(0, node.max_elements)

    def _local(self, name: str) -> _Local | None:
        stack = self.locals.get(name)
        return stack[-1] if stack else None

    def path_of(self, e: Expr) -> list[str]:
        if isinstance(e, Ident) and (var := self._local(e.name)) is not None:
            return list(var.path)
        return list(self.paths.get(e.id, []))

    def compute_size(self, e: Expr) -> Range | None:
        if e.id in self.sizes:
            return self.sizes[e.id]
        if isinstance(e, Lit):
            if e.kind in ("string", "bytes"):
                return fixed(len(e.value))
            return fixed(1)
        if isinstance(e, ListLit):
            return fixed(len(e.elements))
        if (size := self._estimate_size(self.path_of(e))) is not None:
            self.sizes[e.id] = size
            return size
        if self.types[e.id].kind in SCALARS:
            return fixed(1)
        if isinstance(e, Ident) and (var := self._local(e.name)) is not None:
            return var.size
        return None

    def size_or_unknown(self, e: Expr) -> Range:
        size = self.compute_size(e)
        return UNKNOWN if size is None else size

    def entry_size(self, e: Expr) -> tuple[str, Range, Range] | None:
        if e.id in self.entries:
            return self.entries[e.id]
        if isinstance(e, Ident) and (var := self._local(e.name)) is not None:
            return var.entry
        return None

    # Costs.
    def cost(self, e: Expr) -> Range:
        if isinstance(e, Lit):
            self.types[e.id] = Type(e.kind)
            return fixed(CONST_COST)
        if isinstance(e, Ident):
            return self._ident(e)
        if isinstance(e, Select):
            return self._select(e)
        if isinstance(e, Call):
            return self._call(e)
        if isinstance(e, ListLit):
            return self._list(e)
        if isinstance(e, Comprehension):
            return self._comprehension(e)
        raise Unsupported(type(e).__name__)

    def _ident(self, e: Ident) -> Range:
        var = self._local(e.name)
        if e.name == "self" and var is None:
            self.paths[e.id] = ["self"]
            self.types[e.id] = _type_of_decl(self.root)
        elif var is not None:
            self.paths[e.id] = list(var.path)
            self.types[e.id] = var.type
        else:
            raise Unsupported(f"variable {e.name} (only self is declared; oldSelf is not modelled)")
        return fixed(SELECT_AND_IDENT_COST)

    def _select(self, e: Select) -> Range:
        operand_cost = self.cost(e.operand)
        operand = self.types[e.operand.id]
        if operand.kind == "object":
            assert operand.decl is not None
            decl = operand.decl.fields.get(e.field)
            if decl is None:
                raise CompileError(f"undefined field '{e.field}'")
        if e.test_only:
            self.types[e.id] = Type("bool")
            return fixed(PRESENCE_TEST_COST) + operand_cost
        if operand.kind == "object":
            assert decl is not None and operand.decl is not None
            self.types[e.id] = _type_of_decl(decl)
            if e.field not in operand.decl.always:
                self.optional.add(e.id)
        elif operand.kind == "map":
            assert operand.elem is not None
            self.types[e.id] = operand.elem
        else:
            raise Unsupported(f"select .{e.field} on {operand.kind}")
        self.paths[e.id] = self.path_of(e.operand) + [e.field]
        return operand_cost + fixed(SELECT_AND_IDENT_COST)

    def _list(self, e: ListLit) -> Range:
        total = ZERO
        item = Range(MAX_UINT, 0) if e.elements else ZERO
        elem_type = Type("dyn")
        for i, element in enumerate(e.elements):
            total = total + self.cost(element)
            item = item.union(self.size_or_unknown(element))
            if i == 0:
                elem_type = self.types[element.id]
        self.entries[e.id] = ("list", fixed(1), item)
        self.types[e.id] = Type("list", None, elem_type)
        return total + fixed(LIST_CREATE_BASE_COST)

    def _comprehension(self, e: Comprehension) -> Range:
        total = self.cost(e.iter_range) + self.cost(e.accu_init)
        accu_type = self.types[e.accu_init.id]
        self.locals.setdefault(ACCUMULATOR, []).append(
            _Local(self.path_of(e.accu_init), self.compute_size(e.accu_init), accu_type,
                   self.entry_size(e.accu_init))  # fmt: skip
        )
        range_type = self.types[e.iter_range.id]
        entry = self.entry_size(e.iter_range)
        container = entry[0] if entry else range_type.kind
        if container == "list":
            subpath, var_size = "@items", entry[2] if entry else None
            var_type = range_type.elem or Type("dyn")
        elif container == "map":
            subpath, var_size = "@keys", entry[1] if entry else None
            var_type = Type("string", range_type.decl.key if range_type.decl else None)
        else:
            raise Unsupported(f"comprehension over {container}")
        self.locals.setdefault(e.iter_var, []).append(
            _Local(self.path_of(e.iter_range) + [subpath], var_size, var_type)
        )
        loop = self.cost(e.loop_condition)
        step = self.cost(e.loop_step)
        self.locals[e.iter_var].pop()
        total = total + self.cost(e.result)
        self.locals[ACCUMULATOR].pop()
        count = self.size_or_unknown(e.iter_range)
        total = total + count.times(step + loop)
        if isinstance(e.accu_init, Lit):
            size = self.compute_size(e.accu_init)
            if size is not None:
                self.sizes[e.id] = size
        elif isinstance(e.accu_init, ListLit):
            self.sizes[e.id] = count
            if (step_entry := self.entry_size(e.loop_step)) is not None:
                self.entries[e.id] = step_entry
        self.types[e.id] = self.types[e.result.id]
        return total

    def _call(self, e: Call) -> Range:
        arg_costs = [self.cost(a) for a in e.args]
        total = ZERO
        if e.target is not None:
            total = self.cost(e.target)
        fn_cost, result_size = self._function_cost(e, arg_costs)
        if e.function == "_[_]":
            container = self.types[e.args[0].id]
            entry = self.entry_size(e.args[0])
            result_size = entry[2] if entry else None
            sub = "@items" if container.kind == "list" else "@values"
            self.paths[e.id] = self.path_of(e.args[0]) + [sub]
        if result_size is None:
            result_size = self.compute_size(e)
        if result_size is not None:
            self.sizes[e.id] = result_size
        return total + fn_cost

    def _function_cost(self, e: Call, arg_costs: list[Range]) -> tuple[Range, Range | None]:
        fn, args = e.function, e.args
        arg_sum = ZERO
        for c in arg_costs:
            arg_sum = arg_sum + c
        types = [self.types[a.id] for a in args]
        target = self.types[e.target.id] if e.target is not None else None

        if fn in STRING_TRAVERSALS and e.target is not None:
            self.types[e.id] = Type("string")
            size = self.size_or_unknown(e.target)
            return size.by_factor(STRING_TRAVERSAL_COST_FACTOR) + arg_sum, size
        if fn in STRING_PREDICATES and e.target is not None and len(args) == 1:
            self._require(target, "string", fn)
            self.types[e.id] = Type("bool")
            string = self.size_or_unknown(e.target)
            arg = self.size_or_unknown(args[0])
            if fn == "matches":
                str_cost = (string + fixed(1)).by_factor(STRING_TRAVERSAL_COST_FACTOR)
                regex_cost = arg.by_factor(REGEX_STRING_LENGTH_COST_FACTOR)
                return str_cost.times(regex_cost) + arg_sum, None
            if fn == "contains":
                str_cost = string.by_factor(STRING_TRAVERSAL_COST_FACTOR)
                sub_cost = arg.by_factor(STRING_TRAVERSAL_COST_FACTOR)
                return str_cost.times(sub_cost) + arg_sum, None
            return arg.by_factor(STRING_TRAVERSAL_COST_FACTOR) + arg_sum, None
        if fn in ("_&&_", "_||_"):
            self.types[e.id] = Type("bool")
            lhs, rhs = arg_costs
            return Range(lhs.lo, (lhs + rhs).hi), None
        if fn == "_?_:_":
            self.types[e.id] = types[1] if types[1].kind != "dyn" else types[2]
            size = self.size_or_unknown(args[1]).union(self.size_or_unknown(args[2]))
            left, right = self.entry_size(args[1]), self.entry_size(args[2])
            if left is not None and right is not None:
                self.entries[e.id] = (left[0], left[1].union(right[1]), left[2].union(right[2]))
            return arg_costs[0] + arg_costs[1].union(arg_costs[2]), size
        if fn == "_+_" and types[0].kind in ("string", "bytes", "list"):
            self.types[e.id] = types[0]
            if types[0].kind == "list" and (types[0].elem is None or types[0].elem.kind == "dyn"):
                self.types[e.id] = types[1]
            result = self.size_or_unknown(args[0]) + self.size_or_unknown(args[1])
            left, right = self.entry_size(args[0]), self.entry_size(args[1])
            if left is not None and right is not None:
                self.entries[e.id] = (left[0], left[1].union(right[1]), left[2].union(right[2]))
            if types[0].kind == "list":
                return fixed(1) + arg_sum, result
            return result.by_factor(STRING_TRAVERSAL_COST_FACTOR) + arg_sum, result
        if fn in ("_==_", "_!=_") or fn in COMPARISONS:
            _same_type(fn, types[0], types[1])
        if fn in ("_==_", "_!=_"):
            self._note_tag(e)
        if fn in ("_==_", "_!=_") or (
            fn in COMPARISONS and types[0].kind in ("string", "bytes")
        ):
            self.types[e.id] = Type("bool")
            lhs, rhs = self.size_or_unknown(args[0]), self.size_or_unknown(args[1])
            smallest = min(lhs.hi, rhs.hi)
            return Range(1 if smallest > 0 else 0, smallest).by_factor(
                STRING_TRAVERSAL_COST_FACTOR
            ) + arg_sum, None
        if fn == "@in":
            self.types[e.id] = Type("bool")
            if types[1].kind == "list":
                return self.size_or_unknown(args[1]).by_factor(1) + arg_sum, None
            return fixed(1) + arg_sum, None
        if fn == "_[_]":
            container = types[0]
            self.types[e.id] = container.elem or Type("dyn")
            return fixed(1) + arg_sum, None
        if fn in COMPARISONS:
            self.types[e.id] = Type("bool")
            return fixed(1) + arg_sum, None
        if fn in CONSTANT_TIME:
            result = CONSTANT_TIME[fn]
            self.types[e.id] = Type(result) if result else types[0]
            return fixed(1) + arg_sum, None
        if fn == "_+_":  # numbers, durations: O(1)
            self.types[e.id] = types[0]
            return fixed(1) + arg_sum, None
        raise Unsupported(f"function {fn}")

    def _note_tag(self, e: Call) -> None:
        tag, value = e.args
        if not (isinstance(tag, Select) and isinstance(value, Lit) and value.kind == "string"):
            return
        owner = self.types[tag.operand.id]
        base = _key(tag.operand)
        if owner.kind != "object" or owner.decl is None or base is None:
            return
        fields = owner.decl.implied.get((tag.field, value.value), frozenset())
        if fields:
            self.tag_facts[e.id] = frozenset(f"{base}.{f}" for f in fields)

    @staticmethod
    def _require(actual: Type | None, kind: str, fn: str) -> None:
        if actual is None or actual.kind != kind:
            raise Unsupported(f"{fn} on {actual.kind if actual else 'nothing'}")


NUMBERS = {"int", "uint", "double"}


def _same_type(fn: str, lhs: Type, rhs: Type) -> None:
    """cel-go finds no overload of ==, != or an ordering for operands of different types
    (numbers aside: Kubernetes allows cross-type numeric comparisons)."""
    loose = {"dyn", "null"}
    if lhs.kind in loose or rhs.kind in loose or lhs.kind == rhs.kind:
        return
    if lhs.kind in NUMBERS and rhs.kind in NUMBERS:
        return
    raise CompileError(f"no matching overload for '{fn}' applied to ({lhs.kind}, {rhs.kind})")


def unguarded_fields(rule: str, decl: Decl) -> list[str]:
    """The optional fields `rule` reads without a has() that guarantees them. On an object
    without such a field the API server's evaluation fails ("no such key") and the object is
    refused, however valid. CEL's && and || absorb an error on one side when the other side
    decides the result, so a guard may stand on either side."""
    coster = Coster(decl)
    expr = parse(rule)
    coster.cost(expr)
    return _Guards(coster).unguarded(expr)


def _key(e: Expr) -> str | None:
    """A name for the value `e` reads, the same wherever it is read: `self.matches[0].path`."""
    if isinstance(e, Ident):
        return e.name
    if isinstance(e, Select) and (operand := _key(e.operand)) is not None:
        return f"{operand}.{e.field}"
    if not (isinstance(e, Call) and e.function == "_[_]" and isinstance(e.args[1], Lit)):
        return None
    container = _key(e.args[0])
    return None if container is None else f"{container}[{e.args[1].value!r}]"


class _Guards:
    """Which fields each condition guarantees when it is true or false."""

    def __init__(self, coster: Coster) -> None:
        self.coster = coster
        self.found: list[str] = []

    def unguarded(self, e: Expr) -> list[str]:
        self._check(e, frozenset())
        return self.found

    def when_true(self, e: Expr) -> frozenset[str]:
        if isinstance(e, Select) and e.test_only and (operand := _key(e.operand)) is not None:
            return frozenset({f"{operand}.{e.field}"})
        if isinstance(e, Call) and e.function == "_==_":
            return self.coster.tag_facts.get(e.id, frozenset())
        if isinstance(e, Call) and e.function == "_&&_":
            return self.when_true(e.args[0]) | self.when_true(e.args[1])
        if isinstance(e, Call) and e.function == "_||_":
            return self.when_true(e.args[0]) & self.when_true(e.args[1])
        if isinstance(e, Call) and e.function == "!_":
            return self.when_false(e.args[0])
        return frozenset()

    def when_false(self, e: Expr) -> frozenset[str]:
        if isinstance(e, Call) and e.function == "_!=_":
            return self.coster.tag_facts.get(e.id, frozenset())
        if isinstance(e, Call) and e.function == "_&&_":
            return self.when_false(e.args[0]) & self.when_false(e.args[1])
        if isinstance(e, Call) and e.function == "_||_":
            return self.when_false(e.args[0]) | self.when_false(e.args[1])
        if isinstance(e, Call) and e.function == "!_":
            return self.when_true(e.args[0])
        return frozenset()

    def _check(self, e: Expr, known: frozenset[str]) -> None:
        if isinstance(e, Select):
            self._check(e.operand, known)
            key = _key(e)
            if not e.test_only and e.id in self.coster.optional and key not in known:
                self.found.append(key or f"?.{e.field}")
        elif isinstance(e, Call) and e.function in ("_&&_", "_||_"):
            lhs, rhs = e.args
            side = self.when_true if e.function == "_&&_" else self.when_false
            self._check(lhs, known | side(rhs))
            self._check(rhs, known | side(lhs))
        elif isinstance(e, Call) and e.function == "_?_:_":
            condition, if_true, if_false = e.args
            self._check(condition, known)
            self._check(if_true, known | self.when_true(condition))
            self._check(if_false, known | self.when_false(condition))
        elif isinstance(e, Call):
            for sub in [*([e.target] if e.target is not None else []), *e.args]:
                self._check(sub, known)
        elif isinstance(e, ListLit):
            for sub in e.elements:
                self._check(sub, known)
        elif isinstance(e, Comprehension):
            for sub in (e.iter_range, e.accu_init, e.loop_condition, e.loop_step, e.result):
                self._check(sub, known)


def rule_cost(rule: str, decl: Decl) -> int:
    """The API server's estimated worst-case cost of one evaluation of `rule` on `decl`."""
    return Coster(decl).cost(parse(rule)).hi


@dataclass(frozen=True)
class RuleCost:
    path: str
    rule: str
    cost: int  # one evaluation
    cardinality: int  # the most evaluations per object
    total: int  # cost x cardinality: what the API server holds to RULE_COST_LIMIT


@dataclass(frozen=True)
class CrdRule:
    path: str
    rule: dict[str, Any]  # as written: rule, message, fieldPath...
    decl: Decl  # what `self` is
    cardinality: int | None  # the most evaluations per object; None under an unbounded list


def crd_rules(crd: dict[str, Any]) -> Iterator[CrdRule]:
    """Every rule of every version of `crd`."""
    for version in crd["spec"]["versions"]:
        yield from _walk(version["schema"]["openAPIV3Schema"], version["name"], 1, True)


def crd_rule_costs(crd: dict[str, Any]) -> Iterator[RuleCost]:
    """Every rule of `crd`, with the cost the API server estimates for it."""
    for found in crd_rules(crd):
        if found.cardinality is None:
            # The API server would multiply by a count estimated from the request size limit;
            # no rule of trimtab's should depend on that.
            raise Unsupported(f"{found.path}: rules under a list or map without a bound")
        if "messageExpression" in found.rule:
            raise Unsupported("messageExpression is not modelled")
        cost = rule_cost(found.rule["rule"], found.decl)
        total = _mul(cost, found.cardinality)
        yield RuleCost(found.path, found.rule["rule"], cost, found.cardinality, total)


def _walk(
    schema: dict[str, Any], path: str, cardinality: int | None, root: bool
) -> Iterator[CrdRule]:
    rules = schema.get("x-kubernetes-validations") or []
    if rules:
        decl = decl_from_schema(schema, resource_root=root)
        for rule in rules:
            yield CrdRule(path, rule, decl, cardinality)
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}", cardinality, False)
    if schema.get("type") == "array":
        yield from _walk(schema["items"], f"{path}[]", _times(cardinality, schema, "maxItems"),
                         False)  # fmt: skip
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        count = _times(cardinality, schema, "maxProperties")
        yield from _walk(extra, f"{path}{{}}", count, False)


def _times(cardinality: int | None, schema: dict[str, Any], key: str) -> int | None:
    if cardinality is None or key not in schema:
        return None
    return _mul(cardinality, int(schema[key]))
