"""The kube layer's pure parts and its RBAC registry: what counts as already applied, merge
patches, and refusing calls the registry does not list."""

from __future__ import annotations

from typing import Any

import pytest

from trimtab.builders.common import is_applied, merge_patch
from trimtab.kube.client import ForbiddenCall, KubeClient, KubeError, _check
from trimtab.kube.resources import DEPLOYMENTS, HTTPROUTES, PODS, rbac_rules

APPLIED = [
    pytest.param({"a": 1}, {"a": 1, "b": 2}, True, id="server-added-defaults"),
    pytest.param({"a": 1}, {"a": 2}, False, id="changed-value"),
    pytest.param({"a": {"b": [1, 2]}}, {"a": {"b": [1, 2], "c": 0}}, True, id="nested"),
    pytest.param({"l": [{"x": 1}]}, {"l": [{"x": 1, "y": 2}]}, True, id="list-items-with-defaults"),
    pytest.param({"l": [1]}, {"l": [1, 2]}, False, id="list-longer"),
    pytest.param(
        {"resources": {"requests": {"cpu": "0.5"}}},
        {"resources": {"requests": {"cpu": "500m"}}},
        True,
        id="canonical-quantity",
    ),
    pytest.param(
        {"resources": {"limits": {"memory": "1Gi"}}},
        {"resources": {"limits": {"memory": "1G"}}},
        False,
        id="different-quantity",
    ),
    pytest.param({"image": "0.5"}, {"image": "500m"}, False, id="quantities-only-under-resources"),
    pytest.param({"a": 1}, None, False, id="missing-object"),
    pytest.param(
        {"env": [{"name": "A", "value": ""}], "command": [], "x": 1},
        {"env": [{"name": "A"}], "x": 1},
        True,
        id="empty-values-the-server-omits",
    ),
    pytest.param({"a": 0}, {}, False, id="zero-is-not-omitted"),
]


@pytest.mark.parametrize(("desired", "current", "expected"), APPLIED)
def test_is_applied(desired: dict[str, Any], current: Any, expected: bool) -> None:
    assert is_applied(desired, current) is expected


def test_merge_patch_only_differences() -> None:
    current = {"phase": "Ready", "replicas": 2, "other": "kept"}
    assert merge_patch(current, {"phase": "Ready", "replicas": 2}) == {}
    assert merge_patch(current, {"phase": "Degraded", "replicas": 2}) == {"phase": "Degraded"}
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3}}


async def test_client_refuses_calls_outside_its_rbac() -> None:
    client = KubeClient("http://127.0.0.1:9")
    with pytest.raises(ForbiddenCall):
        await client.delete(PODS, "ns", "p")  # pods are read-only for trimtab
    with pytest.raises(ForbiddenCall):
        await client.patch(PODS, "ns", "p", {}, subresource="status")
    with pytest.raises(ForbiddenCall):
        await client.get(PODS, "ns", "p")  # listed by label, never read one by one
    with pytest.raises(ForbiddenCall):
        _check(DEPLOYMENTS, "get", "scale")  # scaled by a patch, never read through scale
    _check(DEPLOYMENTS, "patch", "scale")
    _check(PODS, "patch", "resize")
    await client.close()


def test_rbac_rules_cover_subresources() -> None:
    rules = rbac_rules()
    assert {
        "apiGroups": ["apps"],
        "resources": ["deployments/scale"],
        "verbs": ["patch"],
    } in rules
    deploy = next(r for r in rules if r["resources"] == ["deployments"])
    assert set(deploy["verbs"]) == set(DEPLOYMENTS.verbs)
    assert not any("secrets" in r["resources"] for r in rules)


