"""Mailbox expiry: messages past MESSAGE_TTL move to dead letters (reason `expired`), and
dedup digests older than DEDUP_WINDOW are forgotten."""

from __future__ import annotations

import asyncio
import time

import structlog

from dovecote.errors import DovecoteError
from dovecote.ops import metrics
from dovecote.store.base import Store
from dovecote.util.kinds import DeadLetterKind

log = structlog.get_logger("dovecote.expiry")


async def expire_once(store: Store, dedup_window: float) -> int:
    """One sweep; the number of messages moved to dead letters."""
    now = time.time()
    moved = await store.expire(now, now - dedup_window)
    if moved:
        metrics.EXPIRED.inc(moved)
        metrics.DEAD_LETTERED.labels(DeadLetterKind.MAILBOX).inc(moved)
        log.info("sweep.expired", count=moved)
    return moved


async def expire_forever(store: Store, interval: float, dedup_window: float) -> None:
    """Sweep every `interval` seconds; store trouble waits for the next sweep."""
    while True:
        await asyncio.sleep(interval)
        try:
            await expire_once(store, dedup_window)
        except DovecoteError as exc:
            log.warning("sweep.failed", error=exc.detail)
