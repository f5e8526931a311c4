"""Reaching a Prometheus that wants more than a URL: basic auth and TLS (a CA of the platform's,
mutual TLS) against a real Prometheus started with a web config, and a bearer token with a
tenant header against a real Prometheus behind a small real proxy that checks them (the job
kube-rbac-proxy does in front of OpenShift's Thanos querier, or a Mimir gateway). Credentials
are read from files and read again when they change; they never go to another origin; a
settings mistake stops the operator at start with a message that names the setting."""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import trustme
from aiohttp import web

from tests.conftest import Cluster, wait_for
from tests.kube_emulator import ApiServerEmulator
from tests.prometheus_fixture import PrometheusServer, prometheus_bin  # noqa: F401
from tests.test_autoscaling_operator import autoscaled_model, quiet_server
from tests.test_modeldeployment_operator import DEPLOY_PATH, MD_PATH, mark_ready
from trimtab.builders.serving import deployment_name
from trimtab.config import Settings
from trimtab.metrics.connection import NO_SETTINGS, Connection
from trimtab.metrics.factory import ProviderPool
from trimtab.metrics.prometheus import PrometheusProvider
from trimtab.metrics.usage import UsageReader, UsageTarget

pytestmark = pytest.mark.prometheus

USER = "trimtab"


def _hash(password: str) -> str:
    # Cost 4, bcrypt's least: the test's Prometheus checks it at every request.
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pki(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    """The platform's CA, Prometheus' certificate for 127.0.0.1 and a client certificate, as
    files (what a mounted Secret holds)."""
    out = {name: tmp_path / f"{name}.pem" for name in
           ("ca", "server", "server_key", "client", "client_key")}  # fmt: skip
    ca.cert_pem.write_to_path(str(out["ca"]))
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(out["server"]))
    server.private_key_pem.write_to_path(str(out["server_key"]))
    client = ca.issue_cert("trimtab-operator")
    client.cert_chain_pems[0].write_to_path(str(out["client"]))
    client.private_key_pem.write_to_path(str(out["client_key"]))
    return out


@pytest.fixture
def secured_prometheus(
    prometheus_bin: str,  # noqa: F811
    tmp_path: Path,
) -> Iterator[Callable[..., PrometheusServer]]:
    started: list[PrometheusServer] = []

    def make(web_config: dict[str, Any], **ready: Any) -> PrometheusServer:
        server = PrometheusServer(
            [], tmp_path / f"prometheus-{len(started)}", binary=prometheus_bin,
            web_config=web_config, **ready,
        ).start()  # fmt: skip
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def _basic(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()}


async def _online(url: str, connection: Connection) -> tuple[bool, str]:
    provider = PrometheusProvider(url, timeout_s=5.0, connection=connection)
    try:
        result = await provider._query("vector(1)")
        return result.has_value and result.value == 1.0, result.message
    finally:
        await provider.close()


async def test_basic_auth_over_tls_with_the_platforms_ca(
    secured_prometheus: Callable[..., PrometheusServer], pki: dict[str, Path], tmp_path: Path
) -> None:
    password = tmp_path / "password"
    password.write_text("first-secret\n")  # a Secret's file may end with a newline
    tls = {"cert_file": str(pki["server"]), "key_file": str(pki["server_key"])}
    prom = secured_prometheus(
        {"tls_server_config": tls, "basic_auth_users": {USER: _hash("first-secret")}},
        ready_headers=_basic("first-secret"),
    )
    assert prom.url.startswith("https://")
    good = Connection(basic_auth_username=USER, basic_auth_password_file=str(password),
                      ca_file=str(pki["ca"]))  # fmt: skip
    assert await _online(prom.url, good) == (True, "")

    ok, message = await _online(prom.url, Connection(ca_file=str(pki["ca"])))
    assert not ok and "401" in message
    ok, message = await _online(
        prom.url, Connection(basic_auth_username=USER, basic_auth_password_file=str(password))
    )
    assert not ok and "CERTIFICATE_VERIFY_FAILED" in message  # the system CAs do not sign it
    skip = Connection(basic_auth_username=USER, basic_auth_password_file=str(password),
                      insecure_skip_verify=True)  # fmt: skip
    assert (await _online(prom.url, skip))[0]

    # The password rotates (the Secret is updated, then Prometheus' users): the same provider,
    # never rebuilt, sends the new one.
    provider = PrometheusProvider(prom.url, timeout_s=5.0, connection=good)
    try:
        assert (await provider._query("vector(1)")).has_value
        password.write_text("second-secret")
        prom.write_web_config({"tls_server_config": tls,
                               "basic_auth_users": {USER: _hash("second-secret")}})  # fmt: skip
        assert (await provider._query("vector(1)")).has_value
        password.unlink()
        gone = await provider._query("vector(1)")
        assert not gone.has_value
        assert gone.message == (
            f"no query sent to {prom.url}: cannot read the basic auth password file "
            f"{password}: No such file or directory"
        )
    finally:
        await provider.close()


