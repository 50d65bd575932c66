"""Query plans of the per-message statements (each engine): none walks a whole table or a
whole mailbox, so accept, pickup and live pushes cost the same at 10k and 1M queued.

The statements are the ones the store really runs (recorded from its transactions during
a mailbox's life: enqueue, fetch, live ids and bodies, status, ack, expiry sweep), each
explained on the same database. Plans come from the planner without statistics (SQLite
has no sqlite_stat1 here, as on a fresh server; PostgreSQL with sequential scans off, so
that a tiny table does not hide a missing index): what they show is what a deep queue
would get before any ANALYZE.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from dovecote.store import Store, postgres
from dovecote.store import sqlite as sqlite_engine
from dovecote.store.dialect import POSTGRES, SQLITE, Row
from dovecote.store.engine import message_id

from .helpers import ROOMY, StoreFactory, mediate, message, sqlite_path

ALICE = "did:example:alice"
BOB = "did:example:bob"
R1, R2 = "did:example:alice-r1", "did:example:alice-r2"

# Tables that grow with traffic or users: a statement run per message must reach their
# rows through an index condition.
GROWING = {"messages", "dedup", "mailboxes", "recipients", "outbox_keys", "dead_letters"}

Statement = tuple[str, tuple[Any, ...]]


def _record(monkeypatch: pytest.MonkeyPatch, engine: str) -> list[Statement]:
    """Every statement the store's transactions run from now on, as the engine gets it."""
    seen: list[Statement] = []
    cls: Any
    if engine == "sqlite":
        cls = sqlite_engine._SQLiteTx

        def one(sql: str, args: tuple[Any, ...]) -> Statement:
            return SQLITE.render(sql), sqlite_engine._params(args)

        def many(sql: str, types: tuple[str, ...], rows: list[Row]) -> Statement:
            rendered = SQLITE.render(SQLITE.rows(sql, types, len(rows)))
            return rendered, tuple(v for row in rows for v in row)
    else:
        cls = postgres._PostgresTx

        def one(sql: str, args: tuple[Any, ...]) -> Statement:
            return sql, args

        def many(sql: str, types: tuple[str, ...], rows: list[Row]) -> Statement:
            columns = tuple(list(column) for column in zip(*rows, strict=True))
            return POSTGRES.rows(sql, types, len(rows)), columns

    def single(original: Any) -> Any:
        async def recorded(self: Any, sql: str, *args: Any) -> Any:
            seen.append(one(sql, args))
            return await original(self, sql, *args)

        return recorded

    for name in ("fetch", "fetchrow", "fetchval", "execute"):
        if name in vars(cls):  # an inherited one calls one of the others
            monkeypatch.setattr(cls, name, single(vars(cls)[name]))

    async def executemany(self: Any, sql: str, args: Any, _orig: Any = cls.executemany) -> Any:
        if args:
            seen.append(one(sql, tuple(args[0])))
        return await _orig(self, sql, args)

    async def rows(self: Any, sql: str, types: Any, data: Any, _orig: Any = cls.rows) -> Any:
        if data:
            seen.append(many(sql, tuple(types), list(data)))
        return await _orig(self, sql, types, data)

    monkeypatch.setattr(cls, "executemany", executemany)
    monkeypatch.setattr(cls, "rows", rows)
    return seen


async def _mailbox_life(store: Store) -> None:
    """What a mailbox goes through: enqueues (grouped, one duplicate), pickup, live-mode
    ids and bodies, status, acknowledgement, and the expiry sweep."""
    await mediate(store, ALICE, R1, R2)
    await mediate(store, BOB, "did:example:bob-r1")
    bodies = [f"message {i}".encode() for i in range(6)]
    results = await asyncio.gather(
        *(
            store.enqueue(message(recipient=(R1, R2)[i % 2], body=body), **ROOMY)
            for i, body in enumerate(bodies)
        ),
        store.enqueue(message(body=bodies[0]), **ROOMY),
        store.enqueue(message(BOB, "did:example:bob-r1", b"to bob"), **ROOMY),
    )
    ids = [r.id for r in results[:6]]
    assert results[6].duplicate
    await store.fetch(ALICE, 10)
    await store.fetch(ALICE, 10, after_seq=1)
    await store.fetch(ALICE, 10, recipient=R1)
    refs = await store.queued(ALICE, 10)
    assert len(await store.fetch_ids(ALICE, [r.id for r in refs[:3]])) == 3
    await store.last_seq(ALICE)
    await store.status(ALICE)
    assert len(await store.ack(ALICE, ids[:2])) == 2
    await store.expire(time.time() + 7200, time.time() - 1)


def _sqlite_plan(url: str, sql: str, args: tuple[Any, ...]) -> list[str]:
    conn = sqlite3.connect(sqlite_path(url))
    try:
        return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args)]
    finally:
        conn.close()


def _pg_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _pg_nodes(child)


async def _pg_plan(conn: Any, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    explained = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)
    return list(_pg_nodes(json.loads(explained)[0]["Plan"]))


def _sqlite_walks(plan: list[str]) -> list[str]:
    """Plan lines that visit every row (or index entry) of a growing table."""
    return [line for line in plan if (m := re.match(r"SCAN (\w+)", line)) and m[1] in GROWING]


