"""status.recommendations is written so that it ends up exactly as built: a key the new status
no longer has is removed. A plain merge patch left such keys behind, so an applied cpuLimit that
the user had since taken out of spec.resources came back with the next apply."""

from __future__ import annotations

from typing import Any

import pytest

from trimtab.api.rightsizing import AppliedResources, RecommendationsStatus, ResourceAmounts
from trimtab.handlers.rightsizing import recommendations_patch

STAMP = "2026-01-01T00:00:00Z"
OLD = {
    "updatedAt": STAMP,
    "containers": [],
    "conditions": [],
    "applied": {
        "resources": {"cpu": "2", "memory": "8Gi", "cpuLimit": "4", "memoryLimit": "8Gi"},
        "appliedAt": STAMP,
        "specResourcesHash": "old",
    },
}


def applied(**resources: str) -> AppliedResources:
    return AppliedResources(
        resources=ResourceAmounts.model_validate(resources),
        applied_at=STAMP,
        spec_resources_hash="new",
    )


@pytest.mark.parametrize(
    ("out", "expected"),
    [
        pytest.param(
            RecommendationsStatus(updated_at=STAMP, applied=applied(
                cpu="2", memory="8Gi", memoryLimit="8Gi")),
            {"applied": {"resources": {"cpuLimit": None}, "specResourcesHash": "new"}},
            id="a-limit-no-longer-applied-is-removed",
        ),
        pytest.param(
            RecommendationsStatus(updated_at=STAMP),
            {"applied": None},
            id="no-apply-removes-it-whole",
        ),
        pytest.param(
            RecommendationsStatus.model_validate(OLD), {}, id="unchanged-writes-nothing",
        ),
    ],
)  # fmt: skip
def test_the_patch_makes_status_exactly_what_was_built(
    out: RecommendationsStatus, expected: dict[str, Any]
) -> None:
    body = {"status": {"recommendations": OLD}}
    assert recommendations_patch(body, out) == expected
