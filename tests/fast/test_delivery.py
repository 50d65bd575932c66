"""What the lifespan's background loops do, in-process: the outbox delivers forwards to a
recipient's own endpoint (a real loopback HTTP server), retries, dead-letters, replays;
replies go to a sender's endpoint without return_route; the sweep expires messages (fast
twins of tests/reliability/test_outbound.py and tests/integration/test_expiry.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from fast.instance import ADMIN_TOKEN, BASE_URL, Fast
from reliability.helpers import received_ids, remote_forward, wait_until
from support.agent import BASIC, PICKUP, PING, forward_to
from support.endpoint import FlakyEndpoint
from support.inspect import metric_value
from support.jwe import assert_encrypted_typ

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
OUTBOUND = {
    "outbound_allow_private": True,
    "retry_base": 0.05,
    "retry_cap": 0.2,
    "outbound_timeout": 2.0,
    "outbound_connect_timeout": 1.0,
}


@pytest.mark.fast_settings(**OUTBOUND)
async def test_forward_to_an_endpoint_is_retried_and_delivered_once(
    fast: Fast, endpoints: Callable[..., FlakyEndpoint]
) -> None:
    endpoint = endpoints("500")
    bob = fast.agent(via_mediator=False)
    carol = fast.agent(via_mediator=False, endpoint=endpoint.url)
    before = await fast.scrape()
    envelope, message_id = await remote_forward(fast, bob, carol)  # type: ignore[arg-type]
    assert (await fast.post(envelope)).status_code == 202
    assert (await fast.post(envelope)).status_code == 202  # a retry: stored once

    assert await wait_until(lambda: any(r.succeeded for r in endpoint.received), 20)
    await asyncio.sleep(0.3)  # anything extra would show up now
    assert [r.behaviour for r in endpoint.received] == ["500", "ok"]
    delivered = endpoint.bodies(succeeded_only=True)
    assert await received_ids(carol, delivered) == [message_id]
    assert endpoint.received[-1].headers["content-type"] == "application/didcomm-encrypted+json"
    after = await fast.scrape()
    assert (
        metric_value(after, "dovecote_outbox_retries_total", kind="forward")
        - metric_value(before, "dovecote_outbox_retries_total", kind="forward")
    ) == 1
    assert await wait_until(lambda: fast.query("SELECT COUNT(*) FROM outbox") == [(0,)], 5)


@pytest.mark.fast_settings(**OUTBOUND)
async def test_permanent_failure_dead_letters_then_admin_replay_and_purge(
    fast: Fast, endpoints: Callable[..., FlakyEndpoint]
) -> None:
    endpoint = endpoints(default="404")
    bob = fast.agent(via_mediator=False)
    carol = fast.agent(via_mediator=False, endpoint=endpoint.url)
    envelope, message_id = await remote_forward(fast, bob, carol)  # type: ignore[arg-type]
    assert (await fast.post(envelope)).status_code == 202

    async def dead_letters() -> list[dict[str, Any]]:
        response = await fast.client.get("/admin/dlq", headers=ADMIN)
        assert response.status_code == 200, response.text
        return list(response.json()["items"])

    assert await wait_until(dead_letters, 15, interval=0.1)
    [item] = await dead_letters()
    assert item["reason"] == "http_404" and item["kind"] == "forward"
    assert item["attempts"] == 1 and item["target"] == endpoint.url
    detail = (await fast.client.get(f"/admin/dlq/{item['id']}", headers=ADMIN)).json()
    assert detail["history"][-1]["status"] == 404 and detail["payload_base64"]

    endpoint.set_default("ok")
    replay = await fast.client.post("/admin/dlq/replay", headers=ADMIN, json={"ids": [item["id"]]})
    assert replay.json() == {"replayed": 1}
    assert await wait_until(lambda: any(r.succeeded for r in endpoint.received), 15)
    assert await received_ids(carol, endpoint.bodies(succeeded_only=True)) == [message_id]
    assert await dead_letters() == []

    endpoint.set_default("404")
    second, _ = await remote_forward(fast, bob, carol)  # type: ignore[arg-type]
    assert (await fast.post(second)).status_code == 202
    assert await wait_until(dead_letters, 15, interval=0.1)
    [again] = await dead_letters()
    bad = await fast.client.post("/admin/dlq/purge", headers=ADMIN, json={"ids": ["x"]})
    assert bad.status_code == 400 and bad.json()["error"] == "bad_request"
    purged = await fast.client.post("/admin/dlq/purge", headers=ADMIN, json={"ids": [again["id"]]})
    assert purged.json() == {"purged": 1}
    assert await dead_letters() == []


@pytest.mark.fast_settings(**OUTBOUND)
async def test_reply_without_return_route_goes_to_the_senders_endpoint(
    fast: Fast, endpoints: Callable[..., FlakyEndpoint]
) -> None:
    inbox = endpoints()
    carol = fast.agent(via_mediator=False, endpoint=inbox.url)
    ping = carol.message(f"{PING}/ping", {"response_requested": True}, return_route=False)
    response = await fast.post(await carol.pack(ping))
    assert response.status_code == 202 and response.content == b""
    assert await wait_until(lambda: bool(inbox.bodies()), 20)
    [sent] = inbox.bodies()
    assert_encrypted_typ(sent, "ECDH-1PU")
    pong = await carol.unpack(sent)
    assert pong["type"] == f"{PING}/ping-response" and pong["thid"] == ping.id


@pytest.mark.fast_settings(message_ttl=1.0, sweep_interval=0.2)
async def test_expired_messages_move_to_dead_letters(fast: Fast) -> None:
    alice = fast.agent()
    await alice.mediate(fast.client)
    before = await fast.scrape()
    for n in range(3):
        packed = await forward_to(BASE_URL, alice, {"type": BASIC, "body": {"n": n}})
        assert (await fast.post(packed)).status_code == 202

    async def queued() -> int:
        status = await alice.request(fast.client, f"{PICKUP}/status-request")
        return int(status["body"]["message_count"])

    assert await wait_until(
        lambda: fast.query("SELECT COUNT(*) FROM dead_letters") == [(3,)], 20, interval=0.1
    )
    assert await queued() == 0
    after = await fast.scrape()
    assert (
        metric_value(after, "dovecote_messages_expired_total")
        - metric_value(before, "dovecote_messages_expired_total")
    ) == 3
    listed = (await fast.client.get("/admin/dlq", headers=ADMIN)).json()
    assert [i["reason"] for i in listed["items"]] == ["expired"] * 3
