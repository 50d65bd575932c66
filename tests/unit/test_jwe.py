"""The mediator opens envelopes itself (dovecote.didcomm.jwe): what didcomm-messaging
accepted still opens, and what it refused is still refused, each with a 400."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from dovecote.didcomm.identity import load_or_create
from dovecote.didcomm.packing import Packer
from dovecote.errors import ClientError, InvalidDID, UnpackFailed
from support.agent import Agent

PING = "https://didcomm.org/trust-ping/2.0/ping"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _header(envelope: dict[str, Any]) -> dict[str, Any]:
    text = envelope["protected"]
    value: dict[str, Any] = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    return value


def _with_header(envelope: dict[str, Any], **changes: Any) -> bytes:
    header = _header(envelope) | changes
    edited = envelope | {"protected": _b64(json.dumps(header).encode())}
    return json.dumps(edited).encode()


@pytest.fixture
async def packer(tmp_path: Path) -> Packer:
    packer = Packer(load_or_create(tmp_path, ["http://m.example"]))
    await packer.start()
    return packer


async def _packed(packer: Packer, anonymous: bool) -> tuple[Agent, dict[str, Any]]:
    agent = Agent.create("http://m.example", packer.identity.did)
    packed = await agent.pack(agent.message(PING), anonymous=anonymous)
    return agent, json.loads(packed)


@pytest.mark.parametrize("anonymous", [True, False])
async def test_sicpa_envelopes_open(packer: Packer, anonymous: bool) -> None:
    agent, envelope = await _packed(packer, anonymous)
    unpacked = await packer.unpack(json.dumps(envelope).encode())
    assert unpacked.message["type"] == PING
    assert unpacked.sender == (None if anonymous else agent.did)
    assert unpacked.recipient_kid.startswith(packer.identity.did)


@pytest.mark.parametrize("anonymous", [True, False])
@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda e: e | {"ciphertext": _b64(b"\x00" * 64)}, "payload"),
        (lambda e: e | {"tag": "!!notbase64"}, ""),
        (lambda e: _with_header(e, apv=_b64(b"other")), "apv"),
        (lambda e: _with_header(e, alg="RSA-OAEP"), "algorithm"),
        (lambda e: _with_header(e, enc="A128CTR"), "content encryption"),
        (
            lambda e: (
                e
                | {
                    "recipients": [
                        r | {"header": r["header"] | {"alg": "x"}} for r in e["recipients"]
                    ]
                }
            ),
            "duplicate header",
        ),
        (lambda e: e | {"unprotected": {"alg": "x"}}, "duplicate header"),
        (lambda e: e | {"encrypted_key": "AAAA"}, "flattened"),
        (lambda e: {k: v for k, v in e.items() if k != "iv"}, "missing iv"),
    ],
)
async def test_tampered_envelopes_are_refused(
    packer: Packer, anonymous: bool, edit: Any, reason: str
) -> None:
    _agent, envelope = await _packed(packer, anonymous)
    edited = edit(envelope)
    raw = edited if isinstance(edited, bytes) else json.dumps(edited).encode()
    with pytest.raises(ClientError) as caught:
        await packer.unpack(raw)
    assert caught.value.status == 400
    assert reason in caught.value.detail


async def test_envelope_for_someone_else_is_refused(packer: Packer) -> None:
    other = Agent.create("http://m.example", "")
    agent = Agent.create("http://m.example", other.did)
    packed = await agent.pack(agent.message(PING), anonymous=True)
    with pytest.raises(UnpackFailed, match="not encrypted for this mediator"):
        await packer.unpack(packed.encode())


async def test_authcrypt_sender_must_match_apu(packer: Packer) -> None:
    _agent, envelope = await _packed(packer, anonymous=False)
    impostor = Agent.create("http://m.example", packer.identity.did)
    raw = _with_header(envelope, skid=f"{impostor.did}#key-2")
    with pytest.raises(UnpackFailed, match="skid and apu"):
        await packer.unpack(raw)


def _ping(packer: Packer, agent: Agent, message_id: str) -> dict[str, Any]:
    """A plaintext ping from the mediator to `agent`."""
    return {
        "id": message_id,
        "typ": "application/didcomm-plain+json",
        "type": PING,
        "from": packer.identity.did,
        "to": [agent.did],
        "body": {},
    }


async def test_our_authcrypt_replies_open_with_sicpa(packer: Packer) -> None:
    agent = Agent.create("http://m.example", packer.identity.did)
    reply = _ping(packer, agent, "r1")
    for _ in range(2):  # the second one from the cached keys
        packed = await packer.pack_for(reply, agent.did)
        assert (await agent.unpack(packed))["id"] == "r1"


@pytest.mark.parametrize(
    "kid", ["did:peer:2." + "a" * 5000 + "#key-2", "did:peer:2.a\x00#key-2"], ids=["long", "nul"]
)
async def test_sender_kid_from_apu_alone_is_checked_before_resolving(
    packer: Packer, kid: str
) -> None:
    """Without `skid` the sender's key id is `apu`'s, which the envelope check (skid and
    recipient kids) did not see: it gets the same DID limits before anything resolves."""
    resolved: list[str] = []
    resolve = packer.resolver.resolve_and_dereference_verification_method

    async def spy(did_url: str) -> Any:
        resolved.append(did_url)
        return await resolve(did_url)

    packer.resolver.resolve_and_dereference_verification_method = spy
    _agent, envelope = await _packed(packer, anonymous=False)
    header = {k: v for k, v in _header(envelope).items() if k != "skid"}
    raw = _with_header(
        envelope | {"protected": _b64(json.dumps(header).encode())}, apu=_b64(kid.encode())
    )
    with pytest.raises(InvalidDID, match="sender's key id"):
        await packer.unpack(raw)
    assert resolved == []


@pytest.mark.parametrize("alg", ["ECDH-ES+A128KW", "ECDH-1PU+A192KW", "ECDH-ES"])
async def test_unsupported_alg_is_refused_before_our_key_ids_resolve(
    packer: Packer, alg: str
) -> None:
    looked_up: list[str] = []
    secret_key = packer.secret_for

    def spy(kid: str) -> Any:
        looked_up.append(kid)
        return secret_key(kid)

    packer.secret_for = spy  # type: ignore[method-assign]
    _agent, envelope = await _packed(packer, anonymous=True)
    with pytest.raises(UnpackFailed, match=r"unsupported ECDH-.* algorithm"):
        await packer.unpack(_with_header(envelope, alg=alg))
    assert looked_up == []


def test_an_askar_abi_not_checked_falls_back_to_the_wrappers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aries_askar.bindings import lib

    from dovecote.didcomm import askar_native

    assert isinstance(askar_native.CRYPTO, askar_native.Native)
    monkeypatch.setattr(lib.Lib, "version", lambda self: "9.0.0")
    chosen = askar_native._choose()
    assert type(chosen) is askar_native.Wrapped


def test_base64url_decodes_as_the_lenient_way_does() -> None:
    """b64url_decode (pybase64 first) and the lenient decoder agree on every text: the
    same bytes, or both refuse (random texts of the alphabet, padding, other ASCII,
    whitespace, non-ASCII)."""
    import random

    from dovecote.didcomm.jwe import b64url_decode, b64url_decode_lenient

    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    odd = "=+/ \n.\x00é\u2028"
    rnd = random.Random(16)
    texts = [base64.urlsafe_b64encode(rnd.randbytes(n)).decode().rstrip("=") for n in range(70)]
    texts += [
        "".join(rnd.choice(alphabet + (odd if rnd.random() < 0.4 else "")) for _ in range(n))
        for n in [rnd.randrange(0, 14) for _ in range(20000)]
    ]
    refused = 0
    for text in texts:
        try:
            expected = b64url_decode_lenient(text)
        except UnpackFailed:
            refused += 1
            with pytest.raises(UnpackFailed):
                b64url_decode(text)
            continue
        assert b64url_decode(text) == expected, repr(text)
    assert 1000 < refused < len(texts) - 1000  # both kinds of text were tried


def test_base64url_encodes_as_the_standard_library_does() -> None:
    """b64url (pybase64) writes the text base64.urlsafe_b64encode does, unpadded, for
    every length around the padding boundaries and for random bytes of each value."""
    import random

    from dovecote.didcomm.jwe import b64url

    rnd = random.Random(17)
    samples = [bytes(range(256)), b""] + [rnd.randbytes(n) for n in range(300)]
    samples += [rnd.randbytes(rnd.randrange(3000, 70000)) for _ in range(20)]
    for data in samples:
        assert b64url(data) == _b64(data)


async def test_authcrypt_with_the_sender_algorithm_given_opens_with_sicpa(packer: Packer) -> None:
    """jwe.authcrypt told the sender key's algorithm (as the packer does, from its cache)
    writes what SICPA's didcomm opens; told a wrong one, askar refuses the agreement."""
    from aries_askar import AskarError, KeyAlg

    from dovecote.didcomm import jwe

    agent = Agent.create("http://m.example", packer.identity.did)
    recipient = await packer._recipient_key(agent.did)
    sender_kid, sender, sender_alg = await packer._own_key()
    assert sender_alg == KeyAlg.X25519
    message = _ping(packer, agent, "a1")
    packed = jwe.authcrypt(
        json.dumps(message).encode(),
        [(recipient.kid, recipient.key)],
        sender_kid,
        sender,
        sender_alg,
    )
    assert (await agent.unpack(packed))["id"] == "a1"
    # The bytes json.dumps and base64 would have written: compact, key order kept.
    envelope = json.loads(packed)
    assert packed == json.dumps(envelope, separators=(",", ":")).encode()
    assert envelope["protected"] == _b64(
        json.dumps(_header(envelope), separators=(",", ":")).encode()
    )
    with pytest.raises(AskarError):
        jwe.authcrypt(b"{}", [(recipient.kid, recipient.key)], sender_kid, sender, KeyAlg.P256)


