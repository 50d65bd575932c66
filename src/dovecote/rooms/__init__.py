"""Rooms: real-time group messaging on the mediator's store and live machinery.

The endpoints are the web layer's (web/rooms.py: /v1/rooms, web/rooms_ws.py: /v1/rooms/ws,
web/openapi.py: /openapi.json and /docs); this package is what they serve:

    hub.py        store-driven fan-out to subscribed connections (bounded queues)
    presence.py   who follows a room live (so posts notify only the offline)
    auth.py       Bearer JWTs checked against the issuer's JWKS (file or URL, reloaded)
    models.py     request/response shapes (validation and OpenAPI schemas)
    devkey.py     the development token issuer

State lives in the store (`store/rooms_base.py`); this package holds no room state of its
own beyond which connection follows which room.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog

from dovecote.delivery import outbound
from dovecote.errors import DovecoteError, Unavailable
from dovecote.rooms.auth import Authenticator, KeySource
from dovecote.rooms.hub import RoomHub
from dovecote.rooms.presence import Presence
from dovecote.store.rooms_base import RoomStore

if TYPE_CHECKING:
    from dovecote.store.base import Store

log = structlog.get_logger("dovecote.rooms")

# Posting again with the same idempotency key within this window returns the original.
IDEMPOTENCY_WINDOW = 24 * 3600.0


@dataclass(frozen=True)
class RoomsSettings:
    """The part of the settings the rooms use (each documented in ops/settings.py as
    ROOMS_*; the notify targets are NOTIFY_WEBHOOK_URL and PUSH_URL)."""

    enabled: bool
    data_dir: Path
    jwks_file: Path | None
    jwks_url: str
    jwks_refresh: float
    jwt_issuer: str
    jwt_audience: str
    outbound: outbound.Policy
    # Where offline participants are notified (the mailboxes' webhook and push).
    notify_targets: list[tuple[str, str]]
    # Seconds between purges of deleted messages' content.
    purge_every: float
    purge_after: float
    max_message_bytes: int
    ws_queue: int
    ws_stall: float
    ws_max_subscriptions: int
    ws_idle_timeout: float


class Rooms:
    """The rooms part of one instance: authentication, fan-out, housekeeping."""

    def __init__(self, settings: RoomsSettings, store: Store) -> None:
        self.settings = settings
        rooms = getattr(store, "rooms", None)  # the store's rooms component, if it has one
        self._store = rooms if isinstance(rooms, RoomStore) else None
        self.auth = Authenticator(
            KeySource(
                settings.jwks_file, settings.jwks_url, settings.jwks_refresh, settings.outbound
            ),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
        keys = self.auth.keys
        if not settings.enabled:
            keys.disabled = True
        elif not keys.configured:
            from dovecote.rooms import devkey

            keys.keys = devkey.public_keys(devkey.load_or_create(settings.data_dir))
            keys.fixed = True
        self.hub = RoomHub(self._store if self._store is not None else cast(RoomStore, _NoRooms()))
        self.presence = Presence(self.hub.store)
        if self._store is not None:
            self._store.add_room_listener(self.hub.notify)
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def store(self) -> RoomStore:
        if self._store is None:
            raise Unavailable("this store engine does not support rooms")
        return self._store

    async def start(self) -> None:
        if self.auth.keys.disabled:
            log.info("rooms.disabled")
        elif self.auth.keys.fixed:
            log.warning(
                "rooms.development_issuer",
                key=str(self.settings.data_dir / "rooms-dev-key.json"),
                hint="tokens from `dovecote rooms token`; set DOVECOTE_ROOMS_JWKS_FILE "
                "or DOVECOTE_ROOMS_JWKS_URL for a real issuer",
            )
        if self._store is not None:
            self._tasks.append(asyncio.create_task(self._purge(), name="rooms-purge"))
            self._tasks.append(
                asyncio.create_task(self.presence.refresh_forever(), name="rooms-presence")
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.auth.keys.close()

    async def _purge(self) -> None:
        """Erase content of messages deleted long enough ago; forget expired keys."""
        while True:
            await asyncio.sleep(self.settings.purge_every)
            now = time.time()
            try:
                purged = await self.store.rooms_purge(
                    now - self.settings.purge_after, now - IDEMPOTENCY_WINDOW
                )
                if purged:
                    log.info("rooms.purged", messages=purged)
            except DovecoteError as exc:
                log.warning("rooms.purge_failed", error=exc.detail)


class _NoRooms:
    """Stands in for a store without rooms so the hub can exist; never called."""

    def __getattr__(self, name: str) -> Any:
        raise Unavailable("this store engine does not support rooms")


__all__ = ["IDEMPOTENCY_WINDOW", "Rooms", "RoomsSettings"]
