"""HTTP JSON API under /v1/rooms.

Every call carries a Bearer JWT (401 without a valid one). The token's `rooms` claim gates
which rooms a call may touch (403); membership and room roles come from the store and are
checked inside the writing transaction. Every refusal is a 4xx JSON body
`{"error", "detail", "request_id"}` and changes nothing.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from dovecote.errors import (
    ClientError,
    DovecoteError,
    Forbidden,
    MalformedMessage,
    MethodNotAllowed,
    NotFound,
    UnsupportedMediaType,
)
from dovecote.ops import metrics
from dovecote.rooms import IDEMPOTENCY_WINDOW, models
from dovecote.rooms.auth import Principal
from dovecote.store.rooms_base import NewPost, NewRoom, RoomStore
from dovecote.transport.http import error_response, read_body

if TYPE_CHECKING:
    from dovecote.rooms import Rooms
    from dovecote.server import Dovecote

M = TypeVar("M", bound=BaseModel)
Handler = Callable[["Call"], Awaitable[Response]]

_ROOM = re.compile(models.ROOM_ID_PATTERN)
_PARTICIPANT = re.compile(models.PARTICIPANT_PATTERN)
_MESSAGE = re.compile(models.MESSAGE_ID_PATTERN)
_EMOJI = re.compile(models.EMOJI_PATTERN)
_KEY = re.compile(models.IDEMPOTENCY_KEY_PATTERN)
# Smallest body limit for rooms requests (room creation with participants and metadata).
MIN_BODY_BYTES = 64 * 1024


@dataclass
class Call:
    """One authenticated API call: what handlers need, and the checks they share."""

    rooms: Rooms
    request: Request
    principal: Principal

    @property
    def store(self) -> RoomStore:
        return self.rooms.store

    def path(self, name: str, pattern: re.Pattern[str], missing: str) -> str:
        value = str(self.request.path_params.get(name, ""))
        if not pattern.match(value):
            raise NotFound(f"no {missing} {value[:80]!r}")
        return value

    def room(self) -> str:
        """The path's room id, if the token allows it (403 otherwise)."""
        room = self.path("room", _ROOM, "room")
        if not self.principal.may_enter(room):
            raise Forbidden("the token does not grant this room")
        return room

    async def reader(self) -> str:
        """The path's room, readable by the caller: a participant, or a token admin."""
        room = self.room()
        role = await self.store.participant_role(room, self.principal.sub)
        if role is None:
            if await self.store.room_get(room) is None:
                raise NotFound(f"no room {room!r}")
            if not self.principal.is_admin:
                raise Forbidden("not a participant of this room")
        return room

    async def body(self, model: type[M], empty_ok: bool = False) -> M:
        limit = max(MIN_BODY_BYTES, 4 * self.rooms.settings.rooms_max_message_bytes)
        try:
            raw = await read_body(self.request, limit)
        except ClientDisconnect as exc:
            raise MalformedMessage("client disconnected") from exc
        if not raw.strip() and empty_ok:
            return models.parse_model(model, {})
        content_type = self.request.headers.get("content-type", "").split(";")[0].strip()
        if content_type.lower() != "application/json" and not content_type.endswith("+json"):
            raise UnsupportedMediaType("send application/json")
        return models.parse_model(model, models.parse_json(raw))

    def query_int(self, name: str, default: int | None, low: int, high: int) -> int | None:
        text = self.request.query_params.get(name)
        if text is None or text == "":
            return default
        if not text.isascii() or not text.isdigit() or len(text) > 19:
            raise MalformedMessage(f"{name} must be an integer from {low} to {high}")
        value = int(text)
        if not low <= value <= high:
            raise MalformedMessage(f"{name} must be an integer from {low} to {high}")
        return value


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------- rooms
async def create_room(call: Call) -> Response:
    if not call.principal.is_admin:
        raise Forbidden("creating rooms needs the admin role")
    body = await call.body(models.RoomCreate)
    room_id = body.id or "r" + uuid.uuid4().hex
    if not call.principal.may_enter(room_id):
        raise Forbidden("the token does not grant this room")
    models.check_metadata(body.metadata)
    seen: set[str] = set()
    for p in body.participants:
        if p.id in seen:
            raise MalformedMessage(f"participant {p.id!r} is listed twice")
        seen.add(p.id)
    room = await call.store.room_create(
        NewRoom(
            id=room_id,
            name=body.name,
            metadata=body.metadata,
            created_by=call.principal.sub,
            participants=[(p.id, p.role) for p in body.participants],
        )
    )
    return json_response(models.room_out(room), 201, {"Location": f"/v1/rooms/{room.id}"})


