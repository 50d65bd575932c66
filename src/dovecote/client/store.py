"""The client's local state in `DATA_DIR/client.db` (SQLite, WAL, synchronous=FULL).

The whole persisted layout is the schema below:

- `outbox`: every message `send()` accepted, with the exact bytes to transmit. A row is
  `pending` until an endpoint answers 2xx (`sent`) or retention runs out or the endpoint
  rejects it (`failed`). Failed rows stay until purged; `reported` records that the
  failure callback ran, so a crash between the two reports it again at the next start.
- `seen`: the most recent received message ids (bounded), for dedup across redeliveries.
- `room_cursors`: the last room sequence number handed to the application, per room.

Every write commits before the call returns; sqlite3 errors are translated to
`StoreFailure` here and never leak.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

from dovecote.client.errors import StoreFailure

DB_FILE = "client.db"
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,   -- message id (DIDComm id / Idempotency-Key)
    kind              TEXT NOT NULL,          -- 'didcomm' | 'room'
    target            TEXT NOT NULL,          -- recipient DID, or room id
    payload           BLOB NOT NULL,          -- the exact bytes sent on every attempt
    endpoints         TEXT NOT NULL,          -- JSON list of URLs, in failover order
    state             TEXT NOT NULL DEFAULT 'pending',  -- pending | sent | failed
    created_at        REAL NOT NULL,
    next_attempt_at   REAL NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    endpoint_index    INTEGER NOT NULL DEFAULT 0,
    endpoint_attempts INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT,
    done_at           REAL,
    reported          INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_target ON outbox (target, state, seq);
CREATE TABLE IF NOT EXISTS seen (
    n  INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS room_cursors (
    room TEXT PRIMARY KEY,
    seq  INTEGER NOT NULL
);
"""

State = Literal["pending", "sent", "failed"]


class ClientOutboxKind(StrEnum):
    """What an outbox row carries (the `kind` column)."""

    DIDCOMM = "didcomm"  # a packed DIDComm message, POSTed (or framed) to a relay endpoint
    ROOM = "room"  # a rooms post, sent in queue order per room


@dataclass
class OutboxItem:
    """One row of the outbox."""

    seq: int
    id: str
    kind: ClientOutboxKind
    target: str
    payload: bytes
    endpoints: list[str]
    state: State
    created_at: float
    next_attempt_at: float
    attempts: int
    endpoint_index: int
    endpoint_attempts: int
    last_error: str | None
    done_at: float | None

    @property
    def endpoint(self) -> str:
        return self.endpoints[self.endpoint_index % len(self.endpoints)]


_COLUMNS = (
    "seq, id, kind, target, payload, endpoints, state, created_at, next_attempt_at, "
    "attempts, endpoint_index, endpoint_attempts, last_error, done_at"
)


# A row is due when its time has come, or (`until`) when it was never tried and is due
# within the batching window.
_DUE = "(next_attempt_at <= :now OR (attempts = 0 AND next_attempt_at <= :until))"
# Posts to one room go out in the order they were queued: a post waits while an earlier
# post to the same room is still pending and not due itself.
_EARLIER_ROOM_POST_WAITING = (
    "SELECT 1 FROM outbox AS earlier WHERE outbox.kind = 'room' AND earlier.kind = 'room' "
    "AND earlier.target = outbox.target AND earlier.state = 'pending' "
    "AND earlier.seq < outbox.seq AND NOT (earlier.next_attempt_at <= :now "
    "OR (earlier.attempts = 0 AND earlier.next_attempt_at <= :until))"
)


def _item(row: Sequence[Any]) -> OutboxItem:
    values = list(row)
    values[5] = json.loads(values[5])
    values[4] = bytes(values[4])
    values[2] = ClientOutboxKind(values[2])
    return OutboxItem(*values)


