"""The composition root: build the parts of one instance, wire them, serve them over ASGI.

Nothing here handles a request or runs a loop of its own: endpoints live in web/, the
background loops in the modules that own their data (ops/health.py, ops/sampler.py,
ops/cluster.py, delivery/expiry.py, delivery/outbox.py, rooms/, ops/backup_schedule.py).
This module decides which part gets which other parts and which settings, and the
lifecycle: start in order, drain on SIGTERM, stop in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog
import uvicorn

from dovecote import __version__
from dovecote.console.session import ConsoleAuth
from dovecote.delivery.breaker import Breakers
from dovecote.delivery.expiry import expire_forever
from dovecote.delivery.live import LiveRegistry
from dovecote.delivery.outbound import Policy
from dovecote.delivery.outbox import OutboxWorkers
from dovecote.delivery.sender import OutboxSettings
from dovecote.didcomm import identity as identity_mod
from dovecote.didcomm.decrypt import DecryptPool
from dovecote.didcomm.dispatch import Mediator
from dovecote.didcomm.endpoints import Endpoints
from dovecote.didcomm.messages import Context, MediatorSettings
from dovecote.didcomm.packing import Packer
from dovecote.files import private_dir
from dovecote.ops import backup_schedule, metrics
from dovecote.ops.admin import MailboxLimits, Operator
from dovecote.ops.cluster import Cluster, new_instance_id
from dovecote.ops.health import Degradation, HealthMonitor
from dovecote.ops.lock import DataDirLock
from dovecote.ops.sampler import Sampler
from dovecote.ops.settings import Settings
from dovecote.rooms import Rooms, RoomsSettings
from dovecote.store import Store, open_store
from dovecote.transport.connections import GuardedProtocol, PeerConnections, guarded_protocol
from dovecote.transport.tls import PeerCertProtocol, ServerTLS
from dovecote.util.limits import InFlight, TokenBuckets
from dovecote.web import app as web_app
from dovecote.web.admin import AdminAPI, AdminAuth
from dovecote.web.admission import WebSockets
from dovecote.web.console import Console
from dovecote.web.didcomm import DIDCommEndpoints
from dovecote.web.health import HealthEndpoints
from dovecote.web.invitation import InvitationPages, short_url
from dovecote.web.rooms import RoomsAPI
from dovecote.web.rooms_ws import RoomsSocket
from dovecote.workers import run_workers

log = structlog.get_logger("dovecote.server")

MIN_OUTBOX_GRACE = 0.5


class Dovecote:
    """Every long-lived part of one instance, built and wired."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        # The disk check and backups look at the data dir even when the store is remote.
        private_dir(settings.data_dir)
        self.instance_id = new_instance_id()
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
            group_commit_wait=settings.group_commit_wait,
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
        # Anoncrypt opened on other cores (the writer, sessions and HTTP stay here).
        self.decrypt: DecryptPool | None = None
        if settings.decrypt_workers:
            self.decrypt = DecryptPool(
                settings.decrypt_workers, self.packer.secret_keys(), self.packer.secret_for
            )
            self.packer.anon_opener = self.decrypt
        self.live = LiveRegistry(
            self.store, batch=settings.live_push_batch, max_push_bytes=settings.max_body_bytes
        )
        self.rooms = Rooms(rooms_settings(settings), self.store)
        self.breakers = Breakers(
            settings.breaker_threshold, settings.breaker_reset, settings.breaker_trials
        )
        self.outbox = OutboxWorkers(
            self.store, OutboxSettings.of(settings), self.instance_id, self.breakers
        )
        self.ctx = Context(
            MediatorSettings.of(settings),
            self.store,
            self.identity,
            self.live,
            self.degradation,
            endpoints=Endpoints(
                self.packer, Policy.from_settings(settings), [settings.base_url, settings.ws_url]
            ),
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
        # Requests in flight (GuardMiddleware) and the per-address budget that HTTP
        # requests, WebSocket handshakes and WebSocket messages share.
        self.requests = InFlight(settings.max_concurrent_requests)
        self.ip_limits = TokenBuckets(
            settings.rate_limit_ip,
            settings.rate_limit_ip_burst,
            settings.rate_limit_memory_bytes,
            on_size=metrics.RATE_LIMIT_BYTES.labels("ip").set,
        )
        # Open TCP connections per peer address (counted by the HTTP protocol, before
        # any proxy header is read).
        self.peers = PeerConnections(
            settings.max_connections_per_ip,
            settings.max_websockets_per_ip,
            settings.ws_handshake_rate_ip,
            settings.ws_handshake_burst_ip,
            settings.trusted_proxies,
            settings.rate_limit_memory_bytes,
        )
        # Open WebSockets: admission per client address (behind a trusted proxy, the
        # forwarded one), MAX_WEBSOCKETS, and the register a drain closes.
        self.sockets = WebSockets(
            settings.max_websockets,
            settings.max_websockets_per_ip,
            self.ip_limits,
            draining=lambda: self.degradation.draining,
        )
        self.cluster = Cluster(
            self.store,
            self.degradation,
            self.instance_id,
            settings.heartbeat_interval,
            connections=lambda: len(self.sockets),
        )
        self.sampler = Sampler(
            self.store,
            self.health,
            extra=lambda: {
                "breakers": self.breakers.snapshot(),
                "live_sessions": self.live.connections,
                "websockets": len(self.sockets),
                **({"decrypt_workers": self.decrypt.snapshot()} if self.decrypt else {}),
            },
        )
        self.operator = Operator(
            store=self.store,
            degradation=self.degradation,
            health=self.health,
            breakers=self.breakers,
            cluster=self.cluster,
            sampler=self.sampler,
            wake_outbox=self.outbox.wake,
            mailbox_limits=MailboxLimits(
                settings.mailbox_max_messages, settings.mailbox_max_bytes, settings.message_ttl
            ),
            backup_dir=settings.backup_dir,
        )
        self._tasks: list[asyncio.Task[Any]] = []
        self._drain_started: float | None = None
        self.store.add_listener(self.live.notify)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        settings = self.settings
        await self.store.open()
        await self._report_recipient_conflicts()
        await self.packer.start()
        if self.decrypt is not None:
            await self.decrypt.start()
        await self.health.run_checks()
        await self.rooms.start()
        await self.outbox.start()
        loops = {
            "health": self.health.run(),
            "sweep": expire_forever(self.store, settings.sweep_interval, settings.dedup_window),
            "sample": self.sampler.run(),
            "heartbeat": self.cluster.beat_forever(),
        }
        if backups := backup_schedule.from_settings(settings, self.store.engine):
            loops["backup"] = backups.run()
        self._tasks = [asyncio.create_task(loop, name=name) for name, loop in loops.items()]
        log.info(
            "dovecote.started",
            did=self.identity.did,
            url=settings.base_url,
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
        self.sockets.close_all()

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
        if self.decrypt is not None:  # after the HTTP drain: no request waits on it
            await self.decrypt.stop()
        with contextlib.suppress(Exception):
            await self.cluster.goodbye()
        # Pending writes commit before the store closes: nothing accepted is dropped.
        await self.store.close()
        log.info("dovecote.stopped")


def rooms_settings(settings: Settings) -> RoomsSettings:
    """What the rooms part reads of the settings."""
    channels = [("webhook", settings.notify_webhook_url), ("push", settings.push_url)]
    return RoomsSettings(
        enabled=settings.rooms_enabled,
        data_dir=settings.data_dir,
        jwks_file=settings.rooms_jwks_file,
        jwks_url=settings.rooms_jwks_url,
        jwks_refresh=settings.rooms_jwks_refresh,
        jwt_issuer=settings.rooms_jwt_issuer,
        jwt_audience=settings.rooms_jwt_audience,
        outbound=Policy.from_settings(settings),
        notify_targets=[(channel, url) for channel, url in channels if url],
        purge_every=min(settings.sweep_interval, max(settings.rooms_purge_after, 1.0)),
        purge_after=settings.rooms_purge_after,
        max_message_bytes=settings.rooms_max_message_bytes,
        ws_queue=settings.rooms_ws_queue,
        ws_stall=settings.rooms_ws_stall,
        ws_max_subscriptions=settings.rooms_ws_max_subscriptions,
        ws_idle_timeout=settings.ws_idle_timeout,
    )


def build_app(dovecote: Dovecote) -> web_app.WebApp:
    """The ASGI application for one instance: every endpoint gets the parts it serves."""
    dc, settings = dovecote, dovecote.settings
    admin_auth = AdminAuth(
        settings.admin_token,
        settings.admin_allow,
        settings.admin_client_ca,
        settings.admin_auth_failures,
        settings.admin_auth_window,
    )
    sessions = ConsoleAuth(
        settings.admin_token.get_secret_value(), settings.console_session_seconds
    )
    didcomm = DIDCommEndpoints(
        dc.mediator,
        dc.live,
        dc.ip_limits,
        max_body_bytes=settings.max_body_bytes,
        ws_idle_timeout=settings.ws_idle_timeout,
    )
    routes = [
        *didcomm.routes(dc.sockets),
        *InvitationPages(dc.identity, settings.base_url, settings.ws_url).routes(),
        *HealthEndpoints(dc.health, admin_auth, settings.metrics_allow).routes(),
        *AdminAPI(dc.operator, admin_auth).routes(),
        *Console(dc.operator, admin_auth, sessions).routes(),
        *RoomsSocket(dc.rooms, dc.ip_limits).routes(dc.sockets),
        *RoomsAPI(dc.rooms).routes(),
    ]
    return web_app.build(
        routes,
        didcomm.post,
        didcomm.reply,
        dc.start,
        dc.stop,
        trusted_proxies=list(settings.trusted_proxies) or None,
        requests=dc.requests,
        ip_limits=dc.ip_limits,
        draining=lambda: dc.degradation.draining,
        body_read_timeout=settings.body_read_timeout,
        body_min_rate=settings.body_min_rate,
        access_log=settings.access_log,
    )


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
        if self.started:  # the app is built and started: what is there now stays
            settle_heap()
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
        f"  Invitation: {short_url(base)}   (QR: {base}/invitation?format=svg, page: {base}/)",
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
        # The parent makes the identity, so that the workers it forks share it.
        ident = identity_mod.load_or_create(
            settings.identity_path, [settings.base_url, settings.ws_url]
        )
        run_workers(
            settings,
            serve=lambda sockets: serve_worker(settings, Dovecote(settings), sockets=sockets),
            banner=lambda: _banner(settings, ident),
        )
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


# gen0 collections per allocated container: CPython's 700 made one every dozen forwards.
GC_GEN0_THRESHOLD = 7000


def settle_heap() -> None:
    """Keep the cyclic GC off what start-up built (modules, settings, app, keys: hundreds
    of thousands of objects that live as long as the process).

    Each full collection walked all of them, about every two thousand forwards: with the
    young collections, ~100 us of CPU per forward at 200/s. Frozen objects are never
    collected, which they would not be anyway; garbage made later is collected as before.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


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
    app = build_app(dovecote)
    protocol = guarded_protocol(
        PeerCertProtocol if tls else GuardedProtocol,
        dovecote.peers,
        settings.header_timeout,
        settings.max_header_line_bytes,
        settings.max_header_bytes,
        direct=app.direct if settings.direct_post else None,
    )
    config = uvicorn.Config(
        app,
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
