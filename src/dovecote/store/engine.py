"""The store's semantics, written once over the primitives each engine supplies.

An engine (store/sqlite.py, store/postgres.py) supplies `_read(body)` and `_write(body)`:
run `body(tx)` on a connection, in a transaction that has committed when `_write` returns,
then wake the listeners the transaction asked for (`Tx.wake_*`). It may group concurrent
enqueues into one transaction (`_enqueue`). Everything else, every statement and every
transaction body, is here, in store/operations.py, and in the rooms component
(store/rooms.py, `store.rooms`).
"""

from __future__ import annotations

import abc
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog

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
    QueuedRef,
    QueueStats,
    RecipientConflict,
    RelayQuota,
    Store,
    StoredMessage,
    UpdateResult,
)
from dovecote.store.dialect import Tx
from dovecote.store.operations import (
    Enqueue,
    check_relay_quota,
    dead_letter,
    dlq_filter,
    enqueue_batch,
    insert_outbox,
    outbox_item,
    page,
    recipient_candidates,
    stored_message,
)
from dovecote.store.rooms import SQLRooms
from dovecote.store.v1_base import V1Connection, V1Store
from dovecote.util.did import base_did, storable

log = structlog.get_logger("dovecote.store")

T = TypeVar("T")
Body = Callable[[Tx], Awaitable[T]]

# Acks delete at most this many ids per statement.
ACK_CHUNK = 500

_MESSAGE_COLUMNS = "id, seq, mediatee, recipient, body, received_at, expires_at"
_OUTBOX_COLUMNS = (
    "id, kind, target, payload, headers, created_at, next_attempt_at, attempts, history"
)
_DEAD_COLUMNS = "id, kind, target, payload, headers, reason, history, created_at, dead_at"
_V1_COLUMNS = (
    "their_verkey, connection_id, their_did, protocol, state, endpoint, routing_keys, "
    "device, created_at"
)

# Rows a read may return and still count as small (see _read_small).
SMALL_READ_ROWS = 256
STATUS_SQL = (
    "SELECT COALESCE((SELECT message_count FROM mailboxes WHERE mediatee = $1), 0), "
    "COALESCE((SELECT total_bytes FROM mailboxes WHERE mediatee = $1), 0), "
    "(SELECT received_at FROM messages WHERE mediatee = $1 ORDER BY seq LIMIT 1), "
    "(SELECT received_at FROM messages WHERE mediatee = $1 ORDER BY seq DESC LIMIT 1)"
)
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
# Registrations the identity migration (0004) refused, with what their mediatee still holds.
CONFLICTS_SQL = (
    "SELECT c.recipient, c.base, c.mediatee, c.owner, c.created_at, c.found_at, "
    "(SELECT COUNT(*) FROM messages m WHERE m.mediatee = c.mediatee "
    " AND m.recipient = c.recipient) FROM recipient_conflicts c ORDER BY c.found_at, c.recipient"
)


def message_id(now: float | None = None) -> str:
    """A new stored message's id: 32 hex digits, milliseconds since the epoch then 80
    random bits.

    Time first, so that each insert into the unique id index lands at its right-hand end,
    as the seq and mailbox indexes' do: with random ids (uuid4) every insert touched a
    random leaf of an index that no longer fits SQLite's page cache at 1M queued.
    """
    millis = int((time.time() if now is None else now) * 1000)
    return f"{millis:012x}{secrets.token_hex(10)}"