async def test_mutual_tls(
    secured_prometheus: Callable[..., PrometheusServer], pki: dict[str, Path]
) -> None:
    tls = {"cert_file": str(pki["server"]), "key_file": str(pki["server_key"]),
           "client_auth_type": "RequireAndVerifyClientCert",
           "client_ca_file": str(pki["ca"])}  # fmt: skip
    ready = ssl.create_default_context(cafile=str(pki["ca"]))
    ready.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
    prom = secured_prometheus({"tls_server_config": tls}, ready_context=ready)

    mutual = Connection(ca_file=str(pki["ca"]), cert_file=str(pki["client"]),
                        key_file=str(pki["client_key"]))  # fmt: skip
    assert await _online(prom.url, mutual) == (True, "")
    ok, message = await _online(prom.url, Connection(ca_file=str(pki["ca"])))
    assert not ok and message.startswith(f"cannot reach Prometheus at {prom.url}")


class TenantGateway:
    """A real HTTP proxy in front of a real Prometheus that answers only requests with the
    bearer token it currently accepts and a tenant header, and records what each request
    carried."""

    def __init__(self, upstream: str, token: str, tenant: str) -> None:
        self.upstream = upstream
        self.token = token
        self.tenant = tenant
        self.seen: list[dict[str, str]] = []
        self.url = ""
        self.redirect = ""  # answer every request with a redirect there
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        if self.redirect:
            raise web.HTTPFound(self.redirect + request.path_qs)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401, text="Unauthorized")
        if request.headers.get("X-Scope-OrgID") != self.tenant:
            return web.Response(status=400, text="no org id")
        assert self._client is not None
        async with self._client.get(
            self.upstream + request.path, params=request.query
        ) as answer:
            return web.Response(status=answer.status, body=await answer.read(),
                                content_type="application/json")  # fmt: skip

    async def start(self) -> TenantGateway:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        return self

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def gateways(
    secured_prometheus: Callable[..., PrometheusServer],
) -> AsyncIterator[Callable[[str], Any]]:
    upstream = secured_prometheus({})
    started: list[TenantGateway] = []

    async def make(token: str) -> TenantGateway:
        gateway = await TenantGateway(upstream.url, token, "team-a").start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await gateway.stop()


async def test_a_rotated_bearer_token_and_a_tenant_header(
    gateways: Callable[[str], Any], tmp_path: Path
) -> None:
    gateway: TenantGateway = await gateways("token-1")
    token = tmp_path / "token"
    token.write_text("token-1")
    connection = Connection(bearer_token_file=str(token), headers={"X-Scope-OrgID": "team-a"})
    pool = ProviderPool(gateway.url, timeout_s=5.0, connection=connection)
    try:
        provider = pool.get()
        assert await provider.is_online()
        # The kubelet rotates a projected ServiceAccount token (a new file under a symlink).
        gateway.token = "token-2"
        assert not await provider.is_online()
        rotated = tmp_path / "token.new"
        rotated.write_text("token-2")
        rotated.replace(token)
        assert await provider.is_online()
        token.write_text("")
        empty = await provider.query_batch({"x": "vector(1)"})
        assert empty["x"].message == (
            f"no query sent to {gateway.url}: the bearer token file {token} is empty"
        )
        # A token a header cannot carry: said without the token (requests' own error would
        # quote the header, and this message goes to a condition and the logs).
        token.write_text("tok-secret\nen")
        broken = (await provider.query_batch({"x": "vector(1)"}))["x"].message
        assert "holds characters a header cannot carry" in broken
        assert "tok-secret" not in broken
    finally:
        await pool.close()

    # The usage reader (right-sizing's range queries) goes through the same settings.
    token.write_text("token-2")
    reader = UsageReader(gateway.url, timeout_s=5.0, connection=connection)
    target = UsageTarget(namespace="ml", pod_regex="llm-.*", container="server")
    try:
        # Prometheus answered (nothing scraped yet: the series are named as missing).
        answer = await reader.read(target, window_s=600, now=time.time())
        assert answer.unavailable == ""
        assert answer.usage is not None and answer.usage.missing_series
        token.unlink()
        answer = await reader.read(target, window_s=600, now=time.time())
        assert answer.unavailable.startswith(f"no query sent to {gateway.url}: cannot read")
    finally:
        await reader.close()


