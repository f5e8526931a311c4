"""The rollout part of a ModelDeployment (canary steps, shadow traffic, analysis, router,
post-promotion watch) and the rollout's status (revisions, weights, verdicts, known-good history).

Policy, not model: changing `spec.rollout` never starts a new revision."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from trimtab.api.autoscaling import duration_seconds
from trimtab.api.common import DNSSubdomain, Duration, StatusModel, StrictModel

# Steps are bounded so the "weights increase" rule can be written out pairwise in CEL
# (the API server's CEL has no index ranges, and cost limits want bounded lists).
MAX_STEPS = 10

# Annotation a person sets to act on a rollout by hand; trimtab removes it once acted on.
#   promote       advance one step now (also ends a pause-until-promoted)
#   promote-full  skip the remaining steps and promote the candidate
#   abort         roll the candidate back; it is not retried until the spec changes again
ROLLOUT_ACTION_ANNOTATION = "trimtab.io/rollout-action"
ManualAction = Literal["promote", "promote-full", "abort"]
MANUAL_ACTIONS: tuple[str, ...] = ("promote", "promote-full", "abort")

Strategy = Literal["Canary", "ShadowThenCanary", "Immediate"]

# A duration as Gateway API writes one (GEP-2257): 1 to 4 parts of up to 5 digits each and a
# unit of h, m, s or ms. The HTTPRoute CRD refuses any other, so the router's fields take this.
GatewayDuration = Annotated[
    str,
    StringConstraints(pattern=r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"),
    Field(description='A Gateway API duration such as "30s", "10m" or "1h30m".'),
]


class StepPause(StrictModel):
    """How long a step holds its weight: a duration, or until a person promotes."""

    duration: Duration | None = Field(
        default=None, description="Hold the step's weight at least this long (analysis runs)."
    )
    until_promoted: bool = Field(
        default=False,
        description="Hold until `kubectl annotate mdep NAME trimtab.io/rollout-action=promote`.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.duration) && has(self.untilPromoted) "
                    "&& self.untilPromoted)",
                    "message": "pause: set duration or untilPromoted, not both",
                }
            ]
        }
    )

    @model_validator(mode="after")
    def _not_both(self) -> StepPause:
        if self.duration is not None and self.until_promoted:
            raise ValueError("pause: set duration or untilPromoted, not both")
        return self


class RolloutStep(StrictModel):
    """One canary step: the candidate's share of traffic, then a pause."""

    weight: int = Field(ge=0, le=100, description="Percent of traffic sent to the candidate.")
    pause: StepPause | None = Field(
        default=None,
        description="How long to hold this weight; unset: one analysis interval.",
    )


def _default_steps() -> list[RolloutStep]:
    return [
        RolloutStep(weight=10, pause=StepPause(duration="1m")),
        RolloutStep(weight=25, pause=StepPause(duration="1m")),
        RolloutStep(weight=50, pause=StepPause(duration="1m")),
    ]


class ShadowSpec(StrictModel):
    """Mirrored traffic before any user sees the candidate: responses are discarded, the
    candidate's errors and latency are analysed."""

    mirror_percent: int = Field(
        default=100, ge=1, le=100, description="Percent of requests copied to the candidate."
    )
    duration: Duration = Field(default="5m", description="Shadow at least this long.")
    min_requests: int = Field(
        default=500, ge=1, le=10_000_000, description="Mirrored requests needed before canary."
    )


class ErrorRateCheck(StrictModel):
    """Failed requests: absolute against the SLO, relative against the stable revision."""

    max: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Largest acceptable error rate; defaults to spec.slo.maxErrorRate.",
    )
    max_ratio_to_stable: float | None = Field(
        default=1.5,
        ge=1.0,
        le=100.0,
        description="The candidate's error rate may be at most this times the stable's; "
        "unset: no relative check.",
    )


class LatencyCheck(StrictModel):
    """p99 latency, tested as the share of requests slower than the SLO (p99 <= T means at
    most 1% of requests take longer than T)."""

    p99_latency_ms: int | None = Field(
        default=None,
        ge=1,
        le=3_600_000,
        description="The p99 bound; defaults to spec.slo.p99LatencyMs.",
    )
    max_ratio_to_stable: float | None = Field(
        default=1.5,
        ge=1.0,
        le=100.0,
        description="The candidate's share of requests over the bound may be at most this "
        "times the stable's; unset: no relative check.",
    )


