"""Floods of distinct maximum-size inputs, and the server's resident memory around them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from aries_askar import Key, KeyAlg, ecdh
from did_peer_2 import KeySpec
from didcomm_messaging.crypto.backend.askar import AskarCryptoService, AskarSecretKey
from didcomm_messaging.crypto.backend.basic import InMemorySecretsManager
from didcomm_messaging.packaging import PackagingService

from dovecote.didcomm.peer import build_resolver, multikey

ENCRYPTED = "application/didcomm-encrypted+json"
PLAINTEXT = "application/didcomm-plain+json"
FORWARD = "https://didcomm.org/routing/2.0/forward"
PING = "https://didcomm.org/trust-ping/2.0/ping"

_CRYPTO = AskarCryptoService()
_PACKAGING: PackagingService[Any, Any] = PackagingService()
# Cached: the mediator's DID is resolved for every envelope packed for it.
_RESOLVER = build_resolver()


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc (what the kernel charges it now)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Peer:
    did: str
    secrets: InMemorySecretsManager


_SHARED_KEYS = (Key.generate(KeyAlg.ED25519), Key.generate(KeyAlg.X25519))


def _keys_part(signing: Key, agreement: Key) -> str:
    return "".join(
        f".{k.purpose.value}{k.material}"
        for k in (
            KeySpec.verification(multikey(signing)),
            KeySpec.key_agreement(multikey(agreement)),
        )
    )


def peer_did(
    size: int,
    signing: Key | None = None,
    agreement: Key | None = None,
    uri_host: str = "http://127.0.0.1:9",
) -> Peer:
    """A distinct did:peer:2 of at most `size` bytes (a few under): its one service URL
    is padded to fit. Built by hand (the did_peer_2 encoding: base64url of the abbreviated
    service JSON) because generating 10,000 through the library takes too long."""
    keys = _keys_part(signing or _SHARED_KEYS[0], agreement or _SHARED_KEYS[1])
    head = f"did:peer:2{keys}.S"
    # 4 base64url characters per 3 JSON bytes; the JSON around the URL is ~40 bytes.
    room = (size - len(head)) * 3 // 4 - 60 - len(uri_host)
    uri = f"{uri_host}/{uuid.uuid4().hex}{'a' * max(0, room - 33)}"
    service = json.dumps(
        {"t": "dm", "s": {"uri": uri, "a": ["didcomm/v2"]}}, separators=(",", ":")
    ).encode()
    did = head + base64.urlsafe_b64encode(service).decode().rstrip("=")
    assert len(did) <= size, len(did)
    return Peer(did, InMemorySecretsManager())


class AnonPacker:
    """Anoncrypt (ECDH-ES+A256KW, XC20P) for the mediator, fast enough for 10,000.

    One content key, wrapped once for the mediator's key-agreement key; each message is
    then one AEAD encryption with a fresh nonce. The envelopes are ordinary JWEs the
    mediator decrypts as any other (only a test client would share a content key)."""

    def __init__(self, protected: bytes, recipients: list[dict[str, Any]], cek: Key) -> None:
        self.protected, self.recipients, self.cek = protected, recipients, cek

    @classmethod
    async def for_mediator(cls, mediator_did: str) -> AnonPacker:
        kid = f"{mediator_did}#key-2"
        recipient = await _PACKAGING.recip_for_kid_or_default_for_did(_CRYPTO, _RESOLVER, kid)
        cek = Key.generate(KeyAlg.XC20P)
        epk = Key.generate(KeyAlg.X25519, ephemeral=True)
        apv = hashlib.sha256(recipient.kid.encode()).digest()
        wrapped = ecdh.EcdhEs("ECDH-ES+A256KW", None, apv).sender_wrap_key(
            KeyAlg.A256KW, epk, recipient.key, cek
        )
        header = {"typ": ENCRYPTED, "alg": "ECDH-ES+A256KW", "enc": "XC20P", "apv": b64(apv)}
        recipients = [
            {
                "encrypted_key": b64(wrapped.ciphertext),
                "header": {"kid": recipient.kid, "epk": json.loads(epk.get_jwk_public())},
            }
        ]
        return cls(b64(json.dumps(header).encode()).encode(), recipients, cek)

    def pack(self, message: dict[str, Any]) -> bytes:
        data = json.dumps(message, separators=(",", ":")).encode()
        sealed = self.cek.aead_encrypt(data, aad=self.protected)
        return json.dumps(
            {
                "protected": self.protected.decode(),
                "recipients": self.recipients,
                "iv": b64(sealed.nonce),
                "ciphertext": b64(sealed.ciphertext),
                "tag": b64(sealed.tag),
            }
        ).encode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forward_message(mediator_did: str, next_did: str, **extra: Any) -> dict[str, Any]:
    """A forward plaintext to `next_did` with a small opaque attachment."""
    return {
        "id": str(uuid.uuid4()),
        "typ": PLAINTEXT,
        "type": FORWARD,
        "to": [mediator_did],
        "body": {"next": next_did},
        "attachments": [
            {
                "id": uuid.uuid4().hex,
                "media_type": ENCRYPTED,
                "data": {
                    "json": {
                        "protected": "e30",
                        "iv": "",
                        "tag": "",
                        "recipients": [],
                        "ciphertext": uuid.uuid4().hex,
                    }
                },
            }
        ],
        **extra,
    }


def anon_forward(packer: AnonPacker, mediator_did: str, next_did: str) -> bytes:
    """An anonymous forward to `next_did`."""
    return packer.pack(forward_message(mediator_did, next_did))


# didcomm (the reference implementation) ships no py.typed: to mypy its classes are Any.
class _AnySecrets(InMemorySecretsManager):  # type: ignore[misc]
    """One X25519 key under whatever key id is asked for (many DIDs, one key pair)."""

    def __init__(self, key: Key) -> None:
        super().__init__()
        self.key = key

    async def get_secret_by_kid(self, kid: str) -> AskarSecretKey | None:
        return AskarSecretKey(self.key, kid)


_SENDER_SECRETS = _AnySecrets(_SHARED_KEYS[1])


async def authcrypt_ping(mediator_did: str, sender_did: str) -> bytes:
    """An authcrypted trust ping from `sender_did` (the mediator must resolve it to find
    the sender's key). Every sender DID embeds the same key pair."""
    message = {
        "id": str(uuid.uuid4()),
        "typ": PLAINTEXT,
        "type": PING,
        "from": sender_did,
        "to": [mediator_did],
        "body": {"response_requested": False},
    }
    data = json.dumps(message, separators=(",", ":")).encode()
    packed = await _PACKAGING.pack(
        _CRYPTO, _RESOLVER, _SENDER_SECRETS, data, [f"{mediator_did}#key-2"], f"{sender_did}#key-2"
    )
    return bytes(packed)


async def authcrypt(mediator_did: str, sender_did: str, message: dict[str, Any]) -> bytes:
    """Any plaintext, authcrypted from `sender_did` (json.dumps escapes lone surrogates,
    which SICPA's packer cannot send)."""
    data = json.dumps(
        {
            "id": str(uuid.uuid4()),
            "typ": PLAINTEXT,
            "from": sender_did,
            "to": [mediator_did],
            "return_route": "all",
            **message,
        },
        separators=(",", ":"),
    ).encode()
    packed = await _PACKAGING.pack(
        _CRYPTO, _RESOLVER, _SENDER_SECRETS, data, [f"{mediator_did}#key-2"], f"{sender_did}#key-2"
    )
    return bytes(packed)


async def unpack_reply(raw: bytes) -> dict[str, Any]:
    """A reply the mediator authcrypted for one of our sender DIDs."""
    data, _meta = await _PACKAGING.unpack(_CRYPTO, _RESOLVER, _SENDER_SECRETS, raw)
    message: dict[str, Any] = json.loads(data)
    return message


async def flood(url: str, bodies: list[bytes], concurrency: int = 32) -> dict[int, int]:
    """POST every body (`concurrency` at a time); status -> count. aiohttp rather than
    httpx: its per-request overhead is a fraction, and the client must not be the limit."""
    import aiohttp

    counts: dict[int, int] = {}
    queue = list(reversed(bodies))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                async with session.post(
                    url, data=body, headers={"content-type": ENCRYPTED}
                ) as response:
                    await response.read()
                    counts[response.status] = counts.get(response.status, 0) + 1

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return counts


if __name__ == "__main__":  # measuring by hand: python tests/security/flood.py URL PID N
    import sys

    async def main() -> None:
        url, pid, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        size = int(os.environ.get("FLOOD_DID_BYTES", "4096"))
        async with httpx.AsyncClient() as client:
            mediator = (await client.get(url + "/invitation")).json()["from"]
        t0 = time.monotonic()
        packer = await AnonPacker.for_mediator(mediator)
        bodies = [anon_forward(packer, mediator, peer_did(size).did) for _ in range(count)]
        t1 = time.monotonic()
        before = rss_bytes(pid)
        counts = await flood(url + "/", bodies)
        after = rss_bytes(pid)
        print(
            f"packed {count} in {t1 - t0:.1f}s, flood {time.monotonic() - t1:.1f}s, "
            f"{counts}, RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
        )

    asyncio.run(main())
