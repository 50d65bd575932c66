"""The mediator's own JWE layer (dovecote.didcomm.jwe) refuses at least every envelope
didcomm-messaging's unpack refused (the library it replaced on the accept path), and each
refusal is a ClientError (4xx): the same tampered and malformed envelopes go to both.

The one deliberate difference (jwe.py's docstring): `apv` over the recipients' key ids
in sorted order opens even when they are not listed sorted.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aries_askar import Key, KeyAlg, ecdh
from didcomm_messaging import DIDCommMessaging
from didcomm_messaging.crypto.backend.askar import AskarCryptoService
from didcomm_messaging.packaging import PackagingService
from didcomm_messaging.routing import RoutingService

from dovecote.didcomm.identity import load_or_create
from dovecote.didcomm.packing import Packer
from dovecote.errors import ClientError
from support.agent import Agent

PING = "https://didcomm.org/trust-ping/2.0/ping"
ENCRYPTED = "application/didcomm-encrypted+json"
CEK_ALGS = {
    "A256CBC-HS512": KeyAlg.A256CBC_HS512,
    "A128CBC-HS256": KeyAlg.A128CBC_HS256,
    "A256GCM": KeyAlg.A256GCM,
    "A128GCM": KeyAlg.A128GCM,
    "XC20P": KeyAlg.XC20P,
}
Envelope = dict[str, Any]
DROP = object()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _header(envelope: Envelope) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(_unb64(envelope["protected"]))
    return value


def _with_header(envelope: Envelope, **changes: Any) -> Envelope:
    header = {k: v for k, v in (_header(envelope) | changes).items() if v is not DROP}
    return envelope | {"protected": _b64(json.dumps(header).encode())}


def _moved_tag(envelope: Envelope, count: int) -> Envelope:
    """The last `count` ciphertext bytes moved to the front of the tag (and as many
    dropped from its end): askar splits ciphertext||tag at the tag length it expects."""
    ciphertext, tag = _unb64(envelope["ciphertext"]), _unb64(envelope["tag"])
    return envelope | {
        "ciphertext": _b64(ciphertext[:-count]),
        "tag": _b64(ciphertext[-count:] + tag),
    }


def _recipient(envelope: Envelope, **changes: Any) -> Envelope:
    first = envelope["recipients"][0]
    return envelope | {"recipients": [first | changes, *envelope["recipients"][1:]]}


def _flip(text: str) -> str:
    data = _unb64(text)
    return _b64(bytes([data[0] ^ 1]) + data[1:])


def _anon_as_auth(agent: Agent) -> Callable[[Envelope], Envelope]:
    kid = f"{agent.did}#key-2"
    return lambda e: _with_header(
        e, alg="ECDH-1PU+A256KW", enc="A256CBC-HS512", apu=_b64(kid.encode()), skid=kid
    )


EDITS: dict[str, Callable[[Envelope], Envelope]] = {
    "ciphertext tampered": lambda e: e | {"ciphertext": _flip(e["ciphertext"])},
    "tag tampered": lambda e: e | {"tag": _flip(e["tag"])},
    "tag truncated": lambda e: e | {"tag": _b64(_unb64(e["tag"])[:-1])},
    "ciphertext byte moved into the tag": lambda e: _moved_tag(e, 1),
    "iv tampered": lambda e: e | {"iv": _flip(e["iv"])},
    "iv empty": lambda e: e | {"iv": ""},
    "encrypted_key tampered": lambda e: _recipient(
        e, encrypted_key=_flip(e["recipients"][0]["encrypted_key"])
    ),
    "protected header re-encoded": lambda e: _with_header(e),
    "typ changed": lambda e: _with_header(e, typ="application/json"),
    "alg none": lambda e: _with_header(e, alg="none"),
    "alg dir": lambda e: _with_header(e, alg="dir"),
    "alg missing": lambda e: _with_header(e, alg=DROP),
    "alg ES+A128KW": lambda e: _with_header(e, alg="ECDH-ES+A128KW"),
    "alg 1PU+A128KW": lambda e: _with_header(e, alg="ECDH-1PU+A128KW"),
    "alg ES for 1PU and back": lambda e: _with_header(
        e, alg="ECDH-ES+A256KW" if "1PU" in _header(e)["alg"] else "ECDH-1PU+A256KW"
    ),
    "enc missing": lambda e: _with_header(e, enc=DROP),
    "enc unknown": lambda e: _with_header(e, enc="A128CTR"),
    "enc A128GCM": lambda e: _with_header(e, enc="A128GCM"),
    "enc A128CBC-HS256": lambda e: _with_header(e, enc="A128CBC-HS256"),
    "enc XC20P": lambda e: _with_header(e, enc="XC20P"),
    "enc moved to unprotected": lambda e: (
        _with_header(e, enc=DROP) | {"unprotected": {"enc": _header(e)["enc"]}}
    ),
    "enc in unprotected too": lambda e: e | {"unprotected": {"enc": _header(e)["enc"]}},
    "epk missing": lambda e: _with_header(e, epk=DROP),
    "epk symmetric": lambda e: _with_header(e, epk={"kty": "oct", "k": _b64(b"k" * 32)}),
    "epk off the curve": lambda e: _with_header(
        e, epk={"kty": "EC", "crv": "P-256", "x": _b64(b"\1" * 32), "y": _b64(b"\1" * 32)}
    ),
    "epk Ed25519": lambda e: _with_header(
        e, epk={"kty": "OKP", "crv": "Ed25519", "x": _b64(b"\2" * 32)}
    ),
    "epk low order": lambda e: _with_header(
        e, epk={"kty": "OKP", "crv": "X25519", "x": _b64(b"\0" * 32)}
    ),
    "epk moved to recipient header": lambda e: _recipient(
        _with_header(e, epk=DROP), header=e["recipients"][0]["header"] | {"epk": _header(e)["epk"]}
    ),
    "apv missing": lambda e: _with_header(e, apv=DROP),
    "apv of other kids": lambda e: _with_header(e, apv=_b64(b"\0" * 32)),
    "apu missing": lambda e: _with_header(e, apu=DROP),
    "apu not base64url": lambda e: _with_header(e, apu="%%%"),
    "skid dropped": lambda e: _with_header(e, skid=DROP),
    "skid in unprotected": lambda e: (
        _with_header(e, skid=DROP)
        | {"unprotected": {"skid": _header(e).get("skid", "did:peer:2.x#key-2")}}
    ),
    "duplicate recipient": lambda e: e | {"recipients": e["recipients"] * 2},
    "recipient without kid first": lambda e: (
        e | {"recipients": [{"encrypted_key": "AAAA"}, *e["recipients"]]}
    ),
    "recipient kid not a string": lambda e: (
        e | {"recipients": [{"encrypted_key": "AAAA", "header": {"kid": 5}}, *e["recipients"]]}
    ),
    "recipients empty": lambda e: e | {"recipients": []},
    "recipients not a list": lambda e: e | {"recipients": {"0": e["recipients"][0]}},
    "recipients in protected": lambda e: _with_header(e, recipients=e["recipients"]),
    "alg in recipient header": lambda e: _recipient(
        e, header=e["recipients"][0]["header"] | {"alg": "ECDH-ES+A256KW"}
    ),
    "alg in unprotected": lambda e: e | {"unprotected": {"alg": _header(e)["alg"]}},
    "unprotected not an object": lambda e: e | {"unprotected": ["x"]},
    "flattened encrypted_key too": lambda e: e | {"encrypted_key": "AAAA"},
    "aad added": lambda e: e | {"aad": _b64(b"extra")},
    "crit header": lambda e: _with_header(e, crit=["exp"], exp=1),
    "zip header": lambda e: _with_header(e, zip="DEF"),
    "iv missing": lambda e: {k: v for k, v in e.items() if k != "iv"},
    "tag missing": lambda e: {k: v for k, v in e.items() if k != "tag"},
    "tag not a string": lambda e: e | {"tag": 5},
    "tag with junk": lambda e: e | {"tag": e["tag"][:4] + "!" + e["tag"][4:]},
    "ciphertext not base64url": lambda e: e | {"ciphertext": "@@@@"},
    "protected not base64url": lambda e: e | {"protected": "@@@@"},
    "protected not JSON": lambda e: e | {"protected": _b64(b"not json")},
}


@pytest.fixture
async def packer(tmp_path: Path) -> Packer:
    packer = Packer(load_or_create(tmp_path, ["http://m.example"]))
    await packer.start()
    return packer


def _library(packer: Packer) -> Any:
    """didcomm-messaging's unpack, as the mediator called it before jwe.py."""
    return DIDCommMessaging(
        crypto=AskarCryptoService(),
        secrets=packer.secrets,
        resolver=packer.resolver,
        packaging=PackagingService(),
        routing=RoutingService(),
    )


