"""Backpressure and limits: 429 per IP and per DID, 503 past in-flight work, WebSocket 1013,
503 while read-only. Every refusal carries Retry-After and changes nothing stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import websockets

from reliability.helpers import ADMIN_TOKEN, post, query
from support.agent import BASIC, ENCRYPTED, PICKUP, PING, Agent, forward_to
from support.server import ServerProcess


async def test_rate_limit_per_client_ip(
    server_factory: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    server = server_factory(
        env={"DOVECOTE_RATE_LIMIT_IP": "1", "DOVECOTE_RATE_LIMIT_IP_BURST": "5"}
    )
    answers = [await client.get(server.base_url + "/invitation") for _ in range(12)]
    limited = [r for r in answers if r.status_code == 429]
    assert limited and all(r.status_code in (200, 429) for r in answers)
    assert all(int(r.headers["retry-after"]) >= 1 for r in limited)
    assert limited[0].json()["error"] == "e.m.me.res.rate-limited"
    # Health and metrics are exempt: probes must not be throttled.
    assert (await client.get(server.base_url + "/health/ready")).status_code == 200


async def test_rate_limit_per_sender_did(
    server_factory: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    server = server_factory(
        env={"DOVECOTE_RATE_LIMIT_DID": "0.5", "DOVECOTE_RATE_LIMIT_DID_BURST": "2"}
    )
    chatty, quiet = (
        Agent.create(server.base_url, server.did),
        Agent.create(server.base_url, server.did),
    )
    answers = []
    for _ in range(4):
        packed = await chatty.pack(chatty.message(f"{PING}/ping", {"response_requested": True}))
        answers.append(await post(client, server, packed))
    # Return-routed: a 200 whose body is the packed problem report (issue 12.4).
    assert [r.status_code for r in answers] == [200] * 4
    refused = answers[2]
    assert int(refused.headers["retry-after"]) >= 1
    report = await chatty.unpack(refused.text)
    assert report["body"]["code"] == "e.m.me.res.rate-limited"
    # The bucket is per DID: another sender on the same address is unaffected.
    packed = await quiet.pack(quiet.message(f"{PING}/ping", {"response_requested": True}))
    assert (await post(client, server, packed)).status_code == 200


async def test_concurrency_limit_websocket_limit_and_read_only(
    server_factory: Callable[..., ServerProcess],
    client: httpx.AsyncClient,
) -> None:
    server = server_factory(
        env={
            "DOVECOTE_MAX_CONCURRENT_REQUESTS": "1",
            "DOVECOTE_MAX_WEBSOCKETS": "1",
            "DOVECOTE_ADMIN_TOKEN": ADMIN_TOKEN,
        }
    )
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    packed = await forward_to(server.base_url, alice, {"type": BASIC, "body": {"n": 1}})

    # One slow upload holds the only request slot; the next request is refused at once.
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield packed[:10].encode()
        await release.wait()
        yield packed[10:].encode()

    slow = asyncio.create_task(
        client.post(server.base_url + "/", content=slow_body(), headers={"content-type": ENCRYPTED})
    )
    await asyncio.sleep(0.3)
    busy = await post(client, server, packed)
    assert busy.status_code == 503, busy.text
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"] == "e.m.me.res.overloaded"
    assert (await client.get(server.base_url + "/health")).status_code == 200  # exempt
    release.set()
    assert (await slow).status_code == 202
    assert (await post(client, server, packed)).status_code == 202  # a retry: stored once
    assert query(server, "SELECT COUNT(*) FROM messages") == [(1,)]

    # WebSockets past the limit: accepted, then closed with 1013 (try again later).
    async with websockets.connect(server.ws_url) as first:
        second = await websockets.connect(server.ws_url)
        try:
            await asyncio.wait_for(second.recv(), 5)
        except websockets.ConnectionClosed:
            pass
        assert second.close_code == 1013
        assert first.close_code is None

    # Read-only: new forwards get 503 + Retry-After, pickup still works.
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    forced = await client.post(
        server.base_url + "/admin/degradation", headers=admin, json={"level": "read-only"}
    )
    assert forced.json() == {"level": "read-only", "forced": True}
    other = await forward_to(server.base_url, alice, {"type": BASIC, "body": {"n": 2}})
    refused = await post(client, server, other)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"] == "e.m.me.unavailable"
    status = await alice.request(client, f"{PICKUP}/status-request")
    assert status["body"]["message_count"] == 1
    health = (await client.get(server.base_url + "/health", headers=admin)).json()
    assert health["degradation"] == "read-only" and health["degradation_forced"] is True
    await client.post(server.base_url + "/admin/degradation", headers=admin, json={"level": "auto"})
    assert (await post(client, server, other)).status_code == 202
    assert query(server, "SELECT COUNT(*) FROM messages") == [(2,)]
