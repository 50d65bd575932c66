"""Every envelope our packing layer writes says `application/didcomm-encrypted+json`.

didcomm-messaging writes another value into authcrypt headers; the fix lives in
dovecote.didcomm.packing and both the mediator and the client use it. SICPA's library
(independent of ours) must still decrypt what we produce.
"""

from __future__ import annotations

from pathlib import Path

from aries_askar import Key, KeyAlg

from dovecote.client.identity import ClientIdentity, make_did
from dovecote.client.packing import Packer as ClientPacker
from dovecote.didcomm.identity import load_or_create
from dovecote.didcomm.packing import Packer
from support.agent import Agent
from support.jwe import assert_encrypted_typ


async def test_mediator_authcrypt_reply_has_the_spec_media_type(tmp_path: Path) -> None:
    packer = Packer(load_or_create(tmp_path, ["http://m.example"]))
    await packer.start()
    agent = Agent.create("http://m.example", packer.identity.did)
    packed = await packer.pack_for(
        {
            "id": "1",
            "typ": "application/didcomm-plain+json",
            "type": "https://didcomm.org/trust-ping/2.0/ping-response",
            "from": packer.identity.did,
            "to": [agent.did],
            "body": {},
        },
        agent.did,
    )
    assert_encrypted_typ(packed, "ECDH-1PU")
    plain = await agent.unpack(packed)
    assert plain["id"] == "1"


async def test_client_authcrypt_and_anoncrypt_have_the_spec_media_type(tmp_path: Path) -> None:
    mediator = Packer(load_or_create(tmp_path, ["http://m.example"]))
    await mediator.start()
    signing, agreement = Key.generate(KeyAlg.ED25519), Key.generate(KeyAlg.X25519)
    client = ClientPacker(ClientIdentity(signing, agreement, make_did(signing, agreement, [])))
    await client.start()
    message = {
        "id": "2",
        "type": "https://didcomm.org/trust-ping/2.0/ping",
        "from": client.identity.did,
        "to": [mediator.identity.did],
        "body": {},
    }
    authcrypt = await client.pack(message, mediator.identity.did, client.identity.did)
    assert_encrypted_typ(authcrypt, "ECDH-1PU")
    assert (await mediator.unpack(authcrypt)).sender == client.identity.did
    anoncrypt = await client.pack(message | {"from": None}, mediator.identity.did, None)
    assert_encrypted_typ(anoncrypt, "ECDH-ES")
