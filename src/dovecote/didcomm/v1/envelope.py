"""DIDComm v1 envelopes (Aries RFC 0019 "pack"), built from askar's primitives.

askar ships the pieces v1 needs (crypto_box, crypto_box_seal, the ed25519 -> x25519
conversion and XChaCha20-Poly1305) but no v1 envelope format, and didcomm-messaging's
legacy module needs PyNaCl; this module only arranges askar's calls in the RFC 0019
layout (the same arrangement ACA-Py uses), it implements no cryptography itself.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from aries_askar import Key, KeyAlg, crypto_box
from didcomm_messaging.multiformats import multibase, multicodec
from didcomm_messaging.multiformats.multibase import Base58BtcEncoder

from dovecote.errors import LimitExceeded, MalformedMessage, UnpackFailed
from dovecote.util.jsonlimits import DEFAULT_MAX_JSON_DEPTH, too_deep

ENC = "xchacha20poly1305_ietf"
TYP = "JWM/1.0"
MEDIA_TYPE = "application/didcomm-envelope-enc"
# Enough for any real recipient list, small enough that a hostile header costs nothing.
MAX_RECIPIENTS = 100
MAX_KEY_TEXT = 200

_b58 = Base58BtcEncoder()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64url(text: Any) -> bytes:
    if not isinstance(text, str) or len(text) > 10_000_000:
        raise MalformedMessage("expected a base64url string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise MalformedMessage("invalid base64url") from exc


def verkey_to_did_key(verkey: str) -> str:
    """base58 ed25519 verkey -> did:key:z6Mk..."""
    encoded: str = multibase.encode(multicodec.wrap("ed25519-pub", b58decode(verkey)), "base58btc")
    return "did:key:" + encoded


def b58decode(text: str) -> bytes:
    try:
        decoded: bytes = _b58.decode(text)
    except (ValueError, KeyError) as exc:
        raise MalformedMessage("invalid base58 key") from exc
    return decoded


def b58encode(data: bytes) -> str:
    encoded: str = _b58.encode(data)
    return encoded


def to_verkey(key: Any) -> str:
    """A raw base58 verkey, a did:key (with or without fragment) -> raw base58 verkey.

    MalformedMessage unless it is a 32-byte ed25519 key.
    """
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_TEXT:
        raise MalformedMessage("expected a verkey or did:key")
    if key.startswith("did:key:"):
        fingerprint = key[len("did:key:") :].split("#", 1)[0]
        try:
            codec, raw = multicodec.unwrap(multibase.decode(fingerprint))
        except Exception as exc:  # the multiformats helpers raise several types
            raise MalformedMessage("invalid did:key") from exc
        if codec.name != "ed25519-pub" or len(raw) != 32:
            raise MalformedMessage("did:key is not an ed25519 key")
        return b58encode(raw)
    raw = b58decode(key)
    if len(raw) != 32:
        raise MalformedMessage("verkey is not 32 bytes")
    return key


def to_did_key(key: Any) -> str:
    """Canonical did:key form of a v1 recipient key (how v1 keys are stored)."""
    return verkey_to_did_key(to_verkey(key))


def looks_like_v1(raw: bytes) -> bool:
    """Cheap pre-check: a v2 JWE always has top-level `recipients`, a v1 envelope never.

    v1 keeps its recipients inside the base64url `protected` header, so the literal
    cannot appear in a well-formed v1 envelope; the full check is `parse`.
    """
    return b'"recipients"' not in raw and b'"protected"' in raw


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed (not yet decrypted) v1 envelope."""

    protected_b64: str
    alg: str
    recipients: list[dict[str, Any]]
    iv: bytes
    ciphertext: bytes
    tag: bytes

    @property
    def kids(self) -> list[str]:
        return [r["header"]["kid"] for r in self.recipients]


