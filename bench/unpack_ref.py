"""The crypto floor of a forward, measured in a process of its own.

`python -m bench.unpack_ref PAYLOADS --seconds S [--rate R]` unpacks the anoncrypt
forwards in PAYLOADS (bench.forwards' file format) with didcomm-messaging + askar and
prints one JSON line: unpacks, per_second, per_cpu_second.

`--hop` hands each unpacked message to a thread and awaits its answer, the way a server's
request waits for its commit on the writer thread (one more thread woken per message, and
the loop woken again for the answer); `--no-unpack` leaves out the unpack, so that a paced
run measures what waking alone costs on this machine.

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
import queue
import threading
import time
from pathlib import Path

import uvloop

from bench import forwards
from bench.agents import _CRYPTO, _PACKAGING, _RESOLVER

WARM_UP = 300


def _hop_thread() -> queue.SimpleQueue[asyncio.Future[None]]:
    """A thread that answers each future put on its queue from its own side of the loop."""
    jobs: queue.SimpleQueue[asyncio.Future[None]] = queue.SimpleQueue()

    def run() -> None:
        while True:
            future = jobs.get()
            future.get_loop().call_soon_threadsafe(future.set_result, None)

    threading.Thread(target=run, daemon=True).start()
    return jobs


async def measure(
    payloads: list[bytes],
    seconds: float,
    rate: float | None,
    hop: bool = False,
    unpack: bool = True,
) -> dict[str, float]:
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
    jobs = _hop_thread() if hop else None
    loop = asyncio.get_running_loop()
    count, started = 0, time.perf_counter()
    cpu0 = time.process_time()
    while time.perf_counter() - started < seconds and count < len(payloads):
        if rate:
            due = started + count / rate
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
        if unpack:
            await _PACKAGING.unpack(_CRYPTO, _RESOLVER, secrets, payloads[count])
        if jobs is not None:
            answered: asyncio.Future[None] = loop.create_future()
            jobs.put(answered)
            await answered
        count += 1
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    return {"unpacks": count, "per_second": count / wall, "per_cpu_second": count / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.unpack_ref")
    parser.add_argument("payloads", type=Path)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--hop", action="store_true", help="await a thread after each unpack")
    parser.add_argument("--no-unpack", action="store_true", help="measure the pacing alone")
    args = parser.parse_args()
    payloads = forwards._read(args.payloads)
    # uvloop, as the servers: the paced run pays a loop wake-up per unpack.
    result = uvloop.run(measure(payloads, args.seconds, args.rate, args.hop, not args.no_unpack))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