async def list_rooms(call: Call) -> Response:
    after = call.request.query_params.get("after", "")
    if after and not _ROOM.match(after):
        raise MalformedMessage("after must be a room id")
    limit = call.query_int("limit", models.DEFAULT_LIMIT, 1, models.MAX_LIMIT)
    assert limit is not None
    principal = call.principal
    page = await call.store.room_list(None if principal.is_admin else principal.sub, after, limit)
    next_after = page[-1].id if len(page) == limit else None
    visible = [models.room_out(r) for r in page if principal.may_enter(r.id)]
    return json_response(
        models.RoomListOut.model_validate({"rooms": visible, "next_after": next_after}).model_dump()
    )


async def get_room(call: Call) -> Response:
    room_id = await call.reader()
    room = await call.store.room_get(room_id)
    if room is None:
        raise NotFound(f"no room {room_id!r}")
    return json_response(models.room_out(room))


async def delete_room(call: Call) -> Response:
    room = call.room()
    await call.store.room_delete(room, call.principal.sub, manage=call.principal.is_admin)
    return Response(status_code=204)


# ---------------------------------------------------------------------- participants
async def list_participants(call: Call) -> Response:
    room = await call.reader()
    found = await call.store.participants(room)
    if found is None:
        raise NotFound(f"no room {room!r}")
    return json_response({"participants": [models.participant_out(p) for p in found]})


async def put_participant(call: Call) -> Response:
    room = call.room()
    participant = str(call.request.path_params.get("participant", ""))
    if not _PARTICIPANT.match(participant):
        raise MalformedMessage("participant ids are 1-256 printable ASCII characters, no '/'")
    body = await call.body(models.RoleChange, empty_ok=True)
    result, event = await call.store.participant_set(
        room, participant, body.role, call.principal.sub, manage=call.principal.is_admin
    )
    return json_response(
        {
            "participant": models.participant_out(result),
            "event": models.event_out(event) if event else None,
        }
    )


async def remove_participant(call: Call) -> Response:
    room = call.room()
    participant = call.path("participant", _PARTICIPANT, "participant")
    event = await call.store.participant_remove(
        room, participant, call.principal.sub, manage=call.principal.is_admin
    )
    return json_response(models.event_out(event))


# ---------------------------------------------------------------------- messages
async def post_message(call: Call) -> Response:
    room = call.room()
    header_key = call.request.headers.get("idempotency-key")
    if header_key is not None and not _KEY.match(header_key):
        raise MalformedMessage("Idempotency-Key must be 1-128 printable ASCII characters")
    body = await call.body(models.MessagePost)
    if header_key and body.idempotency_key and header_key != body.idempotency_key:
        raise MalformedMessage("Idempotency-Key header and body idempotency_key differ")
    key = header_key or body.idempotency_key
    content = models.message_content(body, call.rooms.settings.rooms_max_message_bytes)
    result = await call.store.message_post(
        NewPost(
            room=room,
            author=call.principal.sub,
            content=content,
            idempotency_key=key,
            request_hash=models.request_hash(content),
            notify=call.rooms.notify_targets,
        ),
        idempotency_since=time.time() - IDEMPOTENCY_WINDOW,
    )
    message = result.message
    metrics.ROOMS_POSTS.labels("duplicate" if result.duplicate else "created").inc()
    return json_response(
        models.message_out(message),
        200 if result.duplicate else 201,
        {"Location": f"/v1/rooms/{room}/messages/{message.id}"},
    )


async def get_message(call: Call) -> Response:
    room = await call.reader()
    message_id = call.path("message", _MESSAGE, "message")
    message = await call.store.message_get(room, message_id)
    if message is None:
        raise NotFound(f"no message {message_id!r} in this room")
    return json_response(models.message_out(message))


async def edit_message(call: Call) -> Response:
    room = call.room()
    message_id = call.path("message", _MESSAGE, "message")
    body = await call.body(models.MessageEdit)
    content = models.message_content(body, call.rooms.settings.rooms_max_message_bytes)
    event = await call.store.message_edit(
        room, message_id, call.principal.sub, content, moderate=call.principal.moderates
    )
    return json_response(models.event_out(event))