def parse(raw: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Envelope | None:
    """The envelope if `raw` is a v1 JWE (None if it is not one at all).

    LimitExceeded for JSON nested deeper than `max_depth` (checked before parsing).
    """
    if too_deep(raw, max_depth):
        raise LimitExceeded(f"body nests deeper than {max_depth} levels")
    try:
        outer = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError: also 5,000-digit numbers
        return None
    if not isinstance(outer, dict) or not isinstance(outer.get("protected"), str):
        return None
    try:
        protected_raw = unb64url(outer["protected"])
        if too_deep(protected_raw, max_depth):
            raise LimitExceeded(f"protected header nests deeper than {max_depth} levels")
        protected = json.loads(protected_raw)
    except (MalformedMessage, ValueError, RecursionError):
        return None
    if not isinstance(protected, dict) or protected.get("enc") != ENC:
        return None
    if protected.get("typ") not in (TYP, None):
        return None
    alg = protected.get("alg")
    if alg not in ("Authcrypt", "Anoncrypt"):
        raise MalformedMessage("v1 envelope alg must be Authcrypt or Anoncrypt")
    recipients = protected.get("recipients")
    if not isinstance(recipients, list) or not recipients or len(recipients) > MAX_RECIPIENTS:
        raise MalformedMessage("v1 envelope needs 1 to 100 recipients")
    for recipient in recipients:
        header = recipient.get("header") if isinstance(recipient, dict) else None
        if (
            not isinstance(header, dict)
            or not isinstance(header.get("kid"), str)
            or not isinstance(recipient.get("encrypted_key"), str)
        ):
            raise MalformedMessage("v1 envelope recipient needs header.kid and encrypted_key")
    return Envelope(
        protected_b64=outer["protected"],
        alg=alg,
        recipients=recipients,
        iv=unb64url(outer.get("iv")),
        ciphertext=unb64url(outer.get("ciphertext")),
        tag=unb64url(outer.get("tag")),
    )


@dataclass(frozen=True, slots=True)
class Opened:
    """A decrypted v1 message: plaintext, sender verkey (None: anoncrypt), our verkey."""

    plaintext: bytes
    sender: str | None
    recipient: str


def open_envelope(envelope: Envelope, keys: dict[str, Key]) -> Opened:
    """Decrypt with whichever of our ed25519 keys (by base58 verkey) is a recipient."""
    for recipient in envelope.recipients:
        header = recipient["header"]
        ours = keys.get(header["kid"])
        if ours is None:
            continue
        try:
            ours_x = ours.convert_key(KeyAlg.X25519)
            encrypted_key = unb64url(recipient["encrypted_key"])
            sender_vk: str | None = None
            if header.get("sender") and header.get("iv"):
                sender_vk = crypto_box.crypto_box_seal_open(
                    ours_x, unb64url(header["sender"])
                ).decode()
                sender_x = Key.from_public_bytes(
                    KeyAlg.ED25519, b58decode(to_verkey(sender_vk))
                ).convert_key(KeyAlg.X25519)
                cek = crypto_box.crypto_box_open(
                    ours_x, sender_x, encrypted_key, unb64url(header["iv"])
                )
            else:
                if envelope.alg == "Authcrypt":
                    raise UnpackFailed("Authcrypt envelope without a sender")
                cek = crypto_box.crypto_box_seal_open(ours_x, encrypted_key)
            plaintext = Key.from_secret_bytes(KeyAlg.C20P, bytes(cek)).aead_decrypt(
                envelope.ciphertext,
                nonce=envelope.iv,
                tag=envelope.tag,
                aad=envelope.protected_b64.encode(),
            )
        except (MalformedMessage, UnpackFailed):
            raise
        except Exception as exc:  # askar raises AskarError for every crypto failure
            raise UnpackFailed("could not decrypt the v1 envelope") from exc
        return Opened(bytes(plaintext), sender_vk, header["kid"])
    raise UnpackFailed("the v1 envelope is not encrypted for this mediator")


def pack(message: bytes, to_verkeys: list[str], from_key: Key | None) -> bytes:
    """Authcrypt (from_key given) or anoncrypt `message` for base58 verkeys."""
    cek = Key.generate(KeyAlg.C20P)
    cek_bytes = cek.get_secret_bytes()
    sender_vk = b58encode(from_key.get_public_bytes()).encode() if from_key else None
    sender_x = from_key.convert_key(KeyAlg.X25519) if from_key else None
    recipients = []
    for verkey in to_verkeys:
        target_x = Key.from_public_bytes(KeyAlg.ED25519, b58decode(verkey)).convert_key(
            KeyAlg.X25519
        )
        if sender_vk is not None and sender_x is not None:
            nonce = crypto_box.random_nonce()
            recipients.append(
                {
                    "encrypted_key": b64url(
                        crypto_box.crypto_box(target_x, sender_x, cek_bytes, nonce)
                    ),
                    "header": {
                        "kid": verkey,
                        "sender": b64url(crypto_box.crypto_box_seal(target_x, sender_vk)),
                        "iv": b64url(nonce),
                    },
                }
            )
        else:
            recipients.append(
                {
                    "encrypted_key": b64url(crypto_box.crypto_box_seal(target_x, cek_bytes)),
                    "header": {"kid": verkey},
                }
            )
    protected = b64url(
        json.dumps(
            {
                "enc": ENC,
                "typ": TYP,
                "alg": "Authcrypt" if from_key else "Anoncrypt",
                "recipients": recipients,
            },
            separators=(",", ":"),
        ).encode()
    )
    parts = cek.aead_encrypt(message, aad=protected.encode()).parts
    ciphertext, tag, nonce = parts
    return json.dumps(
        {
            "protected": protected,
            "iv": b64url(bytes(nonce)),
            "ciphertext": b64url(bytes(ciphertext)),
            "tag": b64url(bytes(tag)),
        },
        separators=(",", ":"),
    ).encode()


def sign_attachment(data: bytes, key: Key) -> dict[str, Any]:
    """An Aries attachment `data` block with a detached EdDSA JWS by `key` (RFC 0017)."""
    payload = b64url(data)
    verkey = b58encode(key.get_public_bytes())
    kid = verkey_to_did_key(verkey)
    protected = b64url(
        json.dumps(
            {
                "alg": "EdDSA",
                "jwk": {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": b64url(key.get_public_bytes()),
                    "kid": kid,
                },
            }
        ).encode()
    )
    signature = key.sign_message(f"{protected}.{payload}".encode())
    return {
        "base64": payload,
        "jws": {"header": {"kid": kid}, "protected": protected, "signature": b64url(signature)},
    }
