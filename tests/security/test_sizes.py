"""Sizes are bounded before work is done, and memory stays bounded under a flood.

Before the limits, 80 anonymous forwards with distinct 2.7 MB did:peer:2 DIDs grew the
server from 77 to 813 MiB (kept in the resolver cache), and 10,000 with 4 KiB DIDs grew
it by 97 MiB; resolver and parsed-document caches were bounded by count only.

The flood runs against a 4 MiB resolver cache (DOVECOTE_RESOLVER_CACHE_BYTES, default
32 MiB): the same bound, filled more than ten times over by a quarter of the requests.
Measured (load 7): 3,600 requests grew RSS by 1.8 MiB with the 4 MiB bound, by 70 MiB
with a 1 GiB one (the cache no longer forgets), so the 16 MiB threshold tells them apart.

Only the flood needs a server process (its RSS); the size limits themselves (DIDs, sender
key ids, JSON depth, message ids: refused before resolving or parsing) are handler logic,
tested in-process in tests/fast/test_limits.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from security.flood import (
    AnonPacker,
    anon_forward,
    authcrypt_ping,
    flood,
    peer_did,
    rss_bytes,
)
from support.server import ServerProcess

# Raised so that the per-IP limits (tested elsewhere) do not turn this into a 429 test.
UNLIMITED = {
    "DOVECOTE_RATE_LIMIT_IP": "1000000",
    "DOVECOTE_RATE_LIMIT_IP_BURST": "1000000",
    "DOVECOTE_LOG_LEVEL": "warning",
    # A small bound, so that a short flood overfills it (the default takes 10,000 requests).
    "DOVECOTE_RESOLVER_CACHE_BYTES": str(4 * 1024 * 1024),
}
MiB = 1024 * 1024
FORWARDS = 2_000
SENDERS = 500


async def test_flood_of_distinct_max_size_dids_keeps_memory_bounded(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """2,500 requests, each with a distinct DID of the maximum size: anonymous forwards
    whose `next` the mediator must resolve, and authcrypted pings from distinct senders
    it must resolve and parse. RSS grows by less than 16 MiB."""
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
    assert growth < 16, f"RSS grew {growth:.1f} MiB"
