"""The DIDComm protocol handlers through POST /, in-process, with every bad-field problem
report (this tier owns those; tests/integration/test_mediator_flow.py runs the flows
against real servers on both engines)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import pytest

from fast.instance import BASE_URL, Fast
from support.agent import BASIC, CM2, CM3, DISCOVER, ENCRYPTED, PICKUP, PING, forward_to
from support.inspect import metric_value
from support.jwe import assert_encrypted_typ

PROBLEM = "https://didcomm.org/report-problem/2.0/problem-report"


@pytest.mark.parametrize("version", [CM3, CM2], ids=["cm3", "cm2"])
async def test_mediate_forward_status_deliver_acknowledge(fast: Fast, version: str) -> None:
    alice = fast.agent()
    grant = await alice.mediate(fast.client, version)
    assert grant["type"] == f"{version}/mediate-grant"
    routing_did = grant["body"]["routing_did"]
    # CM 2.0 names one DID; CM 3.0 a list.
    assert routing_did == (fast.did if version == CM2 else [fast.did])
    assert fast.query("SELECT COUNT(*) FROM mediations") == [(1,)]

    bob = fast.agent(via_mediator=False)
    text = f"hello {uuid.uuid4()}"
    packed = await forward_to(
        fast.settings.base_url, alice, {"type": BASIC, "body": {"content": text}}, sender=bob
    )
    response = await fast.post(packed)
    assert response.status_code == 202, response.text
    assert response.content == b""
    assert fast.query("SELECT COUNT(*) FROM messages") == [(1,)]

    status = await alice.request(fast.client, f"{PICKUP}/status-request")
    assert status["type"] == f"{PICKUP}/status"
    assert status["body"]["message_count"] == 1
    assert status["body"]["total_bytes"] > 0
    assert status["body"]["live_delivery"] is False

    delivery = await alice.request(fast.client, f"{PICKUP}/delivery-request", {"limit": 10})
    assert delivery["type"] == f"{PICKUP}/delivery"
    [attachment] = delivery["attachments"]
    original = await alice.unpack(json.dumps(attachment["data"]["json"]))
    assert original["body"]["content"] == text
    assert original["from"] == bob.did
    # Delivered is not removed: still queued until acknowledged.
    again = await alice.request(fast.client, f"{PICKUP}/status-request")
    assert again["body"]["message_count"] == 1

    ack = await alice.request(
        fast.client,
        f"{PICKUP}/messages-received",
        {"message_id_list": [attachment["id"], "unknown-id"]},
    )
    assert ack["type"] == f"{PICKUP}/status"
    assert ack["body"]["message_count"] == 0
    empty = await alice.request(fast.client, f"{PICKUP}/delivery-request", {"limit": 10})
    assert empty["type"] == f"{PICKUP}/status"
    assert empty["body"]["message_count"] == 0
    assert fast.query("SELECT COUNT(*) FROM messages") == [(0,)]


async def test_replies_are_authcrypt_with_the_spec_media_type(fast: Fast) -> None:
    alice = fast.agent()
    await alice.mediate(fast.client)
    response = await fast.post(await alice.pack(alice.message(f"{PICKUP}/status-request")))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(ENCRYPTED)
    assert_encrypted_typ(response.content, "ECDH-1PU")


async def test_recipient_update_query_and_keylist(fast: Fast) -> None:
    alice = fast.agent()
    await alice.mediate(fast.client, CM3)
    extra = [fast.agent(via_mediator=False).did for _ in range(3)]
    update = await alice.request(
        fast.client,
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
    assert [u["result"] for u in update["body"]["updated"]] == [
        "success",
        "success",
        "success",
        "no_change",
        "client_error",
        "client_error",
    ]

    page = await alice.request(
        fast.client, f"{CM3}/recipient-query", {"paginate": {"limit": 2, "offset": 0}}
    )
    assert page["type"] == f"{CM3}/recipient"
    assert len(page["body"]["dids"]) == 2
    assert page["body"]["pagination"] == {"count": 2, "offset": 0, "remaining": 2}

    removed = await alice.request(
        fast.client,
        f"{CM3}/recipient-update",
        {
            "updates": [
                {"recipient_did": extra[0], "action": "remove"},
                {"recipient_did": extra[0], "action": "remove"},
            ]
        },
    )
    assert [u["result"] for u in removed["body"]["updated"]] == ["success", "no_change"]

    keylist = await alice.request(fast.client, f"{CM2}/keylist-query", {})
    assert keylist["type"] == f"{CM2}/keylist"
    assert {k["recipient_did"] for k in keylist["body"]["keys"]} == {alice.did, *extra[1:]}
    assert fast.query("SELECT COUNT(*) FROM recipients") == [(3,)]


async def test_cm2_keylist_update_adds_and_removes(fast: Fast) -> None:
    alice = fast.agent()
    grant = await alice.request(fast.client, f"{CM2}/mediate-request")
    assert grant["type"] == f"{CM2}/mediate-grant"
    other = fast.agent(via_mediator=False).did
    added = await alice.request(
        fast.client,
        f"{CM2}/keylist-update",
        {"updates": [{"recipient_did": other, "action": "add"}]},
    )
    assert added["type"] == f"{CM2}/keylist-update-response"
    assert added["body"]["updated"] == [
        {"recipient_did": other, "action": "add", "result": "success"}
    ]
    gone = await alice.request(
        fast.client,
        f"{CM2}/keylist-update",
        {"updates": [{"recipient_did": other, "action": "remove"}]},
    )
    assert gone["body"]["updated"][0]["result"] == "success"
    keylist = await alice.request(fast.client, f"{CM2}/keylist-query", {})
    assert keylist["body"]["keys"] == []


async def test_forward_to_a_removed_recipient_is_refused_and_stores_nothing(fast: Fast) -> None:
    alice = fast.agent()
    await alice.mediate(fast.client)
    await alice.request(
        fast.client,
        f"{CM3}/recipient-update",
        {"updates": [{"recipient_did": alice.did, "action": "remove"}]},
    )
    before = fast.snapshot()
    packed = await forward_to(fast.settings.base_url, alice, {"type": BASIC, "body": {}})
    response = await fast.post(packed)
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "e.m.msg.unregistered-recipient"
    assert fast.snapshot() == before


async def test_retried_forward_is_stored_once(fast: Fast) -> None:
    alice = fast.agent()
    await alice.mediate(fast.client)
    packed = await forward_to(fast.settings.base_url, alice, {"type": BASIC, "body": {"n": 1}})
    before = await fast.scrape()
    for _ in range(3):
        assert (await fast.post(packed)).status_code == 202
    after = await fast.scrape()
    status = await alice.request(fast.client, f"{PICKUP}/status-request")
    assert status["body"]["message_count"] == 1
    assert (
        metric_value(after, "dovecote_messages_duplicate_total")
        - metric_value(before, "dovecote_messages_duplicate_total")
    ) == 2


async def test_requests_without_grant_get_a_problem_report(fast: Fast) -> None:
    mallory = fast.agent(via_mediator=False)
    before = fast.snapshot()
    status, reply = await mallory.send_http(
        fast.client, mallory.message(f"{PICKUP}/status-request")
    )
    # Issue 12.4: the report is delivered (200); the failure is in the message.
    assert status == 200 and reply is not None
    assert reply["type"] == PROBLEM
    assert reply["body"]["code"] == "e.p.req.not-granted"
    assert fast.snapshot() == before


async def test_trust_ping_and_discover_features(fast: Fast) -> None:
    agent = fast.agent(via_mediator=False)
    ping = agent.message(f"{PING}/ping", {"response_requested": True})
    status, pong = await agent.send_http(fast.client, ping)
    assert status == 200 and pong is not None
    assert pong["type"] == f"{PING}/ping-response"
    assert pong["thid"] == ping.id

    quiet = agent.message(f"{PING}/ping", {"response_requested": False})
    assert (await agent.send_http(fast.client, quiet)) == (202, None)

    disclose = await agent.request(
        fast.client,
        f"{DISCOVER}/queries",
        {"queries": [{"feature-type": "protocol", "match": "https://didcomm.org/*"}]},
    )
    assert disclose["type"] == f"{DISCOVER}/disclose"
    ids = {d["id"] for d in disclose["body"]["disclosures"]}
    assert {
        CM2,
        CM3,
        "https://didcomm.org/routing/2.0",
        PICKUP,
        PING,
        DISCOVER,
        "https://didcomm.org/report-problem/2.0",
    } <= ids
    narrow = await agent.request(
        fast.client,
        f"{DISCOVER}/queries",
        {"queries": [{"feature-type": "protocol", "match": "https://didcomm.org/trust-ping/*"}]},
    )
    assert {d["id"] for d in narrow["body"]["disclosures"]} == {PING}


async def test_live_mode_on_http_is_refused(fast: Fast) -> None:
    alice = fast.agent()
    await alice.mediate(fast.client)
    status, reply = await alice.send_http(
        fast.client, alice.message(f"{PICKUP}/live-delivery-change", {"live_delivery": True})
    )
    assert status == 200 and reply is not None
    assert reply["type"] == PROBLEM
    assert reply["body"]["code"] == "e.m.live-mode-not-supported"


@pytest.mark.parametrize(
    ("msg_type", "body", "code"),
    [
        ("https://didcomm.org/nonsense/9.0/explode", {}, "e.m.msg.unsupported-type"),
        (f"{PICKUP}/delivery-request", {}, "e.m.msg.malformed"),
        (f"{PICKUP}/delivery-request", {"limit": "ten"}, "e.m.msg.malformed"),
        (f"{PICKUP}/delivery-request", {"limit": True}, "e.m.msg.malformed"),
        (f"{PICKUP}/delivery-request", {"limit": 0}, "e.m.msg.malformed"),
        (f"{PICKUP}/messages-received", {"message_id_list": "abc"}, "e.m.msg.malformed"),
        (f"{CM3}/recipient-update", {"updates": "x"}, "e.m.msg.malformed"),
        (f"{CM3}/recipient-query", {"paginate": {"limit": -1}}, "e.m.msg.malformed"),
    ],
    ids=[
        "unknown-type",
        "missing-limit",
        "limit-string",
        "limit-bool",
        "limit-zero",
        "ack-not-list",
        "updates-not-list",
        "negative-page",
    ],
)
async def test_bad_messages_get_a_problem_report_and_change_nothing(
    fast: Fast, msg_type: str, body: dict[str, Any], code: str
) -> None:
    alice = fast.agent()
    await alice.mediate(fast.client)
    before = fast.snapshot()
    message = alice.message(msg_type, body)
    status, reply = await alice.send_http(fast.client, message)
    assert status == 200 and reply is not None
    assert reply["type"] == PROBLEM
    assert reply["body"]["code"] == code
    assert reply["pthid"] == message.id
    assert fast.snapshot() == before


async def test_problem_report_from_a_client_is_accepted_quietly(fast: Fast) -> None:
    agent = fast.agent(via_mediator=False)
    report = agent.message(
        PROBLEM,
        {"code": "e.p.xfer.cant-use-endpoint", "comment": "testing"},
        pthid=str(uuid.uuid4()),
    )
    before = fast.snapshot()
    status, reply = await agent.send_http(fast.client, report)
    # Never answered with another report (no loops between two agents).
    assert status == 202 and reply is None
    assert fast.snapshot() == before


@pytest.mark.fast_settings(mediation_policy="allowlist")
async def test_allowlist_policy_denies_others(fast: Fast) -> None:
    alice, mallory = fast.agent(), fast.agent()
    # The handlers hold their own copy of the settings they read (MediatorSettings).
    ctx = fast.dovecote.ctx
    ctx.settings = dataclasses.replace(ctx.settings, mediation_allowlist=(alice.did,))
    for version in (CM2, CM3):
        denied = await mallory.request(fast.client, f"{version}/mediate-request")
        assert denied["type"] == f"{version}/mediate-deny"
    status, reply = await mallory.send_http(
        fast.client, mallory.message(f"{PICKUP}/status-request")
    )
    assert status == 200 and reply is not None
    assert reply["body"]["code"] == "e.p.req.not-granted"
    assert fast.query("SELECT COUNT(*) FROM mediations WHERE state = 'granted'") == [(0,)]
    grant = await alice.mediate(fast.client)
    assert grant["type"] == f"{CM3}/mediate-grant"


async def test_pickup_filters_by_recipient_did(fast: Fast) -> None:
    alice, carol = fast.agent(), fast.agent()
    await alice.mediate(fast.client)
    await alice.request(
        fast.client,
        f"{CM3}/recipient-update",
        {"updates": [{"recipient_did": carol.did, "action": "add"}]},
    )
    for recipient, text in ((alice, "for alice"), (carol, "for carol"), (carol, "again")):
        packed = await forward_to(BASE_URL, recipient, {"type": BASIC, "body": {"content": text}})
        assert (await fast.post(packed)).status_code == 202

    everything = await alice.request(fast.client, f"{PICKUP}/status-request")
    assert everything["body"]["message_count"] == 3
    only = await alice.request(
        fast.client, f"{PICKUP}/status-request", {"recipient_did": carol.did}
    )
    assert only["body"]["message_count"] == 2 and only["body"]["recipient_did"] == carol.did
    delivery = await alice.request(
        fast.client, f"{PICKUP}/delivery-request", {"limit": 10, "recipient_did": carol.did}
    )
    assert delivery["body"] == {"recipient_did": carol.did}
    texts = [
        (await carol.unpack(json.dumps(a["data"]["json"])))["body"]["content"]
        for a in delivery["attachments"]
    ]
    assert sorted(texts) == ["again", "for carol"]
