"""Shutdown in-process: a cancelled background loop stays cancelled.

`Dovecote.stop` cancels its loops (heartbeat, sweep, sample, health) once and waits for
them. On CPython 3.11, `asyncio.wait_for` returns the result instead of raising when the
cancellation and the result land in the same loop turn; a loop that then goes on sleeping
made about one in 150 in-process shutdowns wait for good (heartbeat's store write).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from dovecote.store.dialect import Tx
from fast.instance import Fast

# Loop turns between the store call's result arriving and the cancellation: the window
# where wait_for dropped it is one or two turns in, depending on the call.
TURNS = range(5)
# Long enough for a thread to hand its result to the loop after `fn` returned.
HANDOFF_SECONDS = 0.05


async def cancelled_as_the_result_arrives(
    call: Callable[[Callable[[Tx], Coroutine[Any, Any, int]]], Coroutine[Any, Any, Any]],
    turns: int,
) -> BaseException | None:
    """Start `call(fn)`, block the loop while its thread finishes, then cancel it
    `turns` loop turns after the result was queued: what the task ended with, or None
    when it had already returned (nothing to cancel)."""
    ran = threading.Event()

    async def fn(tx: Tx) -> int:  # a transaction body: the SQLite engine runs it on its thread
        await tx.fetchval("SELECT 1")
        ran.set()
        return 1

    task = asyncio.ensure_future(call(fn))
    await asyncio.sleep(0)  # the call starts and hands `fn` to its thread
    assert ran.wait(30), "the store never ran the call"
    # Blocks the loop on purpose: the result waits in its queue.
    time.sleep(HANDOFF_SECONDS)  # noqa: ASYNC251
    for _ in range(turns):
        await asyncio.sleep(0)
    if task.done():
        return None
    task.cancel()
    try:
        result = await task
    except BaseException as exc:  # what the task ended with, CancelledError included  # noqa: BLE001
        return exc
    return AssertionError(f"returned {result!r} after it was cancelled")


async def test_a_store_call_cancelled_as_its_result_arrives_stays_cancelled(fast: Fast) -> None:
    store: Any = fast.dovecote.store  # the SQLite store's reader pool and writer thread
    for turns in TURNS:
        for call in (store._read, store._write):
            ended = await cancelled_as_the_result_arrives(call, turns)
            assert ended is None or isinstance(ended, asyncio.CancelledError), (
                call.__name__,
                turns,
                ended,
            )
