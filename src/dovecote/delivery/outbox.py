"""Outbox workers: drain the transactional outbox with retries, breakers and dead letters.

One pool per kind of outbound work (bulkheads): `forward` (multi-hop forwards and
replies to senders) with FORWARD_WORKERS concurrent sends, `notify` (webhook and push)
with NOTIFY_WORKERS. A dead or slow target fills at most its own pool.

Each pool has one dispatcher that leases as many due items as it has free slots
(owner `<instance>/<kind>`, lease OUTBOX_LEASE seconds, skipping targets whose breaker is
open) and runs one send per item. After a send:

- delivered: the item is deleted (`outbox_done`);
- transient failure: rescheduled after `uniform(0, min(RETRY_CAP, RETRY_BASE * 2**n))`
  seconds (n = attempts before this one; full jitter), never past the retention deadline;
- permanent failure, RETRY_MAX_ATTEMPTS reached, or RETRY_RETENTION passed: moved to the
  dead letters with the reason and every attempt's {at, attempt, status, error, duration}.

An item leased while its target's breaker is open is put back without counting an
attempt. A dispatcher wakes when a producer on this instance adds an item (`wake`), when
a local retry falls due, and otherwise polls every POLL_SECONDS (items added by other
instances, leases that expired because a worker died).

Shutdown: `stop_leasing` (never blocks) stops new leases; `stop` lets in-flight sends
finish until the deadline, abandons the rest, and releases every lease this instance
holds, so nothing stays leased.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from dovecote.delivery.breaker import Breakers, target_key
from dovecote.delivery.sender import Attempt, OutboxSender, OutboxSettings
from dovecote.errors import DovecoteError
from dovecote.ops import metrics
from dovecote.util import backoff
from dovecote.util.aio import wait_at_most
from dovecote.util.kinds import OutboxKind

if TYPE_CHECKING:
    from dovecote.store.base import OutboxItem, Store

log = structlog.get_logger("dovecote.outbox")

POLL_SECONDS = 1.0
# After a wake-up, wait this long so items committed together are leased together.
WAKE_DEBOUNCE = 0.01


@dataclass
class Pool:
    """One kind's dispatcher and its in-flight sends."""

    kind: OutboxKind
    size: int
    owner: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None


