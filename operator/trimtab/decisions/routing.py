"""What a route's controller says of the route a mesh router wrote (a Gateway's report in an
HTTPRoute's status, istiod's in a VirtualService's), and the `RouteAccepted` condition that
carries it to the ModelDeployment's status; and what taking over a user's HTTPRoute would
drop of its rules.

Pure: these read the route object the write returned, and never ask the cluster."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from trimtab.api.common import Condition, ConditionStatus
from trimtab.api.rollout import CONDITION_ROUTE_ACCEPTED, GatewayApiRouterSpec
from trimtab.decisions.conditions import is_news, remove_condition, set_condition

Manifest = dict[str, Any]


@dataclass(frozen=True)
class RouteHealth:
    """What the route's controller says of a route trimtab wrote: `status` is "True" when
    every parent (Gateway) accepted it and resolved its backends, "False" when one refused
    (`reason` is the refusal's), "Unknown" while a parent has not reported on it."""

    status: ConditionStatus
    reason: str
    message: str


def _parent_key(ref: Manifest, namespace: str) -> tuple[str, str, str, str, str, str]:
    """A parentRef with the API's defaults filled in, so spec and status entries compare."""
    return (
        str(ref.get("group", "gateway.networking.k8s.io")),
        str(ref.get("kind", "Gateway")),
        str(ref.get("namespace") or namespace),
        str(ref.get("name", "")),
        str(ref.get("sectionName", "")),
        str(ref.get("port", "")),
    )


def _parent_text(ref: Manifest, namespace: str) -> str:
    group, kind, ns, name, section, port = _parent_key(ref, namespace)
    where = f"{kind} {ns}/{name}"
    if section:
        where += f" section {section}"
    if port:
        where += f" port {port}"
    return where


def http_route_health(route: Manifest) -> RouteHealth:
    """Read an HTTPRoute's `status.parents` against its `spec.parentRefs`.

    A parent that has not reported (no entry for it) is Unknown: its controller has not yet
    seen the route, or the Gateway named does not exist or has no controller running. A
    condition `Accepted` or `ResolvedRefs` that is False is a refusal, named with the
    Gateway's own reason and message. Conditions written for an earlier generation are still
    read (acceptance rarely depends on weights, and the apply that just changed them returns
    the status the controller has not caught up with yet).

    >>> route = {"metadata": {"name": "llama", "namespace": "ml", "generation": 2},
    ...          "spec": {"parentRefs": [{"name": "main", "namespace": "infra"}]}}
    >>> http_route_health(route).status
    'Unknown'
    >>> ok = {"type": "Accepted", "status": "True", "reason": "Accepted"}
    >>> refs = {"type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound",
    ...         "message": "service ml/llama-abc not found"}
    >>> route["status"] = {"parents": [{"parentRef": {"name": "main", "namespace": "infra"},
    ...     "controllerName": "example.io/gateway", "conditions": [ok, refs]}]}
    >>> health = http_route_health(route)
    >>> health.status, health.reason
    ('False', 'BackendNotFound')
    >>> health.message
    'HTTPRoute llama: Gateway infra/main cannot resolve its backends (BackendNotFound: service ml/llama-abc not found)'
    >>> refs.update(status="True", reason="ResolvedRefs", message="")
    >>> http_route_health(route)
    RouteHealth(status='True', reason='Accepted', message='HTTPRoute llama: accepted by Gateway infra/main')
    """  # noqa: E501
    meta = route.get("metadata", {})
    name = str(meta.get("name", ""))
    namespace = str(meta.get("namespace", ""))
    wanted = route.get("spec", {}).get("parentRefs") or []
    reported: dict[tuple[str, ...], list[Manifest]] = {}
    for parent in (route.get("status") or {}).get("parents") or []:
        key = _parent_key(parent.get("parentRef") or {}, namespace)
        reported.setdefault(key, []).extend(parent.get("conditions") or [])
    if not wanted:
        return RouteHealth(
            "Unknown", "NoParents", f"HTTPRoute {name} has no parentRefs: no Gateway serves it"
        )
    refused: list[tuple[str, str]] = []
    pending: list[str] = []
    accepted: list[str] = []
    for ref in wanted:
        where = _parent_text(ref, namespace)
        conditions = {c.get("type"): c for c in reported.get(_parent_key(ref, namespace), [])}
        problems = [
            (c.get("reason") or kind, f"{where} {what} ({c.get('reason') or kind}"
             + (f": {c['message']}" if c.get("message") else "") + ")")
            for kind, what in (
                ("Accepted", "did not accept it"),
                ("ResolvedRefs", "cannot resolve its backends"),
            )
            if (c := conditions.get(kind)) is not None and c.get("status") == "False"
        ]  # fmt: skip
        if problems:
            refused.extend(problems)
        elif (conditions.get("Accepted") or {}).get("status") == "True":
            accepted.append(where)
        else:
            pending.append(where)
    if refused:
        return RouteHealth(
            "False", refused[0][0], f"HTTPRoute {name}: " + "; ".join(p for _, p in refused)
        )
    if pending:
        return RouteHealth(
            "Unknown",
            "Pending",
            f"HTTPRoute {name}: no report yet from " + ", ".join(pending) + " (the Gateway may "
            "not exist, or no controller serves it)",
        )
    return RouteHealth("True", "Accepted", f"HTTPRoute {name}: accepted by " + ", ".join(accepted))


def virtual_service_health(vs: Manifest) -> RouteHealth:
    """Read what istiod writes in a VirtualService's status: analysis messages (only where
    istiod runs its analysis) and the `Reconciled` condition (only with status enabled).
    An ERROR message is a refusal; without either, Istio reported nothing against the route.

    >>> vs = {"metadata": {"name": "llama"}, "status": {"validationMessages": [
    ...     {"level": "ERROR", "type": {"code": "IST0101", "name": "ReferencedResourceNotFound"},
    ...      "documentationUrl": "https://istio.io/latest/docs/reference/config/analysis/ist0101/"}]}}
    >>> health = virtual_service_health(vs)
    >>> health.status, health.reason
    ('False', 'ReferencedResourceNotFound')
    >>> virtual_service_health({"metadata": {"name": "llama"}}).status
    'True'
    """  # noqa: E501
    name = str(vs.get("metadata", {}).get("name", ""))
    status = vs.get("status") or {}
    errors = [m for m in status.get("validationMessages") or [] if m.get("level") == "ERROR"]
    if errors:
        texts = []
        for m in errors:
            kind = m.get("type") or {}
            text = " ".join(str(x) for x in (kind.get("code"), kind.get("name")) if x)
            if m.get("documentationUrl"):
                text += f" (see {m['documentationUrl']})"
            texts.append(text or "an error")
        reason = str((errors[0].get("type") or {}).get("name") or "ValidationError")
        return RouteHealth(
            "False", reason, f"VirtualService {name}: Istio reports " + "; ".join(texts)
        )
    reconciled = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Reconciled"), None
    )
    if reconciled is not None and reconciled.get("status") == "True":
        return RouteHealth("True", "Reconciled", f"VirtualService {name}: reconciled by istiod")
    if reconciled is not None:
        return RouteHealth(
            "Unknown",
            "Pending",
            f"VirtualService {name}: istiod has not yet pushed it to every proxy"
            + (f" ({reconciled['message']})" if reconciled.get("message") else ""),
        )
    return RouteHealth("True", "NoErrorsReported", f"VirtualService {name}: Istio reports no error")



