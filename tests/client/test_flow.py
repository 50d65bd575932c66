"""The client end to end against a real Dovecote: identity, mediation, send, pickup."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import httpx
import pytest

from client.conftest import ClientFactory, invitation_url
from dovecote.client import Client, ClientConfig, InvalidInvitation, NotInitialised, Received
from dovecote.client.identity import IDENTITY_FILE
from support.server import ServerProcess


async def test_identity_is_private_and_stable(
    tmp_path: Path, client_factory: ClientFactory
) -> None:
    client = await client_factory(name="alice")
    path = tmp_path / "alice" / IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert client.did.startswith("did:peer:2.")
    async with Client(ClientConfig(data_dir=tmp_path / "alice")) as again:
        assert again.did == client.did
    with pytest.raises(NotInitialised):
        async with Client(ClientConfig(data_dir=tmp_path / "nobody")):
            pass


async def test_invalid_invitation(client_factory: ClientFactory) -> None:
    client = await client_factory()
    for url in ("http://x/", "http://x/?_oob=!!!", "http://x/?_oob=e30"):
        with pytest.raises(InvalidInvitation):
            await client.mediate(url)


@pytest.mark.parametrize("form", ["routing-keys", "mediator-did"])
async def test_send_and_pickup(
    relay: ServerProcess, client_factory: ClientFactory, form: str
) -> None:
    alice = await client_factory(relay, service_form=form)
    bob = await client_factory(relay)
    assert alice.identity.mediation is not None
    assert alice.did == alice.identity.mediation.routed_did
    assert alice.did in await alice.recipients()

    ids = [await bob.send(alice.did, f"hello {i}") for i in range(3)]
    counts = await bob.flush(max_wait=10)
    assert counts["sent"] == 3 and counts["pending"] == 0

    status = await alice.status()
    assert status.message_count == 3
    got = await alice.fetch()
    assert sorted(m.id for m in got) == sorted(ids)
    assert {m.body["content"] for m in got} == {"hello 0", "hello 1", "hello 2"}
    assert all(m.sender == bob.did for m in got)
    assert (await alice.status()).message_count == 0


async def test_recipient_update_and_removal(
    relay: ServerProcess, client_factory: ClientFactory
) -> None:
    alice = await client_factory(relay)
    other = await client_factory()  # a DID alice also receives for
    result = await alice.add_recipients([other.did])
    assert result == {other.did: "success"}
    assert other.did in await alice.recipients()
    assert await alice.remove_recipients([other.did]) == {other.did: "success"}
    assert other.did not in await alice.recipients()


async def test_duplicate_redelivery_is_dropped(
    relay: ServerProcess, client_factory: ClientFactory
) -> None:
    """The same plaintext id packed twice (two stored copies) reaches the app once."""
    alice = await client_factory(relay)
    bob = await client_factory(relay)
    plaintext = bob.plaintext(alice.did, "once")
    # The outbox itself refuses a second row with the same id...
    await bob.send_many([(alice.did, plaintext)])
    await bob.send_many([(alice.did, plaintext)])
    await bob.flush(max_wait=10)
    assert (await bob.store.counts())["sent"] == 1
    # ...so re-pack it by hand: new ciphertext, new digest, stored again by the mediator.
    route, endpoints = await bob.route(alice.did)
    again = await bob.packer.pack_routed(plaintext, route, bob.did)
    async with httpx.AsyncClient() as http:
        assert (
            await http.post(
                endpoints[0],
                content=again,
                headers={"content-type": "application/didcomm-encrypted+json"},
            )
        ).status_code == 202
    assert (await alice.status()).message_count == 2
    got = await alice.drain()
    assert [m.id for m in got] == [plaintext["id"]]
    assert (await alice.status()).message_count == 0


async def test_live_receive(relay: ServerProcess, client_factory: ClientFactory) -> None:
    alice = await client_factory(relay)
    bob = await client_factory(relay)
    received: list[Received] = []
    stop = asyncio.Event()
    task = asyncio.create_task(alice.live(received.append, stop))
    await asyncio.wait_for(alice.inbox().live_on.wait(), 10)
    await bob.send(alice.did, "live one")
    await bob.flush(max_wait=10)
    for _ in range(100):
        if received:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert [m.body["content"] for m in received] == ["live one"]
    assert (await alice.status()).message_count == 0


async def test_live_mode_misses_nothing_across_the_switch(
    relay: ServerProcess, client_factory: ClientFactory
) -> None:
    # Issue 12.2: turning live mode on pushes only what arrives afterwards; the client
    # drains what was queued with delivery-request. Messages queued before, sent while the
    # switch happens and sent after it are each handed over exactly once.
    alice = await client_factory(relay)
    bob = await client_factory(relay)
    before = [f"before {i}" for i in range(30)]
    for text in before:
        await bob.send(alice.did, text)
    await bob.flush(max_wait=10)
    assert (await alice.status()).message_count == len(before)

    received: list[Received] = []
    stop, sending = asyncio.Event(), asyncio.Event()
    during: list[str] = []

    async def produce_during() -> None:
        for i in range(40):
            text = f"during {i}"
            await bob.send(alice.did, text)
            during.append(text)
            if i == 5:
                sending.set()
            await asyncio.sleep(0.01)
        await bob.flush(max_wait=10)

    producer = asyncio.create_task(produce_during())
    await asyncio.wait_for(sending.wait(), 10)
    task = asyncio.create_task(alice.live(received.append, stop))
    await asyncio.wait_for(alice.inbox().live_on.wait(), 10)
    await producer
    after = [f"after {i}" for i in range(20)]
    for text in after:
        await bob.send(alice.did, text)
    await bob.flush(max_wait=10)
    expected = before + during + after
    for _ in range(400):
        if len(received) >= len(expected):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # would a duplicate still arrive?
    stop.set()
    await asyncio.wait_for(task, 10)
    contents = [m.body["content"] for m in received]
    assert sorted(contents) == sorted(expected), "missed or duplicated across the switch"
    assert (await alice.status()).message_count == 0


async def test_invitation_url_helper(relay: ServerProcess) -> None:
    assert "_oob=" in invitation_url(relay)


async def test_batch_over_one_websocket(
    relay: ServerProcess, client_factory: ClientFactory
) -> None:
    alice = await client_factory(relay)
    carol = await client_factory(relay)
    bob = await client_factory(relay, send_transport="ws", flush_interval=5.0)
    batcher = bob.sender.ws
    assert batcher is not None

    ids = await bob.send_many([(alice.did, bob.plaintext(alice.did, f"ws {i}")) for i in range(50)])
    items = await bob.wait_sent(ids, max_wait=20)
    assert [i.state for i in items] == ["sent"] * 50
    assert (batcher.confirmed, batcher.unconfirmed) == (1, 0)

    # One bad envelope in the batch: the relay reports an error frame, so the batch is
    # not confirmed and every envelope is re-sent over HTTP (identical bytes, stored once).
    await carol.remove_recipients([carol.did])
    more = await bob.send_many(
        [
            (alice.did, bob.plaintext(alice.did, "ws 50")),
            (carol.did, bob.plaintext(carol.did, "nobody home")),
            (alice.did, bob.plaintext(alice.did, "ws 51")),
        ]
    )
    states = [i.state for i in await bob.wait_sent(more, max_wait=20)]
    assert states == ["sent", "failed", "sent"]
    assert batcher.unconfirmed == 1
    got = await alice.drain()
    assert sorted(m.body["content"] for m in got) == sorted(f"ws {i}" for i in range(52))
