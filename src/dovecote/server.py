"""Wiring and lifecycle: build the parts, serve them over ASGI, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from dovecote import __version__, console
from dovecote.delivery.breaker import Breakers
from dovecote.delivery.live import LiveRegistry
from dovecote.delivery.outbox import OutboxWorkers
from dovecote.didcomm import identity as identity_mod
from dovecote.didcomm.dispatch import Mediator
from dovecote.didcomm.endpoints import Endpoints
from dovecote.didcomm.messages import Context
from dovecote.didcomm.packing import Packer
from dovecote.errors import DovecoteError, Overloaded, RateLimited, RequestTimeout
from dovecote.files import private_dir
from dovecote.ops import admin, backup_schedule, metrics, status
from dovecote.ops.health import Degradation, HealthMonitor
from dovecote.ops.lock import DataDirLock
from dovecote.ops.settings import Settings
from dovecote.rooms import Rooms
from dovecote.rooms import routes as rooms_routes
from dovecote.store import Store, open_store
from dovecote.store.base import InstanceInfo
from dovecote.transport import http as http_routes
from dovecote.transport import invitation as invitation_routes
from dovecote.transport.connections import GuardedProtocol, PeerConnections, guarded_protocol
from dovecote.transport.invitation_v1 import invitation_v1
from dovecote.transport.limits import InFlight, TokenBuckets, retry_after_header
from dovecote.transport.tls import PeerCertProtocol, ServerTLS
from dovecote.transport.websocket import (
    CLOSE_RESTART,
    CLOSE_TRY_AGAIN,
    refuse_websocket,
    websocket_endpoint,
)
from dovecote.util.kinds import DeadLetterKind, OutboxKind

log = structlog.get_logger("dovecote.server")

SAMPLE_INTERVAL = 5.0
METRIC_HISTORY_SECONDS = 300.0
MIN_OUTBOX_GRACE = 0.5
# An instance that missed this many heartbeats is reported dead.
MISSED_BEATS_DEAD = 3
# The level an instance reports as its last heartbeat when it shuts down cleanly.
STOPPED = "stopped"


# Rooms API path shapes (segments after /v1/rooms, "*" = one id) -> route template.
ROOMS_TEMPLATES = {
    (): "/v1/rooms",
    ("ws",): "/v1/rooms/ws",
    ("*",): "/v1/rooms/{room}",
    ("*", "participants"): "/v1/rooms/{room}/participants",
    ("*", "participants", "*"): "/v1/rooms/{room}/participants/{participant}",
    ("*", "messages"): "/v1/rooms/{room}/messages",
    ("*", "messages", "*"): "/v1/rooms/{room}/messages/{message}",
    (
        "*",
        "messages",
        "*",
        "reactions",
        "*",
    ): "/v1/rooms/{room}/messages/{message}/reactions/{emoji}",
    ("*", "events"): "/v1/rooms/{room}/events",
}
ROOMS_FIXED = {"participants", "messages", "reactions", "events"}


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
    for prefix in (
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
    ):
        if path == prefix or path.startswith(prefix + "/"):
            return prefix
    return "other"


class Dovecote:
    """Every long-lived part of one instance."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        # The disk check and backups look at the data dir even when the store is remote.
        private_dir(settings.data_dir)
        self.instance_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.started_at = time.time()
        # Only passed when set: the cap is SQLite's (PRAGMA max_page_count).
        size_cap: dict[str, object] = (
            {"max_page_count": settings.store_max_pages} if settings.store_max_pages else {}
        )
        if settings.store_patroni:  # PostgreSQL only: the nodes' Patroni REST URLs
            size_cap["patroni"] = settings.store_patroni
        self.store = store or open_store(
            settings.store_url,
            timeout=settings.store_timeout,
            group_commit_max=settings.group_commit_max,
            pool_size=settings.store_pool_size,
            **size_cap,
        )
        forced = None if settings.degradation == "auto" else settings.degradation
        self.degradation = Degradation(forced)
        self.identity = identity_mod.load_or_create(
            settings.identity_path, [settings.base_url, settings.ws_url]
        )
        self.packer = Packer(
            self.identity,
            max_did_bytes=settings.max_did_bytes,
            max_json_depth=settings.max_json_depth,
            max_id_bytes=settings.max_message_id_bytes,
            cache_bytes=settings.resolver_cache_bytes,
        )
        self.live = LiveRegistry(self.store, batch=settings.live_push_batch)
        self.rooms = Rooms(settings, self.store)
        self.breakers = Breakers(
            settings.breaker_threshold, settings.breaker_reset, settings.breaker_trials
        )
        self.outbox = OutboxWorkers(self.store, settings, self.instance_id, self.breakers)
        self.ctx = Context(
            settings,
            self.store,
            self.identity,
            self.live,
            self.degradation,
            endpoints=Endpoints(self.packer, settings),
            wake_outbox=self.outbox.wake,
        )
        self.mediator = Mediator(self.ctx, self.packer)
        self.health = HealthMonitor(
            self.store,
            self.degradation,
            settings.data_dir,
            settings.min_free_disk_bytes,
            self.instance_id,
        )
        self.requests = InFlight(settings.max_concurrent_requests)
        self.ws_slots = InFlight(settings.max_websockets)
        self.ip_limits = TokenBuckets(
            settings.rate_limit_ip,
            settings.rate_limit_ip_burst,
            settings.rate_limit_memory_bytes,
            name="ip",
        )
        # Open TCP connections per peer address (counted by the HTTP protocol) and open
        # WebSockets per client address (behind a trusted proxy: the forwarded address).
        self.peers = PeerConnections(
            settings.max_connections_per_ip,
            settings.max_websockets_per_ip,
            settings.ws_handshake_rate_ip,
            settings.ws_handshake_burst_ip,
            settings.trusted_proxies,
            settings.rate_limit_memory_bytes,
        )
        self.ws_per_ip: dict[str, int] = {}
        self.sockets: dict[str, WebSocket] = {}
        self.metric_history: deque[status.Scrape] = deque(
            maxlen=int(METRIC_HISTORY_SECONDS / SAMPLE_INTERVAL) + 2
        )
        self._tasks: list[asyncio.Task[Any]] = []
        self._drain_started: float | None = None
        self.store.add_listener(self.live.notify)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.store.open()
        await self._report_recipient_conflicts()
        await self.packer.start()
        await self.health.run_checks()
        await self.rooms.start()
        await self.outbox.start()
        self._tasks = [
            asyncio.create_task(self.health.run(), name="health"),
            asyncio.create_task(self._sweep(), name="sweep"),
            asyncio.create_task(self._sample(), name="sample"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        ]
        if backups := backup_schedule.from_settings(self.settings, self.store.engine):
            self._tasks.append(asyncio.create_task(backups.run(), name="backup"))
        log.info(
            "dovecote.started",
            did=self.identity.did,
            url=self.settings.base_url,
            store=self.store.engine,
            instance=self.instance_id,
            version=__version__,
        )

    async def _report_recipient_conflicts(self) -> None:
        """Warn while registrations refused by the one-owner-per-identity migration remain."""
        conflicts = await self.store.recipient_conflicts()
        if conflicts:
            log.warning(
                "recipients.conflicts",
                count=len(conflicts),
                queued=sum(c.queued for c in conflicts),
                hint="dovecote recipients conflicts",
            )

    def begin_drain(self) -> None:
        """First step of shutdown: not ready, refuse new work, tell sockets to reconnect.

        Never blocks: it only flips flags and schedules the WebSocket closes.
        """
        if self.degradation.draining:
            return
        self.degradation.draining = True
        self._drain_started = time.monotonic()
        metrics.READY.set(0)
        # In-flight sends go on; nothing new is leased (another instance, or this one
        # after its restart, takes the rest).
        self.outbox.stop_leasing()
        log.info("dovecote.draining", sockets=len(self.sockets), requests=self.requests.current)
        for ws in list(self.sockets.values()):
            task = asyncio.ensure_future(
                ws.close(code=CLOSE_RESTART, reason="server restarting; reconnect")
            )
            task.add_done_callback(lambda t: t.exception())

    async def stop(self) -> None:
        self.begin_drain()
        # Outbound sends had the HTTP drain to finish; what is left of the shutdown budget
        # is theirs, then their leases are released so no item waits for a lease to expire.
        started = self._drain_started or time.monotonic()
        remaining = started + self.settings.shutdown_timeout - time.monotonic()
        await self.outbox.stop(max(MIN_OUTBOX_GRACE, remaining))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.rooms.stop()
        # A clean exit says so in the cluster view: "stopped" is not a dead instance.
        with contextlib.suppress(Exception):
            await self.store.heartbeat(self._instance_info(STOPPED))
        # Pending writes commit before the store closes: nothing accepted is dropped.
        await self.store.close()
        log.info("dovecote.stopped")

    # ------------------------------------------------------------------ background work
    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                now = time.time()
                moved = await self.store.expire(now, now - self.settings.dedup_window)
                if moved:
                    metrics.EXPIRED.inc(moved)
                    metrics.DEAD_LETTERED.labels(DeadLetterKind.MAILBOX).inc(moved)
                    log.info("sweep.expired", count=moved)
            except DovecoteError as exc:
                log.warning("sweep.failed", error=exc.detail)

    async def _sample(self) -> None:
        while True:
            try:
                stats = await self.store.queue_stats()
                now = time.time()
                metrics.QUEUE_DEPTH.set(stats.queued)
                metrics.QUEUE_OLDEST.set(
                    now - stats.oldest_received_at if stats.oldest_received_at else 0
                )
                lag = 0.0
                for kind in OutboxKind:
                    metrics.OUTBOX_SIZE.labels(kind).set(stats.outbox.get(kind, 0))
                    due = stats.outbox_oldest_due.get(kind)
                    kind_lag = max(0.0, now - due) if due else 0.0
                    metrics.OUTBOX_LAG.labels(kind).set(kind_lag)
                    lag = max(lag, kind_lag)
                metrics.DLQ_SIZE.set(stats.dead_letters)
                self.health.extra.update(
                    breakers=self.breakers.snapshot(),
                    queue_depth=stats.queued,
                    outbox=stats.outbox,
                    outbox_lag=round(lag, 3),
                    dead_letters=stats.dead_letters,
                    live_sessions=self.live.connections,
                    websockets=len(self.sockets),
                )
                # What /metrics shows, kept for the console's rates of the last minutes.
                self.metric_history.append(
                    status.Scrape(time.time(), {}, metrics.samples(status.SAMPLED))
                )
            except Exception as exc:  # sampling must never stop
                log.debug("sample.failed", error=str(exc)[:200])
            await asyncio.sleep(SAMPLE_INTERVAL)

    def _instance_info(self, level: str) -> InstanceInfo:
        return InstanceInfo(
            id=self.instance_id,
            host=socket.gethostname(),
            version=__version__,
            started_at=self.started_at,
            last_beat=time.time(),
            level=level,
            connections=len(self.sockets),
        )

    async def _heartbeat(self) -> None:
        while True:
            try:
                level = "draining" if self.degradation.draining else self.degradation.level
                await self.store.heartbeat(self._instance_info(level))
                view = await self.cluster_view()
                metrics.CLUSTER_INSTANCES.labels("alive").set(sum(i["alive"] for i in view))
                # Dead = stopped beating without saying goodbye (recently enough to matter).
                metrics.CLUSTER_INSTANCES.labels("dead").set(
                    sum(1 for i in view if i["state"] == "dead" and i["recent"])
                )
            except Exception as exc:
                log.debug("heartbeat.failed", error=str(exc)[:200])
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def cluster_view(self) -> list[dict[str, Any]]:
        now = time.time()
        limit = MISSED_BEATS_DEAD * self.settings.heartbeat_interval
        return [
            {
                "id": i.id,
                "host": i.host,
                "version": i.version,
                "started_at": i.started_at,
                "last_beat": i.last_beat,
                "level": i.level,
                "connections": i.connections,
                "alive": i.level != STOPPED and now - i.last_beat < limit,
                "state": (
                    "stopped"
                    if i.level == STOPPED
                    else "alive"
                    if now - i.last_beat < limit
                    else "dead"
                ),
                "recent": now - i.last_beat < 3600,
                "self": i.id == self.instance_id,
            }
            for i in await self.store.instances()
        ]

    def count_bad_input(self, exc: DovecoteError, transport: str, request_id: str = "") -> None:
        metrics.BAD_INPUT.labels(exc.code, transport).inc()
        log.info(
            "request.rejected",
            code=exc.code,
            detail=exc.detail,
            transport=transport,
            request_id=request_id,
        )


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


class GuardMiddleware:
    """Request id, RED metrics, concurrency limit, per-IP rate limit, access log."""

    def __init__(self, app: ASGIApp, dovecote: Dovecote) -> None:
        self.app = app
        self.dc = dovecote

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        dc = self.dc
        path = scope["path"]
        route = route_label(path)
        method = scope["method"]
        headers = dict(scope.get("headers") or [])
        # A client's id is echoed in bodies, headers and logs: only plain tokens are kept
        # (bytes that are not UTF-8 used to end in a 500 here).
        given = headers.get(b"x-request-id", b"")[:64]
        request_id = given.decode() if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_holder = {"status": 500}
        body = _BodyDeadline(receive, dc.settings.body_read_timeout, dc.settings.body_min_rate)
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
            body = exc.to_json() | {"request_id": request_id}
            response = JSONResponse(
                body,
                status_code=exc.status,
                headers={"Retry-After": retry_after_header(exc.retry_after or 1)},
            )
            await response(scope, receive, send_wrapper)

        try:
            exempt = route in (
                "/health/live",
                "/health/ready",
                "/health",
                "/metrics",
                "/admin",
                "/console",
            )
            client = self._client_ip(scope, headers)
            if not exempt:
                wait = dc.ip_limits.take(client)
                if wait:
                    await refuse(RateLimited("rate limit per client address", retry_after=wait))
                    return
                if dc.degradation.draining and method == "POST":
                    await refuse(Overloaded("shutting down", retry_after=1))
                    return
            if exempt:
                await self.app(scope, receive, send_wrapper)
            elif not dc.requests.try_acquire():
                await refuse(Overloaded("too many requests in flight", retry_after=1))
            else:
                try:
                    await self.app(scope, receive, send_wrapper)
                finally:
                    dc.requests.release()
        except RequestTimeout as exc:
            # A route that let the body deadline through: answer it here.
            if not body.responded:
                await refuse(exc)
        finally:
            elapsed = time.perf_counter() - started
            status = str(status_holder["status"])
            metrics.HTTP_REQUESTS.labels(route, method, status).inc()
            metrics.HTTP_DURATION.labels(route, method).observe(elapsed)
            if dc.settings.access_log:
                log.info(
                    "http.request",
                    method=method,
                    route=route,
                    status=status,
                    seconds=round(elapsed, 4),
                    request_id=request_id,
                )

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handshakes count against the per-IP rate limit; open sockets per IP are capped."""
        dc = self.dc
        client = self._client_ip(scope, {})
        endpoint = "rooms" if route_label(scope["path"]) == "/v1/rooms/ws" else "ws"
        limit = ""
        if dc.ip_limits.take(client):
            limit = "websocket_rate"
        elif dc.ws_per_ip.get(client, 0) >= dc.settings.max_websockets_per_ip:
            limit = "websockets_per_ip"
        if limit:
            metrics.LIMIT_REFUSALS.labels(limit).inc()
            metrics.WS_DISCONNECTS.labels(endpoint, str(CLOSE_TRY_AGAIN)).inc()
            await refuse_websocket(
                receive,
                send,
                CLOSE_TRY_AGAIN,
                "too many sockets or handshakes from this address; retry later",
            )
            return
        dc.ws_per_ip[client] = dc.ws_per_ip.get(client, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            left = dc.ws_per_ip.get(client, 1) - 1
            if left <= 0:
                dc.ws_per_ip.pop(client, None)
            else:
                dc.ws_per_ip[client] = left

    def _client_ip(self, scope: Scope, headers: dict[bytes, bytes]) -> str:
        # Behind a proxy in TRUSTED_PROXIES, uvicorn's proxy-headers middleware has already
        # replaced the peer with the last untrusted X-Forwarded-For entry (see run()); from
        # anyone else the header is ignored, so it cannot be used to dodge the rate limit.
        return str((scope.get("client") or ("", 0))[0])


class _BodyDeadline:
    """Times the request body (uvicorn has no body read timeout).

    Each chunk must come within `gap` seconds of the previous one, and after the first
    `gap` seconds the body must average `min_rate` bytes/s: a client sending a byte every
    few seconds holds its request slot for `gap` seconds, not for as long as it likes.
    Past either, `receive` raises RequestTimeout (408). Once the body is complete, receive
    is not timed (Starlette waits on it for the disconnect).
    """

    def __init__(self, receive: Receive, gap: float, min_rate: int) -> None:
        self._receive = receive
        self.gap = gap
        self.min_rate = min_rate
        self.started = time.monotonic()
        self.received = 0
        self.complete = False
        self.timed_out = False
        self.responded = False

    async def receive(self) -> Message:
        if self.complete:
            return await self._receive()
        now = time.monotonic()
        deadline = min(now + self.gap, self.started + self.gap + self.received / self.min_rate)
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, deadline - now))
        except TimeoutError:
            self.timed_out = True
            idle = now + self.gap <= deadline
            metrics.LIMIT_REFUSALS.labels("body_timeout" if idle else "body_rate").inc()
            raise RequestTimeout(
                "request body not received in time" if idle else "request body arrives too slowly"
            ) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:
            self.complete = True
        return message


async def health_live(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def health_ready(request: Request) -> Response:
    dc: Dovecote = request.app.state.dovecote
    ready = dc.health.ready
    store = dc.health.results.get("store") if dc.health.results else None
    # Only whether the store answers: its error text can name hosts (see /health details).
    body = {
        "ready": ready,
        "draining": dc.degradation.draining,
        "degradation": dc.degradation.level,
        "store": {"ok": store.ok} if store else None,
    }
    return JSONResponse(
        body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"}
    )


async def health_full(request: Request) -> Response:
    """Status and level for anyone; the details (targets, hosts, queues) with the admin token."""
    dc: Dovecote = request.app.state.dovecote
    summary = dc.health.summary()
    code = 200 if summary["ready"] else 503
    if "authorization" in request.headers and dc.settings.admin_token:
        if (denied := admin.check_token(request)) is not None:
            return denied
        return JSONResponse(summary, status_code=code)
    return JSONResponse(
        {"status": summary["status"], "degradation": summary["degradation"]}, status_code=code
    )


async def metrics_endpoint(request: Request) -> Response:
    if dc_allow := request.app.state.dovecote.settings.metrics_allow:
        client = request.client.host if request.client else ""
        if not admin.address_allowed(client, dc_allow):
            metrics.METRICS_FORBIDDEN.inc()
            return JSONResponse(
                {"error": "metrics_forbidden", "detail": "client address not in METRICS_ALLOW"},
                status_code=403,
            )
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def build_app(dovecote: Dovecote) -> Starlette:
    """The ASGI application for one instance."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await dovecote.start()
        try:
            yield
        finally:
            await dovecote.stop()

    routes = [
        Route("/", http_routes.post_message, methods=["POST"]),
        Route("/", invitation_routes.root, methods=["GET"]),
        WebSocketRoute("/ws", websocket_endpoint),
        Route("/invitation", invitation_routes.invitation, methods=["GET"]),
        Route("/oob", invitation_routes.oob, methods=["GET"]),
        Route("/invitation/v1", invitation_v1, methods=["GET"]),
        Route("/health/live", health_live, methods=["GET"]),
        Route("/health/ready", health_ready, methods=["GET"]),
        Route("/health", health_full, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *admin.ROUTES,
        *console.routes(),
        *rooms_routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.dovecote = dovecote
    app.add_middleware(GuardMiddleware, dovecote=dovecote)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server with our shutdown phases in front of its own.

    1. First SIGTERM/SIGINT: drain at once (not ready, new POSTs 503, WebSockets closed
       with 1012, no new outbox leases) but keep listening for DRAIN_DELAY seconds, so
       load balancers see the instance leave before its port starts refusing.
    2. Then uvicorn's shutdown: stop listening, let in-flight requests finish for up to
       SHUTDOWN_TIMEOUT seconds, then the lifespan shutdown (`Dovecote.stop`: finish or
       abandon outbound sends, release leases, commit pending writes, close the store).
    A second signal skips the delay; a third forces the exit.
    """

    dovecote: Dovecote | None = None
    banner: Callable[[], None] | None = None
    _exit_at: float | None = None
    _exit_signal: int = signal.SIGTERM
    _loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        # Only now is the port bound: a banner before this could name a port in use.
        if self.started and self.banner is not None:
            self.banner()

    def handle_exit(self, sig: int, frame: Any) -> None:
        dc = self.dovecote
        if dc is None or self.should_exit:
            if self.should_exit:
                self.force_exit = True
            super().handle_exit(sig, frame)
            return
        if self._exit_at is not None:  # second signal: no more waiting
            super().handle_exit(sig, frame)
            return
        # Signal handlers run between bytecodes of the loop's thread: hand the drain
        # to the loop instead of touching asyncio state from here.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(dc.begin_drain)
        else:
            dc.begin_drain()
        self._exit_signal = sig
        self._exit_at = time.monotonic() + dc.settings.drain_delay
        if dc.settings.drain_delay <= 0:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if (
            self._exit_at is not None
            and not self.should_exit
            and (time.monotonic() >= self._exit_at)
        ):
            super().handle_exit(self._exit_signal, None)
        return await super().on_tick(counter)


def _banner(settings: Settings, identity: identity_mod.Identity) -> None:
    base = settings.base_url
    print(f"Dovecote {__version__} mediator ({settings.workers} worker(s)) listening", flush=True)
    print(f"  DID:        {identity.did}", flush=True)
    print(
        f"  Invitation: {invitation_routes.short_url(base)}   (QR: {base}/invitation?format=svg,"
        f" page: {base}/)",
        flush=True,
    )
    print(f"  HTTP:       {base}/   WebSocket: {settings.ws_url}", flush=True)
    print(
        f"  Health:     {settings.base_url}/health   Metrics: {settings.base_url}/metrics",
        flush=True,
    )


def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT (first drains, second forces); SIGHUP reloads TLS files."""
    if settings.workers > 1:
        from dovecote.workers import run_workers

        run_workers(settings)
        return
    # One process owns a SQLite data directory; `dovecote restore` checks this lock.
    lock = DataDirLock(settings.data_dir)
    if settings.store_url.startswith("sqlite:"):
        lock.acquire("serve")
    try:
        dovecote = Dovecote(settings)
        serve_worker(settings, dovecote, banner=lambda: _banner(settings, dovecote.identity))
    finally:
        lock.release()


def serve_worker(
    settings: Settings,
    dovecote: Dovecote,
    sockets: list[socket.socket] | None = None,
    banner: Callable[[], None] | None = None,
) -> None:
    """Run one server process (the only one, or one of several sharing `sockets`)."""
    tls = (
        ServerTLS(settings.tls_cert, settings.tls_key, settings.admin_client_ca)
        if settings.tls_cert and settings.tls_key
        else None
    )
    protocol = guarded_protocol(
        PeerCertProtocol if tls else GuardedProtocol,
        dovecote.peers,
        settings.header_timeout,
        settings.max_header_line_bytes,
        settings.max_header_bytes,
    )
    config = uvicorn.Config(
        build_app(dovecote),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.shutdown_timeout),
        # Our own SSLContext, kept so SIGHUP can load new files into it (transport/tls.py).
        ssl_context_factory=tls.uvicorn_factory if tls else None,
        # httptools with connection limits, header deadline and sizes (connections.py).
        http=protocol,
        # Proxy headers only from TRUSTED_PROXIES (uvicorn alone would trust 127.0.0.1).
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
        ws_max_size=settings.max_body_bytes + 1024,
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_timeout,
        ws_per_message_deflate=settings.ws_per_message_deflate,
        server_header=False,
    )
    server = _Server(config)
    server.dovecote = dovecote
    server.banner = banner

    def reload(sig: int, frame: Any) -> None:
        if tls is None:
            log.info("tls.reload_skipped", reason="no TLS_CERT configured")
        else:
            tls.reload()

    # SIGHUP's default action ends the process; here it only reloads the TLS files.
    signal.signal(signal.SIGHUP, reload)
    server.run(sockets=sockets)
