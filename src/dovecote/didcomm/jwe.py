"""DIDComm v2 encrypted envelopes (JWE, general JSON serialization) opened with askar.

didcomm-messaging 0.1.1 parses an envelope twice per unpack (once for its metadata, once
to decrypt) and calls askar through three layers of wrappers; on the forward accept path
that was more CPU than the cryptography. Here the envelope the packer already parsed (and
bounded, see packing.py) is read once and askar does the ECDH unwrap and AEAD decrypt.

Every check of didcomm-messaging's unpack is kept (PackagingService
.extract_packed_message_metadata, JweEnvelope._deserialize, AskarCryptoService
.ecdh_es_decrypt / .ecdh_1pu_decrypt): member types, no header named twice, recipient key
found, `apv` bound to the recipient key ids, `apu`/`skid` agreement for authcrypt.
tests/security/test_jwe_parity.py feeds the same tampered envelopes to both. Stricter than
the library: only DIDComm v2's algorithms (the library also took A128KW, A128GCM and
A128CBC-HS256), no `crit` or `zip` (RFC 7516: a `crit` we do not understand makes the JWE
invalid), no `aad` member (DIDComm never writes one; the library crashed on it), and the
tag must have its algorithm's length (askar splits ciphertext||tag at the length it
expects, so without this bytes moved from `ciphertext` to `tag` decrypted unchanged).
One deliberate difference the other way: `apv` may hash the key ids in sorted order (what
the spec and every packer, didcomm-messaging's included, write) as well as in listed order
(what didcomm-messaging alone expects, so it refuses multi-recipient envelopes whose
recipients are not listed sorted). The KDF binds `apv` either way.
"""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pybase64
from aries_askar import AskarError, Key, KeyAlg

from dovecote.didcomm import askar_native
from dovecote.errors import UnpackFailed
from dovecote.util.jsonlimits import dumps_compact

ENCRYPTED = "application/didcomm-encrypted+json"
# Key wrapping and content encryption allowed per method: DIDComm v2's lists (its
# "Curves and Content Encryption Algorithms"), narrower than didcomm-messaging's.
ANON_ALGS = {"ECDH-ES+A256KW": "A256KW"}
AUTH_ALGS = {"ECDH-1PU+A256KW": "A256KW"}
ANON_ENCS = frozenset({"A256CBC-HS512", "XC20P", "A256GCM"})
AUTH_ENCS = frozenset({"A256CBC-HS512"})
# RFC 7518 5.2.6 and 5.3, draft-irtf-cfrg-xchacha: the tag length each `enc` produces.
TAG_BYTES = {"A256CBC-HS512": 32, "XC20P": 16, "A256GCM": 16}
# Header parameters that change how the JWE must be processed; DIDComm uses none.
UNSUPPORTED_HEADERS = ("crit", "zip")
# Members holding base64url bytes, and those whose type the JWE fixes.
B64_MEMBERS = ("ciphertext", "iv", "tag")

CEK_FAILED = "error decrypting content encryption key"
# The askar calls of an open: on askar's C functions unless its ABI is not one we checked
# (askar_native.py says why and what that costs to keep).
_crypto = askar_native.CRYPTO

SecretLookup = Callable[[str], Key | None]
SenderLookup = Callable[[str], Awaitable[Key]]


@dataclass(slots=True)
class Opened:
    """A decrypted envelope: the plaintext bytes and the key ids involved."""

    plaintext: bytes
    recipient_kid: str
    sender_kid: str | None


_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def b64url_decode(text: str) -> bytes:
    """Unpadded base64url, decoded as didcomm-messaging does (padding restored).

    pybase64 (SIMD) decodes a well-formed text, 2.4 against 20 µs for a 2.5 kB ciphertext
    through binascii; anything it refuses (or that holds "+" or "/", which it accepts
    under a deprecation warning) goes the library's lenient way, so what decodes, and to
    what, does not change (tests/unit/test_jwe.py compares both on random texts)."""
    if "+" not in text and "/" not in text:
        try:
            return pybase64.b64decode(text + "=" * (-len(text) % 4), altchars="-_", validate=True)
        except ValueError:  # binascii.Error and a non-ASCII text are ValueErrors
            pass
    return b64url_decode_lenient(text)


