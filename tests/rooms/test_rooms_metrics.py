"""Rooms in the metrics (issue 17): a route label per rooms route template, counters for
posts and fan-out, a gauge of live subscriptions, and no `_created` series anywhere."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import websockets

from dovecote.rooms import devkey
from dovecote.web.guard import route_label
from support.server import ServerProcess


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_rooms_route_templates() -> None:
    cases = {
        "/v1/rooms": "/v1/rooms",
        "/v1/rooms/ws": "/v1/rooms/ws",
        "/v1/rooms/r-secret": "/v1/rooms/{room}",
        "/v1/rooms/r1/participants": "/v1/rooms/{room}/participants",
        "/v1/rooms/r1/participants/alice": "/v1/rooms/{room}/participants/{participant}",
        "/v1/rooms/r1/messages": "/v1/rooms/{room}/messages",
        "/v1/rooms/r1/messages/" + "a" * 32: "/v1/rooms/{room}/messages/{message}",
        "/v1/rooms/r1/messages/x/reactions/👍": (
            "/v1/rooms/{room}/messages/{message}/reactions/{emoji}"
        ),
        "/v1/rooms/r1/events": "/v1/rooms/{room}/events",
        "/v1/rooms/r1/nonsense/x/y": "/v1/rooms/other",
        "/v1/rooms/messages/messages": "/v1/rooms/{room}/messages",
    }
    for path, label in cases.items():
        assert route_label(path) == label, path


async def test_rooms_metrics_count_posts_fanout_and_subscribers(server_factory: Any) -> None:
    server: ServerProcess = server_factory()
    key = devkey.load_or_create(server.data_dir)  # the server's development issuer
    admin = devkey.issue(key, "ops", ["*"], ["admin"])
    alice = devkey.issue(key, "alice", ["m1"])
    base = server.base_url
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        created = await http.post(
            "/v1/rooms",
            headers={"Authorization": f"Bearer {admin}"},
            json={"id": "m1", "name": "m1", "participants": [{"id": "alice", "role": "member"}]},
        )
        assert created.status_code == 201, created.text
        ws_url = base.replace("http", "ws", 1) + "/v1/rooms/ws"
        async with websockets.connect(
            ws_url, additional_headers={"Authorization": f"Bearer {alice}"}
        ) as ws:
            await ws.send(json.dumps({"action": "subscribe", "room": "m1", "since": 0}))
            auth = {"Authorization": f"Bearer {alice}", "Idempotency-Key": "k1"}
            for _ in range(2):  # the second is an idempotent retry
                posted = await http.post("/v1/rooms/m1/messages", headers=auth, json={"text": "hi"})
                assert posted.status_code in (200, 201)
            events: list[dict[str, Any]] = []
            while not any(e.get("event", {}).get("type") == "message.posted" for e in events):
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            live = (await http.get("/metrics")).text
            assert sample(live, "dovecote_rooms_subscriptions") == 1
        text = (await http.get("/metrics")).text
        for _ in range(50):  # the socket's close is handled after the client returns
            if sample(text, "dovecote_rooms_subscriptions") == 0:
                break
            await asyncio.sleep(0.1)
            text = (await http.get("/metrics")).text

    assert sample(text, "dovecote_rooms_posts_total", outcome="created") == 1
    assert sample(text, "dovecote_rooms_posts_total", outcome="duplicate") == 1
    # room.created, participant.added (x1) and message.posted, to the one subscriber
    assert sample(text, "dovecote_rooms_fanout_deliveries_total") >= 3
    assert sample(text, "dovecote_rooms_subscriptions") == 0
    assert (
        sample(
            text,
            "dovecote_http_requests_total",
            route="/v1/rooms/{room}/messages",
            method="POST",
            status="201",
        )
        == 1
    )
    assert sample(text, "dovecote_http_requests_total", route="/v1/rooms", method="POST") == 1
    routes = set(re.findall(r'dovecote_http_requests_total\{[^}]*route="([^"]+)"', text))
    assert not any("m1" in r for r in routes), routes
    assert "_created" not in text
