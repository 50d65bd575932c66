"""One in-process Dovecote instance for the fast tier (see conftest.py)."""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette

from dovecote.ops.settings import Settings
from dovecote.server import Dovecote
from support.agent import ENCRYPTED, Agent
from support.rooms import ISSUER, Issuer

BASE_URL = "http://testserver"
ADMIN_TOKEN = "fast-tier-admin-token-0123456789abcdef"
TABLES = ("mediations", "recipients", "messages", "dedup", "outbox", "dead_letters")


@dataclass
class Fast:
    """One in-process instance: its settings, parts, ASGI app and an HTTP/WS client."""

    settings: Settings
    dovecote: Dovecote
    app: Starlette
    client: httpx.AsyncClient
    issuer: Issuer
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def did(self) -> str:
        return self.dovecote.identity.did

    @property
    def db_path(self) -> Path:
        return self.settings.data_dir / "dovecote.db"

    def agent(self, via_mediator: bool = True, **kwargs: Any) -> Agent:
        """A SICPA didcomm agent talking to this instance (through `client`)."""
        return Agent.create(BASE_URL, self.did, via_mediator=via_mediator, **kwargs)

    async def post(
        self,
        body: bytes | str,
        content_type: str = ENCRYPTED,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """POST `body` to / (the DIDComm front door)."""
        return await self.client.post(
            "/", content=body, headers={"content-type": content_type, **(headers or {})}
        )

    def snapshot(self) -> dict[str, int]:
        """Row counts of every state table, read from the SQLite file (read-only)."""
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        try:
            return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}
        finally:
            conn.close()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        try:
            return [tuple(row) for row in conn.execute(sql).fetchall()]
        finally:
            conn.close()

    async def client_from(self, address: str) -> httpx.AsyncClient:
        """Another HTTP client whose requests come from `address` (closed after the test)."""
        transport = httpx.ASGITransport(self.app, client=(address, 40000))
        client = httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=60)
        return await self._stack.enter_async_context(client)

    async def create_room(self, *members: str) -> str:
        """A room (made by an admin token) whose `members` are participants; its id."""
        admin = {"authorization": f"Bearer {self.issuer.token('root', roles=['admin'])}"}
        participants = [{"id": member, "role": "member"} for member in members]
        created = await self.client.post(
            "/v1/rooms", headers=admin, json={"name": "fast", "participants": participants}
        )
        assert created.status_code == 201, created.text
        return str(created.json()["id"])

    async def scrape(self) -> str:
        response = await self.client.get("/metrics")
        assert response.status_code == 200, response.text
        return response.text


def fast_settings(data_dir: Path, issuer: Issuer, **overrides: Any) -> Settings:
    """Settings of a test instance: data in `data_dir`, rooms tokens from `issuer`."""
    given: dict[str, Any] = {
        "data_dir": data_dir,
        "public_url": BASE_URL,
        "admin_token": ADMIN_TOKEN,
        "rooms_jwks_file": issuer.jwks_path,
        "rooms_jwt_issuer": ISSUER,
        **overrides,
    }
    return Settings(**given)
