"""Health checks and the degradation level they choose.

Levels, mildest first: normal; shed (notifications and optional work paused);
read-only (pickup and status work, new accepts get 503 + Retry-After); status-only.
An operator can force a level; every change is logged and exported as a metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from dovecote import __version__
from dovecote.errors import Unavailable
from dovecote.ops import metrics
from dovecote.store.base import Store

log = structlog.get_logger("dovecote.health")

LEVELS = ("normal", "shed", "read-only", "status-only")
CHECK_INTERVAL = 2.0
STORE_PING_TIMEOUT = 2.0
SLOW_STORE_SECONDS = 0.5
OUTBOX_LAG_SHED_SECONDS = 300.0
RETRY_AFTER_SECONDS = 5


class Degradation:
    """The current degradation level and whether this instance is draining."""

    def __init__(self, forced: str | None = None) -> None:
        self.computed = "normal"
        self.forced = forced if forced in LEVELS else None
        self.draining = False
        self.reason = "forced by configuration" if self.forced else "healthy"
        metrics.DEGRADATION_LEVEL.set(0)

    @property
    def level(self) -> str:
        return self.forced or self.computed

    def _publish(self, before: str, reason: str) -> None:
        # The reason for the level in force: a computed one does not replace a forced one.
        if self.forced is None or reason.startswith("forced"):
            self.reason = reason
        if self.level != before:
            log.warning("degradation.changed", before=before, after=self.level, reason=reason)
        metrics.DEGRADATION_LEVEL.set(LEVELS.index(self.level))

    def set_computed(self, level: str, reason: str) -> None:
        before = self.level
        self.computed = level
        self._publish(before, reason)

    def force(self, level: str | None) -> None:
        """Pin a level (or None to go back to computed levels)."""
        if level is not None and level not in LEVELS:
            raise ValueError(f"unknown level {level!r}")
        before = self.level
        self.forced = level
        self._publish(before, "forced by operator" if level else "operator released")

    def require_accepting(self) -> None:
        """Raise 503 Unavailable unless new messages may be accepted now."""
        if self.draining:
            raise Unavailable("shutting down", retry_after=RETRY_AFTER_SECONDS)
        if LEVELS.index(self.level) >= LEVELS.index("read-only"):
            raise Unavailable(f"degraded ({self.level})", retry_after=RETRY_AFTER_SECONDS)

    @property
    def shedding(self) -> bool:
        return LEVELS.index(self.level) >= LEVELS.index("shed")


@dataclass
class CheckResult:
    name: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass
class HealthMonitor:
    """Runs the checks periodically, sets the degradation level and readiness."""

    store: Store
    degradation: Degradation
    data_dir: Path
    min_free_disk: int
    instance_id: str
    extra: dict[str, Any] = field(default_factory=dict)
    results: dict[str, CheckResult] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    store_ok: bool = False

    async def check_store(self) -> CheckResult:
        started = time.perf_counter()
        try:
            # Not wait_for: on 3.11 it can drop the cancellation that stops this loop.
            async with asyncio.timeout(STORE_PING_TIMEOUT):
                await self.store.ping()
            ok, detail = True, ""
        except Exception as exc:  # any failure means not ready  # noqa: BLE001
            ok, detail = False, str(exc)[:200]
        return CheckResult("store", ok, time.perf_counter() - started, detail)

    def check_disk(self) -> CheckResult:
        started = time.perf_counter()
        try:
            free = shutil.disk_usage(self.data_dir).free
        except OSError as exc:
            return CheckResult("disk", False, 0.0, str(exc))
        ok = free >= self.min_free_disk
        return CheckResult("disk", ok, time.perf_counter() - started, f"free={free}")

    async def run_checks(self) -> None:
        store = await self.check_store()
        disk = self.check_disk()
        self.results = {"store": store, "disk": disk}
        self.store_ok = store.ok
        level, reason = "normal", "healthy"
        lag = float(self.extra.get("outbox_lag", 0.0))
        if not store.ok:
            level, reason = "read-only", f"store failing: {store.detail}"
        elif not disk.ok:
            level, reason = "read-only", f"low disk: {disk.detail}"
        elif store.seconds > SLOW_STORE_SECONDS:
            level, reason = "shed", f"store slow: {store.seconds:.3f}s"
        elif lag > OUTBOX_LAG_SHED_SECONDS:
            level, reason = "shed", f"outbox lag {lag:.0f}s"
        self.degradation.set_computed(level, reason)
        metrics.READY.set(1 if self.ready else 0)

    @property
    def ready(self) -> bool:
        return (
            self.store_ok
            and not self.degradation.draining
            and self.degradation.level != "status-only"
        )

    async def run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.run_checks()
            await asyncio.sleep(CHECK_INTERVAL)

    def summary(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ready else "unavailable",
            "ready": self.ready,
            "draining": self.degradation.draining,
            "degradation": self.degradation.level,
            "degradation_forced": self.degradation.forced is not None,
            "version": __version__,
            "instance": self.instance_id,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "checks": {
                name: {"ok": r.ok, "seconds": round(r.seconds, 4), "detail": r.detail}
                for name, r in self.results.items()
            },
            **self.extra,
        }
