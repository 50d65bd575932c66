"""The crypto floor of a forward, measured in a process of its own.

`python -m bench.unpack_ref PAYLOADS --seconds S [--rate R]` unpacks the anoncrypt
forwards in PAYLOADS (bench.forwards' file format) with didcomm-messaging + askar and
prints one JSON line: unpacks, per_second, per_cpu_second.

Why a process of its own: measured inside the benchmark's process the figure moved by
1.7x between runs on one idle machine (434 vs 258 µs of CPU per unpack), depending on what
that process had done before (packing 40,000 forwards, or reading them from the cache),
while the servers it is compared with always start fresh. Here it starts fresh too, on
the servers' CPUs, and bench.scenarios.unpack_reference keeps the cheapest of a few runs,
so a ratio to it never looks better than it is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import uvloop

from bench import forwards
from bench.agents import _CRYPTO, _PACKAGING, _RESOLVER

WARM_UP = 300


async def measure(payloads: list[bytes], seconds: float, rate: float | None) -> dict[str, float]:
    """Unpack for `seconds` (paced at `rate`/s when given); counts and CPU."""
    from dovecote.didcomm import identity as identity_mod
    from dovecote.didcomm.packing import IdentitySecrets

    identity = identity_mod.load_or_create(
        forwards.mediator_identity(), ["http://127.0.0.1:1", "ws://127.0.0.1:1/ws"]
    )
    secrets = IdentitySecrets(identity)
    # Warm caches, allocator and clock for a while, as a server is warm when measured.
    for raw in payloads[:WARM_UP]:
        await _PACKAGING.unpack(_CRYPTO, _RESOLVER, secrets, raw)
    count, started = 0, time.perf_counter()
    cpu0 = time.process_time()
    while time.perf_counter() - started < seconds and count < len(payloads):
        if rate:
            due = started + count / rate
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
        await _PACKAGING.unpack(_CRYPTO, _RESOLVER, secrets, payloads[count])
        count += 1
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    return {"unpacks": count, "per_second": count / wall, "per_cpu_second": count / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.unpack_ref")
    parser.add_argument("payloads", type=Path)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=None)
    args = parser.parse_args()
    payloads = forwards._read(args.payloads)
    # uvloop, as the servers: the paced run pays a loop wake-up per unpack.
    print(json.dumps(uvloop.run(measure(payloads, args.seconds, args.rate))), flush=True)


if __name__ == "__main__":
    main()
