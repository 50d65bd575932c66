"""Outbox leases, retries, dead letters and their replay/purge (each engine)."""

from __future__ import annotations

import asyncio
import time

from dovecote.store import Store
from dovecote.store.base import NewOutboxItem


def item(target: str = "https://a.example/", kind: str = "forward", **kw: object) -> NewOutboxItem:
    return NewOutboxItem(kind=kind, target=target, payload=f"to {target}".encode(), **kw)  # type: ignore[arg-type]


async def test_add_lease_done(engine: Store) -> None:
    ids = await engine.outbox_add([item(), item("https://b.example/", headers={"h": "v"})])
    assert len(ids) == 2 and ids[0] < ids[1]
    assert await engine.outbox_add([item(dedup_key="once")]) != []
    assert await engine.outbox_add([item(dedup_key="once")]) == []

    leased = await engine.outbox_lease(["forward"], "w1", 10, 30)
    assert sorted(i.id for i in leased) == sorted([*ids, leased[-1].id])
    assert {i.target for i in leased} == {"https://a.example/", "https://b.example/"}
    b = next(i for i in leased if i.target == "https://b.example/")
    assert b.headers == {"h": "v"} and b.payload == b"to https://b.example/"
    assert b.attempts == 0 and b.history == []
    # Held by w1: nobody else gets them.
    assert await engine.outbox_lease(["forward"], "w2", 10, 30) == []

    await engine.outbox_done(leased[0].id, "w2")  # not the holder: ignored
    assert (await engine.queue_stats()).outbox == {"forward": 3}
    for leased_item in leased:
        await engine.outbox_done(leased_item.id, "w1")
    assert (await engine.queue_stats()).outbox == {}


async def test_lease_filters_kind_target_due_and_limit(engine: Store) -> None:
    await engine.outbox_add(
        [
            item("https://a.example/"),
            item("https://b.example/"),
            item("https://c.example/"),
            item("https://push.example/", kind="notify"),
        ]
    )
    got = await engine.outbox_lease(
        ["forward"], "w1", 1, 30, exclude_targets=["https://a.example/"]
    )
    assert len(got) == 1 and got[0].target in {"https://b.example/", "https://c.example/"}
    notify = await engine.outbox_lease(["notify"], "w1", 10, 30)
    assert [i.target for i in notify] == ["https://push.example/"]
    rest = await engine.outbox_lease(["forward", "notify"], "w2", 10, 30)
    assert len(rest) == 2 and got[0].id not in {i.id for i in rest}


async def test_retry_records_history_and_delays(engine: Store) -> None:
    (item_id,) = await engine.outbox_add([item()])
    await engine.outbox_lease(["forward"], "w1", 10, 30)
    await engine.outbox_retry(item_id, "other", 0.0, {"error": "nope"})  # not the holder
    assert await engine.outbox_lease(["forward"], "w2", 10, 30) == []  # still w1's

    await engine.outbox_retry(item_id, "w1", 0.0, {"error": "timeout", "status": 0})
    (again,) = await engine.outbox_lease(["forward"], "w2", 10, 30)
    assert again.attempts == 1
    assert again.history == [{"error": "timeout", "status": 0}]

    # An uncounted retry (e.g. the endpoint's breaker was open) keeps attempts and history.
    await engine.outbox_retry(item_id, "w2", 0.0, {"skipped": True}, count_attempt=False)
    (third,) = await engine.outbox_lease(["forward"], "w3", 10, 30)
    assert third.attempts == 1 and len(third.history) == 1

    later = time.time() + 3600
    await engine.outbox_retry(item_id, "w3", later, {"error": "500"})
    assert await engine.outbox_lease(["forward"], "w4", 10, 30) == []  # not due
    stats = await engine.queue_stats()
    assert abs(stats.outbox_oldest_due["forward"] - later) < 1e-3
    await engine.outbox_retry(item_id, "w3", 0.0, {"late": True})  # w3 let go: ignored
    assert await engine.outbox_lease(["forward"], "w4", 10, 30) == []


