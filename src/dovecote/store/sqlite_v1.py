"""DIDComm v1 connections on the SQLite engine (a mixin for SQLiteStore)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from dovecote.store.base import NewOutboxItem, RelayQuota
from dovecote.store.v1_base import V1Connection, V1Store

T = TypeVar("T")
Conn = sqlite3.Connection

_COLUMNS = (
    "their_verkey, connection_id, their_did, protocol, state, endpoint, routing_keys, "
    "device, created_at"
)


def _row(row: Sequence[Any] | None) -> V1Connection | None:
    if row is None:
        return None
    return V1Connection(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        json.loads(row[6]),
        json.loads(row[7]),
        row[8],
    )


class SQLiteV1Mixin(V1Store):
    """V1Store for SQLiteStore."""

    if TYPE_CHECKING:

        async def _read(self, fn: Callable[[Conn], T]) -> T: ...

        async def _write(self, fn: Callable[[Conn], Any], notify: Sequence[str] = ()) -> Any: ...

    async def v1_connection_save(self, conn: V1Connection) -> V1Connection:
        now = time.time()

        def fn(c: Conn) -> V1Connection | None:
            c.execute(
                "INSERT INTO v1_connections (their_verkey, connection_id, their_did, protocol, "
                "state, endpoint, routing_keys, device, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, '{}', ?, ?) ON CONFLICT (their_verkey) DO UPDATE "
                "SET their_did = excluded.their_did, protocol = excluded.protocol, "
                "state = excluded.state, endpoint = excluded.endpoint, "
                "routing_keys = excluded.routing_keys, updated_at = excluded.updated_at",
                (
                    conn.their_verkey,
                    conn.connection_id,
                    conn.their_did,
                    conn.protocol,
                    conn.state,
                    conn.endpoint,
                    json.dumps(conn.routing_keys),
                    now,
                    now,
                ),
            )
            return _row(
                c.execute(
                    f"SELECT {_COLUMNS} FROM v1_connections WHERE their_verkey = ?",
                    (conn.their_verkey,),
                ).fetchone()
            )

        saved = await self._write(fn)
        assert isinstance(saved, V1Connection)
        return saved

    async def v1_connection_get(self, their_verkey: str) -> V1Connection | None:
        return await self._read(
            lambda c: _row(
                c.execute(
                    f"SELECT {_COLUMNS} FROM v1_connections WHERE their_verkey = ?", (their_verkey,)
                ).fetchone()
            )
        )

    async def v1_set_device(self, their_verkey: str, device: dict[str, Any]) -> bool:
        def fn(c: Conn) -> bool:
            cursor = c.execute(
                "UPDATE v1_connections SET device = ?, updated_at = ? WHERE their_verkey = ?",
                (json.dumps(device), time.time(), their_verkey),
            )
            return cursor.rowcount > 0

        return bool(await self._write(fn))

    async def v1_relay_once(
        self, recipient: str, digest: str, item: NewOutboxItem, quota: RelayQuota | None = None
    ) -> bool:
        from dovecote.store.sqlite import _insert_outbox, check_relay_quota

        now = time.time()

        def fn(c: Conn) -> bool:
            row = c.execute(
                "INSERT INTO dedup (recipient, digest, message_id, created_at) "
                "VALUES (?, ?, 'outbox', ?) ON CONFLICT DO NOTHING RETURNING 1",
                (recipient, digest, now),
            ).fetchone()
            if row is None:
                return False
            if quota is not None:
                check_relay_quota(c, quota, [item])
            _insert_outbox(c, [item], now)
            return True

        return bool(await self._write(fn))
