"""Retries of the route trimtab writes (spec.rollout.router.retries, in Gateway API's form): an
HTTPRoute rule's `retry` against the published experimental-channel CRD (the standard channel
before v1.7 has no such field), its translation to an Istio retry policy against the
VirtualService CRD, the spec's bounds, and the Warning when a cluster's HTTPRoute CRD drops the
retry (or, before v1.2, the timeouts)."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest

from tests.conftest import Cluster
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import DEPLOY_PATH, MD_PATH, NS, mark_ready, model
from tests.test_rollout_fresh_replicas import NOW, _ts
from tests.test_rollout_routers_operator import PARENTS, shadow_rollout
from tests.test_rollout_routing import HTTPROUTE_CRD, MDEP_CRD, OWNER, VS_CRD
from tests.validation import crd_without, thirdparty, validate_custom
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.rollout import GatewayApiRouterSpec, IstioRouterSpec
from trimtab.builders.common import Owner
from trimtab.builders.routing import (
    Split,
    build_http_route,
    build_released_route,
    build_virtual_service,
)
from trimtab.builders.serving import build_deployment, revision_of
from trimtab.handlers import rollout as handler
from trimtab.metrics.factory import ProviderPool

EXPERIMENTAL_HTTPROUTE_CRD = thirdparty(
    "gateway-api", "experimental", "gateway.networking.k8s.io_httproutes.yaml"
)
STANDARD_HTTPROUTE_CRD = thirdparty(
    "gateway-api", "standard", "gateway.networking.k8s.io_httproutes.yaml"
)
CANARY = Split("aaa", "bbb", 8000, 90, 10)
CONNECTION = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


@pytest.mark.parametrize(
    ("retries", "timeouts", "expected"),
    [
        pytest.param({"attempts": 3}, None, {"attempts": 3}, id="count-only"),
        pytest.param({"codes": [503, 504]}, None,
                     {"attempts": 2, "retryOn": f"{CONNECTION},503,504"},
                     id="codes-with-istios-default-count"),
        pytest.param({"attempts": 0}, None, {"attempts": 0}, id="off"),
        pytest.param({"attempts": 1, "backoff": "100ms"}, {"backendRequest": "30s"},
                     {"attempts": 1, "backoff": "100ms", "perTryTimeout": "30s"},
                     id="backoff-and-per-try-timeout"),
        pytest.param({"attempts": 1}, {"request": "10m", "backendRequest": "0s"},
                     {"attempts": 1}, id="per-try-timeout-disabled"),
    ],
)  # fmt: skip
def test_istio_retry_policy(
    retries: dict[str, Any], timeouts: dict[str, str] | None, expected: dict[str, Any]
) -> None:
    """Istio reads an unset attempts as 0, no retries: the count it uses by default is written
    out. Status codes join the connection failures Istio's default retries in retryOn (a
    number there is a status code to retry), and backendRequest is the per-try timeout."""
    router = IstioRouterSpec.model_validate(
        {"type": "istio", "host": "chat.example.com", "retries": retries,
         **({"timeouts": timeouts} if timeouts else {})}
    )  # fmt: skip
    vs = build_virtual_service(OWNER, router, CANARY)
    validate_custom({k: v for k, v in vs.items() if k not in ("apiVersion", "kind")}, VS_CRD, "v1")
    http = vs["spec"]["http"][0]
    assert http["retries"] == expected
    assert http.get("timeout") == (timeouts or {}).get("request")


def test_istio_route_without_retries_keeps_istios_default() -> None:
    router = IstioRouterSpec(type="istio", host="chat.example.com")
    assert "retries" not in build_virtual_service(OWNER, router, CANARY)["spec"]["http"][0]


RETRY = {"attempts": 2, "codes": [500, 503], "backoff": "250ms"}


@pytest.mark.parametrize(
    "router",
    [
        pytest.param({"type": "gatewayApi", "parentRefs": PARENTS, "retries": RETRY},
                     id="owned"),
        pytest.param({"type": "gatewayApi", "httpRoute": "chat-route", "retries": RETRY,
                      "timeouts": {"request": "10m", "backendRequest": "2m"}},
                     id="taken-over-with-timeouts"),
    ],
)  # fmt: skip
def test_http_route_retry_needs_the_experimental_channel(router: dict[str, Any]) -> None:
    """The rule's retry is the spec's, in the same form. The experimental channel's CRD takes
    it; the standard channel's (v1.6, as vendored) has no such field, which is why a cluster
    with it drops the retry and trimtab says so."""
    spec = GatewayApiRouterSpec.model_validate(router)
    route = build_http_route(OWNER, spec, CANARY)
    assert route["spec"]["rules"][0]["retry"] == RETRY
    validate_custom(route, EXPERIMENTAL_HTTPROUTE_CRD)
    with pytest.raises(jsonschema.ValidationError, match="'retry' was unexpected"):
        validate_custom(route, HTTPROUTE_CRD)


@pytest.mark.parametrize(
    "router",
    [
        pytest.param(GatewayApiRouterSpec.model_validate(
            {"type": "gatewayApi", "httpRoute": "chat-route", "retries": {"attempts": 1},
             "timeouts": {"request": "10m"}}), id="httproute"),
        pytest.param(IstioRouterSpec.model_validate(
            {"type": "istio", "host": "chat.example.com", "retries": {"attempts": 1},
             "timeouts": {"request": "10m"}}), id="virtualservice"),
    ],
)  # fmt: skip
def test_a_released_route_keeps_its_timeouts_and_retries(
    router: GatewayApiRouterSpec | IstioRouterSpec,
) -> None:
    """A route spec.rollout stops routing through goes on serving as configured, to the
    resource's Service."""
    route = build_released_route(OWNER, router, 8000)
    if isinstance(router, GatewayApiRouterSpec):
        rule = route["spec"]["rules"][0]
        assert (rule["retry"], rule["timeouts"]) == ({"attempts": 1}, {"request": "10m"})
        validate_custom(route, EXPERIMENTAL_HTTPROUTE_CRD)
    else:
        http = route["spec"]["http"][0]
        assert (http["retries"], http["timeout"]) == ({"attempts": 1}, "10m")