class AnalysisSpec(StrictModel):
    """Sequential analysis of the candidate against the SLO and against the stable revision.
    Checking every interval does not raise the false-rollback rate above the target."""

    interval: Duration = Field(default="15s", description="How often metrics are judged.")
    min_requests: int = Field(
        default=100,
        ge=1,
        le=10_000_000,
        description="Candidate requests a step needs before it may pass; fewer is never a pass.",
    )
    false_rollback_rate: float = Field(
        default=0.01,
        gt=0.0,
        le=0.2,
        description="Target probability that a candidate as good as the SLO and the stable "
        "revision is rolled back.",
    )
    error_rate: ErrorRateCheck = Field(default_factory=ErrorRateCheck)
    latency: LatencyCheck = Field(default_factory=LatencyCheck)


class ParentRef(StrictModel):
    """A Gateway (or other parent) the HTTPRoute attaches to."""

    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = Field(default=None, max_length=63)
    section_name: str | None = Field(default=None, max_length=253)
    group: str | None = Field(default=None, max_length=253)
    kind: str | None = Field(default=None, max_length=63)


class HttpRouteTimeouts(StrictModel):
    """The route rule's timeouts, as Gateway API writes them (GEP-1742). Implementations set
    their own default when none is given, Envoy Gateway 15 s, which cuts off long generations:
    set `request` above the longest one. "0s" disables a timeout."""

    request: GatewayDuration | None = Field(
        default=None, description="From the request's arrival to the whole response."
    )
    backend_request: GatewayDuration | None = Field(
        default=None,
        description="One try at a backend (at most `request`); on Istio the retry policy's "
        "per-try timeout, so it needs `retries`.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    # The published HTTPRoute CRD's own rule, so a bad pair fails here.
                    "rule": "!(has(self.request) && has(self.backendRequest) && "
                    "duration(self.request) != duration('0s') && "
                    "duration(self.backendRequest) > duration(self.request))",
                    "message": "timeouts.backendRequest must be at most timeouts.request",
                }
            ]
        }
    )


# A status code a route may retry: the HTTPRoute CRD's range (5xx is what to retry; 4xx is
# allowed, rarely wise).
RetryStatusCode = Annotated[int, Field(ge=400, le=599)]
# How often Istio's default policy (a route without one) retries a request.
ISTIO_DEFAULT_RETRY_ATTEMPTS = 2


class RouteRetry(StrictModel):
    """Retries of the rule trimtab writes, in Gateway API's form (GEP-1731). Without it the
    gateway's or mesh's default holds: Istio retries twice on a failed or refused connection
    and on a 503. A retry of a model request runs its whole generation again, on the same
    revision (a canary's error is retried on a canary pod, and its metrics count both tries).

    Gateway API: the rule's `retry`, which HTTPRoute keeps in its experimental channel and in
    the standard channel from v1.7; an older standard CRD drops it and trimtab warns. Istio:
    the route's `retries`, with connection failures retried besides `codes`."""

    attempts: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Retries after the first try; 0 turns Istio's default retries off (Gateway "
        "API's retry takes 1 or more). Default: the implementation's (Istio: 2).",
    )
    codes: list[RetryStatusCode] | None = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="Response status codes to retry (400-599). Default: the "
        "implementation's (Istio: 503).",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    backoff: GatewayDuration | None = Field(
        default=None, description="The least wait between tries (at least 1ms)."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    # Istio's VirtualService CRD refuses a backoff under 1ms.
                    "rule": "!has(self.backoff) || duration(self.backoff) >= duration('1ms')",
                    "message": "retries.backoff is at least 1ms",
                },
                {
                    "rule": "!has(self.attempts) || self.attempts > 0 "
                    "|| (!has(self.codes) && !has(self.backoff))",
                    "message": "retries.attempts 0 turns retries off: codes and backoff need "
                    "attempts of 1 or more",
                },
            ]
        }
    )

    @model_validator(mode="after")
    def _consistent(self) -> RouteRetry:
        if self.backoff is not None and duration_seconds(self.backoff) < 0.001:
            raise ValueError("retries.backoff is at least 1ms")
        if self.attempts == 0 and (self.codes is not None or self.backoff is not None):
            raise ValueError(
                "retries.attempts 0 turns retries off: codes and backoff need attempts of 1 "
                "or more"
            )
        if self.codes is not None and len(set(self.codes)) != len(self.codes):
            raise ValueError("retries.codes names a status code at most once")
        return self


# An HTTP header or query parameter name (RFC 7230 token), as the HTTPRoute CRD has it.
HTTP_TOKEN = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$"
# Characters a path may hold when matched as Exact or PathPrefix (the HTTPRoute CRD's rule).
PATH_CHARACTERS = r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$"


