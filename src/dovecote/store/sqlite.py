"""SQLite engine: WAL, synchronous=FULL, and group commit on one writer thread.

Why a writer thread of our own rather than aiosqlite: SQLite allows one writer at a time,
and an fsync per message caps accepts near the disk's fsync rate. The writer takes every
write waiting in its queue, runs each in a SAVEPOINT inside one transaction, commits once,
and only then answers each caller, so many concurrent accepts share one fsync while each
still learns its own outcome. Readers use their own connections (WAL lets them run beside
the writer).
"""

from __future__ import annotations

import asyncio
import errno
import json
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from dovecote.errors import MailboxFull, StorageFull, StoreError
from dovecote.files import private_file
from dovecote.ops import metrics
from dovecote.store import migrations
from dovecote.store.base import (
    DeadLetter,
    EnqueueResult,
    InstanceInfo,
    MailboxStatus,
    MailboxUsage,
    MediationState,
    NewMessage,
    NewOutboxItem,
    OutboxItem,
    OutboxTarget,
    QueueStats,
    RecipientConflict,
    RelayQuota,
    Store,
    StoredMessage,
    UpdateResult,
)
from dovecote.store.sqlite_rooms import SQLiteRoomsMixin
from dovecote.store.sqlite_v1 import SQLiteV1Mixin
from dovecote.util.did import base_did, storable

log = structlog.get_logger("dovecote.store.sqlite")

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], Any]

_STOP = object()


class _Write:
    __slots__ = ("fn", "future", "loop", "notify")

    def __init__(self, fn: WriteFn, loop: asyncio.AbstractEventLoop) -> None:
        self.fn = fn
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.notify: list[str] = []


def _translate(exc: BaseException) -> BaseException:
    """Map sqlite3 and OS errors to ours; nothing sqlite3 leaks out of this module."""
    if isinstance(exc, sqlite3.Error | OSError):
        if "full" in str(exc).lower() or getattr(exc, "errno", None) == errno.ENOSPC:
            return StorageFull(f"store is full: {exc}")
        return StoreError(f"store error: {exc}")
    return exc


