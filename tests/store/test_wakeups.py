"""Store listeners: a committed enqueue wakes this instance's listeners once (each
engine); the live registry treats the store's wake-all as "every session looks again"."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from dovecote.delivery.live import WAKE_ALL, LiveRegistry, LiveSession
from dovecote.errors import MailboxFull
from dovecote.store import Store

from .helpers import ROOMY, mediate, message

ALICE = "did:example:alice"


async def test_committed_enqueue_wakes_local_listener_once(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:alice-r1")
    seen: list[tuple[str, int]] = []
    checks: list[asyncio.Task[int]] = []

    def listener(mediatee: str) -> None:
        # Called after COMMIT: what woke us must already be readable.
        seen.append((mediatee, len(seen)))
        checks.append(asyncio.ensure_future(_count(engine, mediatee)))

    engine.add_listener(listener)
    await engine.enqueue(message(body=b"one"), **ROOMY)
    await asyncio.sleep(0)
    assert [m for m, _ in seen] == [ALICE]
    await engine.enqueue(message(body=b"one"), **ROOMY)  # duplicate: nothing new
    with pytest.raises(MailboxFull):
        await engine.enqueue(message(body=b"two"), max_messages=1, max_bytes=100)
    await asyncio.sleep(0.5)  # a NOTIFY echo from our own commit would arrive by now
    assert [m for m, _ in seen] == [ALICE]
    assert [await c for c in checks] == [1]


async def _count(store: Store, mediatee: str) -> int:
    return (await store.status(mediatee)).message_count


async def test_failing_listener_does_not_fail_the_enqueue(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:alice-r1")

    def broken(_mediatee: str) -> None:
        raise RuntimeError("listener bug")

    engine.add_listener(broken)
    try:
        result = await engine.enqueue(message(), **ROOMY)
    except RuntimeError:
        pytest.fail("a listener's exception reached the sender of a committed message")
    await asyncio.sleep(0.05)
    assert [m.id for m in await engine.fetch(ALICE, 10)] == [result.id]


async def test_wake_all_wakes_every_live_session() -> None:
    registry = LiveRegistry(cast(Store, None))  # notify() never touches the store

    async def send(_data: bytes) -> None:
        return None

    sessions = [LiveSession(send) for _ in range(3)]
    for index, session in enumerate(sessions):
        registry.by_mediatee[f"did:example:m{index}"] = session
    registry.notify("did:example:m1")
    assert [s.wake.is_set() for s in sessions] == [False, True, False]
    registry.notify(WAKE_ALL)
    assert all(s.wake.is_set() for s in sessions)
    registry.notify("did:example:nobody")  # unknown mailbox: nothing to do