async def test_emulator_status_writes_move_the_resource_version(api: Any, cluster: Any) -> None:
    """As the API server: a status write bumps resourceVersion, so a second write that carries
    the version its writer read before the first one is refused (409), not applied over it."""
    from tests.test_modeldeployment_operator import MD_PATH, NS, model
    from trimtab.kube.client import KubeError
    from trimtab.kube.resources import MODELDEPLOYMENTS

    created = await cluster.create(MD_PATH, model("rv"))
    read = created["metadata"]["resourceVersion"]
    first = await cluster.kube.patch_status(
        MODELDEPLOYMENTS, NS, "rv", {"conditions": [{"type": "A", "status": "True"}]}, read
    )
    assert first["metadata"]["resourceVersion"] != read
    with pytest.raises(KubeError) as err:
        await cluster.kube.patch_status(
            MODELDEPLOYMENTS, NS, "rv", {"conditions": [{"type": "B", "status": "True"}]}, read
        )
    assert err.value.conflict
    stored = await cluster.get(f"{MD_PATH}/rv")
    assert stored is not None
    assert stored["status"]["conditions"] == [{"type": "A", "status": "True"}]


async def test_emulator_reports_status_the_api_server_would_not_keep(
    api: Any, cluster: Any
) -> None:
    """As the API server: a status field the CRD does not declare is pruned, and a value of the
    wrong type refused. The emulator keeps both, and reports them: the `api` fixture fails the
    test that wrote them."""
    from tests.test_modeldeployment_operator import MD_PATH, NS, model
    from trimtab.kube.resources import MODELDEPLOYMENTS

    created = await cluster.create(MD_PATH, model("pruned"))
    read = created["metadata"]["resourceVersion"]
    await cluster.kube.patch_status(
        MODELDEPLOYMENTS, NS, "pruned", {"rolloutStep": 2, "replicas": "two"}, read
    )
    problems, api.schema_problems[:] = list(api.schema_problems), []
    assert any("'rolloutStep' was unexpected" in p for p in problems), problems
    assert any("status.replicas: 'two' is not of type 'integer'" in p for p in problems), problems


async def test_emulator_reports_a_route_the_gateway_api_crd_refuses(
    api: Any, cluster: Any
) -> None:
    """As the API server with the Gateway API CRDs: a Service backend without a port is refused
    by the HTTPRoute CRD's CEL rules. The emulator keeps it, and reports it."""
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "portless", "namespace": "ns"},
        "spec": {"rules": [{"backendRefs": [{"name": "s"}]}]},
    }
    await cluster.kube.apply(route)
    problems, api.schema_problems[:] = list(api.schema_problems), []
    assert problems == [
        "HTTPRoute/portless: ['.spec.rules[0].backendRefs[0]: Must have port for Service "
        "reference']"
    ]


async def test_apply_shows_what_it_read_before_writing_over_it(api: Any, cluster: Any) -> None:
    """`before_write` sees the object apply read, before the write and without a read of its
    own: the rollout loop checks what a takeover drops on the one read of the route."""
    route: dict[str, Any] = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "seen", "namespace": "ns"},
        "spec": {"rules": [{"backendRefs": [{"name": "s", "port": 80}]}]},
    }
    kube = cluster.kube
    await kube.apply(route)
    seen: list[Any] = []
    path = "/apis/gateway.networking.k8s.io/v1/namespaces/ns/httproutes/seen"
    reads = api.reads.count(path)
    changed = {**route, "spec": {"rules": [{"backendRefs": [{"name": "t", "port": 80}]}]}}
    await kube.apply(changed, before_write=seen.append)
    assert api.reads.count(path) == reads + 1
    (before,) = seen
    assert before["spec"]["rules"][0]["backendRefs"][0]["name"] == "s"
    stored = await kube.get(HTTPROUTES, "ns", "seen")
    assert stored["spec"]["rules"][0]["backendRefs"][0]["name"] == "t"


