"""Status writes under races with other writers. The rollout loop: a 409 caused by someone
else's write to another part of status is retried on a fresh read (the loop has acted already
and must not lose its record), one caused by a change to status.rollout is not. The reconcile:
its status is written with the resourceVersion it was computed from, so a condition another
loop set meanwhile is kept."""

from __future__ import annotations

from typing import Any

import pytest

from trimtab.handlers.rollout import write_rollout_status
from trimtab.kube.client import KubeError

ROLLOUT = {"phase": "Canary", "stepIndex": 0}


class RacingKube:
    """Refuses the first `races` status patches with 409, as the API server does when the
    object moved since the patch's resourceVersion; each race is another writer's status write
    (`theirs`), visible to the next read."""

    def __init__(self, races: int, theirs: dict[str, Any]) -> None:
        self.races = races
        self.theirs = theirs
        self.version = 1
        self.status: dict[str, Any] = {"rollout": ROLLOUT, "conditions": [{"type": "Ready"}]}
        self.sent: list[tuple[dict[str, Any], str | None]] = []

    async def patch_status(
        self, res: Any, namespace: str, name: str, patch: dict[str, Any], version: str | None
    ) -> dict[str, Any]:
        self.sent.append((patch, version))
        if self.races:
            self.races -= 1
            self.status = {**self.status, **self.theirs}
            self.version += 1
            raise KubeError(409, "Conflict", "the object has been modified")
        if version != str(self.version):
            raise KubeError(409, "Conflict", "the object has been modified")
        self.status = {**self.status, **patch}
        self.version += 1
        return {}

    async def get(self, res: Any, namespace: str, name: str) -> dict[str, Any]:
        meta = {"name": name, "namespace": namespace, "uid": "u1", "generation": 1}
        return {"metadata": {**meta, "resourceVersion": str(self.version)}, "status": self.status}


def patch_on(current: dict[str, Any]) -> dict[str, Any]:
    """The rollout's write: its own part, and the conditions list rebuilt on what it read."""
    conditions = [c for c in current.get("conditions") or [] if c["type"] != "RolledBack"]
    return {
        "rollout": {"stepIndex": 1},
        "conditions": [*conditions, {"type": "RolledBack", "status": "False"}],
    }


@pytest.mark.parametrize(
    ("races", "theirs", "written", "attempts"),
    [
        pytest.param(0, {}, True, 1, id="no-race"),
        pytest.param(
            2,
            {"conditions": [{"type": "Ready"}, {"type": "Progressing"}]},
            True,
            3,
            id="other-writers-conditions-kept-and-retried",
        ),
        pytest.param(
            1, {"rollout": {"phase": "Stable"}}, False, 1, id="rollout-changed-redo-the-loop"
        ),
        pytest.param(9, {"replicas": 3}, False, 5, id="races-outlast-attempts"),
    ],
)
async def test_write_rollout_status(
    races: int, theirs: dict[str, Any], written: bool, attempts: int
) -> None:
    kube = RacingKube(races, theirs)
    body = {"metadata": {"resourceVersion": "1"}, "status": dict(kube.status)}
    body["metadata"].update(name="chat", namespace="ml")
    ok = await write_rollout_status(
        kube,  # type: ignore[arg-type]  # the two calls it makes, faked
        body,
        patch_on,
    )
    assert ok is written
    assert len(kube.sent) == attempts
    if written:
        assert kube.status["rollout"] == {"stepIndex": 1}
        # Another writer's condition, written between the read and the patch, survives.
        types = [c["type"] for c in kube.status["conditions"]]
        assert types == [c["type"] for c in theirs.get("conditions", [{"type": "Ready"}])] + [
            "RolledBack"
        ]


async def test_reconcile_status_keeps_a_condition_written_while_it_ran() -> None:
    """The reconcile computes status from the body kopf gave it; the rollout loop sets
    RolledBack meanwhile. The reconcile's write is refused (409), recomputed on a fresh read
    and keeps RolledBack, where a write through kopf's patch would have replaced the list."""
    from trimtab.builders.serving import revision_of
    from trimtab.decisions.serving import DeploymentObservation
    from trimtab.handlers.modeldeployment import parse_spec, write_reconciled_status

    # With spec.rollout: without one, the reconcile drops the rollout's conditions itself.
    spec, problems = parse_spec({"image": "srv:1", "rollout": {}})
    assert spec is not None and not problems
    rev = revision_of(spec)
    rolled_back = {"type": "RolledBack", "status": "True", "reason": "RolledBack"}
    kube = RacingKube(1, {"conditions": [rolled_back]})
    kube.status = {}
    body = {
        "metadata": {
            "name": "chat",
            "namespace": "ml",
            "uid": "u1",
            "resourceVersion": "1",
            "generation": 1,
        },
        "status": {},
    }
    obs = DeploymentObservation(rev, f"chat-{rev}", 1, 1, 1, 1, 1, 1, 1)
    await write_reconciled_status(
        kube,  # type: ignore[arg-type]  # the two calls it makes, faked
        body,
        spec,
        {("ml", "chat"): [obs]},  # type: ignore[arg-type]  # the index, as a mapping
        1,
    )
    assert len(kube.sent) == 2
    assert kube.status["observedGeneration"] == 1 and kube.status["phase"] == "Ready"
    assert "RolledBack" in {c["type"] for c in kube.status["conditions"]}
