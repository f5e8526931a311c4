"""In-place CPU in the real kopf operator against the API server emulator, reading a real
Prometheus fed by an exporter that replays a pod's usage: in Auto mode the running pods of the
current revision are resized through pods/resize to follow usage, a Guaranteed pod is left
alone, and turning in-place (or right-sizing) off puts the pods back at their revision's
request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kopf
import pytest
from prometheus_client import REGISTRY

from tests.conftest import Cluster, OperatorRunner, wait_for, wait_for_value
from tests.kube_emulator import RESOURCES
from tests.prometheus_fixture import (
    prometheus_bin,  # noqa: F401  # a fixture
)
from tests.test_rightsizing_operator import chat as rightsized_chat
from tests.test_rightsizing_usage import usage_for_operator
from trimtab import constants as C
from trimtab.api.quantity import parse_quantity
from trimtab.api.rightsizing import InPlaceStatus
from trimtab.builders.serving import deployment_name
from trimtab.handlers.inplace import InPlaceWork, cpu_in_place
from trimtab.observability import forget_resource

pytestmark = pytest.mark.prometheus

NS = "ml"
MD_PATH = f"/apis/{C.GROUP}/{C.VERSION}/namespaces/{NS}/{C.MODELDEPLOYMENT_PLURAL}"
PODS_PATH = f"/api/v1/namespaces/{NS}/pods"


def chat() -> dict[str, Any]:
    """The right-sizing operator tests' ModelDeployment in Auto mode, with minChange 1: the
    recommendation never moves enough for a new revision, so the pods of the first revision
    are the ones that follow usage."""
    body = rightsized_chat("Auto")
    body["spec"]["rightsizing"]["minChange"] = 1.0
    return body


def server_pod(name: str, revision: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {C.LABEL_OWNER: "chat", C.LABEL_REVISION: revision},
        },
        "spec": {
            "containers": [
                {
                    "name": "server",
                    "image": "ghcr.io/example/chat:1",
                    "resources": {"requests": {"cpu": "2", "memory": "8Gi"}},
                }
            ]
        },
    }


def in_place(body: dict[str, Any] | None) -> dict[str, Any]:
    return ((body or {}).get("status") or {}).get("recommendations", {}).get("inPlace") or {}


def condition(body: dict[str, Any] | None) -> dict[str, Any] | None:
    recs = ((body or {}).get("status") or {}).get("recommendations") or {}
    conds = {c["type"]: c for c in recs.get("conditions") or []}
    return conds.get("CPUResizedInPlace")


async def test_running_pods_follow_usage_in_place_and_go_back(
    run_operator: OperatorRunner,
    cluster: Cluster,
    prometheus_bin: str,  # noqa: F811  # the fixture imported above
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forget_resource(NS, "chat")  # series the tests below leave in this process's registry
    with usage_for_operator(tmp_path, monkeypatch):  # the busiest pod: 0.5 cores
        async with run_operator():
            await cluster.create(MD_PATH, chat())

            async def revision() -> str | None:
                body = await cluster.get(f"{MD_PATH}/chat") or {}
                return (body.get("status") or {}).get("currentRevision")

            rev = await wait_for(revision, timeout=20)
            for name, qos in (("chat-a", "Burstable"), ("chat-g", "Guaranteed")):
                # As the kubelet: status is written through its subresource, not at create.
                await cluster.create(PODS_PATH, server_pod(name, rev))
                await cluster.merge(
                    f"{PODS_PATH}/{name}/status", {"status": {"phase": "Running", "qosClass": qos}}
                )

            async def cpu(name: str) -> str:
                pod = await cluster.get(f"{PODS_PATH}/{name}") or {}
                return str(pod["spec"]["containers"][0]["resources"]["requests"]["cpu"])

            # 0.5 cores used, +20%: about 600m (the 2 s rate of a replayed counter wobbles, and
            # is low while Prometheus has only its first scrapes: the next pass follows).
            await wait_for_value(
                lambda: cpu("chat-a"),
                lambda v: 0.5 < float(parse_quantity(v)) < 0.75,
                timeout=40,
            )
            assert await cpu("chat-g") == "2"  # a Guaranteed pod's QoS class cannot change
            pod = await cluster.get(f"{PODS_PATH}/chat-a") or {}
            assert pod["spec"]["containers"][0]["resources"]["requests"]["memory"] == "8Gi"

            body = await wait_for_value(
                lambda: cluster.get(f"{MD_PATH}/chat"),
                lambda b: in_place(b).get("pods") == 1
                and 0.5 < float(parse_quantity(in_place(b).get("cpu", "0"))) < 0.75,
            )
            status = in_place(body)
            assert status["revision"] == rev and status["ceiling"] == "2"
            assert status["container"] == "server" and status["pending"] == 0
            assert "in the last 15m" in status["reason"] and status["recentPeak"]
            cond = condition(body)
            assert cond is not None and cond["status"] == "True" and cond["reason"] == "Following"
            assert "1 left alone (Guaranteed QoS class cannot change in place)" in cond["message"]
            gauge = REGISTRY.get_sample_value(
                "trimtab_in_place_cpu_request_cores", {"namespace": NS, "name": "chat"}
            )
            assert gauge is not None and 0.5 < gauge < 0.75
            assert body["spec"]["resources"] == {"cpu": "2", "memory": "8Gi"}  # spec untouched
            # The refusal counters exist at 0 before any refusal, for the alert's increase().
            for refusal in ("refused", "unsupported", "forbidden"):
                labels = {"namespace": NS, "name": "chat", "result": refusal}
                assert REGISTRY.get_sample_value("trimtab_in_place_resizes_total", labels) == 0

            # inPlace.cpu off: back at the revision's request, the status and condition gone.
            await cluster.merge(
                f"{MD_PATH}/chat", {"spec": {"rightsizing": {"inPlace": {"cpu": False}}}}
            )
            assert await wait_for_value(lambda: cpu("chat-a"), lambda v: v == "2", timeout=20)
            body = await wait_for_value(
                lambda: cluster.get(f"{MD_PATH}/chat"), lambda b: not in_place(b), timeout=20
            )
            assert condition(body) is None

            # On again, then right-sizing Off: the pods go back before the status is dropped.
            await cluster.merge(
                f"{MD_PATH}/chat", {"spec": {"rightsizing": {"inPlace": {"cpu": True}}}}
            )
            await wait_for_value(lambda: cpu("chat-a"), lambda v: v != "2", timeout=20)
            await cluster.merge(f"{MD_PATH}/chat", {"spec": {"rightsizing": {"mode": "Off"}}})
            assert await wait_for_value(lambda: cpu("chat-a"), lambda v: v == "2", timeout=20)

            async def dropped() -> bool:
                body = await cluster.get(f"{MD_PATH}/chat") or {}
                return not (body.get("status") or {}).get("recommendations")

            assert await wait_for(dropped, timeout=20)
            assert (
                REGISTRY.get_sample_value(
                    "trimtab_in_place_cpu_request_cores", {"namespace": NS, "name": "chat"}
                )
                is None
            )


# ---------------------------------------------------------------------------------------------
# cpu_in_place against the emulator, without kopf: the paths a cluster rarely shows.


class Logger:
    def info(self, *args: Any) -> None:
        pass


async def _revision_with_pod(cluster: Cluster, cpu: str = "600m") -> None:
    """A revision's Deployment at 2 cores and one running pod of it at `cpu`."""
    await cluster.create(
        f"/apis/apps/v1/namespaces/{NS}/deployments",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": deployment_name("chat", "r1"), "namespace": NS},
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {"name": "server", "resources": {"requests": {"cpu": "2"}}}
                        ]
                    }
                }
            },
        },
    )
    body = server_pod("chat-a", "r1")
    body["spec"]["containers"][0]["resources"]["requests"]["cpu"] = cpu
    await cluster.create(PODS_PATH, body)
    await cluster.merge(
        f"{PODS_PATH}/chat-a/status", {"status": {"phase": "Running", "qosClass": "Burstable"}}
    )


