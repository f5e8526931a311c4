"""Timers that stop when kopf stops them.

kopf stops a resource's timers when the resource is deleted (and every timer when the operator
exits or loses its peering), but it cannot interrupt a timer's handler: it holds the resource's
finalizer until the handler returns, and looks again only after
`settings.background.cancellation_polling`. A timer whose pass waits on the network (a slow
Prometheus answering a week of usage) would hold a deletion that long."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import kopf


async def unless_stopped(
    work: Coroutine[Any, Any, None], stopped: kopf.DaemonStopped, patch: kopf.Patch
) -> None:
    """Run `work` until it ends or kopf stops the timer, whichever comes first. A pass cut
    short writes nothing: `patch` is cleared, so no half-made status reaches the resource (the
    next pass, by a later or another operator, starts over). A blocking call `work` runs in a
    thread is let go, not interrupted; it ends at its own timeout."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this timer itself cancelled: so is its pass
        task.cancel()
        patch.clear()
        raise
    finally:
        stop.cancel()
    if task.done():
        task.result()  # its outcome, or its exception, as if it had run alone
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    patch.clear()


Pass = Callable[..., Coroutine[Any, Any, None]]


def stoppable(one_pass: Pass) -> Pass:
    """A timer handler that runs `one_pass` (kopf's keyword arguments) through unless_stopped.
    It keeps the pass's name, so kopf's handler id, and what kopf has stored under it, stay."""

    @functools.wraps(one_pass)
    async def timer(**kwargs: Any) -> None:
        await unless_stopped(one_pass(**kwargs), kwargs["stopped"], kwargs["patch"])

    return timer
