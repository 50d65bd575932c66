"""SQLite engine: WAL, synchronous=FULL, and group commit on one writer thread.

Why a writer thread of our own rather than aiosqlite: SQLite allows one writer at a time,
and an fsync per message caps accepts near the disk's fsync rate. The writer takes every
write waiting in its queue, runs each in a SAVEPOINT inside one transaction, commits once,
and only then answers each caller, so many concurrent accepts share one fsync while each
still learns its own outcome. The enqueues of a batch run together, in one body and one
SAVEPOINT: one multi-row statement per step instead of a few statements per message.
Readers use their own connections (WAL lets them run beside the writer);
`find_mediatee`, once per forward, reads on the event loop's thread (see there).
"""

from __future__ import annotations

import asyncio
import errno
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from dovecote.errors import StorageFull, StoreError
from dovecote.files import private_file
from dovecote.ops import metrics
from dovecote.store import migrations
from dovecote.store.dialect import SQLITE, Row, Tx
from dovecote.store.engine import SQLStore
from dovecote.store.operations import Enqueue, enqueue_batch
from dovecote.util.did import base_did, storable
from dovecote.util.lru import ByteLRU

log = structlog.get_logger("dovecote.store.sqlite")

T = TypeVar("T")
Body = Callable[[Tx], Awaitable[T]]

_STOP = object()
# Group waits in a row that brought no other write before the writer stops waiting (and
# tries again once a second): a caller writing one message at a time gains nothing.
FRUITLESS_WAITS = 8
PROBE_SECONDS = 1.0
# The group wait in two parts. Every enqueue's group waits GROUP_SHORT_WAIT (or
# GROUP_COMMIT_WAIT when shorter) after its first write; one still smaller than
# GROUP_ENOUGH then waits on, up to GROUP_COMMIT_WAIT, until it is that large. Under load
# (a group of 16 within 8 ms: from ~2,000 forwards/s) that is the 8 ms wait that gave
# the largest groups; at 200/s a commit's fixed cost (the fsync and the wake-ups, ~500
# µs of CPU) is shared by ~4 messages instead of ~1.6. One wait of 20 ms for everyone
# held a closed loop of 64 clients to ~2,100/s where the CPU allowed twice that, and
# ending it at 16 writes made groups at saturation smaller and dearer (interleaved A/B).
GROUP_SHORT_WAIT = 0.008
GROUP_ENOUGH = 16
# find_mediatee's answers (base DID -> mediatee or None), keyed by client input.
MEDIATEE_CACHE_BYTES = 1024 * 1024
# The writer's temp_store for groups of enqueues only, and for everything else. Inside
# BEGIN every INSERT that may abort keeps a statement journal: the prior image of each
# page it changes. A group's dedup claims touch one random index leaf per message, so
# from ~16 messages on that journal passes SQLite's 64 KiB spill threshold and goes to
# a temp file in /var/tmp, created, written and deleted per commit (at saturation ~0.7
# files and ~70 page writes per commit, a third of the writer's pwrites). In memory it
# is bounded by the pages one group changes (GROUP_COMMIT_MAX enqueues, a few pages
# each; new pages are never journaled). Other writes (a room's cascade delete, sweeps)
# may change any number of existing pages, so they keep the file and its bound.
_TEMP_STORE_ENQUEUES = "MEMORY"
_TEMP_STORE_OTHER = "DEFAULT"


def _params(args: Sequence[Any]) -> tuple[Any, ...]:
    # SQLite binds no arrays: a list argument (`= ANY($n::type[])`) travels as JSON text.
    return tuple(json.dumps(a) if isinstance(a, list | tuple) else a for a in args)