class ClientStore:
    """Blocking SQLite calls run in a worker thread, one at a time."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / DB_FILE
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=10.0
            )
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed send() survives power loss, not only a process crash.
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreFailure(f"cannot open {self.path}: {exc}") from exc
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._db is None:
                raise StoreFailure("store is closed")
            with self._lock:
                try:
                    return fn(self._db)
                except sqlite3.Error as exc:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise StoreFailure(str(exc)) from exc

        return await asyncio.to_thread(call)

    # ------------------------------------------------------------------ outbox
    async def enqueue(
        self,
        items: Iterable[tuple[str, ClientOutboxKind, str, bytes, list[str]]],
        delay: float = 0.0,
    ) -> None:
        """Insert (id, kind, target, payload, endpoints) rows in one committed transaction;
        they become due after `delay` seconds."""
        now = time.time()
        rows = [(i, k, t, p, json.dumps(e), now, now + delay) for i, k, t, p, e in items]

        def write(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR IGNORE INTO outbox (id, kind, target, payload, endpoints, "
                "created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.execute("COMMIT")

        await self._run(write)

    async def due(self, limit: int, fresh_until: float | None = None) -> list[OutboxItem]:
        """Pending rows whose next attempt is due now, oldest first; with `fresh_until`,
        also never-tried rows due by then (a batch sent early; retries keep their backoff)."""
        now = time.time()
        until = now if fresh_until is None else max(now, fresh_until)
        return await self._run(
            lambda db: [
                _item(r)
                for r in db.execute(
                    f"SELECT {_COLUMNS} FROM outbox WHERE state = 'pending' AND {_DUE} "
                    f"AND NOT EXISTS ({_EARLIER_ROOM_POST_WAITING}) ORDER BY seq LIMIT :limit",
                    {"now": now, "until": until, "limit": limit},
                )
            ]
        )

    async def next_due_at(self) -> float | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT min(next_attempt_at) FROM outbox WHERE state = 'pending'"
            ).fetchone()
        )
        return None if row is None or row[0] is None else float(row[0])

    async def get(self, message_id: str) -> OutboxItem | None:
        rows = await self._run(
            lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (message_id,)
            ).fetchall()
        )
        return _item(rows[0]) if rows else None

    async def items(self, state: State | None = None, limit: int = 1000) -> list[OutboxItem]:
        where, args = ("WHERE state = ?", (state, limit)) if state else ("", (limit,))
        return await self._run(
            lambda db: [
                _item(r)
                for r in db.execute(
                    f"SELECT {_COLUMNS} FROM outbox {where} ORDER BY seq LIMIT ?", args
                )
            ]
        )

    async def counts(self) -> dict[str, int]:
        rows = await self._run(
            lambda db: db.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall()
        )
        return {"pending": 0, "sent": 0, "failed": 0} | {str(s): int(c) for s, c in rows}

    async def record(self, updates: Sequence[OutboxItem]) -> None:
        """Store the outcome of a flush (state, attempts, schedule) in one transaction."""
        rows = [
            (
                u.state,
                u.next_attempt_at,
                u.attempts,
                u.endpoint_index,
                u.endpoint_attempts,
                u.last_error,
                u.done_at,
                u.seq,
            )
            for u in updates
        ]

        def write(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "UPDATE outbox SET state = ?, next_attempt_at = ?, attempts = ?, "
                "endpoint_index = ?, endpoint_attempts = ?, last_error = ?, done_at = ? "
                "WHERE seq = ? AND state = 'pending'",
                rows,
            )
            db.execute("COMMIT")

        if rows:
            await self._run(write)

    async def unreported_failures(self) -> list[OutboxItem]:
        return await self._run(
            lambda db: [
                _item(r)
                for r in db.execute(
                    f"SELECT {_COLUMNS} FROM outbox WHERE state = 'failed' AND reported = 0 "
                    "ORDER BY seq"
                )
            ]
        )

    async def mark_reported(self, seqs: Sequence[int]) -> None:
        await self._run(
            lambda db: db.executemany(
                "UPDATE outbox SET reported = 1 WHERE seq = ?", [(s,) for s in seqs]
            )
        )

    async def retry(self, ids: Sequence[str] | None = None) -> int:
        """Put failed rows (all, or those named) back in the queue with fresh attempts."""
        now = time.time()
        sql = (
            "UPDATE outbox SET state = 'pending', attempts = 0, endpoint_attempts = 0, "
            "endpoint_index = 0, next_attempt_at = ?, created_at = ?, done_at = NULL, "
            "reported = 0 WHERE state = 'failed'"
        )

        def write(db: sqlite3.Connection) -> int:
            if ids is None:
                return db.execute(sql, (now, now)).rowcount
            return sum(db.execute(sql + " AND id = ?", (now, now, i)).rowcount for i in ids)

        return await self._run(write)

    async def purge(self, states: Sequence[State], older_than: float | None = None) -> int:
        cutoff = time.time() - (older_than or 0.0)
        marks = ",".join("?" for _ in states)
        return await self._run(
            lambda db: (
                db.execute(
                    f"DELETE FROM outbox WHERE state IN ({marks}) AND coalesce(done_at, 0) <= ?",
                    (*states, cutoff),
                ).rowcount
            )
        )

    # ------------------------------------------------------------------ received ids
    async def seen(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        marks = ",".join("?" for _ in ids)
        return await self._run(
            lambda db: {
                r[0] for r in db.execute(f"SELECT id FROM seen WHERE id IN ({marks})", tuple(ids))
            }
        )

    async def remember(self, ids: Sequence[str], keep: int) -> None:
        """Record received ids, keeping only the newest `keep`."""

        def write(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR IGNORE INTO seen (id) VALUES (?)", [(i,) for i in ids])
            db.execute("DELETE FROM seen WHERE n <= (SELECT max(n) FROM seen) - ?", (keep,))
            db.execute("COMMIT")

        if ids:
            await self._run(write)

    # ------------------------------------------------------------------ rooms
    async def room_cursor(self, room: str) -> int | None:
        row = await self._run(
            lambda db: db.execute("SELECT seq FROM room_cursors WHERE room = ?", (room,)).fetchone()
        )
        return None if row is None else int(row[0])

    async def set_room_cursor(self, room: str, seq: int) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO room_cursors (room, seq) VALUES (?, ?) ON CONFLICT (room) "
                "DO UPDATE SET seq = max(seq, excluded.seq)",
                (room, seq),
            )
        )
