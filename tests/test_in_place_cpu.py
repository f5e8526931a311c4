"""In-place CPU: the request running pods follow within the day (`in_place_cpu`), which pods are
resized (`plan_cpu_resizes`), what a pending resize says, and how a refused resize is told."""

from __future__ import annotations

from typing import Any

import pytest

from trimtab.decisions.rightsizing import (
    DAY,
    CpuResizePlan,
    InPlaceCpu,
    PodCpuResize,
    in_place_cpu,
    in_place_verdict,
    plan_cpu_resizes,
    resize_pending,
)
from trimtab.handlers.inplace import _failure, template_cpu
from trimtab.kube.client import KubeError

NOW = 30 * DAY  # any time: samples are placed relative to it
STEP = 300.0


def flat(cores: float, since: float, until: float = NOW) -> list[tuple[float, float]]:
    """One sample per step at `cores` over (since, until]."""
    out, t = [], since + STEP
    while t <= until:
        out.append((t, cores))
        t += STEP
    return out


def day_rise(days: int, base: float, rise: float, rise_at: float) -> list[tuple[float, float]]:
    """`days` earlier days at `base`, with `rise` cores for 30 minutes from `rise_at` s after NOW's
    time of day on each of them; then the last hour at `base`."""
    out: list[tuple[float, float]] = []
    t = NOW - days * DAY + STEP
    while t <= NOW:
        into = (t - NOW) % DAY
        out.append((t, rise if rise_at <= into < rise_at + 1800 else base))
        t += STEP
    return out