class _SQLiteTx(Tx):
    """Statements on one sqlite3 connection; nothing here suspends (see `_run`)."""

    dialect = SQLITE

    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__()
        self.conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return self.conn.execute(SQLITE.render(sql), _params(args)).fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = self.conn.execute(SQLITE.render(sql), _params(args)).fetchone()
        return row

    async def execute(self, sql: str, *args: Any) -> int:
        return int(self.conn.execute(SQLITE.render(sql), _params(args)).rowcount)

    async def executemany(self, sql: str, args: Sequence[Row]) -> None:
        self.conn.executemany(SQLITE.render(sql), [_params(row) for row in args])

    async def rows(self, sql: str, types: Sequence[str], rows: Sequence[Row]) -> list[Row]:
        if not rows:
            return []
        statement = SQLITE.render(SQLITE.rows(sql, tuple(types), len(rows)))
        return self.conn.execute(statement, [v for row in rows for v in row]).fetchall()


def _run(body: Body[T], tx: Tx) -> T:
    """Run a transaction body to completion on this thread: over `_SQLiteTx` it never
    suspends, so one `send` finishes it (the body is shared with PostgreSQL's engine)."""
    coro = body(tx)
    assert isinstance(coro, Coroutine)
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("a SQLite transaction body suspended")


class _Write:
    """One caller's write: a transaction body, or an enqueue the writer groups with the
    other enqueues of its batch."""

    __slots__ = ("body", "enqueue", "future", "loop", "outcome", "submitted", "tx")

    def __init__(
        self,
        body: Body[Any] | None,
        loop: asyncio.AbstractEventLoop,
        enqueue: Enqueue | None = None,
    ) -> None:
        self.body = body
        self.enqueue = enqueue
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.submitted = time.monotonic()  # the group wait is bounded from here
        self.tx: Tx | None = None  # whose wake-ups to deliver after COMMIT
        self.outcome: tuple[bool, Any] = (False, None)


def _time_out(future: asyncio.Future[Any]) -> None:
    if not future.done():
        # The write may still commit later; callers' retries are deduplicated.
        future.set_exception(StoreError("store write timed out"))


def _translate(exc: BaseException) -> BaseException:
    """Map sqlite3 and OS errors to ours; nothing sqlite3 leaks out of this module."""
    if isinstance(exc, sqlite3.Error | OSError):
        if "full" in str(exc).lower() or getattr(exc, "errno", None) == errno.ENOSPC:
            return StorageFull(f"store is full: {exc}")
        return StoreError(f"store error: {exc}")
    return exc


def _switch_temp_store(conn: sqlite3.Connection, current: str, only_enqueues: bool) -> str:
    """Set the writer connection's temp_store for the next batch; the value it has now.

    Outside a transaction, and with no TEMP tables to drop: only the kind of storage for
    statement journals changes. Failing to go to memory costs only speed (the journal
    stays a file, as before); failing to go back raises, so the batch fails rather than
    run an unbounded journal in memory."""
    wanted = _TEMP_STORE_ENQUEUES if only_enqueues else _TEMP_STORE_OTHER
    if wanted == current:
        return current
    try:
        conn.execute(f"PRAGMA temp_store={wanted}")
    except sqlite3.Error as exc:
        if not only_enqueues:
            raise
        log.warning("store.temp_store_unchanged", error=str(exc))
        return current
    return wanted