class PathMatch(StrictModel):
    """The request path to match. PathPrefix matches whole path elements: `/v1` matches `/v1`
    and `/v1/completions`, not `/v1beta`."""

    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: str = Field(default="/", min_length=1, max_length=1024)

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                # The published HTTPRoute CRD's rules, so a path a Gateway would refuse fails
                # at apply time rather than in the route.
                {
                    "rule": "self.type == 'RegularExpression' || (self.value.startsWith('/') "
                    "&& !self.value.contains('//') && !self.value.contains('/./') "
                    "&& !self.value.contains('/../') && !self.value.contains('%2f') "
                    "&& !self.value.contains('%2F') && !self.value.contains('#') "
                    "&& !self.value.endsWith('/..') && !self.value.endsWith('/.'))",
                    "message": "an Exact or PathPrefix path is absolute ('/...') with no '//', "
                    "'/./', '/../', '%2f', '#', and no trailing '/.' or '/..'",
                },
                {
                    "rule": "self.type == 'RegularExpression' "
                    f"|| self.value.matches(r\"\"\"{PATH_CHARACTERS}\"\"\")",
                    "message": "an Exact or PathPrefix path holds only URL path characters",
                },
            ]
        }
    )

    @model_validator(mode="after")
    def _as_the_api_server_checks(self) -> PathMatch:
        if self.type == "RegularExpression":
            return self
        v = self.value
        bad = ("//", "/./", "/../", "%2f", "%2F", "#")
        if not v.startswith("/") or any(b in v for b in bad) or v.endswith(("/..", "/.")):
            raise ValueError(
                "an Exact or PathPrefix path is absolute ('/...') with no '//', '/./', "
                "'/../', '%2f', '#', and no trailing '/.' or '/..'"
            )
        if not re.fullmatch(PATH_CHARACTERS[1:-1], v):
            raise ValueError("an Exact or PathPrefix path holds only URL path characters")
        return self


class HeaderMatch(StrictModel):
    """A request header that must have a value (names compare case-insensitively)."""

    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str = Field(min_length=1, max_length=256, pattern=HTTP_TOKEN)
    value: str = Field(min_length=1, max_length=4096)


class QueryParamMatch(StrictModel):
    """A query parameter that must have a value (names compare exactly)."""

    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str = Field(min_length=1, max_length=256, pattern=HTTP_TOKEN)
    value: str = Field(min_length=1, max_length=1024)


HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]


class RouteMatch(StrictModel):
    """Requests the route's rule takes: all of the conditions given must hold. In
    `router.matches` a request is taken when any one match holds."""

    path: PathMatch | None = None
    headers: list[HeaderMatch] | None = Field(default=None, max_length=16)
    method: HttpMethod | None = None
    query_params: list[QueryParamMatch] | None = Field(default=None, max_length=16)

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.headers) || self.headers.all(h, "
                    "self.headers.exists_one(o, o.name.lowerAscii() == h.name.lowerAscii()))",
                    "message": "a header is matched at most once (names ignore case)",
                },
                {
                    "rule": "!has(self.queryParams) || self.queryParams.all(q, "
                    "self.queryParams.exists_one(o, o.name == q.name))",
                    "message": "a query parameter is matched at most once",
                },
            ]
        }
    )

    @model_validator(mode="after")
    def _names_once(self) -> RouteMatch:
        headers = [h.name.lower() for h in self.headers or []]
        params = [q.name for q in self.query_params or []]
        if len(set(headers)) != len(headers):
            raise ValueError("a header is matched at most once (names ignore case)")
        if len(set(params)) != len(params):
            raise ValueError("a query parameter is matched at most once")
        return self

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class HttpHeader(StrictModel):
    """A header name and the value to give it."""

    name: str = Field(min_length=1, max_length=256, pattern=HTTP_TOKEN)
    value: str = Field(min_length=1, max_length=4096)


def _names_unique(field: str) -> dict[str, Any]:
    return {
        "rule": f"!has(self.{field}) || self.{field}.all(h, "
        f"self.{field}.exists_one(o, o.name.lowerAscii() == h.name.lowerAscii()))",
        "message": f"{field}: a header is named at most once (names ignore case)",
    }


