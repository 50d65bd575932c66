"""The background sender: drains the durable outbox in batches, with retries, backoff
and failover across endpoints.

A row holds the exact bytes to send, fixed when `send()` accepted it, so a retry after a
crash transmits the same bytes and the relay stores the message once (Dovecote dedups a
forward by the digest of its payload; rooms by the Idempotency-Key).

Scheduling lives in the row: a new message is due `flush_interval` after it was queued
(its batch may fill meanwhile; a full batch or `flush()` sends at once), a retry is due
when its backoff ends. Per attempt outcome:

- 2xx: `sent`;
- 408/425/429/5xx or no answer: retry; after `attempts_per_endpoint` failures on one
  endpoint the next endpoint is tried at once; backoff doubles with jitter between
  attempts; past `retention` the row becomes `failed`;
- any other 4xx: `failed` at once (the same bytes can never succeed).

Every `failed` row is reported to the failure callback and stays listed until purged.

DIDComm messages in a batch are sent concurrently (`http_concurrency`), or with
`send_transport="ws"` as frames on one WebSocket per relay (see wsbatch.py); posts to one room
are sent one after another in queue order, and a post waits while an earlier post to the
same room is backing off, so a room receives a client's posts in the order queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import httpx
import structlog

from dovecote.client import transport
from dovecote.client.config import ClientConfig
from dovecote.client.errors import Rejected, TransportFailure
from dovecote.client.store import ClientOutboxKind, ClientStore, OutboxItem
from dovecote.client.wsbatch import WsBatcher, WsTarget
from dovecote.util import backoff
from dovecote.util.aio import wait_at_most

log = structlog.get_logger("dovecote.client.outbox")

FailureCallback = Callable[[OutboxItem], Awaitable[None] | None]
HeadersFor = Callable[[OutboxItem], dict[str, str]]
JSON = "application/json"


class BackgroundSender:
    """Delivers outbox rows until stopped; one flush at a time."""

    def __init__(
        self,
        store: ClientStore,
        config: ClientConfig,
        http: httpx.AsyncClient,
        on_failed: FailureCallback | None = None,
        headers_for: HeadersFor | None = None,
        ws: WsBatcher | None = None,
        ws_target_for: Callable[[str], WsTarget | None] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.http = http
        self.on_failed = on_failed
        self.headers_for = headers_for or (lambda item: {})
        self.ws = ws if config.send_transport == "ws" else None
        self.ws_target_for = ws_target_for or (lambda url: None)
        self._wake = asyncio.Event()
        self._urgent = False
        self._flushed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dovecote-client-sender")

    async def stop(self) -> None:
        """Finish the flush in progress (its outcomes are recorded), then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            task, self._task = self._task, None
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.ws is not None:
            await self.ws.close()

    def queued(self, count: int = 1) -> None:
        """Tell the sender new rows exist (it decides whether the batch is full)."""
        self._wake.set()

    async def flush(self, wait: bool = True, max_wait: float | None = None) -> dict[str, int]:
        """Send everything queued now instead of waiting for the batch to fill.

        With `wait`, return once nothing is pending that is due within the flush window
        (retries still backing off are not waited for), or when `max_wait` passes.
        """
        self._urgent = True
        self._wake.set()
        if wait:
            deadline = None if max_wait is None else time.monotonic() + max_wait
            while True:
                horizon = time.time() + self.config.flush_interval
                if not await self.store.due(1, horizon):
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                async with self._flushed:
                    await wait_at_most(self._flushed.wait(), min(remaining or 1.0, 1.0))
                self._urgent = True
                self._wake.set()
        return await self.store.counts()

    async def wait_for(self, ids: Sequence[str], max_wait: float | None = None) -> list[OutboxItem]:
        """The rows for `ids` once none is pending (or when `max_wait` passes)."""
        deadline = None if max_wait is None else time.monotonic() + max_wait
        while True:
            items = [i for i in [await self.store.get(x) for x in ids] if i is not None]
            remaining = None if deadline is None else deadline - time.monotonic()
            if all(i.state != "pending" for i in items) or (
                remaining is not None and remaining <= 0
            ):
                return items
            async with self._flushed:
                await wait_at_most(self._flushed.wait(), min(remaining or 1.0, 1.0))

    # ------------------------------------------------------------------ loop
    async def _run(self) -> None:
        await self._report_failures()
        while not self._stopping:
            try:
                sent_any = await self._flush_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a store failure must not kill the sender for good  # noqa: BLE001
                log.warning("outbox.flush_error", error=repr(exc)[:300])
                sent_any = False
                await asyncio.sleep(1.0)
            if sent_any:
                continue
            next_due = await self.store.next_due_at()
            timeout = None if next_due is None else max(0.0, next_due - time.time())
            await wait_at_most(self._wake.wait(), timeout)
            self._wake.clear()

    async def _flush_once(self) -> bool:
        """Send one batch if one is due; True when a batch was sent."""
        lookahead = await self.store.due(
            self.config.batch_size, time.time() + self.config.flush_interval
        )
        urgent, self._urgent = self._urgent, False
        if urgent or len(lookahead) >= self.config.batch_size:
            batch = lookahead  # full batch, or an explicit flush: don't wait for it to fill
        else:
            batch = await self.store.due(self.config.batch_size)
        if not batch or self._stopping:
            return False
        await self._send_batch(batch)
        async with self._flushed:
            self._flushed.notify_all()
        return True

    # Its three delivery strategies (alone, a room's posts in order, a WebSocket batch)
    # are short closures over one semaphore; mccabe counts them into this function.
    async def _send_batch(self, batch: Sequence[OutboxItem]) -> None:  # noqa: C901
        started = time.monotonic()
        limit = asyncio.Semaphore(self.config.http_concurrency)

        async def attempt(item: OutboxItem) -> OutboxItem:
            async with limit:
                return await self._attempt(item)

        async def in_order(posts: list[OutboxItem]) -> list[OutboxItem]:
            # One room's posts one after the other; after a failure the rest wait, so the
            # room receives them in the order they were queued.
            done: list[OutboxItem] = []
            for index, item in enumerate(posts):
                done.append(await attempt(item))
                if done[-1].state != "sent":
                    return done + posts[index + 1 :]
            return done

        async def alone(item: OutboxItem) -> list[OutboxItem]:
            return [await attempt(item)]

        async def over_ws(target: WsTarget, items: list[OutboxItem]) -> list[OutboxItem]:
            assert self.ws is not None
            try:
                confirmed = await self.ws.send(target, [i.payload for i in items])
            except TransportFailure as exc:
                return [self._reschedule(i, exc.detail, None) for i in items]
            if not confirmed:
                # The relay refused some frame; find out which over HTTP (same bytes).
                log.info("outbox.ws_unconfirmed", url=target.url, size=len(items))
                return list(await asyncio.gather(*(attempt(i) for i in items)))
            now = time.time()
            return [
                replace(i, state="sent", attempts=i.attempts + 1, last_error=None, done_at=now)
                for i in items
            ]

        rooms: dict[str, list[OutboxItem]] = {}
        sockets: dict[WsTarget, list[OutboxItem]] = {}
        singles: list[OutboxItem] = []
        for item in batch:
            target = self.ws_target_for(item.endpoint) if self.ws is not None else None
            if item.kind == ClientOutboxKind.ROOM:
                rooms.setdefault(item.target, []).append(item)
            elif target is not None:
                sockets.setdefault(target, []).append(item)
            else:
                singles.append(item)
        groups = await asyncio.gather(
            *(alone(i) for i in singles),
            *(in_order(posts) for posts in rooms.values()),
            *(over_ws(target, items) for target, items in sockets.items()),
        )
        results = [r for group in groups for r in group]
        await self.store.record(results)
        sent = sum(r.state == "sent" for r in results)
        failed = [r for r in results if r.state == "failed"]
        log.info(
            "outbox.flushed",
            size=len(batch),
            sent=sent,
            failed=len(failed),
            retrying=len(batch) - sent - len(failed),
            ms=round((time.monotonic() - started) * 1000),
        )
        if failed:
            await self._report_failures()

    async def _attempt(self, item: OutboxItem) -> OutboxItem:
        url = item.endpoint
        headers = self.headers_for(item)
        content_type = transport.ENCRYPTED if item.kind == ClientOutboxKind.DIDCOMM else JSON
        now = time.time()
        try:
            await transport.post(self.http, url, item.payload, content_type, headers)
        except Rejected as exc:
            log.warning("outbox.rejected", id=item.id, url=url, status=exc.status)
            return replace(
                item,
                state="failed",
                attempts=item.attempts + 1,
                last_error=exc.detail[:500],
                done_at=now,
            )
        except TransportFailure as exc:
            return self._reschedule(item, exc.detail, exc.retry_after)
        except Exception as exc:  # never lose a row to an unexpected error: retry it  # noqa: BLE001
            log.warning("outbox.attempt_error", id=item.id, error=repr(exc)[:300])
            return self._reschedule(item, repr(exc), None)
        return replace(
            item, state="sent", attempts=item.attempts + 1, last_error=None, done_at=time.time()
        )

    def _reschedule(self, item: OutboxItem, error: str, retry_after: float | None) -> OutboxItem:
        now = time.time()
        attempts = item.attempts + 1
        on_endpoint = item.endpoint_attempts + 1
        index = item.endpoint_index
        # Equal jitter: after the n-th failed attempt, between half and all of
        # min(backoff_max, backoff_base * 2**(n-1)).
        delay = backoff.delay(
            attempts - 1, self.config.backoff_base, self.config.backoff_max, jitter="equal"
        )
        if on_endpoint >= self.config.attempts_per_endpoint and len(item.endpoints) > 1:
            # This endpoint had its chances: the next one is tried at once.
            index, on_endpoint, delay = index + 1, 0, 0.0
            log.info(
                "outbox.failover",
                id=item.id,
                failed=item.endpoint,
                next=item.endpoints[index % len(item.endpoints)],
            )
        if retry_after is not None:
            delay = max(delay, retry_after)
        if now + delay > item.created_at + self.config.retention:
            log.warning("outbox.expired", id=item.id, attempts=attempts, error=error[:200])
            return replace(
                item,
                state="failed",
                attempts=attempts,
                endpoint_index=index,
                endpoint_attempts=on_endpoint,
                last_error=f"retention exceeded; last error: {error}"[:500],
                done_at=now,
            )
        return replace(
            item,
            attempts=attempts,
            endpoint_index=index,
            endpoint_attempts=on_endpoint,
            next_attempt_at=now + delay,
            last_error=error[:500],
        )

    async def _report_failures(self) -> None:
        """Run the failure callback for every failed row not yet reported."""
        failed = await self.store.unreported_failures()
        if not failed:
            return
        for item in failed:
            log.warning(
                "outbox.failed",
                id=item.id,
                target=item.target[:80],
                attempts=item.attempts,
                error=(item.last_error or "")[:200],
            )
            if self.on_failed is not None:
                try:
                    result = self.on_failed(item)
                    if result is not None:
                        await result
                except Exception as exc:  # the application's callback must not stop the reports  # noqa: BLE001
                    log.warning("outbox.callback_error", id=item.id, error=repr(exc)[:200])
        await self.store.mark_reported([i.seq for i in failed])
