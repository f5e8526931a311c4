"""The PodDisruptionBudget a ModelDeployment gets: a node drain or a cluster upgrade evicts at
most `disruptionBudget.maxUnavailable` of its pods at once (every revision's together), and
waits for a replacement to be ready before the next; a pod that is not ready is never held.
Before, a drain of the nodes that ran a model's replicas evicted all of them at once."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Cluster, wait_for, wait_for_value
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import MD_PATH, NS, model
from tests.validation import validate_builtin
from trimtab import constants as C
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.common import Owner
from trimtab.builders.serving import build_deployment, build_disruption_budget, revision_of
from trimtab.decisions.serving import other_disruption_budget, selects
from trimtab.handlers import modeldeployment as handler
from trimtab.kube.resources import PODDISRUPTIONBUDGETS

PDB_PATH = f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets"
OWNER = Owner(C.API_VERSION, C.MODELDEPLOYMENT_KIND, "llama", NS, "uid-1")


@pytest.mark.parametrize(
    ("budget", "max_unavailable"),
    [
        pytest.param(None, 1, id="default-one-at-a-time"),
        pytest.param({"maxUnavailable": 3}, 3, id="three-at-a-time"),
    ],
)
def test_the_budget_covers_every_revisions_pods(
    budget: dict[str, Any] | None, max_unavailable: int
) -> None:
    extra = {} if budget is None else {"disruptionBudget": budget}
    spec = ModelDeploymentSpec.model_validate({"image": "srv:1", **extra})
    pdb = build_disruption_budget(OWNER, spec)
    validate_builtin(pdb)
    assert pdb["spec"]["maxUnavailable"] == max_unavailable
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    selector = pdb["spec"]["selector"]["matchLabels"].items()
    for image in ("srv:1", "srv:2"):  # a stable and a candidate revision
        other = spec.model_copy(update={"image": image})
        template = build_deployment(OWNER, other, revision_of(other), 2)["spec"]["template"]
        assert selector <= template["metadata"]["labels"].items()


def test_zero_is_not_a_budget() -> None:
    with pytest.raises(ValueError, match="max_unavailable|maxUnavailable"):
        ModelDeploymentSpec.model_validate(
            {"image": "srv:1", "disruptionBudget": {"maxUnavailable": 0}}
        )


async def test_the_operator_writes_and_removes_the_budget(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    async with run_operator():
        created = await cluster.create(MD_PATH, model())
        pdb = await wait_for(lambda: cluster.get(f"{PDB_PATH}/llama"))
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        budget = {"spec": {"disruptionBudget": {"maxUnavailable": 2}}}
        await cluster.merge(f"{MD_PATH}/llama", budget)
        await wait_for_value(
            lambda: cluster.get(f"{PDB_PATH}/llama"),
            lambda p: p and p["spec"]["maxUnavailable"] == 2,
            timeout=10,
        )
        off = {"spec": {"disruptionBudget": {"enabled": False}}}
        await cluster.merge(f"{MD_PATH}/llama", off)
        await wait_for_value(
            lambda: cluster.get(f"{PDB_PATH}/llama"), lambda p: p is None, timeout=10
        )


async def test_a_budget_of_that_name_made_by_someone_else_is_left_alone(
    api: ApiServerEmulator, cluster: Cluster
) -> None:
    theirs = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "llama", "namespace": NS},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "llama"}}},
    }
    await cluster.create(PDB_PATH, theirs)
    spec = ModelDeploymentSpec.model_validate(
        {"image": "srv:1", "disruptionBudget": {"enabled": False}}
    )
    await handler.apply_disruption_budget(cluster.kube, OWNER, spec)
    kept = await cluster.kube.get(PODDISRUPTIONBUDGETS, NS, "llama")
    assert kept is not None and kept["spec"]["minAvailable"] == 1


POD = {"trimtab.io/owner": "llama", "app.kubernetes.io/name": "llama", "team": "search"}


@pytest.mark.parametrize(
    ("selector", "selected"),
    [
        pytest.param({"matchLabels": {"app.kubernetes.io/name": "llama"}}, True, id="by-name"),
        pytest.param({"matchLabels": {"app.kubernetes.io/name": "other"}}, False,
                     id="another-app"),
        pytest.param({}, True, id="empty-selects-every-pod"),
        pytest.param(None, False, id="no-selector-selects-none"),
        pytest.param({"matchExpressions": [{"key": "team", "operator": "In",
                                            "values": ["search", "ads"]}]}, True, id="in"),
        pytest.param({"matchExpressions": [{"key": "team", "operator": "NotIn",
                                            "values": ["search"]}]}, False, id="not-in"),
        pytest.param({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, True,
                     id="does-not-exist"),
        pytest.param({"matchLabels": {"team": "search"},
                      "matchExpressions": [{"key": "tier", "operator": "Exists"}]}, False,
                     id="both-must-hold"),
    ],
)  # fmt: skip
def test_which_budgets_cover_the_pods(selector: dict[str, Any] | None, selected: bool) -> None:
    budget = {"metadata": {"name": "theirs"}, "spec": {"selector": selector}}
    assert selects(selector, POD) is selected
    assert (other_disruption_budget([budget], POD, "uid-1") == "theirs") is selected


async def test_a_budget_someone_else_made_over_the_pods_replaces_trimtabs(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    """The eviction API refuses a pod that two budgets cover, so a drain would stop at every
    replica: where the team already has a budget over the model's pods, trimtab's goes."""
    async with run_operator():
        await cluster.create(MD_PATH, model())
        await wait_for(lambda: cluster.get(f"{PDB_PATH}/llama"))
        theirs = {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "llama-pdb", "namespace": NS},
            "spec": {"minAvailable": 1,
                     "selector": {"matchLabels": {"app.kubernetes.io/name": "llama"}}},
        }  # fmt: skip
        await cluster.create(PDB_PATH, theirs)
        # The next reconcile (any spec change, or the operator's restart) finds it.
        await cluster.merge(f"{MD_PATH}/llama", {"spec": {"replicas": 3}})
        await wait_for_value(
            lambda: cluster.get(f"{PDB_PATH}/llama"), lambda p: p is None, timeout=10
        )
        assert await cluster.get(f"{PDB_PATH}/llama-pdb") is not None

        async def told() -> bool:
            events = await cluster.get(f"/api/v1/namespaces/{NS}/events") or {}
            reasons = [e.get("reason") for e in events.get("items", [])]
            return "DisruptionBudgetLeftToYours" in reasons

        await wait_for(told, timeout=10)