class HeaderModifier(StrictModel):
    """Headers changed on the way through: `set` replaces (or adds) a header, `add` appends a
    value to it, `remove` deletes it. Gateway API's RequestHeaderModifier and
    ResponseHeaderModifier."""

    set: list[HttpHeader] | None = Field(default=None, max_length=16)
    add: list[HttpHeader] | None = Field(default=None, max_length=16)
    remove: list[Annotated[str, Field(min_length=1, max_length=256, pattern=HTTP_TOKEN)]] | None = (
        Field(default=None, max_length=16)
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _names_unique("set"),
                _names_unique("add"),
                {
                    "rule": "!has(self.remove) || self.remove.all(h, "
                    "self.remove.exists_one(o, o.lowerAscii() == h.lowerAscii()))",
                    "message": "remove: a header is named at most once (names ignore case)",
                },
            ]
        }
    )

    @model_validator(mode="after")
    def _names_once(self) -> HeaderModifier:
        for field, names in (
            ("set", [h.name for h in self.set or []]),
            ("add", [h.name for h in self.add or []]),
            ("remove", list(self.remove or [])),
        ):
            lowered = [n.lower() for n in names]
            if len(set(lowered)) != len(lowered):
                raise ValueError(f"{field}: a header is named at most once (names ignore case)")
        return self


class UrlRewritePath(StrictModel):
    """The path the backend sees: the whole path replaced, or the prefix the rule matched."""

    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    replace_full_path: str | None = Field(default=None, max_length=1024)
    replace_prefix_match: str | None = Field(default=None, max_length=1024)

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                # The published HTTPRoute CRD's rules: the value named by the type, only it.
                {
                    "rule": "has(self.replaceFullPath) == (self.type == 'ReplaceFullPath')",
                    "message": "replaceFullPath is set exactly when type is ReplaceFullPath",
                },
                {
                    "rule": "has(self.replacePrefixMatch) == (self.type == 'ReplacePrefixMatch')",
                    "message": "replacePrefixMatch is set exactly when type is ReplacePrefixMatch",
                },
            ]
        }
    )

    @model_validator(mode="after")
    def _value_of_type(self) -> UrlRewritePath:
        if (self.replace_full_path is not None) != (self.type == "ReplaceFullPath"):
            raise ValueError("replaceFullPath is set exactly when type is ReplaceFullPath")
        if (self.replace_prefix_match is not None) != (self.type == "ReplacePrefixMatch"):
            raise ValueError("replacePrefixMatch is set exactly when type is ReplacePrefixMatch")
        return self


class UrlRewrite(StrictModel):
    """Gateway API's URLRewrite: the Host header and the path the backend sees."""

    hostname: DNSSubdomain | None = None
    path: UrlRewritePath | None = None


class ExtensionRef(StrictModel):
    """A filter of the Gateway's own implementation (a resource it defines)."""

    group: str = Field(
        max_length=253,
        pattern=r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    )
    kind: str = Field(min_length=1, max_length=63, pattern=r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")
    name: str = Field(min_length=1, max_length=253)


FilterType = Literal[
    "RequestHeaderModifier", "ResponseHeaderModifier", "URLRewrite", "ExtensionRef"
]
# Each filter type and the field that holds its settings.
FILTER_FIELDS: dict[str, str] = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "URLRewrite": "urlRewrite",
    "ExtensionRef": "extensionRef",
}
# Filter types a rule may carry once (Gateway API's rule); ExtensionRef may repeat.
SINGLE_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "URLRewrite")


class RouteFilter(StrictModel):
    """A Gateway API HTTPRoute filter, in the route's own form, so a route's filters copy
    over as they are. RequestMirror is trimtab's (shadow traffic) and RequestRedirect sends
    nothing to a backend, so neither is taken."""

    type: FilterType
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None
    url_rewrite: UrlRewrite | None = None
    extension_ref: ExtensionRef | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"has(self.{field}) == (self.type == '{kind}')",
                    "message": f"{field} is set exactly when type is {kind}",
                }
                for kind, field in FILTER_FIELDS.items()
            ]
        }
    )

    @model_validator(mode="after")
    def _settings_of_type(self) -> RouteFilter:
        for kind, field in FILTER_FIELDS.items():
            if (self.to_wire().get(field) is not None) != (self.type == kind):
                raise ValueError(f"{field} is set exactly when type is {kind}")
        return self


MATCHES_DESCRIPTION = (
    "Requests the rule trimtab writes takes (any one match); default: every request. A route "
    "taken over with httpRoute gets these instead of its own rules' matches."
)


PREFIX_REWRITE_MESSAGE = (
    "filters: a ReplacePrefixMatch rewrite needs one match at most, with a PathPrefix path"
)


