"""The rooms part of the store interface, and the plain records it returns.

The store provides it as a component, `store.rooms` (store/rooms.py, written once for
both engines). Semantics every engine guarantees:
- Each room event (message, edit, delete, reaction change, participant change) takes the
  next per-room `seq` in the transaction that stores it; per room, events commit in `seq`
  order, so reading `seq > n` after a wake-up never skips one.
- Permission checks that depend on the participant list run inside the writing
  transaction, so a participant change applies at once on every instance.
- A post with an idempotency key stores at most one message per (room, participant, key)
  within the window; a different request under the same key raises Conflict.
- Reactions are a set keyed (message, participant, emoji): add and remove are single
  statements, so concurrent updates never lose one.
- Room listeners are called after the commit of any room event, on every instance.
- A post with notification targets queues, in its own transaction, one outbox item
  (kind "notify") per target for every other participant with no live presence row;
  pending notifications coalesce per (room, participant, channel).
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["member", "moderator", "admin"]
ROLES: tuple[Role, ...] = ("member", "moderator", "admin")
MODERATING_ROLES = ("moderator", "admin")

# Event types (the `type` of a RoomEvent).
ROOM_CREATED = "room.created"
MESSAGE_POSTED = "message.posted"
MESSAGE_EDITED = "message.edited"
MESSAGE_DELETED = "message.deleted"
REACTION_ADDED = "reaction.added"
REACTION_REMOVED = "reaction.removed"
PARTICIPANT_ADDED = "participant.added"
PARTICIPANT_UPDATED = "participant.updated"
PARTICIPANT_REMOVED = "participant.removed"
EVENT_TYPES = (
    ROOM_CREATED,
    MESSAGE_POSTED,
    MESSAGE_EDITED,
    MESSAGE_DELETED,
    REACTION_ADDED,
    REACTION_REMOVED,
    PARTICIPANT_ADDED,
    PARTICIPANT_UPDATED,
    PARTICIPANT_REMOVED,
)
# Events whose data carries message content (redacted once the message is deleted).
CONTENT_EVENTS = (MESSAGE_POSTED, MESSAGE_EDITED)

RoomListener = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Room:
    """One room and where its event stream stands."""

    id: str
    name: str
    metadata: dict[str, Any]
    created_by: str
    created_at: float
    last_seq: int


@dataclass(frozen=True, slots=True)
class Participant:
    """A participant of a room and their role in it."""

    room: str
    participant: str
    role: Role
    added_at: float


@dataclass(frozen=True, slots=True)
class RoomEvent:
    """One entry of a room's ordered event stream."""

    room: str
    seq: int
    id: str
    type: str
    actor: str
    message_id: str | None
    data: dict[str, Any]
    created_at: float


@dataclass(frozen=True, slots=True)
class RoomMessage:
    """A message's current state (content is None once deleted)."""

    id: str
    room: str
    seq: int
    author: str
    content: dict[str, Any] | None
    created_at: float
    edited_at: float | None
    deleted_at: float | None
    reactions: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NewRoom:
    """A room to create, with its first participants."""

    id: str
    name: str
    metadata: dict[str, Any]
    created_by: str
    participants: Sequence[tuple[str, Role]] = ()


@dataclass(frozen=True, slots=True)
class NewPost:
    """A message to post; `request_hash` identifies the request behind an idempotency key."""

    room: str
    author: str
    content: dict[str, Any]
    idempotency_key: str | None
    request_hash: str
    # (channel, url) pairs: "webhook" or "push"; empty: notify nobody.
    notify: Sequence[tuple[str, str]] = ()


@dataclass(frozen=True, slots=True)
class PostResult:
    """The stored message and whether this call was a retry of an earlier post."""

    message: RoomMessage
    duplicate: bool


@dataclass(frozen=True, slots=True)
class ReactionResult:
    """The event a reaction change produced (None if the set did not change)."""

    event: RoomEvent | None
    reactions: dict[str, list[str]]


@dataclass(frozen=True, slots=True)
class EventPage:
    """Events of one room in ascending seq order, and the room's last seq."""

    events: list[RoomEvent]
    last_seq: int


REDACTED: dict[str, Any] = {"redacted": True}

# Outbox kind and headers of room notifications (headers starting "_" are never sent).
NOTIFY_KIND = "notify"
NOTIFY_EVENT = "room_message"
ROOM_HEADER = "_room"
CHANNEL_HEADER = "_channel"
TOPIC_PREFIX = "dovecote-room-"


def participant_hash(room: str, participant: str) -> str:
    """What a notification names instead of the participant (the receiver maps it)."""
    return hashlib.sha256(f"{room}\0{participant}".encode()).hexdigest()


def room_notifications(
    post: NewPost, message_id: str, seq: int, offline: Sequence[str]
) -> list[Any]:
    """Outbox items telling offline participants a room has news; no content leaves."""
    from dovecote.store.base import NewOutboxItem

    items = []
    for participant in offline:
        digest = participant_hash(post.room, participant)
        fields = {
            "event": NOTIFY_EVENT,
            "room": post.room,
            "participant_hash": digest,
            "seq": seq,
            "message_id": message_id,
        }
        for channel, url in post.notify:
            body: dict[str, Any] = fields
            if channel == "push":
                body = {
                    "message": {
                        "topic": TOPIC_PREFIX + digest,
                        "data": {k: str(v) for k, v in fields.items()},
                    }
                }
            items.append(
                NewOutboxItem(
                    kind=NOTIFY_KIND,
                    target=url,
                    payload=json.dumps(body, separators=(",", ":")).encode(),
                    headers={
                        "content-type": "application/json",
                        CHANNEL_HEADER: channel,
                        ROOM_HEADER: post.room,
                    },
                    dedup_key=f"notify:room:{channel}:{digest}",
                )
            )
    return items


