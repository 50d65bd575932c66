"""The mediator's DIDComm v2 envelopes: bounded parsing, then jwe.py (askar) to open
inbound envelopes and seal replies; our keys found under any did:peer:2 of ours.

DID documents come from peer.py's cache (shared with the client and the benchmark), and
the keys picked from them are cached per DID here: did:peer documents are immutable.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from aries_askar import AskarError, Key, KeyAlg
from did_peer_2 import resolve as resolve_peer2
from didcomm_messaging.crypto import SecretsManager
from didcomm_messaging.crypto.backend.askar import AskarCryptoService, AskarKey, AskarSecretKey
from didcomm_messaging.crypto.base import CryptoServiceError
from didcomm_messaging.packaging import PackagingService
from didcomm_messaging.resolver import DIDResolver

from dovecote.didcomm import jwe, peer
from dovecote.didcomm.identity import Identity
from dovecote.didcomm.peer import RESOLVER_CACHE_BYTES, build_resolver
from dovecote.errors import (
    DovecoteError,
    InvalidDID,
    LimitExceeded,
    MalformedMessage,
    NotEncrypted,
    UnpackFailed,
    UnresolvableDID,
)
from dovecote.util import jsonlimits
from dovecote.util.did import DEFAULT_MAX_DID_BYTES, did_problem
from dovecote.util.jsonlimits import (
    DEFAULT_MAX_JSON_DEPTH,
    containers_in,
    depth_exceeds,
    raw_problem,
)
from dovecote.util.lru import ByteLRU

# Our own key ids (any did:peer:2 embedding our keys); bounded as every client-keyed map.
SECRETS_CACHE_BYTES = 1024 * 1024
# What one cached sender key keeps alive besides its id (an askar handle and bookkeeping).
KEY_OVERHEAD = 256
DEFAULT_MAX_ID_BYTES = 1024
# A JWE for a mediator names its keys; more recipients than this is not for us.
MAX_RECIPIENTS = 32
ENCRYPTED = "application/didcomm-encrypted+json"


# didcomm_messaging ships no py.typed: to mypy its classes are Any.
class DIDCommCrypto(AskarCryptoService):  # type: ignore[misc]
    """didcomm-messaging's askar crypto, with authcrypt written by jwe.authcrypt.

    didcomm-messaging 0.1.1 (the newest release) writes `typ: application/didcomm+encrypted`
    into the protected header of ECDH-1PU envelopes; strict stacks (didcomm-rust, Veramo)
    drop such messages. The header is the AEAD's associated data, so it cannot be fixed
    after encryption. For the client and the benchmark's agents, which pack through the
    library; the mediator calls jwe directly.
    """

    async def ecdh_1pu_encrypt(
        self,
        to_keys: Sequence[AskarKey],
        sender_key: AskarSecretKey,
        message: bytes,
    ) -> bytes:
        if not to_keys:
            raise CryptoServiceError("No message recipients")
        try:
            return jwe.authcrypt(
                message, [(k.kid, k.key) for k in to_keys], sender_key.kid, sender_key.key
            )
        except AskarError as exc:
            raise CryptoServiceError("Error encrypting message") from exc


class IdentitySecrets(SecretsManager[AskarSecretKey]):  # type: ignore[misc]
    """Our private keys, found for any did:peer:2 that embeds our public keys.

    Instances behind one load balancer share keys but may advertise different endpoints
    (hence different DIDs); a message encrypted to any of them is ours to decrypt.
    """

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self._known: ByteLRU[str, AskarSecretKey] = ByteLRU(SECRETS_CACHE_BYTES)
        self._ours = {
            peer.multikey(identity.signing_key): identity.signing_key,
            peer.multikey(identity.agreement_key): identity.agreement_key,
        }

    async def get_secret_by_kid(self, kid: str) -> AskarSecretKey | None:
        return self.secret_for(kid)

    def secret_for(self, kid: str) -> AskarSecretKey | None:
        """Our key for `kid`, or None (no I/O: did:peer:2 resolves offline)."""
        known = self._known.get(kid)
        if known is not None:
            return known
        did, _, fragment = kid.partition("#")
        if not did.startswith("did:peer:2") or not fragment:
            return None
        try:
            doc = resolve_peer2(did)
        except Exception:  # did_peer_2 fails as its parsing does on a crafted DID: not ours  # noqa: BLE001
            return None
        for method in doc.get("verificationMethod", []):
            if method.get("id") in (f"#{fragment}", kid):
                key = self._ours.get(method.get("publicKeyMultibase", ""))
                if key is not None:
                    secret = AskarSecretKey(key, kid)
                    self._known.put(kid, secret, size=256)
                    return secret
        return None


class Unpacked:
    """A decrypted plaintext message and who sent it (None when anonymous)."""

    __slots__ = ("message", "recipient_kid", "sender")

    def __init__(self, message: dict[str, Any], sender: str | None, recipient_kid: str) -> None:
        self.message = message
        self.sender = sender
        self.recipient_kid = recipient_kid


class AnonOpener(Protocol):
    """Opens anoncrypt envelopes elsewhere (decrypt.py's worker processes)."""

    async def open(self, raw: bytes) -> jwe.Opened: ...


class Packer:
    """The mediator's DIDComm envelope operations."""

    def __init__(
        self,
        identity: Identity,
        resolver: DIDResolver | None = None,
        *,
        max_did_bytes: int = DEFAULT_MAX_DID_BYTES,
        max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
        max_id_bytes: int = DEFAULT_MAX_ID_BYTES,
        cache_bytes: int = RESOLVER_CACHE_BYTES,
    ) -> None:
        self.identity = identity
        self.max_did_bytes = max_did_bytes
        self.max_json_depth = max_json_depth
        self.max_id_bytes = max_id_bytes
        self.secrets = IdentitySecrets(identity)
        # Peers' keys by key id (authcrypt senders) and by DID or key id (reply recipients).
        self._sender_keys: ByteLRU[str, Key] = ByteLRU(SECRETS_CACHE_BYTES)
        self._recipient_keys: ByteLRU[str, AskarKey] = ByteLRU(SECRETS_CACHE_BYTES)
        self._own: tuple[str, str, Key, KeyAlg] | None = None
        self.resolver = resolver or build_resolver(cache_bytes)
        self.crypto = DIDCommCrypto()
        self.packaging: PackagingService[Any, AskarSecretKey] = PackagingService()
        # Set by the server with DECRYPT_WORKERS: anoncrypt opened by worker processes.
        self.anon_opener: AnonOpener | None = None

    async def start(self) -> None:
        """Check that the keys resolve under the current DID (fail fast at start)."""
        for suffix in ("#key-1", "#key-2"):
            if await self.secrets.get_secret_by_kid(self.identity.did + suffix) is None:
                raise RuntimeError("identity keys do not match the mediator DID")

    async def unpack(self, raw: bytes) -> Unpacked:
        """Decrypt one envelope addressed to this mediator.

        Sizes are checked before any work: opening the envelope resolves the sender's DID
        and our key ids, which a client could make arbitrarily large or deep. The envelope
        is parsed once (jwe.py opens the parsed value with askar).
        """
        envelope = parse_json(raw, self.max_json_depth, "body", jsonlimits.loads_envelope)
        if not isinstance(envelope, dict):
            raise MalformedMessage("body is not a JSON object")
        if not {"protected", "ciphertext", "recipients"} <= envelope.keys():
            raise NotEncrypted(f"expected a JWE ({ENCRYPTED})")
        header = self._check_envelope(envelope)
        try:
            if self.anon_opener is not None and header.get("alg") in jwe.ANON_ALGS:
                # Bounded and checked above; the worker parses the same bytes again.
                opened = await self.anon_opener.open(raw)
            else:
                opened = await jwe.open_envelope(
                    envelope, header, self.secret_for, self._sender_key
                )
        except DovecoteError:
            raise
        except Exception as exc:  # resolving the sender raises several unrelated types
            raise _unpack_error(exc) from exc
        message = self._plaintext(opened.plaintext)
        sender = None
        if opened.sender_kid:
            sender = opened.sender_kid.split("#", 1)[0]
            claimed = message.get("from")
            if claimed is not None and claimed != sender:
                raise UnpackFailed("plaintext 'from' does not match the sender's key")
        return Unpacked(message, sender, opened.recipient_kid)

    def _plaintext(self, plaintext: bytes) -> dict[str, Any]:
        """The decrypted message, with the checks every handler relies on."""
        try:
            message = json.loads(plaintext)
        except RecursionError as exc:
            raise LimitExceeded("plaintext nests too deeply") from exc
        except ValueError as exc:  # not JSON, or not UTF-8
            raise UnpackFailed("could not decrypt the message: plaintext is not JSON") from exc
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise MalformedMessage("plaintext has no type")
        if may_nest(plaintext, self.max_json_depth) and depth_exceeds(message, self.max_json_depth):
            raise LimitExceeded(f"plaintext nests deeper than {self.max_json_depth} levels")
        for header in ("id", "thid", "pthid"):
            value = message.get(header)
            if value is not None and (
                not isinstance(value, str)
                or len(value.encode("utf-8", "replace")) > self.max_id_bytes
            ):
                raise LimitExceeded(
                    f"{header} must be a string of at most {self.max_id_bytes} bytes"
                )
        return message

    def secret_keys(self) -> list[bytes]:
        """Our signing and agreement secret JWKs, for decrypt workers (over their pipe)."""
        return [
            self.identity.signing_key.get_jwk_secret(),
            self.identity.agreement_key.get_jwk_secret(),
        ]

    def secret_for(self, kid: str) -> Key | None:
        """Our private key for a key id (None: not ours)."""
        secret = self.secrets.secret_for(kid)
        return secret.key if secret is not None else None

    async def _sender_key(self, kid: str) -> Key:
        """An authcrypt sender's key-agreement key (cached: did:peer documents are
        immutable, and dereferencing one with pydid costs more than the crypto)."""
        key = self._sender_keys.get(kid)
        if key is None:
            # `skid` was checked with the envelope; without one the key id is `apu`'s.
            problem = did_problem(kid, self.max_did_bytes)
            if problem is not None:
                raise InvalidDID(f"the sender's key id {problem}")
            method = await self.resolver.resolve_and_dereference_verification_method(kid)
            key = AskarKey.from_verification_method(method).key
            self._sender_keys.put(kid, key, size=2 * len(kid) + KEY_OVERHEAD)
        return key

    def _check_envelope(self, envelope: dict[str, Any]) -> dict[str, Any]:
        """Key ids and the sender's key id within the DID limit, before any resolving;
        the decoded protected header."""
        recipients = envelope.get("recipients")
        if not isinstance(recipients, list) or not recipients or len(recipients) > MAX_RECIPIENTS:
            raise MalformedMessage(f"a JWE needs 1 to {MAX_RECIPIENTS} recipients")
        kids = [
            r.get("header", {}).get("kid")
            if isinstance(r, dict) and isinstance(r.get("header"), dict)
            else None
            for r in recipients
        ]
        protected = envelope.get("protected")
        if not isinstance(protected, str) or len(protected) > 4 * self.max_did_bytes + 4096:
            raise MalformedMessage("the JWE protected header is missing or too large")
        try:
            header = parse_json(
                base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)),
                self.max_json_depth,
                "protected header",
                jsonlimits.loads_envelope,
            )
        except (binascii.Error, ValueError) as exc:
            raise MalformedMessage("the JWE protected header is not base64url JSON") from exc
        if not isinstance(header, dict):
            raise MalformedMessage("the JWE protected header is not a JSON object")
        if header.get("skid") is not None:
            kids.append(header["skid"])
        for kid in kids:
            problem = did_problem(kid, self.max_did_bytes)
            if problem is not None:
                raise InvalidDID(f"a key id in the envelope {problem}")
        return header

    async def pack_for(self, message: dict[str, Any], to: str) -> bytes:
        """Authcrypt a reply to `to` directly (no forward wrapping: it goes back this hop)."""
        try:
            recipient = await self._recipient_key(to)
            sender_kid, sender, sender_alg = await self._own_key()
            packed = jwe.authcrypt(
                jsonlimits.dumps_compact(message),
                [(recipient.kid, recipient.key)],
                sender_kid,
                sender,
                sender_alg,
            )
        except Exception as exc:
            raise _unpack_error(exc) from exc
        return packed

    async def _recipient_key(self, to: str) -> AskarKey:
        """The key-agreement key a reply to `to` (a DID or key id) is encrypted for, as
        didcomm-messaging picks it (the first one), resolved once per DID."""
        key = self._recipient_keys.get(to)
        if key is None:
            key = await self.packaging.recip_for_kid_or_default_for_did(
                self.crypto, self.resolver, to
            )
            self._recipient_keys.put(to, key, size=2 * len(to) + KEY_OVERHEAD)
        return key

    async def _own_key(self) -> tuple[str, Key, KeyAlg]:
        """Our key-agreement key id under the current DID, the key and its algorithm."""
        did = self.identity.did
        if self._own is None or self._own[0] != did:
            kid = await self.packaging.default_sender_kid_for_did(self.resolver, did)
            secret = self.secrets.secret_for(kid)
            if secret is None:
                raise RuntimeError("identity keys do not match the mediator DID")
            self._own = (did, kid, secret.key, secret.key.algorithm)
        return self._own[1], self._own[2], self._own[3]


