"""The rooms API's request and response shapes: validation and the OpenAPI schemas in one.

Requests are parsed strictly (no coercion, no unknown fields); responses are built through
the same models the OpenAPI document publishes, so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dovecote.errors import LimitExceeded, MalformedMessage, PayloadTooLarge
from dovecote.store.rooms_base import Participant, Room, RoomEvent, RoomMessage
from dovecote.util.jsonlimits import DEFAULT_MAX_JSON_DEPTH, depth_exceeds, raw_problem

# Identifier grammars. Path segments never contain "/", and everything stored in a plain
# TEXT column excludes control characters (PostgreSQL refuses NUL).
ROOM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,63}$"
PARTICIPANT_PATTERN = r"^[!-.0-~]{1,256}$"
MESSAGE_ID_PATTERN = r"^[0-9a-f]{32}$"
EMOJI_PATTERN = r"^[^\s\x00-\x1f\x7f/]{1,32}$"
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]{1,128}$"
NAME_PATTERN = r"^[^\x00-\x1f\x7f]{1,200}$"

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_SEQ = 2**63 - 1
MAX_CREATE_PARTICIPANTS = 100
MAX_METADATA_BYTES = 4096
# Text length the schema allows; the byte limit (rooms_max_message_bytes) is checked after.
MAX_TEXT_CHARS = 5 * 1024 * 1024

RoomId = Annotated[str, Field(pattern=ROOM_ID_PATTERN)]
ParticipantId = Annotated[str, Field(pattern=PARTICIPANT_PATTERN)]
RoleName = Literal["member", "moderator", "admin"]
M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------- requests
class ParticipantIn(_Strict):
    """A participant and their role."""

    id: ParticipantId
    role: RoleName = "member"


class RoomCreate(_Strict):
    """A room to create (the id is generated when not given)."""

    id: RoomId | None = None
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    metadata: dict[str, Any] = Field(default_factory=dict)
    participants: Annotated[list[ParticipantIn], Field(max_length=MAX_CREATE_PARTICIPANTS)] = Field(
        default_factory=list
    )


class RoleChange(_Strict):
    """The role a participant gets in the room."""

    role: RoleName = "member"


class MessageEdit(_Strict):
    """New content of a message: text, structured data, or both."""

    text: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    data: dict[str, Any] | None = None


class MessagePost(MessageEdit):
    """A message to post; `idempotency_key` may replace the Idempotency-Key header."""

    idempotency_key: Annotated[str, Field(pattern=IDEMPOTENCY_KEY_PATTERN)] | None = None


# ---------------------------------------------------------------------- responses
class ErrorOut(_Out):
    """Every 4xx/5xx body."""

    error: str
    detail: str
    request_id: str | None = None
    retry_after: float | None = None


class RoomOut(_Out):
    """A room and its latest event seq."""

    id: str
    name: str
    metadata: dict[str, Any]
    created_by: str
    created_at: float
    last_seq: int


class RoomListOut(_Out):
    """One page of rooms; pass `next_after` as `after` for the next page."""

    rooms: list[RoomOut]
    next_after: str | None


class ParticipantOut(_Out):
    """A participant of a room."""

    id: str
    role: RoleName
    added_at: float


class ParticipantListOut(_Out):
    """Everyone in a room."""

    participants: list[ParticipantOut]


class EventOut(_Out):
    """One entry of a room's ordered event stream."""

    room: str
    seq: int
    id: str
    type: str
    actor: str
    message_id: str | None
    data: dict[str, Any]
    created_at: float


class ParticipantChangeOut(_Out):
    """A participant after a change, and the event it produced (None if nothing changed)."""

    participant: ParticipantOut
    event: EventOut | None


class EventPageOut(_Out):
    """Events in ascending seq; page with `after=next_after` or `before=next_before`."""

    events: list[EventOut]
    last_seq: int
    next_after: int
    next_before: int
    has_more: bool


