"""The operator's series about a ModelDeployment go with it. Before, every resource ever
created kept its desired-replicas, scale-action, weight and rollback series on /metrics for as
long as the operator ran; a gauge also outlived the loop that set it (autoscaling turned off,
spec.rollout removed), still showing its last value."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from tests.conftest import Cluster, wait_for_value
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import MD_PATH, NS, model
from trimtab.observability import (
    DESIRED_REPLICAS,
    METRICS_AVAILABLE,
    ROLLBACKS,
    ROLLOUT_WEIGHT,
    ROUTE_ACCEPTED,
    SCALE_ACTIONS,
    forget_resource,
)


def series(namespace: str, name: str) -> list[str]:
    """The names of the samples labelled with this resource, across the registry."""
    return sorted(
        sample.name
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.labels.get("namespace") == namespace and sample.labels.get("name") == name
    )


def record(namespace: str, name: str) -> None:
    DESIRED_REPLICAS.labels(namespace, name).set(3)
    METRICS_AVAILABLE.labels(namespace, name).set(1)
    SCALE_ACTIONS.labels(namespace, name, "up").inc()
    ROLLOUT_WEIGHT.labels(namespace, name, "abc").set(10)
    ROLLBACKS.labels(namespace, name, "rollback").inc()
    ROUTE_ACCEPTED.labels(namespace, name).set(1)


def test_forgetting_one_resource_keeps_the_others() -> None:
    record("ml", "gone")
    record("ml", "kept")
    record("other", "gone")
    forget_resource("ml", "gone")
    assert series("ml", "gone") == []
    assert len(series("ml", "kept")) == len(series("other", "gone")) > 0
    forget_resource("ml", "kept")
    forget_resource("other", "gone")
    forget_resource("ml", "never-seen")  # no series: nothing to do, no error


async def test_deleting_the_resource_removes_its_series(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any
) -> None:
    async with run_operator():
        await cluster.create(MD_PATH, model("short-lived"))
        # Once the operator holds it (its finalizer): deleted before, it never was the
        # operator's, and has no series.
        await wait_for_value(
            lambda: cluster.get(f"{MD_PATH}/short-lived"),
            lambda b: b and b["metadata"].get("finalizers"),
        )
        record(NS, "short-lived")
        assert series(NS, "short-lived")
        await cluster.kube.request("DELETE", f"{MD_PATH}/short-lived")
        await wait_for_value(lambda: _series(NS, "short-lived"), lambda s: s == [], timeout=10)
        # kopf removes its finalizer once the handler is done: then the object goes.
        await wait_for_value(
            lambda: cluster.get(f"{MD_PATH}/short-lived"), lambda b: b is None, timeout=10
        )


async def _series(namespace: str, name: str) -> list[str]:
    return series(namespace, name)
