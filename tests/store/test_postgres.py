"""PostgreSQL only: wake-ups across instances, the LISTEN connection's recovery, and
behaviour when the database goes away (a TCP proxy in between plays the network)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from dovecote.errors import MailboxFull, StoreError
from dovecote.store import Store, postgres

from .helpers import ROOMY, StoreFactory, admin_connect, mediate, message

ALICE = "did:example:alice"


@pytest.fixture
async def pg(tmp_path: Path) -> AsyncIterator[StoreFactory]:
    factory = StoreFactory("postgres", tmp_path)
    try:
        yield factory
    finally:
        await factory.cleanup()


async def wait_for(condition: object, seconds: float) -> float:
    """Poll `condition()` until true; return how long it took, fail after `seconds`."""
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - started > seconds:
            pytest.fail(f"condition not met within {seconds} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def terminate(application_name: str, database: str) -> int:
    conn = await admin_connect()
    try:
        return len(
            await conn.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND application_name = $2",
                database,
                application_name,
            )
        )
    finally:
        await conn.close()


def database_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


class Proxy:
    """TCP proxy to PostgreSQL that can refuse connections or silently drop traffic."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.parts = parts
        self.mode = "forward"
        self.port = 0
        self.server: asyncio.Server | None = None
        self.sockets: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        netloc = f"{self.parts.username}@127.0.0.1:{self.port}"
        return urlunsplit(self.parts._replace(netloc=netloc))

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        """The database host is down: connections refused, open ones reset."""
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        self.cut()

    def cut(self) -> None:
        for writer in list(self.sockets):
            writer.transport.abort()
        self.sockets.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sockets.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.sockets.add(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer),
            self._pipe(up_reader, writer),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            w.transport.abort()
            self.sockets.discard(w)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            if self.mode == "blackhole":
                continue  # the network silently eats everything
            dst.write(data)
            await dst.drain()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        self.cut()


@pytest.fixture
async def proxied(pg: StoreFactory) -> AsyncIterator[Proxy]:
    proxy = Proxy(await pg.url())
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def test_enqueue_on_one_instance_wakes_listener_on_another(pg: StoreFactory) -> None:
    url = await pg.url()
    first, second = await pg.open(url), await pg.open(url)
    await mediate(first, ALICE, "did:example:alice-r1")
    on_first: list[str] = []
    on_second: list[str] = []
    first.add_listener(on_first.append)
    second.add_listener(on_second.append)

    await first.enqueue(message(), **ROOMY)
    took = await wait_for(lambda: on_second == [ALICE], 2.0)
    assert on_first == [ALICE]  # once: directly after COMMIT, not again via NOTIFY
    # The woken instance can read what woke it.
    assert len(await second.fetch(ALICE, 10)) == 1
    assert took < 2.0


async def test_listener_reconnects_and_wakes_everyone(pg: StoreFactory) -> None:
    url = await pg.url()
    sender, receiver = await pg.open(url), await pg.open(url)
    seen: list[str] = []
    receiver.add_listener(seen.append)

    assert await terminate(postgres.LISTENER_NAME, database_of(url)) == 2
    # Whatever was sent while it was gone is unknown: everyone is told to look again.
    await wait_for(lambda: postgres.WAKE_ALL in seen, 5.0)
    await mediate(sender, ALICE, "did:example:alice-r1")
    await sender.enqueue(message(), **ROOMY)
    await wait_for(lambda: ALICE in seen, 2.0)


async def test_lost_pool_connections_are_replaced_without_errors(pg: StoreFactory) -> None:
    url = await pg.url()
    store = await pg.open(url, pool_size=3)
    await mediate(store, ALICE, "did:example:alice-r1")
    await asyncio.gather(*[store.status(ALICE) for _ in range(6)])  # fill the pool
    assert await terminate(postgres.APPLICATION_NAME, database_of(url)) >= 1
    # Reads and writes that never reached COMMIT are retried on a fresh connection.
    results = await asyncio.gather(
        *[store.enqueue(message(body=f"m{i}".encode()), **ROOMY) for i in range(6)],
        *[store.fetch(ALICE, 10) for _ in range(3)],
    )
    assert len(results) == 9
    assert (await store.status(ALICE)).message_count == 6


async def test_ping_fails_fast_and_recovers_when_database_is_refused(
    pg: StoreFactory, proxied: Proxy
) -> None:
    store = await pg.open(proxied.url, timeout=5.0)
    await store.ping()
    await proxied.refuse()
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(StoreError) as caught:
            await store.ping()
        assert time.monotonic() - started < 2.5
        assert not isinstance(caught.value, asyncpg.PostgresError)
    with pytest.raises(StoreError) as caught:
        await store.enqueue(message(), **ROOMY)
    assert caught.value.__cause__ is not None  # translated with `raise ... from`
    await proxied.start()  # same port again
    await store.ping()
    await store.set_mediation(ALICE, "granted", "did:example:routing")


async def test_ping_and_calls_are_bounded_when_network_drops_silently(
    pg: StoreFactory, proxied: Proxy
) -> None:
    store = await pg.open(proxied.url, timeout=1.0)
    await store.set_mediation(ALICE, "granted", "did:example:routing")
    proxied.mode = "blackhole"
    started = time.monotonic()
    with pytest.raises(StoreError):
        await store.ping()
    assert time.monotonic() - started < 2.5
    started = time.monotonic()
    with pytest.raises(StoreError):
        await store.get_mediation(ALICE)
    assert time.monotonic() - started < 2.0  # the store's 1 s timeout, plus slack
    proxied.mode = "forward"
    proxied.cut()  # the stuck connections die; the pool opens new ones
    assert await store.get_mediation(ALICE) == "granted"


