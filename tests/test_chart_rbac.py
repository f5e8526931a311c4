"""The chart's RBAC is exactly what the operator calls: the rules rendered for each install mode
equal trimtab's resource registry (the client refuses any call outside it) plus what kopf itself
does (events, CRD discovery, peering keep-alives), with nothing more: no Secrets, no wildcards."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.chart_render import NAMESPACE, RELEASE, by_kind, one, render
from trimtab.builders.common import Owner
from trimtab.kube import resources

Triple = tuple[str, str, str]  # (apiGroup, resource, verb)

KOPF_EVENTS: set[Triple] = {("", "events", "create")}
KOPF_CRD_DISCOVERY: set[Triple] = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
# kopf only lists namespaces when it watches named namespaces (kopf/_core/reactor/observation.py:
# cluster-wide it skips the listing), so only the one-namespace mode grants it.
KOPF_NAMESPACE_DISCOVERY: set[Triple] = {("", "namespaces", "list"), ("", "namespaces", "watch")}
# kopf's keep-alives: it watches the peering object and patches its status; it never creates or
# gets it (kopf/_core/engines/peering.py). trimtab run creates it (kube/resources.py PEERING).
KOPF_CLUSTER_PEERING: set[Triple] = {
    ("kopf.dev", "clusterkopfpeerings", v) for v in ("list", "watch", "patch")
} | {("kopf.dev", r.plural, v) for r in resources.PEERING if not r.namespaced for v in r.verbs}
KOPF_NAMESPACED_PEERING: set[Triple] = {
    ("kopf.dev", "kopfpeerings", v) for v in ("list", "watch", "patch")
} | {("kopf.dev", r.plural, v) for r in resources.PEERING if r.namespaced for v in r.verbs}


def triples(rules: list[dict[str, Any]]) -> set[Triple]:
    out = set()
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule  # no resourceNames, URLs
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, res, verb))
    return out


def registry_triples(namespaced: bool | None = None) -> set[Triple]:
    """The registry's rules; namespaced=True/False keeps only resources of that scope."""
    scope = {(r.group, r.plural): r.namespaced for r in resources.REGISTRY}
    out = set()
    for group, res, verb in triples(resources.rbac_rules()):
        if namespaced is None or scope[(group, res.split("/")[0])] == namespaced:
            out.add((group, res, verb))
    return out


def _paste_hint() -> str:
    """What to put in templates/rbac.yaml's trimtab.operatorRules when the registry changes."""
    return "update trimtab.operatorRules in charts/trimtab/templates/rbac.yaml to:\n" + (
        yaml.safe_dump(resources.rbac_rules(), default_flow_style=None, sort_keys=False)
    )


# The operator's own ClusterRole; the chart's others are the GPU agent's and the users' roles
# aggregated into admin, edit and view (tests/test_chart.py).
OPERATOR_ROLE = f"{RELEASE}-{NAMESPACE}"


def test_cluster_wide_role_is_registry_plus_kopf() -> None:
    docs = render()
    role = one(docs, "ClusterRole", OPERATOR_ROLE)
    expected = registry_triples() | KOPF_EVENTS | KOPF_CRD_DISCOVERY | KOPF_CLUSTER_PEERING
    got = triples(role["rules"])
    assert got - expected == set(), "granted but never used:\n" + _paste_hint()
    assert expected - got == set(), "used but not granted:\n" + _paste_hint()
    assert by_kind(docs, "Role") == [] and by_kind(docs, "RoleBinding") == []


def test_one_namespace_mode_grants_a_role_there() -> None:
    docs = render({"operator": {"watchNamespace": "ml"}})
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == "ml"
    expected_role = registry_triples(namespaced=True) | KOPF_EVENTS | KOPF_NAMESPACED_PEERING
    assert triples(role["rules"]) == expected_role, _paste_hint()
    discovery = one(docs, "ClusterRole", f"{OPERATOR_ROLE}-discovery")
    expected_cluster = (
        registry_triples(namespaced=False) | KOPF_CRD_DISCOVERY | KOPF_NAMESPACE_DISCOVERY
    )
    assert triples(discovery["rules"]) == expected_cluster
    binding = one(docs, "RoleBinding")
    assert binding["metadata"]["namespace"] == "ml"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }


