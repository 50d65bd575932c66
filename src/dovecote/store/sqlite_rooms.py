"""Rooms on the SQLite engine: a mixin for SQLiteStore using its `_read` / `_write`.

Every write runs on the engine's single writer thread, so per-room sequence numbers from
`rooms.last_seq` are assigned and committed strictly in order; permission checks read the
participant list inside the same transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from dovecote.errors import Conflict, Forbidden, NotFound
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

T = TypeVar("T")
Conn = sqlite3.Connection

_ROOM_COLUMNS = "id, name, metadata, created_by, created_at, last_seq"
_MESSAGE_COLUMNS = "id, room, seq, author, content, created_at, edited_at, deleted_at"
# Most deleted messages erased in one purge transaction.
PURGE_BATCH = 1000


class SQLiteRoomsMixin(RoomStore):
    """RoomStore for SQLiteStore."""

    if TYPE_CHECKING:

        async def _read(self, fn: Callable[[Conn], T]) -> T: ...

        async def _write(self, fn: Callable[[Conn], Any], notify: Sequence[str] = ()) -> Any: ...

    async def _room_write(self, room: str, fn: Callable[[Conn], T]) -> T:
        """Run a room write; wake the room's listeners after it committed."""
        result = cast(T, await self._write(fn))
        self._notify_room(room)
        return result

    # ------------------------------------------------------------------ rooms
    async def room_create(self, room: NewRoom) -> Room:
        now = time.time()

        def fn(c: Conn) -> Room:
            try:
                c.execute(
                    "INSERT INTO rooms (id, name, metadata, created_by, created_at, last_seq) "
                    "VALUES (?, ?, ?, ?, ?, 0)",
                    (room.id, room.name, _dump(room.metadata), room.created_by, now),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"room {room.id!r} already exists") from exc
            _emit(
                c,
                room.id,
                ROOM_CREATED,
                room.created_by,
                None,
                {"name": room.name, "metadata": room.metadata},
                now,
            )
            for participant, role in room.participants:
                c.execute(
                    "INSERT INTO room_participants (room, participant, role, added_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (room, participant) DO UPDATE "
                    "SET role = excluded.role",
                    (room.id, participant, role, now),
                )
                _emit(
                    c,
                    room.id,
                    PARTICIPANT_ADDED,
                    room.created_by,
                    None,
                    {"participant": participant, "role": role},
                    now,
                )
            return _room(
                c.execute(f"SELECT {_ROOM_COLUMNS} FROM rooms WHERE id = ?", (room.id,)).fetchone()
            )

        return await self._room_write(room.id, fn)

    async def room_get(self, room: str) -> Room | None:
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {_ROOM_COLUMNS} FROM rooms WHERE id = ?", (room,)
            ).fetchone()
        )
        return _room(row) if row else None

    async def room_list(self, participant: str | None, after: str, limit: int) -> list[Room]:
        def fn(c: Conn) -> list[Room]:
            if participant is None:
                rows = c.execute(
                    f"SELECT {_ROOM_COLUMNS} FROM rooms WHERE id > ? ORDER BY id LIMIT ?",
                    (after, limit),
                ).fetchall()
            else:
                rows = c.execute(
                    "SELECT r.id, r.name, r.metadata, r.created_by, r.created_at, r.last_seq "
                    "FROM room_participants p JOIN rooms r ON r.id = p.room "
                    "WHERE p.participant = ? AND p.room > ? ORDER BY p.room LIMIT ?",
                    (participant, after, limit),
                ).fetchall()
            return [_room(row) for row in rows]

        return await self._read(fn)

    async def room_delete(self, room: str, actor: str, manage: bool) -> None:
        def fn(c: Conn) -> None:
            _require_room(c, room)
            check_manage(actor, _role(c, room, actor), manage)
            c.execute("DELETE FROM rooms WHERE id = ?", (room,))

        await self._room_write(room, fn)

    # ------------------------------------------------------------------ participants
    async def participant_role(self, room: str, participant: str) -> Role | None:
        return await self._read(lambda c: _role(c, room, participant))

    async def participants(self, room: str) -> list[Participant] | None:
        def fn(c: Conn) -> list[Participant] | None:
            if c.execute("SELECT 1 FROM rooms WHERE id = ?", (room,)).fetchone() is None:
                return None
            rows = c.execute(
                "SELECT room, participant, role, added_at FROM room_participants "
                "WHERE room = ? ORDER BY participant",
                (room,),
            ).fetchall()
            return [Participant(*row) for row in rows]

        return await self._read(fn)

    async def participant_set(
        self, room: str, participant: str, role: Role, actor: str, manage: bool
    ) -> tuple[Participant, RoomEvent | None]:
        now = time.time()

        def fn(c: Conn) -> tuple[Participant, RoomEvent | None]:
            _require_room(c, room)
            check_manage(actor, _role(c, room, actor), manage)
            row = c.execute(
                "SELECT role, added_at FROM room_participants WHERE room = ? AND participant = ?",
                (room, participant),
            ).fetchone()
            if row is not None and row[0] == role:
                return Participant(room, participant, role, row[1]), None
            if row is None:
                c.execute(
                    "INSERT INTO room_participants (room, participant, role, added_at) "
                    "VALUES (?, ?, ?, ?)",
                    (room, participant, role, now),
                )
                added_at, kind = now, PARTICIPANT_ADDED
            else:
                c.execute(
                    "UPDATE room_participants SET role = ? WHERE room = ? AND participant = ?",
                    (role, room, participant),
                )
                added_at, kind = row[1], PARTICIPANT_UPDATED
            event = _emit(
                c, room, kind, actor, None, {"participant": participant, "role": role}, now
            )
            return Participant(room, participant, role, added_at), event

        return await self._room_write(room, fn)

    async def participant_remove(
        self, room: str, participant: str, actor: str, manage: bool
    ) -> RoomEvent:
        now = time.time()

        def fn(c: Conn) -> RoomEvent:
            _require_room(c, room)
            if actor != participant:
                check_manage(actor, _role(c, room, actor), manage)
            row = c.execute(
                "DELETE FROM room_participants WHERE room = ? AND participant = ? RETURNING role",
                (room, participant),
            ).fetchone()
            if row is None:
                raise NotFound(f"{participant!r} is not a participant of this room")
            return _emit(
                c,
                room,
                PARTICIPANT_REMOVED,
                actor,
                None,
                {"participant": participant, "role": row[0]},
                now,
            )

        return await self._room_write(room, fn)

    # ------------------------------------------------------------------ messages
    async def message_post(self, post: NewPost, idempotency_since: float) -> PostResult:
        now = time.time()

        def fn(c: Conn) -> PostResult:
            _require_room(c, post.room)
            if _role(c, post.room, post.author) is None:
                raise Forbidden("not a participant of this room")
            if post.idempotency_key is not None:
                row = c.execute(
                    "SELECT request_hash, message_id, created_at FROM room_idempotency "
                    "WHERE room = ? AND participant = ? AND key = ?",
                    (post.room, post.author, post.idempotency_key),
                ).fetchone()
                if row is not None and row[2] >= idempotency_since:
                    if row[0] != post.request_hash:
                        raise Conflict("idempotency key was used for a different request")
                    original = _message(c, post.room, row[1])
                    if original is not None:
                        return PostResult(original, duplicate=True)
                if row is not None:
                    c.execute(
                        "DELETE FROM room_idempotency WHERE room = ? AND participant = ? "
                        "AND key = ?",
                        (post.room, post.author, post.idempotency_key),
                    )
            message_id = uuid.uuid4().hex
            event = _emit(
                c,
                post.room,
                MESSAGE_POSTED,
                post.author,
                message_id,
                post.content,
                now,
                event_id=message_id,
            )
            c.execute(
                "INSERT INTO room_messages (id, room, seq, author, content, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (message_id, post.room, event.seq, post.author, _dump(post.content), now),
            )
            if post.idempotency_key is not None:
                c.execute(
                    "INSERT INTO room_idempotency (room, participant, key, request_hash, "
                    "message_id, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        post.room,
                        post.author,
                        post.idempotency_key,
                        post.request_hash,
                        message_id,
                        now,
                    ),
                )
            if post.notify:
                offline = [
                    row[0]
                    for row in c.execute(
                        "SELECT participant FROM room_participants WHERE room = ? "
                        "AND participant != ? AND participant NOT IN (SELECT participant "
                        "FROM room_presence WHERE room = ? AND until > ?) ORDER BY participant",
                        (post.room, post.author, post.room, now),
                    )
                ]
                from dovecote.store.sqlite import _insert_outbox  # (imports this module)

                _insert_outbox(c, room_notifications(post, message_id, event.seq, offline), now)
            message = RoomMessage(
                message_id, post.room, event.seq, post.author, post.content, now, None, None, {}
            )
            return PostResult(message, duplicate=False)

        result = cast(PostResult, await self._write(fn))
        if not result.duplicate:
            self._notify_room(post.room)
        return result

    async def message_get(self, room: str, message_id: str) -> RoomMessage | None:
        return await self._read(lambda c: _message(c, room, message_id))

    async def message_edit(
        self, room: str, message_id: str, actor: str, content: dict[str, Any], moderate: bool
    ) -> RoomEvent:
        now = time.time()

        def fn(c: Conn) -> RoomEvent:
            _require_room(c, room)
            author, deleted_at = _message_head(c, room, message_id)
            check_moderation(actor, author, _role(c, room, actor), moderate)
            if deleted_at is not None:
                raise Conflict("the message is deleted")
            c.execute(
                "UPDATE room_messages SET content = ?, edited_at = ? WHERE id = ?",
                (_dump(content), now, message_id),
            )
            return _emit(c, room, MESSAGE_EDITED, actor, message_id, content, now)

        return await self._room_write(room, fn)

    async def message_delete(
        self, room: str, message_id: str, actor: str, moderate: bool
    ) -> RoomEvent:
        now = time.time()

        def fn(c: Conn) -> RoomEvent:
            _require_room(c, room)
            author, deleted_at = _message_head(c, room, message_id)
            check_moderation(actor, author, _role(c, room, actor), moderate)
            if deleted_at is not None:
                raise Conflict("the message is already deleted")
            c.execute("UPDATE room_messages SET deleted_at = ? WHERE id = ?", (now, message_id))
            return _emit(c, room, MESSAGE_DELETED, actor, message_id, {"author": author}, now)

        return await self._room_write(room, fn)

    async def reaction_set(
        self, room: str, message_id: str, participant: str, emoji: str, present: bool
    ) -> ReactionResult:
        now = time.time()

        def fn(c: Conn) -> ReactionResult:
            _require_room(c, room)
            if _role(c, room, participant) is None:
                raise Forbidden("not a participant of this room")
            _, deleted_at = _message_head(c, room, message_id)
            if deleted_at is not None:
                raise Conflict("the message is deleted")
            if present:
                changed = c.execute(
                    "INSERT INTO room_reactions (message_id, participant, emoji, created_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING 1",
                    (message_id, participant, emoji, now),
                ).fetchone()
            else:
                changed = c.execute(
                    "DELETE FROM room_reactions WHERE message_id = ? AND participant = ? "
                    "AND emoji = ? RETURNING 1",
                    (message_id, participant, emoji),
                ).fetchone()
            event = None
            if changed:
                event = _emit(
                    c,
                    room,
                    REACTION_ADDED if present else REACTION_REMOVED,
                    participant,
                    message_id,
                    {"emoji": emoji},
                    now,
                )
            return ReactionResult(event, _reactions(c, message_id))

        result = cast(ReactionResult, await self._write(fn))
        if result.event is not None:
            self._notify_room(room)
        return result

    # ------------------------------------------------------------------ history
    async def room_events(
        self,
        room: str,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> EventPage | None:
        def fn(c: Conn) -> EventPage | None:
            head = c.execute("SELECT last_seq FROM rooms WHERE id = ?", (room,)).fetchone()
            if head is None:
                return None
            low = after if after is not None else 0
            high = before if before is not None else head[0] + 1
            newest_first = after is None
            rows = c.execute(
                "SELECT e.seq, e.id, e.type, e.actor, e.message_id, e.data, e.created_at, "
                "m.deleted_at FROM room_events e LEFT JOIN room_messages m "
                "ON m.id = e.message_id WHERE e.room = ? AND e.seq > ? AND e.seq < ? "
                f"ORDER BY e.seq {'DESC' if newest_first else 'ASC'} LIMIT ?",
                (room, low, high, limit),
            ).fetchall()
            if newest_first:
                rows.reverse()
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
                for seq, eid, etype, actor, mid, data, at, deleted in rows
            ]
            return EventPage(events, int(head[0]))

        return await self._read(fn)

    # ------------------------------------------------------------------ presence
    async def presence_set(
        self, instance: str, entries: Sequence[tuple[str, str]], until: float
    ) -> None:
        def fn(c: Conn) -> None:
            for room, participant in entries:
                c.execute(
                    "INSERT INTO room_presence (room, participant, instance, until) "
                    "SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM rooms WHERE id = ?) "
                    "ON CONFLICT (room, participant, instance) DO UPDATE "
                    "SET until = excluded.until",
                    (room, participant, instance, until, room),
                )

        if entries:
            await self._write(fn)

    async def presence_clear(self, instance: str, entries: Sequence[tuple[str, str]]) -> None:
        def fn(c: Conn) -> None:
            for room, participant in entries:
                c.execute(
                    "DELETE FROM room_presence WHERE room = ? AND participant = ? AND instance = ?",
                    (room, participant, instance),
                )

        if entries:
            await self._write(fn)

    # ------------------------------------------------------------------ housekeeping
    async def rooms_purge(self, deleted_before: float, idempotency_before: float) -> int:
        now = time.time()
        content_types = json.dumps(list(CONTENT_EVENTS))

        def fn(c: Conn) -> int:
            ids = [
                row[0]
                for row in c.execute(
                    "SELECT id FROM room_messages WHERE deleted_at IS NOT NULL "
                    "AND purged_at IS NULL AND deleted_at < ? LIMIT ?",
                    (deleted_before, PURGE_BATCH),
                ).fetchall()
            ]
            if ids:
                chosen = json.dumps(ids)
                c.execute(
                    "UPDATE room_messages SET content = NULL, purged_at = ? "
                    "WHERE id IN (SELECT value FROM json_each(?))",
                    (now, chosen),
                )
                c.execute(
                    "UPDATE room_events SET data = ? WHERE message_id IN "
                    "(SELECT value FROM json_each(?)) AND type IN "
                    "(SELECT value FROM json_each(?))",
                    (_dump(REDACTED), chosen, content_types),
                )
            c.execute("DELETE FROM room_idempotency WHERE created_at < ?", (idempotency_before,))
            c.execute("DELETE FROM room_presence WHERE until < ?", (now,))
            return len(ids)

        result: int = await self._write(fn)
        return result


