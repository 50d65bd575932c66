"""Group commit of enqueues (each engine): a batch of concurrent enqueues answers every
caller as one-by-one enqueues would (dedup inside the batch and against stored messages,
mailbox limits per message), and on PostgreSQL it is one transaction."""

from __future__ import annotations

import asyncio

from dovecote.errors import MailboxFull
from dovecote.store import Store
from dovecote.store.base import EnqueueResult

from .helpers import ROOMY, StoreFactory, mediate, message, raw_value

ALICE = "did:example:alice"
BOB = "did:example:bob"


async def test_concurrent_enqueues_commit_together_and_keep_dedup_and_limits(
    store_factory: StoreFactory, engine_name: str
) -> None:
    url = await store_factory.url()
    store = await store_factory.open(url)
    await mediate(store, ALICE, "did:example:alice-r1")
    await mediate(store, BOB, "did:example:bob-r1")
    earlier = await store.enqueue(message(body=b"stored before"), **ROOMY)

    fresh = [message(body=f"m{i}".encode()) for i in range(30)]
    twin = message(body=b"twin")
    again = message(body=b"stored before")
    bob = [message(BOB, "did:example:bob-r1", f"b{i}".encode()) for i in range(5)]
    calls = [store.enqueue(m, **ROOMY) for m in [*fresh, twin, twin, again]]
    calls += [store.enqueue(m, max_messages=3, max_bytes=10_000) for m in bob]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    results = [o for o in outcomes[:33] if isinstance(o, EnqueueResult)]
    assert len(results) == 33
    assert not any(r.duplicate for r in results[:30])
    first_twin, second_twin, repeat = outcomes[30:33]
    assert isinstance(first_twin, EnqueueResult) and isinstance(second_twin, EnqueueResult)
    # Two identical messages in one batch: one stored, both told its id, one a duplicate.
    assert first_twin.id == second_twin.id
    assert sorted([first_twin.duplicate, second_twin.duplicate]) == [False, True]
    assert isinstance(repeat, EnqueueResult) and repeat == EnqueueResult(earlier.id, True)
    # Bob's mailbox takes 3: the other two callers learn MailboxFull, nothing else fails.
    bob_outcomes = outcomes[33:]
    assert sum(isinstance(o, EnqueueResult) for o in bob_outcomes) == 3
    assert sum(isinstance(o, MailboxFull) for o in bob_outcomes) == 2

    stored = await store.fetch(ALICE, 100)
    assert len(stored) == 32 and len({m.id for m in stored}) == 32
    assert sorted(m.body for m in stored) == sorted(
        [b"stored before", b"twin", *(m.body for m in fresh)]
    )
    assert (await store.status(BOB)).message_count == 3
    assert (await store.status(ALICE)).message_count == 32

    if engine_name == "postgres":
        # xmin is the inserting transaction: the 30 + 1 new messages of Alice committed
        # in at most as many transactions as run at once (the first batch takes all).
        transactions = await raw_value(
            engine_name,
            url,
            f"SELECT COUNT(DISTINCT xmin::text) FROM messages WHERE id <> '{earlier.id}'",
        )
        assert transactions == 1


async def test_a_refused_message_of_a_batch_can_be_stored_later(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:alice-r1")
    full = [message(body=f"x{i}".encode()) for i in range(3)]
    outcomes = await asyncio.gather(
        *(engine.enqueue(m, max_messages=2, max_bytes=10_000) for m in full),
        return_exceptions=True,
    )
    refused = [m for m, o in zip(full, outcomes, strict=True) if isinstance(o, MailboxFull)]
    assert len(refused) == 1
    # Its digest claim was withdrawn with it: after an ack it is stored, not a duplicate.
    queued = await engine.fetch(ALICE, 10)
    await engine.ack(ALICE, [queued[0].id])
    later = await engine.enqueue(refused[0], max_messages=2, max_bytes=10_000)
    assert not later.duplicate


async def test_find_mediatee_follows_registrations(engine: Store) -> None:
    await mediate(engine, ALICE)
    await mediate(engine, BOB)
    recipient = "did:example:moving"
    assert await engine.find_mediatee(recipient) is None
    await engine.update_recipients(ALICE, [(recipient, "add")])
    assert await engine.find_mediatee(recipient + "#key-1") == ALICE
    await engine.update_recipients(ALICE, [(recipient, "remove")])
    assert await engine.find_mediatee(recipient) is None
    await engine.update_recipients(BOB, [(recipient, "add")])
    assert await engine.find_mediatee(recipient) == BOB
