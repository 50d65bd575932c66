"""What handing anoncrypt envelopes to a decrypt worker (DECRYPT_WORKERS) costs the server
process, beside what opening them there costs: CPU time of this process only.

    python -m bench.decrypt_ipc [--batches 400]

Uses the benchmark's cached forwards (bench/.cache, written by a first `bench.run`) and
its mediator key file. Prints, per envelope: the in-process open (decrypt.open_one), the
parent's CPU per item when batches of 16 go through a real one-worker pool (pickle, pipe
write, read, unpickle, futures), and the pickle round trip of a batch of 16 alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import time

from bench import forwards
from dovecote.didcomm import decrypt, identity
from dovecote.didcomm.packing import Packer

BATCH = 16


def _envelopes() -> list[bytes]:
    files = sorted(forwards.CACHE.glob("forwards-*.bin"))
    if not files:
        raise SystemExit("no cached forwards: run `python -m bench.run --profile smoke` once")
    return forwards._read(files[0])[: BATCH * 64]


async def main(batches: int) -> None:
    ident = identity.load_or_create(
        forwards.mediator_identity(), ["http://127.0.0.1:1", "ws://127.0.0.1:1/ws"]
    )
    packer = Packer(ident)
    envelopes = _envelopes()
    batch = envelopes[:BATCH]
    assert all(decrypt.open_one(raw, packer.secret_for)[0] for raw in batch)

    started = time.process_time()
    for i in range(batches * BATCH):
        decrypt.open_one(envelopes[i % len(envelopes)], packer.secret_for)
    in_process = (time.process_time() - started) / (batches * BATCH)

    results = [decrypt.open_one(raw, packer.secret_for) for raw in batch]
    started = time.process_time()
    for _ in range(batches):
        pickle.loads(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
        pickle.loads(pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL))
    pickled = (time.process_time() - started) / batches

    # What asyncio alone costs per item here (a task per envelope, as gather makes one,
    # and a future resolved on the next loop turn): not the pool's, a request has a task.
    loop = asyncio.get_running_loop()

    async def nothing() -> None:
        future: asyncio.Future[None] = loop.create_future()
        loop.call_soon(future.set_result, None)
        await future

    started = time.process_time()
    for _ in range(batches):
        await asyncio.gather(*(nothing() for _ in batch))
    asyncio_only = (time.process_time() - started) / (batches * BATCH)

    pool = decrypt.DecryptPool(1, packer.secret_keys(), packer.secret_for)
    await pool.start()
    try:
        for _ in range(20):  # warm up
            await asyncio.gather(*(pool.open(raw) for raw in batch))
        started = time.process_time()
        for _ in range(batches):
            await asyncio.gather(*(pool.open(raw) for raw in batch))
        via_pool = (time.process_time() - started) / (batches * BATCH)
        assert pool.fallbacks == 0
    finally:
        await pool.stop()
    size = sum(map(len, batch)) / BATCH
    load = os.getloadavg()[0]
    print(f"envelopes of {size:.0f} bytes, {batches} batches of {BATCH}, load {load:.1f}")
    print(f"  open in process:                 {in_process * 1e6:7.1f} µs CPU per envelope")
    print(f"  through the pool, parent's CPU:  {via_pool * 1e6:7.1f} µs per envelope")
    print(f"  (a batch of {BATCH}, parent side:     {via_pool * BATCH * 1e6:7.1f} µs)")
    print(f"  of which asyncio (task, future):  {asyncio_only * 1e6:7.1f} µs per envelope")
    print(f"  pickle round trip of a batch:    {pickled * 1e6:7.1f} µs (both directions)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=400)
    asyncio.run(main(parser.parse_args().batches))
