"""Live delivery: which connected session receives pushes for which mailbox.

Pickup 3.0: "Messages already in the queue are not affected by Live Mode; they must still
be requested with delivery-request." Turning live mode on therefore records what is queued
at that moment (the baseline) and pushes only messages that arrive afterwards; the client
drains the rest with delivery-request.

A push never removes a message. Each session remembers what it pushed and not yet saw
acknowledged; a session that dies takes nothing with it: what it had in flight stays
queued, is part of the next session's baseline and is fetched with delivery-request.
Pushes are driven from the store (the commit wakes the pump; it reads what arrived after
the baseline), so a wake-up lost between instances only delays. What to push always
comes from the store; the bodies of messages accepted on this instance are handed over
by the accept (`stored`), so the pump reads from the store only the bodies it lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from dovecote.ops import metrics
from dovecote.store.base import StoredMessage
from dovecote.util.aio import wait_at_most
from dovecote.util.lru import ByteLRU

if TYPE_CHECKING:
    from dovecote.store.base import Store

log = structlog.get_logger("dovecote.live")
_stdlib_log = logging.getLogger("dovecote.live")

FrameSender = Callable[[bytes], Awaitable[None]]
DeliveryBuilder = Callable[[str, "Sequence[StoredMessage]"], Awaitable[bytes]]

# Most pushed-but-unacknowledged messages per mailbox before pushing pauses for acks.
MAX_IN_FLIGHT = 1000
# Re-check the store this often even without a wake-up (a missed notification only delays).
SAFETY_POLL_SECONDS = 5.0
# Bytes of acknowledged ids a session remembers while a queue read is in flight (see
# LiveSession.acked): at most what was in flight, ~300 bytes an id with bookkeeping; the
# byte bound holds even if ids ever change.
RECENT_ACKS = 2 * MAX_IN_FLIGHT
RECENT_ACKS_BYTES = RECENT_ACKS * 320
# A store's notification meaning "any mailbox may have new messages".
WAKE_ALL = "*"
# PostgreSQL takes seq numbers before commit, so a message can become visible after one
# with a higher seq. The baseline therefore lists the queued ids among the last this many
# seq numbers (not just "seq <= highest"): a message committed late below the highest seq
# still counts as arrived after the switch.
BASELINE_LOOKBACK = 1000
# Bodies handed over by accepts and not yet pushed, over all sessions (each session also
# holds at most one push frame's worth): past this the pump reads them from the store.
HANDOFF_BYTES = 64 << 20
HANDOFF_YIELDS = 2


class LiveSession:
    """One persistent connection (WebSocket) that can carry replies and pushes."""

    def __init__(self, send: FrameSender, endpoint: str = "ws") -> None:
        self.id = uuid.uuid4().hex[:12]
        self.send = send
        self.endpoint = endpoint
        self.mediatees: set[str] = set()
        self.pushed: dict[str, set[str]] = {}
        # Per mailbox: the seq below which everything was queued before live mode, and
        # the ids queued above it at that moment; neither is pushed.
        self.floor: dict[str, int] = {}
        self.baseline: dict[str, set[str]] = {}
        # Ids acknowledged while a queue read was in flight: the read may have begun
        # before the ack committed and still return them, and they must not be pushed
        # again. An ack committed before a read began is not in it, so the set starts
        # empty at every read: remembering the last 2,000 acks instead filled 8 sessions'
        # maps to ~5 MB that stayed (the live soak's largest growth, docs/performance.md).
        self.acked: ByteLRU[str, bool] = ByteLRU(RECENT_ACKS_BYTES)
        self.reading = False
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        # Set while the request that enabled live mode is being answered, so its status
        # reply reaches the client before the first push.
        self.held = False
        # Something other than live mode pushes on this socket (DIDComm v1 implicit
        # pickup): like live mode, it is not idle while the client is silent.
        self.pushing = False
        # Accepted here, committed, not yet pushed: id -> message (see LiveRegistry.stored).
        self.handed: dict[str, StoredMessage] = {}
        self.handed_bytes = 0

    def release(self) -> None:
        """The transport sent the current request's replies: pushes may follow."""
        if self.held:
            self.held = False
            self.wake.set()


