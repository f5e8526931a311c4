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
