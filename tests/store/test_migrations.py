"""Schema migrations: idempotent re-runs, concurrent starts, old databases (each engine)."""

from __future__ import annotations

import asyncio
import time

from dovecote.store import migrations

from .helpers import ROOMY, StoreFactory, message, raw_script, raw_value

ALICE = "did:example:alice"


def engine_folder(engine: str) -> str:
    return "sqlite" if engine == "sqlite" else "postgres"


def latest(engine: str) -> int:
    return max(v for v, _, _ in migrations.load(engine_folder(engine)))


async def test_fresh_database_gets_every_migration_once(store_factory: StoreFactory) -> None:
    url = await store_factory.url(migrated=False)
    store = await store_factory.open(url)
    known = [v for v, _, _ in migrations.load(engine_folder(store_factory.engine))]
    assert await store.schema_version() == max(known)
    await store.set_mediation(ALICE, "granted", "did:example:routing")
    await store.close()

    # Opening again applies nothing and keeps the data.
    again = await store_factory.open(url)
    assert await again.schema_version() == max(known)
    assert await again.get_mediation(ALICE) == "granted"
    rows = await raw_value(store_factory.engine, url, "SELECT COUNT(*) FROM schema_migrations")
    assert rows == len(known)


async def test_instances_starting_together_migrate_once(store_factory: StoreFactory) -> None:
    url = await store_factory.url(migrated=False)
    stores = await asyncio.gather(*[store_factory.open(url) for _ in range(4)])
    known = [v for v, _, _ in migrations.load(engine_folder(store_factory.engine))]
    assert {await s.schema_version() for s in stores} == {max(known)}
    rows = await raw_value(store_factory.engine, url, "SELECT COUNT(*) FROM schema_migrations")
    assert rows == len(known)
    # Every one of them works on the same data.
    await stores[0].set_mediation(ALICE, "granted", "did:example:routing")
    assert [await s.get_mediation(ALICE) for s in stores] == ["granted"] * 4


async def test_database_at_version_one_opens_and_keeps_its_data(
    store_factory: StoreFactory,
) -> None:
    engine = store_factory.engine
    url = await store_factory.url(migrated=False)
    version, name, sql = migrations.load(engine_folder(engine))[0]
    assert version == 1
    real = "REAL" if engine == "sqlite" else "DOUBLE PRECISION"
    blob = "X'6f6c64'" if engine == "sqlite" else "'\\x6f6c64'::bytea"
    now = time.time()
    # What a version-1 Dovecote left behind: its schema, its bookkeeping, its data.
    await raw_script(
        engine,
        url,
        f"""
        {sql}
        ;
        CREATE TABLE schema_migrations
            (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at {real} NOT NULL);
        INSERT INTO schema_migrations VALUES (1, '{name}', {now});
        INSERT INTO mediations VALUES ('{ALICE}', 'granted', 'did:example:routing', {now}, {now});
        INSERT INTO recipients VALUES ('did:example:alice-r1', '{ALICE}', {now});
        INSERT INTO messages (id, mediatee, recipient, body, size, received_at, expires_at)
            VALUES ('m-old', '{ALICE}', 'did:example:alice-r1', {blob}, 3, {now},
                    {now + 3600});
        INSERT INTO mailboxes VALUES ('{ALICE}', 1, 3);
        INSERT INTO dedup VALUES ('did:example:alice-r1', 'digest-old', 'm-old', {now});
    """,
    )

    store = await store_factory.open(url)
    assert await store.schema_version() == latest(engine)
    assert await store.find_mediatee("did:example:alice-r1") == ALICE
    (old,) = await store.fetch(ALICE, 10)
    assert (old.id, old.body) == ("m-old", b"old")
    new = await store.enqueue(message(body=b"new"), max_messages=2, max_bytes=100)
    assert not new.duplicate
    # The totals carried over count against the limit.
    assert (await store.queue_stats()).queued == 2
    assert await store.ack(ALICE, ["m-old"]) != []
    assert (await store.status(ALICE)).message_count == 1
    assert (await store.enqueue(message(body=b"new"), **ROOMY)).duplicate


async def test_identity_migration_keeps_first_owner_and_reports_the_rest(
    store_factory: StoreFactory,
) -> None:
    """A version-3 database where X registered R#key-2 after Y registered R (and the
    reverse for S): after migration each DID has one owner, the first, and the other
    registrations are reported with the messages their mediatee still holds."""
    engine = store_factory.engine
    url = await store_factory.url(migrated=False)
    applied = [m for m in migrations.load(engine_folder(engine)) if m[0] <= 3]
    real = "REAL" if engine == "sqlite" else "DOUBLE PRECISION"
    blob = "X'6f6c64'" if engine == "sqlite" else "'\\x6f6c64'::bytea"
    x, y = "did:example:x", "did:example:y"
    r, s = "did:peer:2.Ez6LSr", "did:peer:2.Ez6LSs"
    rows = [
        (r, y, 100.0),
        (r + "#key-2", x, 200.0),
        (r + "#key-1", y, 300.0),
        (s + "#key-2", y, 100.0),
        (s, x, 150.0),
        ("did:example:alone#k", x, 50.0),
    ]
    await raw_script(
        engine,
        url,
        "\n".join(sql + "\n;" for _, _, sql in applied)
        + f"""
        CREATE TABLE schema_migrations
            (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at {real} NOT NULL);
        {
            " ".join(
                f"INSERT INTO schema_migrations VALUES ({v}, '{n}', 1.0);" for v, n, _ in applied
            )
        }
        INSERT INTO mediations VALUES ('{x}', 'granted', 'did:example:routing', 1, 1);
        INSERT INTO mediations VALUES ('{y}', 'granted', 'did:example:routing', 1, 1);
        {" ".join(f"INSERT INTO recipients VALUES ('{d}', '{m}', {t});" for d, m, t in rows)}
        INSERT INTO messages (id, mediatee, recipient, body, size, received_at, expires_at)
            VALUES ('captured', '{x}', '{r}#key-2', {blob}, 3, 1, 9999999999);
    """,
    )

    store = await store_factory.open(url)
    assert await store.schema_version() == latest(engine)
    for form in ("", "#key-1", "#key-2"):
        assert await store.find_mediatee(r + form) == y
        assert await store.find_mediatee(s + form) == y
    assert await store.find_mediatee("did:example:alone") == x
    assert await store.list_recipients(y, 0, 10) == (sorted([r, s]), 2)
    assert await store.list_recipients(x, 0, 10) == (["did:example:alone"], 1)
    conflicts = await store.recipient_conflicts()
    assert sorted((c.recipient, c.base, c.mediatee, c.owner, c.queued) for c in conflicts) == [
        (r + "#key-2", r, x, y, 1),
        (s, s, x, y, 0),
    ]
    assert all(c.found_at > 1000 for c in conflicts)
    # Nothing was lost: the captured message is still where it was, for the operator.
    assert [m.id for m in await store.fetch(x, 10)] == ["captured"]
