"""Helpers for reliability tests: remote recipients, store probes, the DLQ command line."""

from __future__ import annotations

import asyncio
import inspect
import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from didcomm.message import Message
from didcomm.pack_encrypted import PackEncryptedConfig, pack_encrypted

from support.agent import BASIC, ENCRYPTED, Agent, manual_forward
from support.server import ROOT, ServerProcess

# Fast schedules so that minutes of production behaviour fit in seconds.
FAST_OUTBOUND = {
    "DOVECOTE_OUTBOUND_ALLOW_PRIVATE": "true",
    "DOVECOTE_RETRY_BASE": "0.05",
    "DOVECOTE_RETRY_CAP": "0.4",
    "DOVECOTE_BREAKER_THRESHOLD": "3",
    "DOVECOTE_BREAKER_RESET": "1",
    "DOVECOTE_OUTBOUND_TIMEOUT": "1",
    "DOVECOTE_OUTBOUND_CONNECT_TIMEOUT": "0.5",
}
ADMIN_TOKEN = "test-admin-token-0123456789abcdef0123"


async def remote_forward(
    server: ServerProcess, sender: Agent, recipient: Agent, content: str | None = None
) -> tuple[str, str]:
    """A forward for `server` whose next hop is `recipient` (not registered there).

    Returns (the envelope to POST, the id of the inner message the endpoint will get).
    """
    message_id = str(uuid.uuid4())
    message = Message(
        id=message_id,
        type=BASIC,
        body={"content": content or message_id},
        to=[recipient.did],
        frm=sender.did,
    )
    packed = await pack_encrypted(
        sender.resolvers,
        message,
        to=recipient.did,
        frm=sender.did,
        pack_config=PackEncryptedConfig(forward=False),
    )
    envelope = await manual_forward(
        sender.resolvers, json.loads(packed.packed_msg), recipient.did, f"{server.did}#key-2"
    )
    return envelope, message_id


async def post(client: httpx.AsyncClient, server: ServerProcess, packed: str) -> httpx.Response:
    return await client.post(
        server.base_url + "/", content=packed, headers={"content-type": ENCRYPTED}
    )


async def received_ids(recipient: Agent, bodies: list[bytes]) -> list[str]:
    """Inner message ids of what an endpoint received (decrypted as the recipient)."""
    return [(await recipient.unpack(body))["id"] for body in bodies]


def query(server: ServerProcess, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read the server's store directly: SQLite file (read-only) or PostgreSQL via psql."""
    url = server.env.get("DOVECOTE_STORE", "")
    if url.startswith("postgres"):
        for param in params:
            sql = sql.replace("?", "'" + str(param).replace("'", "''") + "'", 1)
        out = subprocess.run(
            ["psql", url, "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        return [
            tuple(int(v) if v.lstrip("-").isdigit() else v for v in line.split("|"))
            for line in out.splitlines()
        ]
    conn = sqlite3.connect(f"file:{server.data_dir / 'dovecote.db'}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def dlq_cli(server: ServerProcess, *args: str) -> str:
    """Run `dovecote dlq ...` against the server's data directory; its stdout."""
    store = server.env.get("DOVECOTE_STORE")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dovecote",
            "dlq",
            *args,
            "--data-dir",
            str(server.data_dir),
            *(["--store", store] if store else []),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def events(server: ServerProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in server.log_events() if e.get("event") == name]


async def wait_until(
    predicate: Callable[[], Awaitable[Any] | Any], within: float, interval: float = 0.05
) -> bool:
    deadline = time.monotonic() + within
    while True:
        outcome = predicate()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome or time.monotonic() > deadline:
            return bool(outcome)
        await asyncio.sleep(interval)