class LiveRegistry:
    """Mailbox -> live session, and the pump that pushes queued messages."""

    def __init__(self, store: Store, batch: int = 100, max_push_bytes: int = 1 << 20) -> None:
        self.store = store
        self.batch = batch
        # Bodies held for one push frame (at least one message): the frame, and the read
        # behind it, must not grow with the mailbox.
        self.max_push_bytes = max_push_bytes
        self.by_mediatee: dict[str, LiveSession] = {}
        self.build_delivery: DeliveryBuilder | None = None
        self.handed_bytes = 0

    def is_live(self, session: LiveSession | None, mediatee: str) -> bool:
        return session is not None and self.by_mediatee.get(mediatee) is session

    async def enable(self, session: LiveSession, mediatee: str) -> None:
        previous = self.by_mediatee.get(mediatee)
        if previous is not None and previous is not session:
            # The newer connection wins; whatever the old one had in flight stays queued,
            # so it is in this session's baseline: the client fetches it with
            # delivery-request.
            self._forget(previous, mediatee)
            log.info("live.replaced", old_session=previous.id, session=session.id)
        already = mediatee in session.mediatees
        # Registered before the baseline is read: a message committed in between is in the
        # baseline (fetched by the client) or pushed, never neither.
        self.by_mediatee[mediatee] = session
        session.mediatees.add(mediatee)
        session.pushed.setdefault(mediatee, set())
        session.held = True
        if not already:
            # Turning live mode on again on the same session changes nothing.
            last = await self.store.last_seq(mediatee)
            floor = max(0, last - BASELINE_LOOKBACK)
            # Ids only: reading the bodies of up to 2,000 queued messages per switch made
            # memory grow with mailbox sizes (200 MiB over 8 sockets: RSS 142 -> 874 MiB).
            queued = await self.store.queued(mediatee, 2 * BASELINE_LOOKBACK, after_seq=floor)
            session.floor[mediatee] = floor
            session.baseline[mediatee] = {m.id for m in queued}
        if session.task is None:
            session.task = asyncio.create_task(self._pump(session), name=f"live-{session.id}")
        session.wake.set()

    def _forget(self, session: LiveSession, mediatee: str) -> None:
        session.mediatees.discard(mediatee)
        session.pushed.pop(mediatee, None)
        session.floor.pop(mediatee, None)
        session.baseline.pop(mediatee, None)
        for message in [m for m in session.handed.values() if m.mediatee == mediatee]:
            self._take(session, message.id)

    def stored(self, message: StoredMessage) -> None:
        """A message for `message.mediatee` was committed here: keep its body for the push.

        Only a hint: the store still decides what is pushed (a body handed over for a
        message already acknowledged, expired or in the baseline is never sent). Skipped
        when the session holds a push frame's worth already or the pump is paused."""
        session = self.by_mediatee.get(message.mediatee)
        if session is None or message.id in session.handed:
            return
        size = len(message.body)
        if (
            session.handed_bytes + size > self.max_push_bytes
            or self.handed_bytes + size > HANDOFF_BYTES
            or len(session.pushed.get(message.mediatee, ())) >= MAX_IN_FLIGHT
        ):
            return
        session.handed[message.id] = message
        session.handed_bytes += size
        self.handed_bytes += size

    def _take(self, session: LiveSession, message_id: str) -> StoredMessage | None:
        message = session.handed.pop(message_id, None)
        if message is not None:
            session.handed_bytes -= len(message.body)
            self.handed_bytes -= len(message.body)
        return message

    def disable(self, session: LiveSession, mediatee: str) -> None:
        if self.by_mediatee.get(mediatee) is session:
            del self.by_mediatee[mediatee]
        self._forget(session, mediatee)

    async def detach(self, session: LiveSession) -> None:
        """The connection ended: forget it (its unacknowledged pushes stay queued)."""
        session.closed = True
        for mediatee in list(session.mediatees):
            self.disable(session, mediatee)
        for message_id in list(session.handed):
            self._take(session, message_id)
        if session.task is not None:
            session.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session.task

    def notify(self, mediatee: str) -> None:
        if mediatee == WAKE_ALL:
            # The store may have missed wake-ups (e.g. its LISTEN connection dropped).
            for live in set(self.by_mediatee.values()):
                live.wake.set()
            return
        session = self.by_mediatee.get(mediatee)
        if session is not None:
            session.wake.set()

    def acknowledged(self, mediatee: str, ids: Sequence[str]) -> None:
        session = self.by_mediatee.get(mediatee)
        if session is not None:
            for message_id in ids:
                if session.reading:
                    session.acked.put(message_id, True, size=0)
                self._take(session, message_id)
            baseline = session.baseline.get(mediatee)
            if baseline:
                baseline.difference_update(ids)
            pushed = session.pushed.get(mediatee)
            if pushed:
                paused = len(pushed) >= MAX_IN_FLIGHT
                pushed.difference_update(ids)
                if paused:
                    # Only a pump paused for acknowledgements has anything new to do:
                    # waking it on every ack cost a queue read per push.
                    session.wake.set()

    @property
    def connections(self) -> int:
        return len({id(s) for s in self.by_mediatee.values()})

    async def _pump(self, session: LiveSession) -> None:
        while not session.closed:
            await wait_at_most(session.wake.wait(), SAFETY_POLL_SECONDS)
            # The commit that woke us also resumes its accept, which hands the body over
            # (LiveRegistry.stored) two loop iterations after the wake-up (the store's
            # future, then the shielded wait on it): let it, before the queue is read.
            # Losing this race costs a read of the body, nothing else.
            for _ in range(HANDOFF_YIELDS):
                await asyncio.sleep(0)
            session.wake.clear()
            if session.held:
                continue
            for mediatee in list(session.mediatees):
                try:
                    await self._push_mailbox(session, mediatee)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a broken socket or store: the queue keeps all  # noqa: BLE001
                    log.warning("live.push_failed", session=session.id, error=str(exc)[:200])
                    session.closed = True
                    return

    async def _push_mailbox(self, session: LiveSession, mediatee: str) -> None:
        assert self.build_delivery is not None
        while mediatee in session.mediatees:
            pushed = session.pushed.setdefault(mediatee, set())
            room = MAX_IN_FLIGHT - len(pushed)
            if room <= 0:
                return
            # Reading from the floor and skipping the baseline and what is in flight is
            # correct for both engines, even when PostgreSQL commits seq numbers out of order.
            baseline = session.baseline.get(mediatee, set())
            limit = len(pushed) + len(baseline) + min(room, self.batch)
            session.acked.clear()
            session.reading = True
            try:
                queued = await self.store.queued(
                    mediatee, limit, after_seq=session.floor.get(mediatee, 0)
                )
            finally:
                session.reading = False
            chosen: list[str] = []
            size = 0
            for ref in queued:
                if ref.id in pushed or ref.id in baseline or ref.id in session.acked:
                    continue
                if len(chosen) >= min(room, self.batch) or (
                    chosen and size + ref.size > self.max_push_bytes
                ):
                    break
                chosen.append(ref.id)
                size += ref.size
            if len(queued) < limit and session.handed:
                # That was all of the mailbox after the floor: a body handed over for a
                # message not in it belongs to one already gone (acknowledged, expired).
                present = {ref.id for ref in queued}
                for message_id in [
                    i
                    for i, m in session.handed.items()
                    if m.mediatee == mediatee and i not in present
                ]:
                    self._take(session, message_id)
            # Bodies handed over by the accept, else read (only the chosen ones); an ack or
            # expiry in between leaves fewer, never others.
            handed = {i: m for i in chosen if (m := self._take(session, i)) is not None}
            missing = [i for i in chosen if i not in handed]
            read = {m.id: m for m in await self.store.fetch_ids(mediatee, missing)}
            fresh = [m for i in chosen if (m := handed.get(i) or read.get(i)) is not None]
            if not fresh:
                return
            packed = await self.build_delivery(mediatee, fresh)
            await session.send(packed)
            now = time.time()
            for message in fresh:
                metrics.PUSH_LATENCY.observe(max(0.0, now - message.received_at))
            metrics.DELIVERED.labels("push").inc(len(fresh))
            metrics.LIVE_HANDOFF.labels("handed").inc(len(handed))
            metrics.LIVE_HANDOFF.labels("read").inc(len(fresh) - len(handed))
            pushed.update(m.id for m in fresh)
            if _stdlib_log.isEnabledFor(logging.DEBUG):  # structlog builds it to drop it
                log.debug("live.pushed", session=session.id, count=len(fresh))