def b64url_decode_lenient(text: str) -> bytes:
    """What base64.urlsafe_b64decode does (ASCII only, then non-strict a2b_base64, which
    skips characters outside the alphabet), without its two extra copies of the input."""
    try:
        data = text.encode("ascii").translate(_FROM_URLSAFE)
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
    except ValueError as exc:  # binascii.Error and UnicodeEncodeError are ValueErrors
        raise UnpackFailed("the JWE holds invalid base64url") from exc


def b64url(data: bytes) -> str:
    """Unpadded base64url (pybase64: 1.3 against 9.5 µs for a 2.7 kB ciphertext; the same
    text, tests/unit/test_jwe.py compares both)."""
    return pybase64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _kids_digest(kids: list[str]) -> str:
    return b64url(hashlib.sha256(".".join(kids).encode()).digest())


def _invalid(reason: str) -> UnpackFailed:
    return UnpackFailed(f"could not decrypt the message: {reason}")


def _recipients(envelope: dict[str, Any], protected: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipients list, after the structural checks of JweEnvelope._deserialize."""
    if "recipients" in protected or "encrypted_key" in protected:
        raise _invalid("recipients in the protected header")
    if "encrypted_key" in envelope:
        raise _invalid("flattened form with 'recipients'")
    recipients = envelope.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        raise _invalid("no recipients")
    unprotected = envelope.get("unprotected") or {}
    if not isinstance(unprotected, dict):
        raise _invalid("invalid unprotected header")
    shared = protected.keys() | unprotected.keys()
    if len(shared) != len(protected) + len(unprotected):
        raise _invalid("duplicate header")
    for recipient in recipients:
        if not isinstance(recipient, dict) or not isinstance(recipient.get("encrypted_key"), str):
            raise _invalid("invalid recipient")
        header = recipient.get("header")
        if header is not None and not isinstance(header, dict):
            raise _invalid("invalid recipient header")
        if header and header.keys() & shared:
            raise _invalid("duplicate header")
    return recipients


async def open_envelope(
    envelope: dict[str, Any],
    protected: dict[str, Any],
    secret_for: SecretLookup,
    sender_key: SenderLookup,
) -> Opened:
    """Decrypt a parsed JWE whose protected header is `protected` (already decoded).

    `secret_for(kid)` is our private key for a key id (None: not ours); `sender_key(kid)`
    resolves an authcrypt sender's key-agreement key (raising when it cannot)."""
    _members(envelope)
    recipients = _recipients(envelope, protected)
    alg = protected.get("alg")
    if not isinstance(alg, str) or not alg:
        raise _invalid("missing alg header")
    if "ECDH-1PU" in alg:
        authcrypt = True
    elif "ECDH-ES" in alg:
        authcrypt = False
    else:
        raise _invalid(f"unsupported DIDComm encryption algorithm: {alg[:100]}")
    # Before any of our key ids is resolved (up to MAX_RECIPIENTS did:peer:2 documents).
    if alg not in (AUTH_ALGS if authcrypt else ANON_ALGS):
        raise _invalid(
            f"unsupported {'ECDH-1PU' if authcrypt else 'ECDH-ES'} algorithm: {alg[:100]}"
        )
    chosen, secret, kids = _our_recipient(recipients, secret_for)
    apv = protected.get("apv")
    if not apv:
        raise _invalid("missing apv header")
    if apv != _kids_digest(kids) and (len(kids) < 2 or apv != _kids_digest(sorted(kids))):
        raise _invalid("invalid apv value")
    sender_kid = _sender_kid(protected) if authcrypt else None

    # The recipient's view of the headers: protected, unprotected, then its own.
    header = {**protected, **(envelope.get("unprotected") or {}), **(chosen.get("header") or {})}
    encrypted_key, ciphertext, iv, tag, aad = _payload(envelope, recipients, chosen)
    unsupported = [name for name in UNSUPPORTED_HEADERS if name in header]
    if unsupported:
        raise _invalid(f"unsupported header: {unsupported[0]}")
    epk_header = header.get("epk")
    if not epk_header or not isinstance(epk_header, dict):
        raise _invalid("missing ephemeral key")
    crypto = _crypto
    try:
        epk = crypto.epk(epk_header)
    except AskarError as exc:
        raise _invalid("invalid ephemeral key") from exc
    try:
        cek = await _unwrap(
            crypto, epk, alg, protected, header, secret, encrypted_key, tag, sender_kid, sender_key
        )
        try:
            plaintext = crypto.decrypt(cek, ciphertext, iv, tag, aad)
        except AskarError as exc:
            raise _invalid("error decrypting message payload") from exc
        finally:
            crypto.free(cek)
    finally:
        crypto.free(epk)
    return Opened(plaintext, chosen["header"]["kid"], sender_kid)


async def _unwrap(
    crypto: askar_native.Wrapped,
    epk: askar_native.Handle,
    alg: str,
    protected: dict[str, Any],
    header: dict[str, Any],
    secret: Key,
    encrypted_key: bytes,
    tag: bytes,
    sender_kid: str | None,
    sender_key: SenderLookup,
) -> askar_native.Handle:
    """The content encryption key (to be freed), after the `enc` checks and, for
    authcrypt, resolving the sender's key."""
    apv = protected["apv"]
    if sender_kid is not None:
        enc = _allowed(protected.get("enc"), tag, AUTH_ENCS, "ECDH-1PU")
        sender = await sender_key(sender_kid)
        apu_bytes, apv_bytes = b64url_decode(protected["apu"]), b64url_decode(apv)
        try:
            return crypto.unwrap_1pu(
                alg, AUTH_ALGS[alg], enc, epk, sender, secret, apu_bytes, apv_bytes, tag,
                encrypted_key,
            )  # fmt: skip
        except AskarError as exc:
            raise _invalid(CEK_FAILED) from exc
    enc = _allowed(header.get("enc"), tag, ANON_ENCS, "ECDH-ES")
    apv_bytes = b64url_decode(apv)
    try:
        return crypto.unwrap_es(alg, ANON_ALGS[alg], enc, epk, secret, apv_bytes, encrypted_key)
    except AskarError as exc:
        raise _invalid(CEK_FAILED) from exc


def _members(envelope: dict[str, Any]) -> None:
    """The members' types, as JweEnvelope.deserialize checks them."""
    protected_b64 = envelope.get("protected")
    if not isinstance(protected_b64, str):
        raise _invalid("invalid protected header")
    if "aad" in envelope:
        raise _invalid("the JWE has an aad member (DIDComm uses none)")
    for member in B64_MEMBERS:
        if member in envelope and not isinstance(envelope[member], str):
            raise _invalid(f"invalid {member}")
    missing = [m for m in B64_MEMBERS if m not in envelope]
    if missing:
        raise _invalid(f"missing {missing[0]}")


def _payload(
    envelope: dict[str, Any], recipients: list[dict[str, Any]], chosen: dict[str, Any]
) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """Our wrapped key, ciphertext, iv, tag, and the AEAD's associated data."""
    encrypted_key = b64url_decode(chosen["encrypted_key"])
    for other in recipients:
        if other is not chosen:
            b64url_decode(other["encrypted_key"])  # as the library: every one must decode
    ciphertext, iv, tag = (b64url_decode(envelope[m]) for m in B64_MEMBERS)
    # RFC 7516 5.2 step 14, with no `aad` member (refused in _members).
    aad = envelope["protected"].encode("utf-8")
    return encrypted_key, ciphertext, iv, tag, aad


def _our_recipient(
    recipients: list[dict[str, Any]], secret_for: SecretLookup
) -> tuple[dict[str, Any], Key, list[str]]:
    """The first recipient entry we hold the key for, that key, and every listed kid."""
    kids = [r["header"]["kid"] for r in recipients if r.get("header") and "kid" in r["header"]]
    if not all(isinstance(kid, str) for kid in kids):
        raise _invalid("a recipient kid is not a string")
    for kid in kids:
        secret = secret_for(kid)
        if secret is not None:
            chosen = next(r for r in recipients if (r.get("header") or {}).get("kid") == kid)
            return chosen, secret, kids
    raise UnpackFailed("the message is not encrypted for this mediator")


def _sender_kid(protected: dict[str, Any]) -> str:
    """An authcrypt sender's key id: `apu`, which `skid` must repeat when present."""
    apu = protected.get("apu")
    if not apu or not isinstance(apu, str):
        raise _invalid("missing apu header")
    try:
        apu_kid = b64url_decode(apu).decode("utf-8")
    except (UnpackFailed, UnicodeDecodeError) as exc:
        raise _invalid("invalid apu value") from exc
    sender_kid = protected.get("skid") or apu_kid
    if sender_kid != apu_kid:
        raise _invalid("mismatch between skid and apu")
    if not sender_kid:
        raise _invalid("sender key ID not provided")
    return apu_kid


def _allowed(enc: Any, tag: bytes, encs: frozenset[str], method: str) -> str:
    """`enc`, when it is on the method's allowlist and `tag` has the length `enc`
    produces (checked before any key agreement)."""
    if not isinstance(enc, str) or enc not in encs:
        raise _invalid(f"unsupported {method} content encryption: {str(enc)[:100]}")
    if len(tag) != TAG_BYTES[enc]:
        raise _invalid(f"a {enc} tag has {TAG_BYTES[enc]} bytes, not {len(tag)}")
    return enc


def authcrypt(
    plaintext: bytes,
    to: Sequence[tuple[str, Key]],
    sender_kid: str,
    sender: Key,
    sender_alg: KeyAlg | None = None,
) -> bytes:
    """ECDH-1PU+A256KW / A256CBC-HS512 for `to` (key id, key-agreement key) from `sender`
    (`sender_alg`: its algorithm, when the caller knows it; asking the key is an FFI call).

    What didcomm-messaging's AskarCryptoService.ecdh_1pu_encrypt writes, with the media
    type the spec names in `typ` (the library writes `application/didcomm+encrypted`,
    which strict stacks such as didcomm-rust and Veramo drop) and compact JSON.
    """
    if not to:
        raise ValueError("no message recipients")
    alg, enc = "ECDH-1PU+A256KW", "A256CBC-HS512"
    # Recipients' key types are not compared here (each `.algorithm` is an FFI call):
    # askar refuses an agreement between keys of different types.
    crypto = _crypto
    cek = epk = None
    try:
        cek = crypto.generate(KeyAlg.A256CBC_HS512, False)
        epk = crypto.generate(sender_alg or sender.algorithm, True)
        apu = sender_kid.encode()
        apv = hashlib.sha256(".".join(sorted(kid for kid, _ in to)).encode()).digest()
        header = {
            "typ": ENCRYPTED,
            "alg": alg,
            "enc": enc,
            "apu": b64url(apu),
            "apv": b64url(apv),
            "epk": orjson.loads(crypto.jwk_public(epk)),
            "skid": sender_kid,
        }
        protected = b64url(dumps_compact(header))
        ciphertext, tag, nonce = crypto.encrypt(cek, plaintext, protected.encode())
        recipients = [
            {
                "encrypted_key": b64url(
                    crypto.wrap_1pu(alg, "A256KW", epk, sender, key, apu, apv, tag, cek)
                ),
                "header": {"kid": kid},
            }
            for kid, key in to
        ]
    finally:
        crypto.free(epk)
        crypto.free(cek)
    envelope = {
        "protected": protected,
        "recipients": recipients,
        "iv": b64url(nonce),
        "ciphertext": b64url(ciphertext),
        "tag": b64url(tag),
    }
    return dumps_compact(envelope)
