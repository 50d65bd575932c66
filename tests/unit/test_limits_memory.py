"""Rate-limit buckets and room feeds keyed by client input stay within a byte budget
(issue 13 point 2): a flood of distinct, large keys costs at most the budget."""

from __future__ import annotations

import tracemalloc

from dovecote.rooms.auth import Principal
from dovecote.rooms.hub import Feed, Frame, RoomHub
from dovecote.util.limits import TokenBuckets

MiB = 1024 * 1024


def test_rate_buckets_hold_at_most_their_budget() -> None:
    # 20,000 distinct 4 KiB sender DIDs: ~80 MiB kept before (100,000 keys, any size).
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        buckets = TokenBuckets(1.0, 5, 1 * MiB)  # the budget (before: a count of keys)
        for n in range(20_000):
            buckets.take(f"did:peer:2.{n:08d}" + "x" * 4096)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 2 * MiB, grown
    assert buckets.bytes <= 1 * MiB
    assert len(buckets) > 1000  # long keys are kept as digests: many fit


def test_long_keys_are_still_limited() -> None:
    buckets = TokenBuckets(0.001, 3, max_bytes=1 * MiB)
    key = "did:peer:2." + "y" * 100_000
    assert [buckets.take(key) == 0.0 for _ in range(5)] == [True, True, True, False, False]
    assert buckets.take("did:peer:2." + "z" * 100_000) == 0.0  # another key, its own bucket


def test_room_feed_keeps_nothing_of_ended_subscriptions() -> None:
    hub = RoomHub(store=None)  # type: ignore[arg-type]  # subscribe/unsubscribe never read it
    feed = Feed(Principal("alice", None, frozenset(), 0.0), queue_size=10)
    for n in range(10_000):
        hub.subscribe(feed, f"room-{n}", 0)
        hub.unsubscribe(feed, f"room-{n}")
    assert feed.generations == {} and feed.positions == {} and hub.by_room == {}
    # A frame queued for an ended subscription is still recognised as stale.
    hub.subscribe(feed, "r", 0)
    stale = Frame({"type": "event"}, "r", 1, feed.generations["r"])
    hub.unsubscribe(feed, "r")
    hub.subscribe(feed, "r", 0)
    assert not feed.current(stale)
    assert feed.current(Frame({"type": "event"}, "r", 1, feed.generations["r"]))