def merged(*series: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return sorted(p for s in series for p in s)


CASES = [
    pytest.param(flat(0.5, NOW - 3 * DAY), 2.0, 0.6, 3, id="steady-0.5-plus-20pct"),
    pytest.param(
        day_rise(3, 0.5, 1.5, 600.0), 2.0, 1.8, 3, id="afternoon-rise-on-earlier-days-met-ahead"
    ),
    pytest.param(
        day_rise(3, 0.5, 1.5, 1800.0), 2.0, 0.6, 3, id="rise-beyond-the-15-minutes-ahead-ignored"
    ),
    pytest.param(flat(1.9, NOW - 3 * DAY), 2.0, 2.0, 3, id="capped-at-the-revision-request"),
    pytest.param(
        flat(0.5, NOW - 3 * DAY, NOW - 3600), 2.0, 2.0, 0, id="no-recent-usage-back-to-the-ceiling"
    ),
    pytest.param([], 2.0, 2.0, 0, id="no-usage-at-all"),
    pytest.param(flat(0.5, NOW - 3600), 2.0, 0.6, 0, id="first-day-follows-recent-only"),
    pytest.param(flat(0.001, NOW - 3 * DAY), 2.0, 0.01, 3, id="floored-at-10m"),
    pytest.param(
        merged(
            # One burst a week ago at this time; six quiet days since: the median ignores it.
            [(NOW - 7 * DAY + 600, 1.8)],
            [p for p in flat(0.5, NOW - 7 * DAY) if p[0] != NOW - 7 * DAY + 600],
        ),
        2.0,
        0.6,
        7,
        id="one-day-burst-outvoted-by-the-median",
    ),
    pytest.param(
        [(t, -1.0 if t > NOW - 900 else 0.5) for t, _ in flat(0.5, NOW - 3600)],
        2.0,
        2.0,
        0,
        id="unusable-recent-samples-are-none",
    ),
]


@pytest.mark.parametrize(("samples", "ceiling", "expected", "days"), CASES)
def test_in_place_cpu(
    samples: list[tuple[float, float]], ceiling: float, expected: float, days: int
) -> None:
    got = in_place_cpu(samples, NOW, ceiling, 0.01, STEP)
    assert got.request == pytest.approx(expected)
    assert got.days == days
    assert got.reason


def test_in_place_cpu_without_a_request_does_nothing() -> None:
    got = in_place_cpu(flat(0.5, NOW - DAY), NOW, None)
    assert got.request is None and "no CPU request" in got.reason


def test_reason_names_its_inputs() -> None:
    got = in_place_cpu(day_rise(3, 0.5, 1.5, 600.0), NOW, 1.0, 0.01, STEP)
    assert "500m in the last 15m" in got.reason
    assert "1500m in the next 15m on earlier days (median of 3)" in got.reason
    assert "capped at the revision's request 1" in got.reason


# ---------------------------------------------------------------------------------------------
# Which pods


def pod(
    name: str,
    cpu: str | None = "2",
    phase: str = "Running",
    qos: str = "Burstable",
    **extra: Any,
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "server", "resources": {"requests": {}}}
    if cpu is not None:
        container["resources"]["requests"]["cpu"] = cpu
    container.update(extra.pop("container", {}))
    body: dict[str, Any] = {
        "metadata": {"name": name, **extra.pop("metadata", {})},
        "spec": {"containers": [{"name": "sidecar"}, container]},
        "status": {"phase": phase, "qosClass": qos, **extra.pop("status", {})},
    }
    return body


RESTARTS = {"resourceName": "cpu", "restartPolicy": "RestartContainer"}

PLANS = [
    pytest.param(pod("a"), "resize", id="running-at-the-revision-request"),
    pytest.param(pod("a", cpu="650m"), "settled", id="8pct-above-a-cut-waits"),
    pytest.param(pod("a", cpu="720m"), "resize", id="17pct-above-cut"),
    pytest.param(pod("a", cpu="580m"), "settled", id="3pct-below-a-raise-waits"),
    pytest.param(pod("a", cpu="560m"), "resize", id="7pct-below-raised"),
    pytest.param(pod("a", qos="Guaranteed"), "skipped", id="guaranteed-qos-cannot-change"),
    pytest.param(
        pod("a", container={"resizePolicy": [RESTARTS]}),
        "skipped",
        id="resize-policy-restarts-the-container",
    ),
    pytest.param(
        pod("a", container={"resizePolicy": [{**RESTARTS, "restartPolicy": "NotRequired"}]}),
        "resize",
        id="resize-policy-not-required",
    ),
    pytest.param(pod("a", phase="Pending"), "skipped", id="not-running-yet"),
    pytest.param(
        pod("a", metadata={"deletionTimestamp": "2026-01-01T00:00:00Z"}),
        "skipped",
        id="being-deleted",
    ),
    pytest.param(pod("a", cpu=None), "skipped", id="no-cpu-request"),
]  # fmt: skip


# Going back to the revision's request (2 cores): every pod not there, however close.
RESTORES = [
    pytest.param(pod("a", cpu="1910m"), "resize", id="5pct-below-goes-back"),
    pytest.param(pod("a", cpu="2"), "settled", id="at-the-request"),
    pytest.param(pod("a", cpu="2000m"), "settled", id="at-the-request-in-millicores"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "outcome"), RESTORES)
def test_pods_go_back_to_the_revision_request_exactly(body: dict[str, Any], outcome: str) -> None:
    plan = plan_cpu_resizes([body], "server", 2.0, exact=True)
    got = {"resize": [r.pod for r in plan.resizes], "settled": plan.settled}
    assert got[outcome] == ["a"]
    assert [r.target for r in plan.resizes] == (["2"] if outcome == "resize" else [])


@pytest.mark.parametrize(("body", "outcome"), PLANS)
def test_plan_cpu_resizes(body: dict[str, Any], outcome: str) -> None:
    plan = plan_cpu_resizes([body], "server", 0.6)
    got = {
        "resize": [r.pod for r in plan.resizes],
        "settled": plan.settled,
        "skipped": [name for name, _ in plan.skipped],
    }
    assert got[outcome] == ["a"]
    assert sum(len(v) for v in got.values()) == 1
    if plan.resizes:
        resize = plan.resizes[0]
        assert resize.index == 1  # the server container, not the sidecar
        assert resize.target == "600m"
        assert resize.current == body["spec"]["containers"][1]["resources"]["requests"]["cpu"]


PENDING = [
    pytest.param(
        {"conditions": [{"type": "PodResizePending", "status": "True", "reason": "Deferred",
                         "message": "Node didn't have enough capacity: cpu"}]},
        ("Deferred", "Node didn't have enough capacity: cpu"),
        id="deferred-condition",
    ),
    pytest.param(
        {"conditions": [{"type": "PodResizePending", "status": "True", "reason": "Infeasible",
                         "message": "Node didn't have enough allocatable"}]},
        ("Infeasible", "Node didn't have enough allocatable"),
        id="infeasible-condition",
    ),
    pytest.param({"resize": "Deferred"}, ("Deferred", ""), id="before-1.33-status-resize"),
    pytest.param({"resize": "InProgress"}, None, id="in-progress-is-not-pending"),
    pytest.param(
        {"conditions": [{"type": "PodResizeInProgress", "status": "True"}]},
        None,
        id="in-progress-condition",
    ),
    pytest.param({}, None, id="nothing"),
]  # fmt: skip


@pytest.mark.parametrize(("status", "expected"), PENDING)
def test_resize_pending(status: dict[str, Any], expected: tuple[str, str] | None) -> None:
    assert resize_pending({"status": status}) == expected


def test_pending_pods_are_still_resized_to_a_new_target() -> None:
    body = pod("a", status={"resize": "Deferred"})
    plan = plan_cpu_resizes([body], "server", 0.6)
    assert plan.pending == [("a", "Deferred", "")]
    assert [r.pod for r in plan.resizes] == ["a"]


FAILURES = [
    pytest.param(
        KubeError(404, "NotFound", 'pods "a" not found', {"details": {"name": "a"}}),
        "gone",
        id="pod-deleted-meanwhile",
    ),
    pytest.param(
        KubeError(404, "NotFound", "the server could not find the requested resource", {}),
        "unsupported",
        id="no-resize-subresource",
    ),
    pytest.param(KubeError(403, "Forbidden", "cannot patch pods/resize", {}), "forbidden",
                 id="rbac"),
    pytest.param(KubeError(409, "Conflict", "modified", {}), "changed", id="conflict"),
    # What the API server answers to a JSON patch whose `test` failed: a generic message,
    # the patch library's words in details.causes (apiserver handlers/patch.go).
    pytest.param(
        KubeError(422, "Invalid", "the server rejected our request due to an error in our "
                  "request", {"details": {"causes": [{"type": "UnexpectedServerResponse",
                  "message": "testing value /spec/containers/0/resources/requests/cpu failed: "
                             "test failed"}]}}),
        "changed",
        id="request-changed-since-listed",
    ),
    pytest.param(
        KubeError(422, "Invalid", "the server rejected our request due to an error in our "
                  "request", {"details": {"causes": [{"type": "FieldValueInvalid",
                  "message": "Invalid value: resize is infeasible"}]}}),
        "refused",
        id="generic-422-for-another-reason",
    ),
    pytest.param(
        KubeError(422, "Invalid", "Pod QoS is immutable", {}), "refused", id="api-server-refuses"
    ),
]  # fmt: skip


@pytest.mark.parametrize(("err", "result"), FAILURES)
def test_failure_classification(err: KubeError, result: str) -> None:
    got, message = _failure(err, "a")
    assert got == result
    if result in ("unsupported", "forbidden", "refused"):
        assert message


def test_template_cpu() -> None:
    deployment = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "sidecar", "resources": {"requests": {"cpu": "100m"}}},
                        {"name": "server", "resources": {"requests": {"cpu": "1500m"}}},
                    ]
                }
            }
        }
    }
    assert template_cpu(deployment) == 1.5
    bare = {"spec": {"template": {"spec": {"containers": [{"name": "server"}]}}}}
    assert template_cpu(bare) is None


