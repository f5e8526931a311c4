"""Manifests that split traffic between a ModelDeployment's stable and candidate revisions:
per-revision Services, a Gateway API HTTPRoute and an Istio VirtualService.

Pure. Weights are percentages of the candidate and stable; a mirror copies a percentage of
requests to the candidate and discards its answers (shadow traffic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from trimtab import constants as C
from trimtab.api.autoscaling import duration_seconds
from trimtab.api.rollout import (
    ISTIO_DEFAULT_RETRY_ATTEMPTS,
    GatewayApiRouterSpec,
    HeaderModifier,
    IstioRouterSpec,
    ReplicasRouterSpec,
    RouteFilter,
    RouteMatch,
    RouteRecord,
    RouteRetry,
    RouterSpec,
    UrlRewritePath,
)
from trimtab.builders.common import Manifest, Owner, child_name, literal_regex, object_meta

# spec.rollout.router in its wire form, as status.route keeps it.
ROUTER: TypeAdapter[RouterSpec] = TypeAdapter(RouterSpec)

GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
ISTIO_API_VERSION = "networking.istio.io/v1"
# The kinds of route a router writes.
ROUTE_KINDS = frozenset({"HTTPRoute", "VirtualService"})


@dataclass(frozen=True)
class Split:
    """Where traffic goes: revisions, their serving port, weights and the mirror share."""

    stable_revision: str
    candidate_revision: str | None
    port: int
    stable_weight: int = 100
    candidate_weight: int = 0
    mirror_percent: int = 0

    def __post_init__(self) -> None:
        if self.stable_weight + self.candidate_weight != 100:
            raise ValueError(
                f"weights must sum to 100: {self.stable_weight}+{self.candidate_weight}"
            )
        if self.candidate_revision is None and (self.candidate_weight or self.mirror_percent):
            raise ValueError("a candidate weight or mirror needs a candidate revision")
        if not 0 <= self.mirror_percent <= 100:
            raise ValueError(f"mirror percent out of 0..100: {self.mirror_percent}")


def revision_service_name(owner_name: str, revision: str) -> str:
    """The Service that selects one revision's pods (same name as its Deployment)."""
    return child_name(owner_name, revision)


