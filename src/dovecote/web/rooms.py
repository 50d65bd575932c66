"""The rooms HTTP JSON API under /v1/rooms, and the table that routes and documents it.

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
from typing import Any, TypeVar

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
from dovecote.rooms import IDEMPOTENCY_WINDOW, Rooms, models
from dovecote.rooms.auth import Principal
from dovecote.store.rooms_base import NewPost, NewRoom, RoomStore
from dovecote.web import openapi
from dovecote.web.openapi import (
    EMOJI,
    IDEMPOTENCY_KEY,
    LIMIT,
    MESSAGE,
    PARTICIPANT,
    ROOM,
    Operation,
    int_query,
)
from dovecote.web.responses import count_bad_input, error_response, read_body, request_id_of

M = TypeVar("M", bound=BaseModel)
CallHandler = Callable[["Call"], Awaitable[Response]]

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
        limit = max(MIN_BODY_BYTES, 4 * self.rooms.settings.max_message_bytes)
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
    content = models.message_content(body, call.rooms.settings.max_message_bytes)
    result = await call.store.message_post(
        NewPost(
            room=room,
            author=call.principal.sub,
            content=content,
            idempotency_key=key,
            request_hash=models.request_hash(content),
            notify=call.rooms.settings.notify_targets,
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
    content = models.message_content(body, call.rooms.settings.max_message_bytes)
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


# ---------------------------------------------------------------------- the table
# One row per operation: it routes the request (RoomsAPI.routes), labels its metrics
# (web/guard.py) and describes it in /openapi.json (web/openapi.py).
OPERATIONS: list[Operation] = [
    Operation(
        "/v1/rooms",
        "post",
        create_room,
        "createRoom",
        "Create a room (token role admin).",
        {201: models.RoomOut},
        body=models.RoomCreate,
    ),
    Operation(
        "/v1/rooms",
        "get",
        list_rooms,
        "listRooms",
        "Rooms the caller is in (every room for admins), by id.",
        {200: models.RoomListOut},
        [
            {
                "name": "after",
                "in": "query",
                "required": False,
                "description": "Return rooms with ids after this one.",
                "schema": {"type": "string", "pattern": models.ROOM_ID_PATTERN},
            },
            LIMIT,
        ],
    ),
    Operation(
        "/v1/rooms/{room}", "get", get_room, "getRoom", "One room.", {200: models.RoomOut}, [ROOM]
    ),
    Operation(
        "/v1/rooms/{room}",
        "delete",
        delete_room,
        "deleteRoom",
        "Delete a room and all its events (room or token admin).",
        {204: None},
        [ROOM],
    ),
    Operation(
        "/v1/rooms/{room}/participants",
        "get",
        list_participants,
        "listParticipants",
        "Everyone in the room.",
        {200: models.ParticipantListOut},
        [ROOM],
    ),
    Operation(
        "/v1/rooms/{room}/participants/{participant}",
        "put",
        put_participant,
        "putParticipant",
        "Add a participant or change their role (room or token admin).",
        {200: models.ParticipantChangeOut},
        [ROOM, PARTICIPANT],
        body=models.RoleChange,
        body_required=False,
    ),
    Operation(
        "/v1/rooms/{room}/participants/{participant}",
        "delete",
        remove_participant,
        "removeParticipant",
        "Remove a participant (room or token admin, or themself).",
        {200: models.EventOut},
        [ROOM, PARTICIPANT],
    ),
    Operation(
        "/v1/rooms/{room}/messages",
        "post",
        post_message,
        "postMessage",
        "Post a message; 201 when stored, 200 when an idempotent retry.",
        {201: models.MessageOut, 200: models.MessageOut},
        [ROOM, IDEMPOTENCY_KEY],
        body=models.MessagePost,
    ),
    Operation(
        "/v1/rooms/{room}/messages/{message}",
        "get",
        get_message,
        "getMessage",
        "A message's current state.",
        {200: models.MessageOut},
        [ROOM, MESSAGE],
    ),
    Operation(
        "/v1/rooms/{room}/messages/{message}",
        "patch",
        edit_message,
        "editMessage",
        "Edit a message (its author or a moderator).",
        {200: models.EventOut},
        [ROOM, MESSAGE],
        body=models.MessageEdit,
    ),
    Operation(
        "/v1/rooms/{room}/messages/{message}",
        "delete",
        delete_message,
        "deleteMessage",
        "Delete a message, leaving a tombstone (its author or a moderator).",
        {200: models.EventOut},
        [ROOM, MESSAGE],
    ),
    Operation(
        "/v1/rooms/{room}/messages/{message}/reactions/{emoji}",
        "put",
        add_reaction,
        "addReaction",
        "Add the caller's reaction (a set: adding twice changes nothing).",
        {200: models.ReactionOut},
        [ROOM, MESSAGE, EMOJI],
    ),
    Operation(
        "/v1/rooms/{room}/messages/{message}/reactions/{emoji}",
        "delete",
        remove_reaction,
        "removeReaction",
        "Remove the caller's reaction.",
        {200: models.ReactionOut},
        [ROOM, MESSAGE, EMOJI],
    ),
    Operation(
        "/v1/rooms/{room}/events",
        "get",
        list_events,
        "listEvents",
        "History: the room's events by seq. `after` pages forward (oldest first), "
        "`before` (or nothing) returns the newest page; always ascending.",
        {200: models.EventPageOut},
        [
            ROOM,
            int_query("after", 0, models.MAX_SEQ, "Events with seq > after."),
            int_query("before", 1, models.MAX_SEQ, "Events with seq < before."),
            LIMIT,
        ],
    ),
]


ROOMS_PATHS = list(dict.fromkeys(op.path for op in OPERATIONS))
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]


class RoomsAPI:
    """The /v1/rooms routes and their OpenAPI document over one `Rooms`."""

    def __init__(self, rooms: Rooms) -> None:
        self.rooms = rooms

    def routes(self) -> list[BaseRoute]:
        by_path: dict[str, dict[str, CallHandler]] = {}
        for op in OPERATIONS:
            by_path.setdefault(op.path, {})[op.method.upper()] = op.handler
        return [
            *openapi.routes(OPERATIONS),
            *(self.resource(path, handlers) for path, handlers in by_path.items()),
            Route("/v1/rooms/{rest:path}", not_found, methods=ALL_METHODS),
        ]

    def resource(self, path: str, handlers: dict[str, CallHandler]) -> Route:
        """One path, its methods; unknown methods get a JSON 405 with Allow."""
        allowed = ", ".join(sorted(handlers))
        auth = self.rooms.auth

        async def endpoint(request: Request) -> Response:
            try:
                handler = handlers.get(request.method)
                if handler is None:
                    raise MethodNotAllowed(f"{request.method} is not allowed here; use {allowed}")
                principal = await auth.from_header(request.headers.get("authorization"))
                return await handler(Call(self.rooms, request, principal))
            except DovecoteError as exc:
                if isinstance(exc, ClientError):
                    count_bad_input(exc, "rooms")
                response = error_response(exc, request_id_of(request))
                if exc.status == 405:
                    response.headers["Allow"] = allowed
                elif exc.status == 401:
                    response.headers["WWW-Authenticate"] = 'Bearer realm="dovecote-rooms"'
                return response

        return Route(path, endpoint, methods=ALL_METHODS, name=f"rooms:{path}")


async def not_found(request: Request) -> Response:
    return error_response(NotFound("no such rooms resource"), request_id_of(request))
