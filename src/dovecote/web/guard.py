"""GuardMiddleware: request id, RED metrics, in-flight and per-address limits, body deadline.

Every HTTP request passes it before routing. WebSockets pass untouched: their admission
is `web/admission.py`'s.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dovecote.errors import DovecoteError, Overloaded, RateLimited, RequestTimeout
from dovecote.ops import metrics
from dovecote.util.limits import InFlight, TokenBuckets
from dovecote.web.responses import error_response
from dovecote.web.rooms import ROOMS_PATHS

log = structlog.get_logger("dovecote.server")

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
# Methods come from clients: past this many label sets, children are not cached.
MAX_METRIC_KEYS = 1024
# Routes that neither count against the limits nor close while draining: operators and
# probes must reach an instance that refuses traffic.
EXEMPT = ("/health/live", "/health/ready", "/health", "/metrics", "/admin", "/console")
PREFIXES = (
    "/ws",
    "/invitation",
    "/oob",
    "/health/live",
    "/health/ready",
    "/health",
    "/metrics",
    "/admin",
    "/console",
    "/v1/rooms/ws",
    "/v1/rooms",
    "/openapi.json",
    "/docs",
)


def _shape(template: str) -> tuple[str, ...]:
    parts = template.removeprefix("/v1/rooms").split("/")
    return tuple("*" if p.startswith("{") else p for p in parts if p)


# Rooms path shapes (segments after /v1/rooms, "*" = one id) -> route template, from the
# table that also drives the rooms routes and the OpenAPI document.
ROOMS_TEMPLATES = {_shape(t): t for t in ("/v1/rooms/ws", *ROOMS_PATHS)}
ROOMS_FIXED = {p for shape in ROOMS_TEMPLATES for p in shape if p != "*"}


def rooms_route_label(path: str) -> str:
    """The rooms route template of `path` (ids replaced), or /v1/rooms/other."""
    parts = [p for p in path.removeprefix("/v1/rooms").split("/") if p]
    if parts == ["ws"]:
        return "/v1/rooms/ws"
    shape = tuple(p if i % 2 == 1 and p in ROOMS_FIXED else "*" for i, p in enumerate(parts))
    return ROOMS_TEMPLATES.get(shape, "/v1/rooms/other")


def route_label(path: str) -> str:
    """A bounded route label for metrics (never the raw path)."""
    if path == "/":
        return "/"
    if path == "/v1/rooms" or path.startswith("/v1/rooms/"):
        return rooms_route_label(path)
    for prefix in PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return prefix
    return "other"


class GuardMiddleware:
    """Request id, RED metrics, concurrency limit, per-IP rate limit, access log."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        requests: InFlight,
        ip_limits: TokenBuckets,
        draining: Callable[[], bool],
        body_read_timeout: float,
        body_min_rate: int,
        access_log: bool,
    ) -> None:
        self.app = app
        self.requests = requests
        self.ip_limits = ip_limits
        self.draining = draining
        self.body_read_timeout = body_read_timeout
        self.body_min_rate = body_min_rate
        self.access_log = access_log
        # Metric children by labels (prometheus_client's labels() takes a lock and
        # validates on each call); the labels are bounded (route_label).
        self._counted: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope["path"])
        method = scope["method"]
        request_id = request_id_for(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_holder = {"status": 500}
        body = BodyDeadline(receive, self.body_read_timeout, self.body_min_rate)
        receive = body.receive

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
                body.responded = True
                if body.timed_out:
                    # The rest of a too slow body is not worth waiting for.
                    message["headers"].append((b"connection", b"close"))
            await send(message)

        async def refuse(exc: DovecoteError) -> None:
            await error_response(exc, request_id, retry_after=1)(scope, receive, send_wrapper)

        try:
            if route in EXEMPT:
                await self.app(scope, receive, send_wrapper)
            elif (refused := self.admit(scope, method)) is not None:
                await refuse(refused)
            else:
                try:
                    await self.app(scope, receive, send_wrapper)
                finally:
                    self.requests.release()
        except RequestTimeout as exc:
            # A route that let the body deadline through: answer it here.
            if not body.responded:
                await refuse(exc)
        finally:
            self.record(route, method, str(status_holder["status"]), started, request_id)

    def admit(self, scope: Scope, method: str) -> DovecoteError | None:
        """Why a request that counts against the limits is refused, or None: then it holds
        one of the in-flight slots, which the caller releases (`requests.release`)."""
        refused = self._refusal(scope, method)
        if refused is None and not self.requests.try_acquire():
            refused = Overloaded("too many requests in flight", retry_after=1)
        return refused

    def _refusal(self, scope: Scope, method: str) -> DovecoteError | None:
        """Why a request that counts against the limits is refused before routing, if it is."""
        # Behind a proxy in TRUSTED_PROXIES, uvicorn's proxy-headers middleware has already
        # replaced the peer with the last untrusted X-Forwarded-For entry; from anyone
        # else the header is ignored, so it cannot dodge the rate limit.
        client = str((scope.get("client") or ("", 0))[0])
        if wait := self.ip_limits.take(client):
            return RateLimited("rate limit per client address", retry_after=wait)
        if self.draining() and method == "POST":
            return Overloaded("shutting down", retry_after=1)
        return None

    def record(self, route: str, method: str, status: str, started: float, request_id: str) -> None:
        """The request's RED metrics and, with ACCESS_LOG, its access log line."""
        elapsed = time.perf_counter() - started
        key = (route, method, status)
        children = self._counted.get(key)
        if children is None:
            children = (
                metrics.HTTP_REQUESTS.labels(route, method, status),
                metrics.HTTP_DURATION.labels(route, method),
            )
            if len(self._counted) < MAX_METRIC_KEYS:
                self._counted[key] = children
        children[0].inc()
        children[1].observe(elapsed)
        if self.access_log:
            log.info(
                "http.request",
                method=method,
                route=route,
                status=status,
                seconds=round(elapsed, 4),
                request_id=request_id,
            )


def request_id_for(scope: Scope) -> str:
    """The client's X-Request-Id when it is a plain token, else a new one.

    It is echoed in bodies, headers and logs: only plain tokens are kept (bytes that are
    not UTF-8 used to end in a 500 here)."""
    given = dict(scope.get("headers") or []).get(b"x-request-id", b"")[:64]
    return given.decode() if _REQUEST_ID.fullmatch(given) else os.urandom(8).hex()


class BodyClock:
    """The body deadline (uvicorn has no body read timeout), apart from how the body is
    received: BodyDeadline below on the ASGI path, web/direct.py on the direct one.

    Each chunk must come within `gap` seconds of the previous one, and after the first
    `gap` seconds the body must average `min_rate` bytes/s: a client sending a byte every
    few seconds holds its request slot for `gap` seconds, not for as long as it likes.
    Past either: RequestTimeout (408).
    """

    def __init__(self, gap: float, min_rate: int) -> None:
        self.gap = gap
        self.min_rate = min_rate
        self.started = time.monotonic()
        self.received = 0
        self.timed_out = False

    def deadline(self, now: float) -> float:
        """When the next chunk is due at the latest."""
        return min(now + self.gap, self.started + self.gap + self.received / self.min_rate)

    def late(self, now: float, deadline: float) -> RequestTimeout:
        """The refusal of a body that missed `deadline` (set at `now`), counted."""
        self.timed_out = True
        idle = now + self.gap <= deadline
        metrics.LIMIT_REFUSALS.labels("body_timeout" if idle else "body_rate").inc()
        return RequestTimeout(
            "request body not received in time" if idle else "request body arrives too slowly"
        )


class BodyDeadline(BodyClock):
    """`receive` under the body deadline. Once the body is complete, receive is not timed
    (Starlette waits on it for the disconnect)."""

    def __init__(self, receive: Receive, gap: float, min_rate: int) -> None:
        super().__init__(gap, min_rate)
        self._receive = receive
        self.complete = False
        self.responded = False

    async def receive(self) -> Message:
        if self.complete:
            return await self._receive()
        now = time.monotonic()
        deadline = self.deadline(now)
        try:
            # A timer in this task, not wait_for's task per call (3.11): a body already
            # buffered by uvicorn is handed over without suspending.
            async with asyncio.timeout(max(0.0, deadline - now)):
                message = await self._receive()
        except TimeoutError:
            raise self.late(now, deadline) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:
            self.complete = True
        return message