class SQLStore(V1Store, Store):
    """`Store` and `V1Store` over an engine's `_read` / `_write`; rooms in `self.rooms`."""

    def __init__(self) -> None:
        super().__init__()
        self.rooms = SQLRooms(self)

    # ------------------------------------------------------------------ engine primitives
    @abc.abstractmethod
    async def _read(self, body: Body[T]) -> T:
        """Run `body` on a connection for reading."""

    async def _read_small(self, body: Body[T]) -> T:
        """A read of a few rows by index (engines may run it where it costs less)."""
        return await self._read(body)

    @abc.abstractmethod
    async def _write(self, body: Body[T]) -> T:
        """Run `body` in a transaction; return after COMMIT and the wake-ups it asked for."""

    async def _enqueue(self, job: Enqueue) -> None:
        """Store one enqueue (sets `job.outcome`); engines may group concurrent ones."""
        await self._write(lambda tx: enqueue_batch(tx, [job], time.time()))

    def _wake(self, tx: Tx) -> None:
        """Wake local listeners after `tx` committed (other instances learn by NOTIFY)."""
        for mediatee in dict.fromkeys(tx.woken_mailboxes):
            self._notify(mediatee)
        for room in dict.fromkeys(tx.woken_rooms):
            self.rooms.notify(room)

    async def schema_version(self) -> int:
        value = await self._read(
            lambda tx: tx.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        )
        return int(value)

    # ------------------------------------------------------------------ mediation
    async def set_mediation(self, did: str, state: MediationState, routing_did: str) -> None:
        now = time.time()
        await self._write(
            lambda tx: tx.execute(
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
        state: MediationState | None = await self._read_small(
            lambda tx: tx.fetchval("SELECT state FROM mediations WHERE did = $1", did)
        )
        return state

    async def update_recipients(
        self, mediatee: str, updates: Sequence[tuple[str, str]]
    ) -> list[UpdateResult]:
        now = time.time()

        async def add(tx: Tx, recipient: str) -> UpdateResult:
            # Insert-or-read twice: the owner may remove it between our two statements.
            for _ in range(2):
                inserted = await tx.fetchval(
                    "INSERT INTO recipients (recipient, mediatee, created_at) "
                    "VALUES ($1, $2, $3) ON CONFLICT (recipient) DO NOTHING RETURNING 1",
                    recipient,
                    mediatee,
                    now,
                )
                if inserted:
                    tx.recipient_changed(recipient)
                    return "success"
                owner = await tx.fetchval(
                    "SELECT mediatee FROM recipients WHERE recipient = $1", recipient
                )
                if owner is not None:
                    # Someone else's recipient DID: refusing keeps mailboxes separate.
                    return "no_change" if owner == mediatee else "client_error"
            return "server_error"

        async def body(tx: Tx) -> list[UpdateResult]:
            results: list[UpdateResult] = []
            for given, action in updates:
                # One owner per identity: every form of a DID registers its base DID.
                recipient = base_did(given)
                if not storable(recipient):
                    results.append("client_error")
                elif action == "add":
                    results.append(await add(tx, recipient))
                elif action == "remove":
                    removed = await tx.execute(
                        "DELETE FROM recipients WHERE recipient = $1 AND mediatee = $2",
                        recipient,
                        mediatee,
                    )
                    if removed:
                        tx.recipient_changed(recipient)
                    results.append("success" if removed else "no_change")
                else:
                    results.append("client_error")
            return results

        return await self._write(body)

    async def list_recipients(
        self, mediatee: str, offset: int, limit: int
    ) -> tuple[list[str], int]:
        offset, limit = page(offset, limit)

        async def body(tx: Tx) -> tuple[list[str], int]:
            total = await tx.fetchval(
                "SELECT COUNT(*) FROM recipients WHERE mediatee = $1", mediatee
            )
            rows = await tx.fetch(
                "SELECT recipient FROM recipients WHERE mediatee = $1 ORDER BY recipient "
                "LIMIT $2 OFFSET $3",
                mediatee,
                limit,
                offset,
            )
            return [r[0] for r in rows], int(total)

        return await self._read(body)

    async def find_mediatee(self, recipient: str) -> str | None:
        base = base_did(recipient)
        if not storable(base):
            return None
        mediatee: str | None = await self._read(
            lambda tx: tx.fetchval("SELECT mediatee FROM recipients WHERE recipient = $1", base)
        )
        return mediatee

    async def recipient_conflicts(self) -> list[RecipientConflict]:
        rows = await self._read(lambda tx: tx.fetch(CONFLICTS_SQL))
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
        job = Enqueue(message, max_messages, max_bytes, outbox, message_id())
        await self._enqueue(job)
        if isinstance(job.outcome, BaseException):
            raise job.outcome
        assert job.outcome is not None
        return job.outcome

    async def status(self, mediatee: str, recipient: str | None = None) -> MailboxStatus:
        if recipient is None:
            # Running totals and the two ends of the (mediatee, seq) index: the cost does
            # not grow with the queue (a COUNT over 1M rows took seconds).
            row = await self._read_small(lambda tx: tx.fetchrow(STATUS_SQL, mediatee))
        else:
            row = await self._read(
                lambda tx: tx.fetchrow(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(received_at), "
                    "MAX(received_at) FROM messages WHERE mediatee = $1 "
                    "AND recipient = ANY($2::text[])",
                    mediatee,
                    recipient_candidates(recipient),
                )
            )
        assert row is not None
        return MailboxStatus(int(row[0]), int(row[1]), row[2], row[3])

    async def fetch(
        self,
        mediatee: str,
        limit: int,
        recipient: str | None = None,
        after_seq: int = 0,
    ) -> list[StoredMessage]:
        sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE mediatee = $1 AND seq > $2"
        args: list[Any] = [mediatee, after_seq, limit]
        if recipient is not None:
            sql += " AND recipient = ANY($4::text[])"
            args.append(recipient_candidates(recipient))
        sql += " ORDER BY seq LIMIT $3"
        rows = await self._read(lambda tx: tx.fetch(sql, *args))
        return [stored_message(row) for row in rows]

    async def queued(self, mediatee: str, limit: int, after_seq: int = 0) -> list[QueuedRef]:
        # Every live push starts with this read; a short one is a small read.
        read = self._read_small if limit <= SMALL_READ_ROWS else self._read
        rows = await read(
            lambda tx: tx.fetch(
                "SELECT id, seq, size FROM messages WHERE mediatee = $1 AND seq > $2"
                " ORDER BY seq LIMIT $3",
                mediatee,
                after_seq,
                limit,
            )
        )
        return [QueuedRef(row[0], int(row[1]), int(row[2])) for row in rows]

    async def fetch_ids(self, mediatee: str, ids: Sequence[str]) -> list[StoredMessage]:
        if not ids:
            return []
        # `mediatee || ''`, as in ack: with the mailbox index SQLite walked the whole
        # mailbox for each live push (3.6-15.8 s for 50 ids at 1M queued, 0.1 ms this way).
        rows = await self._read(
            lambda tx: tx.fetch(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages"
                " WHERE mediatee || '' = $1 AND id = ANY($2::text[]) ORDER BY seq",
                mediatee,
                list(ids),
            )
        )
        return [stored_message(row) for row in rows]

    async def last_seq(self, mediatee: str) -> int:
        value = await self._read(
            lambda tx: tx.fetchval("SELECT MAX(seq) FROM messages WHERE mediatee = $1", mediatee)
        )
        return int(value or 0)

    async def ack(self, mediatee: str, ids: Sequence[str]) -> list[StoredMessage]:
        wanted = sorted(set(ids))

        async def body(tx: Tx) -> list[StoredMessage]:
            if not wanted:
                return []
            await tx.lock_mailboxes([mediatee])
            removed: list[StoredMessage] = []
            for start in range(0, len(wanted), ACK_CHUNK):
                # `mediatee || ''` keeps the planner on the unique id index: with the
                # mailbox index SQLite walked the whole mailbox (320 ms per ack at 1M
                # queued, 2 ms this way).
                rows = await tx.fetch(
                    "DELETE FROM messages WHERE mediatee || '' = $1 AND id = ANY($2::text[]) "
                    f"RETURNING {_MESSAGE_COLUMNS}",
                    mediatee,
                    wanted[start : start + ACK_CHUNK],
                )
                removed.extend(stored_message(row) for row in rows)
            removed.sort(key=lambda m: m.seq)  # queue order
            if removed:
                await tx.execute(
                    "UPDATE mailboxes SET message_count = message_count - $2, "
                    "total_bytes = total_bytes - $3 WHERE mediatee = $1",
                    mediatee,
                    len(removed),
                    sum(len(m.body) for m in removed),
                )
            return removed

        return await self._write(body)

    async def expire(self, now: float, dedup_before: float, limit: int = 1000) -> int:
        async def body(tx: Tx) -> int:
            due = await tx.fetch(
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
                await tx.lock_mailboxes([mediatee])
                rows = await tx.fetch(
                    "DELETE FROM messages WHERE seq = ANY($1::bigint[]) AND expires_at <= $2 "
                    "RETURNING id, recipient, body, size, received_at",
                    by_box[mediatee],
                    now,
                )
                if not rows:
                    continue  # acknowledged or expired by someone else meanwhile
                await tx.executemany(
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
                await tx.execute(
                    "UPDATE mailboxes SET message_count = message_count - $2, "
                    "total_bytes = total_bytes - $3 WHERE mediatee = $1",
                    mediatee,
                    len(rows),
                    sum(row[3] for row in rows),
                )
                moved += len(rows)
            await tx.execute("DELETE FROM dedup WHERE created_at < $1", dedup_before)
            await tx.execute("DELETE FROM outbox_keys WHERE created_at < $1", dedup_before)
            return moved

        return await self._write(body)

    # ------------------------------------------------------------------ outbox
    async def outbox_add(
        self, items: Sequence[NewOutboxItem], quota: RelayQuota | None = None
    ) -> list[int]:
        now = time.time()

        async def body(tx: Tx) -> list[int]:
            if quota is not None:
                await check_relay_quota(tx, quota, items)
            ids = await insert_outbox(tx, items, now)
            if ids or not items or not tx.replicated:
                return ids
            # All already queued (or remembered): rewrite those rows so that this COMMIT
            # waits for a standby, as a duplicate's success answer must (pg_ha).
            keys = [item.dedup_key for item in items if item.dedup_key is not None]
            touched = await tx.execute(
                "UPDATE outbox SET dedup_key = dedup_key WHERE dedup_key = ANY($1::text[])", keys
            ) + await tx.execute(
                "UPDATE outbox_keys SET created_at = created_at WHERE dedup_key = ANY($1::text[])",
                keys,
            )
            if not touched:  # delivered and forgotten meanwhile
                from dovecote.errors import StoreError

                raise StoreError("outbox entry changed meanwhile; retry")
            return ids

        return await self._write(body)

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
            lambda tx: tx.fetch(
                # SKIP LOCKED: instances lease disjoint items without waiting on each other.
                "WITH due AS (SELECT id FROM outbox WHERE kind = ANY($3::text[]) "
                " AND next_attempt_at <= $4 AND (lease_until IS NULL OR lease_until < $4) "
                " AND target <> ALL($5::text[]) "
                " ORDER BY next_attempt_at LIMIT $6 FOR UPDATE SKIP LOCKED) "
                "UPDATE outbox SET lease_owner = $1, lease_until = $2 "
                f"WHERE id IN (SELECT id FROM due) RETURNING {_OUTBOX_COLUMNS}",
                owner,
                now + lease_seconds,
                list(kinds),
                now,
                list(exclude_targets),
                limit,
            )
        )
        items = [outbox_item(row) for row in rows]
        return sorted(items, key=lambda item: (item.next_attempt_at, item.id))

    async def outbox_done(self, item_id: int, owner: str) -> None:
        await self._write(
            lambda tx: tx.execute(
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
        async def body(tx: Tx) -> None:
            history_json = await tx.fetchval(
                "SELECT history FROM outbox WHERE id = $1 AND lease_owner = $2 FOR UPDATE",
                item_id,
                owner,
            )
            if history_json is None:
                return
            history = json.loads(history_json)
            if count_attempt:
                history.append(attempt)
            await tx.execute(
                "UPDATE outbox SET next_attempt_at = $2, attempts = attempts + $3, "
                "history = $4, lease_owner = NULL, lease_until = NULL WHERE id = $1",
                item_id,
                next_attempt_at,
                1 if count_attempt else 0,
                json.dumps(history[-100:]),
            )

        await self._write(body)

    async def outbox_dead(
        self, item_id: int, owner: str, reason: str, attempt: dict[str, Any] | None
    ) -> None:
        now = time.time()

        async def body(tx: Tx) -> None:
            row = await tx.fetchrow(
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
            await tx.execute(
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

        await self._write(body)

    async def outbox_release(self, owner: str) -> int:
        return await self._write(
            lambda tx: tx.execute(
                "UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
                owner,
            )
        )

    async def dlq_list(
        self,
        offset: int = 0,
        limit: int = 100,
        *,
        kind: str | None = None,
        target: str | None = None,
        reason: str | None = None,
    ) -> tuple[list[DeadLetter], int]:
        offset, limit = page(offset, limit)
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

        async def body(tx: Tx) -> tuple[list[DeadLetter], int]:
            total = await tx.fetchval(f"SELECT COUNT(*) FROM dead_letters WHERE {where}", *params)
            rows = await tx.fetch(
                f"SELECT {_DEAD_COLUMNS} FROM dead_letters WHERE {where} ORDER BY id DESC "
                f"LIMIT ${n + 1} OFFSET ${n + 2}",
                *params,
                limit,
                offset,
            )
            return [dead_letter(row) for row in rows], int(total)

        return await self._read(body)

    async def dlq_get(self, item_id: int) -> DeadLetter | None:
        row = await self._read(
            lambda tx: tx.fetchrow(
                f"SELECT {_DEAD_COLUMNS} FROM dead_letters WHERE id = $1", item_id
            )
        )
        return dead_letter(row) if row else None

    async def dlq_replay(self, ids: Sequence[int] | None = None, target: str | None = None) -> int:
        now = time.time()
        where, params = dlq_filter(ids, target, None)

        async def body(tx: Tx) -> int:
            rows = await tx.fetch(
                f"DELETE FROM dead_letters WHERE {where} AND kind <> 'mailbox' "
                "RETURNING kind, target, payload, headers, history, dedup_key",
                *params,
            )
            replay_note = {"at": now, "event": "replayed"}
            # With its dedup key: an identical pending item absorbs the replay.
            await tx.executemany(
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

        return await self._write(body)

    async def dlq_purge(
        self, ids: Sequence[int] | None = None, older_than: float | None = None
    ) -> int:
        where, params = dlq_filter(ids, None, older_than)
        return await self._write(
            lambda tx: tx.execute(f"DELETE FROM dead_letters WHERE {where}", *params)
        )

    # ------------------------------------------------------------------ cluster, stats
    async def heartbeat(self, info: InstanceInfo) -> None:
        await self._write(
            lambda tx: tx.execute(
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
            lambda tx: tx.fetch(
                "SELECT id, host, version, started_at, last_beat, level, connections "
                "FROM instances ORDER BY last_beat DESC LIMIT 200"
            )
        )
        return [InstanceInfo(*row) for row in rows]

    async def queue_stats(self) -> QueueStats:
        async def body(tx: Tx) -> QueueStats:
            # The oldest message is the lowest seq (seq follows arrival, as in
            # STATUS_SQL): MIN(received_at) has no index and read every queued message,
            # every 5 s (an idle server at 1M queued spent 121 ms CPU a second on it).
            row = await tx.fetchrow(
                "SELECT (SELECT COALESCE(SUM(message_count), 0) FROM mailboxes), "
                "(SELECT received_at FROM messages "
                " WHERE seq = (SELECT MIN(seq) FROM messages)), "
                "(SELECT COUNT(*) FROM dead_letters)"
            )
            assert row is not None
            queued, oldest, dead = row
            outbox_rows = await tx.fetch(
                "SELECT kind, COUNT(*), MIN(next_attempt_at) FROM outbox GROUP BY kind"
            )
            return QueueStats(
                queued=int(queued),
                oldest_received_at=oldest,
                outbox={kind: int(n) for kind, n, _ in outbox_rows},
                outbox_oldest_due={kind: float(due) for kind, _, due in outbox_rows},
                dead_letters=int(dead),
            )

        return await self._read(body)

    async def mailbox_usage(self, order: str, limit: int) -> list[MailboxUsage]:
        sql = MAILBOX_OLDEST_SQL if order == "oldest" else MAILBOX_LARGEST_SQL
        rows = await self._read(lambda tx: tx.fetch(sql, page(0, limit)[1]))
        return [MailboxUsage(*row) for row in rows]

    async def outbox_targets(self, limit: int) -> list[OutboxTarget]:
        rows = await self._read(lambda tx: tx.fetch(OUTBOX_TARGETS_SQL, page(0, limit)[1]))
        return [OutboxTarget(*row) for row in rows]

    # ------------------------------------------------------------------ DIDComm v1
    async def v1_connection_save(self, conn: V1Connection) -> V1Connection:
        now = time.time()

        async def body(tx: Tx) -> V1Connection | None:
            row = await tx.fetchrow(
                "INSERT INTO v1_connections (their_verkey, connection_id, their_did, protocol, "
                "state, endpoint, routing_keys, device, created_at, updated_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, '{}', $8, $8) ON CONFLICT (their_verkey) "
                "DO UPDATE SET their_did = excluded.their_did, protocol = excluded.protocol, "
                "state = excluded.state, endpoint = excluded.endpoint, "
                "routing_keys = excluded.routing_keys, updated_at = excluded.updated_at "
                f"RETURNING {_V1_COLUMNS}",
                conn.their_verkey,
                conn.connection_id,
                conn.their_did,
                conn.protocol,
                conn.state,
                conn.endpoint,
                json.dumps(conn.routing_keys),
                now,
            )
            return _v1_connection(row)

        saved = await self._write(body)
        assert isinstance(saved, V1Connection)
        return saved

    async def v1_connection_get(self, their_verkey: str) -> V1Connection | None:
        async def body(tx: Tx) -> V1Connection | None:
            return _v1_connection(
                await tx.fetchrow(
                    f"SELECT {_V1_COLUMNS} FROM v1_connections WHERE their_verkey = $1",
                    their_verkey,
                )
            )

        return await self._read(body)

    async def v1_set_device(self, their_verkey: str, device: dict[str, Any]) -> bool:
        changed = await self._write(
            lambda tx: tx.execute(
                "UPDATE v1_connections SET device = $1, updated_at = $2 WHERE their_verkey = $3",
                json.dumps(device),
                time.time(),
                their_verkey,
            )
        )
        return changed > 0

    async def v1_relay_once(
        self, recipient: str, digest: str, item: NewOutboxItem, quota: RelayQuota | None = None
    ) -> bool:
        now = time.time()

        async def body(tx: Tx) -> bool:
            inserted = await tx.fetchval(
                "INSERT INTO dedup (recipient, digest, message_id, created_at) "
                "VALUES ($1, $2, 'outbox', $3) ON CONFLICT DO NOTHING RETURNING 1",
                recipient,
                digest,
                now,
            )
            if inserted is None:
                if tx.replicated:
                    # A write, so that the duplicate's success answer also waits for the
                    # synchronous standby (store/pg_ha.py), like enqueue's duplicates.
                    await tx.execute(
                        "UPDATE dedup SET message_id = message_id "
                        "WHERE recipient = $1 AND digest = $2",
                        recipient,
                        digest,
                    )
                return False
            if quota is not None:
                await check_relay_quota(tx, quota, [item])
            await insert_outbox(tx, [item], now)
            return True

        return await self._write(body)


def _v1_connection(row: Sequence[Any] | None) -> V1Connection | None:
    if row is None:
        return None
    return V1Connection(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        json.loads(row[6]),
        json.loads(row[7]),
        row[8],
    )