async def _outcomes(packer: Packer, envelope: Envelope) -> tuple[bool, bool]:
    """(library accepts, we accept); our refusals must be ClientErrors."""
    raw = json.dumps(envelope).encode()
    try:
        await _library(packer).unpack(raw)
        library = True
    except Exception:  # noqa: BLE001 - the library raises many types, each a refusal
        library = False
    try:
        await packer.unpack(raw)
        ours = True
    except ClientError as exc:
        assert 400 <= exc.status < 500
        ours = False
    return library, ours


async def _envelopes(packer: Packer) -> dict[str, Envelope]:
    agent = Agent.create("http://m.example", packer.identity.did)
    return {
        "anoncrypt": json.loads(await agent.pack(agent.message(PING), anonymous=True)),
        "authcrypt": json.loads(await agent.pack(agent.message(PING), anonymous=False)),
        # didcomm-messaging's own anoncrypt (per-recipient epk), as dovecote.client writes
        "library anoncrypt": json.loads(
            await AskarCryptoService().ecdh_es_encrypt(
                [await packer._recipient_key(packer.identity.did)],
                json.dumps({"id": "1", "type": PING, "body": {}}).encode(),
            )
        ),
    }


async def test_untampered_envelopes_open_with_both(packer: Packer) -> None:
    for kind, envelope in (await _envelopes(packer)).items():
        assert await _outcomes(packer, envelope) == (True, True), kind