class OutboxWorkers:
    """The outbox pools of one instance."""

    def __init__(
        self,
        store: Store,
        settings: OutboxSettings,
        instance_id: str,
        breakers: Breakers,
        sender: OutboxSender | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.breakers = breakers
        self.sender = sender or OutboxSender(settings, store)
        sizes = {
            OutboxKind.FORWARD: settings.forward_workers,
            OutboxKind.NOTIFY: settings.notify_workers,
        }
        self.pools = {kind: Pool(kind, sizes[kind], f"{instance_id}/{kind}") for kind in OutboxKind}
        self.stopping = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        for pool in self.pools.values():
            pool.task = asyncio.create_task(self._dispatch(pool), name=f"outbox-{pool.kind}")
        log.info("outbox.started", pools={p.kind: p.size for p in self.pools.values()})

    def wake(self, kind: OutboxKind) -> None:
        """An item of `kind` was added on this instance: lease it now, not at the next poll."""
        pool = self.pools.get(kind)
        if pool is not None:
            pool.wake.set()

    def stop_leasing(self) -> None:
        """First shutdown step: lease nothing new (in-flight sends go on)."""
        if not self.stopping:
            self.stopping = True
            for pool in self.pools.values():
                pool.wake.set()

    async def stop(self, grace: float) -> None:
        """Finish in-flight sends within `grace` seconds, abandon the rest, release leases."""
        self.stop_leasing()
        for pool in self.pools.values():
            if pool.task is not None:
                pool.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pool.task
        sends = [t for pool in self.pools.values() for t in pool.inflight.values()]
        abandoned = 0
        if sends:
            _, pending = await asyncio.wait(sends, timeout=max(0.0, grace))
            abandoned = len(pending)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        released = 0
        for pool in self.pools.values():
            try:
                released += await self.store.outbox_release(pool.owner)
            except DovecoteError as exc:
                # The leases expire on their own after OUTBOX_LEASE seconds.
                log.error("outbox.release_failed", owner=pool.owner, error=exc.detail)
        await self.sender.aclose()
        log.info(
            "outbox.stopped",
            finished=len(sends) - abandoned,
            abandoned=abandoned,
            released=released,
        )

    # ------------------------------------------------------------------ dispatch
    async def _dispatch(self, pool: Pool) -> None:
        while not self.stopping:
            free = pool.size - len(pool.inflight)
            if free > 0 and not self.stopping:
                await self._lease(pool, free)
            await wait_at_most(pool.wake.wait(), POLL_SECONDS)
            pool.wake.clear()
            await asyncio.sleep(WAKE_DEBOUNCE)

    async def _lease(self, pool: Pool, free: int) -> None:
        try:
            items = await self.store.outbox_lease(
                [pool.kind],
                pool.owner,
                free,
                self.settings.lease,
                exclude_targets=self.breakers.blocked_targets(),
            )
        except DovecoteError as exc:
            log.warning("outbox.lease_failed", kind=pool.kind, error=exc.detail)
            return
        except Exception:  # a bug must not stop the pool: log it and poll again
            log.exception("outbox.lease_crashed", kind=pool.kind)
            return
        for item in items:
            # Our own lease on an item we are still sending was just extended; one send.
            if item.id in pool.inflight or self.stopping:
                continue
            task = asyncio.create_task(self._deliver(pool, item), name=f"outbox-{item.id}")
            pool.inflight[item.id] = task
            task.add_done_callback(functools.partial(self._finished, pool, item.id))

    def _finished(self, pool: Pool, item_id: int, _task: asyncio.Task[None]) -> None:
        pool.inflight.pop(item_id, None)
        pool.wake.set()

    # ------------------------------------------------------------------ one item
    async def _deliver(self, pool: Pool, item: OutboxItem) -> None:
        number = item.attempts + 1
        target = target_key(item.target)
        bound = log.bind(item=item.id, kind=item.kind, attempt=number, target=target)
        sent = False
        try:
            if not self.breakers.acquire(item.target):
                await self._defer(pool, item, bound)
                return
            try:
                result = await self.sender.send(item)
            except DovecoteError as exc:
                # Our store failed while rendering a notification: nothing was sent, the
                # target is not to blame, and no attempt is counted.
                self.breakers.release(item.target)
                bound.warning("outbox.render_failed", error=exc.detail)
                await self.store.outbox_retry(
                    item.id, pool.owner, time.time() + POLL_SECONDS, {}, count_attempt=False
                )
                return
            except asyncio.CancelledError:
                self.breakers.release(item.target)
                bound.info("outbox.abandoned")
                raise
            sent = True
            await self._settle(pool, item, result, number, bound)
        except DovecoteError as exc:
            # Recording the outcome failed; the lease expires and the item is tried again.
            bound.error("outbox.record_failed", error=exc.detail)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not kill the pool; the lease expiry retries it  # noqa: BLE001
            if not sent:
                # A half-open breaker's trial slot would otherwise stay taken and block the
                # target for good (seen: every later forward to it stuck after one crash).
                self.breakers.release(item.target)
            bound.exception("outbox.crashed")

    async def _defer(self, pool: Pool, item: OutboxItem, bound: Any) -> None:
        """The target's breaker is open: put the item back without counting an attempt."""
        now = time.time()
        if now >= item.created_at + self.settings.retry_retention:
            await self._dead(pool, item, "retention_exceeded", None, bound)
            return
        retry_at = self.breakers.retry_at(item.target)
        await self.store.outbox_retry(
            item.id, pool.owner, retry_at, {"at": now, "event": "breaker_open"}, count_attempt=False
        )
        metrics.OUTBOX_DELIVERIES.labels(item.kind, "deferred").inc()
        bound.debug("outbox.deferred", until=round(retry_at - now, 3))
        self._wake_at(pool, retry_at)

    async def _settle(
        self, pool: Pool, item: OutboxItem, result: Attempt, number: int, bound: Any
    ) -> None:
        now = time.time()
        record = result.record(now, number)
        metrics.OUTBOX_ATTEMPT_SECONDS.labels(item.kind).observe(result.duration)
        if result.outcome in ("delivered", "skipped"):
            if result.outcome == "delivered":
                self.breakers.success(item.target)
            else:  # nothing was sent: no evidence either way
                self.breakers.release(item.target)
            await self.store.outbox_done(item.id, pool.owner)
            metrics.OUTBOX_DELIVERIES.labels(item.kind, result.outcome).inc()
            bound.info(
                "outbox.delivered",
                status=result.status,
                outcome=result.outcome,
                duration=round(result.duration, 4),
            )
            return
        if result.outcome == "permanent":
            if result.status is not None:
                self.breakers.success(item.target)  # it answered: the target is up
            else:
                self.breakers.release(item.target)
            await self._dead(pool, item, result.reason, record, bound)
            return
        self.breakers.failure(item.target)
        deadline = item.created_at + self.settings.retry_retention
        if number >= self.settings.retry_max_attempts:
            await self._dead(pool, item, "max_attempts", record, bound)
            return
        if now >= deadline:
            await self._dead(pool, item, "retention_exceeded", record, bound)
            return
        # Full jitter (docs/reliability.md): items failing on one target spread out.
        delay = backoff.delay(
            item.attempts, self.settings.retry_base, self.settings.retry_cap, jitter="full"
        )
        if result.retry_after is not None:
            delay = max(delay, min(result.retry_after, self.settings.retry_cap))
        next_at = min(now + delay, deadline)
        await self.store.outbox_retry(item.id, pool.owner, next_at, record)
        metrics.OUTBOX_RETRIES.labels(item.kind).inc()
        metrics.OUTBOX_DELIVERIES.labels(item.kind, "retry").inc()
        bound.warning(
            "outbox.retry",
            status=result.status,
            error=result.error,
            duration=round(result.duration, 4),
            delay=round(next_at - now, 3),
        )
        self._wake_at(pool, next_at)

    async def _dead(
        self, pool: Pool, item: OutboxItem, reason: str, record: dict[str, Any] | None, bound: Any
    ) -> None:
        await self.store.outbox_dead(item.id, pool.owner, reason, record)
        metrics.OUTBOX_DELIVERIES.labels(item.kind, "dead").inc()
        metrics.DEAD_LETTERED.labels(item.kind).inc()
        bound.error("outbox.dead_lettered", reason=reason, error=(record or {}).get("error", ""))

    def _wake_at(self, pool: Pool, when: float) -> None:
        """Wake the dispatcher when a retry this instance scheduled falls due."""
        delay = max(0.0, when - time.time())
        if delay < POLL_SECONDS * 30:
            asyncio.get_running_loop().call_later(delay, pool.wake.set)
