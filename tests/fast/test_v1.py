"""DIDComm v1 (Aries) through POST /, in-process: DID Exchange, mediation, forward, pickup,
problem reports (fast twins of tests/v1/test_v1_mediation.py)."""

from __future__ import annotations

from typing import Any

import pytest
from aries_askar import Key, KeyAlg

from dovecote.didcomm.v1 import envelope
from fast.instance import Fast
from support.v1agent import V1, V1Agent, forward_for, msg


async def _post(fast: Fast, agent: V1Agent, message: dict[str, Any]) -> tuple[int, bytes]:
    message["~transport"] = {"return_route": "all"}
    response = await fast.post(agent.pack(message), V1)
    return response.status_code, response.content


async def _ask(fast: Fast, agent: V1Agent, message: dict[str, Any]) -> dict[str, Any]:
    status, content = await _post(fast, agent, message)
    assert status == 200, (status, content[:300])
    return agent.open(content)


async def _connected(fast: Fast) -> V1Agent:
    agent = V1Agent(fast.settings.base_url)
    invite = (await fast.client.get("/invitation/v1")).json()
    response = await _ask(fast, agent, agent.exchange_request(invite))
    assert response["@type"].endswith("didexchange/1.1/response"), response
    return agent


async def test_v1_mediation_forward_pickup_and_acknowledge(fast: Fast) -> None:
    agent = await _connected(fast)
    grant = await _ask(fast, agent, msg("coordinate-mediation/1.0/mediate-request"))
    assert grant["@type"].endswith("/mediate-grant"), grant
    agent.routing_key = envelope.to_verkey(grant["routing_keys"][0])
    recipient = envelope.b58encode(Key.generate(KeyAlg.ED25519).get_public_bytes())
    added = await _ask(
        fast,
        agent,
        msg(
            "coordinate-mediation/1.0/keylist-update",
            updates=[
                {"recipient_key": recipient, "action": "add"},
                {"recipient_key": "not a key", "action": "add"},
            ],
        ),
    )
    assert [u["result"] for u in added["updated"]] == ["success", "client_error"]
    keys = await _ask(fast, agent, msg("coordinate-mediation/1.0/keylist-query"))
    assert keys["keys"] == [{"recipient_key": envelope.to_did_key(recipient)}]

    sent = forward_for(agent.routing_key, recipient, "hello", to_form="verkey")
    for _ in range(2):  # the sender's retry is stored once
        assert (await fast.post(sent, V1)).status_code == 202
    assert (
        await fast.post(forward_for(agent.routing_key, recipient, "second"), V1)
    ).status_code == 202
    status = await _ask(fast, agent, msg("messagepickup/2.0/status-request"))
    assert status["message_count"] == 2, status

    delivery = await _ask(fast, agent, msg("messagepickup/2.0/delivery-request", limit=10))
    assert delivery["@type"] == "https://didcomm.org/messagepickup/2.0/delivery"
    attached = delivery["~attach"]
    assert len(attached) == 2
    after = await _ask(
        fast,
        agent,
        msg("messagepickup/2.0/messages-received", message_id_list=[a["@id"] for a in attached]),
    )
    assert after["message_count"] == 0
    assert fast.query("SELECT COUNT(*) FROM messages") == [(0,)]


async def test_v1_ping_discover_and_problem_reports(fast: Fast) -> None:
    agent = await _connected(fast)
    ping = msg("trust_ping/1.0/ping", response_requested=True)
    pong = await _ask(fast, agent, ping)
    assert pong["@type"] == "https://didcomm.org/trust_ping/1.0/ping_response"
    assert pong["~thread"]["thid"] == ping["@id"]
    disclose = await _ask(
        fast, agent, msg("discover-features/1.0/query", query="https://didcomm.org/*")
    )
    assert {
        "https://didcomm.org/coordinate-mediation/1.0",
        "https://didcomm.org/messagepickup/2.0",
    } <= {p["pid"] for p in disclose["protocols"]}

    status, content = await _post(fast, agent, msg("nonsense/1.0/thing"))
    assert status == 400
    report = agent.open(content)
    assert report["@type"] == "https://didcomm.org/report-problem/1.0/problem-report"
    assert report["description"]["code"] == "e.m.msg.unsupported-type"
    before = fast.snapshot()
    status, content = await _post(fast, agent, msg("messagepickup/2.0/status-request"))
    assert status == 403
    assert agent.open(content)["description"]["code"] == "e.p.req.not-granted"
    assert fast.snapshot() == before


@pytest.mark.fast_settings(rate_limit_did=0.001, rate_limit_did_burst=2)
async def test_v1_rate_limit_per_sender_key(fast: Fast) -> None:
    """The per-sender limit applies to v1 senders (by verkey) as to v2 DIDs: past the burst,
    429 with Retry-After and a packed v1 problem report; another sender is unaffected."""
    chatty = await _connected(fast)  # the exchange request spends one token
    answers = [
        await _post(fast, chatty, msg("trust_ping/1.0/ping", response_requested=True))
        for _ in range(2)
    ]
    assert [status for status, _ in answers] == [200, 429]
    report = chatty.open(answers[1][1])
    assert report["@type"] == "https://didcomm.org/report-problem/1.0/problem-report"
    assert report["description"]["code"] == "e.m.me.res.rate-limited"
    quiet = await _connected(fast)
    status, _ = await _post(fast, quiet, msg("trust_ping/1.0/ping", response_requested=True))
    assert status == 200
