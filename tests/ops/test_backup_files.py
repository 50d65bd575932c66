"""The backup functions on their own: stepped copy under writes, verify, restore, retention."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from dovecote.ops import backup_schedule
from dovecote.ops.backup import (
    BackupError,
    BackupFiles,
    make_backup,
    restore_backup,
    verify_backup,
)
from dovecote.ops.lock import DataDirInUse, DataDirLock
from dovecote.store.sqlite import SQLiteStore

ROWS = 3000


@pytest.fixture
async def data_dir(tmp_path: Path) -> Path:
    """A data directory with a migrated Dovecote store, some rows and an identity file."""
    directory = tmp_path / "data"
    store = SQLiteStore(f"sqlite:///{directory / 'dovecote.db'}")
    await store.open()
    await store.close()
    conn = sqlite3.connect(directory / "dovecote.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO dead_letters (kind, target, payload, reason, created_at, dead_at) "
        "VALUES ('forward', 't', randomblob(900), 'test', 0, 0)",
        [()] * ROWS,
    )
    conn.execute("COMMIT")
    conn.close()
    fd = os.open(directory / "identity.json", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps({"ed25519": "a2V5", "x25519": "a2V5", "dids": []}).encode())
    os.close(fd)
    return directory


def test_stepped_backup_finishes_and_is_consistent_under_continuous_writes(
    data_dir: Path, tmp_path: Path
) -> None:
    db = data_dir / "dovecote.db"
    stop = threading.Event()
    writes: list[float] = []

    def writer() -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("PRAGMA synchronous=FULL")
        while not stop.is_set():
            conn.execute(
                "INSERT INTO dead_letters (kind, target, payload, reason, created_at, "
                "dead_at) VALUES ('forward', 't', randomblob(900), 'w', 0, 0)"
            )
            writes.append(time.monotonic())
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        # ~1,000 steps of 4 pages. Without the held read snapshot SQLite restarts a stepped
        # backup on every commit by another connection, and this would never finish.
        started = time.monotonic()
        manifest = make_backup(
            db, data_dir / "identity.json", tmp_path / "b" / "x.db", step_pages=4, step_sleep=0.001
        )
        finished = time.monotonic()
    finally:
        stop.set()
        thread.join()
    during = sum(1 for at in writes if started <= at <= finished)
    assert during > 10, "the writer must not be starved while the copy runs"
    assert manifest.tables["dead_letters"] >= ROWS
    found, problems = verify_backup(tmp_path / "b" / "x.db")
    assert found is not None and problems == []
    # The copy is the snapshot: exactly the rows counted, whatever was written meanwhile.
    copy = sqlite3.connect(tmp_path / "b" / "x.db")
    assert (
        copy.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        == manifest.tables["dead_letters"]
    )
    assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    copy.close()


def test_verify_reports_each_kind_of_damage(data_dir: Path, tmp_path: Path) -> None:
    file = tmp_path / "b.db"
    make_backup(data_dir / "dovecote.db", data_dir / "identity.json", file)
    files = BackupFiles.of(file)
    assert verify_backup(file)[1] == []
    with pytest.raises(BackupError, match="already exists"):
        make_backup(data_dir / "dovecote.db", data_dir / "identity.json", file)

    # One flipped byte in the middle of the database.
    original = files.database.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    files.database.write_bytes(bytes(damaged))
    assert any("checksum mismatch" in p for p in verify_backup(file)[1])
    with pytest.raises(BackupError, match="verification"):
        restore_backup(
            file, tmp_path / "r" / "dovecote.db", tmp_path / "r" / "identity.json", tmp_path / "r"
        )
    files.database.write_bytes(original)

    # Counts that do not match the file (checksum intact): caught by the count check.
    manifest_text = files.manifest.read_text()
    edited = json.loads(manifest_text)
    edited["tables"]["dead_letters"] += 1
    files.manifest.write_text(json.dumps(edited))
    assert any("table dead_letters" in p for p in verify_backup(file)[1])
    files.manifest.write_text(manifest_text)

    # Keys readable by others.
    files.identity.chmod(0o644)
    assert any("mode 644" in p for p in verify_backup(file)[1])
    files.identity.chmod(0o600)

    # A file that is not SQLite at all, with a manifest that matches its checksum.
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"x" * 8192)
    make_copy = json.loads(manifest_text)
    make_copy["database"] = {
        "name": junk.name,
        "bytes": 8192,
        "sha256": hashlib.sha256(b"x" * 8192).hexdigest(),
    }
    Path(f"{junk}.manifest.json").write_text(json.dumps(make_copy))
    Path(f"{junk}.identity.json").write_bytes(files.identity.read_bytes())
    os.chmod(f"{junk}.identity.json", 0o600)
    assert any("database" in p for p in verify_backup(junk)[1])

    files.manifest.unlink()
    assert verify_backup(file) == (None, [f"no manifest {files.manifest} (incomplete backup?)"])


def test_restore_refuses_a_held_or_occupied_directory_and_moves_old_files_aside(
    data_dir: Path, tmp_path: Path
) -> None:
    file = tmp_path / "b.db"
    make_backup(data_dir / "dovecote.db", data_dir / "identity.json", file)
    target = tmp_path / "target"

    with DataDirLock(target).acquire("serve"), pytest.raises(DataDirInUse, match="serve"):
        restore_backup(file, target / "dovecote.db", target / "identity.json", target)

    target.mkdir(exist_ok=True)
    (target / "dovecote.db").write_bytes(b"old store")
    (target / "dovecote.db-wal").write_bytes(b"old wal")  # must never meet the new file
    (target / "identity.json").write_text(json.dumps({"ed25519": "b3RoZXI=", "x25519": "eA=="}))
    with pytest.raises(BackupError, match="--force"):
        restore_backup(file, target / "dovecote.db", target / "identity.json", target)

    done = restore_backup(
        file, target / "dovecote.db", target / "identity.json", target, force=True
    )
    assert done.moved_aside is not None
    assert sorted(p.name for p in done.moved_aside.iterdir()) == [
        "dovecote.db",
        "dovecote.db-wal",
        "identity.json",
    ]
    assert not (target / "dovecote.db-wal").exists()
    assert (target / "dovecote.db").read_bytes() == file.read_bytes()
    assert (target / "identity.json").read_bytes() == (data_dir / "identity.json").read_bytes()
    assert (target / "identity.json").stat().st_mode & 0o777 == 0o600


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


def test_retention_keeps_newest_per_hour_and_per_day() -> None:
    stamps = [
        _ts(t)
        for t in (
            "2026-11-25T10:05",
            "2026-11-25T10:45",  # same hour: only 10:45 is that hour's
            "2026-11-25T09:30",
            "2026-11-25T08:30",
            "2026-11-25T07:30",
            "2026-11-24T23:00",
            "2026-11-24T12:00",  # yesterday: 23:00 is that day's
            "2026-11-23T18:00",
            "2026-11-20T18:00",
        )
    ]
    keep = backup_schedule.kept(stamps, keep_hourly=3, keep_daily=3)
    assert sorted(keep) == sorted(
        _ts(t)
        for t in (
            "2026-11-25T10:45",
            "2026-11-25T09:30",
            "2026-11-25T08:30",  # last 3 hours
            "2026-11-24T23:00",
            "2026-11-23T18:00",  # + newest of the 2 earlier days
        )
    )
    assert backup_schedule.kept(stamps, 0, 0) == {_ts("2026-11-25T10:45")}
    assert backup_schedule.kept([], 3, 3) == set()


def test_prune_deletes_whole_backups_and_leftovers(data_dir: Path, tmp_path: Path) -> None:
    backups = tmp_path / "scheduled"
    names = []
    for _ in range(3):
        names.append(backups / backup_schedule.name_for(time.time()))
        make_backup(data_dir / "dovecote.db", data_dir / "identity.json", names[-1])
        time.sleep(0.01)
    (backups / "dovecote-20000101T000000000Z.db.partial").write_bytes(b"interrupted")
    removed = backup_schedule.prune(backups, keep_hourly=1, keep_daily=1)
    assert sorted(removed) == sorted(names[:2])
    assert sorted(p.name for p in backups.iterdir()) == sorted(
        p.name
        for p in (
            BackupFiles.of(names[2]).database,
            BackupFiles.of(names[2]).identity,
            BackupFiles.of(names[2]).manifest,
        )
    )