def build_revision_service(owner: Owner, revision: str, port: int) -> Manifest:
    """A ClusterIP Service for one revision, so a mesh can weigh revisions separately."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(
            owner,
            revision_service_name(owner.name, revision),
            labels={C.LABEL_REVISION: revision, C.LABEL_NAME: owner.name},
        ),
        "spec": {
            "type": "ClusterIP",
            "selector": {C.LABEL_OWNER: owner.name, C.LABEL_REVISION: revision},
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def http_route_name(owner: Owner, router: GatewayApiRouterSpec) -> str:
    return router.http_route or owner.name


def build_http_route(owner: Owner, router: GatewayApiRouterSpec, split: Split) -> Manifest:
    """An HTTPRoute with weighted backendRefs and, for shadow traffic, a RequestMirror filter.

    With parentRefs trimtab owns the whole route. With only `httpRoute` the route is the
    user's: the manifest carries just `spec.rules`, which server-side apply merges into it
    (trimtab owns the rules, the user keeps parents and hostnames; no ownerReference, so
    deleting the ModelDeployment never deletes the user's route)."""
    stable_svc = revision_service_name(owner.name, split.stable_revision)
    backends: list[Manifest] = [
        {"name": stable_svc, "port": split.port, "weight": split.stable_weight}
    ]
    rule: Manifest = {"backendRefs": backends}
    if split.candidate_revision is not None:
        cand_svc = revision_service_name(owner.name, split.candidate_revision)
        backends.append({"name": cand_svc, "port": split.port, "weight": split.candidate_weight})
        if split.mirror_percent:
            rule["filters"] = [
                {
                    "type": "RequestMirror",
                    "requestMirror": {
                        "backendRef": {"name": cand_svc, "port": split.port},
                        "percent": split.mirror_percent,
                    },
                }
            ]
    return _http_route(owner, router, rule)


def _http_route(owner: Owner, router: GatewayApiRouterSpec, rule: Manifest) -> Manifest:
    """The HTTPRoute `router` names with `rule` as its one rule, with router.matches,
    router.filters, router.timeouts and router.retries: the whole route when trimtab owns it
    (parentRefs), only the rules of the user's route otherwise."""
    name = http_route_name(owner, router)
    if router.timeouts is not None and (timeouts := router.timeouts.to_wire()):
        rule = {**rule, "timeouts": timeouts}
    if router.retries is not None:
        rule = {**rule, "retry": router.retries.to_wire()}
    if router.filters:
        # The user's filters first: a mirrored request is the one the candidate would get.
        rule = {**rule, "filters": [f.to_wire() for f in router.filters] + rule.get("filters", [])}
    if router.matches:
        rule = {"matches": [m.to_wire() for m in router.matches], **rule}
    spec: Manifest = {"rules": [rule]}
    if router.parent_refs is not None:
        spec = {"parentRefs": [p.to_wire() for p in router.parent_refs], **spec}
        if router.hostnames:
            spec["hostnames"] = list(router.hostnames)
        metadata = object_meta(owner, name, labels={C.LABEL_NAME: owner.name})
    else:
        metadata = {"name": name, "namespace": owner.namespace}
    return {
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "HTTPRoute",
        "metadata": metadata,
        "spec": spec,
    }


def _fqdn(owner: Owner, service: str) -> str:
    return f"{service}.{owner.namespace}.svc.cluster.local"


def build_virtual_service(owner: Owner, router: IstioRouterSpec, split: Split) -> Manifest:
    """An Istio VirtualService for `router.host`: weighted destinations (the per-revision
    Services) and, for shadow traffic, `mirror` with `mirrorPercentage`."""
    stable_host = _fqdn(owner, revision_service_name(owner.name, split.stable_revision))
    route: list[Manifest] = [
        {
            "destination": {"host": stable_host, "port": {"number": split.port}},
            "weight": split.stable_weight,
        }
    ]
    http: Manifest = {"name": "trimtab", "route": route}
    if split.candidate_revision is not None:
        cand_host = _fqdn(owner, revision_service_name(owner.name, split.candidate_revision))
        route.append(
            {
                "destination": {"host": cand_host, "port": {"number": split.port}},
                "weight": split.candidate_weight,
            }
        )
        if split.mirror_percent:
            http["mirror"] = {"host": cand_host, "port": {"number": split.port}}
            http["mirrorPercentage"] = {"value": float(split.mirror_percent)}
    return _virtual_service(owner, router, http)


def _virtual_service(owner: Owner, router: IstioRouterSpec, http: Manifest) -> Manifest:
    """The VirtualService for `router.host` with `http` as its one HTTP route, with
    router.matches, router.filters, router.timeouts and router.retries."""
    if router.filters:
        http = {**http, **istio_filters(router.filters, router.matches)}
    request = router.timeouts.request if router.timeouts is not None else None
    if request is not None and duration_seconds(request) > 0:
        # "0s" is Gateway API's "no timeout", which is Istio's default (its CRD takes >= 1ms).
        http = {**http, "timeout": request}
    if router.retries is not None:
        per_try = router.timeouts.backend_request if router.timeouts is not None else None
        http = {**http, "retries": istio_retries(router.retries, per_try)}
    if router.matches:
        http = {"name": http["name"], "match": [istio_match(m) for m in router.matches],
                **{k: v for k, v in http.items() if k != "name"}}  # fmt: skip
    spec: Manifest = {"hosts": [router.host], "http": [http]}
    if router.gateways:
        spec["gateways"] = list(router.gateways)
    return {
        "apiVersion": ISTIO_API_VERSION,
        "kind": "VirtualService",
        "metadata": object_meta(owner, owner.name, labels={C.LABEL_NAME: owner.name}),
        "spec": spec,
    }


# What Istio's own default policy retries besides status codes: a connection that failed or was
# refused, and gRPC's unavailable and cancelled. Gateway API's retry retries connection errors
# whatever its codes say, and so does the route trimtab writes from it.
ISTIO_CONNECTION_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled"


def istio_retries(retry: RouteRetry, per_try_timeout: str | None) -> Manifest:
    """A Gateway API retry (and backendRequest timeout, the per-try one) as an Istio route's
    retry policy. Istio takes an unset attempts for 0, no retries, so the count Istio uses by
    default is written out; codes join the connection failures in retryOn, where a number is
    a status code to retry. An unset `codes` leaves retryOn to Istio's default (which retries
    a 503).

    >>> istio_retries(RouteRetry(codes=[503, 504], backoff="100ms"), "30s")
    {'attempts': 2, 'retryOn': 'connect-failure,refused-stream,unavailable,cancelled,\
retriable-status-codes,503,504', 'backoff': '100ms', 'perTryTimeout': '30s'}
    >>> istio_retries(RouteRetry(attempts=0), None)
    {'attempts': 0}
    >>> istio_retries(RouteRetry(attempts=1), "0s")
    {'attempts': 1}
    """
    if retry.attempts == 0:
        return {"attempts": 0}
    out: Manifest = {
        "attempts": retry.attempts if retry.attempts is not None else ISTIO_DEFAULT_RETRY_ATTEMPTS
    }
    if retry.codes:
        codes = ",".join(str(c) for c in retry.codes)
        out["retryOn"] = f"{ISTIO_CONNECTION_RETRY_ON},retriable-status-codes,{codes}"
    if retry.backoff is not None:
        out["backoff"] = retry.backoff
    if per_try_timeout is not None and duration_seconds(per_try_timeout) > 0:
        # "0s" is Gateway API's "no per-try timeout": Istio's default, and below its CRD's 1ms.
        out["perTryTimeout"] = per_try_timeout
    return out


def istio_match(match: RouteMatch) -> Manifest:
    r"""A Gateway API route match as an Istio HTTPMatchRequest, with the same meaning. A
    PathPrefix matches whole path elements in Gateway API but any string prefix in Istio, so
    one other than `/` becomes an RE2 regex (Istio matches it against the whole path); header
    names are lower case, as Istio requires.

    >>> m = RouteMatch.model_validate({"path": {"value": "/v1/"}, "method": "POST",
    ...     "headers": [{"name": "X-Model", "value": "llama-.*", "type": "RegularExpression"}]})
    >>> istio_match(m)
    {'uri': {'regex': '/v1(/.*)?'}, 'headers': {'x-model': {'regex': 'llama-.*'}}, 'method': {'exact': 'POST'}}
    >>> istio_match(RouteMatch.model_validate({"path": {"value": "/"}}))
    {'uri': {'prefix': '/'}}
    """  # noqa: E501
    out: Manifest = {}
    if match.path is not None:
        p = match.path
        if p.type == "Exact":
            out["uri"] = {"exact": p.value}
        elif p.type == "RegularExpression":
            out["uri"] = {"regex": p.value}
        elif p.value.rstrip("/") == "":
            out["uri"] = {"prefix": "/"}
        else:
            out["uri"] = {"regex": f"{literal_regex(p.value.rstrip('/'))}(/.*)?"}
    kinds = {"Exact": "exact", "RegularExpression": "regex"}
    if match.headers:
        out["headers"] = {h.name.lower(): {kinds[h.type]: h.value} for h in match.headers}
    if match.method is not None:
        out["method"] = {"exact": match.method}
    if match.query_params:
        out["queryParams"] = {q.name: {kinds[q.type]: q.value} for q in match.query_params}
    return out


def _istio_headers(modifier: HeaderModifier) -> Manifest:
    out: Manifest = {}
    if modifier.set:
        out["set"] = {h.name: h.value for h in modifier.set}
    if modifier.add:
        out["add"] = {h.name: h.value for h in modifier.add}
    if modifier.remove:
        out["remove"] = list(modifier.remove)
    return out


def istio_path_rewrite(path: UrlRewritePath, matches: list[RouteMatch] | None) -> Manifest:
    r"""A Gateway API path rewrite as an Istio `uriRegexRewrite` (RE2, against the path
    without its query), with Gateway API's meaning. A full path is replaced whole. A prefix
    is replaced as Gateway API does it, path element by path element, trailing slashes of the
    prefix and the replacement ignored, "/" where nothing would be left. Istio's own `uri`
    replaces a matched string prefix, and the whole path where the match is a regex, which
    is what trimtab writes for a PathPrefix.

    >>> p = UrlRewritePath(type="ReplacePrefixMatch", replace_prefix_match="/api/")
    >>> istio_path_rewrite(p, [RouteMatch.model_validate({"path": {"value": "/v1"}})])
    {'match': '^/v1(/.*)?$', 'rewrite': '/api\\1'}
    >>> istio_path_rewrite(p.model_copy(update={"replace_prefix_match": "/"}), None)
    {'match': '^/?(.*)$', 'rewrite': '/\\1'}
    """
    if path.type == "ReplaceFullPath":
        return {"match": "^.*$", "rewrite": _re2_replacement(path.replace_full_path or "/")}
    matched = "/"
    if matches and matches[0].path is not None:
        matched = matches[0].path.value
    prefix = literal_regex(matched.rstrip("/"))
    replacement = _re2_replacement((path.replace_prefix_match or "").rstrip("/"))
    if replacement:
        return {"match": f"^{prefix}(/.*)?$", "rewrite": f"{replacement}\\1"}
    return {"match": f"^{prefix}/?(.*)$", "rewrite": "/\\1"}


def _re2_replacement(text: str) -> str:
    """`text` as literal text in an RE2 substitution (a backslash starts a group there)."""
    return text.replace("\\", "\\\\")


def istio_filters(filters: list[RouteFilter], matches: list[RouteMatch] | None) -> Manifest:
    """Gateway API filters as an Istio HTTP route's `headers` and `rewrite` (ExtensionRef has
    no Istio form; the router spec refuses it)."""
    out: Manifest = {}
    headers: Manifest = {}
    for f in filters:
        if f.request_header_modifier is not None:
            headers["request"] = _istio_headers(f.request_header_modifier)
        if f.response_header_modifier is not None:
            headers["response"] = _istio_headers(f.response_header_modifier)
        if f.url_rewrite is not None:
            rewrite: Manifest = {}
            if f.url_rewrite.hostname is not None:
                rewrite["authority"] = f.url_rewrite.hostname
            if f.url_rewrite.path is not None:
                rewrite["uriRegexRewrite"] = istio_path_rewrite(f.url_rewrite.path, matches)
            out["rewrite"] = rewrite
    if headers:
        out["headers"] = headers
    return out


def weights_from_http_route(route: Manifest, owner_name: str) -> tuple[dict[str, int], int]:
    """({revision service: weight}, mirror percent) as an HTTPRoute currently says."""
    weights: dict[str, int] = {}
    mirror = 0
    prefix = f"{owner_name}-"
    for rule in route.get("spec", {}).get("rules", []):
        for ref in rule.get("backendRefs", []):
            if str(ref.get("name", "")).startswith(prefix):
                weights[ref["name"]] = int(ref.get("weight", 1))
        for f in rule.get("filters", []):
            if f.get("type") == "RequestMirror":
                mirror = int(f.get("requestMirror", {}).get("percent", 100))
    return weights, mirror


def weights_from_virtual_service(vs: Manifest) -> tuple[dict[str, int], int]:
    """({revision service: weight}, mirror percent) as a VirtualService currently says."""
    weights: dict[str, int] = {}
    mirror = 0
    for http in vs.get("spec", {}).get("http", []):
        if http.get("name") != "trimtab":
            continue
        for r in http.get("route", []):
            service = str(r["destination"]["host"]).split(".", 1)[0]
            weights[service] = int(r.get("weight", 0))
        if "mirror" in http:
            mirror = round(float(http.get("mirrorPercentage", {}).get("value", 100.0)))
    return weights, mirror


@dataclass(frozen=True)
class RouteRef:
    """The route object a mesh router writes; `owned` when trimtab created it (it carries an
    ownerReference) rather than taking over the rules of the user's route."""

    api_version: str
    kind: str
    name: str
    owned: bool


def route_of(
    owner: Owner, router: GatewayApiRouterSpec | IstioRouterSpec | ReplicasRouterSpec | None
) -> RouteRef | None:
    """The route a router writes; None for the replica router (or no rollout).

    >>> o = Owner("trimtab.io/v1alpha1", "ModelDeployment", "llm", "ml", "u1")
    >>> ref = route_of(o, GatewayApiRouterSpec(type="gatewayApi", http_route="public"))
    >>> ref.kind, ref.name, ref.owned
    ('HTTPRoute', 'public', False)
    >>> route_of(o, IstioRouterSpec(type="istio", host="llm.example.com")).name
    'llm'
    >>> route_of(o, ReplicasRouterSpec(type="replicas")) is None
    True
    """
    if isinstance(router, GatewayApiRouterSpec):
        return RouteRef(
            GATEWAY_API_VERSION,
            "HTTPRoute",
            http_route_name(owner, router),
            owned=router.parent_refs is not None,
        )
    if isinstance(router, IstioRouterSpec):
        return RouteRef(ISTIO_API_VERSION, "VirtualService", owner.name, owned=True)
    return None


def route_record(owner: Owner, router: Any) -> Manifest | None:
    """status.route for the route spec.rollout.router `router` (wire form, as the user wrote
    it) writes: the route and the router, which is what handing the route back needs (see
    build_released_route). None for the replica router, no router, or one that does not parse.

    >>> o = Owner("trimtab.io/v1alpha1", "ModelDeployment", "llm", "ml", "u1")
    >>> route_record(o, {"type": "gatewayApi", "httpRoute": "web"})
    {'apiVersion': 'gateway.networking.k8s.io/v1', 'kind': 'HTTPRoute', 'name': 'web', \
'router': {'type': 'gatewayApi', 'httpRoute': 'web'}}
    >>> route_record(o, {"type": "replicas"}), route_record(o, None)
    (None, None)
    """
    if not isinstance(router, dict):
        return None
    try:
        parsed = ROUTER.validate_python(router)
    except ValidationError:
        return None
    ref = route_of(owner, parsed)
    if ref is None:
        return None
    return RouteRecord(
        api_version=ref.api_version, kind=ref.kind, name=ref.name, router=router
    ).to_wire()


def route_still_named(owner: Owner, record: Any, router: RouterSpec | None) -> bool:
    """Whether `router` (spec.rollout.router; None without a rollout) writes the route
    `record` (status.route) names; True without a record, since there is nothing to hand back.
    Editing the router, or taking over a route trimtab created under the same name (or the
    reverse), keeps the route.

    >>> o = Owner("trimtab.io/v1alpha1", "ModelDeployment", "llm", "ml", "u1")
    >>> gw = GatewayApiRouterSpec(type="gatewayApi", http_route="public")
    >>> rec = route_record(o, gw.to_wire())
    >>> route_still_named(o, rec, None), route_still_named(o, None, None)
    (False, True)
    >>> route_still_named(o, rec, gw.model_copy(update={"hostnames": ["a.example"]}))
    True
    """
    if not isinstance(record, dict):
        return True
    now = route_of(owner, router)
    return now is not None and (now.kind, now.name) == (record.get("kind"), record.get("name"))


def build_released_route(
    owner: Owner, router: GatewayApiRouterSpec | IstioRouterSpec, port: int
) -> Manifest:
    """The route a router leaves behind when spec.rollout stops routing through it: its rules
    (the only part trimtab writes of a route it took over) send everything to the Service
    named after the resource, which selects every revision's pods and always exists; so the
    route keeps working without trimtab weighing revisions in it.

    >>> o = Owner("trimtab.io/v1alpha1", "ModelDeployment", "llm", "ml", "u1")
    >>> build_released_route(o, GatewayApiRouterSpec(type="gatewayApi", http_route="public"),
    ...                      8000)["spec"]
    {'rules': [{'backendRefs': [{'name': 'llm', 'port': 8000}]}]}
    >>> vs = build_released_route(o, IstioRouterSpec(type="istio", host="llm.example.com"), 80)
    >>> vs["spec"]["http"][0]["route"][0]["destination"]
    {'host': 'llm.ml.svc.cluster.local', 'port': {'number': 80}}
    """
    if isinstance(router, GatewayApiRouterSpec):
        return _http_route(owner, router, {"backendRefs": [{"name": owner.name, "port": port}]})
    destination = {"host": _fqdn(owner, owner.name), "port": {"number": port}}
    return _virtual_service(
        owner, router, {"name": "trimtab", "route": [{"destination": destination, "weight": 100}]}
    )