async def test_every_write_names_trimtab_as_its_field_manager(api: Any, cluster: Any) -> None:
    """A write that names no fieldManager is recorded under its User-Agent (aiohttp's
    "Python/3.11 aiohttp/..."): every write names trimtab, so managedFields say who owns what."""
    from tests.test_modeldeployment_operator import MD_PATH, NS, model
    from trimtab import __version__
    from trimtab import constants as C
    from trimtab.kube.resources import MODELDEPLOYMENTS

    kube = cluster.kube
    route: dict[str, Any] = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": NS},
        "spec": {"rules": [{"backendRefs": [{"name": "s", "port": 80}]}]},
    }
    await kube.create(route)
    await kube.patch(HTTPROUTES, NS, "r", {"metadata": {"labels": {"a": "b"}}})
    await kube.apply({**route, "spec": {"hostnames": ["a.example"], **route["spec"]}})
    await cluster.create(MD_PATH, model("w"))
    writes = len(api.writers)
    await kube.patch_status(MODELDEPLOYMENTS, NS, "w", {"phase": "Pending"})
    assert len(api.writers) == writes + 1
    assert api.writers[:3] + api.writers[-1:] == [(C.FIELD_MANAGER, f"trimtab/{__version__}")] * 4


async def test_apply_removes_a_field_it_no_longer_sends(api: Any, cluster: Any) -> None:
    """Every field of the smaller manifest is already on the object, so only the
    `trimtab.io/applied` hash tells that the hostname was dropped; the apply it sends removes
    it (server-side apply drops fields its manager left out), and a repeat writes nothing."""
    from trimtab import constants as C

    route: dict[str, Any] = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "ns"},
        "spec": {
            "hostnames": ["a.example"],
            "rules": [{"backendRefs": [{"name": "s", "port": 80}]}],
        },
    }
    kube = cluster.kube
    await kube.apply(route)
    without = {**route, "spec": {"rules": route["spec"]["rules"]}}
    assert is_applied(without, await kube.get(HTTPROUTES, "ns", "r"))  # what the hash catches
    writes = len(api.writes)
    await kube.apply(without)
    assert len(api.writes) == writes + 1
    stored = await kube.get(HTTPROUTES, "ns", "r")
    assert "hostnames" not in stored["spec"]
    assert stored["metadata"]["annotations"][C.ANNOTATION_APPLIED]
    await kube.apply(without)
    assert len(api.writes) == writes + 1  # applied already: nothing written


class ClockedClient(KubeClient):
    """A client whose clock the test moves."""

    def __init__(self, url: str) -> None:
        super().__init__(url, ssl_context=False, keepalive=False)
        self.now = 0.0
        self.clock = lambda: self.now


ROUTE_WITH_RETRY: dict[str, Any] = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {"name": "r", "namespace": "ns"},
    "spec": {"rules": [{"backendRefs": [{"name": "s", "port": 80}],
                        "retry": {"attempts": 2}}]},
}  # fmt: skip


async def test_an_apply_of_a_field_the_crd_lacks_is_refused_whole(api: Any, cluster: Any) -> None:
    """The emulator holds HTTPRoutes to the standard-channel CRD, which has no rule `retry`
    before v1.7: as the API server, it refuses the whole apply (500, "field not declared in
    schema") and stores nothing."""
    with pytest.raises(KubeError) as refused:
        await cluster.kube.apply(ROUTE_WITH_RETRY)
    err = refused.value
    assert err.status == 500 and err.rejected
    assert err.undeclared == [".spec.rules[0].retry"]
    assert await cluster.kube.get(HTTPROUTES, "ns", "r") is None


