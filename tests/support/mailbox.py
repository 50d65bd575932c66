"""Fill and empty a mediated mailbox the way real agents do (SICPA didcomm, over HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter

import httpx

from support.agent import BASIC, ENCRYPTED, PICKUP, Agent, forward_to


async def pack_forwards(base_url: str, recipient: Agent, ids: list[str]) -> dict[str, str]:
    """Forwards to `recipient` carrying inner messages with the given ids."""
    return {
        mid: await forward_to(
            base_url, recipient, {"id": mid, "type": BASIC, "body": {"content": mid}}
        )
        for mid in ids
    }


async def post(client: httpx.AsyncClient, base_url: str, packed: str) -> int:
    response = await client.post(
        base_url + "/", content=packed, headers={"content-type": ENCRYPTED}
    )
    return response.status_code


async def post_all(
    client: httpx.AsyncClient,
    base_url: str,
    packed: dict[str, str],
    concurrency: int = 8,
    patience: float = 60.0,
) -> set[str]:
    """POST every forward, retrying (same bytes) as senders must until a 202 or until
    `patience` seconds have passed; the ids that got a 202."""
    gate = asyncio.Semaphore(concurrency)
    accepted: set[str] = set()
    deadline = time.monotonic() + patience

    async def one(mid: str, body: str) -> None:
        async with gate:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError):
                    if await post(client, base_url, body) == 202:
                        accepted.add(mid)
                        return
                await asyncio.sleep(0.2)

    await asyncio.gather(*(one(mid, body) for mid, body in packed.items()))
    return accepted


async def drain(agent: Agent, client: httpx.AsyncClient, batch: int = 25) -> Counter[str]:
    """Pick up, decrypt and acknowledge everything queued for `agent`; inner id -> count.

    Batches stay small because SICPA's didcomm (authlib) fails to decrypt authcrypt
    messages over ~128 KiB.
    """
    seen = Counter[str]()
    while True:
        delivery = await agent.request(client, f"{PICKUP}/delivery-request", {"limit": batch})
        if delivery["type"] == f"{PICKUP}/status":
            assert delivery["body"]["message_count"] == 0, delivery
            return seen
        ids = []
        for attachment in delivery["attachments"]:
            inner = await agent.unpack(json.dumps(attachment["data"]["json"]))
            assert inner["body"]["content"] == inner["id"]
            seen[inner["id"]] += 1
            ids.append(attachment["id"])
        await agent.request(client, f"{PICKUP}/messages-received", {"message_id_list": ids})