def _previous() -> InPlaceStatus:
    return InPlaceStatus(
        container="server", revision="r1", cpu="600m", ceiling="2", reason="", updated_at="t"
    )


@pytest.fixture
def warnings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The reasons of the Events posted (kopf.event needs a running operator)."""
    posted: list[str] = []
    monkeypatch.setattr(kopf, "event", lambda body, **kw: posted.append(kw["reason"]))
    return posted


BODY = {"metadata": {"name": "chat", "namespace": NS}}


async def test_a_rollout_puts_the_pods_back_at_their_revision_request(
    api: Any, cluster: Cluster, warnings: list[str]
) -> None:
    await _revision_with_pod(cluster)
    held = "revision r2 is being rolled out"
    work = InPlaceWork(NS, "chat", follow=True, held=held, revision="r2", floor=0.01)
    out = await cpu_in_place(cluster.kube, BODY, work, _previous(), [], 0.0, "t", Logger())
    pod = await cluster.get(f"{PODS_PATH}/chat-a") or {}
    assert pod["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "2"
    assert out.status is None
    assert [(c.type, c.status, c.reason) for c in out.conditions] == [
        ("CPUResizedInPlace", "False", "RolloutInProgress")
    ]
    assert not warnings


@pytest.fixture
def no_resize_subresource(monkeypatch: pytest.MonkeyPatch) -> None:
    """An API server before in-place pod resize: pods have no resize subresource."""
    kind, namespaced, verbs, _ = RESOURCES["v1/pods"]
    monkeypatch.setitem(RESOURCES, "v1/pods", (kind, namespaced, verbs, {"status"}))


async def test_a_cluster_without_pod_resize_is_named_once(
    no_resize_subresource: None, api: Any, cluster: Cluster, warnings: list[str]
) -> None:
    await _revision_with_pod(cluster, cpu="2")
    work = InPlaceWork(NS, "chat", follow=True, held="", revision="r1", floor=0.01)
    samples = [(float(t), 0.5) for t in range(0, 1200, 300)]
    conditions: list[Any] = []
    for _ in range(2):
        out = await cpu_in_place(
            cluster.kube, BODY, work, None, conditions, 1200.0, "t", Logger(), cpu=samples
        )
        conditions = out.conditions
    cond = conditions[0]
    assert (cond.type, cond.status, cond.reason) == ("CPUResizedInPlace", "False", "Unsupported")
    assert "Kubernetes 1.33" in cond.message
    assert warnings == ["InPlaceResizeFailed"]  # once, not every pass
    pod = await cluster.get(f"{PODS_PATH}/chat-a") or {}
    assert pod["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "2"
