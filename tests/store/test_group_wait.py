"""SQLite's group wait (GROUP_COMMIT_WAIT): an enqueue waits a little for others to share
its commit; every caller is still answered only after that COMMIT, and a caller writing
one message at a time soon stops paying the wait. And find_mediatee's answers, kept
between commits of enqueues, follow every registration change."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from dovecote.store import sqlite as sqlite_engine
from dovecote.store.sqlite import FRUITLESS_WAITS, GROUP_ENOUGH, SQLiteStore

from .helpers import ROOMY, mediate, message

ALICE = "did:example:alice"


def commits() -> tuple[float, float]:
    """(group commits, writes in them) so far, from the metric."""
    count = REGISTRY.get_sample_value("dovecote_store_group_commit_size_count") or 0.0
    total = REGISTRY.get_sample_value("dovecote_store_group_commit_size_sum") or 0.0
    return count, total


def stored(path: Path) -> list[bytes]:
    """The message bodies another connection sees (committed ones only)."""
    conn = sqlite3.connect(path)
    try:
        return sorted(row[0] for row in conn.execute("SELECT body FROM messages"))
    finally:
        conn.close()


async def mediated_store(path: Path, wait: float) -> SQLiteStore:
    """An open store at `path` with this GROUP_COMMIT_WAIT, ALICE mediated."""
    store = SQLiteStore(f"sqlite:///{path}", group_commit_wait=wait)
    await store.open()
    await mediate(store, ALICE, "did:example:alice-r1")
    return store


async def test_an_enqueue_during_the_wait_shares_the_commit_and_both_hear_after_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    store = await mediated_store(path, 2.0)
    try:
        before = commits()
        first = asyncio.create_task(store.enqueue(message(body=b"one"), **ROOMY))
        await asyncio.sleep(0.05)
        # Waiting for company: not answered, and nothing committed yet.
        assert not first.done()
        assert stored(path) == []
        second = asyncio.create_task(store.enqueue(message(body=b"two"), **ROOMY))
        results = await asyncio.gather(first, second)
        assert [r.duplicate for r in results] == [False, False]
        # Both answered after one COMMIT holding both.
        assert stored(path) == [b"one", b"two"]
        count, total = commits()
        assert (count - before[0], total - before[1]) == (1, 2)
    finally:
        await store.close()


class CountingEvent(threading.Event):
    """The writer's group-wait event, counting the waits."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return super().wait(timeout)


async def test_a_caller_writing_one_message_at_a_time_stops_paying_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_engine, "PROBE_SECONDS", 3600.0)
    slept: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        real_sleep(seconds)

    # The writer thread's sleeps (time is one module: everyone's, for this test only).
    monkeypatch.setattr(time, "sleep", sleep)
    path = tmp_path / "store.db"
    store = SQLiteStore(f"sqlite:///{path}", group_commit_wait=0.02)
    store._enough = waits = CountingEvent()
    await store.open()
    try:
        await mediate(store, ALICE, "did:example:alice-r1")
        for i in range(3 * FRUITLESS_WAITS):
            result = await store.enqueue(message(body=f"m{i}".encode()), **ROOMY)
            assert not result.duplicate
            assert len(stored(path)) == i + 1  # committed before the answer
    finally:
        await store.close()
    # Only the first ones waited (nobody else was writing), both parts of the wait; the
    # rest committed at once.
    assert len(slept) == FRUITLESS_WAITS
    assert len(waits.waits) == FRUITLESS_WAITS


async def test_a_backlog_is_not_taken_for_fruitless_waits(tmp_path: Path) -> None:
    """Full groups and groups whose writes waited in the queue do not wait: they must not
    count as waits that brought nobody, or a backlog would stop the group wait."""
    store = SQLiteStore(
        f"sqlite:///{tmp_path / 'store.db'}", group_commit_max=4, group_commit_wait=0.02
    )
    await store.open()
    try:
        await mediate(store, ALICE, "did:example:alice-r1")
        results = await asyncio.gather(
            *(store.enqueue(message(body=f"m{i}".encode()), **ROOMY) for i in range(32))
        )
        assert not any(r.duplicate for r in results)
        assert store._fruitless == 0
    finally:
        await store.close()


async def test_a_large_enough_group_ends_the_wait_at_once(tmp_path: Path) -> None:
    """Past the first 8 ms only a group smaller than GROUP_ENOUGH waits on: a closed loop
    of N clients must not be held to N writes per GROUP_COMMIT_WAIT."""
    path = tmp_path / "store.db"
    store = await mediated_store(path, 3.0)
    try:
        before = commits()
        started = time.monotonic()
        first = asyncio.create_task(store.enqueue(message(body=b"m0"), **ROOMY))
        await asyncio.sleep(0.2)  # the writer has it and waits for company
        assert not first.done()
        results = await asyncio.gather(
            first,
            *(
                store.enqueue(message(body=f"m{i}".encode()), **ROOMY)
                for i in range(1, GROUP_ENOUGH)
            ),
        )
        took = time.monotonic() - started
        assert not any(r.duplicate for r in results)
        assert len(stored(path)) == GROUP_ENOUGH
        count, total = commits()
        # All in one commit (they waited for each other) ...
        assert (count - before[0], total - before[1]) == (1, GROUP_ENOUGH)
        # ... which came when the group was complete, not after the 3 s wait.
        assert took < 1.5
        # One fewer: the wait runs its course.
        started = time.monotonic()
        first = asyncio.create_task(store.enqueue(message(body=b"n0"), **ROOMY))
        await asyncio.sleep(0.2)
        await asyncio.gather(
            first,
            *(
                store.enqueue(message(body=f"n{i}".encode()), **ROOMY)
                for i in range(1, GROUP_ENOUGH - 1)
            ),
        )
        assert time.monotonic() - started >= 2.5
    finally:
        await store.close()


async def test_lookups_follow_registrations_across_enqueues_and_other_writes(
    tmp_path: Path,
) -> None:
    # find_mediatee keeps its answers between writes that are not enqueues.
    store = SQLiteStore(f"sqlite:///{tmp_path / 'store.db'}")
    await store.open()
    try:
        await mediate(store, ALICE, "did:example:alice-r1")
        await mediate(store, "did:example:bob")
        assert await store.find_mediatee("did:example:alice-r1") == ALICE
        assert await store.find_mediatee("did:example:nobody") is None
        for i in range(3):
            await store.enqueue(message(body=f"m{i}".encode()), **ROOMY)
            assert await store.find_mediatee("did:example:alice-r1#key-1") == ALICE
        await store.update_recipients(ALICE, [("did:example:alice-r1", "remove")])
        assert await store.find_mediatee("did:example:alice-r1") is None
        await store.update_recipients("did:example:bob", [("did:example:alice-r1", "add")])
        assert await store.find_mediatee("did:example:alice-r1") == "did:example:bob"
        await store.update_recipients("did:example:bob", [("did:example:nobody", "add")])
        assert await store.find_mediatee("did:example:nobody") == "did:example:bob"
    finally:
        await store.close()
