"""Pack and unpack DIDComm v2 messages with didcomm-messaging (askar crypto).

Resolution, not crypto, dominates authcrypt unpack cost, so resolved DID documents are
cached (did:peer:2 documents are immutable: the DID is the document).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from aries_askar import Key
from didcomm_messaging import DIDCommMessaging
from didcomm_messaging.crypto import SecretsManager
from didcomm_messaging.crypto.backend.askar import AskarCryptoService, AskarSecretKey
from didcomm_messaging.crypto.backend.basic import InMemorySecretsManager
from didcomm_messaging.packaging import PackagingService
from didcomm_messaging.resolver import DIDResolver, PrefixResolver
from didcomm_messaging.resolver.peer import Peer2, Peer4
from didcomm_messaging.routing import RoutingService

from dovecote.didcomm.identity import Identity
from dovecote.errors import (
    MalformedMessage,
    NotEncrypted,
    UnpackFailed,
    UnresolvableDID,
)

RESOLVER_CACHE_SIZE = 10_000


class CachingResolver(DIDResolver):
    """An LRU cache in front of another resolver (only for immutable DID methods)."""

    def __init__(self, inner: DIDResolver, size: int = RESOLVER_CACHE_SIZE) -> None:
        self.inner = inner
        self.size = size
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def is_resolvable(self, did: str) -> bool:
        return did in self._cache or await self.inner.is_resolvable(did)

    async def resolve(self, did: str) -> dict[str, Any]:
        doc = self._cache.get(did)
        if doc is not None:
            self._cache.move_to_end(did)
            return doc
        doc = await self.inner.resolve(did)
        self._cache[did] = doc
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return doc


class Unpacked:
    """A decrypted plaintext message and who sent it (None when anonymous)."""

    __slots__ = ("message", "recipient_kid", "sender")

    def __init__(self, message: dict[str, Any], sender: str | None, recipient_kid: str) -> None:
        self.message = message
        self.sender = sender
        self.recipient_kid = recipient_kid


def build_resolver() -> DIDResolver:
    """did:peer:2 and did:peer:4 resolution, cached."""
    return CachingResolver(PrefixResolver({"did:peer:2": Peer2(), "did:peer:4": Peer4()}))


class Packer:
    """The mediator's DIDComm envelope operations."""

    def __init__(self, identity: Identity, resolver: DIDResolver | None = None) -> None:
        self.identity = identity
        self.secrets: SecretsManager[AskarSecretKey] = InMemorySecretsManager()
        self.resolver = resolver or build_resolver()
        self.crypto = AskarCryptoService()
        self.packaging: PackagingService[Any, AskarSecretKey] = PackagingService()
        self.dmp = DIDCommMessaging(
            crypto=self.crypto, secrets=self.secrets, resolver=self.resolver,
            packaging=self.packaging, routing=RoutingService(),
        )

    async def start(self) -> None:
        """Register the private keys under every DID the mediator has had."""
        for did in self.identity.dids:
            await self._add(self.identity.signing_key, f"{did}#key-1")
            await self._add(self.identity.agreement_key, f"{did}#key-2")

    async def _add(self, key: Key, kid: str) -> None:
        assert isinstance(self.secrets, InMemorySecretsManager)
        await self.secrets.add_secret(AskarSecretKey(key, kid))

    async def unpack(self, raw: bytes) -> Unpacked:
        """Decrypt one envelope addressed to this mediator."""
        try:
            envelope = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedMessage("body is not JSON") from exc
        if not isinstance(envelope, dict):
            raise MalformedMessage("body is not a JSON object")
        if not {"protected", "ciphertext", "recipients"} <= envelope.keys():
            raise NotEncrypted("expected a JWE (application/didcomm-encrypted+json)")
        try:
            result = await self.dmp.unpack(raw)
        except Exception as exc:  # the library raises several unrelated types
            raise _unpack_error(exc) from exc
        message = result.message
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise MalformedMessage("plaintext has no type")
        sender = None
        if result.sender_kid:
            sender = result.sender_kid.split("#", 1)[0]
            claimed = message.get("from")
            if claimed is not None and claimed != sender:
                raise UnpackFailed("plaintext 'from' does not match the sender's key")
        return Unpacked(message, sender, result.recipient_kid)

    async def pack_for(self, message: dict[str, Any], to: str) -> bytes:
        """Authcrypt a reply to `to` directly (no forward wrapping: it goes back this hop)."""
        try:
            packed = await self.packaging.pack(
                self.crypto, self.resolver, self.secrets,
                json.dumps(message, separators=(",", ":")).encode(), [to], self.identity.did,
            )
        except Exception as exc:
            raise _unpack_error(exc) from exc
        return bytes(packed)


def _unpack_error(exc: Exception) -> Exception:
    text = str(exc)
    lowered = text.lower()
    name = type(exc).__name__
    if "DID" in name or "resol" in lowered or "not found" in lowered or "did" in name.lower():
        return UnresolvableDID(f"could not resolve a DID: {text[:200]}")
    if "recipient" in lowered:
        return UnpackFailed("the message is not encrypted for this mediator")
    return UnpackFailed(f"could not decrypt the message: {text[:200]}")
