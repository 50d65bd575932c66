"""The one way into a WebSocket (/ws and /v1/rooms/ws), and the register drains close.

A socket that may not be served is accepted and then closed, never refused before the
handshake: a close before accepting becomes an HTTP 403, which clients take as final, and
they would never see "try again later". The close codes:

    1012  server restarting (draining): reconnect, elsewhere if need be
    1013  try again later: too many sockets (MAX_WEBSOCKETS), or too many sockets or
          handshakes from this client address (MAX_WEBSOCKETS_PER_IP, RATE_LIMIT_IP)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from starlette.websockets import WebSocket

from dovecote.ops import metrics
from dovecote.util.limits import InFlight, TokenBuckets

CLOSE_NORMAL = 1000
CLOSE_TOO_BIG = 1009
CLOSE_ERROR = 1011
CLOSE_RESTART = 1012
CLOSE_TRY_AGAIN = 1013
RESTART_REASON = "server restarting; reconnect"
PER_IP_REASON = "too many sockets or handshakes from this address; retry later"

# Serves one accepted socket; returns the close code it ended with (for the metrics).
SocketHandler = Callable[[WebSocket], Awaitable[int]]
Endpoint = Callable[[WebSocket], Awaitable[None]]


class WebSockets:
    """Admission (per-address rate and count, draining, MAX_WEBSOCKETS) and open sockets."""

    def __init__(
        self,
        max_open: int,
        max_per_ip: int,
        handshakes: TokenBuckets,
        draining: Callable[[], bool],
    ) -> None:
        self.slots = InFlight(max_open)
        self.max_per_ip = max_per_ip
        self.handshakes = handshakes
        self.draining = draining
        self.per_ip: dict[str, int] = {}
        self.open: dict[str, WebSocket] = {}

    def __len__(self) -> int:
        return len(self.open)

    def _refusal(self, client: str) -> tuple[int, str, str] | None:
        """(close code, reason, limit label) when a new socket must not be served."""
        # Behind a proxy in TRUSTED_PROXIES, the client is the address it forwarded.
        if self.handshakes.take(client):
            return CLOSE_TRY_AGAIN, PER_IP_REASON, "websocket_rate"
        if self.per_ip.get(client, 0) >= self.max_per_ip:
            return CLOSE_TRY_AGAIN, PER_IP_REASON, "websockets_per_ip"
        if self.draining():
            return CLOSE_RESTART, RESTART_REASON, ""
        if not self.slots.try_acquire():
            return CLOSE_TRY_AGAIN, "too many sockets; retry later", ""
        return None

    def endpoint(self, name: str, handler: SocketHandler) -> Endpoint:
        """`handler` behind admission, with the connection metrics labelled `name`."""

        async def admitted(websocket: WebSocket) -> None:
            client = str((websocket.client or ("", 0))[0])
            refusal = self._refusal(client)
            if refusal is not None:
                code, reason, limit = refusal
                if limit:
                    metrics.LIMIT_REFUSALS.labels(limit).inc()
                metrics.WS_DISCONNECTS.labels(name, str(code)).inc()
                await websocket.accept()
                await websocket.close(code=code, reason=reason)
                return
            socket_id = uuid.uuid4().hex[:12]
            self.per_ip[client] = self.per_ip.get(client, 0) + 1
            code = CLOSE_ERROR
            try:
                await websocket.accept()
                metrics.WS_CONNECTS.labels(name).inc()
                metrics.WS_CONNECTIONS.labels(name).inc()
                self.open[socket_id] = websocket
                try:
                    code = await handler(websocket)
                finally:
                    self.open.pop(socket_id, None)
                    metrics.WS_CONNECTIONS.labels(name).dec()
            finally:
                self.slots.release()
                left = self.per_ip.get(client, 1) - 1
                if left <= 0:
                    self.per_ip.pop(client, None)
                else:
                    self.per_ip[client] = left
                metrics.WS_DISCONNECTS.labels(name, str(code)).inc()

        return admitted

    def close_all(self) -> None:
        """Draining: every open socket is told to reconnect (1012). Never blocks."""
        for websocket in list(self.open.values()):
            task = asyncio.ensure_future(websocket.close(code=CLOSE_RESTART, reason=RESTART_REASON))
            task.add_done_callback(lambda t: t.exception())
