"""Transaction bodies both engines share, over `dialect.Tx`: each statement written once.

Helpers here are used by the store (store/engine.py) and by its rooms component
(store/rooms.py): outbox inserts and relay quotas, the batched enqueue, row decoding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dovecote.errors import MailboxFull, StoreError
from dovecote.store.base import (
    DeadLetter,
    EnqueueResult,
    NewMessage,
    NewOutboxItem,
    OutboxItem,
    RelayQuota,
    StoredMessage,
)
from dovecote.store.dialect import Row, Tx

# Largest BIGINT; paging numbers beyond it mean "past the end".
MAX_BIGINT = 2**63 - 1
# Rounds of "insert dedup row / it vanished meanwhile" before giving up (expiry racing).
DEDUP_ROUNDS = 3
# Rows per multi-row statement (SQLite binds at most 32,766 parameters).
ROWS_PER_STATEMENT = 500
# Named lock taken by every relay add: one at a time cluster-wide, so concurrent accepts
# cannot each see room under the quota; other outbox traffic does not take it.
RELAY_LOCK = "dovecote.relay"


def page(offset: int, limit: int) -> tuple[int, int]:
    """Paging numbers as BIGINT accepts them (a huge offset is simply past the end)."""
    return max(0, min(int(offset), MAX_BIGINT)), max(0, min(int(limit), MAX_BIGINT))


def recipient_candidates(recipient: str) -> list[str]:
    """A recipient may be registered as a DID or a DID URL (key); match both forms."""
    base = recipient.split("#", 1)[0]
    return [recipient] if base == recipient else [recipient, base]


def stored_message(row: Row) -> StoredMessage:
    msg_id, seq, mediatee, recipient, body, received_at, expires_at = row
    return StoredMessage(msg_id, seq, mediatee, recipient, bytes(body), received_at, expires_at)


def outbox_item(row: Row) -> OutboxItem:
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


def dead_letter(row: Row) -> DeadLetter:
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


def dlq_filter(
    ids: Sequence[int] | None, target: str | None, older_than: float | None
) -> tuple[str, list[Any]]:
    """A WHERE clause over dead letters (placeholders from $1) and its arguments."""
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


async def rows_in_chunks(tx: Tx, sql: str, types: Sequence[str], rows: Sequence[Row]) -> list[Row]:
    """`tx.rows` over any number of rows."""
    found: list[Row] = []
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        found.extend(await tx.rows(sql, types, rows[start : start + ROWS_PER_STATEMENT]))
    return found


# ---------------------------------------------------------------------- outbox
async def check_relay_quota(tx: Tx, quota: RelayQuota, items: Sequence[NewOutboxItem]) -> None:
    """Raise (RelayQuota.check) if adding the new ones of `items` passes a relay quota."""
    await tx.lock(RELAY_LOCK)
    keys = [i.dedup_key for i in items if i.dedup_key is not None]
    known = set()
    if keys:
        known = {
            r[0]
            for r in await tx.fetch(
                "SELECT dedup_key FROM outbox WHERE dedup_key = ANY($1::text[]) "
                "UNION SELECT dedup_key FROM outbox_keys WHERE dedup_key = ANY($1::text[])",
                keys,
            )
        }
    fresh = [i for i in items if i.dedup_key is None or i.dedup_key not in known]
    row = await tx.fetchrow(
        "SELECT COUNT(*) FILTER (WHERE substr(target, 1, $1) = $2), "
        "COALESCE(SUM(length(payload)) FILTER (WHERE substr(target, 1, $1) = $2), 0), "
        "COUNT(*), COALESCE(SUM(length(payload)), 0) FROM outbox WHERE kind = 'forward'",
        len(quota.origin),
        quota.origin,
    )
    assert row is not None
    target_n, target_b, total_n, total_b = (int(v) for v in row)
    quota.check(
        (target_n, target_b, total_n, total_b), len(fresh), sum(len(i.payload) for i in fresh)
    )


async def insert_outbox(tx: Tx, items: Sequence[NewOutboxItem], now: float) -> list[int]:
    """Add outbox items (each dedup_key once while pending, or for the dedup window when
    `remember`); the ids of those added."""
    ids: list[int] = []
    for item in items:
        if (
            item.remember
            and item.dedup_key is not None
            and await tx.fetchval(
                "INSERT INTO outbox_keys (dedup_key, created_at) VALUES ($1, $2) "
                "ON CONFLICT (dedup_key) DO NOTHING RETURNING 1",
                item.dedup_key,
                now,
            )
            is None
        ):
            continue  # added within the dedup window (maybe delivered since)
        item_id = await tx.fetchval(
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


# ---------------------------------------------------------------------- enqueue
# eq=False: a job is one caller's request, equal only to itself (value equality compared
# every field, payloads included, each time a batch was put back in order).
@dataclass(slots=True, eq=False)
class Enqueue:
    """One caller's enqueue, as the batch body sees it."""

    message: NewMessage
    max_messages: int
    max_bytes: int
    outbox: Sequence[NewOutboxItem]
    id: str
    outcome: EnqueueResult | BaseException | None = field(default=None)

    @property
    def key(self) -> tuple[str, str]:
        return (self.message.recipient, self.message.digest)


