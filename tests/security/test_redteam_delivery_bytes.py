"""Red team: one delivery-request must not build a reply as large as the mailbox.

Pickup's `limit` counts messages (up to 1,000), and a mailbox may hold MAILBOX_MAX_BYTES
(1 GiB). Any mediatee (open mediation) could fill its own mailbox and ask for all of it:
60 messages of 3.3 MB made one delivery-request answer 254 MiB and took the server from
127 to 2,460 MiB RSS; a few of those in parallel exhaust the host. A delivery now stops
once it holds MAX_BODY_BYTES (at least one message); the recipient asks again for the
rest, and nothing is lost. Both DIDComm versions, real server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx
import pytest

from security.flood import AnonPacker, b64, forward_message
from support.agent import PICKUP, Agent
from support.server import ServerProcess, running_server
from support.v1agent import V1Agent, forward_for, msg, post_raw

ENCRYPTED = "application/didcomm-encrypted+json"
BUDGET = 64 * 1024
MESSAGES = 6  # of ~20 KB: at most 3 fit the budget


@pytest.fixture(scope="module")
def small_deliveries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"DOVECOTE_MAX_BODY_BYTES": str(BUDGET)}
    with running_server(tmp_path_factory.mktemp("redteam-delivery"), env=env) as server:
        yield server


async def test_v2_delivery_stops_at_the_byte_budget(small_deliveries: ServerProcess) -> None:
    server = small_deliveries
    async with httpx.AsyncClient(timeout=30) as client:
        me = Agent.create(server.base_url, mediator_did=server.did)
        await me.mediate(client)
        packer = await AnonPacker.for_mediator(server.did)
        for n in range(MESSAGES):
            forward = forward_message(server.did, me.did)
            forward["attachments"][0]["data"]["json"]["ciphertext"] = b64(os.urandom(15_000))
            forward["attachments"][0]["id"] = str(n)
            answer = await client.post(
                server.base_url + "/",
                content=packer.pack(forward),
                headers={"content-type": ENCRYPTED},
            )
            assert answer.status_code == 202, answer.text[:200]
        seen: list[str] = []
        for _ in range(MESSAGES):
            delivery = await me.request(client, f"{PICKUP}/delivery-request", {"limit": 100})
            if delivery["type"] != f"{PICKUP}/delivery":
                break
            batch = delivery["attachments"]
            assert 1 <= len(batch) <= 3, len(batch)
            assert sum(len(json.dumps(a["data"]["json"])) for a in batch) <= BUDGET
            seen += [a["id"] for a in batch]
            await me.request(
                client, f"{PICKUP}/messages-received", {"message_id_list": [a["id"] for a in batch]}
            )
    assert len(set(seen)) == MESSAGES


def test_v1_delivery_stops_at_the_byte_budget(small_deliveries: ServerProcess) -> None:
    server = small_deliveries
    agent = V1Agent(server.base_url)
    agent.connect()
    agent.mediate()
    assert agent.add_key(agent.verkey)["updated"][0]["result"] == "success"
    for _ in range(MESSAGES):
        sent = forward_for(agent.routing_key, agent.verkey, b64(os.urandom(15_000)))
        assert post_raw(server.base_url, sent).status_code == 202
    delivery = agent.ask(msg("messagepickup/2.0/delivery-request", limit=100))
    assert delivery["@type"].endswith("/delivery"), delivery
    assert 1 <= len(delivery["~attach"]) <= 3, len(delivery["~attach"])
