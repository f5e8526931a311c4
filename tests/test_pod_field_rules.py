"""Spec values that go into pods as the API server checks them there: tolerations, node selector
values and the HTTPRoute name. A value the CRD let through used to reach the API server only in
the Deployment or Job trimtab built, where a ModelDeployment went Degraded and a TrainingJob
retried; the CRD now refuses it when the user applies it, with the API server's own rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from tests.test_modeldeployment_operator import model
from tests.test_training_operator import trainingjob
from tests.validation import ROOT, validate_custom
from trimtab.api.common import Toleration

MD_CRD = ROOT / "crds" / "trimtab.io_modeldeployments.yaml"
TJ_CRD = ROOT / "crds" / "trimtab.io_trainingjobs.yaml"

TOLERATIONS = [
    pytest.param({"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}, None,
                 id="exists-without-value"),
    pytest.param({"key": "gpu", "value": "a100", "effect": "NoSchedule"}, None,
                 id="equal-by-default"),
    pytest.param({"operator": "Exists"}, None, id="match-everything"),
    pytest.param({"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                  "effect": "NoExecute", "tolerationSeconds": 300}, None,
                 id="seconds-with-noexecute"),
    pytest.param({"key": "gpu", "operator": "Exists", "value": "a100"},
                 "operator Exists takes no value", id="exists-with-value"),
    pytest.param({"value": "a100"}, "without a key must have operator Exists",
                 id="no-key-equal"),
    pytest.param({"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 60},
                 "NoExecute only", id="seconds-with-noschedule"),
]  # fmt: skip


def _check(body: dict[str, Any], crd: Path, error: str | None) -> None:
    if error is None:
        validate_custom(body, crd)
        return
    with pytest.raises((AssertionError, jsonschema.ValidationError), match=error):
        validate_custom(body, crd)


@pytest.mark.parametrize(("toleration", "error"), TOLERATIONS)
def test_tolerations_follow_the_pod_rules(toleration: dict[str, Any], error: str | None) -> None:
    _check(model(tolerations=[toleration]), MD_CRD, error)
    _check(trainingjob(scheduling={"tolerations": [toleration]}), TJ_CRD, error)
    if error is None:
        Toleration.model_validate(toleration)
    else:
        with pytest.raises(ValidationError, match=error):
            Toleration.model_validate(toleration)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        pytest.param("a100", True, id="plain"),
        pytest.param("", True, id="empty"),
        pytest.param("gpu.a100_80gb-x", True, id="dots-dashes-underscores"),
        pytest.param("a b", False, id="space"),
        pytest.param("-a", False, id="leading-dash"),
        pytest.param("a" * 64, False, id="too-long"),
    ],
)
def test_node_selector_values_are_label_values(value: str, ok: bool) -> None:
    error = None if ok else "does not match|is too long"
    _check(model(nodeSelector={"pool": value}), MD_CRD, error)
    _check(trainingjob(scheduling={"nodeSelector": {"pool": value}}), TJ_CRD, error)


@pytest.mark.parametrize(
    ("route", "ok"),
    [
        pytest.param("chat-route", True, id="dns-name"),
        pytest.param("chat.v2", True, id="subdomain"),
        pytest.param("Chat_Route", False, id="not-a-dns-name"),
    ],
)
def test_the_httproute_name_is_an_object_name(route: str, ok: bool) -> None:
    body = model(
        slo={"p99LatencyMs": 500},
        rollout={"router": {"type": "gatewayApi", "httpRoute": route}},
    )
    _check(body, MD_CRD, None if ok else "does not match")
