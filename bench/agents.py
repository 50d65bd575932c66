"""DIDComm v2 agents for the load generator, on didcomm-messaging + askar.

The benchmark drives Dovecote the way an agent does, but packs every forward before the
clock starts: packing costs about as much as the mediator's unpack, and a load generator
that packs on the fly measures itself. Keys and the mediator identity are kept in
bench/.cache so packed forwards can be reused across runs (see `forwards.py`).
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from typing import Any

from aries_askar import Key, KeyAlg
from didcomm_messaging.crypto.backend.askar import AskarSecretKey
from didcomm_messaging.crypto.backend.basic import InMemorySecretsManager
from didcomm_messaging.packaging import PackagingService

from dovecote.didcomm.packing import DIDCommCrypto
from dovecote.didcomm.peer import build_resolver, peer_did

PLAINTEXT = "application/didcomm-plain+json"
ENCRYPTED = "application/didcomm-encrypted+json"
FORWARD = "https://didcomm.org/routing/2.0/forward"
BASIC = "https://didcomm.org/basicmessage/2.0/message"
CM3 = "https://didcomm.org/coordinate-mediation/3.0"
PICKUP = "https://didcomm.org/messagepickup/3.0"


_RESOLVER = build_resolver()
_CRYPTO = DIDCommCrypto()
_PACKAGING: PackagingService[Any, AskarSecretKey] = PackagingService()


@dataclass
class BenchAgent:
    """Keys and a did:peer:2 without services (a mailbox owner or a sender)."""

    signing: Key
    agreement: Key
    did: str
    secrets: InMemorySecretsManager

    @classmethod
    async def create(cls, seed: dict[str, str] | None = None) -> BenchAgent:
        if seed:
            signing = Key.from_secret_bytes(KeyAlg.ED25519, base64.b64decode(seed["ed25519"]))
            agreement = Key.from_secret_bytes(KeyAlg.X25519, base64.b64decode(seed["x25519"]))
        else:
            signing, agreement = Key.generate(KeyAlg.ED25519), Key.generate(KeyAlg.X25519)
        did = peer_did(signing, agreement, [])
        secrets = InMemorySecretsManager()
        await secrets.add_secret(AskarSecretKey(signing, f"{did}#key-1"))
        await secrets.add_secret(AskarSecretKey(agreement, f"{did}#key-2"))
        return cls(signing, agreement, did, secrets)

    def seed(self) -> dict[str, str]:
        return {
            "ed25519": base64.b64encode(self.signing.get_secret_bytes()).decode(),
            "x25519": base64.b64encode(self.agreement.get_secret_bytes()).decode(),
        }

    async def pack(self, message: dict[str, Any], to: str, anonymous: bool = False) -> bytes:
        data = json.dumps(message, separators=(",", ":")).encode()
        packed = await _PACKAGING.pack(
            _CRYPTO, _RESOLVER, self.secrets, data, [to], None if anonymous else self.did
        )
        return bytes(packed)

    async def unpack(self, raw: bytes | str) -> dict[str, Any]:
        data, _meta = await _PACKAGING.unpack(_CRYPTO, _RESOLVER, self.secrets, raw)
        message: dict[str, Any] = json.loads(data)
        return message

    def message(
        self, msg_type: str, to: str, body: dict[str, Any] | None = None, return_route: bool = True
    ) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "typ": PLAINTEXT,
            "type": msg_type,
            "from": self.did,
            "to": [to],
            "body": body or {},
        }
        if return_route:
            msg["return_route"] = "all"
        return msg

    async def request(self, msg_type: str, to: str, body: dict[str, Any] | None = None) -> bytes:
        """An authcrypted request to the mediator asking for a return-routed answer."""
        return await self.pack(self.message(msg_type, to, body), to)


async def make_forward(
    recipient_did: str, mediator_did: str, index: int, pad: int = 200, kid: str = "#key-2"
) -> bytes:
    """What any third party sends: a message anoncrypted for the recipient, wrapped in a
    forward anoncrypted for the mediator's key-agreement key."""
    sender = _ANON
    inner_msg = {
        "id": f"m-{index}-{uuid.uuid4().hex[:8]}",
        "typ": PLAINTEXT,
        "type": BASIC,
        "to": [recipient_did],
        "body": {"content": "x" * pad, "n": index},
    }
    inner = await sender.pack(inner_msg, recipient_did, anonymous=True)
    forward = {
        "id": str(uuid.uuid4()),
        "typ": PLAINTEXT,
        "type": FORWARD,
        "to": [mediator_did],
        "body": {"next": recipient_did},
        "attachments": [
            {"id": uuid.uuid4().hex, "media_type": ENCRYPTED, "data": {"json": json.loads(inner)}}
        ],
    }
    return await sender.pack(forward, f"{mediator_did}{kid}", anonymous=True)


class _Anonymous:
    async def pack(self, message: dict[str, Any], to: str, anonymous: bool = True) -> bytes:
        data = json.dumps(message, separators=(",", ":")).encode()
        packed = await _PACKAGING.pack(
            _CRYPTO, _RESOLVER, InMemorySecretsManager(), data, [to], None
        )
        return bytes(packed)


_ANON = _Anonymous()
