"""Connection-level limits uvicorn does not have: per-address connection cap, header read
timeout, header size limits.

uvicorn's HTTP protocols only time out an idle keep-alive connection (`timeout_keep_alive`,
armed after a response). A new connection that sends nothing, or sends its headers one
byte at a time, is kept forever; httptools (llhttp) has no header size limit, so a 64 MiB
header is buffered and answered; and `limit_concurrency` counts connections globally, so
one address can take all of them. `h11_max_incomplete_event_size` exists for h11 only and
answers 400, not 431. None of this is reachable from ASGI: the application sees a request
only once its headers are complete. So `GuardedProtocol` is uvicorn's httptools protocol
with four small additions, each in the callback where uvicorn already is:

- `connection_made`: past MAX_CONNECTIONS_PER_IP open connections from one peer address,
  answer 429 and close before reading anything (peers in TRUSTED_PROXIES are not counted:
  many clients share them; the ASGI layer limits those clients by their own address);
- a header deadline (HEADER_TIMEOUT) from connect, and from the first byte of each next
  request, until the headers are complete: 408 and close (silent close if nothing came);
- request line / header line and total header bytes: 431 and close;
- WebSocket upgrades: past WS_HANDSHAKE_RATE_IP handshakes/s or MAX_WEBSOCKETS_PER_IP open
  sockets from one peer, 429 before any WebSocket work; the per-address counts follow the
  upgrade to uvicorn's WebSocket protocol, so open sockets count until they close.
Request bodies are timed where they are read: web/guard.py on the ASGI path, web/direct.py
for POST /, which this protocol hands to `direct` instead of starting an ASGI task.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Coroutine
from typing import Any, Protocol

import httptools
import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_remote_addr

from dovecote.errors import DovecoteError, HeadersTooLarge, RateLimited, RequestTimeout
from dovecote.ops import metrics
from dovecote.util.limits import TokenBuckets

log = structlog.get_logger("dovecote.connections")


def _response(exc: DovecoteError, reason: str) -> bytes:
    """A complete HTTP/1.1 answer with the usual JSON error body, closing the connection."""
    body = json.dumps(exc.to_json()).encode()
    return (
        f"HTTP/1.1 {exc.status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    ).encode() + body


TOO_MANY_CONNECTIONS = _response(
    RateLimited("too many connections from this address"), "Too Many Requests"
)
TOO_MANY_SOCKETS = _response(
    RateLimited("too many WebSockets or handshakes from this address", retry_after=1),
    "Too Many Requests",
)
HEADER_TIMEOUT = _response(
    RequestTimeout("request headers not received in time"), "Request Timeout"
)
HEADER_TOO_LARGE = _response(
    HeadersTooLarge("request line or headers exceed the size limit"),
    "Request Header Fields Too Large",
)


class PeerConnections:
    """Open connections, open WebSockets and the WebSocket handshake rate per peer address,
    shared by every connection of one server process."""

    def __init__(
        self,
        per_ip: int,
        sockets_per_ip: int = 1 << 30,
        handshake_rate: float = 1e9,
        handshake_burst: int = 1 << 30,
        trusted: list[str] | None = None,
        max_bytes: int = 1 << 20,
    ) -> None:
        self.per_ip = per_ip
        self.sockets_per_ip = sockets_per_ip
        # Only addresses with something open are kept: bounded by the open connections.
        self.open: dict[str, int] = {}
        self.sockets: dict[str, int] = {}
        gauge = metrics.RATE_LIMIT_BYTES.labels("handshake")
        self.handshakes = TokenBuckets(handshake_rate, handshake_burst, max_bytes, gauge.set)
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in trusted or []]

    def trusted(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def admit(self, ip: str) -> bool:
        count = self.open.get(ip, 0)
        if count >= self.per_ip and not self.trusted(ip):
            return False
        self.open[ip] = count + 1
        metrics.CONNECTIONS_OPEN.inc()
        return True

    def release(self, ip: str) -> None:
        _decrement(self.open, ip)
        metrics.CONNECTIONS_OPEN.dec()

    def admit_socket(self, ip: str) -> str:
        """'' when `ip` may upgrade one more connection to a WebSocket, else the limit."""
        if not self.trusted(ip):
            if self.handshakes.take(ip):
                return "websocket_handshake_rate"
            if self.sockets.get(ip, 0) >= self.sockets_per_ip:
                return "websockets_per_ip"
        self.sockets[ip] = self.sockets.get(ip, 0) + 1
        return ""

    def release_socket(self, ip: str) -> None:
        _decrement(self.sockets, ip)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left <= 0:
        counts.pop(key, None)
    else:
        counts[key] = left


# Seconds a refused connection is still read (and the input discarded) after its answer.
LINGER_SECONDS = 1.0


def answer_and_close(transport: asyncio.Transport, answer: bytes) -> None:
    """Write `answer`, then close without losing it.

    Closing a socket with unread input sends a reset, and the client may drop our answer
    unread; so half-close (FIN after the answer), let the caller discard input for a
    moment (the client usually closes first), then close."""
    if transport.is_closing():
        return
    transport.write(answer)
    if transport.can_write_eof():
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
    else:
        transport.close()


class _HeaderLimitExceeded(Exception):
    """Raised inside a parser callback to stop the parser (httptools turns it into an
    HttpParserCallbackError; `_too_large` says why)."""


class DirectRoute(Protocol):
    """Requests served on uvicorn's request cycle without an ASGI task (web/direct.py)."""

    def wants(self, scope: Any) -> bool: ...

    def serve(self, cycle: RequestResponseCycle) -> Coroutine[Any, Any, None]: ...


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above (see the module docstring)."""

    # Set on a subclass by `guarded_protocol` (uvicorn builds protocols from a class).
    peers: PeerConnections = PeerConnections(1 << 30)
    direct: DirectRoute | None = None
    header_timeout: float = 10.0
    max_line: int = 16 * 1024
    max_header_bytes: int = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._peer_ip: str | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._in_headers = True
        self._request_started = False
        self._url_bytes = 0
        self._header_bytes = 0
        self._raw_bytes = 0
        self._too_large = False
        self._answered = False  # a refusal was written: discard input until closed

    # ---------------------------------------------------------------- connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = get_remote_addr(transport)
        ip = peer[0] if peer else ""
        if not self.peers.admit(ip):
            metrics.LIMIT_REFUSALS.labels("connections_per_ip").inc()
            self._answered = True
            answer_and_close(transport, TOO_MANY_CONNECTIONS)
            return
        self._peer_ip = ip
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._peer_ip is None:
            return  # refused in connection_made: uvicorn never knew this connection
        self._cancel_header_timer()
        self.peers.release(self._peer_ip)
        self._peer_ip = None
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        ip = self._peer_ip
        if ip is None:
            return
        # Refused here, a handshake flood costs a canned answer: no WebSocket handshake,
        # no application task, no close handshake.
        if limit := self.peers.admit_socket(ip):
            metrics.LIMIT_REFUSALS.labels(limit).inc()
            self._refuse(TOO_MANY_SOCKETS)
            return
        super().handle_websocket_upgrade()
        # The transport now talks to uvicorn's WebSocket protocol and our connection_lost
        # is never called: release the address when that protocol's connection ends.
        self._peer_ip = None
        ws = self.transport.get_protocol()
        ws_lost = ws.connection_lost
        peers = self.peers

        def connection_lost(exc: Exception | None) -> None:
            try:
                ws_lost(exc)
            finally:
                peers.release_socket(ip)
                peers.release(ip)

        ws.connection_lost = connection_lost  # type: ignore[method-assign]

    # ---------------------------------------------------------------- header deadline
    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._in_headers:
            return
        if self._request_started:
            metrics.LIMIT_REFUSALS.labels("header_timeout").inc()
            self._refuse(HEADER_TIMEOUT)
        else:
            metrics.LIMIT_REFUSALS.labels("idle_connection").inc()
            self.transport.close()

    def _refuse(self, answer: bytes) -> None:
        self._answered = True
        self._cancel_header_timer()
        answer_and_close(self.transport, answer)

    # ---------------------------------------------------------------- header sizes
    def data_received(self, data: bytes) -> None:
        if self._peer_ip is None or self._answered:
            return
        if self._in_headers:
            # Bytes of a header section still incomplete after this chunk are all header
            # bytes: the partial line httptools buffers is bounded by this count.
            self._raw_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._too_large:
                self._refuse_headers()
            else:
                self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_headers and self._raw_bytes > self.max_header_bytes:
            self._refuse_headers()

    def _bad_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    def _refuse_headers(self) -> None:
        metrics.LIMIT_REFUSALS.labels("header_size").inc()
        self._refuse(HEADER_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._request_started = True
        self._url_bytes = self._header_bytes = self._raw_bytes = 0
        self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > self.max_line:
            self._too_large = True
            raise _HeaderLimitExceeded
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        line = len(name) + len(value) + 4  # "name: value\r\n"
        self._header_bytes += line
        if line > self.max_line or self._url_bytes + self._header_bytes > self.max_header_bytes:
            self._too_large = True
            raise _HeaderLimitExceeded
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._request_started = False
        self._cancel_header_timer()
        # Between requests uvicorn's keep-alive timer covers the idle time; from the next
        # request's first byte on_message_begin arms the header deadline again.
        super().on_headers_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # uvicorn calls this for each request, pipelined ones included, once it may run.
        direct = self.direct
        if direct is not None and direct.wants(cycle.scope):
            task = self.loop.create_task(direct.serve(cycle))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)
            return
        super()._start_asgi_task(cycle, app)


def guarded_protocol(
    base: type[GuardedProtocol],
    peers: PeerConnections,
    header_timeout: float,
    max_line: int,
    max_header_bytes: int,
    direct: DirectRoute | None = None,
) -> type[GuardedProtocol]:
    """A protocol class for uvicorn's `http=` with this server's limits; `direct` serves
    the requests it wants without ASGI."""
    attrs = {
        "direct": direct,
        "peers": peers,
        "header_timeout": header_timeout,
        "max_line": max_line,
        "max_header_bytes": max_header_bytes,
    }
    return type(f"Limited{base.__name__}", (base,), attrs)