class SQLiteStore(SQLStore):
    """The embedded default store."""

    engine = "sqlite"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        group_commit_max: int = 512,
        group_commit_wait: float = 0.0,
        max_page_count: int | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        self.path = Path(url.removeprefix("sqlite:///").removeprefix("sqlite://"))
        self.timeout = timeout
        self.group_commit_max = group_commit_max
        self.group_commit_wait = group_commit_wait
        # Waits in a row that brought no other write (see _gather).
        self._fruitless = 0
        self._probed = 0.0
        # The writes the writer waits for before its group is GROUP_ENOUGH (0: not
        # waiting), and the event that ends its wait then (see _gather).
        self._awaited = 0
        self._enough = threading.Event()
        self.max_page_count = max_page_count
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writing = False  # the writer thread runs and takes writes
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._lookup: sqlite3.Connection | None = None  # find_mediatee's, on the loop
        self._commit_seconds = metrics.STORE_TX_SECONDS.labels(self.engine, "commit")
        # find_mediatee's answers, each valid while no write other than an enqueue has
        # committed since it was read (`_writes`, bumped by the writer after such a
        # COMMIT and before any caller hears of it).
        self._mediatees: ByteLRU[str, tuple[int, str | None]] = ByteLRU(MEDIATEE_CACHE_BYTES)
        self._writes = 0

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

    async def _read(self, body: Body[T]) -> T:
        if self._readers is None:
            raise StoreError("store is not open")
        loop = asyncio.get_running_loop()

        def run() -> T:
            return _run(body, _SQLiteTx(self._reader()))

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

    async def _write(self, body: Body[T]) -> T:
        """Run `body(tx)` inside the next group commit; return its result after COMMIT."""
        result: T = await self._submit(_Write(body, asyncio.get_running_loop()))
        return result

    async def _enqueue(self, job: Enqueue) -> None:
        await self._submit(_Write(None, asyncio.get_running_loop(), enqueue=job))

    async def _submit(self, job: _Write) -> Any:
        if not self._writing:
            raise StoreError("store is not open")
        self._queue.put(job)
        awaited = self._awaited
        if awaited and self._queue.qsize() >= awaited:
            self._awaited = 0
            self._enough.set()  # the group is large enough: the writer stops waiting
        # One timer on the caller's future (asyncio.timeout builds a Timeout and
        # reschedules per call). A caller that stops waiting only ends its future, which
        # _resolve then skips: the write still commits and wakes its listeners.
        timer = job.loop.call_later(self.timeout, _time_out, job.future)
        try:
            return await job.future
        finally:
            timer.cancel()

    async def _read_small(self, body: Body[T]) -> T:
        # On the loop's thread, as find_mediatee: a few rows by index cost less than the
        # hop to a reader thread and back (each live push and acknowledgement makes two
        # or three such reads: ~100 us of CPU each through the pool, under load).
        if self._lookup is None:
            raise StoreError("store is not open")
        try:
            return _run(body, _SQLiteTx(self._lookup))
        except sqlite3.OperationalError:
            # Busy (busy_timeout=0 here): a reader thread may wait without holding the loop.
            return await self._read(body)
        except (sqlite3.Error, OSError) as exc:
            raise _translate(exc) from exc

    async def find_mediatee(self, recipient: str) -> str | None:
        # On the event loop's thread, not through the reader pool: a primary-key lookup
        # on a WAL database (readers never wait for the writer) costs less than the hop
        # to a thread and back, and every forward makes one. Its own connection sees
        # every committed registration, so nothing needs to be kept coherent.
        base = base_did(recipient)
        if not storable(base):
            return None
        if self._lookup is None:
            raise StoreError("store is not open")
        # A lookup right after a commit re-reads the pages (each commit resets the lookup
        # connection's page cache): ~50 us, ~10 us without a commit between. Enqueues
        # never change registrations, so between other writes the answer is kept. Only
        # this process writes a served SQLite store (DataDirLock; the CLI's store
        # commands change no registration).
        writes = self._writes
        known = self._mediatees.get(base)
        if known is not None and known[0] == writes:
            return known[1]
        try:
            row = self._lookup.execute(
                "SELECT mediatee FROM recipients WHERE recipient = ?", (base,)
            ).fetchone()
        except sqlite3.OperationalError:
            # Busy (a WAL reset or recovery; it never waits here, busy_timeout=0): ask a
            # reader thread, which may wait without holding up the loop.
            return await super().find_mediatee(recipient)
        except (sqlite3.Error, OSError) as exc:
            raise _translate(exc) from exc
        mediatee = str(row[0]) if row else None
        self._mediatees.put(base, (writes, mediatee), size=2 * len(base) + 2 * len(mediatee or ""))
        return mediatee

    def _writer_loop(self) -> None:
        try:
            conn = self._connect()
            temp_store = _TEMP_STORE_OTHER  # this connection's (see _commit_batch)
            try:
                while True:
                    first = self._queue.get()
                    if first is _STOP:
                        return
                    batch, stop = self._gather(first)
                    temp_store = self._commit_batch(conn, batch, temp_store)
                    if stop:
                        return
            finally:
                conn.close()
        finally:
            # Read by every submit: a plain attribute, not Thread.is_alive (a lock). A
            # writer that outlived its close() (join timed out) must not clear the flag
            # of the one a later open() started.
            if self._writer is threading.current_thread():
                self._writing = False

    def _gather(self, first: _Write) -> tuple[list[_Write], bool]:
        """The writes to commit with `first`, and whether _STOP came after them.

        Everything already queued joins. An enqueue also waits for company, 8 ms after
        it was submitted and then, while the group is smaller than GROUP_ENOUGH, up to
        GROUP_COMMIT_WAIT: a commit (fsync, the writer's and the
        loop's wake-ups) costs several hundred us of CPU, which groups of one pay per
        message at moderate rates. No write is answered before its COMMIT either way. A
        caller writing one message at a time gains nothing from the wait (its next write
        comes only after this commit): after FRUITLESS_WAITS fruitless waits in a row the
        writer stops waiting, and tries once a second whether company comes again.
        """
        batch = [first]
        if self._drain(batch):
            return batch, True
        if (
            self.group_commit_wait <= 0
            or first.enqueue is None
            or len(batch) >= self.group_commit_max
        ):
            return batch, False
        now = time.monotonic()
        if self._fruitless >= FRUITLESS_WAITS:
            if now - self._probed < PROBE_SECONDS:
                return batch, False
            self._probed = now
        short = min(self.group_commit_wait, GROUP_SHORT_WAIT)
        remaining = first.submitted + short - now
        joined = len(batch)
        waited = False
        if remaining > 0:
            # Asleep rather than waiting on the queue: a write joining the group then
            # wakes no thread (one futex wake-up per message less).
            time.sleep(remaining)
            waited = True
            if self._drain(batch):
                return batch, True
        enough = min(GROUP_ENOUGH, self.group_commit_max)
        remaining = first.submitted + self.group_commit_wait - time.monotonic()
        if len(batch) < enough and remaining > 0:
            # Still a small group: wait on for company, up to GROUP_COMMIT_WAIT, on an
            # event that only the write making the group GROUP_ENOUGH sets (_submit). A
            # wake-up missed in a race costs the rest of the wait.
            self._enough.clear()
            self._awaited = enough - len(batch)
            if self._queue.qsize() < self._awaited:
                self._enough.wait(remaining)
                waited = True
            self._awaited = 0
            if self._drain(batch):
                return batch, True
        if not waited:
            # It had waited in the queue long enough, or was large enough: not a wait
            # that brought nobody (a backlog must not make the writer stop waiting).
            return batch, False
        self._fruitless = self._fruitless + 1 if len(batch) == joined else 0
        if self._fruitless == FRUITLESS_WAITS:
            # Stopped waiting now: the first probe comes PROBE_SECONDS from here.
            self._probed = time.monotonic()
        return batch, False

    def _drain(self, batch: list[_Write]) -> bool:
        """Add what is queued now to `batch` (up to the group limit); True on _STOP."""
        while len(batch) < self.group_commit_max:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                return False
            if nxt is _STOP:
                return True
            batch.append(nxt)
        return False

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Write], temp_store: str) -> str:
        """Commit `batch`; the connection's temp_store afterwards (it was `temp_store`)."""
        started = time.perf_counter()
        # Only enqueues in it: no registration can change (find_mediatee's cache).
        only_enqueues = all(job.body is None for job in batch)
        try:
            temp_store = _switch_temp_store(conn, temp_store, only_enqueues)
            conn.execute("BEGIN IMMEDIATE")
            self._run_writes(conn, batch, only_enqueues)
            if conn.in_transaction:
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
            for job in batch:
                job.outcome, job.tx = (False, error), None
        if not only_enqueues:
            # After the COMMIT, before any caller hears of it: a lookup that read the
            # old rows had read the counter before, so its answer is no longer used.
            self._writes += 1
        self._commit_seconds.observe(time.perf_counter() - started)
        metrics.GROUP_COMMIT_SIZE.observe(len(batch))
        # One call per event loop for the whole group, not one per write: each call
        # writes to the loop's self-pipe (a syscall here, a wake-up there).
        loops: dict[asyncio.AbstractEventLoop, list[_Write]] = {}
        for job in batch:
            loops.setdefault(job.loop, []).append(job)
        for loop, jobs in loops.items():
            loop.call_soon_threadsafe(self._resolve_all, jobs)
        return temp_store

    def _run_writes(self, conn: sqlite3.Connection, batch: list[_Write], alone: bool) -> None:
        """Run the batch's writes in the open transaction (`alone`: only enqueues)."""
        enqueues = [job for job in batch if job.enqueue is not None]
        if enqueues:
            # All of the group's enqueues in one body: one multi-row statement per step
            # instead of a few statements per message.
            jobs = [job.enqueue for job in enqueues if job.enqueue is not None]

            def body(tx: Tx) -> Awaitable[None]:
                return enqueue_batch(tx, jobs, time.time())

            if alone:
                # Alone in the transaction: its failure rolls back all of it, as a
                # savepoint would, without SAVEPOINT and RELEASE in every commit.
                self._alone(conn, enqueues, body)
            else:
                self._savepoint(conn, enqueues, body)
        for job in batch:
            if job.body is not None:
                self._savepoint(conn, [job], job.body)

    @staticmethod
    def _alone(conn: sqlite3.Connection, jobs: list[_Write], body: Body[Any]) -> None:
        """Run `body` for `jobs`, the only writes of this transaction; on failure roll
        it back and report the error to them."""
        tx = _SQLiteTx(conn)
        try:
            result = _run(body, tx)
        except BaseException as exc:  # reported to these callers  # noqa: BLE001
            if conn.in_transaction:  # SQLite may have rolled it back itself (disk full)
                conn.execute("ROLLBACK")
            for job in jobs:
                job.outcome = (False, _translate(exc))
            return
        jobs[0].tx = tx  # its wake-ups, once for the group
        for job in jobs:
            job.outcome = (True, result)

    @staticmethod
    def _savepoint(conn: sqlite3.Connection, jobs: list[_Write], body: Body[Any]) -> None:
        """Run `body` for `jobs` in a savepoint: a failure is reported to them only."""
        conn.execute("SAVEPOINT job")
        tx = _SQLiteTx(conn)
        try:
            result = _run(body, tx)
            conn.execute("RELEASE job")
        except BaseException as exc:  # reported to these callers only  # noqa: BLE001
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            for job in jobs:
                job.outcome = (False, _translate(exc))
            return
        jobs[0].tx = tx  # its wake-ups, once for the group
        for job in jobs:
            job.outcome = (True, result)

    def _resolve_all(self, jobs: list[_Write]) -> None:
        for job in jobs:
            try:
                self._resolve(job, *job.outcome)
            except Exception as exc:  # one caller's failure must not strand the others  # noqa: BLE001
                job.loop.call_exception_handler(
                    {"message": "store write resolution failed", "exception": exc}
                )

    def _resolve(self, job: _Write, ok: bool, value: Any) -> None:
        if ok and job.tx is not None:
            self._wake(job.tx)  # committed, even if the caller stopped waiting
        if job.future.done():
            return
        if ok:
            job.future.set_result(value)
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
        self._writes += 1  # nothing read before this opening is kept
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sqlite-read")
        self._writer = threading.Thread(target=self._writer_loop, name="sqlite-writer", daemon=True)
        self._writing = True
        try:
            self._writer.start()
        except BaseException:
            self._writing = False
            self._writer = None
            raise
        self._lookup = await asyncio.to_thread(self._connect)
        self._lookup.execute("PRAGMA query_only=ON")
        self._lookup.execute("PRAGMA busy_timeout=0")
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
            # Before _STOP: a write submitted from here on is refused at once instead of
            # waiting behind it for its timeout.
            self._writing = False
            self._queue.put(_STOP)
            await asyncio.to_thread(self._writer.join, 30)
            self._writer = None
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
        if self._lookup is not None:
            self._lookup.close()
            self._lookup = None
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    async def ping(self) -> None:
        await self._read(lambda tx: tx.fetchval("SELECT 1"))


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
