"""PostgreSQL engine: an asyncpg pool, one transaction per call, LISTEN/NOTIFY wake-ups.

Several instances share one database. Concurrency is settled by the database, never by
process-local state: dedup by the (recipient, digest) primary key with ON CONFLICT, mailbox
limits by the row lock on the mailbox's totals row, outbox leases with FOR UPDATE SKIP
LOCKED. Acks and expiry sweeps lock a mailbox row before touching its messages (sweeps take
several in sorted order); an enqueue touches only rows nobody else can see yet and takes
the mailbox row last. So instances queue up behind each other instead of deadlocking.

Wake-ups: an enqueue wakes this instance's listeners itself after COMMIT (as SQLite does)
and sends `NOTIFY dovecote_mailbox, '<mediatee>'` in its transaction for the others; one
dedicated connection LISTENs, reconnects with backoff when it drops, and then wakes every
listener with WAKE_ALL, because notifications sent while it was away are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
import structlog

from dovecote.errors import MailboxFull, StorageFull, StoreError
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
from dovecote.store.pg_ha import HOST_CONNECT_TIMEOUT, Hosts, is_sync_cancel
from dovecote.store.postgres_rooms import PostgresRoomsMixin
from dovecote.store.postgres_v1 import PostgresV1Mixin

# The SQLite engine is the reference: share its row decoding and DID URL matching so
# both engines answer identically.
from dovecote.store.sqlite import (
    CONFLICTS_SQL,
    MAILBOX_LARGEST_SQL,
    MAILBOX_OLDEST_SQL,
    OUTBOX_TARGETS_SQL,
    STATUS_SQL,
    _dead_letter,
    _outbox_item,
    _recipient_candidates,
)
from dovecote.util.did import base_did, storable

log = structlog.get_logger("dovecote.store.postgres")

T = TypeVar("T")
Conn = Any  # asyncpg.Connection (asyncpg ships no type information)

# NOTIFY channel carrying the mediatee whose mailbox got a message.
CHANNEL = "dovecote_mailbox"
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
# Largest BIGINT; paging numbers beyond it mean "past the end".
MAX_BIGINT = 2**63 - 1
# NOTIFY payloads must stay under 8000 bytes; a longer mediatee wakes everyone instead.
MAX_NOTIFY_PAYLOAD = 7999
# Rounds of "insert dedup row / it vanished meanwhile" before giving up (expiry racing).
DEDUP_ROUNDS = 3

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


def _rowcount(status: str) -> int:
    """Rows touched, from a command tag such as 'UPDATE 3'."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class PostgresStore(PostgresRoomsMixin, PostgresV1Mixin, Store):
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

    async def _call(self, op: str, fn: Callable[[Conn], Awaitable[T]], *, write: bool) -> T:
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

    async def _attempts(self, fn: Callable[[Conn], Awaitable[T]], write: bool) -> T:
        delay = RETRY_BASE_SECONDS
        for attempt in range(1, ATTEMPTS + 1):
            committing = broken = False
            try:
                async with self._pool.acquire() as conn:
                    try:
                        if not write:
                            return await fn(conn)
                        pid = conn.get_server_pid()
                        self._sync_cancelled.discard(pid)
                        # Only while writing: the pool expects no listeners on release.
                        conn.add_log_listener(self._on_server_log)
                        try:
                            async with conn.transaction():
                                result = await fn(conn)
                                committing = True
                            # A warning that came with COMMIT's reply reached its
                            # listener (call_soon) before we resumed; one more turn anyway.
                            await asyncio.sleep(0)
                        finally:
                            conn.remove_log_listener(self._on_server_log)
                        if pid in self._sync_cancelled:
                            self._sync_cancelled.discard(pid)
                            log.warning("store.commit_unconfirmed", host=self._hosts.host_of(conn))
                            raise StoreError("commit not confirmed by a synchronous standby; retry")
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
            await asyncio.sleep(random.uniform(0, delay))
            delay *= 2
        raise AssertionError("unreachable")

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        return await self._call("read", fn, write=False)

    async def _write(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        return await self._call("write", fn, write=True)

    def _wake(self, mediatee: str) -> None:
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

    async def schema_version(self) -> int:
        value = await self._read(
            lambda c: c.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        )
        return int(value)

    # ------------------------------------------------------------------ wake-ups
    async def _listen_connect(self) -> Conn:
        conn = await self._hosts.connect(**self._connect_options(LISTENER_NAME))
        try:
            await conn.add_listener(CHANNEL, self._on_notification)
            await self._listen_rooms(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    def _on_notification(self, _conn: Conn, pid: int, _channel: str, payload: str) -> None:
        if pid in self._own_pids:
            return  # our own enqueue; it woke local listeners right after COMMIT
        self._wake(payload)

    async def _listen(self, conn: Conn | None) -> None:
        """Keep one LISTEN connection alive for as long as the store is open."""
        backoff = LISTENER_BACKOFF_MIN
        while not self._closing:
            try:
                if conn is None:
                    conn = await self._listen_connect()
                    log.info("store.listener_reconnected")
                    # Notifications sent while we were away are gone: everyone looks again.
                    self._wake(WAKE_ALL)
                backoff = LISTENER_BACKOFF_MIN
                await self._watch(conn)
                log.warning("store.listener_lost")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any driver or socket error: reconnect  # noqa: BLE001
                log.warning("store.listener_failed", error=str(exc)[:200], retry_in=backoff)
            finally:
                if conn is not None:
                    conn.terminate()
                    conn = None
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, LISTENER_BACKOFF_MAX)

    async def _watch(self, conn: Conn) -> None:
        """Return when the connection is gone; a silent network loss is found by a probe."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        while not lost.is_set() and not conn.is_closed():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), LISTENER_CHECK_SECONDS)
            if not lost.is_set() and not conn.is_closed():
                await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT)

    # ------------------------------------------------------------------ mediation
    async def set_mediation(self, did: str, state: MediationState, routing_did: str) -> None:
        now = time.time()
        await self._write(
            lambda c: c.execute(
                "INSERT INTO mediations (did, state, routing_did, created_at, updated_at) "
                "VALUES ($1, $2, $3, $4, $4) ON CONFLICT (did) DO UPDATE SET "
                "state = excluded.state, routing_did = excluded.routing_did, "
                "updated_at = excluded.updated_at",
                did,
                state,
                routing_did,
                now,
            )
        )

    async def get_mediation(self, did: str) -> MediationState | None:
        if not storable(did):
            return None
        state: MediationState | None = await self._read(
            lambda c: c.fetchval("SELECT state FROM mediations WHERE did = $1", did)
        )
        return state

    async def update_recipients(
        self, mediatee: str, updates: Sequence[tuple[str, str]]
    ) -> list[UpdateResult]:
        now = time.time()

        async def add(c: Conn, recipient: str) -> UpdateResult:
            # Insert-or-read twice: the owner may remove it between our two statements.
            for _ in range(2):
                inserted = await c.fetchval(
                    "INSERT INTO recipients (recipient, mediatee, created_at) "
                    "VALUES ($1, $2, $3) ON CONFLICT (recipient) DO NOTHING RETURNING 1",
                    recipient,
                    mediatee,
                    now,
                )
                if inserted:
                    return "success"
                owner = await c.fetchval(
                    "SELECT mediatee FROM recipients WHERE recipient = $1", recipient
                )
                if owner is not None:
                    # Someone else's recipient DID: refusing keeps mailboxes separate.
                    return "no_change" if owner == mediatee else "client_error"
            return "server_error"

        async def fn(c: Conn) -> list[UpdateResult]:
            results: list[UpdateResult] = []
            for given, action in updates:
                # One owner per identity: every form of a DID registers its base DID.
                recipient = base_did(given)
                if not storable(recipient):
                    results.append("client_error")
                    continue
                if action == "add":
                    results.append(await add(c, recipient))
                elif action == "remove":
                    status = await c.execute(
                        "DELETE FROM recipients WHERE recipient = $1 AND mediatee = $2",
                        recipient,
                        mediatee,
                    )
                    results.append("success" if _rowcount(status) else "no_change")
                else:
                    results.append("client_error")
            return results

        return await self._write(fn)

    async def list_recipients(
        self, mediatee: str, offset: int, limit: int
    ) -> tuple[list[str], int]:
        offset, limit = _page(offset, limit)

        async def fn(c: Conn) -> tuple[list[str], int]:
            total = await c.fetchval(
                "SELECT COUNT(*) FROM recipients WHERE mediatee = $1", mediatee
            )
            rows = await c.fetch(
                "SELECT recipient FROM recipients WHERE mediatee = $1 ORDER BY recipient "
                "LIMIT $2 OFFSET $3",
                mediatee,
                limit,
                offset,
            )
            return [r[0] for r in rows], int(total)

        return await self._read(fn)

    async def find_mediatee(self, recipient: str) -> str | None:
        base = base_did(recipient)
        if not storable(base):
            return None
        mediatee: str | None = await self._read(
            lambda c: c.fetchval("SELECT mediatee FROM recipients WHERE recipient = $1", base)
        )
        return mediatee

    async def recipient_conflicts(self) -> list[RecipientConflict]:
        rows = await self._read(lambda c: c.fetch(CONFLICTS_SQL))
        return [RecipientConflict(*row) for row in rows]

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

        payload = message.mediatee
        if len(payload.encode()) > MAX_NOTIFY_PAYLOAD:
            payload = WAKE_ALL

        async def fn(c: Conn) -> EnqueueResult:
            # Claim the digest, then store the message, in one statement: a concurrent
            # identical enqueue waits on the dedup key until we commit (then sees our id)
            # or roll back (then stores its own).
            for _ in range(DEDUP_ROUNDS):
                stored = await c.fetchval(
                    "WITH claim AS (INSERT INTO dedup (recipient, digest, message_id, "
                    " created_at) VALUES ($3, $8, $1, $6) "
                    " ON CONFLICT (recipient, digest) DO NOTHING RETURNING message_id) "
                    "INSERT INTO messages (id, mediatee, recipient, body, size, received_at, "
                    " expires_at) SELECT $1, $2, $3, $4, $5, $6, $7 FROM claim RETURNING 1",
                    new_id,
                    message.mediatee,
                    message.recipient,
                    message.body,
                    size,
                    now,
                    message.expires_at,
                    message.digest,
                )
                if stored:
                    break
                # A write, not a read: this COMMIT must wait for a standby before the
                # duplicate is answered (see dovecote.store.pg_ha).
                existing = await c.fetchval(
                    "UPDATE dedup SET message_id = message_id "
                    "WHERE recipient = $1 AND digest = $2 RETURNING message_id",
                    message.recipient,
                    message.digest,
                )
                if existing is not None:
                    return EnqueueResult(id=existing, duplicate=True)
            else:
                raise StoreError("dedup entry kept changing; retry")
            await _insert_outbox(c, outbox, now)
            # Last, so the mailbox row stays locked only until COMMIT: count this message
            # into the totals (creating the row, or waiting for the row lock held by a
            # concurrent enqueue/ack/expiry) and check the limits on the result. Over a
            # limit, the whole transaction rolls back. NOTIFY is delivered only on COMMIT.
            count, total, _ = await c.fetchrow(
                "INSERT INTO mailboxes (mediatee, message_count, total_bytes) "
                "VALUES ($1, 1, $2) ON CONFLICT (mediatee) DO UPDATE SET "
                "message_count = mailboxes.message_count + 1, "
                "total_bytes = mailboxes.total_bytes + excluded.total_bytes "
                "RETURNING message_count, total_bytes, pg_notify($3, $4)",
                message.mediatee,
                size,
                CHANNEL,
                payload,
            )
            if count > max_messages or total > max_bytes:
                raise MailboxFull(
                    f"mailbox holds {count - 1} messages / {total - size} bytes "
                    f"(limits {max_messages} / {max_bytes})"
                )
            return EnqueueResult(id=new_id, duplicate=False)

        result = await self._write(fn)
        if not result.duplicate:
            self._wake(message.mediatee)
        return result

    async def status(self, mediatee: str, recipient: str | None = None) -> MailboxStatus:
        if recipient is None:
            # Totals row and the ends of the (mediatee, seq) index: flat in queue size.
            row = await self._read(lambda c: c.fetchrow(STATUS_SQL, mediatee))
            return MailboxStatus(int(row[0]), int(row[1]), row[2], row[3])
        sql = (
            "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(received_at), MAX(received_at) "
            "FROM messages WHERE mediatee = $1"
        )
        args: list[Any] = [mediatee]
        if recipient is not None:
            sql += " AND recipient = ANY($2::text[])"
            args.append(_recipient_candidates(recipient))
        row = await self._read(lambda c: c.fetchrow(sql, *args))
        return MailboxStatus(int(row[0]), int(row[1]), row[2], row[3])

    async def fetch(
        self,
        mediatee: str,
        limit: int,
        recipient: str | None = None,
        after_seq: int = 0,
    ) -> list[StoredMessage]:
        sql = (
            "SELECT id, seq, mediatee, recipient, body, received_at, expires_at "
            "FROM messages WHERE mediatee = $1 AND seq > $2"
        )
        args: list[Any] = [mediatee, after_seq, limit]
        if recipient is not None:
            sql += " AND recipient = ANY($4::text[])"
            args.append(_recipient_candidates(recipient))
        sql += " ORDER BY seq LIMIT $3"
        rows = await self._read(lambda c: c.fetch(sql, *args))
        return [_message(row) for row in rows]

    async def last_seq(self, mediatee: str) -> int:
        value = await self._read(
            lambda c: c.fetchval("SELECT MAX(seq) FROM messages WHERE mediatee = $1", mediatee)
        )
        return int(value or 0)

    async def ack(self, mediatee: str, ids: Sequence[str]) -> list[StoredMessage]:
        wanted = sorted(set(ids))

        async def fn(c: Conn) -> list[StoredMessage]:
            if not wanted:
                return []
            await c.execute("SELECT 1 FROM mailboxes WHERE mediatee = $1 FOR UPDATE", mediatee)
            rows = await c.fetch(
                "DELETE FROM messages WHERE mediatee = $1 AND id = ANY($2::text[]) "
                "RETURNING id, seq, mediatee, recipient, body, received_at, expires_at",
                mediatee,
                wanted,
            )
            removed = sorted((_message(row) for row in rows), key=lambda m: m.seq)
            if removed:
                await c.execute(
                    "UPDATE mailboxes SET message_count = message_count - $2, "
                    "total_bytes = total_bytes - $3 WHERE mediatee = $1",
                    mediatee,
                    len(removed),
                    sum(len(m.body) for m in removed),
                )
            return removed

        return await self._write(fn)

    async def expire(self, now: float, dedup_before: float, limit: int = 1000) -> int:
        async def fn(c: Conn) -> int:
            due = await c.fetch(
                "SELECT seq, mediatee FROM messages WHERE expires_at <= $1 "
                "ORDER BY expires_at LIMIT $2",
                now,
                limit,
            )
            by_box: dict[str, list[int]] = {}
            for seq, mediatee in due:
                by_box.setdefault(mediatee, []).append(seq)
            moved = 0
            # Mailbox rows in one global order, each before its messages: no deadlocks
            # with acks, enqueues or another instance's sweep.
            for mediatee in sorted(by_box):
                await c.execute("SELECT 1 FROM mailboxes WHERE mediatee = $1 FOR UPDATE", mediatee)
                rows = await c.fetch(
                    "DELETE FROM messages WHERE seq = ANY($1::bigint[]) AND expires_at <= $2 "
                    "RETURNING id, recipient, body, size, received_at",
                    by_box[mediatee],
                    now,
                )
                if not rows:
                    continue  # acknowledged or expired by someone else meanwhile
                await c.executemany(
                    "INSERT INTO dead_letters (kind, target, payload, headers, reason, "
                    "history, created_at, dead_at) "
                    "VALUES ('mailbox', $1, $2, $3, 'expired', '[]', $4, $5)",
                    [
                        (
                            recipient,
                            body,
                            json.dumps({"message_id": msg_id, "mediatee": mediatee}),
                            received_at,
                            now,
                        )
                        for msg_id, recipient, body, _size, received_at in rows
                    ],
                )
                await c.execute(
                    "UPDATE mailboxes SET message_count = message_count - $2, "
                    "total_bytes = total_bytes - $3 WHERE mediatee = $1",
                    mediatee,
                    len(rows),
                    sum(row[3] for row in rows),
                )
                moved += len(rows)
            await c.execute("DELETE FROM dedup WHERE created_at < $1", dedup_before)
            await c.execute("DELETE FROM outbox_keys WHERE created_at < $1", dedup_before)
            return moved

        return await self._write(fn)

    # ------------------------------------------------------------------ outbox
    async def outbox_add(
        self, items: Sequence[NewOutboxItem], quota: RelayQuota | None = None
    ) -> list[int]:
        now = time.time()

        async def fn(c: Conn) -> list[int]:
            if quota is not None:
                await check_relay_quota(c, quota, items)
            ids = await _insert_outbox(c, items, now)
            if ids or not items:
                return ids
            # All already queued (or remembered): rewrite those rows so that this COMMIT
            # waits for a standby, as a duplicate's success answer must (pg_ha).
            keys = [item.dedup_key for item in items if item.dedup_key is not None]
            touched = _rowcount(
                await c.execute(
                    "UPDATE outbox SET dedup_key = dedup_key WHERE dedup_key = ANY($1::text[])",
                    keys,
                )
            ) + _rowcount(
                await c.execute(
                    "UPDATE outbox_keys SET created_at = created_at "
                    "WHERE dedup_key = ANY($1::text[])",
                    keys,
                )
            )
            if not touched:  # delivered and forgotten meanwhile
                raise StoreError("outbox entry changed meanwhile; retry")
            return ids

        return await self._write(fn)

    async def outbox_lease(
        self,
        kinds: Sequence[str],
        owner: str,
        limit: int,
        lease_seconds: float,
        exclude_targets: Sequence[str] = (),
    ) -> list[OutboxItem]:
        now = time.time()
        rows = await self._write(
            lambda c: c.fetch(
                "WITH due AS (SELECT id FROM outbox WHERE kind = ANY($3::text[]) "
                " AND next_attempt_at <= $4 AND (lease_until IS NULL OR lease_until < $4) "
                " AND target <> ALL($5::text[]) "
                " ORDER BY next_attempt_at LIMIT $6 FOR UPDATE SKIP LOCKED) "
                "UPDATE outbox o SET lease_owner = $1, lease_until = $2 FROM due "
                "WHERE o.id = due.id RETURNING o.id, o.kind, o.target, o.payload, o.headers, "
                "o.created_at, o.next_attempt_at, o.attempts, o.history",
                owner,
                now + lease_seconds,
                list(kinds),
                now,
                list(exclude_targets),
                limit,
            )
        )
        items = [_outbox_item(row) for row in rows]
        return sorted(items, key=lambda item: (item.next_attempt_at, item.id))

    async def outbox_done(self, item_id: int, owner: str) -> None:
        await self._write(
            lambda c: c.execute(
                "DELETE FROM outbox WHERE id = $1 AND lease_owner = $2", item_id, owner
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
        async def fn(c: Conn) -> None:
            history_json = await c.fetchval(
                "SELECT history FROM outbox WHERE id = $1 AND lease_owner = $2 FOR UPDATE",
                item_id,
                owner,
            )
            if history_json is None:
                return
            history = json.loads(history_json)
            if count_attempt:
                history.append(attempt)
            await c.execute(
                "UPDATE outbox SET next_attempt_at = $2, attempts = attempts + $3, "
                "history = $4, lease_owner = NULL, lease_until = NULL WHERE id = $1",
                item_id,
                next_attempt_at,
                1 if count_attempt else 0,
                json.dumps(history[-100:]),
            )

        await self._write(fn)

    async def outbox_dead(
        self, item_id: int, owner: str, reason: str, attempt: dict[str, Any] | None
    ) -> None:
        now = time.time()

        async def fn(c: Conn) -> None:
            row = await c.fetchrow(
                "DELETE FROM outbox WHERE id = $1 AND lease_owner = $2 "
                "RETURNING kind, target, payload, headers, history, created_at, dedup_key",
                item_id,
                owner,
            )
            if row is None:
                return
            kind, target, payload, headers, history_json, created_at, dedup_key = row
            history = json.loads(history_json)
            if attempt:
                history.append(attempt)
            await c.execute(
                "INSERT INTO dead_letters (kind, target, payload, headers, reason, history, "
                "created_at, dead_at, dedup_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                kind,
                target,
                payload,
                headers,
                reason,
                json.dumps(history),
                created_at,
                now,
                dedup_key,
            )

        await self._write(fn)

    async def outbox_release(self, owner: str) -> int:
        status = await self._write(
            lambda c: c.execute(
                "UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
                owner,
            )
        )
        return _rowcount(status)

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
        clauses: list[str] = ["TRUE"]
        params: list[Any] = []
        for value, test in (
            (kind, "kind = ${}"),
            (target, "strpos(target, ${}) > 0"),
            (reason, "strpos(reason, ${}) > 0"),
        ):
            if value is not None:
                params.append(value)
                clauses.append(test.format(len(params)))
        where = " AND ".join(clauses)
        n = len(params)

        async def fn(c: Conn) -> tuple[list[DeadLetter], int]:
            total = await c.fetchval(f"SELECT COUNT(*) FROM dead_letters WHERE {where}", *params)
            rows = await c.fetch(
                "SELECT id, kind, target, payload, headers, reason, history, created_at, "
                f"dead_at FROM dead_letters WHERE {where} ORDER BY id DESC "
                f"LIMIT ${n + 1} OFFSET ${n + 2}",
                *params,
                limit,
                offset,
            )
            return [_dead_letter(row) for row in rows], int(total)

        return await self._read(fn)

    async def dlq_get(self, item_id: int) -> DeadLetter | None:
        row = await self._read(
            lambda c: c.fetchrow(
                "SELECT id, kind, target, payload, headers, reason, history, created_at, "
                "dead_at FROM dead_letters WHERE id = $1",
                item_id,
            )
        )
        return _dead_letter(row) if row else None

    async def dlq_replay(self, ids: Sequence[int] | None = None, target: str | None = None) -> int:
        now = time.time()
        where, params = _dlq_filter(ids, target, None)

        async def fn(c: Conn) -> int:
            rows = await c.fetch(
                f"DELETE FROM dead_letters WHERE {where} AND kind <> 'mailbox' "
                "RETURNING kind, target, payload, headers, history, dedup_key",
                *params,
            )
            replay_note = {"at": now, "event": "replayed"}
            # With its dedup key: an identical pending item absorbs the replay.
            await c.executemany(
                "INSERT INTO outbox (kind, target, payload, headers, created_at, "
                "next_attempt_at, attempts, history, dedup_key) "
                "VALUES ($1, $2, $3, $4, $5, $5, 0, $6, $7) ON CONFLICT (dedup_key) DO NOTHING",
                [
                    (
                        kind,
                        tgt,
                        payload,
                        headers,
                        now,
                        json.dumps([*json.loads(history), replay_note][-100:]),
                        dedup_key,
                    )
                    for kind, tgt, payload, headers, history, dedup_key in rows
                ],
            )
            return len(rows)

        return await self._write(fn)

    async def dlq_purge(
        self, ids: Sequence[int] | None = None, older_than: float | None = None
    ) -> int:
        where, params = _dlq_filter(ids, None, older_than)
        status = await self._write(
            lambda c: c.execute(f"DELETE FROM dead_letters WHERE {where}", *params)
        )
        return _rowcount(status)

    # ------------------------------------------------------------------ cluster, stats
    async def heartbeat(self, info: InstanceInfo) -> None:
        await self._write(
            lambda c: c.execute(
                "INSERT INTO instances (id, host, version, started_at, last_beat, level, "
                "connections) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE "
                "SET last_beat = excluded.last_beat, level = excluded.level, "
                "connections = excluded.connections",
                info.id,
                info.host,
                info.version,
                info.started_at,
                info.last_beat,
                info.level,
                info.connections,
            )
        )

    async def instances(self) -> list[InstanceInfo]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT id, host, version, started_at, last_beat, level, connections "
                "FROM instances ORDER BY last_beat DESC LIMIT 200"
            )
        )
        return [InstanceInfo(*row) for row in rows]

    async def queue_stats(self) -> QueueStats:
        async def fn(c: Conn) -> QueueStats:
            queued, oldest, dead = await c.fetchrow(
                "SELECT (SELECT COALESCE(SUM(message_count), 0) FROM mailboxes), "
                "(SELECT MIN(received_at) FROM messages), "
                "(SELECT COUNT(*) FROM dead_letters)"
            )
            outbox_rows = await c.fetch(
                "SELECT kind, COUNT(*), MIN(next_attempt_at) FROM outbox GROUP BY kind"
            )
            return QueueStats(
                queued=int(queued),
                oldest_received_at=oldest,
                outbox={kind: int(n) for kind, n, _ in outbox_rows},
                outbox_oldest_due={kind: float(due) for kind, _, due in outbox_rows},
                dead_letters=int(dead),
            )

        return await self._read(fn)

    async def mailbox_usage(self, order: str, limit: int) -> list[MailboxUsage]:
        sql = MAILBOX_OLDEST_SQL if order == "oldest" else MAILBOX_LARGEST_SQL
        rows = await self._read(lambda c: c.fetch(sql, _page(0, limit)[1]))
        return [MailboxUsage(*row) for row in rows]

    async def outbox_targets(self, limit: int) -> list[OutboxTarget]:
        rows = await self._read(lambda c: c.fetch(OUTBOX_TARGETS_SQL, _page(0, limit)[1]))
        return [OutboxTarget(*row) for row in rows]


def _page(offset: int, limit: int) -> tuple[int, int]:
    """Paging numbers as BIGINT accepts them (a huge offset is simply past the end)."""
    return max(0, min(int(offset), MAX_BIGINT)), max(0, min(int(limit), MAX_BIGINT))


def _message(row: Sequence[Any]) -> StoredMessage:
    msg_id, seq, mediatee, recipient, body, received_at, expires_at = row
    return StoredMessage(msg_id, seq, mediatee, recipient, bytes(body), received_at, expires_at)


async def check_relay_quota(c: Conn, quota: RelayQuota, items: Sequence[NewOutboxItem]) -> None:
    """Raise (RelayQuota.check) if adding the new ones of `items` passes a relay quota."""
    # One relay add at a time cluster-wide, so concurrent accepts cannot each
    # see room under the quota; other outbox traffic does not take this lock.
    await c.execute("SELECT pg_advisory_xact_lock(hashtext('dovecote.relay'))")
    keys = [i.dedup_key for i in items if i.dedup_key is not None]
    known = {
        r[0]
        for r in await c.fetch(
            "SELECT dedup_key FROM outbox WHERE dedup_key = ANY($1::text[]) "
            "UNION SELECT dedup_key FROM outbox_keys "
            "WHERE dedup_key = ANY($1::text[])",
            keys,
        )
    }
    fresh = [i for i in items if i.dedup_key is None or i.dedup_key not in known]
    row = await c.fetchrow(
        "SELECT COUNT(*) FILTER (WHERE left(target, $1) = $2), "
        "COALESCE(SUM(octet_length(payload)) FILTER "
        "(WHERE left(target, $1) = $2), 0), COUNT(*), "
        "COALESCE(SUM(octet_length(payload)), 0) "
        "FROM outbox WHERE kind = 'forward'",
        len(quota.origin),
        quota.origin,
    )
    quota.check(
        tuple(int(v) for v in row),  # type: ignore[arg-type]
        len(fresh),
        sum(len(i.payload) for i in fresh),
    )


async def _insert_outbox(c: Conn, items: Sequence[NewOutboxItem], now: float) -> list[int]:
    ids: list[int] = []
    for item in items:
        if (
            item.remember
            and item.dedup_key is not None
            and await c.fetchval(
                "INSERT INTO outbox_keys (dedup_key, created_at) VALUES ($1, $2) "
                "ON CONFLICT (dedup_key) DO NOTHING RETURNING 1",
                item.dedup_key,
                now,
            )
            is None
        ):
            continue  # added within the dedup window (maybe delivered since)
        item_id = await c.fetchval(
            "INSERT INTO outbox (kind, target, payload, headers, dedup_key, created_at, "
            "next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $6) "
            "ON CONFLICT (dedup_key) DO NOTHING RETURNING id",
            item.kind,
            item.target,
            item.payload,
            json.dumps(item.headers),
            item.dedup_key,
            now,
        )
        if item_id is not None:
            ids.append(int(item_id))
    return ids


def _dlq_filter(
    ids: Sequence[int] | None, target: str | None, older_than: float | None
) -> tuple[str, list[Any]]:
    clauses = ["TRUE"]
    params: list[Any] = []
    if ids is not None:
        params.append([int(i) for i in ids])
        clauses.append(f"id = ANY(${len(params)}::bigint[])")
    if target is not None:
        params.append(target)
        clauses.append(f"target = ${len(params)}")
    if older_than is not None:
        params.append(older_than)
        clauses.append(f"dead_at < ${len(params)}")
    return " AND ".join(clauses), params
