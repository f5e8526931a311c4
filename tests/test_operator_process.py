"""`trimtab run` as a real process against the API server emulator: it finds the cluster through
KUBECONFIG, serves kopf's liveness probe and /metrics, and reconciles."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

import trimtab
from tests.conftest import Cluster, wait_for
from tests.kube_emulator import ApiServerEmulator
from tests.test_modeldeployment_operator import MD_PATH, model, serving_deployments
from tests.validation import ROOT
from trimtab.config import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": server}}],
                "users": [{"name": "emu", "user": {"token": "test-token"}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
                "current-context": "emu",
            }
        )
    )
    return path


async def _get_text(url: str) -> str | None:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r,
        ):
            return await r.text() if r.status == 200 else None
    except aiohttp.ClientError:
        return None


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize(
    ("listen", "host"),
    [
        pytest.param("0.0.0.0", "127.0.0.1", id="ipv4"),
        pytest.param(
            "::", "[::1]", id="ipv6",
            marks=pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here"),
        ),
    ],
)  # fmt: skip
async def test_trimtab_run_serves_health_metrics_and_reconciles(
    api: ApiServerEmulator, cluster: Cluster, tmp_path: Path, listen: str, host: str
) -> None:
    metrics_port, health_port = free_port(), free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", str(api.url).rstrip("/"))),
        "TRIMTAB_LOG_LEVEL": "INFO",
        "TRIMTAB_LISTEN_ADDRESS": listen,
    }
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trimtab",
            "run",
            "--all-namespaces",
            "--metrics-port",
            str(metrics_port),
            "--health-port",
            str(health_port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        health = await wait_for(lambda: _get_text(f"http://{host}:{health_port}/healthz"), 30)
        assert health is not None

        async def watching() -> bool:
            return any(p == "modeldeployments" for _, p in api.watches)

        await wait_for(watching, 30)
        await cluster.create(MD_PATH, model("proc"))
        assert await wait_for(lambda: serving_deployments(cluster, "proc"), 30)

        async def reconciled() -> str | None:
            text = await _get_text(f"http://{host}:{metrics_port}/metrics")
            ok = 'trimtab_reconcile_total{kind="ModelDeployment",result="ok"}'
            return text if text and ok in text else None

        metrics = await wait_for(reconciled, 30)
        assert "trimtab_reconcile_duration_seconds_bucket" in metrics
        # What TrimtabOperatorDown looks for (charts/trimtab/alerts).
        assert f'trimtab_build_info{{version="{trimtab.__version__}"}} 1.0' in metrics
        assert 'trimtab_api_writes_total{kind="Deployment",verb="apply"} 1.0' in metrics
    finally:
        proc.terminate()
        try:
            out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode is not None


def test_settings_from_env() -> None:
    settings = Settings.from_env({"TRIMTAB_NAMESPACE": "ml", "TRIMTAB_METRICS_PORT": "9999"})
    assert settings.namespace == "ml" and settings.metrics_port == 9999
    assert Settings.from_env({}).health_port == 8081


def test_bad_setting_exits_with_its_name() -> None:
    try:
        Settings.from_env({"TRIMTAB_METRICS_PORT": "many"})
    except SystemExit as exc:
        assert "TRIMTAB_METRICS_PORT: Input should be a valid integer" in str(exc)
    else:
        raise AssertionError("accepted a bad port")


def test_render_cli_prints_manifests(capsys: Any) -> None:
    from trimtab.__main__ import main

    assert main(["render", "-f", str(ROOT / "examples" / "modeldeployment.yaml")]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "PodDisruptionBudget"]


RENDERED_KINDS = [
    pytest.param("modeldeployment.yaml", ["Deployment", "Service", "PodDisruptionBudget"],
                 id="modeldeployment"),
    # The ConfigMap it mounts is the user's to apply: left out.
    pytest.param("modeldeployment-torchserve.yaml",
                 ["Deployment", "Service", "PodDisruptionBudget"], id="with-a-configmap"),
    pytest.param("trainingjob.yaml", ["Service", "Job"], id="trainingjob"),
    pytest.param("trainingjob-gang.yaml", ["Service", "PodGroup", "Job"], id="gang"),
]  # fmt: skip


@pytest.mark.parametrize(("example", "kinds"), RENDERED_KINDS)
def test_render_cli_prints_what_the_operator_creates_first(
    example: str, kinds: list[str], capsys: Any
) -> None:
    from trimtab.__main__ import main

    assert main(["render", "-f", str(ROOT / "examples" / example)]) == 0
    out = capsys.readouterr()
    assert [d["kind"] for d in yaml.safe_load_all(out.out)] == kinds
    assert out.err == ""


def test_render_cli_prints_nothing_for_a_suspended_trainingjob(tmp_path: Path, capsys: Any) -> None:
    """A TrainingJob created suspended starts no attempt: nothing to create yet."""
    from trimtab.__main__ import main

    doc = yaml.safe_load((ROOT / "examples" / "trainingjob.yaml").read_text())
    doc["spec"]["suspend"] = True
    path = tmp_path / "suspended.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["render", "-f", str(path)]) == 0
    assert capsys.readouterr().out == ""


RENDER_REFUSALS = [
    pytest.param(
        "apiVersion: trimtab.io/v1alpha1\nkind: ModelDeployment\nmetadata: {name: x}\n"
        "spec: {server: vllm, image: i, replicas: -1}\n",
        "ModelDeployment/x: spec.replicas: Input should be greater than or equal to 0",
        id="invalid-modeldeployment-names-the-field",
    ),
    pytest.param(
        "apiVersion: trimtab.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: t}\n"
        "spec: {image: i, workers: 0}\n",
        "TrainingJob/t: spec.workers: Input should be greater than or equal to 1",
        id="invalid-trainingjob-names-the-field",
    ),
    pytest.param(
        "apiVersion: trimtab.io/v1alpha1\nkind: Widget\nmetadata: {name: w}\n",
        "Widget/w: not a ModelDeployment or a TrainingJob",
        id="unknown-kind-of-the-group",
    ),
    pytest.param(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n",
        "no trimtab.io/v1alpha1 ModelDeployment or TrainingJob",
        id="nothing-to-render",
    ),
    pytest.param("a: [", "while parsing", id="not-yaml"),
]


@pytest.mark.parametrize(("text", "said"), RENDER_REFUSALS)
def test_render_cli_names_what_the_operator_would_refuse(
    text: str, said: str, tmp_path: Path, capsys: Any
) -> None:
    """No traceback and no partial output: exit 1, and why on stderr."""
    from trimtab.__main__ import main

    path = tmp_path / "in.yaml"
    path.write_text(text)
    assert main(["render", "-f", str(path)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert said in out.err and out.err.startswith(f"trimtab render: {path}: ")


def test_peers_get_distinct_priorities(monkeypatch: Any) -> None:
    from trimtab.__main__ import peer_priority

    seen = set()
    for pod in ("trimtab-7d9c-abcde", "trimtab-7d9c-fghij", "trimtab-7d9c-klmno"):
        monkeypatch.setenv("POD_ID", pod)
        seen.add(peer_priority())
    assert len(seen) == 3 and all(p > 0 for p in seen)


@pytest.mark.parametrize(
    ("namespace", "path", "said"),
    [
        pytest.param(None, "/apis/kopf.dev/v1/clusterkopfpeerings",
                     "Install kopf's peering CRD clusterkopfpeerings.kopf.dev", id="cluster-wide"),
        pytest.param("ml", "/apis/kopf.dev/v1/namespaces/ml/kopfpeerings",
                     "Install kopf's peering CRD kopfpeerings.kopf.dev (or the namespace)",
                     id="one-namespace"),
    ],
)  # fmt: skip
async def test_peering_without_its_crd_exits_naming_what_to_install(
    tmp_path: Path, monkeypatch: Any, namespace: str | None, path: str, said: str
) -> None:
    """With crds.install=false and kopf's peering CRDs not applied yet, the API server answers
    404 to the peering object's create: the process exits with what to install, not a
    traceback, and the pod restarts until it is there."""
    from aiohttp import web

    from tests.test_kube_client_auth import serve
    from trimtab.__main__ import _ensure_peering

    seen: list[tuple[str, str]] = []

    async def not_served(request: web.Request) -> web.Response:
        seen.append((request.method, request.path))
        return web.json_response(
            {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
             "reason": "NotFound", "message": "the server could not find the requested resource"},
            status=404,
        )  # fmt: skip

    async with serve(not_served) as url:
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kc", url)))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        with pytest.raises(SystemExit) as exited:
            await _ensure_peering("trimtab", namespace)
    assert seen == [("POST", path)]
    message = str(exited.value)
    assert said in message and "could not find the requested resource" in message
    assert "peering.enabled=false" in message
