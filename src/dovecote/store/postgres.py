"""PostgreSQL engine: an asyncpg pool, one transaction per call, LISTEN/NOTIFY wake-ups.

What it supplies to the shared bodies (store/engine.py): `_PostgresTx` (row locks, the
advisory lock, `{rows}` as unnest), retries of what certainly did not commit, the
synchronous-standby check (store/pg_ha.py), and group commit of enqueues.

Several instances share one database. Concurrency is settled by the database, never by
process-local state: dedup by the (recipient, digest) primary key with ON CONFLICT, mailbox
limits by the row lock on the mailbox's totals row, outbox leases with FOR UPDATE SKIP
LOCKED. Acks, expiry sweeps and enqueue batches lock mailbox rows in one sorted order (an
enqueue batch claims its digests first, also sorted). So instances queue up behind each
other instead of deadlocking; a deadlock victim would be retried (it rolled back).

Group commit: concurrent enqueues wait in `_pending`; up to ENQUEUE_FLUSHERS tasks each
take what is there and store it in one transaction (a few multi-row statements, one
COMMIT, one NOTIFY statement), so a forward no longer costs its own 4-5 round trips and
COMMIT. Every caller is answered after that COMMIT, as before.

Wake-ups: a write wakes this instance's listeners itself after COMMIT (as SQLite does)
and sends `NOTIFY dovecote_mailbox, '<mediatee>'` in its transaction for the others; one
dedicated connection LISTENs, reconnects with backoff when it drops, and then wakes every
listener with WAKE_ALL, because notifications sent while it was away are lost.

`find_mediatee` answers are kept (every forward asks, registrations rarely change): a
keylist update sends `NOTIFY dovecote_recipient, '<base DID>'` in its transaction, and
every instance forgets that answer when the notification arrives (the writer itself
right after its COMMIT). Answers are used only while the LISTEN connection is up (it
going away forgets them all), a lookup that overlapped a forgetting is not kept, and
each answer is kept at most MEDIATEE_CACHE_SECONDS (what bounds a notification that never
comes: a LISTEN connection lost silently until its next probe, an older instance that
sends none).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
import structlog

from dovecote.errors import StorageFull, StoreError
from dovecote.ops import metrics
from dovecote.store import migrations
from dovecote.store.dialect import POSTGRES, Row, Tx
from dovecote.store.engine import SQLStore
from dovecote.store.operations import Enqueue, enqueue_batch
from dovecote.store.pg_ha import HOST_CONNECT_TIMEOUT, Hosts, is_sync_cancel
from dovecote.util import backoff
from dovecote.util.aio import wait_at_most
from dovecote.util.did import base_did, storable
from dovecote.util.lru import ByteLRU

log = structlog.get_logger("dovecote.store.postgres")

T = TypeVar("T")
Conn = Any  # asyncpg.Connection (asyncpg ships no type information)
Body = Callable[[Tx], Awaitable[T]]

# NOTIFY channels carrying the mediatee whose mailbox got a message / the room that got
# an event.
CHANNEL = "dovecote_mailbox"
ROOM_CHANNEL = "dovecote_room"
# ... and the recipient (base DID) whose registration changed.
RECIPIENT_CHANNEL = "dovecote_recipient"
# find_mediatee's answers (base DID -> mediatee or None): their budget, and how long one
# is used at most (a lookup per recipient every few seconds costs nothing).
MEDIATEE_CACHE_BYTES = 1024 * 1024
MEDIATEE_CACHE_SECONDS = 5.0
# application_name of the pooled connections and of the LISTEN connection.
APPLICATION_NAME = "dovecote"
LISTENER_NAME = "dovecote-listen"
# Passed to listeners after the LISTEN connection came back: anything may have arrived.
WAKE_ALL = "*"
# pg_advisory_xact_lock key serialising migrations across instances ('dovecote' in ASCII).
MIGRATION_LOCK = 0x646F7665636F7465
# Migrations may wait for another instance's migration and may rewrite big tables.
MIGRATION_TIMEOUT = 300.0
# Longest wait for one new connection; the requirements' pool/connect timeout.
CONNECT_TIMEOUT = 5.0
# Readiness must answer within 2 s, also when the database is gone.
PING_TIMEOUT = 2.0
# Attempts for a call that certainly did not commit (lost connection, deadlock victim).
ATTEMPTS = 3
RETRY_BASE_SECONDS = 0.1
# The LISTEN connection: how often it proves it is alive, and its reconnect backoff.
LISTENER_CHECK_SECONDS = 10.0
LISTENER_BACKOFF_MIN = 0.2
LISTENER_BACKOFF_MAX = 10.0
# NOTIFY payloads must stay under 8000 bytes; a longer mediatee wakes everyone instead.
MAX_NOTIFY_PAYLOAD = 7999
# Group commit of enqueues: at most this many batch transactions at once (the rest of the
# pool stays free for reads and other writes), each of at most ENQUEUE_BATCH_MAX messages.
ENQUEUE_FLUSHERS = 4
ENQUEUE_BATCH_MAX = 256

DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
)
DRIVER_OR_TIMEOUT: tuple[type[BaseException], ...] = (*DRIVER_ERRORS, TimeoutError)
# Connection lost / server restarting (class 08, 57P01-03), deadlock victim, serialisation.
_RETRY_SQLSTATES = {"57P01", "57P02", "57P03", "40001", "40P01"}


def _translate(exc: BaseException) -> StoreError:
    """Map asyncpg and socket errors to ours; nothing asyncpg leaks out of this module."""
    if getattr(exc, "sqlstate", None) == "53100":
        return StorageFull(f"store is full: {exc}")
    if isinstance(exc, TimeoutError):
        return StoreError("store call timed out")
    return StoreError(f"store error: {type(exc).__name__}: {exc}")


def _retryable(exc: BaseException) -> bool:
    """True when the call may be repeated: the server never saw it or rolled it back."""
    state = getattr(exc, "sqlstate", None) or ""
    if state.startswith("08") or state in _RETRY_SQLSTATES:
        return True
    return isinstance(exc, OSError)


def _is_gone(conn: Conn) -> bool:
    """True when a pooled connection closed under us (asyncpg then also detaches it)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # "released back to the pool": only a close does that
        return True