def parse_json(
    raw: bytes | str,
    max_depth: int,
    what: str,
    loads: Callable[[bytes | str], Any] = json.loads,
) -> Any:
    """JSON from a client: bounded before parsing, depth checked after, never a
    RecursionError (see dovecote.util.jsonlimits)."""
    containers = containers_in(raw)  # once: both checks below need it
    problem = raw_problem(raw, max_depth, containers=containers)
    if problem is not None:
        raise LimitExceeded(f"{what} {problem}")
    try:
        value = loads(raw)
    except ValueError as exc:  # not JSON, not UTF-8, or a number past 4,300 digits
        raise MalformedMessage(f"{what} is not JSON") from exc
    except RecursionError as exc:
        raise LimitExceeded(f"{what} nests deeper than {max_depth} levels") from exc
    # The depth walk over the value costs more than the count (an envelope of base64url
    # strings opens a handful of containers).
    if containers > max_depth and depth_exceeds(value, max_depth):
        raise LimitExceeded(f"{what} nests deeper than {max_depth} levels")
    return value


def may_nest(raw: bytes | str, max_depth: int) -> bool:
    """Whether a JSON text holds enough arrays and objects to nest past `max_depth`: the
    depth walk over the parsed value costs more than counting brackets in C (an envelope
    of base64url strings holds a handful)."""
    if isinstance(raw, str):
        return raw.count("[") + raw.count("{") > max_depth
    return raw.count(b"[") + raw.count(b"{") > max_depth


def _unpack_error(exc: Exception) -> Exception:
    text = str(exc)
    lowered = text.lower()
    name = type(exc).__name__
    if "DID" in name or "resol" in lowered or "not found" in lowered or "did" in name.lower():
        return UnresolvableDID(f"could not resolve a DID: {text[:200]}")
    if "recipient" in lowered:
        return UnpackFailed("the message is not encrypted for this mediator")
    return UnpackFailed(f"could not decrypt the message: {text[:200]}")
