"""WebSocket /v1/rooms/ws (rooms): subscribe to rooms, get everything after `since`, then live.

Client frames (JSON text):
    {"action": "auth", "token": "<JWT>"}        first, unless the upgrade carried a Bearer
    {"action": "subscribe", "room": "r1", "since": 41}
    {"action": "unsubscribe", "room": "r1"}
    {"action": "ping"}
Server frames: {"type": "subscribed" | "event" | "unsubscribed" | "error" | "pong" |
"overflow", ...}. A subscriber that cannot keep up gets {"type": "overflow",
"resume_from": {room: seq}} and close code 4008; an expired token gets close 4001.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from typing import Any

import structlog
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from dovecote.errors import (
    DovecoteError,
    Forbidden,
    InvalidToken,
    MalformedMessage,
    NotFound,
    RateLimited,
)
from dovecote.ops import metrics
from dovecote.rooms import Rooms
from dovecote.rooms.auth import LEEWAY, Principal
from dovecote.rooms.hub import Feed, Frame
from dovecote.rooms.models import MAX_SEQ, ROOM_ID_PATTERN
from dovecote.util.limits import TokenBuckets
from dovecote.web.admission import CLOSE_ERROR, WebSockets

log = structlog.get_logger("dovecote.rooms.websocket")

ENDPOINT = "rooms"
IDLE_REASON = "idle timeout"
CLOSE_UNAUTHORIZED = 4001
CLOSE_SLOW_CONSUMER = 4008
# Seconds a connection without an Authorization header has to send its auth frame.
AUTH_TIMEOUT = 10.0
MAX_FRAME_BYTES = 16 * 1024
# Seconds spent trying to hand a slow subscriber its resume hint before closing anyway.
HINT_TIMEOUT = 0.5
# Seconds the close frame may wait for a paused transport (a slow reader that starts
# reading again gets it; one that never does is dropped without it).
CLOSE_TIMEOUT = 10.0
# A WebSocket close reason holds at most 123 bytes.
MAX_CLOSE_REASON = 123

_ROOM = re.compile(ROOM_ID_PATTERN)


class RoomsSocket:
    """/v1/rooms/ws over one `Rooms` (admission is web/admission.py's)."""

    def __init__(self, rooms: Rooms, ip_limits: TokenBuckets) -> None:
        self.rooms = rooms
        self.ip_limits = ip_limits

    def routes(self, sockets: WebSockets) -> list[BaseRoute]:
        return [WebSocketRoute("/v1/rooms/ws", sockets.endpoint(ENDPOINT, self.serve))]

    async def serve(self, websocket: WebSocket) -> int:
        """Serve one admitted socket until it ends; the close code."""
        rooms = self.rooms
        socket_id = uuid.uuid4().hex[:12]
        code, reason = 1000, ""
        feed: Feed | None = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            principal = await _authenticate(websocket, rooms)
            if principal is None:
                code = CLOSE_UNAUTHORIZED
                return code
            feed = Feed(principal, rooms.settings.ws_queue, rooms.settings.ws_stall)
            client = str((websocket.client or ("", 0))[0])
            tasks = [
                asyncio.create_task(rooms.hub.pump(feed), name=f"rooms-pump-{socket_id}"),
                asyncio.create_task(_send_loop(websocket, feed), name=f"rooms-send-{socket_id}"),
                asyncio.create_task(
                    _receive_loop(websocket, rooms, feed, self.ip_limits, client),
                    name=f"rooms-recv-{socket_id}",
                ),
            ]
            code, reason = await _supervise(websocket, feed, tasks, rooms.settings.ws_idle_timeout)
        except WebSocketDisconnect as exc:
            code = exc.code
        except Exception as exc:  # noqa: BLE001 - a broken socket: positions live with the client
            log.info("rooms.websocket_error", error=str(exc)[:200])
            code = CLOSE_ERROR
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if feed is not None:
                rooms.hub.detach(feed)
                for room in list(feed.present):
                    await rooms.presence.leave(room, feed.principal.sub)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    websocket.close(code=code if code >= 1000 else 1000, reason=reason),
                    CLOSE_TIMEOUT,
                )
        return code