async def test_we_refuse_whatever_the_library_refuses(packer: Packer) -> None:
    agent = Agent.create("http://m.example", packer.identity.did)
    edits = EDITS | {"anoncrypt claiming authcrypt": _anon_as_auth(agent)}
    accepted_by_us_only = []
    for kind, envelope in (await _envelopes(packer)).items():
        for name, edit in edits.items():
            if name == "epk moved to recipient header" and "epk" not in _header(envelope):
                continue
            library, ours = await _outcomes(packer, edit(envelope))
            if ours and not library:
                accepted_by_us_only.append(f"{kind}: {name}")
    assert accepted_by_us_only == []


def _sealed(
    packer: Packer,
    alg: str = "ECDH-ES+A256KW",
    enc: str = "A256CBC-HS512",
    aad: str | None = None,
    sender: tuple[str, Key] | None = None,
    **extra: Any,
) -> Envelope:
    """A correctly encrypted envelope for the mediator with any header: what a sender
    (not a man in the middle) can make us open."""
    kid, key = f"{packer.identity.did}#key-2", packer.identity.agreement_key
    cek = Key.generate(CEK_ALGS[enc])
    epk = Key.generate(key.algorithm, ephemeral=True)
    apv = hashlib.sha256(kid.encode()).digest()
    header = {"typ": ENCRYPTED, "alg": alg, "enc": enc, "apv": _b64(apv)}
    header |= {"epk": json.loads(epk.get_jwk_public())}
    if sender is not None:
        header |= {"apu": _b64(sender[0].encode()), "skid": sender[0]}
    protected = _b64(json.dumps(header | extra).encode())
    plaintext = json.dumps({"id": "1", "type": PING, "body": {}}).encode()
    sealed = cek.aead_encrypt(plaintext, aad=(protected + ("." + aad if aad else "")).encode())
    wrap = KeyAlg.A128KW if "A128KW" in alg else KeyAlg.A256KW
    if sender is None:
        wrapped = ecdh.EcdhEs(alg, None, apv).sender_wrap_key(wrap, epk, key, cek)
    else:
        wrapped = ecdh.Ecdh1PU(alg, sender[0].encode(), apv).sender_wrap_key(
            wrap, epk, sender[1], key, cek, cc_tag=sealed.tag
        )
    envelope = {
        "protected": protected,
        "recipients": [{"encrypted_key": _b64(wrapped.ciphertext), "header": {"kid": kid}}],
        "iv": _b64(sealed.nonce),
        "ciphertext": _b64(sealed.ciphertext),
        "tag": _b64(sealed.tag),
    }
    return envelope | ({"aad": aad} if aad else {})


