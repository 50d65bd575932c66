"""Scheduled backups inside the server, and their retention.

Every BACKUP_INTERVAL seconds the server writes `BACKUP_DIR/dovecote-<UTC time>.db` (with
its identity and manifest files, see ops/backup.py), then prunes. Retention works like
restic's `--keep-hourly/--keep-daily`: keep the newest backup of each of the last
KEEP_HOURLY hours that have one, and the newest of each of the last KEEP_DAILY days (UTC)
that have one; the newest backup is always kept. Only complete backups (with a manifest)
count; leftovers of an interrupted run are removed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog

from dovecote.files import private_dir
from dovecote.ops import metrics
from dovecote.ops.backup import (
    MANIFEST_SUFFIX,
    PARTIAL_SUFFIX,
    BackupError,
    BackupFiles,
    Manifest,
    make_backup,
    sqlite_path,
)

log = structlog.get_logger("dovecote.backup")

PREFIX = "dovecote-"
SUFFIX = ".db"
FIRST_BACKUP_DELAY = 30.0  # after start, unless a recent backup exists already
RETRY_AFTER_FAILURE = 60.0


def kept(stamps: Iterable[float], keep_hourly: int, keep_daily: int) -> set[float]:
    """Which backup times (UNIX seconds) retention keeps."""
    ordered = sorted(set(stamps), reverse=True)
    keep = set(ordered[:1])
    for width, count in ((3600, keep_hourly), (86_400, keep_daily)):
        buckets: set[int] = set()
        for stamp in ordered:
            bucket = int(stamp // width)
            if bucket in buckets:
                continue
            if len(buckets) >= count:
                break
            buckets.add(bucket)
            keep.add(stamp)
    return keep


def existing(backup_dir: Path) -> dict[Path, float]:
    """Complete scheduled backups in a directory and their snapshot times."""
    found: dict[Path, float] = {}
    for manifest_path in backup_dir.glob(f"{PREFIX}*{SUFFIX}{MANIFEST_SUFFIX}"):
        database = Path(str(manifest_path).removesuffix(MANIFEST_SUFFIX))
        try:
            found[database] = Manifest.from_json(manifest_path.read_text()).created_at
        except (OSError, ValueError, TypeError, KeyError):
            log.warning("backup.unreadable_manifest", file=str(manifest_path))
    return found


def prune(backup_dir: Path, keep_hourly: int, keep_daily: int) -> list[Path]:
    """Delete what retention does not keep; return the databases removed."""
    backups = existing(backup_dir)
    keep = kept(backups.values(), keep_hourly, keep_daily)
    removed = []
    for database, stamp in sorted(backups.items(), key=lambda kv: kv[1]):
        if stamp in keep:
            continue
        files = BackupFiles.of(database)
        # Manifest first: a half-deleted backup must not look complete.
        for path in (files.manifest, files.database, files.identity):
            path.unlink(missing_ok=True)
        removed.append(database)
    for leftover in backup_dir.glob(f"{PREFIX}*{PARTIAL_SUFFIX}"):
        leftover.unlink(missing_ok=True)
    if removed:
        log.info("backup.pruned", count=len(removed), kept=len(backups) - len(removed))
    return removed


def name_for(ts: float) -> str:
    stamp = dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{PREFIX}{stamp}{int(ts * 1000) % 1000:03d}Z{SUFFIX}"


class BackupSchedule:
    """The background task that makes and prunes scheduled backups."""

    def __init__(
        self,
        db: Path,
        identity: Path,
        backup_dir: Path,
        interval: float,
        keep_hourly: int,
        keep_daily: int,
        key_file: Path | None = None,
    ) -> None:
        self.key_file = key_file
        self.db = db
        self.identity = identity
        self.backup_dir = backup_dir
        self.interval = interval
        self.keep_hourly = keep_hourly
        self.keep_daily = keep_daily

    async def run(self) -> None:
        private_dir(self.backup_dir)
        await asyncio.to_thread(prune, self.backup_dir, self.keep_hourly, self.keep_daily)
        backups = await asyncio.to_thread(existing, self.backup_dir)
        newest = max(backups.values(), default=None)
        if newest is not None:
            metrics.BACKUP_LAST_SUCCESS.set(newest)
            due = newest + self.interval
        else:
            due = time.time() + min(self.interval, FIRST_BACKUP_DELAY)
        while True:
            await asyncio.sleep(max(0.0, due - time.time()))
            due = time.time() + self.interval
            try:
                await self.backup_once()
            except (BackupError, OSError) as exc:
                metrics.BACKUP_FAILURES.inc()
                log.error("backup.failed", error=str(exc)[:500], dir=str(self.backup_dir))
                due = time.time() + min(self.interval, RETRY_AFTER_FAILURE)

    async def backup_once(self) -> Manifest:
        target = self.backup_dir / name_for(time.time())
        manifest = await asyncio.to_thread(
            make_backup, self.db, self.identity, target, key_file=self.key_file
        )
        metrics.BACKUP_LAST_SUCCESS.set(manifest.created_at)
        metrics.BACKUP_SECONDS.set(manifest.seconds)
        await asyncio.to_thread(prune, self.backup_dir, self.keep_hourly, self.keep_daily)
        return manifest


def from_settings(settings: Any, engine: str) -> BackupSchedule | None:
    """The schedule BACKUP_DIR asks for, or None (not set, or not a SQLite store)."""
    if settings.backup_dir is None:
        return None
    if engine != "sqlite":
        log.warning(
            "backup.not_scheduled",
            engine=engine,
            reason="BACKUP_DIR covers SQLite; use pg_basebackup + WAL archiving",
        )
        return None
    return BackupSchedule(
        sqlite_path(settings.store_url),
        settings.identity_path,
        settings.backup_dir,
        settings.backup_interval,
        settings.backup_keep_hourly,
        settings.backup_keep_daily,
        settings.backup_key_file,
    )
