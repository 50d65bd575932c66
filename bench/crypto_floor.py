"""The envelope work one message costs the mediator on each path, with the server's own code.

`python -m bench.crypto_floor [--count N]` times, in one process and one after another:

- the accept: `Packer.unpack` of an anoncrypt forward (what POST / pays);
- the live push: `Packer.pack_for` of a Pickup 3.0 delivery holding that forward's
  attachment, authcrypted for its recipient;
- the acknowledgement: `Packer.unpack` of the recipient's authcrypted messages-received;
- the status reply: `Packer.pack_for` of the status message Pickup 3.0 says the mediator
  SHOULD answer a messages-received with;

and prints one JSON line with the CPU of each (µs, the cheapest of 3 passes), the push
again on aries_askar's wrappers (`push_wrappers_us`: what authcrypt cost before its askar
calls were made directly, askar_native.py) and the envelope work of a live delivery of
one message (accept + push + ack + status) ÷ that of the accept alone. No server, no
store, no HTTP. A server's live ÷ accept ratio adds push + ack + status to the accept's
whole cost (HTTP, store, wake-ups), so it is not bounded below by this ratio; what this
says is how much of a measured difference the envelopes explain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.agents import PICKUP, BenchAgent, make_forward


async def _cpu_us(op: Callable[[int], Awaitable[object]], count: int, passes: int = 3) -> float:
    """CPU µs per call of op(i) for i < count, the cheapest of `passes` (after one warm-up)."""
    for i in range(min(count, 50)):
        await op(i)
    best = float("inf")
    for _ in range(passes):
        started = time.process_time()
        for i in range(count):
            await op(i)
        best = min(best, (time.process_time() - started) / count * 1e6)
    return best


async def measure(count: int) -> dict[str, Any]:
    from dovecote.didcomm import askar_native, jwe
    from dovecote.didcomm import identity as identity_mod
    from dovecote.didcomm.packing import Packer

    with tempfile.TemporaryDirectory(prefix="dovecote-floor-") as tmp:
        identity = identity_mod.load_or_create(
            Path(tmp) / "identity.json", ["http://127.0.0.1:1", "ws://127.0.0.1:1/ws"]
        )
    packer = Packer(identity)
    mediator = identity.did
    agent = await BenchAgent.create()
    forwards = [await make_forward(agent.did, mediator, i) for i in range(count)]
    opened = [await packer.unpack(raw) for raw in forwards]
    deliveries: list[dict[str, Any]] = [
        {
            "id": str(uuid.uuid4()),
            "type": f"{PICKUP}/delivery",
            "body": {"recipient_did": agent.did},
            "attachments": [
                {
                    "id": uuid.uuid4().hex,
                    "data": {"json": u.message["attachments"][0]["data"]["json"]},
                }
            ],
        }
        for u in opened
    ]
    acks = [
        await agent.request(
            f"{PICKUP}/messages-received",
            mediator,
            {"message_id_list": [d["attachments"][0]["id"]]},
        )
        for d in deliveries
    ]

    async def accept(i: int) -> object:
        return await packer.unpack(forwards[i])

    async def push(i: int) -> object:
        return await packer.pack_for(deliveries[i], agent.did)

    async def ack(i: int) -> object:
        return await packer.unpack(acks[i])

    async def status(i: int) -> object:
        reply = {
            "id": str(uuid.uuid4()),
            "type": f"{PICKUP}/status",
            "thid": str(i),
            "body": {"message_count": 0, "total_bytes": 0, "live_delivery": True},
        }
        return await packer.pack_for(reply, agent.did)

    accept_us = await _cpu_us(accept, count)
    push_us = await _cpu_us(push, count)
    ack_us = await _cpu_us(ack, count)
    status_us = await _cpu_us(status, count)
    native = jwe._crypto
    jwe._crypto = askar_native.Wrapped()
    try:
        push_wrappers_us = await _cpu_us(push, count)
    finally:
        jwe._crypto = native
    live_us = accept_us + push_us + ack_us + status_us
    return {
        "count": count,
        "forward_bytes": sum(map(len, forwards)) // count,
        "accept_us": round(accept_us, 1),
        "push_us": round(push_us, 1),
        "push_wrappers_us": round(push_wrappers_us, 1),
        "ack_us": round(ack_us, 1),
        "status_us": round(status_us, 1),
        "envelopes_live_over_accept": round(live_us / accept_us, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.crypto_floor")
    parser.add_argument("--count", type=int, default=500)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.count))), flush=True)


if __name__ == "__main__":
    main()