@pytest.mark.parametrize(
    ("retries", "error"),
    [
        pytest.param({"codes": [502, 503, 504]}, None, id="gateway-errors"),
        pytest.param({"codes": [600]}, "less than or equal to 599", id="not-a-status"),
        pytest.param({"codes": [200]}, "greater than or equal to 400", id="a-success"),
        pytest.param({"codes": [503, 503]}, "non-unique|at most once", id="code-twice"),
        pytest.param({"codes": []}, "should be non-empty|at least 1", id="no-codes"),
        pytest.param({"attempts": 101}, "less than or equal to 100", id="too-many-attempts"),
        pytest.param({"backoff": "1.5s"}, "does not match|should match", id="not-a-duration"),
    ],
)  # fmt: skip
def test_retries_schema(retries: dict[str, Any], error: str | None) -> None:
    """The CRD and the model refuse the same retries (a duplicate code: the API server refuses
    a set list's duplicate, the model says why)."""
    router = {"type": "gatewayApi", "httpRoute": "chat-route", "retries": retries}
    body = {
        "apiVersion": "trimtab.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "chat", "namespace": "prod"},
        "spec": {"image": "srv:1", "rollout": {"router": router}},
    }
    if error is None:
        validate_custom(body, MDEP_CRD)
        GatewayApiRouterSpec.model_validate(router)
        return
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(body, MDEP_CRD)
    with pytest.raises(pydantic.ValidationError, match=error):
        GatewayApiRouterSpec.model_validate(router)


async def _shadowing(cluster: Cluster, router: dict[str, Any]) -> None:
    """A ModelDeployment whose candidate (srv:b) is ready beside its stable revision (srv:a),
    its shadow due to start."""
    extra = {"slo": {"p99LatencyMs": 2000}, "rollout": shadow_rollout(router, 20, 30)}
    specs = {image: ModelDeploymentSpec.model_validate(model("llm", image=image, **extra)["spec"])
             for image in ("srv:a", "srv:b")}  # fmt: skip
    a, b = (revision_of(s) for s in specs.values())
    created = await cluster.create(MD_PATH, model("llm", image="srv:b", **extra))
    owner = Owner(C.API_VERSION, C.MODELDEPLOYMENT_KIND, "llm", NS, created["metadata"]["uid"])
    await cluster.merge(f"{MD_PATH}/llm/status", {"status": {"rollout": {
        "phase": "Canary", "stableRevision": a, "candidateRevision": b,
        "stableModel": specs["srv:a"].model_part(), "candidateModel": specs["srv:b"].model_part(),
        "candidateSince": _ts(60), "stepIndex": -1,
    }}})  # fmt: skip
    for spec, revision in ((specs["srv:a"], a), (specs["srv:b"], b)):
        made = await cluster.create(DEPLOY_PATH, build_deployment(owner, spec, revision, 1))
        await mark_ready(cluster, made)