class SQLiteStore(SQLiteRoomsMixin, SQLiteV1Mixin, Store):
    """The embedded default store."""

    engine = "sqlite"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        group_commit_max: int = 512,
        max_page_count: int | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        self.path = Path(url.removeprefix("sqlite:///").removeprefix("sqlite://"))
        self.timeout = timeout
        self.group_commit_max = group_commit_max
        self.max_page_count = max_page_count
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self.timeout
        )
        # Switching a new file to WAL needs a lock SQLite's busy handler does not wait
        # for, so several processes opening it at once retry here.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(0.02)
        # FULL: a commit is on disk (fsync'd) before we answer; NORMAL could lose the last
        # commits on power loss, which the 202 contract forbids.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        if self.max_page_count:
            conn.execute(f"PRAGMA max_page_count={int(self.max_page_count)}")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._readers is None:
            raise StoreError("store is not open")
        loop = asyncio.get_running_loop()

        def run() -> T:
            return fn(self._reader())

        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation that
            # arrives with the result, and a shutdown then waits for good on the caller.
            async with asyncio.timeout(self.timeout):
                return await loop.run_in_executor(self._readers, run)
        except TimeoutError as exc:
            raise StoreError("store read timed out") from exc
        except (sqlite3.Error, OSError) as exc:
            raise _translate(exc) from exc
        finally:
            metrics.STORE_TX_SECONDS.labels(self.engine, "read").observe(
                time.perf_counter() - started
            )

    async def _write(self, fn: WriteFn, notify: Sequence[str] = ()) -> Any:
        """Run `fn(conn)` inside the next group commit; return its result after COMMIT."""
        if self._writer is None or not self._writer.is_alive():
            raise StoreError("store is not open")
        job = _Write(fn, asyncio.get_running_loop())
        self._queue.put(job)
        try:
            async with asyncio.timeout(self.timeout):  # not wait_for: see _read
                return await asyncio.shield(job.future)
        except TimeoutError as exc:
            # The write may still commit later; callers' retries are deduplicated.
            raise StoreError("store write timed out") from exc

    def _writer_loop(self) -> None:
        conn = self._connect()
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch = [first]
                stop = False
                while len(batch) < self.group_commit_max:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stop = True
                        break
                    batch.append(nxt)
                self._commit_batch(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Write]) -> None:
        started = time.perf_counter()
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    result = job.fn(conn)
                    conn.execute("RELEASE job")
                    outcomes.append((True, result))
                except BaseException as exc:  # reported to that caller only  # noqa: BLE001
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((False, _translate(exc)))
            conn.execute("COMMIT")
        except BaseException as exc:  # the whole batch failed: every caller hears  # noqa: BLE001
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            error = _translate(exc)
            if not isinstance(error, StoreError):
                error = StoreError(f"commit failed: {exc}")
            log.error("store.commit_failed", error=str(exc), batch=len(batch))
            outcomes = [(False, error)] * len(batch)
        elapsed = time.perf_counter() - started
        metrics.STORE_TX_SECONDS.labels(self.engine, "commit").observe(elapsed)
        metrics.GROUP_COMMIT_SIZE.observe(len(batch))
        for job, (ok, value) in zip(batch, outcomes, strict=True):
            job.loop.call_soon_threadsafe(self._resolve, job, ok, value)

    def _resolve(self, job: _Write, ok: bool, value: Any) -> None:
        if job.future.done():
            return
        if ok:
            job.future.set_result(value)
            if isinstance(value, _Notifying):
                for mediatee in value.mediatees:
                    self._notify(mediatee)
        else:
            job.future.set_exception(value)

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if str(self.path) != ":memory:":
                private_file(self.path)
        except OSError as exc:
            raise _translate(exc) from exc
        await asyncio.to_thread(self._migrate)
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sqlite-read")
        self._writer = threading.Thread(target=self._writer_loop, name="sqlite-writer", daemon=True)
        self._writer.start()
        log.info("store.opened", engine=self.engine, path=str(self.path))

    def _migrate(self) -> None:
        try:
            conn = self._connect()
        except (sqlite3.Error, OSError) as exc:
            raise _translate(exc) from exc
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for version, name, sql in migrations.load("sqlite"):
                if version in done:
                    continue
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # Another process opening the same file may have applied it meanwhile.
                    if conn.execute(
                        "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
                    ).fetchone():
                        conn.execute("COMMIT")
                        continue
                    for statement in _split_sql(sql):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                        (version, name, time.time()),
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                log.info("store.migrated", engine=self.engine, version=version, name=name)
        except (sqlite3.Error, OSError) as exc:
            raise _translate(exc) from exc
        finally:
            conn.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._writer.join, 30)
            self._writer = None
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    async def schema_version(self) -> int:
        row = await self._read(
            lambda c: c.execute(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
            ).fetchone()
        )
        return int(row[0])

    # ------------------------------------------------------------------ mediation
    async def set_mediation(self, did: str, state: MediationState, routing_did: str) -> None:
        now = time.time()

        def fn(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO mediations (did, state, routing_did, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (did) DO UPDATE SET "
                "state = excluded.state, routing_did = excluded.routing_did, "
                "updated_at = excluded.updated_at",
                (did, state, routing_did, now, now),
            )

        await self._write(fn)

    async def get_mediation(self, did: str) -> MediationState | None:
        if not storable(did):
            return None
        row = await self._read(
            lambda c: c.execute("SELECT state FROM mediations WHERE did = ?", (did,)).fetchone()
        )
        return row[0] if row else None

    async def update_recipients(
        self, mediatee: str, updates: Sequence[tuple[str, str]]
    ) -> list[UpdateResult]:
        now = time.time()

        def fn(c: sqlite3.Connection) -> list[UpdateResult]:
            results: list[UpdateResult] = []
            for given, action in updates:
                # One owner per identity: every form of a DID registers its base DID.
                recipient = base_did(given)
                if not storable(recipient):
                    results.append("client_error")
                    continue
                if action == "add":
                    owner = c.execute(
                        "SELECT mediatee FROM recipients WHERE recipient = ?", (recipient,)
                    ).fetchone()
                    if owner is None:
                        c.execute(
                            "INSERT INTO recipients (recipient, mediatee, created_at) "
                            "VALUES (?, ?, ?)",
                            (recipient, mediatee, now),
                        )
                        results.append("success")
                    elif owner[0] == mediatee:
                        results.append("no_change")
                    else:
                        # Someone else's recipient DID: refusing keeps mailboxes separate.
                        results.append("client_error")
                elif action == "remove":
                    cur = c.execute(
                        "DELETE FROM recipients WHERE recipient = ? AND mediatee = ?",
                        (recipient, mediatee),
                    )
                    results.append("success" if cur.rowcount else "no_change")
                else:
                    results.append("client_error")
            return results

        result: list[UpdateResult] = await self._write(fn)
        return result

    async def list_recipients(
        self, mediatee: str, offset: int, limit: int
    ) -> tuple[list[str], int]:
        offset, limit = _page(offset, limit)

        def fn(c: sqlite3.Connection) -> tuple[list[str], int]:
            total = c.execute(
                "SELECT COUNT(*) FROM recipients WHERE mediatee = ?", (mediatee,)
            ).fetchone()[0]
            rows = c.execute(
                "SELECT recipient FROM recipients WHERE mediatee = ? ORDER BY recipient "
                "LIMIT ? OFFSET ?",
                (mediatee, limit, offset),
            ).fetchall()
            return [r[0] for r in rows], int(total)

        return await self._read(fn)

    async def find_mediatee(self, recipient: str) -> str | None:
        base = base_did(recipient)
        if not storable(base):
            return None

        def fn(c: sqlite3.Connection) -> str | None:
            row = c.execute(
                "SELECT mediatee FROM recipients WHERE recipient = ?", (base,)
            ).fetchone()
            return str(row[0]) if row else None

        return await self._read(fn)

    async def recipient_conflicts(self) -> list[RecipientConflict]:
        def fn(c: sqlite3.Connection) -> list[RecipientConflict]:
            rows = c.execute(CONFLICTS_SQL).fetchall()
            return [RecipientConflict(*row) for row in rows]

        return await self._read(fn)

    # ------------------------------------------------------------------ mailboxes
    async def enqueue(
        self,
        message: NewMessage,
        *,
        max_messages: int,
        max_bytes: int,
        outbox: Sequence[NewOutboxItem] = (),
    ) -> EnqueueResult:
        now = time.time()
        new_id = uuid.uuid4().hex
        size = len(message.body)

        def fn(c: sqlite3.Connection) -> Any:
            row = c.execute(
                "SELECT message_id FROM dedup WHERE recipient = ? AND digest = ?",
                (message.recipient, message.digest),
            ).fetchone()
            if row:
                return EnqueueResult(id=row[0], duplicate=True)
            box = c.execute(
                "SELECT message_count, total_bytes FROM mailboxes WHERE mediatee = ?",
                (message.mediatee,),
            ).fetchone()
            count, total = box if box else (0, 0)
            if count + 1 > max_messages or total + size > max_bytes:
                raise MailboxFull(
                    f"mailbox holds {count} messages / {total} bytes "
                    f"(limits {max_messages} / {max_bytes})"
                )
            c.execute(
                "INSERT INTO messages (id, mediatee, recipient, body, size, received_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    new_id,
                    message.mediatee,
                    message.recipient,
                    message.body,
                    size,
                    now,
                    message.expires_at,
                ),
            )
            c.execute(
                "INSERT INTO mailboxes (mediatee, message_count, total_bytes) VALUES (?, 1, ?) "
                "ON CONFLICT (mediatee) DO UPDATE SET message_count = message_count + 1, "
                "total_bytes = total_bytes + excluded.total_bytes",
                (message.mediatee, size),
            )
            c.execute(
                "INSERT INTO dedup (recipient, digest, message_id, created_at) VALUES (?, ?, ?, ?)",
                (message.recipient, message.digest, new_id, now),
            )
            _insert_outbox(c, outbox, now)
            return _Notifying(EnqueueResult(id=new_id, duplicate=False), [message.mediatee])

        result = await self._write(fn)
        if isinstance(result, _Notifying):
            result = result.value
        assert isinstance(result, EnqueueResult)
        return result

    async def status(self, mediatee: str, recipient: str | None = None) -> MailboxStatus:
        def fn(c: sqlite3.Connection) -> MailboxStatus:
            if recipient is None:
                # Running totals and the two ends of the (mediatee, seq) index: the cost
                # does not grow with the queue (a COUNT over 1M rows took seconds).
                row = c.execute(STATUS_SQL.replace("$1", "?1"), (mediatee,)).fetchone()
            else:
                row = c.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(received_at), "
                    "MAX(received_at) FROM messages WHERE mediatee = ? AND recipient IN "
                    "(SELECT value FROM json_each(?))",
                    (mediatee, json.dumps(_recipient_candidates(recipient))),
                ).fetchone()
            return MailboxStatus(int(row[0]), int(row[1]), row[2], row[3])

        return await self._read(fn)

    async def fetch(
        self,
        mediatee: str,
        limit: int,
        recipient: str | None = None,
        after_seq: int = 0,
    ) -> list[StoredMessage]:
        def fn(c: sqlite3.Connection) -> list[StoredMessage]:
            if recipient is None:
                rows = c.execute(
                    "SELECT id, seq, mediatee, recipient, body, received_at, expires_at "
                    "FROM messages WHERE mediatee = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (mediatee, after_seq, limit),
                ).fetchall()
            else:
                rows = c.execute(
                    "SELECT id, seq, mediatee, recipient, body, received_at, expires_at "
                    "FROM messages WHERE mediatee = ? AND seq > ? AND recipient IN "
                    "(SELECT value FROM json_each(?)) ORDER BY seq LIMIT ?",
                    (mediatee, after_seq, json.dumps(_recipient_candidates(recipient)), limit),
                ).fetchall()
            return [StoredMessage(*row) for row in rows]

        return await self._read(fn)

    async def last_seq(self, mediatee: str) -> int:
        def fn(c: sqlite3.Connection) -> int:
            row = c.execute(
                "SELECT MAX(seq) FROM messages WHERE mediatee = ?", (mediatee,)
            ).fetchone()
            return int(row[0] or 0)

        result: int = await self._read(fn)
        return result

    async def ack(self, mediatee: str, ids: Sequence[str]) -> list[StoredMessage]:
        wanted = list(dict.fromkeys(ids))

        def fn(c: sqlite3.Connection) -> list[StoredMessage]:
            removed: list[StoredMessage] = []
            for chunk_start in range(0, len(wanted), 500):
                chunk = wanted[chunk_start : chunk_start + 500]
                # `+mediatee` keeps the planner on the unique id index: with the mailbox
                # index it walked the whole mailbox (320 ms per ack at 1M queued, 2 ms now).
                rows = c.execute(
                    "DELETE FROM messages WHERE +mediatee = ? AND id IN "
                    "(SELECT value FROM json_each(?)) "
                    "RETURNING id, seq, mediatee, recipient, body, received_at, expires_at",
                    (mediatee, json.dumps(chunk)),
                ).fetchall()
                removed.extend(StoredMessage(*row) for row in rows)
            removed.sort(key=lambda m: m.seq)  # queue order, as on PostgreSQL
            if removed:
                c.execute(
                    "UPDATE mailboxes SET message_count = message_count - ?, "
                    "total_bytes = total_bytes - ? WHERE mediatee = ?",
                    (len(removed), sum(len(m.body) for m in removed), mediatee),
                )
            return removed

        result: list[StoredMessage] = await self._write(fn)
        return result

    async def expire(self, now: float, dedup_before: float, limit: int = 1000) -> int:
        def fn(c: sqlite3.Connection) -> int:
            rows = c.execute(
                "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages "
                "WHERE expires_at <= ? ORDER BY expires_at LIMIT ?) "
                "RETURNING id, mediatee, recipient, body, size, received_at",
                (now, limit),
            ).fetchall()
            per_box: dict[str, tuple[int, int]] = {}
            for msg_id, mediatee, recipient, body, size, received_at in rows:
                count, total = per_box.get(mediatee, (0, 0))
                per_box[mediatee] = (count + 1, total + size)
                c.execute(
                    "INSERT INTO dead_letters (kind, target, payload, headers, reason, history, "
                    "created_at, dead_at) VALUES ('mailbox', ?, ?, ?, 'expired', '[]', ?, ?)",
                    (
                        recipient,
                        body,
                        json.dumps({"message_id": msg_id, "mediatee": mediatee}),
                        received_at,
                        now,
                    ),
                )
            for mediatee, (count, total) in per_box.items():
                c.execute(
                    "UPDATE mailboxes SET message_count = message_count - ?, "
                    "total_bytes = total_bytes - ? WHERE mediatee = ?",
                    (count, total, mediatee),
                )
            c.execute("DELETE FROM dedup WHERE created_at < ?", (dedup_before,))
            c.execute("DELETE FROM outbox_keys WHERE created_at < ?", (dedup_before,))
            return len(rows)

        result: int = await self._write(fn)
        return result

    # ------------------------------------------------------------------ outbox
    async def outbox_add(
        self, items: Sequence[NewOutboxItem], quota: RelayQuota | None = None
    ) -> list[int]:
        now = time.time()

        def fn(c: sqlite3.Connection) -> list[int]:
            if quota is not None:
                check_relay_quota(c, quota, items)
            return _insert_outbox(c, items, now)

        result: list[int] = await self._write(fn)
        return result

    async def outbox_lease(
        self,
        kinds: Sequence[str],
        owner: str,
        limit: int,
        lease_seconds: float,
        exclude_targets: Sequence[str] = (),
    ) -> list[OutboxItem]:
        now = time.time()

        def fn(c: sqlite3.Connection) -> list[OutboxItem]:
            rows = c.execute(
                "UPDATE outbox SET lease_owner = ?, lease_until = ? WHERE id IN ("
                " SELECT id FROM outbox WHERE kind IN (SELECT value FROM json_each(?))"
                " AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until < ?)"
                " AND target NOT IN (SELECT value FROM json_each(?))"
                " ORDER BY next_attempt_at LIMIT ?) "
                "RETURNING id, kind, target, payload, headers, created_at, next_attempt_at, "
                "attempts, history",
                (
                    owner,
                    now + lease_seconds,
                    json.dumps(list(kinds)),
                    now,
                    now,
                    json.dumps(list(exclude_targets)),
                    limit,
                ),
            ).fetchall()
            return [_outbox_item(row) for row in rows]

        result: list[OutboxItem] = await self._write(fn)
        return result

    async def outbox_done(self, item_id: int, owner: str) -> None:
        await self._write(
            lambda c: c.execute(
                "DELETE FROM outbox WHERE id = ? AND lease_owner = ?", (item_id, owner)
            )
        )

    async def outbox_retry(
        self,
        item_id: int,
        owner: str,
        next_attempt_at: float,
        attempt: dict[str, Any],
        count_attempt: bool = True,
    ) -> None:
        def fn(c: sqlite3.Connection) -> None:
            row = c.execute(
                "SELECT history FROM outbox WHERE id = ? AND lease_owner = ?", (item_id, owner)
            ).fetchone()
            if row is None:
                return
            history = json.loads(row[0])
            if count_attempt:
                history.append(attempt)
            c.execute(
                "UPDATE outbox SET next_attempt_at = ?, attempts = attempts + ?, history = ?, "
                "lease_owner = NULL, lease_until = NULL WHERE id = ?",
                (next_attempt_at, 1 if count_attempt else 0, json.dumps(history[-100:]), item_id),
            )

        await self._write(fn)

    async def outbox_dead(
        self, item_id: int, owner: str, reason: str, attempt: dict[str, Any] | None
    ) -> None:
        now = time.time()

        def fn(c: sqlite3.Connection) -> None:
            row = c.execute(
                "DELETE FROM outbox WHERE id = ? AND lease_owner = ? "
                "RETURNING kind, target, payload, headers, history, created_at, dedup_key",
                (item_id, owner),
            ).fetchone()
            if row is None:
                return
            kind, target, payload, headers, history_json, created_at, dedup_key = row
            history = json.loads(history_json)
            if attempt:
                history.append(attempt)
            c.execute(
                "INSERT INTO dead_letters (kind, target, payload, headers, reason, history, "
                "created_at, dead_at, dedup_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    kind,
                    target,
                    payload,
                    headers,
                    reason,
                    json.dumps(history),
                    created_at,
                    now,
                    dedup_key,
                ),
            )

        await self._write(fn)

    async def outbox_release(self, owner: str) -> int:
        result: int = await self._write(
            lambda c: (
                c.execute(
                    "UPDATE outbox SET lease_owner = NULL, lease_until = NULL "
                    "WHERE lease_owner = ?",
                    (owner,),
                ).rowcount
            )
        )
        return result

    async def dlq_list(
        self,
        offset: int = 0,
        limit: int = 100,
        *,
        kind: str | None = None,
        target: str | None = None,
        reason: str | None = None,
    ) -> tuple[list[DeadLetter], int]:
        offset, limit = _page(offset, limit)
        clauses: list[str] = ["1 = 1"]
        params: list[Any] = []
        for value, test in (
            (kind, "kind = ?"),
            (target, "instr(target, ?) > 0"),
            (reason, "instr(reason, ?) > 0"),
        ):
            if value is not None:
                clauses.append(test)
                params.append(value)
        where = " AND ".join(clauses)

        def fn(c: sqlite3.Connection) -> tuple[list[DeadLetter], int]:
            total = c.execute(
                f"SELECT COUNT(*) FROM dead_letters WHERE {where}", params
            ).fetchone()[0]
            rows = c.execute(
                "SELECT id, kind, target, payload, headers, reason, history, created_at, "
                f"dead_at FROM dead_letters WHERE {where} ORDER BY id DESC LIMIT ? OFFSET ?",
                (*params, limit, offset),
            ).fetchall()
            return [_dead_letter(row) for row in rows], int(total)

        return await self._read(fn)

    async def dlq_get(self, item_id: int) -> DeadLetter | None:
        row = await self._read(
            lambda c: c.execute(
                "SELECT id, kind, target, payload, headers, reason, history, created_at, "
                "dead_at FROM dead_letters WHERE id = ?",
                (item_id,),
            ).fetchone()
        )
        return _dead_letter(row) if row else None

    async def dlq_replay(self, ids: Sequence[int] | None = None, target: str | None = None) -> int:
        now = time.time()

        def fn(c: sqlite3.Connection) -> int:
            where, params = _dlq_filter(ids, target, None)
            rows = c.execute(
                f"DELETE FROM dead_letters WHERE {where} AND kind != 'mailbox' "
                "RETURNING kind, target, payload, headers, history, dedup_key",
                params,
            ).fetchall()
            for kind, tgt, payload, headers, history, dedup_key in rows:
                replay_note = {"at": now, "event": "replayed"}
                # With its dedup key: an identical pending item absorbs the replay.
                c.execute(
                    "INSERT INTO outbox (kind, target, payload, headers, created_at, "
                    "next_attempt_at, attempts, history, dedup_key) "
                    "VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?) ON CONFLICT (dedup_key) DO NOTHING",
                    (
                        kind,
                        tgt,
                        payload,
                        headers,
                        now,
                        now,
                        json.dumps([*json.loads(history), replay_note][-100:]),
                        dedup_key,
                    ),
                )
            return len(rows)

        result: int = await self._write(fn)
        return result

    async def dlq_purge(
        self, ids: Sequence[int] | None = None, older_than: float | None = None
    ) -> int:
        def fn(c: sqlite3.Connection) -> int:
            where, params = _dlq_filter(ids, None, older_than)
            return int(c.execute(f"DELETE FROM dead_letters WHERE {where}", params).rowcount)

        result: int = await self._write(fn)
        return result

    # ------------------------------------------------------------------ cluster, stats
    async def heartbeat(self, info: InstanceInfo) -> None:
        await self._write(
            lambda c: c.execute(
                "INSERT INTO instances (id, host, version, started_at, last_beat, level, "
                "connections) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "last_beat = excluded.last_beat, level = excluded.level, "
                "connections = excluded.connections",
                (
                    info.id,
                    info.host,
                    info.version,
                    info.started_at,
                    info.last_beat,
                    info.level,
                    info.connections,
                ),
            )
        )

    async def instances(self) -> list[InstanceInfo]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT id, host, version, started_at, last_beat, level, connections "
                "FROM instances ORDER BY last_beat DESC LIMIT 200"
            ).fetchall()
        )
        return [InstanceInfo(*row) for row in rows]

    async def queue_stats(self) -> QueueStats:
        def fn(c: sqlite3.Connection) -> QueueStats:
            queued = c.execute("SELECT COALESCE(SUM(message_count), 0) FROM mailboxes").fetchone()
            oldest = c.execute("SELECT MIN(received_at) FROM messages").fetchone()
            outbox_rows = c.execute(
                "SELECT kind, COUNT(*), MIN(next_attempt_at) FROM outbox GROUP BY kind"
            ).fetchall()
            dead = c.execute("SELECT COUNT(*) FROM dead_letters").fetchone()
            return QueueStats(
                queued=int(queued[0]),
                oldest_received_at=oldest[0],
                outbox={kind: int(n) for kind, n, _ in outbox_rows},
                outbox_oldest_due={kind: float(due) for kind, _, due in outbox_rows},
                dead_letters=int(dead[0]),
            )

        return await self._read(fn)

    async def mailbox_usage(self, order: str, limit: int) -> list[MailboxUsage]:
        sql = MAILBOX_OLDEST_SQL if order == "oldest" else MAILBOX_LARGEST_SQL
        rows = await self._read(
            lambda c: c.execute(sql.replace("$1", "?1"), (_page(0, limit)[1],)).fetchall()
        )
        return [MailboxUsage(*row) for row in rows]

    async def outbox_targets(self, limit: int) -> list[OutboxTarget]:
        rows = await self._read(
            lambda c: c.execute(
                OUTBOX_TARGETS_SQL.replace("$1", "?1"), (_page(0, limit)[1],)
            ).fetchall()
        )
        return [OutboxTarget(*row) for row in rows]


