"""Who follows which room live on this instance, kept in the store for every instance.

A post notifies (through the outbox) the participants that nobody follows live anywhere.
Rows are written when a WebSocket subscription starts, refreshed every REFRESH seconds
and deleted when it ends; a crashed instance's rows expire after TTL. Presence is best
effort: a failed write is logged and at worst notifies someone who is online (or, for up
to TTL after a crash, not someone who went offline).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable

import structlog

from dovecote.errors import DovecoteError
from dovecote.store.rooms_base import RoomStore

log = structlog.get_logger("dovecote.rooms.presence")

# Seconds a presence row lives without a refresh, and how often live ones are refreshed.
TTL = 60.0
REFRESH = 20.0


class Presence:
    """Reference-counted (room, participant) pairs followed on this instance."""

    def __init__(self, store: RoomStore) -> None:
        self.store = store
        self.instance = uuid.uuid4().hex[:16]
        self.counts: Counter[tuple[str, str]] = Counter()

    async def join(self, room: str, participant: str) -> None:
        key = (room, participant)
        self.counts[key] += 1
        if self.counts[key] == 1:
            await self._write(self.store.presence_set(self.instance, [key], time.time() + TTL))

    async def leave(self, room: str, participant: str) -> None:
        key = (room, participant)
        if self.counts[key] <= 1:
            self.counts.pop(key, None)
            await self._write(self.store.presence_clear(self.instance, [key]))
        else:
            self.counts[key] -= 1

    async def refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH)
            if self.counts:
                await self._write(
                    self.store.presence_set(self.instance, list(self.counts), time.time() + TTL)
                )

    async def _write(self, call: Awaitable[None]) -> None:
        try:
            await call
        except DovecoteError as exc:
            log.warning("rooms.presence_failed", error=exc.detail)
