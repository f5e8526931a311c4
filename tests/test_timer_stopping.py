"""A resource deleted while one of its timers is busy goes at once, not a minute later. kopf
holds its finalizer until the resource's timers have returned, and looks again only after
`settings.background.cancellation_polling` (60 s by default); a right-sizing pass blocked on a
slow Prometheus used to hold the deletion that long."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
from kopf._cogs.aiokits.aioenums import FlagSetter  # what kopf sets to stop a timer

import trimtab.handlers.rightsizing as rightsizing_handler
from tests.conftest import Cluster, OperatorRunner, wait_for
from tests.test_rightsizing_operator import MD_PATH, chat
from trimtab.handlers.stopping import unless_stopped
from trimtab.metrics.usage import UsageReader


@contextlib.asynccontextmanager
async def silent_prometheus() -> AsyncIterator[tuple[str, list[float]]]:
    """An HTTP server on 127.0.0.1 that accepts requests and never answers: a Prometheus stuck
    on a heavy query. Yields its URL and the times connections arrived."""
    arrived: list[float] = []
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived.append(time.monotonic())
        held.append(writer)
        with contextlib.suppress(Exception):
            await reader.read(65536)  # the request; no answer follows

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", arrived
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_busy_right_sizing_pass_does_not_hold_a_deletion(
    run_operator: OperatorRunner, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIMTAB_RIGHTSIZING_INTERVAL_SECONDS", "1")
    async with silent_prometheus() as (url, arrived):
        # The pass would wait two minutes for an answer.
        monkeypatch.setattr(
            rightsizing_handler, "make_reader", lambda memo: UsageReader(url, timeout_s=120)
        )
        async with run_operator():
            await cluster.create(MD_PATH, chat("Recommend"))

            async def pass_waiting() -> bool:
                return bool(arrived)

            await wait_for(pass_waiting, timeout=30, interval=0.2)
            await cluster.kube.request("DELETE", f"{MD_PATH}/chat")
            deleted = time.monotonic()

            async def gone() -> bool:
                return await cluster.get(f"{MD_PATH}/chat") is None

            # Well under kopf's 60 s re-check: the pass was stopped, not waited for.
            await wait_for(gone, timeout=20, interval=0.2)
            assert time.monotonic() - deleted < 20


# --- unless_stopped alone ------------------------------------------------------------------


def stopper() -> tuple[Any, kopf.DaemonStopped]:
    """What kopf hands a timer: a flag it sets (here, by the test) and the timer's view of it."""
    setter: Any = FlagSetter()
    return setter, setter.async_waiter  # what an async handler gets


async def test_a_pass_that_ends_first_keeps_its_outcome() -> None:
    _, stopped = stopper()
    patch = kopf.Patch()

    async def work() -> None:
        patch.status["recommendations"] = {"containers": []}

    await unless_stopped(work(), stopped, patch)
    assert patch == {"status": {"recommendations": {"containers": []}}}

    async def failing() -> None:
        raise RuntimeError("Prometheus said no")

    with pytest.raises(RuntimeError, match="Prometheus said no"):
        await unless_stopped(failing(), stopped, kopf.Patch())


async def test_a_stopped_pass_is_cancelled_and_writes_nothing() -> None:
    setter, stopped = stopper()
    patch = kopf.Patch()
    cancelled = asyncio.Event()

    async def slow() -> None:
        patch.status["recommendations"] = {"half": "made"}
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    running = asyncio.create_task(unless_stopped(slow(), stopped, patch))
    await asyncio.sleep(0.05)
    setter.set(reason=kopf.DaemonStoppingReason.RESOURCE_DELETED)
    await asyncio.wait_for(running, timeout=5)
    assert cancelled.is_set()
    assert not patch


async def test_a_cancelled_timer_cancels_its_pass() -> None:
    _, stopped = stopper()
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    running = asyncio.create_task(unless_stopped(slow(), stopped, kopf.Patch()))
    await asyncio.sleep(0.05)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await asyncio.wait_for(cancelled.wait(), timeout=5)