# Both engines (PostgreSQL uses them as they are, SQLite after $1 -> ?1).
MAILBOX_LARGEST_SQL = (
    "SELECT b.mediatee, b.message_count, b.total_bytes, "
    "(SELECT m.received_at FROM messages m WHERE m.mediatee = b.mediatee "
    "ORDER BY m.seq LIMIT 1) "
    "FROM mailboxes b WHERE b.message_count > 0 ORDER BY b.total_bytes DESC LIMIT $1"
)
# The oldest mailboxes are those holding the first messages in seq order: reading the
# head of the primary key stays cheap at any queue size (a MIN over every message does
# not). A window dominated by one mailbox may list fewer than `limit` mailboxes.
OLDEST_WINDOW = 10_000
MAILBOX_OLDEST_SQL = (
    "SELECT o.mediatee, b.message_count, b.total_bytes, o.oldest FROM "
    "(SELECT w.mediatee, MIN(w.received_at) AS oldest FROM "
    f"(SELECT mediatee, received_at FROM messages ORDER BY seq LIMIT {OLDEST_WINDOW}) AS w "
    "GROUP BY w.mediatee) AS o JOIN mailboxes b ON b.mediatee = o.mediatee "
    "ORDER BY o.oldest LIMIT $1"
)
OUTBOX_TARGETS_SQL = (
    "SELECT target, kind, COUNT(*), MIN(next_attempt_at), MAX(attempts), MIN(created_at) "
    "FROM outbox GROUP BY target, kind ORDER BY COUNT(*) DESC, target LIMIT $1"
)

