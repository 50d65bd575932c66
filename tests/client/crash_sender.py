"""A client process for the crash test: queue messages with deterministic ids, print each
id once `send` returned (durably queued), then wait for the outbox to drain.

    python crash_sender.py DATA_DIR TO_DID START COUNT PREFIX

Restarting it with the same arguments (and START = the number of ids printed) re-queues
nothing twice: a row with an existing id is ignored by the outbox.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from dovecote.client import Client, ClientConfig


async def main(data_dir: str, to: str, start: int, count: int, prefix: str) -> None:
    config = ClientConfig(
        data_dir=Path(data_dir),
        flush_interval=0.05,
        batch_size=20,
        backoff_base=0.05,
        backoff_max=0.5,
    )
    async with Client(config) as client:
        for i in range(start, count):
            plaintext = client.plaintext(to, f"message {i}")
            plaintext["id"] = f"{prefix}-{i:05d}"
            await client.send_many([(to, plaintext)])
            print(plaintext["id"], flush=True)
        while (await client.store.counts())["pending"]:
            await client.flush(max_wait=1.0)
            await asyncio.sleep(0.05)
        print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