def _filter_rules() -> list[dict[str, Any]]:
    """CEL rules of a router's filters, with its matches: a filter type at most once, and the
    HTTPRoute CRD's rule that a prefix is replaced only where one was matched (no matches is
    every request, the CRD's default match, PathPrefix /, as is a match without a path)."""
    once = [
        {
            "rule": f"!has(self.filters) || self.filters.filter(f, f.type == '{kind}').size() <= 1",
            "message": f"filters: {kind} at most once",
        }
        for kind in SINGLE_FILTERS
    ]
    prefix = {
        "rule": "!has(self.filters) || !self.filters.exists(f, "
        "f.type == 'URLRewrite' && has(f.urlRewrite.path) "
        "&& f.urlRewrite.path.type == 'ReplacePrefixMatch') || !has(self.matches) "
        "|| (size(self.matches) == 1 && (!has(self.matches[0].path) "
        "|| self.matches[0].path.type == 'PathPrefix'))",
        "message": PREFIX_REWRITE_MESSAGE,
    }
    return [*once, prefix]


def prefix_rewrite(filters: list[RouteFilter] | None) -> str | None:
    """The replacement of a ReplacePrefixMatch rewrite among `filters`, or None."""
    for f in filters or []:
        path = f.url_rewrite.path if f.url_rewrite is not None else None
        if path is not None and path.type == "ReplacePrefixMatch":
            return path.replace_prefix_match
    return None


def _check_filters(filters: list[RouteFilter] | None, matches: list[RouteMatch] | None) -> None:
    """What _filter_rules says, for the model."""
    for kind in SINGLE_FILTERS:
        if sum(f.type == kind for f in filters or []) > 1:
            raise ValueError(f"filters: {kind} at most once")
    if prefix_rewrite(filters) is not None and matches is not None:
        one = matches[0] if len(matches) == 1 else None
        if one is None or (one.path is not None and one.path.type != "PathPrefix"):
            raise ValueError(PREFIX_REWRITE_MESSAGE)


GATEWAY_RETRY_ATTEMPTS_MESSAGE = (
    "retries.attempts: Gateway API's retry takes 1 or more (leave retries out for the "
    "gateway's default)"
)
ISTIO_PER_TRY_MESSAGE = (
    "timeouts.backendRequest is an Istio route's per-try timeout, which is part of its retry "
    "policy: set retries too (with attempts of 1 or more)"
)


class GatewayApiRouterSpec(StrictModel):
    """Gateway API: trimtab writes the rules (weighted backendRefs, a RequestMirror filter) of
    an HTTPRoute. With parentRefs it creates the route; with only httpRoute it takes over the
    rules of that existing route and leaves its parents and hostnames to you."""

    type: Literal["gatewayApi"]
    http_route: DNSSubdomain | None = Field(
        default=None, description="HTTPRoute name; default: the resource's name."
    )
    parent_refs: list[ParentRef] | None = Field(default=None, max_length=32)
    hostnames: list[str] | None = Field(default=None, max_length=16)
    timeouts: HttpRouteTimeouts | None = Field(
        default=None, description="Timeouts of the rule trimtab writes."
    )
    retries: RouteRetry | None = Field(
        default=None,
        description="Retries of the rule trimtab writes; default: the gateway's or mesh's.",
    )
    matches: list[RouteMatch] | None = Field(
        default=None, min_length=1, max_length=16, description=MATCHES_DESCRIPTION
    )
    filters: list[RouteFilter] | None = Field(
        default=None,
        min_length=1,
        max_length=8,
        description="Filters of the rule trimtab writes (header changes, URL rewrites, your "
        "Gateway's own), applied before trimtab's mirror. A route taken over with httpRoute "
        "gets these instead of its own rules' filters.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                *_filter_rules(),
                {
                    "rule": "!has(self.retries) || !has(self.retries.attempts) "
                    "|| self.retries.attempts > 0",
                    "message": GATEWAY_RETRY_ATTEMPTS_MESSAGE,
                },
            ]
        }
    )

    @model_validator(mode="after")
    def _filters_fit_the_rule(self) -> GatewayApiRouterSpec:
        _check_filters(self.filters, self.matches)
        if self.retries is not None and self.retries.attempts == 0:
            raise ValueError(GATEWAY_RETRY_ATTEMPTS_MESSAGE)
        return self


