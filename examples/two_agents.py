"""Two agents talk through a Dovecote mediator, using only the client library.

Agent A mediates through the Dovecote at URL and shares its routed DID; agent B (which
needs no mediator to send) sends A a few messages through its durable outbox; A receives
them over live WebSocket delivery and prints them.

    dovecote serve --data-dir /tmp/dovecote-demo &        # or any running Dovecote
    python examples/two_agents.py http://127.0.0.1:8080

Each agent keeps its keys and outbox in its own directory (default: a fresh temporary
one; pass --keep DIR to reuse identities across runs).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import httpx

from dovecote.client import Client, ClientConfig, Received


async def main(url: str, base: Path, count: int) -> None:
    # The invitation URL is what an operator would hand out; a Dovecote serves its own.
    async with httpx.AsyncClient() as http:
        invitation = (await http.get(f"{url.rstrip('/')}/invitation?format=url")).text

    # flush_interval: how long a message may wait for its batch to fill (default 5 s).
    config_a = ClientConfig(data_dir=base / "agent-a")
    config_b = ClientConfig(data_dir=base / "agent-b", flush_interval=0.5)
    async with Client(config_a, create=True) as a, Client(config_b, create=True) as b:
        a_did = await a.mediate(invitation)
        print(f"A mediated; its DID is {a_did[:60]}...")

        done = asyncio.Event()
        received: list[Received] = []

        def show(message: Received) -> None:
            received.append(message)
            print(f"A received {message.body.get('content')!r} from {str(message.sender)[:40]}...")
            if len(received) == count:
                done.set()

        stop = asyncio.Event()
        listening = asyncio.create_task(a.live(show, stop))
        await asyncio.wait_for(a.inbox().live_on.wait(), 10)

        ids = [await b.send(a_did, f"hello #{i} from B") for i in range(count)]
        print(f"B queued {len(ids)} messages durably; its outbox sends them in one batch")
        states = [item.state for item in await b.wait_sent(ids, max_wait=30)]
        print(f"B's outbox: {states.count('sent')} sent, {states.count('failed')} failed")

        await asyncio.wait_for(done.wait(), 30)
        stop.set()
        await listening
    print("done")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "url", nargs="?", default="http://127.0.0.1:8080", help="base URL of a running Dovecote"
    )
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument(
        "--keep", type=Path, default=None, help="directory for the agents' keys and outboxes"
    )
    args = parser.parse_args()
    if args.keep is not None:
        asyncio.run(main(args.url, args.keep, args.count))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(args.url, Path(tmp), args.count))