async def test_an_apply_the_server_stores_otherwise_is_not_sent_every_loop(
    api: Any, cluster: Any
) -> None:
    """With drop_undeclared, the apply the API server refuses for the rule's `retry` is sent
    again without it. The stored route then never holds the retry, so it never looks applied:
    the same manifest is not sent again while nobody changes the route, for SETTLED_S. An edit
    by someone else (a new resourceVersion) is undone at once; so is a changed manifest; and
    after SETTLED_S the apply is tried again, for a CRD upgraded meanwhile. Each try is two
    requests: the one refused and the one without the field."""
    from trimtab.kube.client import SETTLED_S

    route = ROUTE_WITH_RETRY
    kube = ClockedClient(cluster.url)
    try:

        async def applies(manifest: dict[str, Any], later: float = 0.0) -> int:
            kube.now += later
            before = kube.writes[("apply", "HTTPRoute")]
            await kube.apply(manifest, drop_undeclared=True)
            return kube.writes[("apply", "HTTPRoute")] - before

        assert await applies(route) == 2
        stored = await kube.get(HTTPROUTES, "ns", "r")
        assert "retry" not in stored["spec"]["rules"][0]
        assert "retry" in route["spec"]["rules"][0]  # the caller's manifest is left as it was
        assert not is_applied(route, stored)
        assert [await applies(route, later=15) for _ in range(4)] == [0, 0, 0, 0]

        # Someone edits the route: trimtab's rules come back at the next loop.
        await kube.patch(HTTPROUTES, "ns", "r", {"spec": {"rules": [
            {"backendRefs": [{"name": "other", "port": 80}]}]}})  # fmt: skip
        assert await applies(route, later=15) == 2
        backend = (await kube.get(HTTPROUTES, "ns", "r"))["spec"]["rules"][0]["backendRefs"][0]
        assert backend["name"] == "s"
        assert await applies(route, later=15) == 0

        changed = {**route, "spec": {"rules": [{**route["spec"]["rules"][0], "backendRefs": [
            {"name": "t", "port": 80}]}]}}  # fmt: skip
        assert await applies(changed) == 2
        assert await applies(changed, later=SETTLED_S - 1) == 0
        assert await applies(changed, later=1) == 2  # tried again: a CRD upgraded meanwhile
        assert await applies(changed) == 0
    finally:
        await kube.close()


UNDECLARED_MESSAGES = [
    pytest.param(500, "failed to create typed patch object (ns/r; gateway.networking.k8s.io/v1, "
                 "Kind=HTTPRoute): .spec.rules[0].retry: field not declared in schema",
                 [".spec.rules[0].retry"], id="one-field"),
    pytest.param(500, "failed to create typed patch object (ns/r; gateway.networking.k8s.io/v1, "
                 "Kind=HTTPRoute): errors:\n  .spec.rules[0].retry: field not declared in "
                 "schema\n  .spec.rules[1].timeouts: field not declared in schema",
                 [".spec.rules[0].retry", ".spec.rules[1].timeouts"], id="several-fields"),
    pytest.param(400, "failed to create typed patch object (ns/r; /v1, Kind=Service): "
                 '.spec.ports[port=80,protocol="TCP"].x: field not declared in schema',
                 ['.spec.ports[port=80,protocol="TCP"].x'], id="fixed-as-400"),
    pytest.param(500, "etcdserver: request timed out", [], id="a-real-server-error"),
    pytest.param(422, ".spec.rules[0].retry: field not declared in schema", [],
                 id="not-an-apply-refusal"),
]  # fmt: skip


@pytest.mark.parametrize(("status", "message", "fields"), UNDECLARED_MESSAGES)
def test_undeclared_fields_are_read_from_the_refusal(
    status: int, message: str, fields: list[str]
) -> None:
    err = KubeError(status, "", message)
    assert err.undeclared == fields
    assert err.rejected is (bool(fields) or status in (400, 422))


_JOB: dict[str, Any] = {
    "spec": {
        "completions": 4,
        "completionMode": "Indexed",
        "template": {"spec": {"containers": [{"name": "w", "image": "a"}]}},
    }
}


