"""POST / answered on the connection: uvicorn parses the request, no ASGI cycle runs.

Every DIDComm message over HTTP is a POST /. Around each one the ASGI path built a scope,
receive and send message dicts, a Starlette Response, the guard's send wrapper and body
timer, an async body generator, and wrote the answer in two writes: on this machine
uvicorn alone cost 73 µs of CPU per request with a bare ASGI app against 33 µs for the
same parser on a plain protocol (docs/performance.md, "POST / on the connection").
`DirectPost.serve` runs the same checks in the same order from the same code
(GuardMiddleware.admit and record, BodyClock, DIDCommEndpoints.reply) on uvicorn's own
request cycle (its parsed headers, buffered body, keep-alive, pipelining and shutdown
stay uvicorn's), and writes the answer at once. Every other route, WebSockets, and any
ASGI host (the in-process test tier) keep the ASGI path; both give the same answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import structlog
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from dovecote.errors import Unavailable
from dovecote.web.guard import BodyClock, GuardMiddleware, request_id_for
from dovecote.web.responses import Reply, check_declared, error_reply, too_large

log = structlog.get_logger("dovecote.server")

ReplyFor = Callable[
    [list[tuple[bytes, bytes]], Callable[[str | None, int], Awaitable[bytes]], str],
    Awaitable[Reply],
]
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
SERVER_ERROR = Reply(500, b"Internal Server Error", "text/plain; charset=utf-8")
# A request still running when SHUTDOWN_TIMEOUT ends (uvicorn cancels it): come back
# (to another instance) rather than uvicorn's 500 on the ASGI path.
CANCELLED = error_reply(Unavailable("shut down before this request was answered"), retry_after=1)


def _response_done() -> None:
    """The cycle's on_response once answered: uvicorn's run_asgi does the same, which
    breaks the cycle <-> protocol reference loop (else both, and the body, wait for a
    full collection, which gc.freeze makes rare)."""


async def _keep_scope(scope: Scope, receive: Receive, send: Send) -> None:
    """The app behind the proxy-headers middleware here: it only rewrites the scope."""


async def _nothing() -> Message:
    return {"type": "http.disconnect"}


async def _drop(message: Message) -> None:
    pass


class DirectPost:
    """POST / on uvicorn's request cycle (see the module docstring)."""

    def __init__(
        self, guard: GuardMiddleware, reply: ReplyFor, trusted_proxies: list[str] | None = None
    ) -> None:
        self.guard = guard
        self.reply = reply
        # As uvicorn's proxy_headers does for ASGI: the client address from X-Forwarded-For
        # only when the peer is a trusted proxy (the per-address rate limit keys on it).
        # (uvicorn's own ASGI types are stricter than Starlette's, which these use.)
        self.proxy: Any = (
            ProxyHeadersMiddleware(cast(Any, _keep_scope), trusted_hosts=trusted_proxies)
            if trusted_proxies
            else None
        )

    def wants(self, scope: Any) -> bool:
        return bool(scope["path"] == "/" and scope["method"] == "POST")

    async def serve(self, cycle: RequestResponseCycle) -> None:
        """Answer the request of `cycle`, as GuardMiddleware + DIDCommEndpoints.post would."""
        scope: Any = cycle.scope
        if self.proxy is not None:
            await self.proxy(scope, _nothing, _drop)
        request_id = request_id_for(scope)
        started = time.perf_counter()
        status = 500
        guard = self.guard
        clock = BodyClock(guard.body_read_timeout, guard.body_min_rate)
        try:
            refused = guard.admit(scope, "POST")
            if refused is not None:
                answer = error_reply(refused, request_id, retry_after=1)
            else:
                try:
                    answer = await self.reply(
                        scope["headers"], partial(self._read, cycle, clock), request_id
                    )
                finally:
                    guard.requests.release()
            status = answer.status
            if cycle.flow.write_paused and not cycle.disconnected:
                await cycle.flow.drain()
            self._write(cycle, answer, request_id, close=clock.timed_out)
        except asyncio.CancelledError:
            status = 503
            if not cycle.response_started:
                self._write(cycle, CANCELLED, request_id, close=True)
            raise
        except Exception:
            # As uvicorn's run_asgi: the traceback in the log, a 500 if nothing went out.
            log.exception("http.request_failed", route="/", request_id=request_id)
            status = 500
            if not cycle.response_started:
                self._write(cycle, SERVER_ERROR, request_id, close=True)
            elif not cycle.response_complete:
                cycle.transport.close()
        finally:
            # Nothing of this request outlives its answer: uvicorn's receive() empties the
            # body as it hands it over; a kept-alive connection would hold it until its
            # next request (up to MAX_BODY_BYTES each, tests/integration/test_direct_post.py).
            cycle.body = bytearray()
            cycle.on_response = _response_done
            guard.record("/", "POST", str(status), started, request_id)

    @staticmethod
    async def _read(
        cycle: RequestResponseCycle, clock: BodyClock, declared: str | None, limit: int
    ) -> bytes:
        """The body uvicorn buffers in `cycle`, under the body deadline and `limit`."""
        check_declared(declared, limit)
        if cycle.more_body and cycle.waiting_for_100_continue:
            if not cycle.transport.is_closing():
                cycle.transport.write(CONTINUE)
            cycle.waiting_for_100_continue = False
        while cycle.more_body and not cycle.disconnected:
            clock.received = len(cycle.body)
            if clock.received > limit:
                raise too_large(limit)
            # uvicorn pauses reading past 64 KiB buffered; its receive() resumes it.
            cycle.flow.resume_reading()
            now = time.monotonic()
            deadline = clock.deadline(now)
            try:
                async with asyncio.timeout(max(0.0, deadline - now)):
                    await cycle.message_event.wait()
            except TimeoutError:
                raise clock.late(now, deadline) from None
            cycle.message_event.clear()
        if cycle.disconnected:
            raise ClientDisconnect
        body, cycle.body = cycle.body, bytearray()
        if len(body) > limit:
            raise too_large(limit)
        return bytes(body)

    @staticmethod
    def _write(cycle: RequestResponseCycle, answer: Reply, request_id: str, close: bool) -> None:
        """Write the whole answer at once and complete the cycle as uvicorn's send does."""
        if cycle.disconnected:
            return
        if close:
            # The rest of a too slow body is not worth waiting for.
            cycle.keep_alive = False
        parts = [STATUS_LINE[answer.status]]
        for name, value in cycle.default_headers:
            parts += [name, b": ", value, b"\r\n"]
        for header, text in answer.headers:
            parts.append(f"{header.lower()}: {text}\r\n".encode("latin-1"))
        parts.append(b"content-length: %d\r\n" % len(answer.body))
        if answer.media_type:
            parts += [b"content-type: ", answer.media_type.encode("latin-1"), b"\r\n"]
        parts += [b"x-request-id: ", request_id.encode(), b"\r\n"]
        if not cycle.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += [b"\r\n", answer.body]
        cycle.response_started = True
        cycle.transport.write(b"".join(parts))
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()