async def _authenticate(websocket: WebSocket, rooms: Rooms) -> Principal | None:
    """From the upgrade's Authorization header, else from the first frame."""
    try:
        header = websocket.headers.get("authorization")
        if header:
            return await rooms.auth.from_header(header)
        frame = await asyncio.wait_for(_next_frame(websocket), AUTH_TIMEOUT)
        if frame.get("action") != "auth" or not isinstance(frame.get("token"), str):
            raise InvalidToken('send {"action": "auth", "token": "<JWT>"} first')
        principal = await rooms.auth.verify(frame["token"])
        await websocket.send_text(json.dumps({"type": "authenticated", "sub": principal.sub}))
        return principal
    except TimeoutError:
        error: DovecoteError = InvalidToken("no auth frame in time")
    except DovecoteError as exc:
        error = exc
    with contextlib.suppress(Exception):
        await websocket.send_text(json.dumps(_error_body(error)))
        await websocket.close(code=CLOSE_UNAUTHORIZED, reason=error.detail[:120])
    return None


async def _supervise(
    websocket: WebSocket, feed: Feed, tasks: list[asyncio.Task[Any]], idle: float
) -> tuple[int, str]:
    """Wait until the client leaves, the feed overflows, the token expires, or a socket
    without subscriptions stays silent for `idle` seconds; return the close code and
    reason."""
    sender = tasks[1]
    done_wait = asyncio.create_task(feed.done.wait())
    try:
        while True:
            remaining = feed.principal.expires_at + LEEWAY - time.time()
            if remaining <= 0:
                return CLOSE_UNAUTHORIZED, await _last_word(
                    websocket,
                    sender,
                    feed,
                    {
                        "type": "error",
                        "error": InvalidToken.code,
                        "detail": "token expired; reconnect with a fresh token",
                    },
                )
            wait = min(remaining, 60.0)
            if not feed.positions:
                silent_for = time.monotonic() - feed.last_frame
                if silent_for >= idle:
                    metrics.LIMIT_REFUSALS.labels("websocket_idle").inc()
                    return 1000, IDLE_REASON
                wait = min(wait, idle - silent_for)
            finished, _ = await asyncio.wait(
                [*tasks, done_wait],
                timeout=wait,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if feed.overflowed:
                log.info(
                    "rooms.slow_consumer_closed",
                    participant=feed.principal.sub,
                    resume_from=feed.resume_hint(),
                )
                return CLOSE_SLOW_CONSUMER, await _last_word(
                    websocket, sender, feed, {"type": "overflow"}
                )
            for task in finished:
                if task is not done_wait and task.done():
                    exc = task.exception()
                    if isinstance(exc, WebSocketDisconnect):
                        return exc.code, ""
                    if exc is not None:
                        raise exc
                    return 1000, ""
    finally:
        done_wait.cancel()


async def _last_word(
    websocket: WebSocket, sender: asyncio.Task[Any], feed: Feed, body: dict[str, Any]
) -> str:
    """Stop sending events, tell the client where to resume, return the close reason.

    A slow reader's socket may not take the frame in time (sends wait while the transport
    is paused), so the hint also goes into the close reason when it fits (123 bytes)."""
    sender.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await sender
    hint = feed.resume_hint()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(
            websocket.send_text(json.dumps(body | {"resume_from": hint})), HINT_TIMEOUT
        )
    reason = json.dumps({"resume_from": hint}, separators=(",", ":"))
    if len(reason.encode()) > MAX_CLOSE_REASON:
        reason = "resume each room from the last seq you received"
    return reason


async def _send_loop(websocket: WebSocket, feed: Feed) -> None:
    while True:
        frame = await feed.queue.get()
        if not feed.current(frame):
            continue
        await websocket.send_text(frame.encoded())
        # Recorded after the send returned: the frame is in the transport, in order.
        if frame.room is not None and frame.seq is not None and frame.room in feed.sent:
            feed.sent[frame.room] = frame.seq


async def _receive_loop(
    websocket: WebSocket, rooms: Rooms, feed: Feed, limits: TokenBuckets, client: str
) -> None:
    while True:
        frame: dict[str, Any] = {}
        try:
            frame = await _next_frame(websocket)
            feed.last_frame = time.monotonic()
            # Every frame counts against the address's limit, as an HTTP request does.
            if wait := limits.take(client):
                metrics.LIMIT_REFUSALS.labels("websocket_message_rate").inc()
                raise RateLimited("rate limit per client address", retry_after=wait)
            await _handle(frame, rooms, feed)
        except DovecoteError as exc:
            body = _error_body(exc)
            for name in ("action", "room"):
                if isinstance(frame.get(name), str):
                    body[name] = frame[name][:64]
            await feed.offer(Frame(body))


async def _handle(frame: dict[str, Any], rooms: Rooms, feed: Feed) -> None:
    action = frame.get("action")
    if action == "ping":
        await feed.offer(Frame({"type": "pong"}))
    elif action == "auth":
        await _reauthenticate(frame, rooms, feed)
    elif action == "subscribe":
        await _subscribe(frame, rooms, feed)
    elif action == "unsubscribe":
        await _drop(rooms, feed, _room_arg(frame), "requested")
    else:
        raise MalformedMessage("action must be auth, subscribe, unsubscribe or ping")


async def _reauthenticate(frame: dict[str, Any], rooms: Rooms, feed: Feed) -> None:
    """A fresh token for the same participant; rooms it no longer grants are dropped."""
    token = frame.get("token")
    if not isinstance(token, str):
        raise MalformedMessage("auth needs a token")
    principal = await rooms.auth.verify(token)
    if principal.sub != feed.principal.sub:
        raise Forbidden("a refreshed token must be for the same participant")
    feed.principal = principal
    # A narrower token ends what it does not grant, before it is acknowledged: from the
    # "authenticated" frame on, nothing of those rooms reaches the client.
    for room in list(feed.positions):
        if not principal.may_enter(room):
            await _drop(rooms, feed, room, "not granted by the new token")
    for room in list(feed.positions):
        try:
            await _check_reader(rooms, principal, room)
        except (Forbidden, NotFound):
            await _drop(rooms, feed, room, "not granted by the new token")
    await feed.offer(Frame({"type": "authenticated", "sub": principal.sub}))


async def _subscribe(frame: dict[str, Any], rooms: Rooms, feed: Feed) -> None:
    room, since = _room_arg(frame), frame.get("since", 0)
    if type(since) is not int or not 0 <= since <= MAX_SEQ:
        raise MalformedMessage("since must be a non-negative integer")
    if room in feed.positions:
        raise MalformedMessage(f"already subscribed to {room!r}")
    most = rooms.settings.ws_max_subscriptions
    if len(feed.positions) >= most:
        metrics.LIMIT_REFUSALS.labels("room_subscriptions").inc()
        raise MalformedMessage(f"at most {most} rooms per connection")
    await _check_reader(rooms, feed.principal, room)
    found = await rooms.store.room_get(room)
    if found is None:
        raise NotFound(f"no room {room!r}")
    # Present before the acknowledgement: a post the client makes after it never
    # notifies this participant as offline.
    if room not in feed.present:
        feed.present.add(room)
        await rooms.presence.join(room, feed.principal.sub)
    # The acknowledgement is queued before the first event of the room.
    await feed.offer(
        Frame({"type": "subscribed", "room": room, "since": since, "last_seq": found.last_seq})
    )
    rooms.hub.subscribe(feed, room, since)


async def _drop(rooms: Rooms, feed: Feed, room: str, reason: str) -> None:
    """End the subscription to `room` (events of it still queued are not sent)."""
    rooms.hub.unsubscribe(feed, room)
    if room in feed.present:
        feed.present.discard(room)
        await rooms.presence.leave(room, feed.principal.sub)
    await feed.offer(Frame({"type": "unsubscribed", "room": room, "reason": reason}))


async def _check_reader(rooms: Rooms, principal: Principal, room: str) -> None:
    if not principal.may_enter(room):
        raise Forbidden("the token does not grant this room")
    if principal.is_admin:
        return
    if await rooms.store.participant_role(room, principal.sub) is None:
        if await rooms.store.room_get(room) is None:
            raise NotFound(f"no room {room!r}")
        raise Forbidden("not a participant of this room")


async def _next_frame(websocket: WebSocket) -> dict[str, Any]:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(int(message.get("code") or 1000))
    text = message.get("text")
    if text is None:
        raise MalformedMessage("send JSON text frames")
    if len(text) > MAX_FRAME_BYTES:
        raise MalformedMessage("frame too large")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage("frame is not JSON") from exc
    if not isinstance(value, dict):
        raise MalformedMessage("frame must be a JSON object")
    return value


def _room_arg(frame: dict[str, Any]) -> str:
    room = frame.get("room")
    if not isinstance(room, str) or not _ROOM.match(room):
        raise MalformedMessage("room must be a room id")
    return room


def _error_body(exc: DovecoteError) -> dict[str, Any]:
    return {"type": "error", **exc.to_json()}