STATUS_SQL = (
    "SELECT COALESCE((SELECT message_count FROM mailboxes WHERE mediatee = $1), 0), "
    "COALESCE((SELECT total_bytes FROM mailboxes WHERE mediatee = $1), 0), "
    "(SELECT received_at FROM messages WHERE mediatee = $1 ORDER BY seq LIMIT 1), "
    "(SELECT received_at FROM messages WHERE mediatee = $1 ORDER BY seq DESC LIMIT 1)"
)


class _Notifying:
    """A write result that should wake live listeners of these mailboxes after commit."""

    __slots__ = ("mediatees", "value")

    def __init__(self, value: Any, mediatees: list[str]) -> None:
        self.value = value
        self.mediatees = mediatees


# Registrations the identity migration (0004) refused, with what their mediatee still holds.
CONFLICTS_SQL = (
    "SELECT c.recipient, c.base, c.mediatee, c.owner, c.created_at, c.found_at, "
    "(SELECT COUNT(*) FROM messages m WHERE m.mediatee = c.mediatee "
    " AND m.recipient = c.recipient) FROM recipient_conflicts c ORDER BY c.found_at, c.recipient"
)


def _page(offset: int, limit: int) -> tuple[int, int]:
    """Paging numbers SQLite accepts (a huge offset is simply past the end)."""
    return max(0, min(int(offset), _MAX_INT64)), max(0, min(int(limit), _MAX_INT64))


