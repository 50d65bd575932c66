"""Fan-out of room events to live subscribers, driven from the store.

A committed room event wakes every feed subscribed to the room (on any instance: the
store's room listeners fire after local commits and, on PostgreSQL, on NOTIFY). A woken
feed's pump reads the store for events after the last seq it queued, so replay after
`since` and live delivery are one loop: no gaps, no duplicates, and a lost wake-up only
delays until the next safety poll.

Feeds at the same position share one store read and one JSON encoding of each event:
a post to a room of N subscribers costs one read and one encode, not N of each (the
fan-out's CPU per delivery was mostly those: see docs/performance.md).

Each feed has a bounded send queue, filled no faster than its socket drains (a replay of
any length needs no more memory than the queue). A subscriber whose socket takes nothing
for `stall` seconds while events wait cannot keep up: its feed is marked overflowed and the
connection is closed with a resume hint. Feeds share nothing, so one slow reader never
holds up the others.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from dovecote.errors import DovecoteError
from dovecote.ops import metrics
from dovecote.rooms.auth import Principal
from dovecote.rooms.models import event_out
from dovecote.store.rooms_base import PARTICIPANT_REMOVED, RoomEvent, RoomStore
from dovecote.util.aio import wait_at_most

log = structlog.get_logger("dovecote.rooms.hub")

# Re-read subscribed rooms this often even without a wake-up.
SAFETY_POLL_SECONDS = 5.0
# Events read from the store per room per round.
READ_BATCH = 200
# A room listener call with this name wakes every feed.
WAKE_ALL = "*"
# Pause before re-reading after a store error.
STORE_RETRY_SECONDS = 1.0


@dataclass(slots=True)
class Frame:
    """One message for the socket; `seq` set for events (the sender records it as sent).

    `text` is the body already encoded (events: encoded once for every subscriber)."""

    body: dict[str, Any]
    room: str | None = None
    seq: int | None = None
    generation: int = 0
    text: str | None = None

    def encoded(self) -> str:
        return self.text if self.text is not None else json.dumps(self.body, ensure_ascii=False)


class Page:
    """One read of a room's events, shared by the feeds that asked for it; each event's
    frame body and text are built once, by the first feed that queues it."""

    __slots__ = ("_frames", "events")

    def __init__(self, events: list[RoomEvent]) -> None:
        self.events = events
        self._frames: list[tuple[dict[str, Any], str] | None] = [None] * len(events)

    def frame(self, index: int) -> tuple[dict[str, Any], str]:
        built = self._frames[index]
        if built is None:
            body = {"type": "event", "event": event_out(self.events[index])}
            built = self._frames[index] = (body, json.dumps(body, ensure_ascii=False))
        return built


@dataclass(eq=False)
class Feed:
    """One connection's subscriptions, positions and bounded send queue."""

    principal: Principal
    queue_size: int
    stall: float = 5.0
    positions: dict[str, int] = field(default_factory=dict)  # room -> last seq queued
    sent: dict[str, int] = field(default_factory=dict)  # room -> last seq written
    # Rooms this connection counts as present in (rooms/presence.py).
    present: set[str] = field(default_factory=set)
    # A new number for every subscription (from one counter, so a room's entry can go
    # with its subscription): queued events of an earlier subscription are dropped.
    generations: dict[str, int] = field(default_factory=dict)
    next_generation: int = 1
    dirty: set[str] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    overflowed: bool = False
    # When the client last sent a frame (idle sockets without subscriptions are closed).
    last_frame: float = field(default_factory=time.monotonic)
    queue: asyncio.Queue[Frame] = field(init=False)

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.queue_size)

    def current(self, frame: Frame) -> bool:
        """False for an event queued for a subscription that has since ended."""
        return frame.room is None or frame.generation == self.generations.get(frame.room)

    def resume_hint(self) -> dict[str, int]:
        """Per room, the last seq handed to the socket (resume with since=that)."""
        return {room: self.sent.get(room, since) for room, since in self.positions.items()}

    async def offer(self, frame: Frame) -> bool:
        """Queue a frame, waiting up to `stall` seconds for room; past that the subscriber
        cannot keep up: mark the feed overflowed (the connection closes) and return False."""
        if self.overflowed:
            return False
        try:
            # Without waiting when there is room (the usual case): wait_for costs a task.
            self.queue.put_nowait(frame)
            return True
        except asyncio.QueueFull:
            pass
        try:
            await asyncio.wait_for(self.queue.put(frame), self.stall)
        except TimeoutError:
            self.overflowed = True
            self.done.set()
            return False
        return True