class MessageOut(_Out):
    """A message's current state (text and data are null once deleted)."""

    id: str
    room: str
    seq: int
    author: str
    text: str | None
    data: dict[str, Any] | None
    created_at: float
    edited_at: float | None
    deleted: bool
    reactions: dict[str, list[str]]


class ReactionOut(_Out):
    """A message's reactions after a change, and the event it produced (if any)."""

    changed: bool
    event: EventOut | None
    reactions: dict[str, list[str]]


# ---------------------------------------------------------------------- conversions
def room_out(room: Room) -> dict[str, Any]:
    return RoomOut(
        id=room.id,
        name=room.name,
        metadata=room.metadata,
        created_by=room.created_by,
        created_at=room.created_at,
        last_seq=room.last_seq,
    ).model_dump()


def participant_out(p: Participant) -> dict[str, Any]:
    return ParticipantOut(id=p.participant, role=p.role, added_at=p.added_at).model_dump()


def event_out(event: RoomEvent) -> dict[str, Any]:
    return EventOut(
        room=event.room,
        seq=event.seq,
        id=event.id,
        type=event.type,
        actor=event.actor,
        message_id=event.message_id,
        data=event.data,
        created_at=event.created_at,
    ).model_dump()


def message_out(m: RoomMessage) -> dict[str, Any]:
    content = m.content or {}
    return MessageOut(
        id=m.id,
        room=m.room,
        seq=m.seq,
        author=m.author,
        text=content.get("text"),
        data=content.get("data"),
        created_at=m.created_at,
        edited_at=m.edited_at,
        deleted=m.deleted_at is not None,
        reactions=m.reactions,
    ).model_dump()


# ---------------------------------------------------------------------- parsing
def parse_json(raw: bytes) -> Any:
    """Decode a JSON body; anything not storable as UTF-8 JSON is a client error."""
    if not raw.strip():
        raise MalformedMessage("a JSON body is required")
    # Bounded before parsing; depth again after: a value stored 900 levels deep would
    # overflow the recursion limit later, when it is serialised into an event frame.
    if (problem := raw_problem(raw, DEFAULT_MAX_JSON_DEPTH)) is not None:
        raise LimitExceeded(f"body {problem}")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
        # Lone surrogates parse but cannot be stored or sent; catch them here.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError, UnicodeError) as exc:
        raise MalformedMessage(f"body is not valid JSON: {str(exc)[:200]}") from exc
    if depth_exceeds(value, DEFAULT_MAX_JSON_DEPTH):
        raise LimitExceeded(f"body nests deeper than {DEFAULT_MAX_JSON_DEPTH} levels")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def parse_model(model: type[M], value: Any) -> M:
    """Validate a decoded body against a request model (400 with the reasons)."""
    if not isinstance(value, dict):
        raise MalformedMessage("the body must be a JSON object")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise MalformedMessage(f"invalid request: {reasons}") from exc
    except RecursionError as exc:
        raise MalformedMessage("invalid request: too deeply nested") from exc


def message_content(body: MessageEdit, max_bytes: int) -> dict[str, Any]:
    """The stored content of a post or edit, size-checked."""
    if body.text is None and body.data is None:
        raise MalformedMessage("a message needs text, data, or both")
    content: dict[str, Any] = {}
    if body.text is not None:
        content["text"] = body.text
    if body.data is not None:
        content["data"] = body.data
    size = len(canonical(content))
    if size > max_bytes:
        raise PayloadTooLarge(f"message content of {size} bytes exceeds {max_bytes}")
    return content


def check_metadata(metadata: dict[str, Any]) -> None:
    size = len(canonical(metadata))
    if size > MAX_METADATA_BYTES:
        raise PayloadTooLarge(f"room metadata of {size} bytes exceeds {MAX_METADATA_BYTES}")


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def request_hash(content: dict[str, Any]) -> str:
    """What an idempotency key is bound to: the content of the post."""
    return hashlib.sha256(canonical(content)).hexdigest()