def route_condition(
    conditions: list[Condition], health: RouteHealth | None, routed: bool, now: str
) -> list[Condition]:
    """`conditions` with `RouteAccepted` as `health` says. `routed` is False where no route
    object exists (the replica router): the condition goes. `health` None (no route written
    this loop) keeps what the last loop found.

    >>> bad = RouteHealth("False", "NotAllowedByListeners", "HTTPRoute llama: ...")
    >>> [(c.type, c.status, c.reason) for c in route_condition([], bad, True, "t")]
    [('RouteAccepted', 'False', 'NotAllowedByListeners')]
    >>> route_condition(route_condition([], bad, True, "t"), None, False, "t")
    []
    """
    if not routed:
        return remove_condition(conditions, CONDITION_ROUTE_ACCEPTED)
    if health is None:
        return conditions
    message = health.message[:1000]
    return set_condition(
        conditions, CONDITION_ROUTE_ACCEPTED, health.status, health.reason, message, now
    )


def refusal_to_report(conditions: list[Condition], health: RouteHealth | None) -> str | None:
    """The message of a route refusal that is news (the route was not refused before, or is
    now for another reason), for one Warning per refusal rather than one per loop; None
    otherwise.

    >>> bad = RouteHealth("False", "NotAllowedByListeners", "HTTPRoute llama: refused")
    >>> refusal_to_report([], bad)
    'HTTPRoute llama: refused'
    >>> refusal_to_report(route_condition([], bad, True, "t"), bad) is None
    True
    """
    if health is None or health.status != "False":
        return None
    if not is_news(conditions, CONDITION_ROUTE_ACCEPTED, "False", health.reason):
        return None
    return health.message