class IstioRouterSpec(StrictModel):
    """Istio: trimtab writes a VirtualService with weighted destinations and a mirror (and the
    headers and rewrite `filters` ask for)."""

    type: Literal["istio"]
    host: str = Field(min_length=1, max_length=253, description="Host clients call.")
    gateways: list[str] = Field(
        default_factory=list, max_length=16, description="Gateways; empty: the mesh only."
    )
    timeouts: HttpRouteTimeouts | None = Field(
        default=None,
        description="request: the route's timeout (Istio's default is none); backendRequest: "
        "the retry policy's per-try timeout (needs retries).",
    )
    retries: RouteRetry | None = Field(
        default=None,
        description="The route's retry policy, in Gateway API's form; default: Istio's "
        "(2 retries on a failed connection or a 503). attempts 0: no retries.",
    )
    matches: list[RouteMatch] | None = Field(
        default=None, min_length=1, max_length=16, description=MATCHES_DESCRIPTION
    )
    filters: list[RouteFilter] | None = Field(
        default=None,
        min_length=1,
        max_length=8,
        description="Header changes and a URL rewrite of the route trimtab writes, in Gateway "
        "API's form (RequestHeaderModifier, ResponseHeaderModifier, URLRewrite): they become "
        "the VirtualService route's headers and rewrite.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                *_filter_rules(),
                {
                    "rule": "!has(self.timeouts) || !has(self.timeouts.backendRequest) "
                    "|| (has(self.retries) && (!has(self.retries.attempts) "
                    "|| self.retries.attempts > 0))",
                    "message": ISTIO_PER_TRY_MESSAGE,
                },
                {
                    "rule": "!has(self.filters) || self.filters.all(f, f.type != 'ExtensionRef')",
                    "message": "filters: ExtensionRef names a Gateway API implementation's "
                    "filter; an Istio route has none",
                },
            ]
        }
    )

    @model_validator(mode="after")
    def _filters_fit_the_route(self) -> IstioRouterSpec:
        _check_filters(self.filters, self.matches)
        if (
            self.timeouts is not None
            and self.timeouts.backend_request is not None
            and (self.retries is None or self.retries.attempts == 0)
        ):
            raise ValueError(ISTIO_PER_TRY_MESSAGE)
        if any(f.type == "ExtensionRef" for f in self.filters or []):
            raise ValueError(
                "filters: ExtensionRef names a Gateway API implementation's filter; "
                "an Istio route has none"
            )
        return self


class ReplicasRouterSpec(StrictModel):
    """No mesh: traffic splits by the ratio of ready replicas behind the one Service. It is
    approximate (a 10% step with 3 replicas is 1 in 3) and cannot mirror."""

    type: Literal["replicas"]


RouterSpec = Annotated[
    GatewayApiRouterSpec | IstioRouterSpec | ReplicasRouterSpec, Field(discriminator="type")
]


class PostPromotionSpec(StrictModel):
    """After promotion the new stable revision stays watched against the SLO."""

    watch_window: Duration = Field(default="10m", description="How long to keep watching.")
    automatic_fallback: bool = Field(
        default=True,
        description="On an SLO breach in the window, go back to the last known-good revision.",
    )


def _increasing_rule() -> str:
    pairs = [
        f"(self.steps.size() <= {i + 1} || self.steps[{i}].weight < self.steps[{i + 1}].weight)"
        for i in range(MAX_STEPS - 1)
    ]
    return "!has(self.steps) || (" + " && ".join(pairs) + ")"