async def delete_message(call: Call) -> Response:
    room = call.room()
    message_id = call.path("message", _MESSAGE, "message")
    event = await call.store.message_delete(
        room, message_id, call.principal.sub, moderate=call.principal.moderates
    )
    return json_response(models.event_out(event))


async def _reaction(call: Call, present: bool) -> Response:
    room = call.room()
    message_id = call.path("message", _MESSAGE, "message")
    emoji = str(call.request.path_params.get("emoji", ""))
    if not _EMOJI.match(emoji):
        raise MalformedMessage("a reaction is 1-32 characters without spaces or '/'")
    result = await call.store.reaction_set(room, message_id, call.principal.sub, emoji, present)
    return json_response(
        {
            "changed": result.event is not None,
            "event": models.event_out(result.event) if result.event else None,
            "reactions": result.reactions,
        }
    )


async def add_reaction(call: Call) -> Response:
    return await _reaction(call, True)


async def remove_reaction(call: Call) -> Response:
    return await _reaction(call, False)


# ---------------------------------------------------------------------- history
async def list_events(call: Call) -> Response:
    room = await call.reader()
    after = call.query_int("after", None, 0, models.MAX_SEQ)
    before = call.query_int("before", None, 1, models.MAX_SEQ)
    limit = call.query_int("limit", models.DEFAULT_LIMIT, 1, models.MAX_LIMIT)
    assert limit is not None
    page = await call.store.room_events(room, after=after, before=before, limit=limit)
    if page is None:
        raise NotFound(f"no room {room!r}")
    low = after if after is not None else 0
    high = min(before if before is not None else page.last_seq + 1, page.last_seq + 1)
    first = page.events[0].seq if page.events else None
    last = page.events[-1].seq if page.events else None
    if after is not None:  # oldest first from `after`: more if we stopped short of `high`
        has_more = (last if last is not None else low) < high - 1
    else:  # newest before `high`: more if older events remain above `low`
        has_more = (first if first is not None else high) > low + 1
    return json_response(
        {
            "events": [models.event_out(e) for e in page.events],
            "last_seq": page.last_seq,
            "next_after": last if last is not None else max(low, min(high - 1, page.last_seq)),
            "next_before": first if first is not None else high,
            "has_more": has_more,
        }
    )


# ---------------------------------------------------------------------- plumbing
def resource(path: str, **handlers: Handler) -> Route:
    """One path, its methods; unknown methods get a JSON 405 with Allow."""
    allowed = ", ".join(sorted(handlers))

    async def endpoint(request: Request) -> Response:
        dc: Dovecote = request.app.state.dovecote
        request_id = getattr(request.state, "request_id", "")
        try:
            handler = handlers.get(request.method)
            if handler is None:
                raise MethodNotAllowed(f"{request.method} is not allowed here; use {allowed}")
            principal = await dc.rooms.auth.from_header(request.headers.get("authorization"))
            return await handler(Call(dc.rooms, request, principal))
        except DovecoteError as exc:
            if isinstance(exc, ClientError):
                dc.count_bad_input(exc, "rooms")
            response = error_response(exc, request_id)
            if exc.status == 405:
                response.headers["Allow"] = allowed
            elif exc.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="dovecote-rooms"'
            return response

    return Route(path, endpoint, methods=ALL_METHODS, name=f"rooms:{path}")


async def not_found(request: Request) -> Response:
    exc = NotFound("no such rooms resource")
    return error_response(exc, getattr(request.state, "request_id", ""))


ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]

ROUTES: list[BaseRoute] = [
    resource("/v1/rooms", POST=create_room, GET=list_rooms),
    resource("/v1/rooms/{room}", GET=get_room, DELETE=delete_room),
    resource("/v1/rooms/{room}/participants", GET=list_participants),
    resource(
        "/v1/rooms/{room}/participants/{participant}",
        PUT=put_participant,
        DELETE=remove_participant,
    ),
    resource("/v1/rooms/{room}/messages", POST=post_message),
    resource(
        "/v1/rooms/{room}/messages/{message}",
        GET=get_message,
        PATCH=edit_message,
        DELETE=delete_message,
    ),
    resource(
        "/v1/rooms/{room}/messages/{message}/reactions/{emoji}",
        PUT=add_reaction,
        DELETE=remove_reaction,
    ),
    resource("/v1/rooms/{room}/events", GET=list_events),
    Route("/v1/rooms/{rest:path}", not_found, methods=ALL_METHODS),
]
