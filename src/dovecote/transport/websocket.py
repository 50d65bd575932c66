"""WebSocket transport at /ws: DIDComm messages in frames, replies and pushes back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import TYPE_CHECKING

import structlog
from starlette.types import Receive, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from dovecote.delivery.live import LiveSession
from dovecote.errors import PayloadTooLarge, RateLimited
from dovecote.ops import metrics

if TYPE_CHECKING:
    from dovecote.server import Dovecote

log = structlog.get_logger("dovecote.websocket")

CLOSE_NORMAL = 1000
CLOSE_TOO_BIG = 1009
CLOSE_RESTART = 1012
CLOSE_TRY_AGAIN = 1013
IDLE_REASON = "idle timeout"


async def refuse_websocket(receive: Receive, send: Send, code: int, reason: str) -> None:
    """Accept, then close with `code`: a close before the handshake completes becomes an
    HTTP 403, which clients take as final, and they would never see "try again later"."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": code, "reason": reason})


def admission_refusal(app: Dovecote) -> tuple[int, str] | None:
    """(close code, reason) when a new socket must not be served: 1012 while draining (a
    restart: reconnect elsewhere), 1013 past MAX_WEBSOCKETS; None when it takes a slot."""
    if app.degradation.draining:
        return CLOSE_RESTART, "server restarting; reconnect"
    if not app.ws_slots.try_acquire():
        return CLOSE_TRY_AGAIN, "too many sockets; retry later"
    return None


async def websocket_endpoint(websocket: WebSocket) -> None:
    app: Dovecote = websocket.app.state.dovecote
    endpoint = "ws"
    refusal = admission_refusal(app)
    if refusal is not None:
        await refuse_websocket(websocket.receive, websocket.send, *refusal)
        metrics.WS_DISCONNECTS.labels(endpoint, str(refusal[0])).inc()
        return
    await websocket.accept()
    metrics.WS_CONNECTS.labels(endpoint).inc()
    metrics.WS_CONNECTIONS.labels(endpoint).inc()
    send_lock = asyncio.Lock()

    async def send(data: bytes) -> None:
        # Replies and live pushes share the socket; one frame at a time.
        async with send_lock:
            await websocket.send_text(data.decode())

    session = LiveSession(send, endpoint)
    app.sockets[session.id] = websocket
    client = str((websocket.client or ("", 0))[0])
    code = CLOSE_NORMAL
    try:
        while True:
            # A socket without live mode carries only request/reply: silent for
            # WS_IDLE_TIMEOUT, it is only holding a slot.
            idle = None if session.mediatees or session.pushing else app.settings.ws_idle_timeout
            try:
                message = await asyncio.wait_for(websocket.receive(), idle)
            except TimeoutError:
                metrics.LIMIT_REFUSALS.labels("websocket_idle").inc()
                await websocket.close(code=CLOSE_NORMAL, reason=IDLE_REASON)
                break
            if message["type"] == "websocket.disconnect":
                code = int(message.get("code") or CLOSE_NORMAL)
                break
            if wait := app.ip_limits.take(client):
                # Every message counts against the address's limit, as an HTTP request does.
                limited = RateLimited("rate limit per client address", retry_after=wait)
                metrics.LIMIT_REFUSALS.labels("websocket_message_rate").inc()
                async with send_lock:
                    await websocket.send_text(json.dumps(limited.to_json()))
                continue
            raw = message.get("bytes") or (message.get("text") or "").encode()
            if len(raw) > app.settings.max_body_bytes:
                exc = PayloadTooLarge("frame exceeds the size limit")
                app.count_bad_input(exc, "ws")
                code = CLOSE_TOO_BIG
                await websocket.close(code=CLOSE_TOO_BIG, reason="message too big")
                break
            request_id = uuid.uuid4().hex[:16]
            outcome = await app.mediator.receive(raw, "ws", session, request_id)
            if outcome.replies:
                for packed in outcome.replies:
                    await send(packed)
            elif outcome.error is not None:
                body = outcome.error.to_json() | {"request_id": request_id}
                async with send_lock:
                    await websocket.send_text(json.dumps(body))
            # Live pushes enabled by this request start only after its reply went out.
            session.release()
    except WebSocketDisconnect as exc:
        code = exc.code
    except Exception as exc:  # a broken socket: everything unacknowledged stays queued
        log.info("websocket.error", session=session.id, error=str(exc)[:200])
        code = 1011
    finally:
        app.sockets.pop(session.id, None)
        await app.live.detach(session)
        app.ws_slots.release()
        metrics.WS_CONNECTIONS.labels(endpoint).dec()
        metrics.WS_DISCONNECTS.labels(endpoint, str(code)).inc()
        with contextlib.suppress(Exception):
            await websocket.close()
