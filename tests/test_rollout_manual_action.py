"""The rollout-action annotation is removed only as the loop read it: a different action set
while the loop ran stays for the next loop (it used to be removed unread)."""

from __future__ import annotations

import pytest

from tests.conftest import Cluster
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import MD_PATH, model
from trimtab.api.rollout import ROLLOUT_ACTION_ANNOTATION
from trimtab.handlers.rollout import remove_manual_action


@pytest.mark.parametrize(
    ("now", "read", "removed"),
    [
        pytest.param("promote", "promote", True, id="as-read-is-removed"),
        pytest.param("abort", "promote", False, id="changed-meanwhile-stays"),
    ],
)
async def test_the_action_is_removed_only_as_read(
    api: ApiServerEmulator, cluster: Cluster, now: str, read: str, removed: bool
) -> None:
    body = model("llm")
    body["metadata"]["annotations"] = {ROLLOUT_ACTION_ANNOTATION: now, "team": "a"}
    ns = body["metadata"]["namespace"]
    await cluster.create(MD_PATH, body)
    assert await remove_manual_action(cluster.kube, ns, "llm", read) is removed
    after = (await cluster.get(f"{MD_PATH}/llm") or {})["metadata"]["annotations"]
    assert after.get("team") == "a"
    assert (ROLLOUT_ACTION_ANNOTATION in after) is not removed
    if not removed:
        assert after[ROLLOUT_ACTION_ANNOTATION] == now


async def test_an_annotation_already_gone_is_no_error(
    api: ApiServerEmulator, cluster: Cluster
) -> None:
    body = model("llm")
    await cluster.create(MD_PATH, body)
    assert await remove_manual_action(cluster.kube, body["metadata"]["namespace"], "llm",
                                      "promote") is False  # fmt: skip