TARGET = InPlaceCpu(0.6, "500m in the last 15m, +20%")
RESIZE = PodCpuResize("a", 0, "2", "600m")
VERDICTS = [
    pytest.param(CpuResizePlan([RESIZE]), 1, {}, ("True", "Following"),
                 "1 pod(s) at 600m: 500m in the last 15m, +20%", id="accepted"),
    pytest.param(CpuResizePlan([], settled=["a", "b"]), 0, {}, ("True", "Following"),
                 "2 pod(s) at 600m", id="already-there"),
    pytest.param(CpuResizePlan([RESIZE], skipped=[("g", "Guaranteed QoS class cannot change")]),
                 1, {}, ("True", "Following"), "; 1 left alone (Guaranteed QoS",
                 id="one-left-alone"),
    pytest.param(CpuResizePlan([RESIZE]), 0, {"unsupported": "no pods/resize"},
                 ("False", "Unsupported"), "no pods/resize", id="no-resize-subresource"),
    pytest.param(CpuResizePlan([RESIZE, RESIZE]), 0,
                 {"refused": "a: QoS", "forbidden": "RBAC"}, ("False", "Forbidden"), "RBAC",
                 id="forbidden-before-refused"),
    pytest.param(CpuResizePlan([RESIZE], pending=[("a", "Deferred", "no room")]), 1, {},
                 ("False", "Deferred"), "1 pod(s) wait for the kubelet, e.g. a: Deferred (no room)",
                 id="kubelet-defers"),
    pytest.param(CpuResizePlan([RESIZE], pending=[("a", "Infeasible", "")]), 0,
                 {"refused": "a: QoS"}, ("False", "Refused"), "a: QoS",
                 id="a-refusal-outranks-pending"),
    pytest.param(CpuResizePlan([], skipped=[("g", "Guaranteed QoS class cannot change"),
                                            ("h", "Guaranteed QoS class cannot change")]),
                 0, {}, ("False", "NotResizable"),
                 "no pod can follow usage in place: 2 pod(s) left alone, e.g. g: Guaranteed",
                 id="every-pod-left-alone-is-not-following"),
]  # fmt: skip


@pytest.mark.parametrize(("plan", "resized", "refusals", "expected", "message"), VERDICTS)
def test_in_place_verdict(
    plan: CpuResizePlan,
    resized: int,
    refusals: dict[str, str],
    expected: tuple[str, str],
    message: str,
) -> None:
    status, reason, text = in_place_verdict(TARGET, plan, resized, refusals)
    assert (status, reason) == expected
    assert message in text