def _match_key(match: Manifest) -> str:
    """A route match with the HTTPRoute CRD's defaults filled in, as a comparable string."""
    path = match.get("path") or {}
    out: Manifest = {
        "path": {"type": path.get("type", "PathPrefix"), "value": path.get("value", "/")}
    }
    for key in ("headers", "queryParams"):
        if match.get(key):
            out[key] = sorted(
                ({"type": "Exact", **item} for item in match[key]), key=lambda i: str(i["name"])
            )
    if match.get("method"):
        out["method"] = match["method"]
    return json.dumps(out, sort_keys=True)


def _match_text(match: Manifest) -> str:
    path = match.get("path") or {}
    text = f"{path.get('type', 'PathPrefix')} {path.get('value', '/')}"
    if match.get("method"):
        text = f"{match['method']} {text}"
    extra = [str(h.get("name")) for h in match.get("headers") or []]
    extra += [f"?{q.get('name')}" for q in match.get("queryParams") or []]
    return f"{text} ({', '.join(extra)})" if extra else text


def _filter_text(f: Manifest) -> str:
    ref = f.get("extensionRef") or f.get("requestMirror", {}).get("backendRef")
    return f"{f.get('type')} {ref.get('name')}" if isinstance(ref, dict) else str(f.get("type"))


def takeover_losses(route: Manifest, router: GatewayApiRouterSpec, owner_name: str) -> list[str]:
    """What the rules of a route `router` takes over (httpRoute, no parentRefs) hold that the
    one rule trimtab writes there would not: their matches, filters, timeouts and retry that
    router.matches, router.filters, router.timeouts and router.retries do not repeat. Empty
    once trimtab's rule is the route's (or it was never more than that). Backends are not
    listed: pointing the route at the model's revisions is what a takeover is for.

    >>> gw = GatewayApiRouterSpec(type="gatewayApi", http_route="public")
    >>> rewrite = {"type": "URLRewrite", "urlRewrite": {"hostname": "llm.internal"}}
    >>> route = {"spec": {"rules": [
    ...     {"backendRefs": [{"name": "old"}], "filters": [rewrite]},
    ...     {"matches": [{"path": {"value": "/v2"}}], "backendRefs": [{"name": "other"}]}]}}
    >>> takeover_losses(route, gw, "llm")
    ['filter URLRewrite', 'match PathPrefix /v2']
    >>> kept = GatewayApiRouterSpec.model_validate({**gw.to_wire(), "filters": [rewrite]})
    >>> takeover_losses({"spec": {"rules": route["spec"]["rules"][:1]}}, kept, "llm")
    []
    """
    matches = router.matches or []
    kept_matches = {_match_key(m.to_wire()) for m in matches} or {_match_key({})}
    kept_filters = {json.dumps(f.to_wire(), sort_keys=True) for f in router.filters or []}
    kept_timeouts = (router.timeouts.to_wire() if router.timeouts is not None else None) or None
    kept_retry = _retry_key(router.retries.to_wire()) if router.retries is not None else None
    ours = f"{owner_name}-"
    lost: list[str] = []
    for rule in (route.get("spec") or {}).get("rules") or []:
        for match in rule.get("matches") or [{}]:
            if _match_key(match) not in kept_matches:
                lost.append(f"match {_match_text(match)}")
        for f in rule.get("filters") or []:
            mirror = (f.get("requestMirror") or {}).get("backendRef") or {}
            if f.get("type") == "RequestMirror" and str(mirror.get("name", "")).startswith(ours):
                continue  # trimtab's own shadow traffic
            if json.dumps(f, sort_keys=True) not in kept_filters:
                lost.append(f"filter {_filter_text(f)}")
        if rule.get("timeouts") and rule["timeouts"] != kept_timeouts:
            lost.append(f"timeouts {json.dumps(rule['timeouts'], sort_keys=True)}")
        if rule.get("retry") and _retry_key(rule["retry"]) != kept_retry:
            lost.append(f"retry {json.dumps(rule['retry'], sort_keys=True)}")
    return list(dict.fromkeys(lost))