async def enqueue_batch(tx: Tx, batch: Sequence[Enqueue], now: float) -> None:
    """Store a batch of enqueues in one transaction; set each one's `outcome`.

    Per message, the answer is what enqueueing them one after another would give: a digest
    already stored (or earlier in the batch) is a duplicate with the stored id; a message
    that would pass its mailbox's limits raises MailboxFull for its caller only.

    Order matters on PostgreSQL, where several batches (and instances) run at once: digests
    are claimed in sorted order (an identical concurrent claim waits for our COMMIT, then
    sees our id, or for our ROLLBACK, then stores its own), then mailbox rows are locked in
    sorted order, the same global order acks and expiry sweeps use: no deadlocks.
    """
    leaders: dict[tuple[str, str], Enqueue] = {}
    followers: list[tuple[Enqueue, Enqueue]] = []
    for job in batch:
        first = leaders.setdefault(job.key, job)
        if first is not job:
            followers.append((job, first))
    claimed = await _claim_digests(tx, sorted(leaders.values(), key=lambda job: job.key), now)
    position = {id(job): index for index, job in enumerate(batch)}
    accepted = await _within_limits(tx, sorted(claimed, key=lambda job: position[id(job)]))
    if accepted:
        await _store(tx, accepted, now)
    for job in accepted:
        job.outcome = EnqueueResult(id=job.id, duplicate=False)
    for job, first in followers:
        outcome = first.outcome
        job.outcome = (
            EnqueueResult(id=outcome.id, duplicate=True)
            if isinstance(outcome, EnqueueResult)
            else outcome
        )


async def _claim_digests(tx: Tx, pending: list[Enqueue], now: float) -> list[Enqueue]:
    """Claim each message's (recipient, digest) for its id; those whose claim won. The
    others are told the stored duplicate's id."""
    claimed: list[Enqueue] = []
    for _ in range(DEDUP_ROUNDS):
        if not pending:
            break
        won = {
            (r[0], r[1])
            for r in await rows_in_chunks(
                tx,
                "INSERT INTO dedup (recipient, digest, message_id, created_at) {rows} "
                "ON CONFLICT (recipient, digest) DO NOTHING RETURNING recipient, digest",
                ("text", "text", "text", "float8"),
                [(*job.key, job.id, now) for job in pending],
            )
        }
        claimed.extend(job for job in pending if job.key in won)
        lost = [job for job in pending if job.key not in won]
        pending = []
        for job in lost:
            existing = await tx.fetchval(
                # A write on PostgreSQL: this COMMIT must wait for a standby before the
                # duplicate is answered (pg_ha); SQLite only reads.
                "UPDATE dedup SET message_id = message_id "
                "WHERE recipient = $1 AND digest = $2 RETURNING message_id"
                if tx.replicated
                else "SELECT message_id FROM dedup WHERE recipient = $1 AND digest = $2",
                *job.key,
            )
            if existing is None:
                pending.append(job)  # expired between our two statements: claim again
            else:
                job.outcome = EnqueueResult(id=existing, duplicate=True)
    for job in pending:
        job.outcome = StoreError("dedup entry kept changing; retry")
    return claimed


async def _store(tx: Tx, accepted: list[Enqueue], now: float) -> None:
    """Insert the accepted messages, count them into their mailboxes, queue their outbox
    items, and wake their mailboxes after COMMIT."""
    await rows_in_chunks(
        tx,
        "INSERT INTO messages (id, mediatee, recipient, body, size, received_at, "
        "expires_at) {rows}",
        ("text", "text", "text", "bytea", "bigint", "float8", "float8"),
        [
            (
                job.id,
                job.message.mediatee,
                job.message.recipient,
                job.message.body,
                len(job.message.body),
                now,
                job.message.expires_at,
            )
            for job in accepted
        ],
    )
    totals: dict[str, tuple[int, int]] = {}
    for job in accepted:
        count, size = totals.get(job.message.mediatee, (0, 0))
        totals[job.message.mediatee] = (count + 1, size + len(job.message.body))
    await tx.executemany(
        "UPDATE mailboxes SET message_count = message_count + $2, "
        "total_bytes = total_bytes + $3 WHERE mediatee = $1",
        [(mediatee, count, size) for mediatee, (count, size) in sorted(totals.items())],
    )
    await insert_outbox(tx, [item for job in accepted for item in job.outbox], now)
    for mediatee in totals:
        tx.wake_mailbox(mediatee)


async def _within_limits(tx: Tx, claimed: list[Enqueue]) -> list[Enqueue]:
    """The claimed messages their mailboxes have room for, in batch order; the others'
    claims are withdrawn and their callers told MailboxFull."""
    if not claimed:
        return []
    boxes = sorted({job.message.mediatee for job in claimed})
    # Read the totals and lock their rows (creating missing ones) in one statement, in
    # sorted order: an upsert's no-op update takes the row lock on PostgreSQL.
    current = {
        r[0]: (int(r[1]), int(r[2]))
        for r in await rows_in_chunks(
            tx,
            "INSERT INTO mailboxes (mediatee, message_count, total_bytes) {rows} "
            "ON CONFLICT (mediatee) DO UPDATE SET message_count = mailboxes.message_count "
            "RETURNING mediatee, message_count, total_bytes",
            ("text", "bigint", "bigint"),
            [(mediatee, 0, 0) for mediatee in boxes],
        )
    }
    accepted: list[Enqueue] = []
    refused: list[Enqueue] = []
    for job in claimed:
        count, total = current[job.message.mediatee]
        size = len(job.message.body)
        if count + 1 > job.max_messages or total + size > job.max_bytes:
            job.outcome = MailboxFull(
                f"mailbox holds {count} messages / {total} bytes "
                f"(limits {job.max_messages} / {job.max_bytes})"
            )
            refused.append(job)
        else:
            current[job.message.mediatee] = (count + 1, total + size)
            accepted.append(job)
    if refused:
        await tx.executemany(
            "DELETE FROM dedup WHERE recipient = $1 AND digest = $2 AND message_id = $3",
            [(*job.key, job.id) for job in refused],
        )
    return accepted