@pytest.mark.parametrize(
    ("prune", "said"),
    [
        pytest.param((), None, id="crd-with-both"),
        pytest.param(("retry",), "a rule's retry, so spec.rollout.router.retries has no effect",
                     id="standard-crd-before-v1.7"),
        pytest.param(("timeouts", "retry"),
                     "a rule's timeouts, so spec.rollout.router.timeouts has no effect and the "
                     "gateway times requests out on its own default",
                     id="crd-before-v1.2"),
    ],
)  # fmt: skip
async def test_rule_fields_the_cluster_drops_are_reported_hourly(
    api: ApiServerEmulator,
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
    prune: tuple[str, ...],
    said: str | None,
    tmp_path: Path,
) -> None:
    """A Warning names each rule field an older HTTPRoute CRD drops. The route is written at
    every loop; the Warning comes at once, then not again within the hour however many loops
    write the route, then again while the CRD still drops it.
    The first loop starts the shadow (the route written with new weights); the later ones
    find no Prometheus, so weights hold and the route is re-asserted as status says."""
    router = {"type": "gatewayApi", "parentRefs": PARENTS, "retries": {"attempts": 1},
              "timeouts": {"request": "10m"}}  # fmt: skip
    await _shadowing(cluster, router)
    warnings: list[tuple[str, str]] = []
    monkeypatch.setattr(handler.kopf, "warn",
                        lambda *_, reason, message, **__: warnings.append((reason, message)))
    for name in ("event", "info"):
        monkeypatch.setattr(handler.kopf, name, lambda *_, **__: None)

    # The API server refuses an apply that sets a field its CRD lacks (500, "field not
    # declared in schema"): trimtab writes the route without it and says so.
    crd = {(): EXPERIMENTAL_HTTPROUTE_CRD, ("retry",): STANDARD_HTTPROUTE_CRD}.get(prune)
    api.crds[("gateway.networking.k8s.io", "httproutes")] = crd or crd_without(
        STANDARD_HTTPROUTE_CRD, tmp_path / "httproute-crd.yaml", ("rules", "timeouts")
    )
    kube = cluster.kube
    # Nothing listens on the discard port: each analysis finds its source unavailable.
    pool = ProviderPool("http://127.0.0.1:9", timeout_s=2.0)
    warned: dict[str, float] = {}
    try:
        for minutes in (0, 1, 30, 61):
            await handler.rollout_once(
                kube, pool, NS, "llm", logging.getLogger("t"),
                now=NOW + datetime.timedelta(minutes=minutes), warned=warned,
            )  # fmt: skip
    finally:
        await pool.close()
    status = ((await cluster.get(f"{MD_PATH}/llm")) or {})["status"]
    assert status["rollout"]["phase"] == "Shadow"
    assert status["rollout"]["weights"]["mirrorPercent"] == 20
    route = await cluster.get(
        f"/apis/gateway.networking.k8s.io/v1/namespaces/{NS}/httproutes/llm"
    )
    assert route is not None
    assert {"timeouts", "retry"} - set(route["spec"]["rules"][0]) == set(prune)
    dropped = [m for reason, m in warnings if reason == "RouteFieldsDropped"]
    if said is None:
        assert dropped == []
        return
    assert len(dropped) == 2, warnings
    assert dropped[0].startswith("HTTPRoute llm: the cluster's HTTPRoute CRD drops " + said)
    assert ("retries has no effect" in dropped[0]) is ("retry" in prune)


async def test_the_operator_writes_the_istio_retry_policy(
    api: ApiServerEmulator, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _shadowing(cluster, {"type": "istio", "host": "llm.example.com",
                               "retries": {"attempts": 0}})  # fmt: skip
    for name in ("event", "info", "warn"):
        monkeypatch.setattr(handler.kopf, name, lambda *_, **__: None)
    await handler.rollout_once(
        cluster.kube, None, NS, "llm", logging.getLogger("t"), now=NOW  # type: ignore[arg-type]
    )
    vs = await cluster.get(
        f"/apis/networking.istio.io/v1/namespaces/{NS}/virtualservices/llm"
    )
    assert vs is not None
    http = vs["spec"]["http"][0]
    assert http["retries"] == {"attempts": 0}
    assert http["mirrorPercentage"] == {"value": 20.0}
