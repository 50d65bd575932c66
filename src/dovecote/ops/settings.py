"""One typed settings object: defaults here, then a TOML file, then DOVECOTE_* env, then CLI.

Every field is exposed by `dovecote serve --help` (the CLI builds its options from this
model) and documented in docs/configuration.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dovecote.util.did import DEFAULT_MAX_DID_BYTES
from dovecote.util.jsonlimits import DEFAULT_MAX_JSON_DEPTH

MiB = 1024 * 1024
DAY = 86_400.0

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 5 * MiB
DEFAULT_MESSAGE_TTL = 30 * DAY
DEFAULT_DEDUP_WINDOW = DAY
DEFAULT_SHUTDOWN_TIMEOUT = 25.0
DEFAULT_DRAIN_DELAY = 1.0
DEFAULT_ROOMS_JWKS_REFRESH = 300.0
DEFAULT_ROOMS_MAX_MESSAGE_BYTES = 16 * 1024
DEFAULT_ROOMS_WS_QUEUE = 1000
DEFAULT_ROOMS_WS_STALL = 5.0
DEFAULT_BACKUP_INTERVAL = 3600.0
DEFAULT_BACKUP_KEEP_HOURLY = 24
DEFAULT_BACKUP_KEEP_DAILY = 7
DEFAULT_MAX_MESSAGE_ID_BYTES = 1024
DEFAULT_RESOLVER_CACHE_BYTES = 32 * MiB
MIN_ADMIN_TOKEN = 32

# Lists come as "a,b,c" from the environment and flags, not as JSON.
CsvList = Annotated[list[str], NoDecode]

MediationPolicy = Literal["open", "allowlist"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
DegradationLevel = Literal["auto", "normal", "shed", "read-only", "status-only"]


class Settings(BaseSettings):
    """Dovecote configuration."""

    model_config = SettingsConfigDict(env_prefix="DOVECOTE_", extra="ignore", validate_default=True)

    config: Path | None = Field(None, description="Optional TOML settings file.")

    # --- network
    host: str = Field(DEFAULT_HOST, description="Interface to listen on.")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="TCP port to listen on.")
    public_url: str = Field(
        "",
        description="Public base URL advertised in the DID and invitation "
        "(default http://HOST:PORT; required when HOST is 0.0.0.0 or ::, serve refuses "
        "otherwise). The WebSocket URL is derived (ws[s]://.../ws).",
    )
    workers: int = Field(1, ge=1, le=64, description="Worker processes (PostgreSQL only for >1).")
    decrypt_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Processes that open anoncrypt (ECDH-ES) envelopes for this server "
        "process, so that a SQLite server (one process) uses more than one core; each "
        "server process of WORKERS gets its own. 0: unpack in the event loop. Worth it "
        "when the server is CPU-bound and a core is free: on 2 cores, 3.4 kB forwards, "
        "256 clients, 1.47-1.51x the one-process rate with the worker beside the load "
        "generator, 1.13-1.24x with nothing pinned, at the same total CPU per forward "
        "(docs/performance.md). Not below saturation: at 200/s a forward costs ~40 % "
        "more CPU (a pipe round trip per batch). Authcrypt is "
        "always opened in the server process (it resolves the sender's key there).",
    )
    trusted_proxies: CsvList = Field(
        default_factory=list,
        description="Proxy addresses or networks (CIDR) whose X-Forwarded-For/-Proto headers "
        "are trusted; the client address is then the last untrusted X-Forwarded-For entry "
        "(rate limits, admin allowlist). Empty: no proxy header is trusted.",
    )
    tls_cert: Path | None = Field(
        None, description="TLS certificate chain file (PEM) to serve HTTPS; re-read on SIGHUP."
    )
    tls_key: Path | None = Field(None, description="TLS private key file (PEM); re-read on SIGHUP.")

    # --- storage
    data_dir: Path = Field(Path("data"), description="Directory for the SQLite store and keys.")
    identity_file: Path | None = Field(
        None,
        description="The mediator's key file (default DATA_DIR/identity.json). Instances "
        "behind one load balancer share one file, e.g. a mounted secret.",
    )
    # Secrets (tokens, a DSN that may carry a password) are SecretStr: repr, logs and
    # model_dump show "**********"; the code that uses one calls .get_secret_value().
    store: SecretStr = Field(
        SecretStr(""),
        description="Store URL: empty for SQLite in DATA_DIR, sqlite:///path.db, "
        "or postgresql://user@host/db (secret: it may carry a password).",
    )
    store_timeout: float = Field(
        5.0, gt=0, description="Seconds a store operation may take before it fails (503)."
    )
    store_pool_size: int = Field(10, ge=1, description="PostgreSQL connection pool size.")
    store_patroni: CsvList = Field(
        default_factory=list,
        description="Patroni REST API URLs, one per host of STORE in the same order "
        "(e.g. http://pg1:8008,http://pg2:8008,http://pg3:8008): only the node holding the "
        "leader lock is used, and connections to a node that lost it are closed within "
        "seconds. Empty: no leader check (use HAProxy, deploy/haproxy/).",
    )
    group_commit_max: int = Field(
        512, ge=1, description="Most writes one SQLite transaction may group."
    )
    group_commit_wait: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Seconds an enqueue may wait for others to share its SQLite commit "
        "(0: commit at once): 8 ms (or this, when shorter), then on while its group holds "
        "fewer than 16 writes. Each commit costs an fsync and wake-ups; at moderate rates "
        "this groups forwards that would each pay them. A caller writing one message at a "
        "time soon stops paying it (the writer stops waiting after 8 fruitless waits).",
    )
    backup_dir: Path | None = Field(
        None, description="Directory for scheduled SQLite backups (empty: no scheduled backups)."
    )
    backup_interval: float = Field(
        DEFAULT_BACKUP_INTERVAL, ge=1, description="Seconds between scheduled backups."
    )
    backup_keep_hourly: int = Field(
        DEFAULT_BACKUP_KEEP_HOURLY,
        ge=0,
        description="Keep the newest backup of each of this many most recent hours.",
    )
    backup_keep_daily: int = Field(
        DEFAULT_BACKUP_KEEP_DAILY,
        ge=0,
        description="Keep the newest backup of each of this many most recent days (UTC).",
    )
    backup_key_file: Path | None = Field(
        None,
        description="age X25519 identity file (mode 0600; make one with `dovecote "
        "backup-keygen FILE`): backups are encrypted to it and decrypted with it on verify "
        "and restore (empty: backups are plain, still 0600).",
    )
    store_max_pages: int = Field(
        0,
        ge=0,
        description="SQLite max_page_count: a hard size cap for the database "
        "(0: no cap beyond the disk). Past it accepts get 507.",
    )

    # --- mailboxes
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1024, description="Largest accepted request body (bytes)."
    )
    message_ttl: float = Field(
        DEFAULT_MESSAGE_TTL, gt=0, description="Seconds a queued message is kept."
    )
    mailbox_max_messages: int = Field(
        100_000, ge=1, description="Most messages queued for one mediatee."
    )
    mailbox_max_bytes: int = Field(
        1024 * MiB, ge=1, description="Most bytes queued for one mediatee."
    )
    dedup_window: float = Field(
        DEFAULT_DEDUP_WINDOW, gt=0, description="Seconds a delivered message's digest is kept."
    )
    sweep_interval: float = Field(60.0, gt=0, description="Seconds between expiry sweeps.")
    mediation_policy: MediationPolicy = Field(
        "open",
        description="Grant mediation to anyone (open) or only to MEDIATION_ALLOWLIST "
        "(recipient registration is first come, first served: see docs/security.md).",
    )
    mediation_allowlist: CsvList = Field(
        default_factory=list,
        description="DIDs allowed mediation when the policy is "
        "allowlist (a DID URL stands for its DID).",
    )
    live_push_batch: int = Field(
        100, ge=1, description="Most messages pushed in one live-delivery round."
    )

    # --- outbound delivery
    outbound_connect_timeout: float = Field(5.0, gt=0, description="Outbound connect timeout.")
    outbound_timeout: float = Field(15.0, gt=0, description="Outbound total request timeout.")
    retry_base: float = Field(1.0, gt=0, description="First retry delay (seconds).")
    retry_cap: float = Field(600.0, gt=0, description="Longest retry delay (seconds).")
    retry_retention: float = Field(DAY, gt=0, description="Seconds before an item dead-letters.")
    retry_max_attempts: int = Field(
        500,
        ge=1,
        description="Attempts before an item dead-letters (with the default "
        "schedule about 300 fit in RETRY_RETENTION, so retention decides).",
    )
    breaker_threshold: int = Field(5, ge=1, description="Failures that open a circuit breaker.")
    breaker_reset: float = Field(
        30.0, gt=0, description="Seconds before an open breaker half-opens."
    )
    breaker_trials: int = Field(1, ge=1, description="Trial calls allowed while half-open.")
    forward_workers: int = Field(8, ge=1, description="Concurrent outbound forwards/replies.")
    notify_workers: int = Field(4, ge=1, description="Concurrent outbound notifications.")
    outbox_lease: float = Field(60.0, gt=0, description="Seconds an outbox lease lasts.")
    outbound_allow_private: bool = Field(
        False,
        description="Allow forwards and replies to DID endpoints on loopback, "
        "private or link-local addresses (off: such targets are refused or dead-lettered).",
    )
    outbound_allow_networks: CsvList = Field(
        default_factory=list,
        description="Networks (CIDR) outbound calls may reach although they are not public "
        "(e.g. an internal JWKS issuer or webhook), without allowing every private address.",
    )
    outbound_dns_server: str = Field(
        "",
        description="host:port of the DNS server for outbound lookups (empty: the system "
        "resolver). Lookups that fail or time out are refused either way.",
    )
    relay_target_max_items: int = Field(
        500,
        ge=1,
        description="Most pending relayed forwards for one target origin "
        "(scheme://host:port) before new ones get 429 with Retry-After.",
    )
    relay_target_max_bytes: int = Field(
        32 * MiB,
        ge=1,
        description="Most pending relayed bytes for one target origin "
        "before new forwards get 429 with Retry-After.",
    )
    relay_max_items: int = Field(
        5000,
        ge=1,
        description="Most pending relayed forwards in total before new ones get "
        "507 with Retry-After.",
    )
    relay_max_bytes: int = Field(
        256 * MiB,
        ge=1,
        description="Most pending relayed bytes in total before new "
        "forwards get 507 with Retry-After.",
    )
    relay_retry_after: float = Field(
        30.0,
        gt=0,
        description="Retry-After (seconds) on forwards refused by a relay quota.",
    )
    notify_webhook_url: str = Field(
        "", description="Webhook called when a message waits for an offline mediatee."
    )
    push_url: str = Field("", description="FCM-compatible push endpoint for notifications.")
    push_token: SecretStr = Field(
        SecretStr(""), description="Bearer token for the push endpoint (secret)."
    )

    # --- protection
    max_concurrent_requests: int = Field(
        1000, ge=1, description="Concurrent HTTP requests before 503."
    )
    max_websockets: int = Field(10_000, ge=1, description="Open WebSockets before close 1013.")
    rate_limit_ip: float = Field(500.0, gt=0, description="Requests/s allowed per client IP.")
    rate_limit_ip_burst: int = Field(1000, ge=1, description="Burst size per client IP.")
    rate_limit_did: float = Field(200.0, gt=0, description="Messages/s allowed per sender DID.")
    rate_limit_did_burst: int = Field(400, ge=1, description="Burst size per sender DID.")
    max_did_bytes: int = Field(
        DEFAULT_MAX_DID_BYTES,
        ge=256,
        description="Longest DID or DID URL accepted from a "
        "client (UTF-8 bytes), checked before it is resolved, stored or cached (400).",
    )
    max_message_id_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_ID_BYTES,
        ge=64,
        description="Longest message id (id, thid, pthid, acknowledged ids) accepted (400).",
    )
    max_json_depth: int = Field(
        DEFAULT_MAX_JSON_DEPTH,
        ge=8,
        le=512,
        description="Deepest JSON nesting accepted in "
        "envelopes and plaintexts, checked before parsing (400).",
    )
    resolver_cache_bytes: int = Field(
        DEFAULT_RESOLVER_CACHE_BYTES,
        ge=0,
        description="Memory for resolved and parsed DID "
        "documents (estimated bytes, least recently used forgotten first).",
    )
    rate_limit_memory_bytes: int = Field(
        16 * MiB,
        ge=64 * 1024,
        description="Bytes of memory each rate limiter (per IP, "
        "per DID) may keep for its buckets; least recently used buckets are forgotten.",
    )
    max_connections_per_ip: int = Field(
        256,
        ge=1,
        description="Open TCP connections (HTTP and WebSocket) per client "
        "address; past it a new connection gets 429 and is closed (proxies in "
        "TRUSTED_PROXIES are not counted: their clients are, by MAX_WEBSOCKETS_PER_IP and "
        "the rate limit).",
    )
    max_websockets_per_ip: int = Field(
        128,
        ge=1,
        description="Open WebSockets (/ws and /v1/rooms/ws) per client address: "
        "past it a handshake gets 429 (behind a trusted proxy: close 1013).",
    )
    ws_handshake_rate_ip: float = Field(
        20.0,
        gt=0,
        description="WebSocket handshakes/s per client address (beyond "
        "RATE_LIMIT_IP, which they also count against); past it 429 before the handshake.",
    )
    ws_handshake_burst_ip: int = Field(
        100,
        ge=1,
        description="Burst size of WS_HANDSHAKE_RATE_IP.",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a connection may take to send a request's headers "
        "(from connect, or from the first byte of the next request); then 408 and close.",
    )
    max_header_line_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description="Longest request line or header line (bytes); past it 431.",
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=4096,
        description="Most bytes of request line and headers together; past it 431.",
    )
    body_read_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a request body may pause between chunks, and the "
        "grace before BODY_MIN_RATE applies; then 408 and close.",
    )
    body_min_rate: int = Field(
        4096,
        ge=1,
        description="Bytes/s a request body must average after the first "
        "BODY_READ_TIMEOUT seconds; slower uploads get 408.",
    )
    ws_idle_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a WebSocket without live mode (/ws) or "
        "subscriptions (/v1/rooms/ws) may stay silent before it is closed (1000, idle).",
    )
    ws_ping_interval: float = Field(
        20.0,
        gt=0,
        description="Seconds between keepalive pings on each WebSocket.",
    )
    ws_ping_timeout: float = Field(
        20.0,
        gt=0,
        description="Seconds to wait for a pong before closing (1011).",
    )
    direct_post: bool = Field(
        True,
        description="Answer POST / (every DIDComm message over HTTP) on the connection, "
        "without the ASGI request cycle: the same checks, limits, metrics and answers, "
        "less CPU per message. False: serve it through ASGI like every other route.",
    )
    ws_per_message_deflate: bool = Field(
        False,
        description="Offer permessage-deflate to WebSocket clients (all sockets: /ws and "
        "/v1/rooms/ws). Off by default: DIDComm frames are ciphertext, which does not "
        "compress, and deflating costs CPU on every frame sent and received.",
    )
    shutdown_timeout: float = Field(
        DEFAULT_SHUTDOWN_TIMEOUT, ge=0, description="Seconds to drain on SIGTERM."
    )
    drain_delay: float = Field(
        DEFAULT_DRAIN_DELAY,
        ge=0,
        description="Seconds after SIGTERM during which the "
        "instance still listens, reports not-ready and answers new POSTs with 503, so that "
        "load balancers notice before connections are refused.",
    )
    degradation: DegradationLevel = Field(
        "auto", description="Force a degradation level, or compute it from health (auto)."
    )
    min_free_disk_bytes: int = Field(
        256 * MiB, ge=0, description="Free disk below which new accepts are refused."
    )

    # --- rooms
    rooms_enabled: bool = Field(
        True,
        description="Serve the rooms API (off: every rooms call answers 404 "
        "e.m.req.rooms-disabled, which clients do not retry).",
    )
    rooms_jwks_file: Path | None = Field(
        None,
        description="JWKS file with the rooms token issuer's public keys (re-read when "
        "it changes). Without it or ROOMS_JWKS_URL the server makes a development key, "
        "DATA_DIR/rooms-dev-key.json, and accepts tokens from `dovecote rooms token`.",
    )
    rooms_jwks_url: str = Field(
        "", description="URL of the rooms token issuer's JWKS (refetched periodically)."
    )
    rooms_jwks_refresh: float = Field(
        DEFAULT_ROOMS_JWKS_REFRESH,
        gt=0,
        description="Seconds between JWKS URL refetches (an unknown key id refetches sooner).",
    )
    rooms_jwt_issuer: str = Field(
        "", description="Required `iss` of rooms tokens (empty: any issuer whose key verifies)."
    )
    rooms_jwt_audience: str = Field(
        "", description="Required `aud` of rooms tokens (empty: not checked)."
    )
    rooms_max_message_bytes: int = Field(
        DEFAULT_ROOMS_MAX_MESSAGE_BYTES,
        ge=256,
        le=DEFAULT_MAX_BODY_BYTES,
        description="Largest room message content (UTF-8 JSON bytes of text and data).",
    )
    rooms_purge_after: float = Field(
        DAY,
        ge=0,
        description="Seconds after a room message is deleted before its content "
        "is erased from the store.",
    )
    rooms_ws_queue: int = Field(
        DEFAULT_ROOMS_WS_QUEUE,
        ge=1,
        description="Events buffered per rooms WebSocket (the send queue's bound).",
    )
    rooms_ws_max_subscriptions: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Rooms one rooms WebSocket may subscribe to.",
    )
    rooms_ws_stall: float = Field(
        DEFAULT_ROOMS_WS_STALL,
        gt=0,
        description="Seconds a rooms WebSocket may take no event while its send queue is "
        "full before it is disconnected (close 4008) with a resume hint.",
    )

    # --- admin and observability
    admin_token: SecretStr = Field(
        SecretStr(""),
        description=f"Bearer token for /admin and the /health details (secret; empty: admin "
        f"disabled; else at least {MIN_ADMIN_TOKEN} characters, e.g. `openssl rand -hex 32`).",
    )
    admin_auth_failures: int = Field(
        5,
        ge=1,
        description="Failed admin authentications from one address within "
        "ADMIN_AUTH_WINDOW before that address gets 429 until the window ends.",
    )
    admin_auth_window: float = Field(
        60.0,
        gt=0,
        description="Seconds of the admin authentication throttle window.",
    )
    metrics_allow: CsvList = Field(
        default_factory=list,
        description="Client networks (CIDR) allowed to read /metrics (empty: anyone who can "
        "reach it; restrict it at the proxy or here).",
    )
    admin_allow: CsvList = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="Client networks allowed to reach /admin (the address behind a trusted proxy).",
    )
    admin_client_ca: Path | None = Field(
        None,
        description="CA file (PEM): when set, /admin also requires a client certificate "
        "signed by it (needs TLS_CERT/TLS_KEY; other routes do not ask for one).",
    )
    console_session_seconds: float = Field(
        8 * 3600.0,
        gt=0,
        le=7 * 86_400,
        description="Seconds a web console (/console) login lasts; the console is enabled "
        "with ADMIN_TOKEN and shares ADMIN_ALLOW and ADMIN_CLIENT_CA.",
    )
    log_format: LogFormat = Field("auto", description="json, console, or auto (console on a tty).")
    log_level: LogLevel = Field("info", description="Lowest log level written.")
    access_log: bool = Field(False, description="Log every HTTP request.")
    heartbeat_interval: float = Field(5.0, gt=0, description="Seconds between instance heartbeats.")

    @field_validator(
        "trusted_proxies",
        "mediation_allowlist",
        "admin_allow",
        "metrics_allow",
        "outbound_allow_networks",
        "store_patroni",
        mode="before",
    )
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        # Environment variables and CLI flags give lists as "a,b,c".
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("admin_token")
    @classmethod
    def _long_admin_token(cls, value: SecretStr) -> SecretStr:
        # A short token is guessable from the network despite the throttle.
        length = len(value.get_secret_value())
        if 0 < length < MIN_ADMIN_TOKEN:
            raise ValueError(
                f"admin_token must be at least {MIN_ADMIN_TOKEN} characters "
                f"(it has {length}); generate one with `openssl rand -hex 32`"
            )
        return value

    @model_validator(mode="after")
    def _tls_files_together(self) -> Settings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key are given together")
        if self.admin_client_ca and not self.tls_cert:
            raise ValueError("admin_client_ca needs in-process TLS (tls_cert and tls_key)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("DOVECOTE_CONFIG")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    # --- derived values
    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def advertises_unspecified_address(self) -> bool:
        """True when the advertised URL names 0.0.0.0 or :: (nobody can connect there)."""
        import ipaddress
        from urllib.parse import urlsplit

        host = urlsplit(self.base_url).hostname or ""
        try:
            return host == "" or ipaddress.ip_address(host).is_unspecified
        except ValueError:
            return False

    @property
    def ws_url(self) -> str:
        base = self.base_url
        if base.startswith("https://"):
            return "wss://" + base.removeprefix("https://") + "/ws"
        return "ws://" + base.removeprefix("http://") + "/ws"

    @property
    def identity_path(self) -> Path:
        return self.identity_file or self.data_dir / "identity.json"

    @property
    def store_url(self) -> str:
        """The store URL itself (a secret: never log it)."""
        if url := self.store.get_secret_value():
            return url
        return f"sqlite:///{(self.data_dir / 'dovecote.db').resolve()}"
