"""PostgreSQL with synchronous replication configured: no success answer unless a commit
waited for a standby, and per-host connect timeouts.

A throwaway cluster (tests/chaos/pgcluster.py, never the shared server) with
`synchronous_standby_names` naming a standby that does not exist plays "both standbys
down": every commit that must replicate waits. The real 3-node Patroni cluster is in
tests/ha (make ha).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from chaos.pgcluster import PgCluster, available
from dovecote.errors import StoreError
from dovecote.store.base import NewOutboxItem
from dovecote.store.postgres import PostgresStore
from dovecote.store.rooms_base import NewPost, NewRoom

from .helpers import ROOMY, StoreFactory, mediate, message

ALICE = "did:example:alice"
RECIPIENT = "did:example:alice-r1"


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    why = available()
    if why:
        pytest.skip(why)
    pg = PgCluster().init()
    pg.start()
    yield pg
    pg.destroy()


async def configure(cluster: PgCluster, **settings: str) -> None:
    """ALTER SYSTEM + reload; every backend applies it before its next statement."""
    conn = await asyncpg.connect(cluster.url)
    try:
        for name, value in settings.items():
            await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()
    await asyncio.sleep(0.5)


@pytest.fixture
async def store(cluster: PgCluster) -> AsyncIterator[PostgresStore]:
    conn = await asyncpg.connect(cluster.url)
    name = f"repl_{time.monotonic_ns()}"
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    s = PostgresStore(cluster.url.rsplit("/", 1)[0] + f"/{name}", timeout=2.0)
    await s.open()
    try:
        yield s
    finally:
        await configure(cluster, synchronous_standby_names="")
        await s.close()


def relay(digest: str) -> NewOutboxItem:
    return NewOutboxItem(
        kind="forward",
        target="https://next.example/",
        payload=b"x",
        dedup_key=f"forward:{digest}",
        remember=True,
    )


async def test_duplicates_answer_only_after_a_standby_confirmed(
    cluster: PgCluster, store: PostgresStore
) -> None:
    await mediate(store, ALICE, RECIPIENT)
    first = await store.enqueue(message(body=b"one"), **ROOMY)
    await store.rooms.room_create(NewRoom("r1", "room", {}, ALICE, [(ALICE, "admin")]))
    post = NewPost("r1", ALICE, {"text": "hi"}, "key-1", "hash-1")
    posted = await store.rooms.message_post(post, idempotency_since=0.0)
    assert await store.outbox_add([relay("d1")]) != []

    await configure(cluster, synchronous_standby_names="nobody")
    # Each retry finds its row: answering success now would vouch for a copy that may
    # exist on this node only. They must wait for a standby, and time out (503).
    for retry in (
        store.enqueue(message(body=b"one"), **ROOMY),
        store.rooms.message_post(post, idempotency_since=0.0),
        store.outbox_add([relay("d1")]),
    ):
        with pytest.raises(StoreError):
            await retry

    await configure(cluster, synchronous_standby_names="")
    again = await store.enqueue(message(body=b"one"), **ROOMY)
    assert again.duplicate and again.id == first.id
    reposted = await store.rooms.message_post(post, idempotency_since=0.0)
    assert reposted.duplicate and reposted.message.id == posted.message.id
    assert await store.outbox_add([relay("d1")]) == []
    assert len(await store.fetch(ALICE, 10)) == 1
    page = await store.rooms.room_events("r1", after=0)
    assert page is not None and [e.type for e in page.events].count("message.posted") == 1


async def test_commit_whose_sync_wait_was_cancelled_is_not_a_success(
    cluster: PgCluster, store: PostgresStore
) -> None:
    await mediate(store, ALICE, RECIPIENT)
    await configure(cluster, synchronous_standby_names="nobody")
    pending = asyncio.create_task(store.enqueue(message(body=b"two"), **ROOMY))
    admin = await asyncpg.connect(cluster.url)
    try:
        # An operator (or any cancel) cuts the COMMIT's wait for the standby short:
        # PostgreSQL warns "canceling wait for synchronous replication" and reports
        # COMMIT as done, although the row may exist on this node only.
        for _ in range(100):
            cancelled = await admin.fetchval(
                "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity "
                "WHERE wait_event = 'SyncRep' AND application_name = 'dovecote'"
            )
            if cancelled:
                break
            await asyncio.sleep(0.01)
        assert cancelled == 1
        with pytest.raises(StoreError, match="not confirmed"):
            await pending
        # Committed locally: a success answer would have claimed a second copy.
        await configure(cluster, synchronous_standby_names="")
        assert len(await store.fetch(ALICE, 10)) == 1
        # The sender's retry is answered, and the message stays stored once.
        again = await store.enqueue(message(body=b"two"), **ROOMY)
        assert again.duplicate
        assert len(await store.fetch(ALICE, 10)) == 1
    finally:
        await admin.close()


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


async def test_hung_first_host_is_skipped_within_seconds(tmp_path: object, hung_port: int) -> None:
    pg = StoreFactory("postgres", tmp_path)  # type: ignore[arg-type]
    try:
        url = await pg.url()
        head, tail = url.split("@", 1)
        multi = f"{head}@127.0.0.1:{hung_port},{tail}"
        started = time.monotonic()
        # asyncpg's own timeout covers the whole host list: the hung host used all 5 s.
        store = await pg.open(multi, timeout=5.0)
        opened = time.monotonic() - started
        assert opened < 4.5, f"open took {opened:.1f}s"
        await mediate(store, ALICE, RECIPIENT)
        assert not (await store.enqueue(message(body=b"three"), **ROOMY)).duplicate
        await store.ping()
    finally:
        await pg.cleanup()
