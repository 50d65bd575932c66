"""Implicit pickup (RFC 0685's motivation, RFC 0092): a mediatee that keeps a WebSocket
open and sends a message with `~transport.return_route: all` gets its queued messages
pushed raw on that socket as they arrive. A push to a dying socket loses nothing: the
messages stay queued until acknowledged, and a new socket starts from the queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import TYPE_CHECKING

import structlog

from dovecote.ops import metrics
from dovecote.util.aio import wait_at_most
from dovecote.util.jsonlimits import stored_json

if TYPE_CHECKING:
    from dovecote.delivery.live import LiveSession
    from dovecote.store.base import Store

log = structlog.get_logger("dovecote.v1.pickup")

IMPLICIT_BATCH = 50
SAFETY_POLL_SECONDS = 5.0


def tag_of(body: bytes) -> str | None:
    """The JWE `tag` of a stored v1 message (its RFC 0685 message tag)."""
    parsed, envelope = stored_json(body)
    value = envelope.get("tag") if parsed and isinstance(envelope, dict) else None
    return value if isinstance(value, str) else None


@dataclass
class _Implicit:
    session: LiveSession
    mediatee: str
    pushed: dict[str, str] = dc_field(default_factory=dict)  # queue id -> tag
    wake: asyncio.Event = dc_field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class ImplicitPickup:
    """Mediatee -> the socket its queued messages are pushed to raw (newest socket wins)."""

    def __init__(self, store: Store) -> None:
        self.by_mediatee: dict[str, _Implicit] = {}
        self.store = store
        store.add_listener(self.notify)

    def notify(self, mediatee: str) -> None:
        if mediatee == "*":
            for each in self.by_mediatee.values():
                each.wake.set()
        elif (entry := self.by_mediatee.get(mediatee)) is not None:
            entry.wake.set()

    def enable(self, session: LiveSession, mediatee: str) -> None:
        entry = self.by_mediatee.get(mediatee)
        if entry is not None and entry.session is session:
            entry.wake.set()
            return
        if entry is not None and entry.task is not None:
            entry.task.cancel()
        entry = _Implicit(session, mediatee)
        session.pushing = True  # exempt from the idle timeout, as live mode is
        self.by_mediatee[mediatee] = entry
        entry.task = asyncio.create_task(self._pump(entry), name=f"v1-implicit-{session.id}")
        entry.wake.set()

    def tags_for(self, session: LiveSession, mediatee: str) -> dict[str, str]:
        entry = self.by_mediatee.get(mediatee)
        if entry is None or entry.session is not session:
            return {}
        return {tag: queue_id for queue_id, tag in entry.pushed.items()}

    def acknowledged(self, mediatee: str, ids: Sequence[str]) -> None:
        entry = self.by_mediatee.get(mediatee)
        if entry is not None:
            for queue_id in ids:
                entry.pushed.pop(queue_id, None)

    async def _pump(self, entry: _Implicit) -> None:
        session = entry.session
        try:
            while not session.closed and self.by_mediatee.get(entry.mediatee) is entry:
                await wait_at_most(entry.wake.wait(), SAFETY_POLL_SECONDS)
                entry.wake.clear()
                if session.held or session.closed:
                    continue
                # Ids first, then the bodies of at most IMPLICIT_BATCH of them: what is in
                # flight may be large, and its bodies are not needed again.
                refs = await self.store.queued(entry.mediatee, len(entry.pushed) + IMPLICIT_BATCH)
                wanted = [r.id for r in refs if r.id not in entry.pushed][:IMPLICIT_BATCH]
                for message in await self.store.fetch_ids(entry.mediatee, wanted):
                    await session.send(message.body)
                    entry.pushed[message.id] = tag_of(message.body) or message.id
                    metrics.DELIVERED.labels("push").inc()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken socket: everything stays queued
            log.info("implicit.push_failed", session=session.id, error=str(exc)[:200])
        finally:
            if self.by_mediatee.get(entry.mediatee) is entry:
                del self.by_mediatee[entry.mediatee]
