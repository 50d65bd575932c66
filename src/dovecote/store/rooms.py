"""Rooms storage: a component of the store (`store.rooms`), written once for both engines.

It runs its transaction bodies through the store's `_read` / `_write`, which it is given.
Every room write starts by locking the room's row (`_lock_room`; on SQLite the single
writer already serialises them): writes to one room queue up behind each other, the
per-room seq from `rooms.last_seq` is taken and committed in order (a reader that saw seq
n never later finds an uncommitted n-1), and the idempotency check cannot race a
concurrent post with the same key. Lock order is always room row first, so room writes
never deadlock with each other.

Wake-ups: a room write asks its transaction to wake the room (`Tx.wake_room`); the engine
wakes this instance's listeners after COMMIT and NOTIFYs the others (PostgreSQL).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import structlog

from dovecote.errors import Conflict, Forbidden, NotFound
from dovecote.store.dialect import Row, Tx
from dovecote.store.operations import insert_outbox
from dovecote.store.rooms_base import (
    CONTENT_EVENTS,
    MESSAGE_DELETED,
    MESSAGE_EDITED,
    MESSAGE_POSTED,
    PARTICIPANT_ADDED,
    PARTICIPANT_REMOVED,
    PARTICIPANT_UPDATED,
    REACTION_ADDED,
    REACTION_REMOVED,
    REDACTED,
    ROOM_CREATED,
    EventPage,
    NewPost,
    NewRoom,
    Participant,
    PostResult,
    ReactionResult,
    Role,
    Room,
    RoomEvent,
    RoomMessage,
    RoomStore,
    check_manage,
    check_moderation,
    room_notifications,
    visible_data,
)

log = structlog.get_logger("dovecote.store.rooms")

T = TypeVar("T")

_ROOM_COLUMNS = "id, name, metadata, created_by, created_at, last_seq"
_MESSAGE_COLUMNS = "id, room, seq, author, content, created_at, edited_at, deleted_at"
# Most deleted messages erased in one purge transaction.
PURGE_BATCH = 1000


class Runner(Protocol):
    """What the rooms component needs of its store."""

    async def _read(self, body: Callable[[Tx], Awaitable[T]]) -> T: ...

    async def _write(self, body: Callable[[Tx], Awaitable[T]]) -> T: ...


class SQLRooms(RoomStore):
    """RoomStore over a store's transactions."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    async def _read(self, body: Callable[[Tx], Awaitable[T]]) -> T:
        return await self._runner._read(body)

    async def _write(self, body: Callable[[Tx], Awaitable[T]]) -> T:
        return await self._runner._write(body)

    async def _room_write(self, room: str, body: Callable[[Tx], Awaitable[T]]) -> T:
        """Run a room write that wakes the room's listeners after COMMIT."""

        async def waking(tx: Tx) -> T:
            result = await body(tx)
            tx.wake_room(room)
            return result

        return await self._write(waking)

    def notify(self, room: str) -> None:
        """Wake this instance's listeners of `room` (called by the engine after COMMIT)."""
        try:
            self._notify_room(room)
        except Exception:  # a listener's bug must not fail a committed write
            log.exception("store.room_listener_failed", room=room)

    # ------------------------------------------------------------------ rooms
    async def room_create(self, room: NewRoom) -> Room:
        now = time.time()

        async def body(tx: Tx) -> Room:
            created = await tx.fetchval(
                "INSERT INTO rooms (id, name, metadata, created_by, created_at, last_seq) "
                "VALUES ($1, $2, $3, $4, $5, 0) ON CONFLICT (id) DO NOTHING RETURNING id",
                room.id,
                room.name,
                _dump(room.metadata),
                room.created_by,
                now,
            )
            if created is None:
                raise Conflict(f"room {room.id!r} already exists")
            await _emit(
                tx,
                room.id,
                ROOM_CREATED,
                room.created_by,
                None,
                {"name": room.name, "metadata": room.metadata},
                now,
            )
            for participant, role in room.participants:
                await tx.execute(
                    "INSERT INTO room_participants (room, participant, role, added_at) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (room, participant) DO UPDATE "
                    "SET role = excluded.role",
                    room.id,
                    participant,
                    role,
                    now,
                )
                await _emit(
                    tx,
                    room.id,
                    PARTICIPANT_ADDED,
                    room.created_by,
                    None,
                    {"participant": participant, "role": role},
                    now,
                )
            row = await tx.fetchrow(f"SELECT {_ROOM_COLUMNS} FROM rooms WHERE id = $1", room.id)
            assert row is not None
            return _room(row)

        return await self._room_write(room.id, body)

    async def room_get(self, room: str) -> Room | None:
        row = await self._read(
            lambda tx: tx.fetchrow(f"SELECT {_ROOM_COLUMNS} FROM rooms WHERE id = $1", room)
        )
        return _room(row) if row else None

    async def room_list(self, participant: str | None, after: str, limit: int) -> list[Room]:
        async def body(tx: Tx) -> list[Room]:
            if participant is None:
                rows = await tx.fetch(
                    f"SELECT {_ROOM_COLUMNS} FROM rooms WHERE id > $1 ORDER BY id LIMIT $2",
                    after,
                    limit,
                )
            else:
                rows = await tx.fetch(
                    "SELECT r.id, r.name, r.metadata, r.created_by, r.created_at, r.last_seq "
                    "FROM room_participants p JOIN rooms r ON r.id = p.room "
                    "WHERE p.participant = $1 AND p.room > $2 ORDER BY p.room LIMIT $3",
                    participant,
                    after,
                    limit,
                )
            return [_room(row) for row in rows]

        return await self._read(body)

    async def room_delete(self, room: str, actor: str, manage: bool) -> None:
        async def body(tx: Tx) -> None:
            check_manage(actor, await _lock_room(tx, room, actor), manage)
            await tx.execute("DELETE FROM rooms WHERE id = $1", room)

        await self._room_write(room, body)

    # ------------------------------------------------------------------ participants
    async def participant_role(self, room: str, participant: str) -> Role | None:
        return await self._read(lambda tx: _role(tx, room, participant))

    async def participants(self, room: str) -> list[Participant] | None:
        async def body(tx: Tx) -> list[Participant] | None:
            if await tx.fetchval("SELECT 1 FROM rooms WHERE id = $1", room) is None:
                return None
            rows = await tx.fetch(
                "SELECT room, participant, role, added_at FROM room_participants "
                'WHERE room = $1 ORDER BY participant COLLATE "C"',
                room,
            )
            return [Participant(*row) for row in rows]

        return await self._read(body)

    async def participant_set(
        self, room: str, participant: str, role: Role, actor: str, manage: bool
    ) -> tuple[Participant, RoomEvent | None]:
        now = time.time()

        async def body(tx: Tx) -> tuple[Participant, RoomEvent | None]:
            check_manage(actor, await _lock_room(tx, room, actor), manage)
            row = await tx.fetchrow(
                "SELECT role, added_at FROM room_participants WHERE room = $1 AND participant = $2",
                room,
                participant,
            )
            if row is not None and row[0] == role:
                return Participant(room, participant, role, row[1]), None
            if row is None:
                await tx.execute(
                    "INSERT INTO room_participants (room, participant, role, added_at) "
                    "VALUES ($1, $2, $3, $4)",
                    room,
                    participant,
                    role,
                    now,
                )
                added_at, kind = now, PARTICIPANT_ADDED
            else:
                await tx.execute(
                    "UPDATE room_participants SET role = $3 WHERE room = $1 AND participant = $2",
                    room,
                    participant,
                    role,
                )
                added_at, kind = row[1], PARTICIPANT_UPDATED
            event = await _emit(
                tx, room, kind, actor, None, {"participant": participant, "role": role}, now
            )
            return Participant(room, participant, role, added_at), event

        return await self._room_write(room, body)

    async def participant_remove(
        self, room: str, participant: str, actor: str, manage: bool
    ) -> RoomEvent:
        now = time.time()

        async def body(tx: Tx) -> RoomEvent:
            role = await _lock_room(tx, room, actor)
            if actor != participant:
                check_manage(actor, role, manage)
            removed = await tx.fetchval(
                "DELETE FROM room_participants WHERE room = $1 AND participant = $2 RETURNING role",
                room,
                participant,
            )
            if removed is None:
                raise NotFound(f"{participant!r} is not a participant of this room")
            return await _emit(
                tx,
                room,
                PARTICIPANT_REMOVED,
                actor,
                None,
                {"participant": participant, "role": removed},
                now,
            )

        return await self._room_write(room, body)

    # ------------------------------------------------------------------ messages
    async def message_post(self, post: NewPost, idempotency_since: float) -> PostResult:
        now = time.time()
        message_id = uuid.uuid4().hex

        async def body(tx: Tx) -> PostResult:
            if await _lock_room(tx, post.room, post.author) is None:
                raise Forbidden("not a participant of this room")
            if post.idempotency_key is not None:
                row = await tx.fetchrow(
                    "SELECT request_hash, message_id, created_at FROM room_idempotency "
                    "WHERE room = $1 AND participant = $2 AND key = $3",
                    post.room,
                    post.author,
                    post.idempotency_key,
                )
                if row is not None and row[2] >= idempotency_since:
                    if row[0] != post.request_hash:
                        raise Conflict("idempotency key was used for a different request")
                    original = await _message(tx, post.room, row[1])
                    if original is not None:
                        if tx.replicated:
                            # A write (the room row lock is one too): this COMMIT must
                            # wait for a standby before the duplicate is answered (pg_ha).
                            await tx.execute(
                                "UPDATE room_idempotency SET created_at = created_at "
                                "WHERE room = $1 AND participant = $2 AND key = $3",
                                post.room,
                                post.author,
                                post.idempotency_key,
                            )
                        return PostResult(original, duplicate=True)
                if row is not None:
                    await tx.execute(
                        "DELETE FROM room_idempotency WHERE room = $1 AND participant = $2 "
                        "AND key = $3",
                        post.room,
                        post.author,
                        post.idempotency_key,
                    )
            event = await _emit(
                tx,
                post.room,
                MESSAGE_POSTED,
                post.author,
                message_id,
                post.content,
                now,
                event_id=message_id,
            )
            await tx.execute(
                "INSERT INTO room_messages (id, room, seq, author, content, created_at) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                message_id,
                post.room,
                event.seq,
                post.author,
                _dump(post.content),
                now,
            )
            if post.idempotency_key is not None:
                await tx.execute(
                    "INSERT INTO room_idempotency (room, participant, key, request_hash, "
                    "message_id, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    post.room,
                    post.author,
                    post.idempotency_key,
                    post.request_hash,
                    message_id,
                    now,
                )
            if post.notify:
                offline = [
                    row[0]
                    for row in await tx.fetch(
                        "SELECT participant FROM room_participants WHERE room = $1 "
                        "AND participant != $2 AND participant NOT IN (SELECT participant "
                        "FROM room_presence WHERE room = $1 AND until > $3) "
                        'ORDER BY participant COLLATE "C"',
                        post.room,
                        post.author,
                        now,
                    )
                ]
                await insert_outbox(
                    tx, room_notifications(post, message_id, event.seq, offline), now
                )
            tx.wake_room(post.room)
            message = RoomMessage(
                message_id, post.room, event.seq, post.author, post.content, now, None, None, {}
            )
            return PostResult(message, duplicate=False)

        return await self._write(body)

    async def message_get(self, room: str, message_id: str) -> RoomMessage | None:
        return await self._read(lambda tx: _message(tx, room, message_id))

    async def message_edit(
        self, room: str, message_id: str, actor: str, content: dict[str, Any], moderate: bool
    ) -> RoomEvent:
        now = time.time()

        async def body(tx: Tx) -> RoomEvent:
            role = await _lock_room(tx, room, actor)
            author, deleted_at = await _message_head(tx, room, message_id)
            check_moderation(actor, author, role, moderate)
            if deleted_at is not None:
                raise Conflict("the message is deleted")
            await tx.execute(
                "UPDATE room_messages SET content = $2, edited_at = $3 WHERE id = $1",
                message_id,
                _dump(content),
                now,
            )
            return await _emit(tx, room, MESSAGE_EDITED, actor, message_id, content, now)

        return await self._room_write(room, body)

    async def message_delete(
        self, room: str, message_id: str, actor: str, moderate: bool
    ) -> RoomEvent:
        now = time.time()

        async def body(tx: Tx) -> RoomEvent:
            role = await _lock_room(tx, room, actor)
            author, deleted_at = await _message_head(tx, room, message_id)
            check_moderation(actor, author, role, moderate)
            if deleted_at is not None:
                raise Conflict("the message is already deleted")
            await tx.execute(
                "UPDATE room_messages SET deleted_at = $2 WHERE id = $1", message_id, now
            )
            return await _emit(
                tx, room, MESSAGE_DELETED, actor, message_id, {"author": author}, now
            )

        return await self._room_write(room, body)

    async def reaction_set(
        self, room: str, message_id: str, participant: str, emoji: str, present: bool
    ) -> ReactionResult:
        now = time.time()

        async def body(tx: Tx) -> ReactionResult:
            if await _lock_room(tx, room, participant) is None:
                raise Forbidden("not a participant of this room")
            _, deleted_at = await _message_head(tx, room, message_id)
            if deleted_at is not None:
                raise Conflict("the message is deleted")
            if present:
                changed = await tx.fetchval(
                    "INSERT INTO room_reactions (message_id, participant, emoji, created_at) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING 1",
                    message_id,
                    participant,
                    emoji,
                    now,
                )
            else:
                changed = await tx.fetchval(
                    "DELETE FROM room_reactions WHERE message_id = $1 AND participant = $2 "
                    "AND emoji = $3 RETURNING 1",
                    message_id,
                    participant,
                    emoji,
                )
            event = None
            if changed:
                event = await _emit(
                    tx,
                    room,
                    REACTION_ADDED if present else REACTION_REMOVED,
                    participant,
                    message_id,
                    {"emoji": emoji},
                    now,
                )
                tx.wake_room(room)
            return ReactionResult(event, await _reactions(tx, message_id))

        return await self._write(body)

    # ------------------------------------------------------------------ history
    async def room_events(
        self,
        room: str,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> EventPage | None:
        async def body(tx: Tx) -> EventPage | None:
            last_seq = await tx.fetchval("SELECT last_seq FROM rooms WHERE id = $1", room)
            if last_seq is None:
                return None
            low = after if after is not None else 0
            high = before if before is not None else last_seq + 1
            newest_first = after is None
            rows = await tx.fetch(
                "SELECT e.seq, e.id, e.type, e.actor, e.message_id, e.data, e.created_at, "
                "m.deleted_at FROM room_events e LEFT JOIN room_messages m "
                "ON m.id = e.message_id WHERE e.room = $1 AND e.seq > $2 AND e.seq < $3 "
                f"ORDER BY e.seq {'DESC' if newest_first else 'ASC'} LIMIT $4",
                room,
                low,
                high,
                limit,
            )
            ordered = list(reversed(rows)) if newest_first else list(rows)
            events = [
                RoomEvent(
                    room,
                    seq,
                    eid,
                    etype,
                    actor,
                    mid,
                    visible_data(etype, json.loads(data), deleted is not None),
                    at,
                )
                for seq, eid, etype, actor, mid, data, at, deleted in ordered
            ]
            return EventPage(events, int(last_seq))

        return await self._read(body)

    # ------------------------------------------------------------------ presence
    async def presence_set(
        self, instance: str, entries: Sequence[tuple[str, str]], until: float
    ) -> None:
        if entries:
            await self._write(
                lambda tx: tx.executemany(
                    "INSERT INTO room_presence (room, participant, instance, until) "
                    "SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM rooms WHERE id = $1) "
                    "ON CONFLICT (room, participant, instance) DO UPDATE "
                    "SET until = excluded.until",
                    [(room, participant, instance, until) for room, participant in entries],
                )
            )

    async def presence_clear(self, instance: str, entries: Sequence[tuple[str, str]]) -> None:
        if entries:
            await self._write(
                lambda tx: tx.executemany(
                    "DELETE FROM room_presence WHERE room = $1 AND participant = $2 "
                    "AND instance = $3",
                    [(room, participant, instance) for room, participant in entries],
                )
            )

    # ------------------------------------------------------------------ housekeeping
    async def rooms_purge(self, deleted_before: float, idempotency_before: float) -> int:
        now = time.time()

        async def body(tx: Tx) -> int:
            ids = [
                row[0]
                for row in await tx.fetch(
                    "UPDATE room_messages SET content = NULL, purged_at = $1 WHERE id IN ("
                    " SELECT id FROM room_messages WHERE deleted_at IS NOT NULL"
                    " AND purged_at IS NULL AND deleted_at < $2 LIMIT $3"
                    " FOR UPDATE SKIP LOCKED) RETURNING id",
                    now,
                    deleted_before,
                    PURGE_BATCH,
                )
            ]
            if ids:
                await tx.execute(
                    "UPDATE room_events SET data = $1 WHERE message_id = ANY($2::text[]) "
                    "AND type = ANY($3::text[])",
                    _dump(REDACTED),
                    ids,
                    list(CONTENT_EVENTS),
                )
            await tx.execute(
                "DELETE FROM room_idempotency WHERE created_at < $1", idempotency_before
            )
            await tx.execute("DELETE FROM room_presence WHERE until < $1", now)
            return len(ids)

        return await self._write(body)


# ---------------------------------------------------------------------- helpers
def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _room(row: Row) -> Room:
    room_id, name, metadata, created_by, created_at, last_seq = row
    return Room(room_id, name, json.loads(metadata), created_by, created_at, int(last_seq))


async def _lock_room(tx: Tx, room: str, actor: str) -> Role | None:
    """Lock the room's row for this transaction (every room write starts here) and return
    the actor's role in the room, in one round trip."""
    row = await tx.fetchrow(
        "SELECT r.last_seq, p.role FROM rooms r LEFT JOIN room_participants p "
        "ON p.room = r.id AND p.participant = $2 WHERE r.id = $1 FOR UPDATE OF r",
        room,
        actor,
    )
    if row is None:
        raise NotFound(f"no room {room!r}")
    return cast(Role, row[1]) if row[1] is not None else None


async def _role(tx: Tx, room: str, participant: str) -> Role | None:
    role = await tx.fetchval(
        "SELECT role FROM room_participants WHERE room = $1 AND participant = $2",
        room,
        participant,
    )
    return cast(Role, role) if role is not None else None


async def _emit(
    tx: Tx,
    room: str,
    event_type: str,
    actor: str,
    message_id: str | None,
    data: dict[str, Any],
    now: float,
    event_id: str | None = None,
) -> RoomEvent:
    """Store one event under the room's next seq (same transaction as the change)."""
    seq = await tx.fetchval(
        "UPDATE rooms SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq", room
    )
    if seq is None:
        raise NotFound(f"no room {room!r}")
    event = RoomEvent(
        room, int(seq), event_id or uuid.uuid4().hex, event_type, actor, message_id, data, now
    )
    await tx.execute(
        "INSERT INTO room_events (room, seq, id, type, actor, message_id, data, created_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        room,
        event.seq,
        event.id,
        event_type,
        actor,
        message_id,
        _dump(data),
        now,
    )
    return event


async def _message_head(tx: Tx, room: str, message_id: str) -> tuple[str, float | None]:
    row = await tx.fetchrow(
        "SELECT author, deleted_at FROM room_messages WHERE id = $1 AND room = $2",
        message_id,
        room,
    )
    if row is None:
        raise NotFound(f"no message {message_id!r} in this room")
    return row[0], row[1]


async def _reactions(tx: Tx, message_id: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for emoji, participant in await tx.fetch(
        "SELECT emoji, participant FROM room_reactions WHERE message_id = $1 "
        'ORDER BY emoji COLLATE "C", created_at, participant COLLATE "C"',
        message_id,
    ):
        found.setdefault(emoji, []).append(participant)
    return found


async def _message(tx: Tx, room: str, message_id: str) -> RoomMessage | None:
    row = await tx.fetchrow(
        f"SELECT {_MESSAGE_COLUMNS} FROM room_messages WHERE id = $1 AND room = $2",
        message_id,
        room,
    )
    if row is None:
        return None
    mid, room_id, seq, author, content, created_at, edited_at, deleted_at = row
    return RoomMessage(
        mid,
        room_id,
        int(seq),
        author,
        json.loads(content) if content is not None and deleted_at is None else None,
        created_at,
        edited_at,
        deleted_at,
        await _reactions(tx, mid),
    )