class RoomHub:
    """Room -> subscribed feeds, and the pump that fills each feed from the store."""

    def __init__(self, store: RoomStore) -> None:
        self.store = store
        self.by_room: dict[str, set[Feed]] = {}
        # Per subscribed room, a number from `_ticks` set by every wake-up: a read that
        # began at the current number has seen every event committed so far, so a feed
        # may share it; one that began earlier may miss the event that woke the feed.
        self._ticks = 0
        self._woken: dict[str, int] = {}
        # Reads in flight: (room, after, limit) -> (wake number at start, the read).
        self._reads: dict[tuple[str, int, int], tuple[int, asyncio.Task[Page | None]]] = {}

    def _woke(self, room: str) -> None:
        self._ticks += 1
        self._woken[room] = self._ticks

    @property
    def feeds(self) -> int:
        return len({id(f) for feeds in self.by_room.values() for f in feeds})

    def notify(self, room: str) -> None:
        """A room event committed: wake the room's feeds (called by the store). "*" wakes
        every feed for every room (the store lost notifications, e.g. a reconnect)."""
        if room == WAKE_ALL:
            for name, feeds in self.by_room.items():
                self._woke(name)
                for feed in feeds:
                    feed.dirty.add(name)
                    feed.wake.set()
            return
        subscribed = self.by_room.get(room)
        if subscribed:
            self._woke(room)
            for feed in subscribed:
                feed.dirty.add(room)
                feed.wake.set()

    def subscribe(self, feed: Feed, room: str, since: int) -> None:
        feed.generations[room] = feed.next_generation
        feed.next_generation += 1
        feed.positions[room] = since
        feed.sent[room] = since
        feeds = self.by_room.setdefault(room, set())
        if feed not in feeds:
            metrics.ROOMS_SUBSCRIPTIONS.inc()
        feeds.add(feed)
        self.notify(room)

    def unsubscribe(self, feed: Feed, room: str) -> None:
        # Nothing per room outlives the subscription: a feed holds at most its subscribed
        # rooms (ROOMS_WS_MAX_SUBSCRIPTIONS), whatever a client subscribes over time.
        feed.generations.pop(room, None)
        feed.positions.pop(room, None)
        feed.sent.pop(room, None)
        feed.dirty.discard(room)
        feeds = self.by_room.get(room)
        if feeds is not None:
            if feed in feeds:
                metrics.ROOMS_SUBSCRIPTIONS.dec()
            feeds.discard(feed)
            if not feeds:
                del self.by_room[room]
                self._woken.pop(room, None)

    def detach(self, feed: Feed) -> None:
        for room in list(feed.positions):
            self.unsubscribe(feed, room)
        feed.done.set()

    async def pump(self, feed: Feed) -> None:
        """Fill the feed's queue from the store until the feed is done."""
        while not feed.done.is_set():
            await wait_at_most(feed.wake.wait(), SAFETY_POLL_SECONDS)
            if feed.wake.is_set():
                feed.wake.clear()
                rooms = list(feed.dirty)
            else:
                rooms = list(feed.positions)  # safety poll: look at every room
            feed.dirty.clear()
            for room in rooms:
                if room not in feed.positions:
                    continue
                try:
                    if not await self._fill(feed, room):
                        return
                except DovecoteError as exc:
                    # The store hiccuped: keep the position, try again shortly.
                    log.warning("rooms.feed_read_failed", room=room, error=exc.detail)
                    feed.dirty.add(room)
                    await asyncio.sleep(STORE_RETRY_SECONDS)
                    feed.wake.set()

    async def _fill(self, feed: Feed, room: str) -> bool:
        """Queue everything after the room's position; False when the feed must stop."""
        generation = feed.generations.get(room)
        while room in feed.positions and feed.generations.get(room) == generation:
            after = feed.positions[room]
            batch = min(READ_BATCH, feed.queue_size)
            page = await self._read(room, after, batch)
            if page is None:
                self.unsubscribe(feed, room)
                return await feed.offer(
                    Frame({"type": "unsubscribed", "room": room, "reason": "room deleted"})
                )
            for index, event in enumerate(page.events):
                if feed.generations.get(room) != generation:
                    return True  # (re)subscribed while we waited for room in the queue
                body, text = page.frame(index)
                if not await feed.offer(Frame(body, room, event.seq, generation or 0, text)):
                    log.info(
                        "rooms.feed_overflow",
                        participant=feed.principal.sub,
                        room=room,
                        seq=event.seq,
                    )
                    return False
                metrics.ROOMS_FANOUT.inc()
                if feed.generations.get(room) != generation:
                    return True
                feed.positions[room] = event.seq
                if (
                    event.type == PARTICIPANT_REMOVED
                    and event.data.get("participant") == feed.principal.sub
                    and not feed.principal.is_admin
                    # A replay from before a re-add: the participant is back.
                    and await self.store.participant_role(room, feed.principal.sub) is None
                ):
                    self.unsubscribe(feed, room)
                    return await feed.offer(
                        Frame(
                            {
                                "type": "unsubscribed",
                                "room": room,
                                "reason": "removed from the room",
                            }
                        )
                    )
            if len(page.events) < batch:
                return True
        return True

    async def _read(self, room: str, after: int, limit: int) -> Page | None:
        """The room's events after `after`, read once for every feed asking at once.

        The read runs as its own task, so a feed that goes away (its pump cancelled)
        does not cancel it for the others; its error reaches every feed that waited."""
        key = (room, after, limit)
        woken = self._woken.get(room, 0)
        pending = self._reads.get(key)
        if pending is None or pending[0] != woken:
            task = asyncio.create_task(self._fetch(room, after, limit))
            task.add_done_callback(_retrieve)
            pending = self._reads[key] = (woken, task)
            task.add_done_callback(lambda _: self._done(key, task))
        return await asyncio.shield(pending[1])

    async def _fetch(self, room: str, after: int, limit: int) -> Page | None:
        page = await self.store.room_events(room, after=after, limit=limit)
        return None if page is None else Page(page.events)

    def _done(self, key: tuple[str, int, int], task: asyncio.Task[Page | None]) -> None:
        pending = self._reads.get(key)
        if pending is not None and pending[1] is task:
            del self._reads[key]


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a shared read's error as seen (its feeds may all have gone away)."""
    if not task.cancelled():
        task.exception()