async def test_credentials_never_go_to_another_origin(
    gateways: Callable[[str], Any], tmp_path: Path
) -> None:
    """A ModelDeployment's spec.metrics.prometheusUrl is the user's to write: one on another
    host or port gets a plain client. The configured origin under another path (Mimir's
    /prometheus prefix, say) keeps the settings."""
    configured = await gateways("token-1")
    elsewhere = await gateways("token-1")
    token = tmp_path / "token"
    token.write_text("token-1")
    connection = Connection(bearer_token_file=str(token), headers={"X-Scope-OrgID": "team-a"})
    pool = ProviderPool(configured.url, timeout_s=5.0, connection=connection)
    try:
        assert await pool.get(configured.url + "/").is_online()
        assert not await pool.get(elsewhere.url).is_online()
        # Python's URL parser reads the configured host after the "@"; urllib3, which
        # requests connects with, stops at the backslash: such a URL is nobody's origin.
        crafted = elsewhere.url + "\\@" + configured.url.removeprefix("http://")
        assert not await pool.get(crafted).is_online()
        assert not await pool.get(configured.url.replace("//", "//user@")).is_online()
        assert len(elsewhere.seen) == 2, "the queries did reach the other origin"
        assert all("Authorization" not in h and "X-Scope-OrgID" not in h for h in elsewhere.seen)

        # The configured Prometheus redirects elsewhere: the redirect is not followed.
        configured.redirect = elsewhere.url
        redirected = (await pool.get().query_batch({"x": "vector(1)"}))["x"]
        assert not redirected.has_value
        assert "is not sent: it would carry the settings of the configured Prometheus" in (
            redirected.message
        )
        assert len(elsewhere.seen) == 2
    finally:
        await pool.close()


