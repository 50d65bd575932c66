"""The "naive mediator" stand-in peer: what a first DIDComm v2 mediator looks like.

POST / -> didcomm-messaging unpack (askar) -> take the forward's attachment -> INSERT into
SQLite (WAL, synchronous=FULL) with one COMMIT per message -> 202. No group commit, no
dedup, no mailbox limits, no metrics or logs: the least a durable mediator must do,
written the obvious way. Used as the comparison when no real peer can run (see
bench/peer/README.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.agents import _CRYPTO, _PACKAGING, _RESOLVER
from dovecote.didcomm import identity as identity_mod
from dovecote.didcomm.packing import IdentitySecrets

WORK = Path(os.environ.get("BENCH_WORKDIR", "/tmp"))
IDENTITY = Path(os.environ["BENCH_IDENTITY"])

_secrets = IdentitySecrets(
    identity_mod.load_or_create(IDENTITY, ["http://127.0.0.1:1", "ws://127.0.0.1:1/ws"])
)
_db = sqlite3.connect(WORK / "naive.db", check_same_thread=False, isolation_level=None)
_db.execute("PRAGMA journal_mode=WAL")
_db.execute("PRAGMA synchronous=FULL")
_db.execute(
    "CREATE TABLE IF NOT EXISTS messages (id TEXT PRIMARY KEY, recipient TEXT, "
    "body BLOB, received_at REAL)"
)
_lock = threading.Lock()


def _insert(recipient: str, body: bytes) -> None:
    with _lock:
        _db.execute("BEGIN")
        _db.execute(
            "INSERT INTO messages VALUES (?, ?, ?, julianday('now'))",
            (uuid.uuid4().hex, recipient, body),
        )
        _db.execute("COMMIT")


async def post(request: Request) -> Response:
    raw = await request.body()
    try:
        data, _meta = await _PACKAGING.unpack(_CRYPTO, _RESOLVER, _secrets, raw)
        message: dict[str, Any] = json.loads(data)
        attachment = message["attachments"][0]["data"]["json"]
        recipient = message["body"]["next"]
    except Exception as exc:  # any malformed forward: a 400, as the baseline answers  # noqa: BLE001
        return JSONResponse({"error": str(exc)[:200]}, status_code=400)
    body = json.dumps(attachment, separators=(",", ":")).encode()
    await asyncio.to_thread(_insert, recipient, body)
    return Response(status_code=202)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[Route("/", post, methods=["POST"]), Route("/health", health, methods=["GET"])]
)