_MAX_INT64 = 2**63 - 1


def _recipient_candidates(recipient: str) -> list[str]:
    """A recipient may be registered as a DID or a DID URL (key); match both forms."""
    base = recipient.split("#", 1)[0]
    return [recipient] if base == recipient else [recipient, base]


def check_relay_quota(
    c: sqlite3.Connection, quota: RelayQuota, items: Sequence[NewOutboxItem]
) -> None:
    """Raise (RelayQuota.check) if adding the new ones of `items` passes a relay quota."""
    fresh = [
        i
        for i in items
        if i.dedup_key is None
        or not c.execute(
            "SELECT 1 FROM outbox WHERE dedup_key = ? UNION ALL "
            "SELECT 1 FROM outbox_keys WHERE dedup_key = ?",
            (i.dedup_key, i.dedup_key),
        ).fetchone()
    ]
    row = c.execute(
        "SELECT COALESCE(SUM(substr(target, 1, ?) = ?), 0), "
        "COALESCE(SUM(CASE WHEN substr(target, 1, ?) = ? THEN length(payload) "
        "END), 0), COUNT(*), COALESCE(SUM(length(payload)), 0) "
        "FROM outbox WHERE kind = 'forward'",
        (len(quota.origin), quota.origin, len(quota.origin), quota.origin),
    ).fetchone()
    target_n, target_b, total_n, total_b = (int(v) for v in row)
    quota.check(
        (target_n, target_b, total_n, total_b), len(fresh), sum(len(i.payload) for i in fresh)
    )