@pytest.mark.parametrize(
    ("env", "error"),
    [
        pytest.param({}, None, id="nothing-set"),
        pytest.param({"TRIMTAB_PROMETHEUS_BEARER_TOKEN_FILE":
                      "/var/run/secrets/kubernetes.io/serviceaccount/token",
                      "TRIMTAB_PROMETHEUS_HEADERS": '{"X-Scope-OrgID": "team-a"}',
                      "TRIMTAB_PROMETHEUS_CA_FILE": "/etc/trimtab/prometheus/ca.crt"},
                     None, id="openshift-thanos-querier"),
        pytest.param({"TRIMTAB_PROMETHEUS_BASIC_AUTH_USERNAME": "trimtab",
                      "TRIMTAB_PROMETHEUS_BASIC_AUTH_PASSWORD_FILE": "/p"}, None,
                     id="basic-auth"),
        pytest.param({"TRIMTAB_PROMETHEUS_BASIC_AUTH_USERNAME": "trimtab"},
                     "basic auth needs both a username and a password file",
                     id="basic-auth-without-password"),
        pytest.param({"TRIMTAB_PROMETHEUS_BEARER_TOKEN_FILE": "/t",
                      "TRIMTAB_PROMETHEUS_BASIC_AUTH_USERNAME": "u",
                      "TRIMTAB_PROMETHEUS_BASIC_AUTH_PASSWORD_FILE": "/p"},
                     "a bearer token and basic auth exclude each other", id="token-and-basic"),
        pytest.param({"TRIMTAB_PROMETHEUS_CERT_FILE": "/c"},
                     "a client certificate needs both its certificate and key files",
                     id="certificate-without-key"),
        pytest.param({"TRIMTAB_PROMETHEUS_CA_FILE": "/ca",
                      "TRIMTAB_PROMETHEUS_INSECURE_SKIP_VERIFY": "true"},
                     "a CA file and insecure_skip_verify exclude each other",
                     id="ca-and-no-verification"),
        pytest.param({"TRIMTAB_PROMETHEUS_BEARER_TOKEN_FILE": "/t",
                      "TRIMTAB_PROMETHEUS_HEADERS": '{"Authorization": "Bearer hunter2"}'},
                     "an Authorization header and a bearer token", id="two-authorizations"),
        pytest.param({"TRIMTAB_PROMETHEUS_HEADERS": '{"X Scope": "hunter2"}'},
                     "TRIMTAB_PROMETHEUS_HEADERS: Value error, 'X Scope' is not an HTTP header",
                     id="header-name-with-a-space"),
        pytest.param({"TRIMTAB_PROMETHEUS_HEADERS": '{"X-Tenant": "a\\r\\nX-Evil: 1"}'},
                     "the value of header X-Tenant has a line break", id="header-injection"),
        pytest.param({"TRIMTAB_PROMETHEUS_HEADERS": "X-Scope-OrgID: team-a"},
                     "TRIMTAB_PROMETHEUS_HEADERS: Value error, Expecting value",
                     id="headers-not-json"),
    ],
)  # fmt: skip
def test_settings(env: dict[str, str], error: str | None) -> None:
    if error is None:
        connection = Settings.from_env(env).prometheus_connection()
        assert (connection == NO_SETTINGS) is (not env)
        return
    with pytest.raises(SystemExit) as raised:
        Settings.from_env(env)
    assert error in str(raised.value)
    assert "hunter2" not in str(raised.value)  # a header may be a secret: never echoed


async def test_the_operator_reads_its_prometheus_through_the_settings(
    api: ApiServerEmulator, cluster: Cluster, run_operator: Any, tmp_path: Path
) -> None:
    """The whole path: TRIMTAB_PROMETHEUS_* settings, the operator's source, the autoscaling
    loop, status. Behind a gateway that wants a token and a tenant, the loop reads its signals;
    once the token file goes, MetricsAvailable says why and nothing is scaled down."""
    async with quiet_server(tmp_path) as (exporter, prometheus, revision):
        gateway = await TenantGateway(prometheus.url, "token-1", "team-a").start()
        token = tmp_path / "token"
        token.write_text("token-1")
        deploy_path = f"{DEPLOY_PATH}/{deployment_name('chat', revision)}"
        body = autoscaled_model(gateway.url)
        del body["spec"]["metrics"]["prometheusUrl"]  # the operator's own Prometheus
        try:
            async with run_operator(
                prometheus_url=gateway.url,
                prometheus_bearer_token_file=str(token),
                prometheus_headers={"X-Scope-OrgID": "team-a"},
            ):
                await cluster.create(MD_PATH, body)
                deploy = await wait_for(lambda: cluster.get(deploy_path))
                await mark_ready(cluster, deploy)

                async def metrics_available(state: str) -> dict[str, Any] | None:
                    b = await cluster.get(f"{MD_PATH}/chat") or {}
                    conds = {c["type"]: c for c in b.get("status", {}).get("conditions", [])}
                    cond = conds.get("MetricsAvailable")
                    return cond if cond and cond["status"] == state else None

                await wait_for(lambda: metrics_available("True"), timeout=20)
                auto = ((await cluster.get(f"{MD_PATH}/chat")) or {})["status"]["autoscaling"]
                signals = {s["name"]: s for s in auto["signals"]}
                assert signals["queueDepth"]["state"] == "value"
                assert all(h.get("X-Scope-OrgID") == "team-a" for h in gateway.seen)

                token.unlink()
                cond = await wait_for(lambda: metrics_available("False"), timeout=20)
                assert f"cannot read the bearer token file {token}" in cond["message"]
                before = (await cluster.get(deploy_path) or {})["spec"]["replicas"]
                await asyncio.sleep(2.5)  # more loops without metrics
                assert (await cluster.get(deploy_path) or {})["spec"]["replicas"] >= before
        finally:
            await gateway.stop()
