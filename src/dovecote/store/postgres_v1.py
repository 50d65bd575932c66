"""DIDComm v1 connections on the PostgreSQL engine (a mixin for PostgresStore)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from dovecote.store.base import NewOutboxItem, RelayQuota
from dovecote.store.v1_base import V1Connection, V1Store

T = TypeVar("T")
Conn = Any  # asyncpg.Connection (asyncpg ships no type information)

_COLUMNS = (
    "their_verkey, connection_id, their_did, protocol, state, endpoint, routing_keys, "
    "device, created_at"
)


def _row(row: Any) -> V1Connection | None:
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


class PostgresV1Mixin(V1Store):
    """V1Store for PostgresStore."""

    if TYPE_CHECKING:

        async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T: ...

        async def _write(self, fn: Callable[[Conn], Awaitable[T]]) -> T: ...

    async def v1_connection_save(self, conn: V1Connection) -> V1Connection:
        now = time.time()

        async def fn(c: Conn) -> V1Connection | None:
            row = await c.fetchrow(
                "INSERT INTO v1_connections (their_verkey, connection_id, their_did, protocol, "
                "state, endpoint, routing_keys, device, created_at, updated_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, '{}', $8, $8) ON CONFLICT (their_verkey) "
                "DO UPDATE SET their_did = excluded.their_did, protocol = excluded.protocol, "
                "state = excluded.state, endpoint = excluded.endpoint, "
                "routing_keys = excluded.routing_keys, updated_at = excluded.updated_at "
                f"RETURNING {_COLUMNS}",
                conn.their_verkey,
                conn.connection_id,
                conn.their_did,
                conn.protocol,
                conn.state,
                conn.endpoint,
                json.dumps(conn.routing_keys),
                now,
            )
            return _row(row)

        saved = await self._write(fn)
        assert isinstance(saved, V1Connection)
        return saved

    async def v1_connection_get(self, their_verkey: str) -> V1Connection | None:
        async def fn(c: Conn) -> V1Connection | None:
            return _row(
                await c.fetchrow(
                    f"SELECT {_COLUMNS} FROM v1_connections WHERE their_verkey = $1", their_verkey
                )
            )

        return await self._read(fn)

    async def v1_set_device(self, their_verkey: str, device: dict[str, Any]) -> bool:
        async def fn(c: Conn) -> bool:
            status = await c.execute(
                "UPDATE v1_connections SET device = $1, updated_at = $2 WHERE their_verkey = $3",
                json.dumps(device),
                time.time(),
                their_verkey,
            )
            return bool(status.endswith(" 1"))

        return await self._write(fn)

    async def v1_relay_once(
        self, recipient: str, digest: str, item: NewOutboxItem, quota: RelayQuota | None = None
    ) -> bool:
        from dovecote.store.postgres import _insert_outbox, check_relay_quota

        now = time.time()

        async def fn(c: Conn) -> bool:
            inserted = await c.fetchval(
                "INSERT INTO dedup (recipient, digest, message_id, created_at) "
                "VALUES ($1, $2, 'outbox', $3) ON CONFLICT DO NOTHING RETURNING 1",
                recipient,
                digest,
                now,
            )
            if inserted is None:
                # A write, so that the duplicate's success answer also waits for the
                # synchronous standby (store/pg_ha.py), like Store.enqueue's duplicates.
                await c.execute(
                    "UPDATE dedup SET message_id = message_id WHERE recipient = $1 AND digest = $2",
                    recipient,
                    digest,
                )
                return False
            if quota is not None:
                await check_relay_quota(c, quota, [item])
            await _insert_outbox(c, [item], now)
            return True

        return await self._write(fn)
