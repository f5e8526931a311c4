"""Shared fixtures: the kmock-based API server emulator, the real kopf operator running against
it in the test's event loop, and helpers to wait for what the operator writes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import kopf
import pytest

from tests.kube_emulator import ApiServerEmulator
from trimtab import constants as C
from trimtab.config import Settings
from trimtab.kube.client import KubeClient

MDEP_RESOURCE = (C.GROUP, C.VERSION, C.MODELDEPLOYMENT_PLURAL)
# Set before any test imports the handlers: the right-sizing timers tick every second in tests.
os.environ.setdefault("TRIMTAB_RIGHTSIZING_TICK_SECONDS", "1")
os.environ.setdefault("TRIMTAB_CONVERGE_SECONDS", "2")
_LOGIN_URL: dict[str, str] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.kmock(cls=ApiServerEmulator))


@kopf.on.login()
def login_to_emulator(**_: Any) -> kopf.ConnectionInfo:
    """Tests only: kopf connects to the emulator of the running test."""
    return kopf.ConnectionInfo(server=_LOGIN_URL["url"], insecure=True)


@pytest.fixture
async def api(kmock: ApiServerEmulator) -> AsyncIterator[ApiServerEmulator]:
    kmock.declare_resources()
    yield kmock
    # A real API server prunes a status field its CRD does not declare and refuses a value of
    # the wrong type: state the operator keeps there would be lost, or never written.
    assert not kmock.schema_problems, "\n".join(kmock.schema_problems)


class Cluster:
    """A client for tests to act as users and controllers do (create, patch status), through
    HTTP, so that the emulator emits watch events."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        # A fresh connection per request: a pooled one could outlive an operator restart.
        self.kube = KubeClient(self.url, ssl_context=False, timeout=10, keepalive=False)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.kube.request("POST", path, body=body)

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.kube.request("GET", path)
        except Exception:
            return None

    async def merge(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.kube.request(
            "PATCH", path, body=body, content_type="application/merge-patch+json"
        )

    async def close(self) -> None:
        await self.kube.close()


T = TypeVar("T")


async def wait_for_value(
    read: Callable[[], Awaitable[T]],
    check: Callable[[T], object],
    timeout: float = 15.0,
    interval: float = 0.1,
) -> T:
    """Poll `read` until `check` accepts what it read, and return that; fail with the last
    value read (not just "no") after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = await read()
        if check(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s; last read: {value!r}")
        await asyncio.sleep(interval)


async def wait_for(
    probe: Callable[[], Awaitable[Any]], timeout: float = 15.0, interval: float = 0.1
) -> Any:
    """Poll `probe` until it returns something truthy, and return that."""
    return await wait_for_value(probe, bool, timeout, interval)


@pytest.fixture
async def cluster(api: ApiServerEmulator) -> AsyncIterator[Cluster]:
    c = Cluster(str(api.url))
    yield c
    await c.close()


OperatorRunner = Callable[..., contextlib.AbstractAsyncContextManager[KubeClient]]


@pytest.fixture
def run_operator(api: ApiServerEmulator) -> OperatorRunner:
    """`async with run_operator() as kube:` runs the real kopf operator with every trimtab
    handler against the emulator until the block ends (restartable within one test);
    `run_operator(name=value)` overrides a Settings field."""
    import trimtab.handlers  # noqa: F401  # registers the handlers with kopf

    @contextlib.asynccontextmanager
    async def runner(**overrides: Any) -> AsyncIterator[KubeClient]:
        _LOGIN_URL["url"] = str(api.url).rstrip("/")
        kube = KubeClient(_LOGIN_URL["url"], ssl_context=False)
        settings = kopf.OperatorSettings()
        settings.watching.server_timeout = 30
        settings.batching.batch_window = 0.05
        settings.batching.exit_timeout = 1
        settings.watching.reconnect_backoff = 0.2
        stop = asyncio.Event()
        ready = asyncio.Event()
        watches_before = _watch_count(api)
        task = asyncio.create_task(
            kopf.operator(
                clusterwide=True,
                standalone=True,
                settings=settings,
                memo=kopf.Memo(
                    kube=kube,
                    settings=Settings(**{"prometheus_url": "http://127.0.0.1:9", **overrides}),
                ),
                stop_flag=stop,
                ready_flag=ready,
            )
        )
        try:
            await asyncio.wait_for(ready.wait(), 20)

            async def watching() -> bool:
                if task.done():
                    task.result()
                return _watch_count(api) > watches_before

            await wait_for(watching, timeout=20)
            yield kube
        finally:
            stop.set()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 15)
            await kube.close()

    return runner


def _watch_count(api: ApiServerEmulator) -> int:
    return sum(1 for _, plural in api.watches if plural == C.MODELDEPLOYMENT_PLURAL)


@pytest.fixture(autouse=True)
def _quiet_aiohttp() -> None:
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


__all__ = ["Cluster", "aiohttp", "wait_for"]
