"""Small asyncio helpers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable


async def wait_at_most(awaitable: Awaitable[object], seconds: float | None) -> None:
    """Await `awaitable` for at most `seconds` (None: no limit); running out is no error.

    Not `asyncio.wait_for`: on CPython 3.11 it returns the result of an awaitable that
    completes in the same loop iteration as a cancellation and drops the cancellation, so a
    background loop that was cancelled went on sleeping and shutdown waited for it for good
    (3 hangs in 600 in-process start/stops). `asyncio.timeout` keeps the cancellation.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await awaitable
