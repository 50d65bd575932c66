"""A second independent client: the didcomm-messaging project's own quickstart helpers.

They speak Coordinate Mediation 3.0 and Pickup 3.0 their own way (mediator DID as the
service endpoint, routing_did read as a list, forward wrapping by the library's
RoutingService), so passing here means a real wallet built on that library works with
Dovecote unchanged.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from didcomm_messaging.quickstart import (
    fetch_relayed_messages,
    generate_did,
    setup_default,
    setup_relay,
)

from support.server import ServerProcess


async def test_quickstart_agent_mediates_receives_and_acknowledges(
    shared_server: ServerProcess,
) -> None:
    relay_did = shared_server.did
    alice_did, alice_keys = generate_did()
    alice = await setup_default(alice_did, alice_keys)
    routed = await setup_relay(alice, alice_did, relay_did, *alice_keys)
    assert routed is not None, "mediation was denied"

    bob_did, bob_keys = generate_did()
    bob = await setup_default(bob_did, bob_keys)
    texts = [f"quickstart message {i}" for i in range(3)]
    async with aiohttp.ClientSession() as http:
        for text in texts:
            packed = await bob.pack(
                {
                    "type": "https://didcomm.org/basicmessage/2.0/message",
                    "id": text,
                    "body": {"content": text},
                    "from": str(bob_did),
                    "to": [str(routed)],
                },
                to=str(routed),
                frm=str(bob_did),
            )
            # The library resolved Alice's routed DID to Dovecote and wrapped a forward.
            endpoint = packed.get_endpoint("http")
            assert endpoint.startswith(shared_server.base_url)
            async with http.post(
                endpoint,
                data=packed.message,
                headers={"content-type": "application/didcomm-encrypted+json"},
            ) as response:
                assert response.status == 202, await response.text()

    received: list[dict[str, Any]] = []

    async def collect(message: dict[str, Any]) -> None:
        received.append(message)

    await fetch_relayed_messages(alice, alice_did, relay_did, collect)
    assert sorted(m["body"]["content"] for m in received) == sorted(texts)
    # Acknowledged by the quickstart's messages-received: nothing left.
    received.clear()
    assert await fetch_relayed_messages(alice, alice_did, relay_did, collect) == []
    assert received == []