def test_standalone_needs_no_peering_rights() -> None:
    standalone = {"peering": {"enabled": False}, "operator": {"replicas": 1}}
    role = one(render(standalone), "ClusterRole", OPERATOR_ROLE)
    assert {t for t in triples(role["rules"]) if t[0] == "kopf.dev"} == set()
    one_namespace = {
        "peering": {"enabled": False},
        "operator": {"watchNamespace": "ml", "replicas": 1},
    }
    ns_role = one(render(one_namespace), "Role")
    assert {t for t in triples(ns_role["rules"]) if t[0] == "kopf.dev"} == set()


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({}, id="cluster-wide"),
        pytest.param({"operator": {"watchNamespace": "ml"}}, id="one-namespace"),
    ],
)
def test_no_secrets_no_wildcards_and_bindings_name_the_service_account(
    values: dict[str, Any],
) -> None:
    docs = render(values)
    roles = by_kind(docs, "ClusterRole") + by_kind(docs, "Role")
    assert roles
    for role in roles:
        for group, res, verb in triples(role["rules"]):
            assert "*" not in (group, res, verb)
            assert res.split("/")[0] not in ("secrets", "configmaps", "serviceaccounts")
            assert verb not in ("escalate", "bind", "impersonate", "deletecollection")
    # The users' roles are bound by aggregation into admin, edit and view, not here.
    aggregated = [r for r in roles if any(k.startswith("rbac.authorization.k8s.io/aggregate-to-")
                                          for k in r["metadata"].get("labels", {}))]  # fmt: skip
    assert len(aggregated) == 2
    roles = [r for r in roles if r not in aggregated]
    names = {(r["kind"], r["metadata"]["name"]) for r in roles}
    bindings = by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding")
    assert len(bindings) == len(roles)
    sa = one(docs, "ServiceAccount")
    for binding in bindings:
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in names
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
        ]
    pod = next(d for d in by_kind(docs, "Deployment"))["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"] == RELEASE


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({}, id="cluster-wide"),
        pytest.param({"operator": {"watchNamespace": "ml"}}, id="one-namespace"),
    ],
)
def test_owner_references_may_block_deletion(values: dict[str, Any]) -> None:
    """Every object trimtab creates names its ModelDeployment or TrainingJob as owner with
    blockOwnerDeletion; where OwnerReferencesPermissionEnforcement is on (OpenShift), the API
    server refuses that unless the writer may update the owner's finalizers."""
    for kind, plural in (("ModelDeployment", "modeldeployments"), ("TrainingJob", "trainingjobs")):
        owner = Owner("trimtab.io/v1alpha1", kind, "m", "ml", "u")
        assert owner.reference()["blockOwnerDeletion"] is True
        docs = render(values)
        roles = by_kind(docs, "ClusterRole") + by_kind(docs, "Role")
        granted = {t for role in roles for t in triples(role["rules"])}
        assert ("trimtab.io", f"{plural}/finalizers", "update") in granted


def test_gpu_agent_may_only_list_pods() -> None:
    """The agent names GPU processes from its node's pods (gpu/pods.py: one list call with a
    spec.nodeName field selector) and needs nothing else from the API."""
    docs = render({"gpuAgent": {"enabled": True}})
    role = one(docs, "ClusterRole", f"{RELEASE}-{NAMESPACE}-gpu-agent")
    assert triples(role["rules"]) == {("", "pods", "list")}
    binding = one(docs, "ClusterRoleBinding", f"{RELEASE}-{NAMESPACE}-gpu-agent")
    agent_sa = one(docs, "ServiceAccount", f"{RELEASE}-gpu-agent")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": agent_sa, "namespace": NAMESPACE}
    ]
    daemonset = one(docs, "DaemonSet")
    assert daemonset["spec"]["template"]["spec"]["serviceAccountName"] == agent_sa
    without_rbac = render({"gpuAgent": {"enabled": True}, "rbac": {"create": False}})
    assert by_kind(without_rbac, "ClusterRole") == []


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"gpuAgent": {"enabled": True}}, id="cluster-wide"),
        pytest.param(
            {"operator": {"watchNamespace": "ml"}, "gpuAgent": {"enabled": True}},
            id="one-namespace",
        ),
    ],
)
def test_cluster_scoped_names_differ_between_namespaces(values: dict[str, Any]) -> None:
    """One release per team, each of the same name in its own namespace: their ClusterRoles
    and bindings must not collide (Helm refuses an object another release owns)."""
    cluster_kinds = ("ClusterRole", "ClusterRoleBinding")

    def names(namespace: str) -> set[tuple[str, str]]:
        docs = render(values, namespace=namespace)
        return {(d["kind"], d["metadata"]["name"]) for k in cluster_kinds for d in by_kind(docs, k)}

    team_a, team_b = names("team-a"), names("team-b")
    assert team_a and len(team_a) == len(team_b)
    assert team_a.isdisjoint(team_b)


def test_rbac_create_false_renders_no_rbac() -> None:
    docs = render({"rbac": {"create": False}})
    for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
        assert by_kind(docs, kind) == []
