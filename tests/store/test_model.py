"""Property test: any sequence of enqueue / fetch / ack / expire keeps each engine's
counts, totals and contents equal to a plain in-memory model of the mailboxes."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from dovecote.errors import MailboxFull
from dovecote.store import Store
from dovecote.store.base import NewMessage

from .helpers import StoreFactory

T = TypeVar("T")

MAILBOXES = {
    "did:example:a": ["did:example:a-1", "did:example:a-2"],
    "did:example:b": ["did:example:b-1"],
}
PAIRS = [(m, r) for m, rs in MAILBOXES.items() for r in rs]
# Few distinct bodies, so retries (dedup hits) are common.
BODIES = [b"x", b"yy", b"zzz", b"w" * 40, b"\x00\xff binary"]
# Virtual clock for expires_at; expire() is given the virtual "now".
T0 = 1_000_000.0

SETTINGS = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@dataclass
class Queued:
    id: str
    mediatee: str
    recipient: str
    body: bytes
    expires_at: float


class MailboxMachine(RuleBasedStateMachine):
    store: Store
    runner: asyncio.Runner

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[Queued] = []  # in acceptance (= seq) order
        self.dedup: dict[tuple[str, str], str] = {}
        self.now = T0
        self.dead = 0
        self.dead_base = 0
        self.started = False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def box(self, mediatee: str) -> list[Queued]:
        return [q for q in self.queued if q.mediatee == mediatee]

    @initialize()
    def start_empty(self) -> None:
        # Examples share one database: sweep what earlier ones left (into dead letters).
        while self.run(self.store.expire(float("1e18"), time.time() + 1)):
            pass
        self.dead_base = self.run(self.store.queue_stats()).dead_letters
        self.started = True

    @rule(
        pair=st.sampled_from(PAIRS),
        body=st.sampled_from(BODIES),
        ttl=st.integers(1, 6),
        slack_count=st.integers(-1, 4),
        slack_bytes=st.integers(-3, 120),
    )
    def enqueue(
        self, pair: tuple[str, str], body: bytes, ttl: int, slack_count: int, slack_bytes: int
    ) -> None:
        mediatee, recipient = pair
        digest = hashlib.sha256(body).hexdigest()
        box = self.box(mediatee)
        count, total = len(box), sum(len(q.body) for q in box)
        max_messages, max_bytes = count + slack_count, total + slack_bytes
        original = self.dedup.get((recipient, digest))
        fits = count + 1 <= max_messages and total + len(body) <= max_bytes
        new = NewMessage(mediatee, recipient, body, digest, self.now + ttl)
        try:
            result = self.run(
                self.store.enqueue(new, max_messages=max_messages, max_bytes=max_bytes)
            )
        except MailboxFull:
            assert original is None and not fits, "refused a message that fits"
            return
        if original is not None:
            assert result.duplicate and result.id == original
            return
        assert fits and not result.duplicate, "stored past the limits"
        assert all(q.id != result.id for q in self.queued)
        self.dedup[(recipient, digest)] = result.id
        self.queued.append(Queued(result.id, mediatee, recipient, body, self.now + ttl))

    @rule(
        mediatee=st.sampled_from(list(MAILBOXES)),
        limit=st.integers(1, 8),
        by_recipient=st.booleans(),
        after=st.integers(0, 3),
    )
    def fetch(self, mediatee: str, limit: int, by_recipient: bool, after: int) -> None:
        recipient = MAILBOXES[mediatee][0] if by_recipient else None
        expected = [q for q in self.box(mediatee) if recipient in (None, q.recipient)]
        got = self.run(self.store.fetch(mediatee, limit, recipient))
        assert [(m.id, m.recipient, m.body) for m in got] == [
            (q.id, q.recipient, q.body) for q in expected[:limit]
        ]
        assert all(m.mediatee == mediatee for m in got)
        if len(got) > after:
            rest = self.run(self.store.fetch(mediatee, limit, recipient, got[after].seq))
            assert [m.id for m in rest] == [q.id for q in expected[after + 1 : after + 1 + limit]]

    @rule(mediatee=st.sampled_from(list(MAILBOXES)), data=st.data())
    def ack(self, mediatee: str, data: st.DataObject) -> None:
        candidates = [q.id for q in self.queued] + ["no-such-id"]
        ids = data.draw(st.lists(st.sampled_from(candidates), max_size=5))
        removed = self.run(self.store.ack(mediatee, ids))
        expected = [q for q in self.box(mediatee) if q.id in ids]
        assert [m.id for m in removed] == [q.id for q in expected]
        assert [m.body for m in removed] == [q.body for q in expected]
        gone = {q.id for q in expected}
        self.queued = [q for q in self.queued if q.id not in gone]

    @rule(advance=st.integers(0, 3), forget=st.booleans())
    def expire(self, advance: int, forget: bool) -> None:
        self.now += advance
        dedup_before = time.time() + 1 if forget else 0.0
        moved = self.run(self.store.expire(self.now, dedup_before))
        expired = [q for q in self.queued if q.expires_at <= self.now]
        assert moved == len(expired)
        self.queued = [q for q in self.queued if q.expires_at > self.now]
        self.dead += moved
        if forget:
            self.dedup.clear()

    @invariant()
    def store_matches_model(self) -> None:
        if not self.started:
            return
        stats = self.run(self.store.queue_stats())
        assert stats.queued == len(self.queued)  # the mailbox totals table
        assert stats.dead_letters == self.dead_base + self.dead
        for mediatee in MAILBOXES:
            box = self.box(mediatee)
            status = self.run(self.store.status(mediatee))
            assert status.message_count == len(box)
            assert status.total_bytes == sum(len(q.body) for q in box)
            assert (status.oldest_received_at is None) == (not box)
            contents = self.run(self.store.fetch(mediatee, 1000))
            assert [(m.id, m.body) for m in contents] == [(q.id, q.body) for q in box]


def test_store_matches_model(engine_name: str, tmp_path: Path) -> None:
    with asyncio.Runner() as runner:
        factory = StoreFactory(engine_name, tmp_path)
        store = runner.run(factory.open())
        try:
            machine = type("Machine", (MailboxMachine,), {"store": store, "runner": runner})
            run_state_machine_as_test(machine, settings=SETTINGS)
        finally:
            runner.run(factory.cleanup())
