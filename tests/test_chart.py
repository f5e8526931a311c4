"""The Helm chart: lint, render with default and non-default values, every object valid for the
API server (kubernetes-validate --strict, or the published CRD for ServiceMonitor), restricted
pod security, the operator's args and env as the real CLI and settings parse them, and the
values file, its schema and the pydantic model in step."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import pydantic
import pytest
import yaml

from tests.chart_render import CHART, NAMESPACE, RELEASE, by_kind, one, render, render_files
from tests.validation import ROOT, thirdparty, validate_builtin, validate_custom
from trimtab.api.chartvalues import ChartValues, render_schema
from trimtab.config import Settings

SERVICEMONITOR_CRD = thirdparty("prometheus-operator", "monitoring.coreos.com_servicemonitors.yaml")
MONITOR_CRDS = {
    "ServiceMonitor": SERVICEMONITOR_CRD,
    "PodMonitor": thirdparty("prometheus-operator", "monitoring.coreos.com_podmonitors.yaml"),
}

EVERYTHING: dict[str, Any] = {
    "fullnameOverride": "tt",
    "image": {"repository": "registry.example.com/trimtab", "digest": "sha256:" + "a" * 64},
    "imagePullSecrets": [{"name": "regcred"}],
    "crds": {"install": False},
    "operator": {
        "replicas": 3,
        "prometheusUrl": "https://prometheus.example.com:9090",
        "prometheusClient": {
            "bearerTokenSecret": {"name": "prom-token", "key": "token"},
            "headers": {"X-Scope-OrgID": "team-a"},
            "ca": {"configMap": "prometheus-ca", "key": "service-ca.crt"},
            "clientCertSecret": "trimtab-client-tls",
        },
        "logLevel": "DEBUG",
        "metricsPort": 9090,
        "healthPort": 9091,
        "extraEnv": [{"name": "TRIMTAB_RIGHTSIZING_INTERVAL_SECONDS", "value": "600"}],
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}
                    ]
                }
            }
        },
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "ml-platform"},
        "podLabels": {"team": "ml-platform"},
    },
    "peering": {"name": "trimtab-prod"},
    "serviceAccount": {"name": "trimtab-sa", "annotations": {"example.com/role": "trimtab"}},
    "podDisruptionBudget": {"minAvailable": 2},
    "serviceMonitor": {
        "enabled": True,
        "interval": "15s",
        "scrapeTimeout": "5s",
        "labels": {"release": "kube-prometheus-stack"},
    },
    "modelServerPodMonitor": {
        "enabled": True,
        "interval": "5s",
        "labels": {"release": "kube-prometheus-stack"},
    },
    "networkPolicy": {
        "enabled": True,
        "metricsFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
        "egress": [
            {
                "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}],
                "ports": [{"port": 443, "protocol": "TCP"}],
            }
        ],
    },
    "grafanaDashboard": {"enabled": True, "namespace": "monitoring"},
    "gpuAgent": {"enabled": True, "port": 9500, "runtimeClassName": "nvidia-cdi"},
}
NAMESPACED: dict[str, Any] = {
    "operator": {"watchNamespace": "ml"},
    "modelServerPodMonitor": {"enabled": True},
}
MINIMAL: dict[str, Any] = {
    "operator": {"replicas": 1},
    "peering": {"enabled": False},
    "rbac": {"create": False},
    "serviceAccount": {"create": False, "name": "existing"},
    "podDisruptionBudget": {"enabled": False},
}
VALUE_SETS = [
    pytest.param({}, id="defaults"),
    pytest.param(EVERYTHING, id="everything"),
    pytest.param(NAMESPACED, id="one-namespace"),
    pytest.param(MINIMAL, id="minimal"),
]


def operator_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(
        d
        for d in by_kind(docs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    )


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", []) if "value" in e}


@pytest.mark.parametrize("values", VALUE_SETS)
def test_chart_lints_clean(values: dict[str, Any]) -> None:
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 (info) is only "icon is recommended".
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_rendered_object_is_valid(values: dict[str, Any]) -> None:
    docs = render(values)
    assert docs
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            validate_custom(doc, MONITOR_CRDS[doc["kind"]])
        else:
            validate_builtin(doc)
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) and len(name) <= 253, name


def test_defaults_install_the_operator_with_crds() -> None:
    docs = render()
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    crds = by_kind(docs, "CustomResourceDefinition")
    names = sorted(c["metadata"]["name"] for c in crds)
    assert names == [
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
        "modeldeployments.trimtab.io",
        "trainingjobs.trimtab.io",
    ]
    for crd in crds:
        # Kept by `helm uninstall`, never pruned by an Argo CD sync (that would delete every
        # ModelDeployment and TrainingJob with them).
        assert crd["metadata"]["annotations"] == {
            "helm.sh/resource-policy": "keep",
            "argocd.argoproj.io/sync-options": "Prune=false",
        }
    scopes = {c["metadata"]["name"]: c["spec"]["scope"] for c in crds}
    assert scopes["kopfpeerings.kopf.dev"] == "Namespaced"
    assert scopes["clusterkopfpeerings.kopf.dev"] == "Cluster"
    assert operator_deployment(docs)["spec"]["replicas"] == 2


def test_chart_crds_are_the_generated_ones() -> None:
    """The chart installs exactly the CRDs in crds/ (plus kopf's), so both install paths agree."""
    rendered = {
        c["metadata"]["name"]: c
        for c in by_kind(render(), "CustomResourceDefinition")
        if c["spec"]["group"] == "trimtab.io"
    }
    generated = {}
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        generated[crd["metadata"]["name"]] = crd
    assert rendered.keys() == generated.keys()
    for name, crd in rendered.items():
        crd = json.loads(json.dumps(crd))
        crd["metadata"].pop("annotations")
        assert crd == generated[name], name


def test_standalone_replicas_are_refused() -> None:
    """Without peering every replica acts on every ModelDeployment: two would fight, also for
    the moment a rolling update runs the new pod beside the old one."""
    with pytest.raises(Exception, match="operator.replicas to 1"):
        render({"peering": {"enabled": False}})
    standalone = operator_deployment(render(MINIMAL))["spec"]
    assert standalone["replicas"] == 1
    assert standalone["strategy"] == {"type": "Recreate"}
    peered = operator_deployment(render())["spec"]["strategy"]
    assert peered == {"type": "RollingUpdate",
                      "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}  # fmt: skip


# Values the schema accepts one by one but that together make an operator that cannot work,
# or one with too much reach: the chart refuses them with a message.
REFUSED_COMBINATIONS = [
    pytest.param({"serviceAccount": {"create": False}}, "needs serviceAccount.name",
                 id="no-account-would-bind-the-default-one"),
    pytest.param({"operator": {"metricsPort": 9000, "healthPort": 9000}}, "must differ",
                 id="one-port-for-metrics-and-health"),
]  # fmt: skip


@pytest.mark.parametrize(("values", "said"), REFUSED_COMBINATIONS)
def test_contradictory_values_are_refused(values: dict[str, Any], said: str) -> None:
    with pytest.raises(Exception, match=said):
        render(values)


def test_long_release_names_keep_service_names_dns_labels() -> None:
    """Helm allows 53-character release names; a Service's name is a DNS label of at most 63
    characters, suffix included."""
    release = "r" * 53
    docs = render({"gpuAgent": {"enabled": True}}, release=release)
    services = by_kind(docs, "Service")
    assert {s["metadata"]["name"].rsplit("-", 2)[-1] for s in services} >= {"metrics", "agent"}
    for svc in services:
        name = svc["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name


def test_crds_install_false_renders_no_crds() -> None:
    assert by_kind(render({"crds": {"install": False}}), "CustomResourceDefinition") == []


def test_an_ipv6_listen_address_reaches_the_operator_and_the_agent() -> None:
    docs = render({"operator": {"listenAddress": "::"}, "gpuAgent": {"enabled": True}})
    operator = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container_env(operator)["TRIMTAB_LISTEN_ADDRESS"] == "::"
    agent = one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    assert "--address=::" in agent["args"]


def test_openshift_can_leave_the_uid_to_its_security_context_constraints() -> None:
    """restricted-v2 assigns a uid and fsGroup from the namespace's range and refuses any
    other: with both set to null, no pod names one, and the restricted profile still holds."""
    values = {"gpuAgent": {"enabled": True},
              "securityContext": {"runAsUser": None, "runAsGroup": None}}  # fmt: skip
    pods = [d["spec"]["template"]["spec"] for d in render(values)
            if d["kind"] in ("Deployment", "DaemonSet")]  # fmt: skip
    assert len(pods) == 2
    for pod in pods:
        contexts = [pod["securityContext"], *(c["securityContext"] for c in pod["containers"])]
        for ctx in contexts:
            assert not {"runAsUser", "runAsGroup", "fsGroup"} & ctx.keys(), ctx
            assert ctx["runAsNonRoot"] is True


@pytest.mark.parametrize("values", VALUE_SETS)
def test_pods_meet_the_restricted_profile(values: dict[str, Any]) -> None:
    for doc in render(values):
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["runAsNonRoot"] is True
            assert ctx["runAsUser"] != 0
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
            assert "privileged" not in ctx
            assert container["resources"]["requests"]
            assert container["resources"]["limits"]["memory"]
        # Only the GPU agent may see host PIDs; nothing mounts host paths.
        assert pod.get("hostPID", False) == (doc["kind"] == "DaemonSet")
        assert not pod.get("hostNetwork") and not pod.get("hostIPC")
        assert all("hostPath" not in v for v in pod.get("volumes", []))


def _parsed_cli_args(args: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The namespace `trimtab run` would start kopf with, parsed by the real CLI."""
    import trimtab.__main__ as cli

    seen: list[Any] = []

    def fake_run(parsed: Any) -> int:
        seen.append(parsed)
        return 0

    monkeypatch.setattr(cli, "_run", fake_run)
    assert cli.main(args) == 0
    return seen[0]


@pytest.mark.parametrize(
    ("values", "namespace", "peering"),
    [
        pytest.param({}, "", "trimtab", id="cluster-wide-peered"),
        pytest.param(NAMESPACED, "ml", "trimtab", id="one-namespace"),
        pytest.param(MINIMAL, "", "", id="standalone"),
        pytest.param(EVERYTHING, "", "trimtab-prod", id="named-peering"),
    ],
)
def test_operator_args_and_env_agree(
    values: dict[str, Any], namespace: str, peering: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = operator_deployment(render(values))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["trimtab"]
    args = container["args"]
    parsed = _parsed_cli_args(args, monkeypatch)
    assert parsed.command == "run"
    assert (parsed.namespace or "") == namespace
    assert parsed.all_namespaces is (not namespace)
    assert (parsed.peering or "") == peering

    env = container_env(container)
    # Settings ignores a TRIMTAB_* name it has no field for: a misspelt one would fall back to
    # the default unnoticed. Every one the chart sets (extraEnv aside) is a setting's.
    extra = {e["name"] for e in ChartValues.model_validate(values).operator.extraEnv}
    fields = {f"TRIMTAB_{name.upper()}" for name in Settings.model_fields}
    set_by_chart = {e["name"] for e in container["env"]} - extra
    assert {n for n in set_by_chart if n.startswith("TRIMTAB_")} <= fields
    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith("TRIMTAB_")})
    merged = ChartValues.model_validate(values).operator
    assert settings.namespace == namespace
    assert settings.peering == peering
    assert settings.prometheus_url == merged.prometheusUrl
    assert settings.metrics_port == merged.metricsPort
    assert settings.health_port == merged.healthPort
    assert settings.listen_address == merged.listenAddress
    assert settings.log_level == merged.logLevel
    # kopf's peering identity: the pod name, so the peering status names real pods.
    pod_id = next(e for e in container["env"] if e["name"] == "POD_ID")
    assert pod_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.parametrize("values", VALUE_SETS)
def test_ports_probes_and_service_line_up(values: dict[str, Any]) -> None:
    docs = render(values)
    merged = ChartValues.model_validate(values).operator
    container = operator_deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": merged.metricsPort, "health": merged.healthPort}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    service = one(docs, "Service", f"{values.get('fullnameOverride', RELEASE)}-metrics")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": merged.metricsPort, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = operator_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def _mounted_file(spec: dict[str, Any], path: str) -> tuple[str, str, str]:
    """(kind, name, key) of the ConfigMap or Secret the pod's file `path` comes from."""
    container = spec["containers"][0]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert mount.get("readOnly") is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    relative = path.removeprefix(mount["mountPath"] + "/")
    source = volume.get("secret") or volume["configMap"]
    kind, name = ("Secret", source["secretName"]) if "secret" in volume else (
        "ConfigMap", source["name"])  # fmt: skip
    items = {i["path"]: i["key"] for i in source.get("items", [])}
    return kind, name, items.get(relative, relative)


@pytest.mark.parametrize(
    ("client", "files"),
    [
        pytest.param({}, {}, id="nothing"),
        pytest.param({"serviceAccountToken": True, "ca": {"configMap": "openshift-service-ca.crt",
                                                          "key": "service-ca.crt"}},
                     {"ca_file": ("ConfigMap", "openshift-service-ca.crt", "service-ca.crt")},
                     id="openshift-thanos-querier"),
        pytest.param({"bearerTokenSecret": {"name": "prom-token", "key": "token"},
                      "headers": {"X-Scope-OrgID": "team-a"}},
                     {"bearer_token_file": ("Secret", "prom-token", "token")},
                     id="mimir-tenant"),
        pytest.param({"basicAuth": {"username": "trimtab",
                                    "passwordSecret": {"name": "prom-basic", "key": "pw"}},
                      "ca": {"secret": "prom-ca"}, "clientCertSecret": "trimtab-tls"},
                     {"basic_auth_password_file": ("Secret", "prom-basic", "pw"),
                      "ca_file": ("Secret", "prom-ca", "ca.crt"),
                      "cert_file": ("Secret", "trimtab-tls", "tls.crt"),
                      "key_file": ("Secret", "trimtab-tls", "tls.key")},
                     id="basic-auth-and-mutual-tls"),
        pytest.param({"insecureSkipVerify": True}, {}, id="no-certificate-check"),
    ],
)  # fmt: skip
def test_prometheus_client_settings_reach_the_operator(
    client: dict[str, Any], files: dict[str, tuple[str, str, str]]
) -> None:
    """What the values ask for is what the operator's settings parse from the rendered env,
    and every file those settings name is mounted from the Secret or ConfigMap key asked for."""
    values = {"operator": {"prometheusClient": client}}
    spec = operator_deployment(render(values))["spec"]["template"]["spec"]
    env = container_env(spec["containers"][0])
    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith("TRIMTAB_")})
    connection = settings.prometheus_connection()
    assert dict(connection.headers) == client.get("headers", {})
    assert connection.insecure_skip_verify is client.get("insecureSkipVerify", False)
    assert connection.basic_auth_username == client.get("basicAuth", {}).get("username", "")
    if client.get("serviceAccountToken"):
        # Projected by the kubelet (automountServiceAccountToken) and rotated by it.
        assert spec["automountServiceAccountToken"] is True
        assert connection.bearer_token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    for setting, source in files.items():
        assert _mounted_file(spec, getattr(connection, setting)) == source
    named = {f for f in ("bearer_token_file", "basic_auth_password_file", "ca_file",
                         "cert_file", "key_file") if getattr(connection, f)}  # fmt: skip
    assert named == set(files) | ({"bearer_token_file"} if client.get("serviceAccountToken")
                                  else set())  # fmt: skip
    if not client:
        assert not any(v["name"].startswith("prometheus-") for v in spec["volumes"])


@pytest.mark.parametrize(
    ("client", "error"),
    [
        pytest.param({"serviceAccountToken": True,
                      "bearerTokenSecret": {"name": "t", "key": "token"}},
                     "serviceAccountToken and bearerTokenSecret", id="two-tokens"),
        pytest.param({"bearerTokenSecret": {"name": "t"}}, "bearerTokenSecret needs a key",
                     id="secret-without-key"),
        pytest.param({"serviceAccountToken": True, "basicAuth": {
                      "username": "u", "passwordSecret": {"name": "p", "key": "pw"}}},
                     "a bearer token and basicAuth exclude each other", id="token-and-basic"),
        pytest.param({"basicAuth": {"username": "u"}}, "basicAuth needs passwordSecret",
                     id="basic-auth-without-password"),
        pytest.param({"ca": {"configMap": "a", "secret": "b"}}, "a configMap or a secret",
                     id="two-cas"),
        pytest.param({"ca": {"secret": "b"}, "insecureSkipVerify": True},
                     "a CA and insecureSkipVerify", id="ca-and-no-check"),
        pytest.param({"basicAuth": {"passwordSecret": {"name": "p", "key": "pw"}}},
                     "passwordSecret needs basicAuth.username", id="password-without-user"),
        pytest.param({"bearerTokenSecret": {"key": "token"}}, "bearerTokenSecret needs a name",
                     id="token-key-without-secret"),
        pytest.param({"serviceAccountToken": True, "headers": {"authorization": "Bearer x"}},
                     "an Authorization header and a bearer token", id="two-authorizations"),
    ],
)  # fmt: skip
def test_contradictory_prometheus_client_values_fail_the_install(
    client: dict[str, Any], error: str
) -> None:
    with pytest.raises(Exception, match=error):
        render({"operator": {"prometheusClient": client}})


def test_pdb_keeps_a_replica_through_drains() -> None:
    docs = render()
    pdb = one(docs, "PodDisruptionBudget")
    deployment = operator_deployment(docs)
    assert pdb["spec"]["minAvailable"] == 1 < deployment["spec"]["replicas"]
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert by_kind(render(MINIMAL), "PodDisruptionBudget") == []
    # A budget that no eviction could meet would block node drains: not rendered.
    assert by_kind(render({"operator": {"replicas": 1}}), "PodDisruptionBudget") == []
    too_strict = {"podDisruptionBudget": {"minAvailable": 2}}
    assert by_kind(render(too_strict), "PodDisruptionBudget") == []
    # A crash-looping replica must not hold the healthy one on a node being drained.
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_users_of_the_default_roles_get_the_custom_resources() -> None:
    """Namespace admins and editors may create and scale ModelDeployments and TrainingJobs
    and viewers may read them, through the aggregated ClusterRoles; without them a cluster
    admin had to write RBAC before an ML team could apply one."""
    roles = {r["metadata"]["name"]: r for r in by_kind(render(), "ClusterRole")}
    edit, view = roles["trimtab-trimtab-system-edit"], roles["trimtab-trimtab-system-view"]
    labels = edit["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"

    def allowed(role: dict[str, Any]) -> set[tuple[str, str]]:
        return {(res, verb) for rule in role["rules"] for res in rule["resources"]
                for verb in rule["verbs"] if rule["apiGroups"] == ["trimtab.io"]}  # fmt: skip

    for plural in ("modeldeployments", "trainingjobs"):
        assert {(plural, v) for v in ("create", "delete", "patch", "update", "watch")} <= allowed(
            edit
        )
        assert (plural, "create") not in allowed(view)
        assert {(plural, v) for v in ("get", "list", "watch")} <= allowed(view)
    assert ("modeldeployments/scale", "patch") in allowed(edit)  # kubectl scale mdep
    # Nothing but trimtab's own API: the roles add no access to anything else.
    assert all(rule["apiGroups"] == ["trimtab.io"] for r in (edit, view) for rule in r["rules"])
    off = render({"rbac": {"aggregateToDefaultRoles": False}})
    assert not [r for r in by_kind(off, "ClusterRole") if r["metadata"]["name"].endswith(
        ("-edit", "-view"))]  # fmt: skip


def test_everything_renders_its_optional_parts() -> None:
    docs = render(EVERYTHING)
    deployment = operator_deployment(docs)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example.com/trimtab@sha256:" + "a" * 64
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "trimtab-sa"
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["affinity"] == EVERYTHING["operator"]["affinity"]
    assert container_env(container)["TRIMTAB_RIGHTSIZING_INTERVAL_SECONDS"] == "600"
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "ml-platform"
    assert by_kind(docs, "CustomResourceDefinition") == []

    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    endpoints = {e["port"]: e for e in monitor["spec"]["endpoints"]}
    assert endpoints.keys() == {"metrics", "gpu-metrics"}
    assert endpoints["metrics"]["interval"] == "15s"
    # The operator's series say which ModelDeployment's namespace they describe: the target's
    # namespace (the release's) must not replace it.
    assert endpoints["metrics"]["honorLabels"] is True
    # Each endpoint's port name exists on a Service the monitor's selector matches.
    selector = monitor["spec"]["selector"]["matchLabels"]
    service_ports = {
        p["name"]
        for s in by_kind(docs, "Service")
        if selector.items() <= s["metadata"]["labels"].items()
        for p in s["spec"]["ports"]
    }
    assert endpoints.keys() <= service_ports

    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    # The kubelet's probes of /healthz are admitted from anywhere: NetworkPolicy v1 does not
    # promise that traffic from the node passes, and a blocked liveness probe restarts the pod.
    assert policy["spec"]["ingress"] == [
        {"ports": [{"port": "health", "protocol": "TCP"}]},
        {
            "ports": [{"port": "metrics", "protocol": "TCP"}],
            "from": EVERYTHING["networkPolicy"]["metricsFrom"],
        },
    ]
    assert {"port": 53, "protocol": "UDP"} in policy["spec"]["egress"][0]["ports"]
    assert policy["spec"]["egress"][1:] == EVERYTHING["networkPolicy"]["egress"]

    dashboard = one(docs, "ConfigMap")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (CHART / "dashboards" / "trimtab.json").read_text()
    assert json.loads(dashboard["data"]["trimtab.json"]) == json.loads(shipped)


def test_network_policy_without_egress_rules_leaves_egress_open() -> None:
    docs = render({"networkPolicy": {"enabled": True}})
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert "egress" not in policy["spec"]
    assert policy["spec"]["ingress"] == [
        {"ports": [{"port": "health", "protocol": "TCP"}]},
        {"ports": [{"port": "metrics", "protocol": "TCP"}]},
    ]


def test_gpu_agent_runs_on_gpu_nodes_with_host_pids() -> None:
    docs = render({"gpuAgent": {"enabled": True}})
    agent = one(docs, "DaemonSet")
    pod = agent["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["trimtab"]
    assert container["args"] == ["gpu-agent", "--port=9835", "--address=0.0.0.0"]
    assert container_env(container)["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert pod["hostPID"] is True
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["serviceAccountName"] == f"{RELEASE}-gpu-agent"
    node_name = next(e for e in container["env"] if e["name"] == "NODE_NAME")
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    # It must not request a GPU: that would take one away from the workloads it measures.
    assert not any("nvidia.com" in k for k in container["resources"].get("limits", {}))
    assert container["ports"] == [{"name": "gpu-metrics", "containerPort": 9835, "protocol": "TCP"}]
    # Liveness must not read NVML: a failing GPU would otherwise restart the agent in a loop.
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "gpu-metrics"}
    service = one(docs, "Service", f"{RELEASE}-gpu-agent")
    assert service["spec"]["clusterIP"] == "None"
    no_runtime = one(render({"gpuAgent": {"enabled": True, "runtimeClassName": ""}}), "DaemonSet")
    assert "runtimeClassName" not in no_runtime["spec"]["template"]["spec"]


def test_image_tag_defaults_to_app_version() -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    image = operator_deployment(render())["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/trimtab/trimtab:{app_version}"
    tagged = operator_deployment(render({"image": {"tag": "0.2.0-rc1"}}))
    assert tagged["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.2.0-rc1")


def test_chart_version_matches_the_package() -> None:
    import tomllib

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]


def test_values_yaml_is_the_model_defaults() -> None:
    """values.yaml (the commented one people read) and the pydantic defaults say the same."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    defaults = ChartValues().model_dump(by_alias=True)
    defaults.pop("global")
    assert values == defaults


def test_values_schema_is_generated_from_the_model() -> None:
    assert (CHART / "values.schema.json").read_text() == render_schema(), (
        "values.schema.json is stale: run `python -m trimtab.api.chartvalues`"
    )


BAD_VALUES = [
    pytest.param({"operator": {"replica": 2}}, id="misspelt-key"),
    pytest.param({"operator": {"replicas": "two"}}, id="wrong-type"),
    pytest.param({"operator": {"replicas": 0}}, id="below-minimum"),
    pytest.param({"operator": {"logLevel": "TRACE"}}, id="not-an-enum-value"),
    pytest.param({"operator": {"prometheusUrl": "prometheus:9090"}}, id="url-without-scheme"),
    pytest.param({"operator": {"watchNamespace": "ML_Team"}}, id="bad-namespace-name"),
    pytest.param({"image": {"digest": "latest"}}, id="bad-digest"),
    pytest.param({"serviceMonitor": {"interval": "30 seconds"}}, id="bad-duration"),
    pytest.param({"gpuAgent": {"port": 70000}}, id="port-out-of-range"),
    pytest.param({"crds": "yes"}, id="section-not-an-object"),
    pytest.param({"operator": {"prometheusClient": {"bearerTokenSecret": {"name": "Tok_en"}}}},
                 id="bad-secret-name"),
    pytest.param({"operator": {"prometheusClient": {"caBundle": "x"}}},
                 id="misspelt-prometheus-client-key"),
    pytest.param({"operator": {"prometheusClient": {"headers": {"X Scope": "a"}}}},
                 id="header-name-with-a-space"),
    pytest.param({"operator": {"prometheusClient": {"headers": {"X-Tenant": "a\r\nX-Evil: 1"}}}},
                 id="header-value-with-a-line-break"),
    pytest.param({"tolerations": []}, id="unknown-top-level-key"),
]


@pytest.mark.parametrize("values", BAD_VALUES)
def test_bad_values_are_rejected_by_the_schema(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render_files(values)
    with pytest.raises(pydantic.ValidationError):
        ChartValues.model_validate(values)


def test_bad_values_file_is_rejected(tmp_path: Any) -> None:
    """A values file as a user writes it (`-f my-values.yaml`): one typo fails the install."""
    path = tmp_path / "my-values.yaml"
    path.write_text("operator:\n  replicas: 2\n  prometheusURL: http://prom:9090\n")
    values = helm.values_from_yaml(path.read_text())
    with pytest.raises(helm.HelmValuesError, match="prometheusURL"):
        helm.Chart.load(str(CHART)).validate_schema(values)


def test_notes_tell_the_user_what_to_do_next() -> None:
    notes = render_files()[f"{CHART.name}/templates/NOTES.txt"]
    assert f"rollout status deployment/{RELEASE}" in notes
    assert "kopf peering" in notes
    for path in re.findall(r"\b((?:examples|charts)/[\w./-]+\.yaml)", notes):
        assert (ROOT / path).exists(), f"NOTES.txt names {path}, which does not exist"
    gpu_notes = render_files({"gpuAgent": {"enabled": True}, "crds": {"install": False}})
    text = gpu_notes[f"{CHART.name}/templates/NOTES.txt"]
    assert "pod-security.kubernetes.io/enforce=privileged" in text
    assert "install the CRDs yourself" in text
    assert "exit at start" in text  # without kopf's peering CRDs: see _ensure_peering
    standalone_crds = {**MINIMAL, "crds": {"install": False}}
    text = render_files(standalone_crds)[f"{CHART.name}/templates/NOTES.txt"]
    assert "The operator waits for them" in text and "kopf-peering-crds" not in text
    standalone = render_files(MINIMAL)[f"{CHART.name}/templates/NOTES.txt"]
    assert "--standalone" in standalone