def _retry_key(retry: Manifest) -> str:
    """A rule's retry compared as the CRD has it: codes are a set."""
    codes = sorted(retry.get("codes") or [])
    return json.dumps({**retry, **({"codes": codes} if codes else {})}, sort_keys=True)


# The fields of a rule trimtab writes that HTTPRoute CRDs still in use may not have, each with
# the spec field it comes from, the CRDs that have it, and what the gateway does without it.
RULE_FIELDS_SINCE: dict[str, tuple[str, str, str]] = {
    "timeouts": (
        "timeouts",
        "v1.2 or later",
        "the gateway times requests out on its own default (Envoy Gateway: 15 s, which cuts "
        "off long generations)",
    ),
    "retry": (
        "retries",
        "the experimental channel's, or v1.7 or later",
        "the gateway retries as its own default says",
    ),
}


def rule_fields_not_kept(asked: Manifest, stored: Manifest) -> list[str]:
    """The fields of the rules in the HTTPRoute trimtab applied (`asked`) that the route the
    API server stored lacks, of those some CRDs do not have (RULE_FIELDS_SINCE): the API
    server refuses an apply that sets one its CRD lacks, and trimtab applies the route again
    without it (`timeouts` came to the standard channel in Gateway API v1.2, a rule's `retry`
    in v1.7).

    >>> rule = {"backendRefs": [{"name": "llm-a"}]}
    >>> asked = {"spec": {"rules": [{**rule, "retry": {"attempts": 1}}]}}
    >>> rule_fields_not_kept(asked, {"spec": {"rules": [rule]}})
    ['retry']
    >>> rule_fields_not_kept(asked, asked), rule_fields_not_kept({"spec": {"rules": [rule]}}, asked)
    ([], [])
    """
    asked_rules = (asked.get("spec") or {}).get("rules") or []
    stored_rules = (stored.get("spec") or {}).get("rules") or []
    return [
        name
        for name in RULE_FIELDS_SINCE
        if any(
            name in a and (i >= len(stored_rules) or name not in stored_rules[i])
            for i, a in enumerate(asked_rules)
        )
    ]


def fields_not_kept_warning(route_name: str, fields: list[str]) -> str:
    """The Warning for rule_fields_not_kept: each field, the CRD that keeps it, and what the
    gateway does without it.

    >>> fields_not_kept_warning("llm", ["retry"])  # doctest: +NORMALIZE_WHITESPACE
    "HTTPRoute llm: the cluster's HTTPRoute CRD drops a rule's retry, so
    spec.rollout.router.retries has no effect and the gateway retries as its own default says
    (a CRD that keeps it: the experimental channel's, or v1.7 or later)"
    """
    parts = []
    for name in fields:
        spec_field, since, without = RULE_FIELDS_SINCE[name]
        parts.append(
            f"a rule's {name}, so spec.rollout.router.{spec_field} has no effect and {without} "
            f"(a CRD that keeps it: {since})"
        )
    return f"HTTPRoute {route_name}: the cluster's HTTPRoute CRD drops " + "; and ".join(parts)


def takeover_warning(route_name: str, losses: list[str]) -> str:
    """The Warning for takeover_losses, naming where to keep them."""
    return (
        f"HTTPRoute {route_name}: taking it over replaces its rules with trimtab's one rule, "
        f"which lacks the route's {', '.join(losses)}; list what to keep in "
        "spec.rollout.router (matches, filters, timeouts, retries)"
    )


# While something keeps writing the same rules back (a GitOps tool syncing the user's route),
# the takeover's Warning is repeated at most this often, not at every loop.
TAKEOVER_WARNING_REPEAT_S = 3600.0


def warning_due(
    message: str, posted: dict[str, float], now: float, repeat_s: float = TAKEOVER_WARNING_REPEAT_S
) -> bool:
    """Whether to post `message` now, given when each message was last posted (`posted`,
    which this updates when it says yes): a new message at once, the same one again only
    `repeat_s` later.

    >>> posted: dict[str, float] = {}
    >>> [warning_due(m, posted, t) for m, t in (("a", 0.0), ("a", 60.0), ("b", 60.0))]
    [True, False, True]
    >>> warning_due("a", posted, 3600.0)
    True
    """
    last = posted.get(message)
    if last is not None and now - last < repeat_s:
        return False
    posted[message] = now
    return True