def _with(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node: dict[str, Any] = out
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


IMMUTABLE = [
    pytest.param(
        "deployments", {"spec": {"selector": {"matchLabels": {"a": "1"}}, "replicas": 1}},
        {"spec": {"selector": {"matchLabels": {"a": "2"}}, "replicas": 1}}, "spec.selector",
        id="deployment-selector",
    ),
    pytest.param(
        "deployments", {"spec": {"selector": {"matchLabels": {"a": "1"}}, "replicas": 1}},
        {"spec": {"selector": {"matchLabels": {"a": "1"}}, "replicas": 3}}, None,
        id="deployment-replicas-change",
    ),
    pytest.param(
        "jobs", _JOB, _with(_JOB, "spec.template.spec.containers", [{"name": "w", "image": "b"}]),
        "spec.template", id="running-job-template",
    ),
    pytest.param(
        "jobs", _with(_JOB, "spec.suspend", True),
        _with(_with(_JOB, "spec.suspend", True), "spec.template.spec.nodeSelector", {"z": "a"}),
        None, id="suspended-job-scheduling-directives-kueue-sets",
    ),
    pytest.param(
        "jobs", _with(_JOB, "spec.suspend", True),
        _with(_with(_JOB, "spec.suspend", True), "spec.template.spec.containers", []),
        "spec.template", id="suspended-job-containers",
    ),
    pytest.param(
        "jobs", _JOB, _with(_JOB, "spec.completions", 8), "spec.completions",
        id="job-completions",
    ),
    pytest.param(
        "jobs", _JOB, _with(_with(_JOB, "spec.activeDeadlineSeconds", 60), "spec.suspend", False),
        None, id="job-deadline-and-suspend-change",
    ),
    pytest.param(
        "services", {"spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}},
        {"spec": {"clusterIP": "10.0.0.2", "ports": [{"port": 80}]}}, "spec.clusterIP",
        id="service-cluster-ip",
    ),
    pytest.param(
        "services", {"spec": {"ports": [{"port": 80}]}}, {"spec": {"ports": [{"port": 81}]}},
        None, id="service-ports-change",
    ),
    pytest.param(
        "pods", {"spec": {"containers": [{"name": "c", "image": "a"}]}},
        {"spec": {"containers": [{"name": "c", "image": "b"}]}}, None, id="pod-image",
    ),
    pytest.param(
        "pods", {"spec": {"containers": [{"name": "c", "image": "a"}]}},
        {"spec": {"containers": [{"name": "c", "image": "a", "env": []}]}}, "spec",
        id="pod-container-env",
    ),
    pytest.param(
        "pods", {"spec": {"tolerations": [{"key": "a"}]}},
        {"spec": {"tolerations": []}}, "spec.tolerations", id="pod-toleration-removed",
    ),
    pytest.param(
        "httproutes", {"spec": {"rules": [1]}}, {"spec": {"rules": [2]}}, None,
        id="kinds-without-rules",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("plural", "current", "new", "field"), IMMUTABLE)
def test_emulator_knows_the_fields_the_api_server_keeps(
    plural: str, current: dict[str, Any], new: dict[str, Any], field: str | None
) -> None:
    from tests.kube_emulator import immutable_change

    assert immutable_change(plural, current, new) == field


async def test_emulator_refuses_changing_an_immutable_field(api: Any, cluster: Any) -> None:
    """As the API server: a Deployment's selector cannot change once it exists (422)."""
    from trimtab.kube.client import KubeError

    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "namespace": "ns"},
        "spec": {
            "selector": {"matchLabels": {"app": "d"}},
            "template": {
                "metadata": {"labels": {"app": "d"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            },
        },
    }
    await cluster.kube.apply(deployment)
    deployment["spec"]["selector"] = {"matchLabels": {"app": "d", "v": "2"}}
    deployment["spec"]["template"]["metadata"]["labels"]["v"] = "2"
    with pytest.raises(KubeError) as err:
        await cluster.kube.apply(deployment)
    assert err.value.status == 422
    assert "spec.selector: field is immutable" in str(err.value)
