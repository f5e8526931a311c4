"""Which pods the Service named after a ModelDeployment selects. With a mesh router and a
candidate in flight, only the route sends the candidate requests: the Service itself selects
the stable revision, so its direct callers (in-cluster clients, an Ingress) never reach a shadow
candidate, whose answers should be discarded, nor a canary beyond its weight. Before, it
selected every revision's pods throughout."""

from __future__ import annotations

import pytest

from tests.validation import validate_builtin
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.api.rollout import RolloutStatus, Weights
from trimtab.builders.common import Owner
from trimtab.builders.serving import build_service
from trimtab.decisions.rollout import plan_revisions

SHADOW = RolloutStatus(stable_revision="a", candidate_revision="b", phase="Shadow",
                       weights=Weights(stable=100, mirror_percent=50))  # fmt: skip
CANARY = RolloutStatus(stable_revision="a", candidate_revision="b", phase="Canary",
                       weights=Weights(stable=70, candidate=30))  # fmt: skip
PROMOTED = RolloutStatus(stable_revision="b", phase="Watching")
FELL_BACK = RolloutStatus(stable_revision="a", failed_revision="b", phase="FellBack")


@pytest.mark.parametrize(
    ("desired", "rollout", "status", "mesh", "selected"),
    [
        pytest.param("b", True, SHADOW, True, "a", id="mesh-shadow-stable-only"),
        pytest.param("b", True, CANARY, True, "a", id="mesh-canary-stable-only"),
        pytest.param("c", True, CANARY, True, "a", id="mesh-candidate-replaced-by-a-newer-one"),
        pytest.param("b", True, CANARY, False, None, id="replica-router-splits-by-pods"),
        pytest.param("b", True, PROMOTED, True, None, id="promoted-every-revision"),
        pytest.param("a", True, FELL_BACK, True, None, id="fallen-back-every-revision"),
        pytest.param("b", False, RolloutStatus(), False, None, id="no-rollout"),
    ],
)  # fmt: skip
def test_the_service_selects_the_stable_revision_only_while_a_route_weighs_a_candidate(
    desired: str, rollout: bool, status: RolloutStatus, mesh: bool, selected: str | None
) -> None:
    plan = plan_revisions(desired, rollout, status, exact_weights=mesh)
    assert plan.service_revision == selected


@pytest.mark.parametrize("revision", [None, "0123456789"])
def test_the_selector_names_the_revision_it_is_pinned_to(revision: str | None) -> None:
    owner = Owner(C.API_VERSION, C.MODELDEPLOYMENT_KIND, "llm", "ml", "uid-1")
    svc = build_service(owner, ModelDeploymentSpec(image="srv:1"), revision)
    validate_builtin(svc)
    expected = {C.LABEL_OWNER: "llm", C.LABEL_MANAGED_BY: C.MANAGED_BY}
    if revision:
        expected[C.LABEL_REVISION] = revision
    assert svc["spec"]["selector"] == expected