async def test_retry_history_keeps_the_last_hundred(engine: Store) -> None:
    (item_id,) = await engine.outbox_add([item()])
    for n in range(105):
        await engine.outbox_lease(["forward"], "w", 10, 30)
        await engine.outbox_retry(item_id, "w", 0.0, {"n": n})
    (leased,) = await engine.outbox_lease(["forward"], "w", 10, 30)
    assert leased.attempts == 105
    assert [h["n"] for h in leased.history] == list(range(5, 105))


async def test_dead_letter_with_history_then_replay_and_purge(engine: Store) -> None:
    (item_id,) = await engine.outbox_add([item("https://gone.example/", headers={"k": "v"})])
    (leased,) = await engine.outbox_lease(["forward"], "w1", 10, 30)
    await engine.outbox_retry(item_id, "w1", 0.0, {"attempt": 1, "error": "500"})
    (leased,) = await engine.outbox_lease(["forward"], "w1", 10, 30)
    assert leased.attempts == 1
    await engine.outbox_dead(item_id, "w2", "too many attempts", None)  # not holder
    await engine.outbox_dead(item_id, "w1", "too many attempts", {"attempt": 2, "error": "500"})
    stats = await engine.queue_stats()
    assert stats.outbox == {} and stats.dead_letters == 1

    letters, total = await engine.dlq_list()
    assert total == 1
    (letter,) = letters
    assert (letter.kind, letter.target, letter.reason) == (
        "forward",
        "https://gone.example/",
        "too many attempts",
    )
    assert letter.headers == {"k": "v"} and letter.payload == b"to https://gone.example/"
    assert letter.history == [{"attempt": 1, "error": "500"}, {"attempt": 2, "error": "500"}]
    assert letter.dead_at >= letter.created_at
    assert await engine.dlq_get(letter.id) == letter
    assert await engine.dlq_get(letter.id + 1000) is None

    assert await engine.dlq_replay(target="https://elsewhere.example/") == 0
    assert await engine.dlq_replay([letter.id]) == 1
    assert await engine.dlq_get(letter.id) is None
    (replayed,) = await engine.outbox_lease(["forward"], "w1", 10, 30)
    assert replayed.attempts == 0 and replayed.target == "https://gone.example/"
    assert replayed.headers == {"k": "v"}
    assert replayed.history[:2] == letter.history
    assert replayed.history[-1]["event"] == "replayed"

    await engine.outbox_dead(replayed.id, "w1", "gone", None)
    await engine.outbox_add([item("https://x.example/")])
    (x,) = await engine.outbox_lease(["forward"], "w1", 10, 30)
    await engine.outbox_dead(x.id, "w1", "gone", None)
    letters, total = await engine.dlq_list()
    assert total == 2 and letters[0].id > letters[1].id  # newest first
    page, _ = await engine.dlq_list(offset=1, limit=1)
    assert [d.id for d in page] == [letters[1].id]

    assert await engine.dlq_purge(older_than=0.0) == 0
    assert await engine.dlq_purge([letters[0].id]) == 1
    assert await engine.dlq_purge(older_than=time.time() + 1) == 1
    assert await engine.dlq_list() == ([], 0)


async def test_replay_all_and_by_target(engine: Store) -> None:
    await engine.outbox_add(
        [item("https://a.example/"), item("https://b.example/"), item("https://b.example/")]
    )
    for leased in await engine.outbox_lease(["forward"], "w", 10, 30):
        await engine.outbox_dead(leased.id, "w", "gone", None)
    assert await engine.dlq_replay(target="https://b.example/") == 2
    assert await engine.dlq_replay() == 1
    assert (await engine.queue_stats()).outbox == {"forward": 3}
    assert await engine.dlq_purge() == 0


async def test_expired_lease_lets_another_owner_take_the_item(engine: Store) -> None:
    (item_id,) = await engine.outbox_add([item()])
    (first,) = await engine.outbox_lease(["forward"], "w1", 10, 0.05)
    assert await engine.outbox_lease(["forward"], "w2", 10, 30) == []
    await asyncio.sleep(0.1)
    (taken,) = await engine.outbox_lease(["forward"], "w2", 10, 30)
    assert taken.id == first.id == item_id
    # The old holder lost it: its done/retry/dead are ignored.
    await engine.outbox_done(item_id, "w1")
    await engine.outbox_retry(item_id, "w1", 0.0, {"late": True})
    await engine.outbox_dead(item_id, "w1", "late", None)
    assert (await engine.queue_stats()).outbox == {"forward": 1}
    await engine.outbox_done(item_id, "w2")
    assert (await engine.queue_stats()).outbox == {}