class RolloutSpec(StrictModel):
    """How a new revision (a change to the model part of the spec) replaces the stable one."""

    strategy: Strategy = Field(
        default="Canary",
        description="Canary: weighted steps with analysis. ShadowThenCanary: mirrored traffic "
        "first. Immediate: switch once ready (the post-promotion watch still applies).",
    )
    steps: list[RolloutStep] = Field(
        default_factory=_default_steps,
        min_length=1,
        max_length=MAX_STEPS,
        description="Candidate weights, strictly increasing; after the last step: promotion.",
    )
    shadow: ShadowSpec | None = Field(
        default=None,
        description="Mirroring before the canary steps; only with strategy ShadowThenCanary "
        "(which without it uses the defaults).",
    )
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    router: RouterSpec = Field(
        default_factory=lambda: ReplicasRouterSpec(type="replicas"),
        description="How traffic is split: gatewayApi, istio or replicas (no mesh).",
    )
    post_promotion: PostPromotionSpec = Field(default_factory=PostPromotionSpec)
    progress_deadline: Duration = Field(
        default="30m",
        description="The candidate must be ready this long after it is created, and once "
        "ready may be without a ready replica at most this long, or it is rolled back.",
    )
    paused: bool = Field(
        default=False,
        description="Hold the current step and its clock (a failing candidate is still "
        "rolled back).",
    )
    known_good_history: int = Field(
        default=3,
        ge=1,
        le=10,
        description="How many known-good revisions status keeps (a revision is known-good "
        "once its post-promotion watch window closes cleanly).",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": _increasing_rule(),
                    "message": "rollout.steps: weights must be strictly increasing",
                    "fieldPath": ".steps",
                },
                {
                    # A missing router is the default, replicas.
                    "rule": "(has(self.router) && self.router.type != 'replicas') || "
                    "(!(has(self.strategy) && self.strategy == 'ShadowThenCanary') "
                    "&& !has(self.shadow))",
                    "message": "router replicas cannot mirror traffic (it splits by replica "
                    "count behind one Service): shadow and ShadowThenCanary need router "
                    "gatewayApi or istio",
                    "fieldPath": ".router",
                },
                {
                    "rule": "!has(self.shadow) || "
                    "(has(self.strategy) && self.strategy == 'ShadowThenCanary')",
                    "message": "rollout.shadow applies only to strategy ShadowThenCanary",
                    "fieldPath": ".shadow",
                },
                {
                    "rule": "!has(self.router) || self.router.type != 'gatewayApi' "
                    "|| has(self.router.httpRoute) || has(self.router.parentRefs)",
                    "message": "router gatewayApi needs httpRoute (an existing route) or "
                    "parentRefs (trimtab creates the route)",
                    "fieldPath": ".router",
                },
            ]
        }
    )

    @model_validator(mode="after")
    def _same_rules_as_cel(self) -> RolloutSpec:
        """The CRD's CEL rules, again here, so objects built in Python obey them too."""
        weights = [s.weight for s in self.steps]
        if any(a >= b for a, b in zip(weights, weights[1:], strict=False)):
            raise ValueError("rollout.steps: weights must be strictly increasing")
        if self.router.type == "replicas" and (
            self.strategy == "ShadowThenCanary" or self.shadow is not None
        ):
            raise ValueError(
                "router replicas cannot mirror traffic (it splits by replica count behind one "
                "Service): shadow and ShadowThenCanary need router gatewayApi or istio"
            )
        # A shadow block under Canary or Immediate: the CRD's rule rejects new ones, but
        # objects stored before the rule existed keep it (validation ratcheting), and the
        # operator must go on serving them: shadow_or_default() ignores it, as it always did.
        if (
            self.router.type == "gatewayApi"
            and self.router.http_route is None
            and self.router.parent_refs is None
        ):
            raise ValueError(
                "router gatewayApi needs httpRoute (an existing route) or parentRefs "
                "(trimtab creates the route)"
            )
        return self

    def shadow_or_default(self) -> ShadowSpec | None:
        """The shadow phase that applies: ShadowThenCanary without a shadow block uses defaults."""
        if self.strategy != "ShadowThenCanary":
            return None
        return self.shadow or ShadowSpec()


# --- status -----------------------------------------------------------------------------

RolloutPhase = Literal[
    "Stable",  # one revision serves everything; no candidate, no watch window open
    "Shadow",  # the candidate receives mirrored traffic only
    "Canary",  # the candidate receives its step's weight and is being analysed
    "Paused",  # a step holds until promoted by hand, or spec.rollout.paused is set
    "Watching",  # promoted; the new stable revision is watched against the SLO
    "RolledBack",  # the candidate failed (analysis, deadline or abort); stable serves all
    "FellBack",  # a promoted revision breached its SLO; the last known-good one serves all
]

Verdict = Literal["Pass", "Fail", "Inconclusive"]

# Condition types the rollout loop sets on the ModelDeployment:
# True: a candidate is in flight and moves as analysis allows; False: none is, or its weights
# are frozen (reason MetricsUnavailable: nothing is promoted until metrics are back) or paused.
CONDITION_ROLLOUT_PROGRESSING = "RolloutProgressing"
# True: the weights hold until a person acts (spec.rollout.paused, or an untilPromoted step);
# a failing candidate is still rolled back.
CONDITION_ROLLOUT_PAUSED = "RolloutPaused"
# True: the last candidate failed (analysis, progressDeadline or abort); the stable revision
# serves all traffic and the failed revision is not retried until the spec changes.
CONDITION_ROLLED_BACK = "RolledBack"
# True: a promoted revision breached its SLO in the watch window and the last known-good
# revision, rebuilt from status, serves all traffic instead. False with reason FallbackFailed:
# the rebuilt revision had no ready replica within progressDeadline; traffic stays where it was.
CONDITION_FALLBACK_APPLIED = "FallbackApplied"
# With a mesh router: True when every Gateway the HTTPRoute names accepted it and resolved its
# backends (Istio: no error in istiod's analysis of the VirtualService); False, with the
# Gateway's (or istiod's) reason, when one refused it; Unknown while a Gateway has not
# reported. Absent with the replica router, which writes no route.
CONDITION_ROUTE_ACCEPTED = "RouteAccepted"
ROLLOUT_CONDITIONS = frozenset(
    {
        CONDITION_ROUTE_ACCEPTED,
        CONDITION_ROLLOUT_PROGRESSING,
        CONDITION_ROLLOUT_PAUSED,
        CONDITION_ROLLED_BACK,
        CONDITION_FALLBACK_APPLIED,
    }
)