def _insert_outbox(c: sqlite3.Connection, items: Sequence[NewOutboxItem], now: float) -> list[int]:
    ids: list[int] = []
    for item in items:
        if (
            item.remember
            and item.dedup_key is not None
            and c.execute(
                "INSERT INTO outbox_keys (dedup_key, created_at) VALUES (?, ?) "
                "ON CONFLICT (dedup_key) DO NOTHING RETURNING 1",
                (item.dedup_key, now),
            ).fetchone()
            is None
        ):
            continue  # added within the dedup window (maybe delivered since)
        row = c.execute(
            "INSERT INTO outbox (kind, target, payload, headers, dedup_key, created_at, "
            "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (dedup_key) DO NOTHING RETURNING id",
            (
                item.kind,
                item.target,
                item.payload,
                json.dumps(item.headers),
                item.dedup_key,
                now,
                now,
            ),
        ).fetchone()
        if row:
            ids.append(int(row[0]))
    return ids


def _outbox_item(row: Sequence[Any]) -> OutboxItem:
    (item_id, kind, target, payload, headers, created_at, next_at, attempts, history) = row
    return OutboxItem(
        id=item_id,
        kind=kind,
        target=target,
        payload=bytes(payload),
        headers=json.loads(headers),
        created_at=created_at,
        next_attempt_at=next_at,
        attempts=attempts,
        history=json.loads(history),
    )


