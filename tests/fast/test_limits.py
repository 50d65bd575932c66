"""Errors and limits on POST /: size, media type, malformed input, unresolvable senders, rate
limits, DID and JSON limits, mailbox and concurrency caps. Each refusal is a 4xx/5xx with the
usual JSON body, a log line and a metric, and stores nothing. This tier owns these cases;
what only a real server shows (uvicorn's frame and header limits, slow sockets) stays in
tests/integration/test_bad_input.py and tests/security/test_sizes.py, test_slow_clients.py."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator

import pytest
import structlog
from didcomm.common.resolvers import ResolversConfig
from didcomm.did_doc.did_doc import DIDDoc
from didcomm.did_doc.did_resolver import ChainedDIDResolver, DIDResolver
from didcomm.secrets.secrets_resolver_in_memory import SecretsResolverInMemory

from fast.instance import BASE_URL, Fast
from security.flood import AnonPacker, anon_forward, b64, forward_message, peer_did
from support.agent import BASIC, ENCRYPTED, PICKUP, PING, Agent, PeerResolver, forward_to
from support.inspect import metric_value


def _tamper(packed: str) -> str:
    envelope = json.loads(packed)
    text = envelope["ciphertext"]
    envelope["ciphertext"] = text[:5] + ("B" if text[5] != "B" else "C") + text[6:]
    return json.dumps(envelope)


class ExampleAgent(Agent):
    """An agent whose DID (did:example) only it can resolve: the mediator cannot."""

    @classmethod
    def make(cls, base_url: str, mediator_did: str) -> ExampleAgent:
        peer = Agent.create(base_url, mediator_did)
        agent = cls(base_url=base_url, mediator_did=mediator_did)
        agent.did = f"did:example:{uuid.uuid4().hex}"
        agent._peer = peer  # type: ignore[attr-defined]
        for secret in peer.secrets:
            secret.kid = agent.did + secret.kid[secret.kid.index("#") :]
        agent.secrets = peer.secrets
        return agent

    @property
    def resolvers(self) -> ResolversConfig:
        return ResolversConfig(
            secrets_resolver=SecretsResolverInMemory(self.secrets),
            did_resolver=ChainedDIDResolver([_ExampleDocs(self), PeerResolver()]),
        )


# didcomm (the reference implementation) ships no py.typed: to mypy its classes are Any.
class _ExampleDocs(DIDResolver):  # type: ignore[misc]
    def __init__(self, agent: ExampleAgent) -> None:
        self.agent = agent

    async def resolve(self, did: str) -> DIDDoc | None:
        if did != self.agent.did:
            return None
        doc = await PeerResolver().resolve(self.agent._peer.did)  # type: ignore[attr-defined]
        assert doc is not None
        old = self.agent._peer.did  # type: ignore[attr-defined]
        for vm in doc.verification_methods:
            vm.id = vm.id.replace(old, did)
            vm.controller = did
            material = json.loads(vm.verification_material.value)
            material["kid"] = vm.id
            vm.verification_material.value = json.dumps(material)
        doc.did = did
        doc.key_agreement_kids = [k.replace(old, did) for k in doc.key_agreement_kids]
        doc.authentication_kids = [k.replace(old, did) for k in doc.authentication_kids]
        return doc


async def _case(name: str, fast: Fast, alice: Agent) -> tuple[bytes | str, str]:
    """The raw body and content type of each anonymous bad-input case."""
    if name == "malformed-json":
        return b'{"protected": "abc", ', ENCRYPTED
    if name == "not-a-jwe":
        return json.dumps({"type": BASIC, "body": {}}), ENCRYPTED
    if name == "array-not-object":
        return b"[1, 2, 3]", "application/json"
    if name == "not-utf8":
        return b'{"protected": "\xff\xfe"}', ENCRYPTED
    if name == "jwe-for-someone-else":
        other = fast.agent(via_mediator=False)
        stranger = Agent.create(BASE_URL, other.did)
        return await stranger.pack(stranger.message(BASIC)), ENCRYPTED
    if name == "tampered-ciphertext":
        return _tamper(await forward_to(BASE_URL, alice, {"type": BASIC, "body": {}})), ENCRYPTED
    if name == "forward-to-unknown-recipient":
        stranger = fast.agent()
        return await forward_to(BASE_URL, stranger, {"type": BASIC, "body": {}}), ENCRYPTED
    if name == "empty-body":
        return b"", ENCRYPTED
    raise AssertionError(name)


EXPECTED = {
    "malformed-json": (400, "e.m.msg.malformed"),
    "not-a-jwe": (400, "e.m.trust.crypto.not-encrypted"),
    "array-not-object": (400, "e.m.msg.malformed"),
    "not-utf8": (400, "e.m.msg.malformed"),
    "jwe-for-someone-else": (400, "e.m.trust.crypto"),
    "tampered-ciphertext": (400, "e.m.trust.crypto"),
    "forward-to-unknown-recipient": (404, "e.m.msg.unregistered-recipient"),
    "empty-body": (400, "e.m.msg.malformed"),
}


@pytest.mark.parametrize("case", list(EXPECTED))
async def test_bad_input_gets_a_json_error_a_metric_and_stores_nothing(
    fast: Fast, case: str
) -> None:
    alice = fast.agent()
    await alice.mediate(fast.client)
    body, content_type = await _case(case, fast, alice)
    before, metrics_before = fast.snapshot(), await fast.scrape()
    with structlog.testing.capture_logs() as logged:
        response = await fast.post(body, content_type, headers={"x-request-id": f"fast-{case}"})
    status, code = EXPECTED[case]
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    assert payload["error"] == code
    assert payload["detail"]
    assert payload["request_id"] == f"fast-{case}" == response.headers["x-request-id"]
    assert fast.snapshot() == before
    metrics_after = await fast.scrape()
    assert (
        metric_value(metrics_after, "dovecote_bad_input_total", code=code)
        == metric_value(metrics_before, "dovecote_bad_input_total", code=code) + 1
    )
    # Logged once with the request id and the code (what an operator greps for).
    assert [e.get("code") for e in logged if e.get("request_id") == f"fast-{case}"].count(code) == 1


async def test_unresolvable_sender_did_is_400_and_stores_nothing(fast: Fast) -> None:
    agent = ExampleAgent.make(BASE_URL, fast.did)
    before = fast.snapshot()
    packed = await agent.pack(agent.message(f"{PING}/ping"))
    response = await fast.post(packed)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "e.m.did.unresolvable"
    assert fast.snapshot() == before


async def test_unsupported_content_type_is_415(fast: Fast) -> None:
    response = await fast.post(b"hello", "text/plain")
    assert response.status_code == 415
    assert response.json()["error"] == "e.m.msg.unsupported-media-type"
    assert response.json()["request_id"]


async def test_unknown_path_and_method_are_json_4xx(fast: Fast) -> None:
    missing = await fast.client.get("/nope")
    assert missing.status_code == 404
    wrong = await fast.client.delete("/")
    assert wrong.status_code == 405


@pytest.mark.fast_settings(max_body_bytes=4096)
async def test_oversize_body_is_413_whether_declared_or_streamed(fast: Fast) -> None:
    before = fast.snapshot()
    declared = await fast.post(b"x" * 10_000)
    assert declared.status_code == 413
    assert declared.json()["error"] == "e.m.me.res.storage.message_too_big"

    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(100):
            sent += 1
            yield b"y" * 1000

    streamed = await fast.client.post("/", content=chunks(), headers={"content-type": ENCRYPTED})
    assert streamed.status_code == 413
    assert streamed.json()["error"] == "e.m.me.res.storage.message_too_big"
    # Refused once past the limit, not after reading all 100 KB.
    assert sent < 20, sent
    assert fast.snapshot() == before


# Refill rates so slow that a loaded machine cannot refill a token during the test.
@pytest.mark.fast_settings(rate_limit_ip=0.001, rate_limit_ip_burst=5)
async def test_rate_limit_per_client_address(fast: Fast) -> None:
    answers = [await fast.client.get("/invitation") for _ in range(8)]
    assert [r.status_code for r in answers] == [200] * 5 + [429] * 3
    limited = answers[5:]
    assert all(int(r.headers["retry-after"]) >= 1 for r in limited)
    assert limited[0].json()["error"] == "e.m.me.res.rate-limited"
    assert limited[0].json()["request_id"]
    # Probes are exempt; another address has its own bucket.
    assert (await fast.client.get("/health/ready")).status_code == 200
    other = await fast.client_from("127.0.0.2")
    assert (await other.get("/invitation")).status_code == 200


@pytest.mark.fast_settings(rate_limit_did=0.001, rate_limit_did_burst=2)
async def test_rate_limit_per_sender_did(fast: Fast) -> None:
    chatty, quiet = fast.agent(via_mediator=False), fast.agent(via_mediator=False)
    answers = []
    for _ in range(4):
        packed = await chatty.pack(chatty.message(f"{PING}/ping", {"response_requested": True}))
        answers.append(await fast.post(packed))
    # Return-routed: the transport worked, so the refusal is a 200 whose body is the
    # packed problem report (issue 12.4), with Retry-After as a hint.
    assert [r.status_code for r in answers] == [200] * 4
    codes = [(await chatty.unpack(r.text)).get("body", {}).get("code") for r in answers]
    assert codes == [None, None, "e.m.me.res.rate-limited", "e.m.me.res.rate-limited"]
    assert int(answers[2].headers["retry-after"]) >= 1
    assert "retry-after" not in answers[0].headers
    # Without return_route there is no message to answer with: 429 and Retry-After.
    silent = chatty.message(f"{PING}/ping", {"response_requested": False}, return_route=False)
    unrouted = await fast.post(await chatty.pack(silent))
    assert unrouted.status_code == 429 and int(unrouted.headers["retry-after"]) >= 1
    packed = await quiet.pack(quiet.message(f"{PING}/ping", {"response_requested": True}))
    assert (await fast.post(packed)).status_code == 200


@pytest.mark.fast_settings(max_concurrent_requests=1)
async def test_requests_past_the_concurrency_limit_get_503(fast: Fast) -> None:
    alice = fast.agent()
    await alice.mediate(fast.client)
    packed = await forward_to(BASE_URL, alice, {"type": BASIC, "body": {"n": 1}})
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield packed[:10].encode()
        await release.wait()
        yield packed[10:].encode()

    slow = asyncio.create_task(
        fast.client.post("/", content=slow_body(), headers={"content-type": ENCRYPTED})
    )
    for _ in range(200):  # until the slow request holds the only slot
        if fast.dovecote.requests.current:
            break
        await asyncio.sleep(0.01)
    busy = await fast.post(packed)
    assert busy.status_code == 503, busy.text
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"] == "e.m.me.res.overloaded"
    assert (await fast.client.get("/health")).status_code == 200  # exempt
    release.set()
    assert (await slow).status_code == 202
    assert (await fast.post(packed)).status_code == 202  # a retry: stored once
    assert fast.query("SELECT COUNT(*) FROM messages") == [(1,)]


@pytest.mark.fast_settings(mailbox_max_messages=2)
async def test_mailbox_limit_refuses_and_keeps_the_queue(fast: Fast) -> None:
    alice = fast.agent()
    await alice.mediate(fast.client)
    statuses = []
    for i in range(3):
        response = await fast.post(
            await forward_to(BASE_URL, alice, {"type": BASIC, "body": {"n": i}})
        )
        statuses.append(response.status_code)
        if response.status_code != 202:
            assert response.json()["error"] == "e.m.me.res.storage.mailbox-full"
    assert statuses == [202, 202, 507]
    status = await alice.request(fast.client, f"{PICKUP}/status-request")
    assert status["body"]["message_count"] == 2


async def test_did_past_the_limit_is_refused_before_resolving(fast: Fast) -> None:
    packer = await AnonPacker.for_mediator(fast.did)
    at_limit, over = peer_did(4096).did, peer_did(6000).did
    assert len(over.encode()) > fast.settings.max_did_bytes >= len(at_limit.encode())
    accepted = await fast.post(anon_forward(packer, fast.did, at_limit))
    assert accepted.status_code == 404, accepted.text  # resolved; private endpoint refused
    before = fast.snapshot()
    for did in (over, peer_did(2_700_000).did):
        refused = await fast.post(anon_forward(packer, fast.did, did))
        assert refused.status_code == 400
        assert refused.json()["error"] == "e.m.msg.invalid-did"
    assert fast.snapshot() == before


@pytest.mark.fast_settings(max_did_bytes=8192)
async def test_did_limit_is_configurable(fast: Fast) -> None:
    packer = await AnonPacker.for_mediator(fast.did)
    response = await fast.post(anon_forward(packer, fast.did, peer_did(6000).did))
    assert response.status_code == 404, response.text  # past the default, within this limit


async def test_sender_key_id_past_the_limit_is_refused(fast: Fast) -> None:
    packer = await AnonPacker.for_mediator(fast.did)
    for size, code in ((8000, "e.m.msg.invalid-did"), (100_000, "e.m.msg.malformed")):
        envelope = json.loads(packer.pack(forward_message(fast.did, "did:example:x")))
        header = json.loads(base64.urlsafe_b64decode(envelope["protected"] + "=="))
        header.update(alg="ECDH-1PU+A256KW", skid=peer_did(size).did + "#key-2")
        envelope["protected"] = b64(json.dumps(header).encode())
        response = await fast.post(json.dumps(envelope).encode())
        assert response.status_code == 400, response.text
        assert response.json()["error"] == code


async def test_deep_json_and_long_ids_are_refused(fast: Fast) -> None:
    # An envelope of 4 MiB of '[' (the parser would recurse until it gives up).
    deep_envelope = await fast.post(b"[" * (4 * 1024 * 1024))
    assert deep_envelope.status_code == 400
    assert deep_envelope.json()["error"] == "e.m.msg.limit-exceeded"
    packer = await AnonPacker.for_mediator(fast.did)
    nested: object = "x"
    for _ in range(100):
        nested = [nested]
    message = forward_message(fast.did, "did:example:x")
    message["body"]["deep"] = nested
    deep_plaintext = await fast.post(packer.pack(message))
    assert deep_plaintext.status_code == 400
    assert deep_plaintext.json()["error"] == "e.m.msg.limit-exceeded"
    for header in ("id", "thid", "pthid"):
        message = forward_message(fast.did, "did:example:x")
        message[header] = "i" * 2000
        response = await fast.post(packer.pack(message))
        assert response.status_code == 400, header
        assert response.json()["error"] == "e.m.msg.limit-exceeded"