class AnalysisVerdict(StatusModel):
    """One check's verdict at one analysis round."""

    metric: Literal["errorRate", "latency"]
    against: Literal["slo", "stable"] = Field(description="Absolute SLO or the stable revision.")
    value: float | None = Field(default=None, description="Candidate's observed share.")
    baseline: float | None = Field(default=None, description="Stable's share (relative checks).")
    threshold: float = Field(description="SLO share, or the allowed ratio to the stable's share.")
    bound_seconds: float | None = Field(
        default=None,
        description="Latency: the histogram bucket (le) requests were counted slow above, when "
        "it is not exactly the SLO's bound.",
    )
    samples: int = Field(description="Candidate requests behind the verdict.")
    evidence: float = Field(description="log e-value against 'the candidate is fine'.")
    verdict: Verdict
    time: str
    revision: str | None = None
    step: int | None = None


class Weights(StatusModel):
    stable: int = 100
    candidate: int = 0
    mirror_percent: int = 0


class KnownGoodRevision(StatusModel):
    """A revision that passed analysis and its post-promotion watch window, with the model part
    of the spec that rebuilds it."""

    revision: str
    model: dict[str, Any] = Field(description="The model part of the spec (image, args, ...).")
    promoted_at: str | None = None


class CheckEvidence(StatusModel):
    """Sequential-test evidence carried over from finished steps (log e-value per check)."""

    name: str
    log_evidence: float = 0.0


class RouteRecord(StatusModel):
    """The route trimtab last wrote for spec.rollout.router, with that router: when the spec
    stops naming the route (the rollout removed, the router type or the route's name changed),
    the route is handed back as this router would leave it (see build_released_route)."""

    api_version: str
    kind: str
    name: str
    router: dict[str, Any] = Field(
        description="spec.rollout.router as it was when the route was last written."
    )


class RolloutStatus(StatusModel):
    phase: RolloutPhase = "Stable"
    reason: str | None = Field(default=None, description="Why the last action was taken.")
    stable_revision: str | None = None
    candidate_revision: str | None = None
    candidate_model: dict[str, Any] | None = Field(
        default=None, description="Model part of the candidate (to rebuild it after a restart)."
    )
    failed_revision: str | None = Field(
        default=None,
        description="Revision rolled back or fallen back from; not retried until the spec changes.",
    )
    weights: Weights = Field(default_factory=Weights)
    step_index: int = Field(default=-1, description="-1: before the first step (or shadow).")
    candidate_since: str | None = Field(default=None, description="Candidate created (deadline).")
    candidate_ready_at: str | None = Field(
        default=None,
        description="The candidate first had a ready replica; progressDeadline then times "
        "unreadiness from candidateUnreadySince instead of from creation.",
    )
    candidate_unready_since: str | None = Field(
        default=None,
        description="The candidate, ready before, has had no ready replica since then.",
    )
    step_since: str | None = Field(default=None, description="Current step (or shadow) began.")
    held_since: str | None = Field(
        default=None,
        description="The step's clock stopped (paused, or the candidate lost its ready "
        "replicas) at this time.",
    )
    held_seconds: int = Field(
        default=0, description="Seconds of the current step not counted (paused or unready)."
    )
    promoted_at: str | None = Field(default=None, description="Watch window start.")
    stable_model: dict[str, Any] | None = Field(
        default=None,
        description="Model part of the stable revision (to rebuild it); it joins knownGood "
        "only once its watch window ends cleanly.",
    )
    watch_verdict: Literal["Pass", "Fail"] | None = Field(
        default=None,
        description="Worst verdict on the stable revision in its watch window so far.",
    )
    fallback_since: str | None = Field(
        default=None, description="Fallback applied; the target must serve by progressDeadline."
    )
    fallback_failed_at: str | None = Field(
        default=None,
        description="The fallback target had no ready replica within progressDeadline; traffic "
        "stays on the revision fallen back from.",
    )
    carried_evidence: list[CheckEvidence] = Field(default_factory=list)
    verdicts: list[AnalysisVerdict] = Field(
        default_factory=list,
        description="Verdicts of this rollout, newest last (at most 100; older ones dropped).",
    )
    known_good: list[KnownGoodRevision] = Field(
        default_factory=list,
        description="Newest first; the stable revision joins once its watch window closes "
        "cleanly, so during the watch [0] is the fallback target.",
    )
