"""The whole mediator flow over real HTTP and WebSocket, driven by SICPA's didcomm library."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
import websockets

from support.agent import (
    BASIC,
    CM2,
    CM3,
    DISCOVER,
    ENCRYPTED,
    PICKUP,
    PING,
    Agent,
    forward_to,
)
from support.server import ServerProcess


async def _post(client: httpx.AsyncClient, server: ServerProcess, packed: str) -> httpx.Response:
    return await client.post(
        server.base_url + "/", content=packed, headers={"content-type": ENCRYPTED}
    )


@pytest.mark.parametrize("version", [CM3, CM2], ids=["cm3", "cm2"])
async def test_full_flow_over_http(
    shared_server: ServerProcess, client: httpx.AsyncClient, version: str
) -> None:
    server = shared_server
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    grant = await alice.mediate(client, version)
    routing_did = grant["body"]["routing_did"]
    assert (routing_did == server.did) if version == CM2 else (routing_did == [server.did])

    # Bob, who knows only Alice's DID, sends her a message through her mediator.
    bob = Agent.create(server.base_url)
    text = f"hello {uuid.uuid4()}"
    packed = await forward_to(
        server.base_url, alice, {"type": BASIC, "body": {"content": text}}, sender=bob
    )
    response = await _post(client, server, packed)
    assert response.status_code == 202, response.text
    assert response.content == b""

    status = await alice.request(client, f"{PICKUP}/status-request")
    assert status["type"] == f"{PICKUP}/status"
    assert status["body"]["message_count"] == 1
    assert status["body"]["total_bytes"] > 0
    assert status["body"]["live_delivery"] is False
    assert "longest_waited_seconds" in status["body"]

    delivery = await alice.request(client, f"{PICKUP}/delivery-request", {"limit": 10})
    assert delivery["type"] == f"{PICKUP}/delivery"
    [attachment] = delivery["attachments"]
    original = await alice.unpack(json.dumps(attachment["data"]["json"]))
    assert original["body"]["content"] == text
    assert original["from"] == bob.did

    # Delivery does not remove: still one queued until acknowledged.
    again = await alice.request(client, f"{PICKUP}/status-request")
    assert again["body"]["message_count"] == 1

    ack = await alice.request(
        client, f"{PICKUP}/messages-received", {"message_id_list": [attachment["id"], "unknown-id"]}
    )
    assert ack["type"] == f"{PICKUP}/status"
    assert ack["body"]["message_count"] == 0

    empty = await alice.request(client, f"{PICKUP}/delivery-request", {"limit": 10})
    assert empty["type"] == f"{PICKUP}/status"
    assert empty["body"]["message_count"] == 0


async def test_recipient_update_remove_and_query(
    shared_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    server = shared_server
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client, CM3)
    extra = [Agent.create(server.base_url).did for _ in range(3)]
    update = await alice.request(
        client,
        f"{CM3}/recipient-update",
        {
            "updates": [
                *({"recipient_did": d, "action": "add"} for d in extra),
                {"recipient_did": alice.did, "action": "add"},
                {"recipient_did": "not-a-did", "action": "add"},
                {"recipient_did": extra[0], "action": "explode"},
            ]
        },
    )
    results = [u["result"] for u in update["body"]["updated"]]
    assert results == ["success", "success", "success", "no_change", "client_error", "client_error"]

    page = await alice.request(
        client, f"{CM3}/recipient-query", {"paginate": {"limit": 2, "offset": 0}}
    )
    assert page["type"] == f"{CM3}/recipient"
    assert len(page["body"]["dids"]) == 2
    assert page["body"]["pagination"] == {"count": 2, "offset": 0, "remaining": 2}

    removed = await alice.request(
        client,
        f"{CM3}/recipient-update",
        {
            "updates": [
                {"recipient_did": extra[0], "action": "remove"},
                {"recipient_did": extra[0], "action": "remove"},
            ]
        },
    )
    assert [u["result"] for u in removed["body"]["updated"]] == ["success", "no_change"]

    keylist = await alice.request(client, f"{CM2}/keylist-query", {})
    assert keylist["type"] == f"{CM2}/keylist"
    listed = {k["recipient_did"] for k in keylist["body"]["keys"]}
    assert listed == {alice.did, extra[1], extra[2]}

    # A forward to the removed DID is refused and nothing is stored.
    target = Agent.create(server.base_url, server.did, via_mediator=True)
    target.did = extra[0]
    status = await alice.request(client, f"{PICKUP}/status-request")
    assert status["body"]["message_count"] == 0


async def test_requests_without_grant_get_problem_report(
    shared_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    server = shared_server
    mallory = Agent.create(server.base_url, server.did)
    status, reply = await mallory.send_http(client, mallory.message(f"{PICKUP}/status-request"))
    # Issue 12.4: the problem report is delivered (200), the failure is in the message.
    assert status == 200
    assert reply is not None
    assert reply["type"] == "https://didcomm.org/report-problem/2.0/problem-report"
    assert reply["body"]["code"] == "e.p.req.not-granted"


async def test_trust_ping_and_discover_features(
    shared_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    server = shared_server
    agent = Agent.create(server.base_url, server.did)
    ping = agent.message(f"{PING}/ping", {"response_requested": True})
    status, pong = await agent.send_http(client, ping)
    assert status == 200 and pong is not None
    assert pong["type"] == f"{PING}/ping-response"
    assert pong["thid"] == ping.id

    quiet = agent.message(f"{PING}/ping", {"response_requested": False})
    assert (await agent.send_http(client, quiet))[0] == 202

    disclose = await agent.request(
        client,
        f"{DISCOVER}/queries",
        {"queries": [{"feature-type": "protocol", "match": "https://didcomm.org/*"}]},
    )
    ids = {d["id"] for d in disclose["body"]["disclosures"]}
    assert {
        "https://didcomm.org/coordinate-mediation/2.0",
        "https://didcomm.org/coordinate-mediation/3.0",
        "https://didcomm.org/routing/2.0",
        "https://didcomm.org/messagepickup/3.0",
        "https://didcomm.org/trust-ping/2.0",
        "https://didcomm.org/discover-features/2.0",
        "https://didcomm.org/report-problem/2.0",
    } <= ids


async def test_live_mode_on_http_is_refused(
    shared_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    server = shared_server
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    status, reply = await alice.send_http(
        client, alice.message(f"{PICKUP}/live-delivery-change", {"live_delivery": True})
    )
    assert status == 200 and reply is not None
    assert reply["body"]["code"] == "e.m.live-mode-not-supported"


async def test_full_flow_over_websocket_with_live_mode(
    shared_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    server = shared_server
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    async with websockets.connect(server.ws_url) as ws:

        async def ask(msg_type: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
            await ws.send(await alice.pack(alice.message(msg_type, body)))
            return await alice.unpack(await asyncio.wait_for(ws.recv(), 10))

        grant = await ask(f"{CM3}/mediate-request")
        assert grant["type"] == f"{CM3}/mediate-grant"
        await ask(
            f"{CM3}/recipient-update", {"updates": [{"recipient_did": alice.did, "action": "add"}]}
        )

        # Issue 12.2: a message queued before live mode is not pushed when it starts
        # (Pickup 3.0: "Messages already in the queue are not affected by Live Mode").
        bob = Agent.create(server.base_url)
        first = await forward_to(
            server.base_url, alice, {"type": BASIC, "body": {"content": "queued"}}, bob
        )
        assert (await _post(client, server, first)).status_code == 202

        status = await ask(f"{PICKUP}/live-delivery-change", {"live_delivery": True})
        assert status["type"] == f"{PICKUP}/status"
        assert status["body"]["live_delivery"] is True
        assert status["body"]["message_count"] == 1

        # A new message arrives while connected: pushed at once, and only it.
        second = await forward_to(
            server.base_url, alice, {"type": BASIC, "body": {"content": "live"}}, bob
        )
        assert (await _post(client, server, second)).status_code == 202
        pushed = await alice.unpack(await asyncio.wait_for(ws.recv(), 10))
        assert pushed["type"] == f"{PICKUP}/delivery" and "thid" not in pushed
        contents = [
            await alice.unpack(json.dumps(a["data"]["json"])) for a in pushed["attachments"]
        ]
        assert [c["body"]["content"] for c in contents] == ["live"]

        # The queued one is fetched with delivery-request (on the same socket).
        fetched = await ask(f"{PICKUP}/delivery-request", {"limit": 10})
        assert fetched["type"] == f"{PICKUP}/delivery"
        by_content = {}
        for attachment in fetched["attachments"]:
            inner = await alice.unpack(json.dumps(attachment["data"]["json"]))
            by_content[inner["body"]["content"]] = attachment["id"]
        assert "queued" in by_content  # (the pushed one may be listed too until acked)

        ids = [by_content["queued"], pushed["attachments"][0]["id"]]
        ack = await ask(f"{PICKUP}/messages-received", {"message_id_list": ids})
        assert ack["body"]["message_count"] == 0
        # Nothing else was pushed.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)


async def test_unacknowledged_live_push_stays_queued_for_delivery_request(
    shared_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    server = shared_server
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    bob = Agent.create(server.base_url)

    async def live_socket() -> websockets.ClientConnection:
        ws = await websockets.connect(server.ws_url)
        await ws.send(
            await alice.pack(
                alice.message(f"{PICKUP}/live-delivery-change", {"live_delivery": True})
            )
        )
        status = await alice.unpack(await asyncio.wait_for(ws.recv(), 10))
        assert status["body"]["live_delivery"] is True
        return ws

    ws1 = await live_socket()
    packed = await forward_to(
        server.base_url, alice, {"type": BASIC, "body": {"content": "x"}}, bob
    )
    assert (await _post(client, server, packed)).status_code == 202
    pushed = await alice.unpack(await asyncio.wait_for(ws1.recv(), 10))
    message_id = pushed["attachments"][0]["id"]
    # The socket dies before the client acknowledges.
    await ws1.close()

    # A second socket in live mode does not push it again (it was queued before the
    # switch); delivery-request returns it, and it stays queued until acknowledged.
    ws2 = await live_socket()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws2.recv(), 0.5)
    await ws2.send(await alice.pack(alice.message(f"{PICKUP}/delivery-request", {"limit": 5})))
    again = await alice.unpack(await asyncio.wait_for(ws2.recv(), 10))
    assert [a["id"] for a in again["attachments"]] == [message_id]
    await ws2.close()

    status = await alice.request(client, f"{PICKUP}/status-request")
    assert status["body"]["message_count"] == 1


async def test_retried_forward_is_stored_once(
    shared_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    server = shared_server
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    packed = await forward_to(server.base_url, alice, {"type": BASIC, "body": {"content": "1"}})
    for _ in range(3):
        assert (await _post(client, server, packed)).status_code == 202
    status = await alice.request(client, f"{PICKUP}/status-request")
    assert status["body"]["message_count"] == 1


async def test_invitation_and_restart_keeps_identity(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    invitation = (await client.get(server.base_url + "/invitation")).json()
    assert invitation["type"] == "https://didcomm.org/out-of-band/2.0/invitation"
    assert invitation["body"]["goal_code"] == "request-mediate"
    url = (await client.get(server.base_url + "/invitation?format=url")).text
    assert url.startswith(server.base_url + "/?_oob=")
    import base64

    encoded = url.split("_oob=")[1]
    decoded = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    assert decoded["from"] == server.did
    identity_file = server.data_dir / "identity.json"
    assert identity_file.stat().st_mode & 0o777 == 0o600
    did_before = server.did
    server.restart()
    assert server.did == did_before
