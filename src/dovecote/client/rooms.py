"""The rooms API from the participant's side: post, history, and subscribe with resume.

Posts go through the durable outbox like DIDComm messages: the row's id is the
Idempotency-Key, so a retry (also after a crash) returns the original message instead of
posting twice. `subscribe` keeps the last sequence number it handed to the application
in the local store and resumes from it after a reconnect or a restart; events at or
below it are dropped, so each event reaches the handler once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import structlog
import websockets

from dovecote.client import transport
from dovecote.client.config import ClientConfig
from dovecote.client.errors import ClientFailure, Rejected, RoomsFailure, TransportFailure
from dovecote.client.store import ClientOutboxKind, ClientStore, OutboxItem
from dovecote.util import backoff
from dovecote.util.aio import wait_at_most

log = structlog.get_logger("dovecote.client.rooms")

API = "/v1/rooms"
WS_PATH = "/v1/rooms/ws"

Event = dict[str, Any]
EventHandler = Callable[[Event], Awaitable[None] | None]
Enqueue = Callable[[str, str, bytes, str], Awaitable[None]]


class RoomsClient:
    """HTTP JSON calls under /v1/rooms with `Authorization: Bearer <JWT>`."""

    def __init__(
        self, config: ClientConfig, store: ClientStore, http: httpx.AsyncClient, enqueue: Enqueue
    ) -> None:
        self.config = config
        self.store = store
        self.http = http
        self._enqueue = enqueue
        # Set this to refresh tokens (called for every request and reconnect);
        # otherwise `config.rooms_token` is used.
        self.token_provider: Callable[[], str] | None = None

    @property
    def base(self) -> str:
        if not self.config.rooms_url:
            raise ClientFailure("no rooms URL configured (rooms_url / --rooms-url)")
        return self.config.rooms_url.rstrip("/")

    def _auth(self) -> dict[str, str]:
        token = self.token_provider() if self.token_provider else self.config.rooms_token
        return {"authorization": f"Bearer {token}"} if token else {}

    def headers_for(self, item: OutboxItem) -> dict[str, str]:
        """Headers for an outbox row: rooms posts carry the token and their key."""
        if item.kind != ClientOutboxKind.ROOM:
            return {}
        return {**self._auth(), "idempotency-key": item.id}

    def messages_url(self, room: str) -> str:
        return f"{self.base}{API}/{room}/messages"

    # ------------------------------------------------------------------ posting
    async def post(
        self,
        room: str,
        text: str | None = None,
        data: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> str:
        """Queue a post durably; returns its Idempotency-Key once it is in the outbox."""
        key = key or uuid.uuid4().hex
        payload = json.dumps(_content(text, data), separators=(",", ":")).encode()
        await self._enqueue(key, room, payload, self.messages_url(room))
        return key

    async def post_now(
        self,
        room: str,
        text: str | None = None,
        data: dict[str, Any] | None = None,
        key: str | None = None,
        attempts: int = 3,
    ) -> dict[str, Any]:
        """Post and wait for the stored message (retrying with the same key)."""
        key = key or uuid.uuid4().hex
        payload = json.dumps(_content(text, data), separators=(",", ":")).encode()
        headers = {**self._auth(), "idempotency-key": key}
        for attempt in range(1, attempts + 1):
            try:
                response = await transport.post(
                    self.http, self.messages_url(room), payload, "application/json", headers
                )
                result: dict[str, Any] = response.json()
                return result
            except Rejected as exc:
                raise RoomsFailure(exc.status or 400, exc.detail) from exc
            except TransportFailure:
                if attempt == attempts:
                    raise
                # No jitter: a few retries of one post, the same key each time.
                await asyncio.sleep(
                    backoff.delay(
                        attempt, self.config.backoff_base, self.config.backoff_max, jitter="none"
                    )
                )
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ reading
    async def history(
        self, room: str, after: int | None = None, before: int | None = None, limit: int = 100
    ) -> dict[str, Any]:
        """One page of the room's events (ascending seq; see `next_after`, `has_more`)."""
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        if before is not None:
            params["before"] = before
        return await self._get(f"{API}/{room}/events", params)

    async def _get(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self.http.get(self.base + path, params=params, headers=self._auth())
        except httpx.HTTPError as exc:
            raise TransportFailure(f"GET {path}: {exc}") from exc
        if response.status_code >= 400:
            raise RoomsFailure(response.status_code, _json_or_text(response))
        result: dict[str, Any] = response.json()
        return result

    async def subscribe(
        self,
        room: str,
        handler: EventHandler,
        since: int | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Stream the room's events to `handler` until `stop`, resuming after reconnects.

        `since` defaults to the cursor stored by an earlier subscription (or 0).
        """
        stop = stop or asyncio.Event()
        cursor = since if since is not None else (await self.store.room_cursor(room) or 0)
        failures = 0
        while not stop.is_set():
            try:
                cursor = await self._session(room, cursor, handler, stop)
                failures = 0
            except (TransportFailure, websockets.ConnectionClosed, OSError) as exc:
                failures += 1
                log.info("rooms.disconnected", room=room, error=str(exc)[:200])
            if stop.is_set():
                break
            wait = backoff.delay(
                failures, self.config.backoff_base, self.config.reconnect_max, jitter="equal"
            )
            await wait_at_most(stop.wait(), wait)

    async def _session(
        self, room: str, cursor: int, handler: EventHandler, stop: asyncio.Event
    ) -> int:
        url = self.base.replace("http", "ws", 1) + WS_PATH
        try:
            ws = await websockets.connect(
                url,
                additional_headers=self._auth(),
                open_timeout=self.config.request_timeout,
                max_size=None,
            )
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403, 404):
                raise RoomsFailure(status, exc.response.body.decode(errors="replace")) from exc
            raise TransportFailure(f"connect {url}: HTTP {status}", status=status) from exc
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            raise TransportFailure(f"connect {url}: {exc}") from exc
        stopper = asyncio.create_task(stop.wait())
        try:
            await ws.send(json.dumps({"action": "subscribe", "room": room, "since": cursor}))
            while not stop.is_set():
                receiver = asyncio.create_task(ws.recv())
                await asyncio.wait({receiver, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not receiver.done():
                    receiver.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await receiver
                    break
                frame = json.loads(receiver.result())
                for event in _events(frame, room):
                    seq = int(event["seq"])
                    if seq <= cursor:
                        continue  # replayed after a reconnect: already handled
                    result = handler(event)
                    if result is not None:
                        await result
                    cursor = seq
                    await self.store.set_room_cursor(room, cursor)
        finally:
            stopper.cancel()
            with contextlib.suppress(Exception):
                await ws.close()
        return cursor


def _content(text: str | None, data: dict[str, Any] | None) -> dict[str, Any]:
    if text is None and data is None:
        raise ValueError("a room message needs text, data, or both")
    content: dict[str, Any] = {}
    if text is not None:
        content["text"] = text
    if data is not None:
        content["data"] = data
    return content


def _events(frame: Any, room: str) -> list[Event]:
    """The events of `room` in one server frame; raise on frames that end the stream.

    Frames: {"type": "event", "event": {...}}, "subscribed", "pong", "authenticated";
    "overflow" (we were too slow: reconnect and resume from our cursor); "error" and
    "unsubscribed" (refused, room deleted, removed from it: no retry will help).
    """
    if not isinstance(frame, dict):
        return []
    kind = frame.get("type")
    if kind == "event" and isinstance(frame.get("event"), dict):
        event = frame["event"]
        if event.get("room", room) == room and isinstance(event.get("seq"), int):
            return [event]
        return []
    if kind == "overflow":
        raise TransportFailure("rooms stream overflowed (slow consumer); resuming")
    if kind == "error" and str(frame.get("error", "")).startswith("e.m.me"):
        raise TransportFailure(f"rooms stream: {frame.get('error')}: {frame.get('detail')}")
    if kind == "error":
        raise RoomsFailure(_ERROR_STATUS.get(str(frame.get("error", "")), 400), frame)
    if kind == "unsubscribed" and frame.get("room") == room:
        raise RoomsFailure(410, frame)
    return []


# WebSocket error frames carry Dovecote error codes, not statuses; the usual ones mapped.
_ERROR_STATUS = {"e.m.trust.token": 401, "e.p.req.forbidden": 403, "e.m.req.not-found": 404}


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:500]
