"""Red team: a forward's `expires_time` that is a number but no time.

JSON allows `10**400` (Python parses it as an int) and the envelope parser accepts
`NaN`/`Infinity`; `float(10**400)` raised OverflowError, so an anonymous forward to any
registered recipient with such an `expires_time` was a 500. Now each is 400
`e.m.msg.malformed` and nothing is queued; a real time still caps the TTL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from security.flood import AnonPacker, forward_message
from support.agent import PICKUP, Agent
from support.server import ServerProcess, running_server

ENCRYPTED = "application/didcomm-encrypted+json"


@pytest.fixture(scope="module")
def expiry_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("redteam-expiry")) as server:
        yield server


async def test_expires_time_must_be_a_time(expiry_server: ServerProcess) -> None:
    server = expiry_server
    async with httpx.AsyncClient(timeout=30) as client:
        victim = Agent.create(server.base_url, mediator_did=server.did)
        await victim.mediate(client)
        packer = await AnonPacker.for_mediator(server.did)
        for value in (10**400, -(10**400), float("nan"), float("inf")):
            answer = await client.post(
                server.base_url + "/",
                headers={"content-type": ENCRYPTED},
                content=packer.pack(forward_message(server.did, victim.did, expires_time=value)),
            )
            assert answer.status_code == 400, (str(value)[:12], answer.text[:200])
            assert answer.json()["error"] == "e.m.msg.malformed"
        fine = await client.post(
            server.base_url + "/",
            headers={"content-type": ENCRYPTED},
            content=packer.pack(
                forward_message(server.did, victim.did, expires_time=int(time.time()) + 3600)
            ),
        )
        assert fine.status_code == 202
        status = await victim.request(client, f"{PICKUP}/status-request", {})
    assert status["body"]["message_count"] == 1
