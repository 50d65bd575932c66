"""Sizes are bounded before work is done, and memory stays bounded under a flood.

Before the limits, 80 anonymous forwards with distinct 2.7 MB did:peer:2 DIDs grew the
server from 77 to 813 MiB (kept in the resolver cache), and 10,000 with 4 KiB DIDs grew
it by 97 MiB; resolver and parsed-document caches were bounded by count only.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable

import httpx
import pytest

from security.flood import (
    AnonPacker,
    anon_forward,
    authcrypt_ping,
    b64,
    flood,
    forward_message,
    peer_did,
    rss_bytes,
)
from support.server import ServerProcess

# Raised so that the per-IP limits (tested elsewhere) do not turn this into a 429 test.
UNLIMITED = {
    "DOVECOTE_RATE_LIMIT_IP": "1000000",
    "DOVECOTE_RATE_LIMIT_IP_BURST": "1000000",
    "DOVECOTE_LOG_LEVEL": "warning",
}
MiB = 1024 * 1024
FORWARDS = 8_000
SENDERS = 2_000


async def _post(server: ServerProcess, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(
            server.base_url + "/",
            content=body,
            headers={"content-type": "application/didcomm-encrypted+json"},
        )


@pytest.fixture
def limited(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory(env=dict(UNLIMITED))


async def test_flood_of_distinct_max_size_dids_keeps_memory_bounded(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """10,000 requests, each with a distinct DID of the maximum size: anonymous forwards
    whose `next` the mediator must resolve, and authcrypted pings from distinct senders
    it must resolve and parse. RSS grows by less than 64 MiB."""
    server = server_factory(env=dict(UNLIMITED))
    assert server.proc is not None
    mediator = server.did
    packer = await AnonPacker.for_mediator(mediator)
    # Warm-up: first-use allocations (imports, pools, metric series) are not the flood's.
    warm = [anon_forward(packer, mediator, peer_did(4096).did) for _ in range(200)]
    warm += [await authcrypt_ping(mediator, peer_did(4096).did) for _ in range(50)]
    await flood(server.base_url + "/", warm)

    bodies = [anon_forward(packer, mediator, peer_did(4096).did) for _ in range(FORWARDS)]
    bodies += [await authcrypt_ping(mediator, peer_did(4096).did) for _ in range(SENDERS)]
    before = rss_bytes(server.proc.pid)
    started = time.monotonic()
    counts = await flood(server.base_url + "/", bodies, concurrency=32)
    elapsed = time.monotonic() - started
    after = rss_bytes(server.proc.pid)

    # Forwards to DIDs whose endpoint is private are refused (404); pings are accepted.
    assert counts == {404: FORWARDS, 202: SENDERS}, counts
    growth = (after - before) / MiB
    print(
        f"flood: {len(bodies)} requests in {elapsed:.1f}s, RSS "
        f"{before / MiB:.0f} -> {after / MiB:.0f} MiB (+{growth:.1f})"
    )
    assert growth < 64, f"RSS grew {growth:.1f} MiB"


async def test_did_past_the_limit_is_refused_before_resolving(limited: ServerProcess) -> None:
    packer = await AnonPacker.for_mediator(limited.did)
    at_limit = peer_did(4096).did
    over = peer_did(6000).did
    assert len(over.encode()) > 4096
    accepted = await _post(limited, anon_forward(packer, limited.did, at_limit))
    assert accepted.status_code == 404  # resolved, then refused: private endpoint
    refused = await _post(limited, anon_forward(packer, limited.did, over))
    assert refused.status_code == 400
    assert refused.json()["error"] == "e.m.msg.invalid-did"
    # The 2.7 MB DID of the issue: the same answer, nothing resolved or kept.
    huge = await _post(limited, anon_forward(packer, limited.did, peer_did(2_700_000).did))
    assert huge.status_code == 400 and huge.json()["error"] == "e.m.msg.invalid-did"


async def test_did_limit_is_configurable(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(env={**UNLIMITED, "DOVECOTE_MAX_DID_BYTES": "8192"})
    packer = await AnonPacker.for_mediator(server.did)
    response = await _post(server, anon_forward(packer, server.did, peer_did(6000).did))
    assert response.status_code == 404  # past the default, within this server's limit


async def test_sender_key_id_past_the_limit_is_refused_before_resolving(
    limited: ServerProcess,
) -> None:
    """An authcrypt header naming an 8 KB (or a 100 KB) sender key id: refused from the
    header alone, before the library would resolve the sender."""
    packer = await AnonPacker.for_mediator(limited.did)
    for size, code in ((8000, "e.m.msg.invalid-did"), (100_000, "e.m.msg.malformed")):
        envelope = json.loads(packer.pack(forward_message(limited.did, "did:example:x")))
        header = json.loads(base64.urlsafe_b64decode(envelope["protected"] + "=="))
        header.update(alg="ECDH-1PU+A256KW", skid=peer_did(size).did + "#key-2")
        envelope["protected"] = b64(json.dumps(header).encode())
        response = await _post(limited, json.dumps(envelope).encode())
        assert response.status_code == 400
        assert response.json()["error"] == code


async def test_deep_json_is_refused_before_parsing(limited: ServerProcess) -> None:
    # An envelope of 4 MiB of '[' (the parser would recurse until it gives up).
    response = await _post(limited, b"[" * (4 * MiB))
    assert response.status_code == 400
    assert response.json()["error"] == "e.m.msg.limit-exceeded"
    # A well-formed envelope whose decrypted plaintext nests 10,000 levels.
    packer = await AnonPacker.for_mediator(limited.did)
    deep: object = "x"
    for _ in range(100):
        deep = [deep]
    message = forward_message(limited.did, "did:example:x")
    message["body"]["deep"] = deep
    response = await _post(limited, packer.pack(message))
    assert response.status_code == 400
    assert response.json()["error"] == "e.m.msg.limit-exceeded"


async def test_long_message_ids_are_refused(limited: ServerProcess) -> None:
    packer = await AnonPacker.for_mediator(limited.did)
    for header in ("id", "thid", "pthid"):
        message = forward_message(limited.did, "did:example:x")
        message[header] = "i" * 2000
        response = await _post(limited, packer.pack(message))
        assert response.status_code == 400, header
        assert response.json()["error"] == "e.m.msg.limit-exceeded"
