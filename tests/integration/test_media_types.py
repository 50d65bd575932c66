"""Issue 12.1: the protected header of every envelope Dovecote sends names
`application/didcomm-encrypted+json` (HTTP replies, problem reports, pickup deliveries,
WebSocket replies, live pushes, replies sent to the sender's own endpoint, and forward
wrappers Dovecote creates for a routing key). Read with SICPA's library, not ours."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import websockets

from reliability.helpers import FAST_OUTBOUND, post, remote_forward, wait_until
from support.agent import BASIC, PICKUP, PING, Agent, forward_to
from support.endpoint import FlakyEndpoint
from support.jwe import ENCRYPTED, assert_encrypted_typ
from support.server import ServerProcess


async def test_every_kind_of_envelope_has_the_spec_media_type(
    server_factory: Callable[..., ServerProcess],
    endpoints: Callable[..., FlakyEndpoint],
    client: httpx.AsyncClient,
) -> None:
    server = server_factory(env=dict(FAST_OUTBOUND))
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)

    async def http_reply(
        agent: Agent, msg_type: str, body: dict[str, Any] | None = None, want: int = 200
    ) -> dict[str, Any]:
        response = await post(client, server, await agent.pack(agent.message(msg_type, body)))
        assert response.status_code == want, response.text
        assert response.headers["content-type"].startswith(ENCRYPTED)
        assert_encrypted_typ(response.content, "ECDH-1PU")
        return await agent.unpack(response.text)

    # A reply on the HTTP response, and a problem report (no grant).
    assert (await http_reply(alice, f"{PICKUP}/status-request"))["type"].endswith("/status")
    mallory = Agent.create(server.base_url, server.did)
    report = await http_reply(mallory, f"{PICKUP}/status-request")
    assert report["body"]["code"] == "e.p.req.not-granted"

    # A pickup delivery.
    bob = Agent.create(server.base_url)
    queued = await forward_to(
        server.base_url, alice, {"type": BASIC, "body": {"content": "q"}}, bob
    )
    assert (await post(client, server, queued)).status_code == 202
    delivery = await http_reply(alice, f"{PICKUP}/delivery-request", {"limit": 10})
    assert delivery["type"] == f"{PICKUP}/delivery"
    await http_reply(
        alice,
        f"{PICKUP}/messages-received",
        {"message_id_list": [a["id"] for a in delivery["attachments"]]},
    )

    # A WebSocket reply and a live push.
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(
            await alice.pack(
                alice.message(f"{PICKUP}/live-delivery-change", {"live_delivery": True})
            )
        )
        frame = await asyncio.wait_for(ws.recv(), 10)
        assert_encrypted_typ(frame, "ECDH-1PU")
        assert (await alice.unpack(frame))["body"]["live_delivery"] is True
        live = await forward_to(
            server.base_url, alice, {"type": BASIC, "body": {"content": "l"}}, bob
        )
        assert (await post(client, server, live)).status_code == 202
        push = await asyncio.wait_for(ws.recv(), 10)
        assert_encrypted_typ(push, "ECDH-1PU")
        assert (await alice.unpack(push))["type"] == f"{PICKUP}/delivery"

    # A reply to a sender without return_route that has its own endpoint.
    inbox = endpoints()
    carol = Agent.create(server.base_url, server.did, endpoint=inbox.url)
    ping = carol.message(f"{PING}/ping", {"response_requested": True}, return_route=False)
    assert (await post(client, server, await carol.pack(ping))).status_code == 202
    assert await wait_until(lambda: bool(inbox.bodies()), 20)
    [sent] = inbox.bodies()
    assert_encrypted_typ(sent, "ECDH-1PU")
    assert (await carol.unpack(sent))["type"] == f"{PING}/ping-response"

    # A forward wrapper Dovecote creates for the next hop's routing key (anoncrypt).
    relay_inbox = endpoints()
    relay = Agent.create(server.base_url)
    dave = Agent.create(
        server.base_url, endpoint=relay_inbox.url, endpoint_routing_keys=[f"{relay.did}#key-2"]
    )
    envelope, _ = await remote_forward(server, bob, dave)
    assert (await post(client, server, envelope)).status_code == 202
    assert await wait_until(lambda: bool(relay_inbox.bodies()), 20)
    [wrapped] = relay_inbox.bodies()
    assert_encrypted_typ(wrapped, "ECDH-ES")
    forward = await relay.unpack(wrapped)
    assert forward["body"]["next"] == dave.did
    assert json.loads(wrapped)["recipients"][0]["header"]["kid"] == f"{relay.did}#key-2"