def _sender(agent: Agent) -> tuple[str, Key]:
    secret = next(s for s in agent.secrets if s.kid.endswith("#key-2"))
    return secret.kid, Key.from_jwk(json.loads(secret.verification_material.value))


async def test_sealed_envelopes_open(packer: Packer) -> None:
    """_sealed writes what both open (the checks below refuse its variants, not it)."""
    sender = _sender(Agent.create("http://m.example", packer.identity.did))
    for envelope in (
        _sealed(packer),
        _sealed(packer, enc="XC20P"),
        _sealed(packer, enc="A256GCM"),
        _sealed(packer, "ECDH-1PU+A256KW", sender=sender),
    ):
        assert await _outcomes(packer, envelope) == (True, True)


async def test_what_a_sender_could_make_both_accept_is_refused(packer: Packer) -> None:
    """Envelopes didcomm-messaging opened that DIDComm v2 / RFC 7516-7518 do not allow:
    algorithms outside DIDComm's lists, a `crit` header we cannot understand, `aad`
    (which the library crashed on), and a tag shorter than its algorithm's (askar splits
    ciphertext||tag at the length it expects, so bytes moved between the members of an
    ECDH-ES envelope, whose KDF does not bind the tag, decrypted unchanged)."""
    sender = _sender(Agent.create("http://m.example", packer.identity.did))
    cases = {
        "ES+A128KW": _sealed(packer, "ECDH-ES+A128KW"),
        "A128GCM": _sealed(packer, enc="A128GCM"),
        "A128CBC-HS256": _sealed(packer, enc="A128CBC-HS256"),
        "1PU+A128KW": _sealed(packer, "ECDH-1PU+A128KW", sender=sender),
        "1PU A128CBC-HS256": _sealed(packer, "ECDH-1PU+A256KW", "A128CBC-HS256", sender=sender),
        "crit": _sealed(packer, crit=["exp"], exp=1),
        "aad": _sealed(packer, aad=_b64(b"extra")),
        "tag moved (CBC)": _moved_tag(_sealed(packer), 1),
        "tag moved (GCM)": _moved_tag(_sealed(packer, enc="A256GCM"), 4),
        "tag moved (XC20P)": _moved_tag(_sealed(packer, enc="XC20P"), 16),
    }
    accepted = [name for name, envelope in cases.items() if (await _outcomes(packer, envelope))[1]]
    assert accepted == []


async def _refusal(packer: Packer, envelope: Envelope) -> tuple[str, str, str] | None:
    try:
        await packer.unpack(json.dumps(envelope).encode())
    except Exception as exc:  # noqa: BLE001 - compared, not judged, here
        return type(exc).__name__, str(exc), type(exc.__cause__).__name__
    return None


async def test_native_askar_calls_refuse_as_the_wrappers_did(
    packer: Packer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jwe.py's askar calls on askar's C functions (askar_native.Native) and on
    aries_askar's wrappers (Wrapped, the fallback) give every envelope above the same
    outcome: the same error class, message and cause."""
    from aries_askar.bindings import get_library

    from dovecote.didcomm import askar_native, jwe

    agent = Agent.create("http://m.example", packer.identity.did)
    sender = _sender(agent)
    edits = EDITS | {"anoncrypt claiming authcrypt": _anon_as_auth(agent), "none": lambda e: e}
    envelopes = [
        edit(envelope)
        for envelope in (await _envelopes(packer)).values()
        for name, edit in edits.items()
        if name != "epk moved to recipient header" or "epk" in _header(envelope)
    ]
    envelopes += [
        _sealed(packer, enc="XC20P"),
        _sealed(packer, "ECDH-1PU+A256KW", sender=sender),
        _moved_tag(_sealed(packer, enc="A256GCM"), 4),
    ]
    outcomes = {}
    for crypto in (
        askar_native.Native(get_library().loaded, get_library().version()),
        askar_native.Wrapped(),
    ):
        monkeypatch.setattr(jwe, "_crypto", crypto)
        outcomes[type(crypto).__name__] = [await _refusal(packer, e) for e in envelopes]
    assert outcomes["Native"] == outcomes["Wrapped"]
    assert {o[1] for o in outcomes["Native"] if o} >= {
        "could not decrypt the message: invalid ephemeral key",
        "could not decrypt the message: error decrypting content encryption key",
        "could not decrypt the message: error decrypting message payload",
    }
    assert outcomes["Native"].count(None) >= 5
