"""did:peer:2 identities and DID documents, one implementation for the mediator, the
client (dovecote.client) and the benchmark's agents.

Every identity here is an Ed25519 key (#key-1, verification) and an X25519 key (#key-2,
key agreement) in a did:peer:2, optionally with DIDCommMessaging services. Resolution,
not crypto, dominated authcrypt cost, so resolved documents are cached: did:peer
documents are immutable (the DID is the document).
"""

from __future__ import annotations

from typing import Any

from aries_askar import Key, KeyAlg
from did_peer_2 import KeySpec, generate
from didcomm_messaging.multiformats import multibase, multicodec
from didcomm_messaging.resolver import DIDResolver, PrefixResolver
from didcomm_messaging.resolver.peer import Peer2, Peer4
from pydid import DIDDocument

from dovecote.util.lru import ByteLRU

# Defaults for the resolver cache (settings.resolver_cache_bytes) and the estimate of
# what one document keeps alive, calibrated with tracemalloc on did:peer:2 documents.
RESOLVER_CACHE_BYTES = 32 * 1024 * 1024
DOC_OVERHEAD = 4096
PARSED_PER_DID_BYTE = 14
PARSED_OVERHEAD = 16384
CODECS = {KeyAlg.ED25519: "ed25519-pub", KeyAlg.X25519: "x25519-pub"}


def multikey(key: Key) -> str:
    """The public key as a multibase (base58btc) multicodec string, as did:peer:2 embeds it."""
    codec = CODECS[key.algorithm]
    return str(multibase.encode(multicodec.wrap(codec, key.get_public_bytes()), "base58btc"))


def peer_did(signing_key: Key, agreement_key: Key, services: list[dict[str, Any]]) -> str:
    """A did:peer:2 with the two keys (#key-1 signing, #key-2 agreement) and `services`."""
    return str(
        generate(
            [
                KeySpec.verification(multikey(signing_key)),
                KeySpec.key_agreement(multikey(agreement_key)),
            ],
            services,
        )
    )


class CachingResolver(DIDResolver):  # type: ignore[misc]
    """A cache in front of another resolver (only for immutable DID methods), bounded by
    the bytes its documents keep alive: any client can make us resolve any DID, so a
    count bound would let a few thousand 4 KiB DIDs (or a few 2 MB ones) hold gigabytes.
    """

    def __init__(self, inner: DIDResolver, max_bytes: int = RESOLVER_CACHE_BYTES) -> None:
        self.inner = inner
        # Parsed documents cost ~12x their DID (pydid keeps many DID URL objects), raw
        # ones ~1.3x (measured with tracemalloc): parsed ones get the larger share.
        self._cache: ByteLRU[str, dict[str, Any]] = ByteLRU(max_bytes // 4)
        self._parsed: ByteLRU[str, DIDDocument] = ByteLRU(max_bytes - max_bytes // 4)

    async def is_resolvable(self, did: str) -> bool:
        return did in self._cache or await self.inner.is_resolvable(did)

    async def resolve(self, did: str) -> dict[str, Any]:
        doc = self._cache.get(did)
        if doc is not None:
            return doc
        resolved: dict[str, Any] = await self.inner.resolve(did)
        self._cache.put(did, resolved, size=2 * len(did) + DOC_OVERHEAD)
        return resolved

    async def resolve_and_parse(self, did: str) -> DIDDocument:
        # Parsing (pydid) costs more than resolving: measured ~5 ms per reply packed.
        parsed = self._parsed.get(did)
        if parsed is not None:
            return parsed
        parsed = DIDDocument.deserialize(await self.resolve(did))
        self._parsed.put(did, parsed, size=PARSED_PER_DID_BYTE * len(did) + PARSED_OVERHEAD)
        return parsed


# didcomm_messaging ships no py.typed: to mypy its classes are Any.


def build_resolver(max_bytes: int = RESOLVER_CACHE_BYTES) -> DIDResolver:
    """did:peer:2 and did:peer:4 resolution, cached."""
    return CachingResolver(
        PrefixResolver({"did:peer:2": Peer2(), "did:peer:4": Peer4()}), max_bytes
    )
