"""WebSocket transport at /ws: DIDComm messages in frames, replies and pushes back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import TYPE_CHECKING

import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect

from dovecote.delivery.live import LiveSession
from dovecote.errors import PayloadTooLarge
from dovecote.ops import metrics

if TYPE_CHECKING:
    from dovecote.server import Dovecote

log = structlog.get_logger("dovecote.websocket")

CLOSE_NORMAL = 1000
CLOSE_TOO_BIG = 1009
CLOSE_RESTART = 1012
CLOSE_TRY_AGAIN = 1013


async def websocket_endpoint(websocket: WebSocket) -> None:
    app: Dovecote = websocket.app.state.dovecote
    endpoint = "ws"
    if app.degradation.draining or not app.ws_slots.try_acquire():
        # Accept first: a close before the handshake completes becomes an HTTP 403, and
        # the client would never see the "try again later" code.
        await websocket.accept()
        await websocket.close(code=CLOSE_TRY_AGAIN, reason="busy or draining; retry later")
        metrics.WS_DISCONNECTS.labels(endpoint, str(CLOSE_TRY_AGAIN)).inc()
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
    code = CLOSE_NORMAL
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                code = int(message.get("code") or CLOSE_NORMAL)
                break
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
