"""Offline participants are notified through the outbox (kind notify, the mailboxes'
webhook): a post notifies every other participant nobody follows live, with no content."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dovecote.store.rooms_base import participant_hash
from support.rooms import Issuer, RoomsClient, ws_connect, ws_recv


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

    async def wait_for(self, count: int, within: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within
        for _ in range(int(within * 10)):
            if len(self.bodies) >= count or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        return list(self.bodies)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.httpd.shutdown()


async def test_offline_participants_are_notified(server_factory: Any, issuer: Issuer,
                                                 webhook: Webhook, store_url: str) -> None:
    env = {
        "DOVECOTE_ROOMS_JWKS_FILE": str(issuer.jwks_path),
        "DOVECOTE_ROOMS_JWT_ISSUER": issuer.iss,
        "DOVECOTE_NOTIFY_WEBHOOK_URL": webhook.url,
    }
    if store_url:  # the shared PostgreSQL database: this is one more instance on it
        env["DOVECOTE_STORE"] = store_url
    server = server_factory(env=env)
    with httpx.Client(timeout=10) as http:
        rooms = RoomsClient(server.base_url, issuer, http)
        room = rooms.create_room({"alice": "member", "bob": "member", "carol": "member"})
        ws = await ws_connect(server.base_url, issuer.token("bob"))
        await ws.send(json.dumps({"action": "subscribe", "room": room, "since": 0}))
        assert (await ws_recv(ws))["type"] == "subscribed"

        first = rooms.post(room, "alice", "secret words").json()
        bodies = await webhook.wait_for(1)
        await asyncio.sleep(1.5)  # anything else would have arrived by now
        assert len(webhook.bodies) == 1, webhook.bodies
        assert bodies[0] == {"event": "room_message", "room": room, "seq": first["seq"],
                             "message_id": first["id"],
                             "participant_hash": participant_hash(room, "carol")}
        assert "secret" not in json.dumps(bodies)

        # Bob leaves the socket: now he is offline too.
        await ws.close()
        await asyncio.sleep(0.3)
        second = rooms.post(room, "alice", "more").json()
        bodies = await webhook.wait_for(3)
        notified = {b["participant_hash"] for b in bodies[1:] if b["seq"] == second["seq"]}
        assert notified == {participant_hash(room, "bob"), participant_hash(room, "carol")}
