"""Rooms test helpers: an issuer with Ed25519 and P-256 keys in a JWKS file, token minting,
and a small synchronous client for the rooms API."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, OKPKey

ISSUER = "https://issuer.test"
ALGORITHMS = ["EdDSA", "ES256"]


@dataclass
class Issuer:
    """Signs room tokens; its public keys live in `jwks_path` (rewritten on rotation)."""

    jwks_path: Path
    iss: str = ISSUER
    keys: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.add_key("ed", OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"}))
        self.add_key("es", ECKey.generate_key("P-256", parameters={"kid": "es-1"}))

    def add_key(self, name: str, key: Any) -> None:
        self.keys[name] = key
        self.publish()

    def publish(self, names: list[str] | None = None) -> None:
        chosen = [self.keys[n] for n in (names or list(self.keys))]
        public = KeySet(chosen).as_dict(private=False)
        tmp = self.jwks_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(public))
        tmp.replace(self.jwks_path)

    def token(
        self,
        sub: str,
        rooms: list[str] | str = "*",
        roles: list[str] | None = None,
        *,
        key: str = "ed",
        ttl: float = 600,
        iss: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        now = int(time.time())
        signing = self.keys[key]
        alg = "EdDSA" if signing.key_type == "OKP" else "ES256"
        claims = {
            "sub": sub,
            "iss": iss or self.iss,
            "iat": now,
            "exp": int(now + ttl),
            "rooms": rooms,
            "roles": roles or [],
            **(extra or {}),
        }
        return jwt.encode({"alg": alg, "kid": signing.kid}, claims, signing, algorithms=ALGORITHMS)

    def headers(self, sub: str, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(sub, **kwargs)}"}


@dataclass
class RoomsClient:
    """A synchronous helper around the rooms API for one server."""

    base_url: str
    issuer: Issuer
    http: httpx.Client

    def as_(self, sub: str, **kwargs: Any) -> dict[str, str]:
        return self.issuer.headers(sub, **kwargs)

    def create_room(
        self, members: dict[str, str], room_id: str | None = None, admin: str = "admin"
    ) -> str:
        body: dict[str, Any] = {
            "name": "test room",
            "participants": [{"id": p, "role": r} for p, r in members.items()],
        }
        if room_id:
            body["id"] = room_id
        r = self.http.post(
            f"{self.base_url}/v1/rooms", json=body, headers=self.as_(admin, roles=["admin"])
        )
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def post(self, room: str, sub: str, text: str, key: str | None = None) -> httpx.Response:
        headers = self.as_(sub)
        if key:
            headers["Idempotency-Key"] = key
        return self.http.post(
            f"{self.base_url}/v1/rooms/{room}/messages", json={"text": text}, headers=headers
        )

    def events(self, room: str, sub: str = "admin", **params: Any) -> dict[str, Any]:
        r = self.http.get(
            f"{self.base_url}/v1/rooms/{room}/events",
            params=params,
            headers=self.as_(sub, roles=["admin"]),
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    def all_events(self, room: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        after = 0
        while True:
            page = self.events(room, after=after, limit=1000)
            found.extend(page["events"])
            after = page["next_after"]
            if not page["has_more"]:
                return found


def new_key() -> str:
    return str(uuid.uuid4())


# DOVECOTE_ROOMS_MAX_MESSAGE_BYTES of the test servers.
MAX_MESSAGE_BYTES = 256 * 1024


def query(store_url: str, data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on a server's store (SQLite file or PostgreSQL URL)."""
    if not store_url:
        import sqlite3

        conn = sqlite3.connect(f"file:{data_dir / 'dovecote.db'}?mode=ro", uri=True)
        try:
            return [tuple(row) for row in conn.execute(sql).fetchall()]
        finally:
            conn.close()
    import asyncpg

    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(store_url, timeout=5)
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(run())


async def ws_connect(base_url: str, token: str | None = None, **options: Any) -> Any:
    """A client WebSocket to /v1/rooms/ws (Bearer on the upgrade unless token is None)."""
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = base_url.replace("http://", "ws://") + "/v1/rooms/ws"
    return await connect(
        url, additional_headers=headers, compression=None, proxy=None, open_timeout=10, **options
    )


async def ws_recv(ws: Any, within: float = 10.0) -> dict[str, Any]:
    frame = await asyncio.wait_for(ws.recv(), within)
    return dict(json.loads(frame))


class Webhook:
    """A local HTTP endpoint that records every JSON body posted to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                hook.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def for_room(self, room: str) -> list[dict[str, Any]]:
        return [b for b in list(self.bodies) if b.get("room") == room]

    async def wait_for(self, room: str, count: int, within: float = 15.0) -> list[dict[str, Any]]:
        """The notifications about `room`, once there are `count` (or `within` passed)."""
        deadline = time.monotonic() + within
        for _ in range(int(within * 10)):
            if len(self.for_room(room)) >= count or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        return self.for_room(room)
