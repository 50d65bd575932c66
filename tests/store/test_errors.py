"""Driver errors become Dovecote errors at the store boundary (each engine's mapping)."""

from __future__ import annotations

import errno
import sqlite3

import asyncpg
import pytest

from dovecote.errors import StorageFull, StoreError
from dovecote.store import postgres, sqlite


def test_postgres_disk_full_is_storage_full() -> None:
    full = postgres._translate(asyncpg.exceptions.DiskFullError("could not extend file"))
    assert isinstance(full, StorageFull)
    other = postgres._translate(asyncpg.exceptions.UniqueViolationError("duplicate key"))
    assert type(other) is StoreError
    assert type(postgres._translate(ConnectionRefusedError())) is StoreError
    assert type(postgres._translate(TimeoutError())) is StoreError


def test_sqlite_disk_full_is_storage_full() -> None:
    assert isinstance(
        sqlite._translate(sqlite3.OperationalError("database or disk is full")), StorageFull
    )
    assert isinstance(sqlite._translate(OSError(errno.ENOSPC, "No space left")), StorageFull)
    for exc in (
        sqlite3.InterfaceError("bad"),
        sqlite3.IntegrityError("dup"),
        PermissionError("read-only"),
    ):
        assert type(sqlite._translate(exc)) is StoreError
    # Ours pass through unchanged.
    mine = StoreError("x")
    assert sqlite._translate(mine) is mine


async def test_unwritable_sqlite_path_fails_with_store_error() -> None:
    store = sqlite.SQLiteStore("sqlite:////proc/dovecote-cannot-be-here/x.db")
    with pytest.raises(StoreError):
        await store.open()
    await store.close()
