"""The DIDComm front door: POST / and the WebSocket /ws (messages in frames, replies and
live pushes back). Both hand raw bytes to `Mediator.receive` and render its `Outcome`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable

import structlog
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from dovecote.delivery.live import LiveRegistry, LiveSession
from dovecote.didcomm.dispatch import Mediator
from dovecote.errors import DovecoteError, MalformedMessage, PayloadTooLarge, RateLimited
from dovecote.ops import metrics
from dovecote.util.limits import TokenBuckets
from dovecote.web.admission import (
    CLOSE_ERROR,
    CLOSE_NORMAL,
    CLOSE_TOO_BIG,
    WebSockets,
)
from dovecote.web.responses import (
    Reply,
    asgi_chunks,
    count_bad_input,
    error_body,
    error_reply,
    json_reply,
    read_chunks,
    retry_after_header,
)

log = structlog.get_logger("dovecote.websocket")

DIDCOMM_ENCRYPTED = "application/didcomm-encrypted+json"
ACCEPTED_TYPES = {
    DIDCOMM_ENCRYPTED,
    "didcomm-encrypted+json",
    "application/json",
    "",  # some agents send no content type at all; the body is checked anyway
    # didcomm-messaging's quickstart client posts raw bytes with aiohttp's default type.
    "application/octet-stream",
    # DIDComm v1 (Aries RFC 0044); the envelope itself says which version it is.
    "application/didcomm-envelope-enc",
    "application/ssi-agent-wire",
}
IDLE_REASON = "idle timeout"
# Most answers: one shared reply.
ACCEPTED = Reply(202)
# A client that left before its body was read: nobody reads this answer.
GONE = Reply(400)
ReadBody = Callable[[str | None, int], Awaitable[bytes]]


def unsupported_type(request_id: str) -> Reply:
    return json_reply(
        error_body("e.m.msg.unsupported-media-type", f"send {DIDCOMM_ENCRYPTED}", request_id),
        415,
    )


class DIDCommEndpoints:
    """POST / and /ws over one mediator."""

    def __init__(
        self,
        mediator: Mediator,
        live: LiveRegistry,
        ip_limits: TokenBuckets,
        *,
        max_body_bytes: int,
        ws_idle_timeout: float,
    ) -> None:
        self.mediator = mediator
        self.live = live
        self.ip_limits = ip_limits
        self.max_body_bytes = max_body_bytes
        self.ws_idle_timeout = ws_idle_timeout

    def routes(self, sockets: WebSockets) -> list[BaseRoute]:
        """/ws; POST / is `post`, served in front of the router (web/app.py)."""
        return [WebSocketRoute("/ws", sockets.endpoint("ws", self.websocket))]

    async def post(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST / as a bare ASGI app: no router, no Request object. GuardMiddleware runs
        first (request id, limits, body deadline, metrics). A real server serves POST /
        by `reply` on the connection itself (web/direct.py); ASGI hosts, the in-process
        test tier among them, come here."""

        async def read(declared: str | None, limit: int) -> bytes:
            return await read_chunks(declared, asgi_chunks(receive), limit)

        reply = await self.reply(scope["headers"], read, scope["state"]["request_id"])
        await reply.response()(scope, receive, send)

    async def reply(
        self, raw_headers: list[tuple[bytes, bytes]], read: ReadBody, request_id: str
    ) -> Reply:
        """The answer to one POST / (both paths): `read(content_length, limit)` gives the
        body, refusing it past `limit` before reading where Content-Length says so."""
        # The first of repeated headers, as Starlette's Headers.get gives it.
        headers = dict(reversed(raw_headers))
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        content_type = content_type.split(";")[0].strip().lower()
        if content_type not in ACCEPTED_TYPES:
            count_bad_input(MalformedMessage("unsupported media type"), "http", request_id)
            return unsupported_type(request_id)
        try:
            declared = headers.get(b"content-length")
            raw = await read(
                None if declared is None else declared.decode("latin-1"), self.max_body_bytes
            )
        except DovecoteError as exc:
            count_bad_input(exc, "http", request_id)
            return error_reply(exc, request_id)
        except ClientDisconnect:
            return GONE
        if not raw:
            empty = MalformedMessage("empty body")
            count_bad_input(empty, "http", request_id)
            return error_reply(empty, request_id)

        outcome = await self.mediator.receive(raw, "http", request_id=request_id)
        if outcome.replies and outcome.return_route:
            extra: tuple[tuple[str, str], ...] = ()
            if outcome.error is not None and outcome.error.retry_after is not None:
                extra = (("Retry-After", retry_after_header(outcome.error.retry_after)),)
            return Reply(outcome.status, outcome.replies[0], outcome.media_type, extra)
        if outcome.error is not None:
            return error_reply(outcome.error, request_id)
        return ACCEPTED

    async def websocket(self, websocket: WebSocket) -> int:
        """Serve one admitted socket until it ends; the close code."""
        send_lock = asyncio.Lock()

        async def send(data: bytes) -> None:
            # Replies and live pushes share the socket; one frame at a time.
            async with send_lock:
                await websocket.send_text(data.decode())

        async def send_json(body: dict[str, object]) -> None:
            async with send_lock:
                await websocket.send_text(json.dumps(body))

        session = LiveSession(send, "ws")
        client = str((websocket.client or ("", 0))[0])
        code = CLOSE_NORMAL
        try:
            while True:
                # A socket without live mode carries only request/reply: silent for
                # WS_IDLE_TIMEOUT, it is only holding a slot.
                idle = None if session.mediatees or session.pushing else self.ws_idle_timeout
                try:
                    message = await asyncio.wait_for(websocket.receive(), idle)
                except TimeoutError:
                    metrics.LIMIT_REFUSALS.labels("websocket_idle").inc()
                    await websocket.close(code=CLOSE_NORMAL, reason=IDLE_REASON)
                    break
                if message["type"] == "websocket.disconnect":
                    code = int(message.get("code") or CLOSE_NORMAL)
                    break
                if wait := self.ip_limits.take(client):
                    # Every message counts against the address's limit, as a request does.
                    limited = RateLimited("rate limit per client address", retry_after=wait)
                    metrics.LIMIT_REFUSALS.labels("websocket_message_rate").inc()
                    await send_json(limited.to_json())
                    continue
                raw = message.get("bytes") or (message.get("text") or "").encode()
                if len(raw) > self.max_body_bytes:
                    count_bad_input(PayloadTooLarge("frame exceeds the size limit"), "ws")
                    code = CLOSE_TOO_BIG
                    await websocket.close(code=CLOSE_TOO_BIG, reason="message too big")
                    break
                await self._frame(raw, session, send, send_json)
        except WebSocketDisconnect as exc:
            code = exc.code
        except Exception as exc:  # noqa: BLE001 - a broken socket: the unacknowledged stay queued
            log.info("websocket.error", session=session.id, error=str(exc)[:200])
            code = CLOSE_ERROR
        finally:
            await self.live.detach(session)
            with contextlib.suppress(Exception):  # already closed by either side
                await websocket.close()
        return code

    async def _frame(
        self,
        raw: bytes,
        session: LiveSession,
        send: Callable[[bytes], Awaitable[None]],
        send_json: Callable[[dict[str, object]], Awaitable[None]],
    ) -> None:
        """One DIDComm message from the socket: its replies, or its error, go back on it."""
        request_id = uuid.uuid4().hex[:16]
        outcome = await self.mediator.receive(raw, "ws", session, request_id)
        if outcome.replies:
            for packed in outcome.replies:
                await send(packed)
        elif outcome.error is not None:
            await send_json(outcome.error.to_json() | {"request_id": request_id})
        # Live pushes enabled by this request start only after its reply went out.
        session.release()
