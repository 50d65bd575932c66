"""One outbound HTTP attempt, and what its outcome means for the item.

    2xx                                  delivered
    4xx other than 408/429, 3xx          permanent  (dead letter now, reason http_<status>)
    408, 429, 5xx                        transient  (retry; 429/503 Retry-After respected)
    timeout, refused, reset              transient
    lookup failed or timed out           transient  (nothing was sent: fail closed)
    target not allowed / not a URL       permanent  (target_forbidden / bad_target)

Every attempt has explicit timeouts: connect OUTBOUND_CONNECT_TIMEOUT and a total of
OUTBOUND_TIMEOUT, never longer than 80 % of the outbox lease, so a send cannot outlive
the lease that protects it from a second worker. Each kind has its own client and
connection pool (bulkheads). Every connection is checked and pinned by
delivery/outbound.py (resolve once, every address public, connect to what was checked),
webhooks and push included. Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import httpx
import structlog
from pydantic import SecretStr

from dovecote import __version__
from dovecote.delivery import notify, outbound
from dovecote.util.kinds import OutboxKind

if TYPE_CHECKING:
    from dovecote.ops.settings import Settings
    from dovecote.store.base import OutboxItem, Store

log = structlog.get_logger("dovecote.sender")

AttemptOutcome = Literal["delivered", "skipped", "transient", "permanent"]
LEASE_FRACTION = 0.8
MAX_RETRY_AFTER = 3600.0
USER_AGENT = f"dovecote/{__version__}"


@dataclass(frozen=True, slots=True)
class OutboxSettings:
    """What the outbox pools and their sender take of the settings."""

    forward_workers: int
    notify_workers: int
    lease: float
    outbound_timeout: float
    connect_timeout: float
    retry_base: float
    retry_cap: float
    retry_retention: float
    retry_max_attempts: int
    push_token: SecretStr  # the push relay's bearer token
    policy: outbound.Policy

    @classmethod
    def of(cls, settings: Settings) -> OutboxSettings:
        return cls(
            forward_workers=settings.forward_workers,
            notify_workers=settings.notify_workers,
            lease=settings.outbox_lease,
            outbound_timeout=settings.outbound_timeout,
            connect_timeout=settings.outbound_connect_timeout,
            retry_base=settings.retry_base,
            retry_cap=settings.retry_cap,
            retry_retention=settings.retry_retention,
            retry_max_attempts=settings.retry_max_attempts,
            push_token=settings.push_token,
            policy=outbound.Policy.from_settings(settings),
        )


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of one send."""

    outcome: AttemptOutcome
    status: int | None = None
    error: str = ""
    duration: float = 0.0
    retry_after: float | None = None
    reason: str = ""

    def record(self, at: float, number: int) -> dict[str, object]:
        """The attempt as kept in the item's history (never the payload)."""
        return {
            "at": round(at, 3),
            "attempt": number,
            "status": self.status,
            "error": self.error,
            "duration": round(self.duration, 4),
        }


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    return None


class OutboxSender:
    """HTTP clients per outbox kind and the classification of their answers."""

    def __init__(self, settings: OutboxSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.total_timeout = min(settings.outbound_timeout, LEASE_FRACTION * settings.lease)
        if self.total_timeout < settings.outbound_timeout:
            log.warning(
                "sender.timeout_clamped",
                timeout=self.total_timeout,
                reason="OUTBOX_LEASE is shorter than OUTBOUND_TIMEOUT",
            )
        self._clients: dict[str, httpx.AsyncClient] = {}
        self.policy = settings.policy

    def _client(self, kind: str) -> httpx.AsyncClient:
        client = self._clients.get(kind)
        if client is None:
            size = (
                self.settings.notify_workers
                if kind == OutboxKind.NOTIFY
                else self.settings.forward_workers
            )
            client = self._clients[kind] = outbound.client(
                self.policy,
                timeout=httpx.Timeout(self.total_timeout, connect=self.settings.connect_timeout),
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
                headers={"user-agent": USER_AGENT},
            )
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def send(self, item: OutboxItem) -> Attempt:
        started = time.perf_counter()
        parts = urlsplit(item.target)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return Attempt("permanent", error="not an http(s) URL", reason="bad_target")
        body: bytes | None = item.payload
        if item.kind == OutboxKind.NOTIFY:
            body = await notify.render(item, self.store)
            if body is None:
                return Attempt("skipped", error="mailbox already empty")
        headers = {k: v for k, v in item.headers.items() if not k.startswith("_")}
        if item.headers.get(notify.CHANNEL) == "push" and self.settings.push_token:
            headers["authorization"] = f"Bearer {self.settings.push_token.get_secret_value()}"
        try:
            async with asyncio.timeout(self.total_timeout):
                response = await self._client(item.kind).post(
                    item.target, content=body, headers=headers
                )
        except outbound.OutboundRefused as exc:
            if exc.reason == "private_address":
                return Attempt(
                    "permanent",
                    error=exc.detail,
                    reason="target_forbidden",
                    duration=time.perf_counter() - started,
                )
            return Attempt("transient", error=exc.detail, duration=time.perf_counter() - started)
        except (TimeoutError, httpx.TimeoutException) as exc:
            return Attempt(
                "transient",
                error=f"timeout ({type(exc).__name__})",
                duration=time.perf_counter() - started,
            )
        except httpx.HTTPError as exc:
            return Attempt(
                "transient",
                error=f"{type(exc).__name__}: {str(exc)[:160]}",
                duration=time.perf_counter() - started,
            )
        except (OSError, AttributeError) as exc:
            # Below httpx: a peer that resets the connection between connect and httpcore's
            # TLS-attribute read makes anyio raise AttributeError on its closed socket
            # (seen under the chaos suite's connection cuts). It is the target's failed
            # attempt, not a bug of ours.
            log.warning("outbound.stack_error", target=item.target, error=type(exc).__name__)
            return Attempt(
                "transient",
                error=f"{type(exc).__name__}: {str(exc)[:160]}",
                duration=time.perf_counter() - started,
            )
        duration = time.perf_counter() - started
        status = response.status_code
        if 200 <= status < 300:
            return Attempt("delivered", status, duration=duration)
        error = f"HTTP {status}"
        if status in (408, 429) or status >= 500:
            return Attempt("transient", status, error, duration, _retry_after(response))
        return Attempt("permanent", status, error, duration, reason=f"http_{status}")