def _dead_letter(row: Sequence[Any]) -> DeadLetter:
    (item_id, kind, target, payload, headers, reason, history, created_at, dead_at) = row
    return DeadLetter(
        id=item_id,
        kind=kind,
        target=target,
        payload=bytes(payload),
        headers=json.loads(headers),
        reason=reason,
        history=json.loads(history),
        created_at=created_at,
        dead_at=dead_at,
    )


def _dlq_filter(
    ids: Sequence[int] | None, target: str | None, older_than: float | None
) -> tuple[str, tuple[Any, ...]]:
    clauses = ["1 = 1"]
    params: list[Any] = []
    if ids is not None:
        clauses.append("id IN (SELECT value FROM json_each(?))")
        params.append(json.dumps([int(i) for i in ids]))
    if target is not None:
        clauses.append("target = ?")
        params.append(target)
    if older_than is not None:
        clauses.append("dead_at < ?")
        params.append(older_than)
    return " AND ".join(clauses), tuple(params)


def _split_sql(sql: str) -> list[str]:
    """Statements of a migration file; a ';' inside a string or comment does not split."""
    statements: list[str] = []
    start = 0
    for pos, char in enumerate(sql):
        if char == ";" and sqlite3.complete_statement(sql[start : pos + 1]):
            statements.append(sql[start : pos + 1])
            start = pos + 1
    statements.append(sql[start:])
    return [s.strip() for s in statements if _has_code(s)]


def _has_code(sql: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in sql.splitlines())
