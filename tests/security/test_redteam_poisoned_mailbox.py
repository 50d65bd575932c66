"""Red team: a stored message must never make its mailbox unreadable.

A forward's base64 attachment (v2) or string `msg` (v1) is opaque when it arrives, so the
size and depth checks on the envelope do not see what it decodes to. Pickup used to parse
each stored message as JSON to embed it: bytes that decode to thousands of nested arrays
(RecursionError) or a 5,000-digit number (ValueError) made every delivery-request of that
mailbox a 500 until the message expired. Anyone could do it with one anonymous forward
to a known recipient DID. Now such a message is delivered as base64 (v2) or text (v1),
byte for byte, next to the others.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import httpx
import pytest

from dovecote.didcomm.v1 import envelope
from security.flood import AnonPacker, b64, forward_message
from support.agent import PICKUP, Agent
from support.server import ServerProcess, running_server
from support.v1agent import V1Agent, msg, post_raw

ENCRYPTED = "application/didcomm-encrypted+json"
POISON = {
    "deep": b"[" * 50_000,
    "digits": b"[" + b"1" * 5000 + b"]",
    "almost-deep": b"[" * 900 + b"]" * 900,
}


@pytest.fixture(scope="module")
def mailbox_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"DOVECOTE_RATE_LIMIT_IP": "100000", "DOVECOTE_RATE_LIMIT_IP_BURST": "100000"}
    with running_server(tmp_path_factory.mktemp("redteam-mailbox"), env=env) as server:
        yield server


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def test_v2_mailbox_stays_readable_after_hostile_attachments(
    mailbox_server: ServerProcess,
) -> None:
    server = mailbox_server
    async with httpx.AsyncClient(timeout=30) as client:
        victim = Agent.create(server.base_url, mediator_did=server.did)
        await victim.mediate(client)
        packer = await AnonPacker.for_mediator(server.did)
        for payload in [*POISON.values(), b'{"ciphertext":"fine"}']:
            forward = forward_message(server.did, victim.did)
            forward["attachments"] = [{"id": "a", "data": {"base64": b64(payload)}}]
            answer = await client.post(
                server.base_url + "/",
                content=packer.pack(forward),
                headers={"content-type": ENCRYPTED},
            )
            assert answer.status_code == 202, answer.text[:200]
        packed = await victim.pack(victim.message(f"{PICKUP}/delivery-request", {"limit": 10}))
        answer = await client.post(
            server.base_url + "/", content=packed, headers={"content-type": ENCRYPTED}
        )
        assert answer.status_code == 200, (answer.status_code, answer.text[:200])
        delivery = await victim.unpack(answer.text)
    assert delivery["type"] == f"{PICKUP}/delivery"
    got = [a["data"] for a in delivery["attachments"]]
    assert len(got) == 4
    assert [_unb64(d["base64"]) for d in got[:3]] == list(POISON.values())
    assert got[3] == {"json": {"ciphertext": "fine"}}


def test_v1_mailbox_stays_readable_after_a_hostile_msg(mailbox_server: ServerProcess) -> None:
    server = mailbox_server
    agent = V1Agent(server.base_url)
    agent.connect()
    agent.mediate()
    assert agent.add_key(agent.verkey)["updated"][0]["result"] == "success"
    # Brackets inside the forward's strings already count against the envelope's bounds
    # (the deep payloads are 400 on arrival); digits do not.
    poison = [POISON["digits"], b"1" * 5000]
    for payload in poison:
        forward = msg(
            "routing/1.0/forward", to=envelope.to_did_key(agent.verkey), msg=payload.decode()
        )
        sent = envelope.pack(json.dumps(forward).encode(), [agent.routing_key], None)
        assert post_raw(server.base_url, sent).status_code == 202
    delivery = agent.ask(msg("messagepickup/2.0/delivery-request", limit=10))
    assert delivery["@type"].endswith("/delivery"), delivery
    assert [a["data"]["json"] for a in delivery["~attach"]] == [p.decode() for p in poison]
