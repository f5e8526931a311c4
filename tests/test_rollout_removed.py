"""Removing spec.rollout forgets what the rollout recorded: added back later, it starts
afresh from the revision that runs, not from a stable revision that was deleted meanwhile."""

from __future__ import annotations

from typing import Any

from tests.conftest import Cluster, wait_for_value
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import MD_PATH, deployment_controller, model
from trimtab.api.modeldeployment import ModelDeploymentSpec
from trimtab.builders.serving import revision_of

ROLLOUT = {"steps": [{"weight": 10, "pause": {"duration": "1m"}}]}


async def test_removing_the_rollout_forgets_it_and_adding_it_back_starts_afresh(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    async def status() -> dict[str, Any]:
        return dict(((await cluster.get(f"{MD_PATH}/llm")) or {}).get("status") or {})

    def types(st: dict[str, Any]) -> set[str]:
        return {c["type"] for c in st.get("conditions") or []}

    c_body = model("llm", image="srv:c", rollout=ROLLOUT)
    c = revision_of(ModelDeploymentSpec.model_validate(c_body["spec"]))
    d = revision_of(ModelDeploymentSpec.model_validate(model("llm", image="srv:d")["spec"]))
    async with run_operator(), deployment_controller(cluster):
        await cluster.create(MD_PATH, c_body)
        await wait_for_value(
            status,
            lambda st: (st.get("rollout") or {}).get("stableRevision") == c
            and "RolloutProgressing" in types(st),
            timeout=20,
        )

        # spec.rollout removed, and the image changed: d replaces c.
        await cluster.merge(
            f"{MD_PATH}/llm", {"spec": {"rollout": None, "image": "srv:d"}}
        )
        gone = await wait_for_value(
            status, lambda st: "rollout" not in st and st.get("currentRevision") == d
        )
        assert not types(gone) & {"RolloutProgressing", "RolloutPaused", "RolledBack"}

        # Added back: d is the first revision of a new rollout, not a candidate beside c.
        await cluster.merge(f"{MD_PATH}/llm", {"spec": {"rollout": ROLLOUT}})
        back = await wait_for_value(
            status, lambda st: (st.get("rollout") or {}).get("stableRevision") == d, timeout=20
        )
        assert back["rollout"].get("candidateRevision") is None
