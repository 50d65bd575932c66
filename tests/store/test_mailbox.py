"""Mailboxes: enqueue, fetch, ack, status, dedup, limits, expiry (each engine)."""

from __future__ import annotations

import asyncio
import time

import pytest

from dovecote.errors import MailboxFull
from dovecote.store import Store
from dovecote.store.base import NewOutboxItem

from .helpers import ROOMY, mediate, message

ALICE = "did:example:alice"
BOB = "did:example:bob"


async def test_enqueue_fetch_ack_status(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:alice-r1", "did:example:alice-r2")
    first = await engine.enqueue(message(body=b"one"), **ROOMY)
    second = await engine.enqueue(
        message(recipient="did:example:alice-r2", body=b"two-two"), **ROOMY
    )
    assert not first.duplicate and not second.duplicate and first.id != second.id

    status = await engine.status(ALICE)
    assert (status.message_count, status.total_bytes) == (2, 10)
    assert status.oldest_received_at is not None and status.newest_received_at is not None
    assert status.oldest_received_at <= status.newest_received_at

    queued = await engine.fetch(ALICE, 10)
    assert [m.id for m in queued] == [first.id, second.id]
    assert [m.body for m in queued] == [b"one", b"two-two"]
    assert queued[0].seq < queued[1].seq
    assert queued[0].mediatee == ALICE and queued[1].recipient == "did:example:alice-r2"
    # Fetching removes nothing; paging by seq continues after the last one seen.
    assert [m.id for m in await engine.fetch(ALICE, 1)] == [first.id]
    assert [m.id for m in await engine.fetch(ALICE, 10, after_seq=queued[0].seq)] == [second.id]

    only_r2 = await engine.fetch(ALICE, 10, recipient="did:example:alice-r2")
    assert [m.id for m in only_r2] == [second.id]
    r2_status = await engine.status(ALICE, "did:example:alice-r2")
    assert (r2_status.message_count, r2_status.total_bytes) == (1, 7)

    # The live-mode baseline starts from the highest queued seq (0 for an empty mailbox).
    assert await engine.last_seq(ALICE) == queued[1].seq
    assert await engine.last_seq(BOB) == 0

    removed = await engine.ack(ALICE, [first.id, first.id, "no-such-id"])
    assert [m.id for m in removed] == [first.id]
    assert await engine.ack(ALICE, [first.id]) == []
    assert [m.id for m in await engine.fetch(ALICE, 10)] == [second.id]
    status = await engine.status(ALICE)
    assert (status.message_count, status.total_bytes) == (1, 7)

    await engine.ack(ALICE, [second.id])
    empty = await engine.status(ALICE)
    assert empty == type(empty)(0, 0, None, None)
    assert (await engine.queue_stats()).queued == 0


async def test_ack_only_touches_own_mailbox(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:alice-r1")
    await mediate(engine, BOB, "did:example:bob-r1")
    mine = await engine.enqueue(message(), **ROOMY)
    assert await engine.ack(BOB, [mine.id]) == []
    assert [m.id for m in await engine.fetch(ALICE, 10)] == [mine.id]
    assert await engine.ack(ALICE, []) == []


async def test_status_and_fetch_match_did_url_forms(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:alice-r1")
    stored = await engine.enqueue(message(recipient="did:example:alice-r1"), **ROOMY)
    # Asking with a key of the DID also finds messages stored for the DID itself.
    assert [m.id for m in await engine.fetch(ALICE, 10, recipient="did:example:alice-r1#k1")] == [
        stored.id
    ]
    assert (await engine.status(ALICE, "did:example:alice-r1#k1")).message_count == 1
    assert (await engine.status(ALICE, "did:example:other")).message_count == 0


async def test_dedup_returns_original_id_even_after_ack(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:alice-r1", "did:example:alice-r2")
    first = await engine.enqueue(message(body=b"same"), **ROOMY)
    again = await engine.enqueue(message(body=b"same"), **ROOMY)
    assert again.id == first.id and again.duplicate
    assert (await engine.status(ALICE)).message_count == 1

    # Same bytes to another recipient is another message.
    other = await engine.enqueue(message(recipient="did:example:alice-r2", body=b"same"), **ROOMY)
    assert not other.duplicate and other.id != first.id

    await engine.ack(ALICE, [first.id])
    after_ack = await engine.enqueue(message(body=b"same"), **ROOMY)
    assert after_ack.id == first.id and after_ack.duplicate
    assert (await engine.status(ALICE)).message_count == 1


async def test_concurrent_identical_enqueues_store_one(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:alice-r1")
    for round_no in range(5):
        body = f"race-{round_no}".encode()
        results = await asyncio.gather(
            *[engine.enqueue(message(body=body), **ROOMY) for _ in range(12)]
        )
        assert len({r.id for r in results}) == 1
        assert sum(not r.duplicate for r in results) == 1
    status = await engine.status(ALICE)
    assert status.message_count == 5
    assert (await engine.queue_stats()).queued == 5


async def test_concurrent_distinct_enqueues_respect_limit(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:alice-r1")
    results = await asyncio.gather(
        *[
            engine.enqueue(message(body=f"m{i}".encode()), max_messages=7, max_bytes=10_000)
            for i in range(20)
        ],
        return_exceptions=True,
    )
    stored = [r for r in results if not isinstance(r, BaseException)]
    full = [r for r in results if isinstance(r, MailboxFull)]
    assert len(stored) == 7 and len(full) == 13
    assert (await engine.status(ALICE)).message_count == 7
    assert (await engine.queue_stats()).queued == 7


async def test_mailbox_full_leaves_queue_untouched(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:alice-r1")
    kept = [
        await engine.enqueue(message(body=f"m{i}".encode()), max_messages=2, max_bytes=100)
        for i in range(2)
    ]
    before = await engine.fetch(ALICE, 10)
    outbox = [NewOutboxItem(kind="notify", target="https://push.example", payload=b"x")]
    with pytest.raises(MailboxFull):
        await engine.enqueue(message(body=b"m2"), max_messages=2, max_bytes=100, outbox=outbox)
    # The byte limit counts too.
    with pytest.raises(MailboxFull):
        await engine.enqueue(message(body=b"x" * 97), max_messages=10, max_bytes=100)
    assert await engine.fetch(ALICE, 10) == before
    assert [m.id for m in before] == [r.id for r in kept]
    stats = await engine.queue_stats()
    assert stats.queued == 2 and stats.outbox == {}
    # Nothing of the refused message was remembered: it is accepted once there is room.
    await engine.ack(ALICE, [kept[0].id])
    accepted = await engine.enqueue(message(body=b"m2"), max_messages=2, max_bytes=100)
    assert not accepted.duplicate
    # A duplicate of a stored message is answered even when the mailbox is full.
    assert (await engine.enqueue(message(body=b"m2"), max_messages=2, max_bytes=4)).duplicate


async def test_enqueue_adds_outbox_items_in_same_transaction(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:alice-r1")
    items = [
        NewOutboxItem(
            kind="notify",
            target="https://push.example/a",
            payload=b"p",
            headers={"x": "1"},
            dedup_key="k1",
        ),
    ]
    await engine.enqueue(message(body=b"a"), outbox=items, **ROOMY)
    await engine.enqueue(message(body=b"b"), outbox=items, **ROOMY)  # same dedup_key
    stats = await engine.queue_stats()
    assert stats.outbox == {"notify": 1}
    leased = await engine.outbox_lease(["notify"], "w1", 10, 30)
    assert [(i.target, i.payload, i.headers) for i in leased] == [
        ("https://push.example/a", b"p", {"x": "1"})
    ]


async def test_expire_moves_to_dead_letters_and_forgets_digests(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:alice-r1")
    await mediate(engine, BOB, "did:example:bob-r1")
    now = time.time()
    old = await engine.enqueue(message(body=b"old", expires_at=now - 1), **ROOMY)
    young = await engine.enqueue(message(body=b"young", expires_at=now + 3600), **ROOMY)
    bob_old = await engine.enqueue(
        message(BOB, "did:example:bob-r1", b"bob-old", expires_at=now - 2), **ROOMY
    )

    moved = await engine.expire(now, dedup_before=0)
    assert moved == 2
    assert [m.id for m in await engine.fetch(ALICE, 10)] == [young.id]
    assert await engine.fetch(BOB, 10) == []
    stats = await engine.queue_stats()
    assert stats.queued == 1 and stats.dead_letters == 2

    letters, total = await engine.dlq_list()
    assert total == 2
    by_message = {d.headers["message_id"]: d for d in letters}
    assert set(by_message) == {old.id, bob_old.id}
    letter = by_message[old.id]
    assert (letter.kind, letter.reason, letter.target, letter.payload) == (
        "mailbox",
        "expired",
        "did:example:alice-r1",
        b"old",
    )
    assert letter.headers["mediatee"] == ALICE and letter.history == []
    assert await engine.dlq_get(letter.id) == letter
    # Mailbox dead letters are not replayable into the outbox.
    assert await engine.dlq_replay([letter.id]) == 0

    # Digests are kept until the dedup window ends...
    assert (await engine.enqueue(message(body=b"old"), **ROOMY)).duplicate
    assert await engine.expire(now, dedup_before=0) == 0
    # ...then forgotten: the same bytes are a new message.
    await engine.expire(now, dedup_before=time.time() + 1)
    fresh = await engine.enqueue(message(body=b"old"), **ROOMY)
    assert not fresh.duplicate and fresh.id != old.id
    assert (await engine.status(ALICE)).message_count == 2


async def test_expire_honours_limit(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:alice-r1")
    past = time.time() - 10
    for i in range(5):
        await engine.enqueue(message(body=f"e{i}".encode(), expires_at=past + i), **ROOMY)
    assert await engine.expire(time.time(), 0, limit=3) == 3
    left = await engine.fetch(ALICE, 10)
    assert [m.body for m in left] == [b"e3", b"e4"]  # the soonest-expiring went first
    assert await engine.expire(time.time(), 0, limit=3) == 2
    assert (await engine.queue_stats()).queued == 0