async def test_release_drops_only_this_owners_leases(engine: Store) -> None:
    await engine.outbox_add([item("https://a.example/"), item("https://b.example/")])
    await engine.outbox_lease(["forward"], "w1", 1, 30)
    await engine.outbox_lease(["forward"], "w2", 1, 30)
    assert await engine.outbox_release("w1") == 1
    assert await engine.outbox_release("w1") == 0
    again = await engine.outbox_lease(["forward"], "w3", 10, 30)
    assert len(again) == 1


async def test_concurrent_leases_never_share_an_item(engine: Store) -> None:
    await engine.outbox_add([item(f"https://t{i}.example/") for i in range(60)])
    batches = await asyncio.gather(
        *[engine.outbox_lease(["forward"], f"w{i}", 7, 30) for i in range(12)]
    )
    ids = [i.id for batch in batches for i in batch]
    assert len(ids) == len(set(ids)) == 60


async def test_replayed_dead_letter_keeps_its_dedup_key(engine: Store) -> None:
    # A notification died; another one for the same mailbox is pending: the replay
    # coalesces with it instead of notifying twice.
    (dead_id,) = await engine.outbox_add([item(kind="notify", dedup_key="notify:push:box")])
    await engine.outbox_lease(["notify"], "w1", 10, 30)
    await engine.outbox_dead(dead_id, "w1", "http_400", None)
    (pending,) = await engine.outbox_add([item(kind="notify", dedup_key="notify:push:box")])
    (letter,) = (await engine.dlq_list())[0]
    assert await engine.dlq_replay([letter.id]) == 1
    assert (await engine.queue_stats()).outbox == {"notify": 1}
    (only,) = await engine.outbox_lease(["notify"], "w1", 10, 30)
    assert only.id == pending
    # With nothing pending, the replayed item is queued under its key: a new one then
    # coalesces with it.
    await engine.outbox_dead(only.id, "w1", "http_400", None)
    (letter,) = (await engine.dlq_list())[0]
    assert await engine.dlq_replay([letter.id]) == 1
    assert await engine.outbox_add([item(kind="notify", dedup_key="notify:push:box")]) == []
    assert (await engine.queue_stats()).outbox == {"notify": 1}


async def test_relayed_forward_key_is_remembered_for_the_dedup_window(engine: Store) -> None:
    relay = item(dedup_key="forward:digest-1", remember=True)
    (first,) = await engine.outbox_add([relay])
    (leased,) = await engine.outbox_lease(["forward"], "w1", 10, 30)
    await engine.outbox_done(leased.id, "w1")
    # Delivered and gone from the outbox: the same forward again is still a duplicate.
    assert await engine.outbox_add([relay]) == []
    assert (await engine.queue_stats()).outbox == {}
    # Dead, then retried by its sender: not queued beside the dead letter; replayed once.
    other = item(dedup_key="forward:digest-2", remember=True)
    (second,) = await engine.outbox_add([other])
    await engine.outbox_lease(["forward"], "w1", 10, 30)
    await engine.outbox_dead(second, "w1", "retention_exceeded", None)
    assert await engine.outbox_add([other]) == []
    (letter,) = (await engine.dlq_list())[0]
    assert await engine.dlq_replay([letter.id]) == 1
    assert await engine.dlq_replay([letter.id]) == 0
    assert (await engine.queue_stats()).outbox == {"forward": 1}
    # Past the dedup window the key is forgotten, as a mailbox digest is.
    await engine.expire(time.time(), dedup_before=time.time() + 1)
    assert len(await engine.outbox_add([relay])) == 1
    assert first not in {i.id for i in await engine.outbox_lease(["forward"], "w2", 10, 30)}
