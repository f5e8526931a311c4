"""How trimtab's API client finds its cluster and proves who it is: the bearer token of a
kubeconfig (or a service account) is sent, KUBECONFIG wins over the pod's own cluster, and a
kubeconfig's tls-server-name and proxy-url are honoured. A real HTTP server records what
arrives."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from trimtab.kube.client import KubeClient


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An HTTP server on 127.0.0.1 that answers {} and keeps each request's headers."""
    seen: list[dict[str, str]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({})

    async with serve(answer) as url:
        yield url, seen


@contextlib.asynccontextmanager
async def serve(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """An HTTP server on 127.0.0.1 (a free port) where `handler` answers every request; its
    base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def kubeconfig(path: Path, server: str, user: dict[str, Any], **cluster: Any) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": server, **cluster}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))  # fmt: skip
    return path


async def test_a_kubeconfig_token_is_sent_as_a_bearer_token(
    recorder: tuple[str, list[dict[str, str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kubernetes package keeps the token under "BearerToken"; reading only the older
    "authorization" key sent no token at all, so every call went anonymous (403)."""
    url, seen = recorder
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "k", url, {"token": "abc123"})))
    client = KubeClient.from_environment()
    try:
        await client.request("GET", "/api/v1/namespaces/default/pods")
    finally:
        await client.close()
    assert seen[-1]["Authorization"] == "Bearer abc123"


async def test_kubeconfig_wins_over_the_pods_own_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CI runner that is itself a pod, with KUBECONFIG naming the cluster under test."""
    from kubernetes import config as k8s_config

    def in_cluster(**_: Any) -> None:
        raise AssertionError("the pod's service account was used despite KUBECONFIG")

    monkeypatch.setattr(k8s_config, "load_incluster_config", in_cluster)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    path = kubeconfig(tmp_path / "k", "https://under-test.example:6443", {"token": "t"})
    monkeypatch.setenv("KUBECONFIG", str(path))
    client = KubeClient.from_environment()
    assert client.host == "https://under-test.example:6443"


async def test_tls_server_name_and_proxy_url_are_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = kubeconfig(
        tmp_path / "k", "https://10.1.2.3:6443", {"token": "t"},
        **{"tls-server-name": "api.internal", "proxy-url": "http://proxy.internal:3128",
           "insecure-skip-tls-verify": True},
    )  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(path))
    client = KubeClient.from_environment()
    assert client._server_hostname == "api.internal"
    assert client._proxy == "http://proxy.internal:3128"
