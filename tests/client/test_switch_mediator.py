"""Moving a client from one mediator to another (issue 17): the new invitation's mediator
is the one asked, and the client's DIDs are registered there."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from client.conftest import ClientFactory, invitation_url
from dovecote.client.identity import load
from support.server import ServerProcess


@pytest.fixture
def two_relays(server_factory: Callable[..., ServerProcess]) -> list[ServerProcess]:
    servers = [server_factory(start=False).start(wait=False) for _ in range(2)]
    for server in servers:  # both start at once: half the wait on a busy machine
        server.wait_ready()
    return servers


async def test_mediate_with_another_mediator_switches_and_back(
    two_relays: list[ServerProcess], client_factory: ClientFactory, tmp_path: Path
) -> None:
    a, b = two_relays
    alice = await client_factory(a, name="alice")
    first = alice.did
    extra = await client_factory(name="extra")  # another DID alice wants held for her
    assert (await alice.add_recipients([extra.identity.did]))[extra.identity.did] == "success"

    second = await alice.mediate(invitation_url(b))

    assert second != first
    med = alice.identity.mediation
    assert med is not None and med.mediator_did == b.did
    assert all(f"127.0.0.1:{b.port}" in url for url in med.endpoints)
    # B (not A) granted mediation and holds both the new routed DID and the extra DID.
    assert set(await alice.recipients()) == {second, extra.identity.did}
    assert load(tmp_path / "alice").mediation.mediator_did == b.did  # type: ignore[union-attr]

    # A message to the new DID travels through B and is picked up there.
    bob = await client_factory(name="bob")
    message_id = await bob.send(second, "via B")
    [item] = await bob.wait_sent([message_id], max_wait=20)
    assert item.state == "sent"
    assert any(f"127.0.0.1:{b.port}" in url for url in item.endpoints), item.endpoints
    received = await alice.drain()
    assert [m.body["content"] for m in received] == ["via B"]

    # Back to A while B is down: B cannot be asked, the DIDs come from the local record.
    b.kill()
    third = await alice.mediate(invitation_url(a))
    assert third != second and alice.identity.mediation.mediator_did == a.did  # type: ignore[union-attr]
    assert set(await alice.recipients()) >= {third, extra.identity.did}
