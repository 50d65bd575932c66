"""What goes into the outbox: replies to senders without a return route, and coalesced
notifications (webhook and FCM-shaped push) for mailboxes whose owner is offline."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable

import httpx
import websockets

from reliability.helpers import FAST_OUTBOUND, post, query, wait_until
from support.agent import BASIC, CM3, PICKUP, PING, Agent, forward_to
from support.endpoint import FlakyEndpoint
from support.inspect import metric_value
from support.server import ServerProcess


async def test_reply_without_return_route_goes_to_the_senders_endpoint(
    server_factory: Callable[..., ServerProcess],
    endpoints: Callable[..., FlakyEndpoint],
    client: httpx.AsyncClient,
) -> None:
    endpoint = endpoints("503")  # the first attempt fails: the reply is retried
    server = server_factory(env=FAST_OUTBOUND)
    carol = Agent.create(server.base_url, server.did, endpoint=endpoint.url)
    ping = carol.message(f"{PING}/ping", {"response_requested": True}, return_route=False)
    response = await post(client, server, await carol.pack(ping))
    assert response.status_code == 202 and response.content == b""

    assert await wait_until(lambda: len(endpoint.bodies(succeeded_only=True)) == 1, 10)
    reply = await carol.unpack(endpoint.bodies(succeeded_only=True)[0])
    assert reply["type"] == f"{PING}/ping-response" and reply["thid"] == ping.id
    assert reply["from"] == server.did

    assert len(endpoint.received) == 2  # nothing else went out


async def test_reply_to_a_mediatee_without_return_route_is_never_queued(
    server_factory: Callable[..., ServerProcess],
    client: httpx.AsyncClient,
) -> None:
    # Issue 12.3 (Pickup 3.0: a status MUST NOT be put on the queue): a mediatee whose
    # endpoint is this mediator gets replies on its live session, or not at all.
    server = server_factory(env=FAST_OUTBOUND)
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)

    def dropped() -> float:
        text = httpx.get(server.base_url + "/metrics").text
        return metric_value(text, "dovecote_replies_not_returned_total", reason="no-live-session")

    before = dropped()
    requests = [
        alice.message(f"{PICKUP}/status-request", return_route=False),
        alice.message(f"{PING}/ping", {"response_requested": True}, return_route=False),
        alice.message(f"{PICKUP}/delivery-request", {"limit": 5}, return_route=False),
        alice.message(f"{CM3}/mediate-request", return_route=False),
        # A problem report: the HTTP answer names the error, the report is not queued.
        alice.message(f"{PICKUP}/delivery-request", {}, return_route=False),
    ]
    for request in requests:
        response = await post(client, server, await alice.pack(request))
        if request is not requests[-1]:
            assert response.status_code == 202 and response.content == b"", response.text
        else:
            assert response.status_code == 400 and response.json()["error"] == "e.m.msg.malformed"
    status = await alice.request(client, f"{PICKUP}/status-request")
    assert status["body"]["message_count"] == 0
    assert query(server, "SELECT COUNT(*) FROM messages") == [(0,)]
    assert dropped() == before + len(requests)
    logged = [e for e in server.log_events() if e.get("event") == "reply.not_returned"]
    assert sum(1 for e in logged if e.get("reason") == "no-live-session") == len(requests)

    # With a live session open, the reply travels on it (and still is not queued).
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(
            await alice.pack(
                alice.message(f"{PICKUP}/live-delivery-change", {"live_delivery": True})
            )
        )
        assert (await alice.unpack(await asyncio.wait_for(ws.recv(), 10)))["body"][
            "live_delivery"
        ] is True
        quiet = alice.message(f"{PICKUP}/status-request", return_route=False)
        assert (await post(client, server, await alice.pack(quiet))).status_code == 202
        reply = await alice.unpack(await asyncio.wait_for(ws.recv(), 10))
        assert reply["type"] == f"{PICKUP}/status" and reply["thid"] == quiet.id
        assert reply["body"]["message_count"] == 0
    assert query(server, "SELECT COUNT(*) FROM messages") == [(0,)]
    assert dropped() == before + len(requests)


async def test_offline_mailbox_notifications_coalesce_and_carry_no_content(
    server_factory: Callable[..., ServerProcess],
    endpoints: Callable[..., FlakyEndpoint],
    client: httpx.AsyncClient,
) -> None:
    webhook = endpoints(default="500")  # failing at first: notifications pile up
    push = endpoints()
    server = server_factory(
        env={
            **FAST_OUTBOUND,
            "DOVECOTE_BREAKER_THRESHOLD": "100",
            "DOVECOTE_NOTIFY_WEBHOOK_URL": webhook.url,
            "DOVECOTE_PUSH_URL": push.url,
            "DOVECOTE_PUSH_TOKEN": "push-secret",
        }
    )
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    erin = Agent.create(server.base_url, server.did, via_mediator=True)
    for agent in (alice, erin):
        await agent.mediate(client)
    digest = hashlib.sha256(alice.did.encode()).hexdigest()

    for n in range(4):
        packed = await forward_to(
            server.base_url, alice, {"type": BASIC, "body": {"content": f"secret {n}"}}
        )
        assert (await post(client, server, packed)).status_code == 202
    assert await wait_until(lambda: len(webhook.received) >= 2, 10)  # retrying
    # While one is pending, later messages add no second notification for the mailbox.
    rows = query(
        server, "SELECT COUNT(*) FROM outbox WHERE kind = 'notify' AND target = ?", webhook.url
    )
    assert rows == [(1,)]
    webhook.set_default("ok")
    assert await wait_until(lambda: webhook.bodies(succeeded_only=True), 10)
    await asyncio.sleep(1)
    [sent] = webhook.bodies(succeeded_only=True)
    note = json.loads(sent)
    delivery = await alice.request(client, f"{PICKUP}/delivery-request", {"limit": 10})
    assert note == {
        "event": "message_waiting",
        "mediatee_hash": digest,
        "message_id": delivery["attachments"][0]["id"],
        "count": 4,
    }
    assert webhook.received[-1].headers["content-type"] == "application/json"
    assert "authorization" not in webhook.received[-1].headers

    assert push.bodies(succeeded_only=True)
    request = push.received[0]
    assert request.headers["authorization"] == "Bearer push-secret"
    message = json.loads(request.body)["message"]
    assert message["topic"] == f"dovecote-{digest}"
    assert set(message) == {"topic", "data"}  # data only: no notification text
    assert message["data"]["event"] == "message_waiting"
    assert all(isinstance(v, str) for v in message["data"].values())
    for received in webhook.received + push.received:
        assert b"secret" not in received.body and alice.did.encode() not in received.body

    # A mailbox with a live session on this instance is pushed to, not notified.
    calls = len(webhook.received)
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(
            await erin.pack(erin.message(f"{PICKUP}/live-delivery-change", {"live_delivery": True}))
        )
        await erin.unpack(await asyncio.wait_for(ws.recv(), 10))
        packed = await forward_to(server.base_url, erin, {"type": BASIC, "body": {}})
        assert (await post(client, server, packed)).status_code == 202
        pushed = await erin.unpack(await asyncio.wait_for(ws.recv(), 10))
        assert pushed["type"] == f"{PICKUP}/delivery"
    await asyncio.sleep(0.5)
    assert len(webhook.received) == calls
    assert query(server, "SELECT COUNT(*) FROM outbox") == [(0,)]
