"""What the operators see and do: dead letters, degradation, cluster, mailboxes, targets.

The one source of what /admin (web/admin.py), the console (web/console.py) and the CLI
show and do: those only parse input and render these results. The free functions need
only a store (the CLI has nothing else); `Operator` holds the parts of a running instance.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dovecote.delivery.breaker import Breakers, target_key
from dovecote.delivery.notify import mediatee_hash
from dovecote.ops import backup, backup_schedule, status
from dovecote.ops.cluster import Cluster
from dovecote.ops.health import Degradation, HealthMonitor
from dovecote.ops.sampler import Sampler
from dovecote.store.base import DeadLetter, MailboxUsage, Store
from dovecote.util.kinds import OutboxKind

MAX_ID = 2**63 - 1  # ids are BIGINT / SQLite INTEGER: a larger one names nothing
MAILBOX_VIEW_LIMIT = 20
TARGET_VIEW_LIMIT = 100


async def dead_letters(
    store: Store,
    offset: int = 0,
    limit: int = 100,
    *,
    kind: str | None = None,
    target: str | None = None,
    reason: str | None = None,
) -> tuple[list[DeadLetter], int]:
    """A page of dead letters (newest first) matching the filters, and how many match."""
    return await store.dlq_list(
        offset, limit, kind=kind or None, target=target or None, reason=reason or None
    )


def _existing(ids: list[int] | None) -> list[int] | None:
    return None if ids is None else [i for i in ids if 0 < i <= MAX_ID]


async def dead_letter(store: Store, item_id: int) -> DeadLetter | None:
    if not 0 < item_id <= MAX_ID:
        return None
    return await store.dlq_get(item_id)


async def replay(
    store: Store,
    ids: list[int] | None,
    target: str | None = None,
    wake: Callable[[OutboxKind], None] | None = None,
) -> int:
    """Dead letters back to the outbox with fresh attempts (ids None: all, or all of target).

    Expired mailbox messages have no outbound target and stay where they are.
    """
    ids = _existing(ids)
    count = await store.dlq_replay(ids, target) if ids != [] else 0
    if wake is not None:
        for kind in OutboxKind:
            wake(kind)
    return count


async def purge(store: Store, ids: list[int] | None, older_than: float | None) -> int:
    """Delete dead letters by id and/or age (seconds)."""
    cutoff = time.time() - float(older_than) if older_than is not None else None
    ids = _existing(ids)
    return await store.dlq_purge(ids, cutoff) if ids != [] else 0


def mailbox_json(usage: MailboxUsage) -> dict[str, Any]:
    """A mailbox by its hashed id (as notifications name it), never its DID or content."""
    return {
        "mailbox": mediatee_hash(usage.mediatee),
        "messages": usage.message_count,
        "bytes": usage.total_bytes,
        "oldest_received_at": usage.oldest_received_at,
    }


@dataclass(frozen=True)
class MailboxLimits:
    """The limits mailboxes are held to, as the mailbox view shows them."""

    max_messages: int
    max_bytes: int
    message_ttl_seconds: float


@dataclass
class Operator:
    """The operator's views and actions over the parts of one running instance."""

    store: Store
    degradation: Degradation
    health: HealthMonitor
    breakers: Breakers
    cluster: Cluster
    sampler: Sampler
    wake_outbox: Callable[[OutboxKind], None]
    mailbox_limits: MailboxLimits
    backup_dir: Path | None

    async def replay(self, ids: list[int] | None, target: str | None = None) -> int:
        """`replay`, waking this instance's outbox workers."""
        return await replay(self.store, ids, target, self.wake_outbox)

    def set_degradation(self, level: str | None) -> None:
        """Pin a level, or None / "auto" to go back to computed levels (ValueError if unknown)."""
        self.degradation.force(None if level in (None, "auto") else level)

    def degradation_state(self) -> dict[str, Any]:
        return {
            "level": self.degradation.level,
            "forced": self.degradation.forced is not None,
            "reason": self.degradation.reason,
        }

    async def cluster_view(self) -> list[dict[str, Any]]:
        """Every instance with version, heartbeat and level; dead ones marked."""
        return await self.cluster.view()

    async def mailboxes(self, limit: int = MAILBOX_VIEW_LIMIT) -> dict[str, Any]:
        """The largest and the oldest mailboxes, with the limits they are held to."""
        limits = self.mailbox_limits
        return {
            "limits": {
                "max_messages": limits.max_messages,
                "max_bytes": limits.max_bytes,
                "message_ttl_seconds": limits.message_ttl_seconds,
            },
            "largest": [mailbox_json(m) for m in await self.store.mailbox_usage("bytes", limit)],
            "oldest": [mailbox_json(m) for m in await self.store.mailbox_usage("oldest", limit)],
        }

    async def targets(self, limit: int = TARGET_VIEW_LIMIT) -> list[dict[str, Any]]:
        """Outbound targets: pending items, next attempt, and the breaker of their host:port."""
        breakers = self.breakers.snapshot()
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for item in await self.store.outbox_targets(limit):
            key = target_key(item.target)
            seen.add(key)
            breaker = breakers.get(key, {"state": "closed", "failures": 0})
            rows.append(
                {
                    "target": item.target,
                    "breaker_key": key,
                    "kind": item.kind,
                    "pending": item.pending,
                    "next_attempt_at": item.next_attempt_at,
                    "max_attempts": item.max_attempts,
                    "oldest_created_at": item.oldest_created_at,
                    **_breaker(breaker),
                }
            )
        # Breakers that tripped with nothing left pending still matter to an operator.
        for key, breaker in breakers.items():
            if key not in seen:
                rows.append(
                    {
                        "target": "",
                        "breaker_key": key,
                        "kind": "",
                        "pending": 0,
                        "next_attempt_at": None,
                        "max_attempts": 0,
                        "oldest_created_at": None,
                        **_breaker(breaker),
                    }
                )
        return rows

    async def overview(self) -> dict[str, Any]:
        """/health, the traffic of the last minutes (as `dovecote status` computes it), backups."""
        health = self.health.summary()
        history = list(self.sampler.history)
        latest = history[-1] if history else None
        traffic, spans = {}, {}
        for window in (60.0, 300.0):
            first = next((h for h in history if latest and latest.at - h.at <= window + 1), None)
            if first is not None and latest is not None and latest is not first:
                traffic[int(window)] = status.traffic(first, latest)
                spans[int(window)] = round(latest.at - first.at, 1)
        steps = [status.traffic(a, b) for a, b in itertools.pairwise(history)]
        series = (
            {
                row["label"]: [step[i]["per_second"] for step in steps]
                for i, row in enumerate(steps[0])
            }
            if steps
            else {}
        )
        return {
            "health": health,
            "degradation": self.degradation_state(),
            "traffic": traffic,
            "traffic_seconds": spans,
            "series": series,
            "queues": status.queue_numbers(latest) if latest else {},
            "backup": await self.backup_status(),
        }

    async def backup_status(self) -> dict[str, Any] | None:
        """The newest scheduled backup and `dovecote verify`'s verdict on it (None: no schedule)."""
        backup_dir = self.backup_dir
        if backup_dir is None:
            return None
        found = await asyncio.to_thread(backup_schedule.existing, backup_dir)
        if not found:
            return {"dir": str(backup_dir), "file": None}
        newest = max(found, key=lambda path: found[path])
        try:
            stat = newest.stat()
        except OSError:
            return {"dir": str(backup_dir), "file": None}
        problems = await _verify_cached(str(newest), stat.st_mtime_ns)
        return {
            "dir": str(backup_dir),
            "file": newest.name,
            "created_at": found[newest],
            "bytes": stat.st_size,
            "verified": not problems,
            "problems": problems,
        }


def _breaker(breaker: dict[str, Any]) -> dict[str, Any]:
    return {
        "breaker": breaker.get("state", "closed"),
        "failures": breaker.get("failures", 0),
        "breaker_retry_at": breaker.get("retry_at"),
    }


_verified: dict[tuple[str, int], list[str]] = {}


async def _verify_cached(path: str, mtime_ns: int) -> list[str]:
    """verify_backup reads the whole copy: once per backup file, not once per page view."""
    key = (path, mtime_ns)
    if key not in _verified:
        manifest, problems = await asyncio.to_thread(backup.verify_backup, Path(path))
        if manifest is None and not problems:
            problems = ["no manifest"]
        _verified.clear()  # only the newest backup is ever asked about
        _verified[key] = list(problems)
    return _verified[key]