def _pg_walks(nodes: list[dict[str, Any]]) -> list[str]:
    walks = []
    for node in nodes:
        if node.get("Relation Name") not in GROWING:
            continue
        kind = node["Node Type"]
        if kind == "Seq Scan" or (
            kind in ("Index Scan", "Index Only Scan") and "Index Cond" not in node
        ):
            walks.append(f"{kind} on {node['Relation Name']}")
    return walks


def _by_id(sql: str) -> bool:
    """A statement that names messages by id (ack, live bodies)."""
    return bool(re.search(r"FROM messages WHERE .*\bid (= ANY|IN)\b", sql))


async def test_per_message_statements_use_an_index(
    store_factory: StoreFactory, engine_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = await store_factory.url()
    store = await store_factory.open(url)
    seen = _record(monkeypatch, engine_name)
    await _mailbox_life(store)
    firsts: dict[str, tuple[Any, ...]] = {}
    for sql, args in seen:
        firsts.setdefault(sql, args)  # each statement once, with its first arguments
    statements = list(firsts.items())
    # The recording saw the statements this test is about.
    assert sum(_by_id(sql) for sql, _ in statements) >= 2, statements
    assert any(sql.startswith("INSERT INTO messages") for sql, _ in statements)

    walks: dict[str, list[str]] = {}
    id_index_missed: list[str] = []
    if engine_name == "sqlite":
        for sql, args in statements:
            plan = _sqlite_plan(url, sql, args)
            if found := _sqlite_walks(plan):
                walks[sql] = found
            # The mailbox index would also "search", but through every message of the
            # mailbox: a million rows read for an ack of 100 at 1M queued.
            if _by_id(sql) and not any("sqlite_autoindex_messages_1 (id=?)" in p for p in plan):
                id_index_missed.append(f"{sql} -> {plan}")
    else:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute("SET enable_seqscan = off")
            for sql, args in statements:
                nodes = await _pg_plan(conn, sql, args)
                if found := _pg_walks(nodes):
                    walks[sql] = found
                if _by_id(sql) and not any(n.get("Index Name") == "messages_id_key" for n in nodes):
                    id_index_missed.append(f"{sql} -> {[n['Node Type'] for n in nodes]}")
        finally:
            await conn.close()
    assert walks == {}
    assert id_index_missed == []


def test_message_ids_grow_with_time() -> None:
    earlier, later = message_id(1_700_000_000.000), message_id(1_700_000_000.001)
    assert earlier < later
    assert len(earlier) == 32 and int(earlier, 16) > 0
    assert message_id(1_700_000_000.0) != message_id(1_700_000_000.0)


async def test_stored_ids_follow_the_queue_order(engine: Store) -> None:
    """Each insert into the id index goes to its right-hand end (see message_id)."""
    await mediate(engine, ALICE, R1)
    for i in range(5):
        await engine.enqueue(message(body=f"in order {i}".encode()), **ROOMY)
        await asyncio.sleep(0.002)  # the next millisecond: ids order by time, not within one
    ids = [m.id for m in await engine.fetch(ALICE, 10)]
    assert len(ids) == 5 and ids == sorted(ids)


def _sqlite_steps(url: str, sql: str, args: tuple[Any, ...]) -> int:
    """SQLite virtual-machine steps one run of a read takes (grows with the rows visited)."""
    conn = sqlite3.connect(sqlite_path(url))
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    try:
        conn.set_progress_handler(count, 1)
        conn.execute(sql, args).fetchall()
    finally:
        conn.close()
    return steps


async def test_queue_sampler_does_not_read_the_queue(
    store_factory: StoreFactory, engine_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """queue_stats runs every 5 s on every instance: its cost must not grow with the
    messages queued. On SQLite by the steps each read takes with 10 and with 2,010
    queued (its plan of MIN over a column without an index says "SEARCH messages" and
    reads them all); on PostgreSQL by the plan."""
    url = await store_factory.url()
    store = await store_factory.open(url)
    await mediate(store, ALICE, R1)
    for i in range(10):
        await store.enqueue(message(body=f"early {i}".encode()), **ROOMY)
    seen = _record(monkeypatch, engine_name)
    stats = await store.queue_stats()
    assert stats.queued == 10 and stats.oldest_received_at is not None
    statements = list(dict.fromkeys((sql, args) for sql, args in seen if "messages" in sql))
    assert statements, seen
    if engine_name == "sqlite":
        before = [_sqlite_steps(url, sql, args) for sql, args in statements]
        await asyncio.gather(
            *(store.enqueue(message(body=f"more {i}".encode()), **ROOMY) for i in range(2000))
        )
        after = [_sqlite_steps(url, sql, args) for sql, args in statements]
        assert all(a < 2 * b for a, b in zip(after, before, strict=True)), (before, after)
    else:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute("SET enable_seqscan = off")
            for sql, args in statements:
                walks = [w for w in _pg_walks(await _pg_plan(conn, sql, args)) if "messages" in w]
                assert walks == [], sql
        finally:
            await conn.close()
    assert (await store.queue_stats()).oldest_received_at == stats.oldest_received_at
