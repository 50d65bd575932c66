"""Queue numbers every few seconds: gauges for /metrics, details for /health, and the
short history of /metrics samples the console draws its rates from."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from dovecote.ops import metrics, status
from dovecote.ops.health import HealthMonitor
from dovecote.store.base import Store
from dovecote.util.kinds import OutboxKind

log = structlog.get_logger("dovecote.sampler")

SAMPLE_INTERVAL = 5.0
METRIC_HISTORY_SECONDS = 300.0


class Sampler:
    """Reads queue statistics from the store; keeps the last minutes of samples."""

    def __init__(
        self,
        store: Store,
        health: HealthMonitor,
        extra: Callable[[], dict[str, Any]],
    ) -> None:
        self.store = store
        self.health = health
        # Numbers only other parts know (breakers, live sessions, open sockets).
        self.extra = extra
        self.history: deque[status.Scrape] = deque(
            maxlen=int(METRIC_HISTORY_SECONDS / SAMPLE_INTERVAL) + 2
        )

    async def sample(self) -> None:
        stats = await self.store.queue_stats()
        now = time.time()
        metrics.QUEUE_DEPTH.set(stats.queued)
        metrics.QUEUE_OLDEST.set(now - stats.oldest_received_at if stats.oldest_received_at else 0)
        lag = 0.0
        for kind in OutboxKind:
            metrics.OUTBOX_SIZE.labels(kind).set(stats.outbox.get(kind, 0))
            due = stats.outbox_oldest_due.get(kind)
            kind_lag = max(0.0, now - due) if due else 0.0
            metrics.OUTBOX_LAG.labels(kind).set(kind_lag)
            lag = max(lag, kind_lag)
        metrics.DLQ_SIZE.set(stats.dead_letters)
        self.health.extra.update(
            queue_depth=stats.queued,
            outbox=stats.outbox,
            outbox_lag=round(lag, 3),
            dead_letters=stats.dead_letters,
            **self.extra(),
        )
        # What /metrics shows, kept for the console's rates of the last minutes.
        self.history.append(status.Scrape(time.time(), {}, metrics.samples(status.SAMPLED)))

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception as exc:  # noqa: BLE001 - sampling must never stop
                log.debug("sample.failed", error=str(exc)[:200])
            await asyncio.sleep(SAMPLE_INTERVAL)
