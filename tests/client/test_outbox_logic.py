"""The outbox's scheduling rules on a real SQLite file, without a server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from dovecote.client.config import ClientConfig
from dovecote.client.errors import InvalidInvitation
from dovecote.client.mediation import parse_invitation
from dovecote.client.outbox import BackgroundSender
from dovecote.client.store import ClientOutboxKind, ClientStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ClientStore]:
    s = ClientStore(tmp_path)
    await s.open()
    yield s
    await s.close()


def _rows(
    prefix: str, kind: ClientOutboxKind, target: str, n: int
) -> list[tuple[str, ClientOutboxKind, str, bytes, list[str]]]:
    return [(f"{prefix}{i}", kind, target, b"x", ["http://a/", "http://b/"]) for i in range(n)]


async def test_new_rows_wait_for_their_batch_but_retries_keep_backoff(store: ClientStore) -> None:
    await store.enqueue(_rows("m", ClientOutboxKind.DIDCOMM, "did:x", 3), delay=5.0)
    assert await store.due(10) == []  # lingering in the batching window
    assert [i.id for i in await store.due(10, time.time() + 5.0)] == ["m0", "m1", "m2"]
    [first, *_] = await store.due(10, time.time() + 5.0)
    first.attempts, first.next_attempt_at = 1, time.time() + 3.0
    await store.record([first])
    # An early flush takes the never-tried rows, not the one backing off.
    assert [i.id for i in await store.due(10, time.time() + 5.0)] == ["m1", "m2"]


async def test_room_posts_wait_behind_an_earlier_post_backing_off(store: ClientStore) -> None:
    await store.enqueue(
        _rows("r", ClientOutboxKind.ROOM, "room-1", 3)
        + _rows("s", ClientOutboxKind.ROOM, "room-2", 1)
    )
    [head, *_] = await store.due(10)
    head.attempts, head.next_attempt_at = 1, time.time() + 60
    await store.record([head])
    # r1 and r2 wait for r0; another room is not held up.
    assert [i.id for i in await store.due(10)] == ["s0"]


async def test_failover_after_three_attempts_and_failure_past_retention(store: ClientStore) -> None:
    config = ClientConfig(data_dir=Path("."), retention=3600, backoff_base=0.01)
    async with httpx.AsyncClient() as http:
        sender = BackgroundSender(store, config, http)
        await store.enqueue(_rows("m", ClientOutboxKind.DIDCOMM, "did:x", 1))
        [item] = await store.due(1)
        for _ in range(3):
            item = sender._reschedule(item, "refused", None)
        assert (item.endpoint_index, item.endpoint_attempts, item.attempts) == (1, 0, 3)
        assert item.endpoint == "http://b/" and item.next_attempt_at <= time.time()
        item = sender._reschedule(item, "refused", retry_after=30.0)
        assert item.next_attempt_at >= time.time() + 29
        item.created_at -= 3600
        assert sender._reschedule(item, "refused", None).state == "failed"


async def test_backoff_doubles_with_equal_jitter_and_caps(store: ClientStore) -> None:
    config = ClientConfig(data_dir=Path("."), backoff_base=0.5, backoff_max=8.0)
    async with httpx.AsyncClient() as http:
        sender = BackgroundSender(store, config, http)
        await store.enqueue([("m", ClientOutboxKind.DIDCOMM, "did:x", b"x", ["http://a/"])])
        [item] = await store.due(1)
        for attempts_before, ceiling in ((0, 0.5), (1, 1.0), (2, 2.0), (9, 8.0)):
            for _ in range(50):
                before = time.time()
                item.attempts = attempts_before
                delay = sender._reschedule(item, "refused", None).next_attempt_at - before
                assert ceiling / 2 - 0.05 <= delay <= ceiling + 0.05, (attempts_before, delay)


def test_invitation_padding_is_optional() -> None:
    import base64
    import json

    body = json.dumps(
        {
            "type": "https://didcomm.org/out-of-band/2.0/invitation",
            "id": "1",
            "from": "did:peer:2.x",
        }
    ).encode()
    padded = base64.urlsafe_b64encode(body).decode()
    for encoded in (padded, padded.rstrip("=")):
        assert parse_invitation(f"https://r/?_oob={encoded}")["from"] == "did:peer:2.x"
    with pytest.raises(InvalidInvitation):
        parse_invitation("https://r/?_oob=" + base64.urlsafe_b64encode(b'{"from":1}').decode())