def _crypto_impls() -> list[Any]:
    from aries_askar.bindings import get_library

    from dovecote.didcomm import askar_native

    library = get_library()
    return [askar_native.Native(library.loaded, library.version()), askar_native.Wrapped()]


@pytest.mark.parametrize("crypto", _crypto_impls(), ids=["native", "wrapped"])
async def test_authcrypt_on_askar_calls_and_wrappers_opens_for_every_recipient(
    packer: Packer, crypto: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jwe.authcrypt on askar's C functions (the default) and on aries_askar's wrappers
    (the fallback) writes envelopes SICPA's didcomm opens for each of two recipients, and a
    failed agreement raises askar's error (what Native frees: test_askar_native.py)."""
    from aries_askar import AskarError, KeyAlg

    from dovecote.didcomm import jwe

    monkeypatch.setattr(jwe, "_crypto", crypto)
    agents = [Agent.create("http://m.example", packer.identity.did) for _ in range(2)]
    to = [((r := await packer._recipient_key(a.did)).kid, r.key) for a in agents]
    sender_kid, sender, sender_alg = await packer._own_key()
    message = _ping(packer, agents[0], "n1") | {"to": [a.did for a in agents]}
    packed = jwe.authcrypt(json.dumps(message).encode(), to, sender_kid, sender, sender_alg)
    for agent in agents:
        assert (await agent.unpack(packed))["id"] == "n1"
    with pytest.raises(AskarError):
        jwe.authcrypt(b"{}", to, sender_kid, sender, KeyAlg.P256)