async def _keep_session(_conn: Conn) -> None:
    """The pool's reset on release. asyncpg's default sends `SELECT
    pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` on every release: a round
    trip per call (a sixth of the event loop's samples at saturation). Our pooled
    connections never change session state: advisory locks are transaction-scoped, no
    cursor outlives its transaction, only the dedicated connection LISTENs, nothing SETs
    outside the connect options. asyncpg still rolls back an open transaction and drops
    the connection's listeners before calling this."""


def _rowcount(status: str) -> int:
    """Rows touched, from a command tag such as 'UPDATE 3'."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _payload(key: str) -> str:
    # NOTIFY payloads must stay under 8000 bytes; a longer key wakes everyone instead.
    return key if len(key.encode()) <= MAX_NOTIFY_PAYLOAD else WAKE_ALL


class _PostgresTx(Tx):
    """Statements on one pooled asyncpg connection (statements need no rendering)."""

    dialect = POSTGRES
    replicated = True

    def __init__(self, conn: Conn) -> None:
        super().__init__()
        self.conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self.conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = await self.conn.fetchrow(sql, *args)
        return row

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        return _rowcount(await self.conn.execute(sql, *args))

    async def executemany(self, sql: str, args: Sequence[Row]) -> None:
        if args:
            await self.conn.executemany(sql, args)

    async def rows(self, sql: str, types: Sequence[str], rows: Sequence[Row]) -> list[Row]:
        if not rows:
            return []
        columns = [list(column) for column in zip(*rows, strict=True)]
        return list(await self.conn.fetch(POSTGRES.rows(sql, types, len(rows)), *columns))

    async def lock_mailboxes(self, mediatees: Sequence[str]) -> None:
        # One at a time, in the caller's (sorted) order: the global lock order.
        for mediatee in mediatees:
            await self.conn.execute(
                "SELECT 1 FROM mailboxes WHERE mediatee = $1 FOR UPDATE", mediatee
            )

    async def lock(self, name: str) -> None:
        await self.conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", name)

    async def send_notifications(self) -> None:
        """NOTIFY the other instances of every wake-up asked for, in one statement;
        PostgreSQL delivers them only on COMMIT."""
        pairs = [(CHANNEL, _payload(m)) for m in dict.fromkeys(self.woken_mailboxes)]
        pairs += [(ROOM_CHANNEL, _payload(r)) for r in dict.fromkeys(self.woken_rooms)]
        pairs += [(RECIPIENT_CHANNEL, _payload(r)) for r in dict.fromkeys(self.changed_recipients)]
        if pairs:
            await self.conn.execute(
                "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS n(c, p)",
                [c for c, _ in pairs],
                [p for _, p in pairs],
            )


class PostgresStore(SQLStore):
    """The scale-out store: any number of instances on one PostgreSQL database."""

    engine = "postgres"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        pool_size: int = 10,
        patroni: Sequence[str] = (),
        **_: Any,
    ) -> None:
        super().__init__()
        self.url = url
        self.timeout = timeout
        self.pool_size = max(1, int(pool_size))
        self._hosts = Hosts(url, patroni, connect_timeout=min(HOST_CONNECT_TIMEOUT, timeout))
        self._pool: Any = None
        self._own_pids: set[int] = set()
        # Backends whose last COMMIT stopped waiting for synchronous replication.
        self._sync_cancelled: set[int] = set()
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        # Enqueues waiting for the next batch transaction, and the tasks committing them.
        self._pending: list[tuple[Enqueue, asyncio.Future[None]]] = []
        self._flushers: set[asyncio.Task[None]] = set()
        # find_mediatee's answers with when each stops being used (monotonic), kept only
        # while the LISTEN connection is up; `_forgets` counts every forgetting, so a
        # lookup that overlapped one does not keep what it read.
        self._mediatees: ByteLRU[str, tuple[float, str | None]] = ByteLRU(MEDIATEE_CACHE_BYTES)
        self._forgets = 0
        self._listening = False

    # ------------------------------------------------------------------ plumbing
    def _connect_options(self, application_name: str = APPLICATION_NAME) -> dict[str, Any]:
        return {
            "timeout": min(self.timeout, CONNECT_TIMEOUT),
            "command_timeout": self.timeout,
            # Lets operators (and tests) tell our connections apart in pg_stat_activity.
            "server_settings": {"application_name": application_name},
        }

    async def _init_connection(self, conn: Conn) -> None:
        # Remember our own backends so our NOTIFY echo does not wake listeners twice.
        pid = conn.get_server_pid()
        self._own_pids.add(pid)
        conn.add_termination_listener(lambda _conn: self._own_pids.discard(pid))

    def _on_server_log(self, conn: Conn, message: Any) -> None:
        if is_sync_cancel(message):
            self._sync_cancelled.add(conn.get_server_pid())

    async def _call(self, op: str, fn: Body[T], *, write: bool) -> T:
        """Run `fn` on a pooled connection (in a transaction when writing), bounded by
        `timeout`, retrying only what certainly did not commit."""
        if self._pool is None:
            raise StoreError("store is not open")
        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation that
            # arrives with the result, and a shutdown then waits for good on the caller.
            async with asyncio.timeout(self.timeout):
                return await self._attempts(fn, write)
        except TimeoutError as exc:
            # A write may still commit after this; callers' retries are deduplicated.
            raise StoreError(f"store {op} timed out after {self.timeout:g}s") from exc
        except DRIVER_ERRORS as exc:
            raise _translate(exc) from exc
        finally:
            metrics.STORE_TX_SECONDS.labels(self.engine, "commit" if write else "read").observe(
                time.perf_counter() - started
            )

    async def _attempts(self, fn: Body[T], write: bool) -> T:
        for attempt in range(1, ATTEMPTS + 1):
            committing = broken = False
            try:
                async with self._pool.acquire() as conn:
                    tx = _PostgresTx(conn)
                    try:
                        if not write:
                            return await fn(tx)
                        pid = conn.get_server_pid()
                        self._sync_cancelled.discard(pid)
                        # Only while writing: the pool expects no listeners on release.
                        conn.add_log_listener(self._on_server_log)
                        try:
                            async with conn.transaction():
                                result = await fn(tx)
                                await tx.send_notifications()
                                committing = True
                            # A warning that came with COMMIT's reply reached its
                            # listener (call_soon) before we resumed; one more turn anyway.
                            await asyncio.sleep(0)
                        finally:
                            conn.remove_log_listener(self._on_server_log)
                            # Committed or maybe (a COMMIT whose answer was lost): forget.
                            self._forget_recipients(tx.changed_recipients)
                        if pid in self._sync_cancelled:
                            self._sync_cancelled.discard(pid)
                            log.warning("store.commit_unconfirmed", host=self._hosts.host_of(conn))
                            raise StoreError("commit not confirmed by a synchronous standby; retry")
                        self._wake(tx)
                        return result
                    except DRIVER_ERRORS:
                        # A pooled connection whose server went away fails in odd ways
                        # (even InternalClientError); what matters is that it is gone.
                        broken = _is_gone(conn)
                        raise
                    except asyncio.CancelledError:
                        # Our timeout: the server may be hung or still waiting for a
                        # standby. Its state is unknown, so never hand it out again.
                        conn.terminate()
                        raise
            except DRIVER_ERRORS as exc:
                # A connection lost during COMMIT leaves the outcome unknown: never repeat.
                if committing or attempt == ATTEMPTS or not (broken or _retryable(exc)):
                    raise
                log.info("store.retry", attempt=attempt, error=type(exc).__name__)
            # Uncapped: ATTEMPTS bounds it.
            await asyncio.sleep(backoff.delay(attempt - 1, RETRY_BASE_SECONDS, math.inf))
        raise AssertionError("unreachable")

    async def _read(self, body: Body[T]) -> T:
        return await self._call("read", body, write=False)

    async def _write(self, body: Body[T]) -> T:
        return await self._call("write", body, write=True)

    async def _enqueue(self, job: Enqueue) -> None:
        """Group commit: concurrent enqueues share one transaction (one round trip per
        statement for the whole batch, one COMMIT, one NOTIFY), and each caller is answered
        only after that COMMIT (and the synchronous standby, see `_attempts`)."""
        if self._pool is None:
            raise StoreError("store is not open")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Retrieved even when this caller stopped waiting (no "never retrieved" noise).
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending.append((job, done))
        if len(self._flushers) < min(ENQUEUE_FLUSHERS, self.pool_size):
            task = asyncio.create_task(self._flush_enqueues(), name="pg-enqueue")
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        try:
            async with asyncio.timeout(self.timeout):  # not wait_for: see _call
                await asyncio.shield(done)
        except TimeoutError as exc:
            # The batch may still commit later; callers' retries are deduplicated.
            raise StoreError(f"store enqueue timed out after {self.timeout:g}s") from exc

    async def _flush_enqueues(self) -> None:
        """Commit what is pending, batch after batch, until nothing is."""
        while self._pending:
            batch = self._pending[:ENQUEUE_BATCH_MAX]
            del self._pending[:ENQUEUE_BATCH_MAX]
            jobs = [job for job, _ in batch]

            async def body(tx: Tx, jobs: list[Enqueue] = jobs) -> None:
                await enqueue_batch(tx, jobs, time.time())

            try:
                await self._write(body)
            except Exception as exc:  # any failure: every caller of the batch hears it  # noqa: BLE001
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            except BaseException:  # cancelled (shutdown): so are its callers
                for _, done in batch:
                    done.cancel()
                raise
            metrics.GROUP_COMMIT_SIZE.observe(len(batch))
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    # ------------------------------------------------------------------ registrations
    async def find_mediatee(self, recipient: str) -> str | None:
        """The owner of `recipient`, kept between registration changes (module doc)."""
        base = base_did(recipient)
        if not storable(base):
            return None
        if not self._listening:
            return await super().find_mediatee(recipient)
        now = time.monotonic()
        known = self._mediatees.get(base)
        if known is not None and known[0] > now:
            return known[1]
        forgets = self._forgets
        mediatee = await super().find_mediatee(recipient)
        if forgets == self._forgets and self._listening:
            self._mediatees.put(
                base,
                (now + MEDIATEE_CACHE_SECONDS, mediatee),
                size=2 * len(base) + 2 * len(mediatee or ""),
            )
        return mediatee

    def _forget_recipients(self, recipients: Sequence[str]) -> None:
        if not recipients:
            return
        self._forgets += 1
        for recipient in recipients:
            if recipient == WAKE_ALL:
                self._forget_all()
                return
            self._mediatees.pop(recipient)

    def _forget_all(self) -> None:
        self._forgets += 1
        self._mediatees = ByteLRU(MEDIATEE_CACHE_BYTES)

    def _wake_mailbox(self, mediatee: str) -> None:
        try:
            self._notify(mediatee)
        except Exception:  # a listener's bug must not fail a committed write
            log.exception("store.listener_callback_failed", mediatee=mediatee)

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        self._closing = False
        try:
            self._pool = await asyncio.wait_for(
                asyncpg.create_pool(
                    self.url,
                    min_size=1,
                    max_size=self.pool_size,
                    init=self._init_connection,
                    connect=self._hosts.connect,
                    reset=_keep_session,
                    **self._connect_options(),
                ),
                CONNECT_TIMEOUT + self.timeout,
            )
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                await asyncio.wait_for(self._migrate(conn), MIGRATION_TIMEOUT)
            listen_conn = await self._listen_connect()
        except DRIVER_OR_TIMEOUT as exc:
            await self._close_pool()
            raise _translate(exc) from exc
        except BaseException:
            await self._close_pool()
            raise
        self._listening = True
        self._listener = asyncio.create_task(self._listen(listen_conn), name="pg-listen")
        self._hosts.start()
        log.info("store.opened", engine=self.engine, pool_size=self.pool_size)

    async def _migrate(self, conn: Conn) -> None:
        # One transaction under an advisory lock: instances starting together take turns,
        # and the later ones find the work done.
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK, timeout=MIGRATION_TIMEOUT
            )
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
            )
            done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in migrations.load("postgres"):
                if version in done:
                    continue
                await conn.execute(sql, timeout=MIGRATION_TIMEOUT)
                await conn.execute(
                    "INSERT INTO schema_migrations VALUES ($1, $2, $3)",
                    version,
                    name,
                    time.time(),
                )
                log.info("store.migrated", engine=self.engine, version=version, name=name)

    async def close(self) -> None:
        self._closing = True
        self._listening = False
        # Pending enqueues commit (or fail) before the pool goes.
        if self._flushers:
            await asyncio.gather(*self._flushers, return_exceptions=True)
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
        await self._close_pool()
        # Also the LISTEN connection when its task was cancelled before it ran.
        await self._hosts.close()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self.timeout)
        except DRIVER_OR_TIMEOUT:
            pool.terminate()

    async def ping(self) -> None:
        """Ready only on a writable leader: a standby (after a switchover) or a node
        Patroni no longer calls the leader fails the check and loses its connections."""
        if self._pool is None:
            raise StoreError("store is not open")
        if self._hosts.watching and not self._hosts.leaders:
            raise StoreError("no PostgreSQL node holds the Patroni leader lock")
        try:
            async with asyncio.timeout(min(self.timeout, PING_TIMEOUT)):  # see _call
                await self._ping()
        except DRIVER_OR_TIMEOUT as exc:
            raise _translate(exc) from exc

    async def _ping(self) -> None:
        async with self._pool.acquire() as conn:
            try:
                standby = await conn.fetchval("SELECT pg_is_in_recovery()")
            except asyncio.CancelledError:
                conn.terminate()
                raise
            if standby:
                host = self._hosts.host_of(conn)
                if host is not None:
                    self._hosts.drop(host, "in recovery (a standby)")
                raise StoreError(f"PostgreSQL host {host} is a standby, not the primary")

    # ------------------------------------------------------------------ wake-ups
    async def _listen_connect(self) -> Conn:
        conn = await self._hosts.connect(**self._connect_options(LISTENER_NAME))
        try:
            await conn.add_listener(CHANNEL, self._on_notification)
            await conn.add_listener(ROOM_CHANNEL, self._on_room_notification)
            await conn.add_listener(RECIPIENT_CHANNEL, self._on_recipient_notification)
        except BaseException:
            conn.terminate()
            raise
        return conn

    def _on_notification(self, _conn: Conn, pid: int, _channel: str, payload: str) -> None:
        if pid in self._own_pids:
            return  # our own enqueue; it woke local listeners right after COMMIT
        self._wake_mailbox(payload)

    def _on_room_notification(self, _conn: Conn, pid: int, _channel: str, payload: str) -> None:
        if pid not in self._own_pids:
            self.rooms.notify(payload)

    def _on_recipient_notification(
        self, _conn: Conn, _pid: int, _channel: str, payload: str
    ) -> None:
        # Our own too (already forgotten after its COMMIT; forgetting twice is harmless).
        self._forget_recipients([payload])

    async def _listen(self, conn: Conn | None) -> None:
        """Keep one LISTEN connection alive for as long as the store is open."""
        failures = 0
        while not self._closing:
            try:
                if conn is None:
                    conn = await self._listen_connect()
                    log.info("store.listener_reconnected")
                    # LISTENing again: from now on every change is heard of.
                    self._forget_all()
                    self._listening = True
                    # Notifications sent while we were away are gone: everyone looks again.
                    self._wake_mailbox(WAKE_ALL)
                    self.rooms.notify(WAKE_ALL)
                failures = 0
                await self._watch(conn)
                log.warning("store.listener_lost")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any driver or socket error: reconnect  # noqa: BLE001
                log.warning("store.listener_failed", error=str(exc)[:200], failures=failures + 1)
            finally:
                # Changes are no longer heard of: no kept answer is used until we are back.
                self._listening = False
                self._forget_all()
                if conn is not None:
                    conn.terminate()
                    conn = None
            wait = backoff.delay(failures, LISTENER_BACKOFF_MIN, LISTENER_BACKOFF_MAX, "equal")
            failures += 1
            await asyncio.sleep(wait)

    async def _watch(self, conn: Conn) -> None:
        """Return when the connection is gone; a silent network loss is found by a probe."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        while not lost.is_set() and not conn.is_closed():
            await wait_at_most(lost.wait(), LISTENER_CHECK_SECONDS)
            if not lost.is_set() and not conn.is_closed():
                await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT)
