"""Shared helpers for the store tests: fresh databases per engine, sample records."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from dovecote.store import Store, open_store
from dovecote.store.base import NewMessage

POSTGRES_URL = (
    os.environ.get("DOVECOTE_TEST_POSTGRES") or "postgresql://postgres@127.0.0.1:5432/postgres"
)
ENGINES = ["sqlite", "postgres"]


class MailboxLimits(TypedDict):
    """`Store.enqueue`'s limit arguments, so `**ROOMY` type-checks."""

    max_messages: int
    max_bytes: int


# A mailbox limit no test reaches unless it means to.
ROOMY: MailboxLimits = {"max_messages": 10_000, "max_bytes": 100_000_000}


def database_url(url: str, database: str) -> str:
    """`url` with its database name replaced."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


async def admin_connect() -> Any:
    try:
        return await asyncpg.connect(POSTGRES_URL, timeout=5)
    except Exception as exc:  # any reason at all: these tests must fail, not skip  # noqa: BLE001
        pytest.fail(
            f"PostgreSQL at {POSTGRES_URL} is unreachable ({exc!r}); run "
            "`bash scripts/ensure-postgres.sh && . ./.test-env`",
            pytrace=False,
        )


_template: str | None = None


async def migrated_template() -> str:
    """A database with every migration applied, cloned for each test (migrating from
    scratch costs about a second per test; tests/store/test_migrations.py covers that)."""
    global _template
    if _template is None:
        name = f"dovecote_test_template_{uuid.uuid4().hex[:12]}"
        conn = await admin_connect()
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        store = open_store(database_url(POSTGRES_URL, name))
        await store.open()
        await store.close()
        _template = name
    return _template


async def drop_template() -> None:
    global _template
    if _template is not None:
        conn = await admin_connect()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{_template}" WITH (FORCE)')
        finally:
            await conn.close()
        _template = None


class StoreFactory:
    """Fresh databases and opened stores for one engine; `cleanup` removes them all."""

    def __init__(self, engine: str, tmp_path: Path) -> None:
        self.engine = engine
        self.tmp_path = tmp_path
        self.stores: list[Store] = []
        self.databases: list[str] = []

    async def url(self, migrated: bool = True) -> str:
        """A URL naming a database nobody else uses: empty, or (PostgreSQL, `migrated`)
        a copy of one with the current schema."""
        if self.engine == "sqlite":
            return f"sqlite:///{self.tmp_path / f'store-{uuid.uuid4().hex[:8]}.db'}"
        template = f' TEMPLATE "{await migrated_template()}"' if migrated else ""
        name = f"dovecote_test_{uuid.uuid4().hex[:16]}"
        conn = await admin_connect()
        try:
            await conn.execute(f'CREATE DATABASE "{name}"{template}')
        finally:
            await conn.close()
        self.databases.append(name)
        return database_url(POSTGRES_URL, name)

    async def open(self, url: str | None = None, **options: Any) -> Store:
        store = open_store(url or await self.url(), **{"timeout": 5.0, **options})
        await store.open()
        self.stores.append(store)
        return store

    async def cleanup(self) -> None:
        for store in reversed(self.stores):
            await store.close()
        self.stores.clear()
        if self.databases:
            conn = await admin_connect()
            try:
                for name in self.databases:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()
            self.databases.clear()


async def mediate(store: Store, mediatee: str, *recipients: str) -> None:
    """Grant mediation and register recipients."""
    await store.set_mediation(mediatee, "granted", "did:example:routing")
    if recipients:
        await store.update_recipients(mediatee, [(r, "add") for r in recipients])


def message(
    mediatee: str = "did:example:alice",
    recipient: str = "did:example:alice-r1",
    body: bytes = b"hello",
    ttl: float = 3600.0,
    expires_at: float | None = None,
) -> NewMessage:
    return NewMessage(
        mediatee=mediatee,
        recipient=recipient,
        body=body,
        digest=hashlib.sha256(body).hexdigest(),
        expires_at=expires_at if expires_at is not None else time.time() + ttl,
    )


def sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


async def raw_script(engine: str, url: str, sql: str) -> None:
    """Run SQL on a database behind the store's back (schema set-up for migration tests)."""
    if engine == "sqlite":
        import sqlite3

        conn = sqlite3.connect(sqlite_path(url))
        try:
            conn.executescript(sql)
        finally:
            conn.close()
        return
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def raw_value(engine: str, url: str, sql: str) -> Any:
    """First column of the first row of a query, read behind the store's back."""
    if engine == "sqlite":
        import sqlite3

        conn = sqlite3.connect(sqlite_path(url))
        try:
            row = conn.execute(sql).fetchone()
        finally:
            conn.close()
        return row[0] if row else None
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()