# ---------------------------------------------------------------------- helpers
def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _room(row: Sequence[Any]) -> Room:
    room_id, name, metadata, created_by, created_at, last_seq = row
    return Room(room_id, name, json.loads(metadata), created_by, created_at, int(last_seq))


def _require_room(c: Conn, room: str) -> None:
    if c.execute("SELECT 1 FROM rooms WHERE id = ?", (room,)).fetchone() is None:
        raise NotFound(f"no room {room!r}")


def _role(c: Conn, room: str, participant: str) -> Role | None:
    row = c.execute(
        "SELECT role FROM room_participants WHERE room = ? AND participant = ?",
        (room, participant),
    ).fetchone()
    return cast(Role, row[0]) if row else None


def _emit(
    c: Conn,
    room: str,
    event_type: str,
    actor: str,
    message_id: str | None,
    data: dict[str, Any],
    now: float,
    event_id: str | None = None,
) -> RoomEvent:
    """Store one event under the room's next seq (same transaction as the change)."""
    row = c.execute(
        "UPDATE rooms SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq", (room,)
    ).fetchone()
    if row is None:
        raise NotFound(f"no room {room!r}")
    event = RoomEvent(
        room, int(row[0]), event_id or uuid.uuid4().hex, event_type, actor, message_id, data, now
    )
    c.execute(
        "INSERT INTO room_events (room, seq, id, type, actor, message_id, data, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (room, event.seq, event.id, event_type, actor, message_id, _dump(data), now),
    )
    return event


def _message_head(c: Conn, room: str, message_id: str) -> tuple[str, float | None]:
    row = c.execute(
        "SELECT author, deleted_at FROM room_messages WHERE id = ? AND room = ?",
        (message_id, room),
    ).fetchone()
    if row is None:
        raise NotFound(f"no message {message_id!r} in this room")
    return row[0], row[1]


def _reactions(c: Conn, message_id: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for emoji, participant in c.execute(
        "SELECT emoji, participant FROM room_reactions WHERE message_id = ? "
        "ORDER BY emoji, created_at, participant",
        (message_id,),
    ):
        found.setdefault(emoji, []).append(participant)
    return found


def _message(c: Conn, room: str, message_id: str) -> RoomMessage | None:
    row = c.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM room_messages WHERE id = ? AND room = ?",
        (message_id, room),
    ).fetchone()
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
        _reactions(c, mid),
    )