async def test_silently_dead_listener_is_noticed_and_replaced(
    pg: StoreFactory, proxied: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "LISTENER_CHECK_SECONDS", 0.3)
    monkeypatch.setattr(postgres, "PING_TIMEOUT", 0.5)
    receiver = await pg.open(proxied.url)
    seen: list[str] = []
    receiver.add_listener(seen.append)
    proxied.mode = "blackhole"
    await asyncio.sleep(1.0)  # the probe times out; reconnects fail while blackholed
    proxied.mode = "forward"
    proxied.cut()
    await wait_for(lambda: postgres.WAKE_ALL in seen, 10.0)


async def test_open_errors_are_store_errors(pg: StoreFactory, proxied: Proxy) -> None:
    missing = urlunsplit(urlsplit(proxied.url)._replace(path="/dovecote_no_such_db"))
    with pytest.raises(StoreError) as caught:
        await pg.open(missing)
    assert isinstance(caught.value.__cause__, asyncpg.PostgresError)
    await proxied.refuse()
    started = time.monotonic()
    with pytest.raises(StoreError):
        await pg.open(proxied.url)
    assert time.monotonic() - started < 6.0


async def test_calls_on_a_closed_store_raise_store_error(pg: StoreFactory) -> None:
    store = await pg.open()
    await store.close()
    with pytest.raises(StoreError):
        await store.ping()
    with pytest.raises(StoreError):
        await store.status(ALICE)
    await store.close()  # twice is fine


async def test_concurrent_enqueues_across_instances_dedup_and_limit(pg: StoreFactory) -> None:
    url = await pg.url()
    stores: list[Store] = [await pg.open(url) for _ in range(3)]
    await mediate(stores[0], ALICE, "did:example:alice-r1")
    same = await asyncio.gather(
        *[s.enqueue(message(body=b"same"), **ROOMY) for s in stores for _ in range(4)]
    )
    assert len({r.id for r in same}) == 1 and sum(not r.duplicate for r in same) == 1
    outcomes = await asyncio.gather(
        *[
            s.enqueue(message(body=f"{i}-{j}".encode()), max_messages=10, max_bytes=10_000)
            for i, s in enumerate(stores)
            for j in range(8)
        ],
        return_exceptions=True,
    )
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 9
    assert all(isinstance(o, MailboxFull) for o in outcomes if isinstance(o, BaseException))
    assert (await stores[1].status(ALICE)).message_count == 10


async def test_mediatee_too_long_for_notify_wakes_everyone(pg: StoreFactory) -> None:
    url = await pg.url()
    first, second = await pg.open(url), await pg.open(url)
    giant = "did:example:" + "x" * 9000
    await mediate(first, giant, "did:example:giant-r1")
    seen_first: list[str] = []
    seen_second: list[str] = []
    first.add_listener(seen_first.append)
    second.add_listener(seen_second.append)
    await first.enqueue(message(giant, "did:example:giant-r1"), **ROOMY)
    assert seen_first == [giant]
    await wait_for(lambda: seen_second == [postgres.WAKE_ALL], 2.0)


async def test_kept_mediatee_answers_follow_registrations_on_other_instances(
    pg: StoreFactory,
) -> None:
    url = await pg.url()
    first, second = await pg.open(url), await pg.open(url)
    bob = "did:example:bob"
    await mediate(first, ALICE, "did:example:shared")
    await mediate(first, bob)
    # Both instances now keep their answers, a registered and an unknown one.
    for store in (first, second):
        assert await store.find_mediatee("did:example:shared") == ALICE
        assert await store.find_mediatee("did:example:shared#key-1") == ALICE
        assert await store.find_mediatee("did:example:nobody") is None

    # Changed on the first instance: the first knows at once, the second by NOTIFY.
    await first.update_recipients(ALICE, [("did:example:shared", "remove")])
    assert await first.find_mediatee("did:example:shared") is None
    await wait_for_answer(second, "did:example:shared", None)
    await second.update_recipients(bob, [("did:example:shared", "add")])
    assert await second.find_mediatee("did:example:shared") == bob
    await wait_for_answer(first, "did:example:shared", bob)
    await first.update_recipients(ALICE, [("did:example:nobody", "add")])
    await wait_for_answer(second, "did:example:nobody", ALICE)


async def test_kept_mediatee_answers_are_dropped_while_not_listening(pg: StoreFactory) -> None:
    url = await pg.url()
    store = await pg.open(url)
    await mediate(store, ALICE, "did:example:alice-r1")
    assert await store.find_mediatee("did:example:alice-r1") == ALICE
    # A change this instance cannot hear of (written behind its back, no NOTIFY) ...
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DELETE FROM recipients WHERE recipient = 'did:example:alice-r1'")
    finally:
        await conn.close()
    # ... is found as soon as its LISTEN connection went away: nothing kept is trusted then.
    assert await terminate(postgres.LISTENER_NAME, database_of(url)) == 1
    await wait_for_answer(store, "did:example:alice-r1", None)


async def wait_for_answer(store: Store, recipient: str, mediatee: str | None) -> None:
    for _ in range(100):
        if await store.find_mediatee(recipient) == mediatee:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"{recipient} still not owned by {mediatee} after 2 s")