def visible_data(event_type: str, data: dict[str, Any], deleted: bool) -> dict[str, Any]:
    """What an event shows: content of a deleted message is never served again."""
    if deleted and event_type in CONTENT_EVENTS:
        return dict(REDACTED)
    return data


def check_moderation(actor: str, author: str, role: str | None, moderate: bool) -> None:
    """Raise Forbidden unless the actor may edit or delete this author's message."""
    from dovecote.errors import Forbidden

    if moderate:
        return
    if role is None:
        raise Forbidden("not a participant of this room")
    if actor != author and role not in MODERATING_ROLES:
        raise Forbidden("only the author or a moderator may change this message")


def check_manage(actor: str, role: str | None, manage: bool) -> None:
    """Raise Forbidden unless the actor may manage the room (room admin or token admin)."""
    from dovecote.errors import Forbidden

    if not manage and role != "admin":
        raise Forbidden(f"{actor!r} is not an admin of this room")


class RoomStore(abc.ABC):
    """Rooms, participants, the per-room event stream, reactions, idempotency keys.

    Write methods raise NotFound (no such room or message), Forbidden (the actor may not
    do it, decided inside the transaction) and Conflict; they return after COMMIT.
    `moderate=True` means the caller holds a global moderating role from its token.
    """

    # --- rooms
    @abc.abstractmethod
    async def room_create(self, room: NewRoom) -> Room:
        """Create a room (Conflict if the id exists); emits room.created and participant.added."""

    @abc.abstractmethod
    async def room_get(self, room: str) -> Room | None:
        """One room."""

    @abc.abstractmethod
    async def room_list(self, participant: str | None, after: str, limit: int) -> list[Room]:
        """Rooms ordered by id after `after`; only `participant`'s rooms unless None."""

    @abc.abstractmethod
    async def room_delete(self, room: str, actor: str, manage: bool) -> None:
        """Delete a room and everything in it (room admins, or `manage`)."""

    # --- participants
    @abc.abstractmethod
    async def participant_role(self, room: str, participant: str) -> Role | None:
        """The participant's role in the room, or None."""

    @abc.abstractmethod
    async def participants(self, room: str) -> list[Participant] | None:
        """Everyone in a room (None if there is no such room)."""

    @abc.abstractmethod
    async def participant_set(
        self, room: str, participant: str, role: Role, actor: str, manage: bool
    ) -> tuple[Participant, RoomEvent | None]:
        """Add a participant or change their role (room admins, or `manage`)."""

    @abc.abstractmethod
    async def participant_remove(
        self, room: str, participant: str, actor: str, manage: bool
    ) -> RoomEvent:
        """Remove a participant (room admins, `manage`, or the participant themself)."""

    # --- messages
    @abc.abstractmethod
    async def message_post(self, post: NewPost, idempotency_since: float) -> PostResult:
        """Store a message once per idempotency key newer than `idempotency_since`."""

    @abc.abstractmethod
    async def message_get(self, room: str, message_id: str) -> RoomMessage | None:
        """A message's current state with its reactions."""

    @abc.abstractmethod
    async def message_edit(
        self, room: str, message_id: str, actor: str, content: dict[str, Any], moderate: bool
    ) -> RoomEvent:
        """Replace a message's content (its author, room moderators, or `moderate`)."""

    @abc.abstractmethod
    async def message_delete(
        self, room: str, message_id: str, actor: str, moderate: bool
    ) -> RoomEvent:
        """Tombstone a message (its author, room moderators, or `moderate`)."""

    @abc.abstractmethod
    async def reaction_set(
        self, room: str, message_id: str, participant: str, emoji: str, present: bool
    ) -> ReactionResult:
        """Add (present=True) or remove a participant's reaction; only participants."""

    # --- history
    @abc.abstractmethod
    async def room_events(
        self,
        room: str,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> EventPage | None:
        """Events with after < seq < before, ascending; the newest `limit` when only `before`
        (or neither) is given, the oldest `limit` otherwise. None if there is no such room."""

    # --- presence
    @abc.abstractmethod
    async def presence_set(
        self, instance: str, entries: Sequence[tuple[str, str]], until: float
    ) -> None:
        """Record (room, participant) pairs as followed live on `instance` until `until`."""

    @abc.abstractmethod
    async def presence_clear(self, instance: str, entries: Sequence[tuple[str, str]]) -> None:
        """Forget those pairs for `instance` (the subscriptions ended)."""

    # --- housekeeping
    @abc.abstractmethod
    async def rooms_purge(self, deleted_before: float, idempotency_before: float) -> int:
        """Erase content of messages deleted before the time; forget old keys. Returns
        messages purged."""

    # --- listeners
    def add_room_listener(self, callback: RoomListener) -> None:
        """Call `callback(room)` after a room event commits (on any instance)."""
        self._room_listeners().append(callback)

    def _room_listeners(self) -> list[RoomListener]:
        # Lazily created: implementations need not call an __init__ of this interface.
        listeners: list[RoomListener] | None = self.__dict__.get("_rooms_listeners")
        if listeners is None:
            listeners = []
            self.__dict__["_rooms_listeners"] = listeners
        return listeners

    def _notify_room(self, room: str) -> None:
        for callback in list(self._room_listeners()):
            callback(room)
