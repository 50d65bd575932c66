"""The store queries behind the operator views: DLQ filters, mailbox usage, outbox targets."""

from __future__ import annotations

from dovecote.store import Store
from dovecote.store.base import NewOutboxItem

from .helpers import ROOMY, mediate, message

ALICE = "did:example:alice"
BOB = "did:example:bob"


async def _dead(engine: Store, target: str, kind: str, reason: str) -> int:
    (item_id,) = await engine.outbox_add([NewOutboxItem(kind=kind, target=target, payload=b"x")])
    leased = await engine.outbox_lease([kind], "w", 10, 30)
    assert [i.id for i in leased] == [item_id]
    await engine.outbox_dead(item_id, "w", reason, {"attempt": 1, "error": "500"})
    return item_id


async def test_dlq_filters_by_kind_target_and_reason(engine: Store) -> None:
    a = await _dead(engine, "https://a.example/inbox", "forward", "max_attempts")
    b = await _dead(engine, "https://b.example/hook", "notify", "http_410")
    c = await _dead(engine, "https://b.example/inbox", "forward", "retention_exceeded")

    async def ids(**filters: str) -> tuple[list[int], int]:
        items, total = await engine.dlq_list(**filters)  # type: ignore[arg-type]
        return [i.id for i in items], total

    assert await ids() == ([c, b, a], 3)
    assert await ids(kind="forward") == ([c, a], 2)
    assert await ids(target="b.example") == ([c, b], 2)
    assert await ids(reason="attempts") == ([a], 1)
    assert await ids(kind="forward", target="b.example") == ([c], 1)
    assert await ids(kind="mailbox") == ([], 0)
    # Substrings are literal: LIKE wildcards match nothing special.
    assert await ids(target="%") == ([], 0)
    assert await ids(reason="_e") == ([c], 1)
    page, total = await engine.dlq_list(1, 1, kind="forward")
    assert [i.id for i in page] == [a] and total == 2


async def test_mailbox_usage_largest_and_oldest(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:alice-r1")
    await mediate(engine, BOB, "did:example:bob-r1")
    await engine.enqueue(message(BOB, "did:example:bob-r1", body=b"b" * 10), **ROOMY)
    for n in range(3):
        await engine.enqueue(message(body=bytes([n]) * 100), **ROOMY)

    largest = await engine.mailbox_usage("bytes", 10)
    assert [(m.mediatee, m.message_count, m.total_bytes) for m in largest] == [
        (ALICE, 3, 300),
        (BOB, 1, 10),
    ]
    oldest = await engine.mailbox_usage("oldest", 10)
    assert [m.mediatee for m in oldest] == [BOB, ALICE]
    assert oldest[0].oldest_received_at is not None
    assert oldest[0].oldest_received_at <= (oldest[1].oldest_received_at or 0)
    assert [m.mediatee for m in await engine.mailbox_usage("oldest", 1)] == [BOB]
    assert len(await engine.mailbox_usage("bytes", 1)) == 1


async def test_outbox_targets_grouped(engine: Store) -> None:
    await engine.outbox_add(
        [
            NewOutboxItem(kind="forward", target="https://a.example/", payload=b"1"),
            NewOutboxItem(kind="forward", target="https://a.example/", payload=b"2"),
            NewOutboxItem(kind="notify", target="https://b.example/", payload=b"3"),
        ]
    )
    (leased,) = await engine.outbox_lease(["notify"], "w", 10, 30)
    await engine.outbox_retry(leased.id, "w", 4_000_000_000.0, {"attempt": 1, "error": "500"})
    rows = await engine.outbox_targets(10)
    assert [(r.target, r.kind, r.pending) for r in rows] == [
        ("https://a.example/", "forward", 2),
        ("https://b.example/", "notify", 1),
    ]
    assert rows[0].max_attempts == 0 and rows[0].next_attempt_at > 0
    assert rows[1].max_attempts == 1 and rows[1].next_attempt_at == 4_000_000_000.0
    assert rows[0].oldest_created_at <= rows[0].next_attempt_at + 1
    assert len(await engine.outbox_targets(1)) == 1
