"""DID -> outbound route: endpoint choice, routing-key wrapping, private-address guard."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from dovecote.delivery.outbound import Policy
from dovecote.didcomm import identity
from dovecote.didcomm.endpoints import Endpoints, is_private_host
from dovecote.didcomm.packing import Packer
from dovecote.errors import UnknownRecipient
from dovecote.ops.settings import Settings
from support.agent import Agent
from support.dns import ScriptedDNS

PUBLIC = "93.184.216.34"  # resolved, never connected to


@pytest.fixture
def dns() -> Iterator[ScriptedDNS]:
    """agent.example and mediator.example resolve to a public address."""
    server = ScriptedDNS(
        {"agent.example": [PUBLIC], "mediator.example": [PUBLIC], "inside.example": ["10.0.0.7"]}
    ).start()
    yield server
    server.stop()


@pytest.fixture
async def packer(tmp_path: Path) -> Packer:
    ident = identity.load_or_create(
        tmp_path / "identity.json", ["http://127.0.0.1:8080", "ws://127.0.0.1:8080/ws"]
    )
    packer = Packer(ident)
    await packer.start()
    return packer


def endpoints(packer: Packer, **values: object) -> Endpoints:
    """Endpoints as the server builds them from these settings."""
    settings = Settings(host="127.0.0.1", port=8080, **values)  # type: ignore[arg-type]
    policy = Policy.from_settings(settings)
    return Endpoints(packer, policy, [settings.base_url, settings.ws_url])


def test_private_hosts() -> None:
    for host in (
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "169.254.1.1",
        "::1",
        "[::1]",
        "localhost",
        "0.0.0.0",
        "fd00::1",
    ):
        assert is_private_host(host), host
    for host in ("8.8.8.8", "agent.example", "2001:4860:4860::8888"):
        assert not is_private_host(host), host


async def test_routes(packer: Packer, dns: ScriptedDNS) -> None:
    public = endpoints(packer, outbound_dns_server=dns.address)
    allowed = endpoints(packer, outbound_allow_private=True)
    remote = Agent.create("http://x", endpoint="https://agent.example/inbox")
    route = await public.route(remote.did, b'{"a":1}')
    assert (route.uri, route.payload, route.local) == (
        "https://agent.example/inbox",
        b'{"a":1}',
        False,
    )
    assert route.origin == "https://agent.example/"
    # The URI is kept as the DID document names it, in canonical form.
    odd = Agent.create("http://x", endpoint="HTTPS://Agent.Example:443")
    assert (await public.route(odd.did, b"{}")).uri == "https://agent.example/"
    # Names that do not resolve, or resolve to a private address, are refused now.
    for endpoint in (
        "https://nowhere.example/",
        "https://inside.example/",
        "https://user:pw@agent.example/",
    ):
        refused = Agent.create("http://x", endpoint=endpoint)
        with pytest.raises(UnknownRecipient):
            await public.route(refused.did, b"{}")

    loopback = Agent.create("http://x", endpoint="http://127.0.0.1:9/")
    with pytest.raises(UnknownRecipient, match="private"):
        await public.route(loopback.did, b"{}")
    assert (await allowed.route(loopback.did, b"{}")).uri == "http://127.0.0.1:9/"

    ours = Agent.create("http://127.0.0.1:8080", packer.identity.did, via_mediator=True)
    assert (await public.route(ours.did, b"{}")).local

    for did in ("did:web:example.com", "did:peer:2.garbage", Agent.create("http://x").did):
        with pytest.raises(UnknownRecipient):
            await public.route(did, b"{}")


async def test_routing_keys_wrap_in_forwards(packer: Packer, dns: ScriptedDNS) -> None:
    mediator = Agent.create("http://x")
    # Bob's DID document: endpoint https://mediator.example/, routing key = his mediator.
    bob = Agent.create("https://mediator.example", mediator.did, via_mediator=True)
    inner = json.dumps({"protected": "x", "ciphertext": "y", "recipients": []}).encode()
    route = await endpoints(packer, outbound_dns_server=dns.address).route(bob.did, inner)
    assert route.uri == "https://mediator.example/" and not route.local
    forward = await mediator.unpack(route.payload)  # anoncrypt, for the mediator's key
    assert forward["type"] == "https://didcomm.org/routing/2.0/forward"
    assert forward["body"]["next"] == bob.did
    assert forward["attachments"][0]["data"]["json"] == json.loads(inner)
