"""Kill -9 the server while concurrent senders forward thousands of messages.

Senders behave as the docs tell clients to: a POST that did not get a 202 is retried with
the same bytes until it does. Afterwards every message is picked up exactly once: nothing
acknowledged with 202 is lost, and nothing is stored twice.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections import Counter

import httpx

from support.agent import BASIC, ENCRYPTED, Agent, forward_to
from support.mailbox import drain
from support.server import ServerProcess

# What a kill can lose or duplicate is the requests in flight at that moment (SENDERS of
# them), before and after it the same accept path repeats: `make test` sends 600 (the
# kills land after 120..360 202s), `make chaos` (DOVECOTE_CHAOS) the original 2,000.
MESSAGES = 2000 if os.environ.get("DOVECOTE_CHAOS") else 600
SENDERS = 8
KILLS = 2


async def test_sigkill_under_load_loses_and_duplicates_nothing(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)

    packed = [
        await forward_to(
            server.base_url, alice, {"id": f"m{i}", "type": BASIC, "body": {"content": f"m{i}"}}
        )
        for i in range(MESSAGES)
    ]
    pending: asyncio.Queue[int] = asyncio.Queue()
    for i in range(MESSAGES):
        pending.put_nowait(i)
    accepted: set[int] = set()
    failures = Counter[str]()

    async def sender() -> None:
        async with httpx.AsyncClient(timeout=5.0) as http:
            while True:
                try:
                    index = pending.get_nowait()
                except asyncio.QueueEmpty:
                    return
                while True:
                    try:
                        r = await http.post(
                            server.base_url + "/",
                            content=packed[index],
                            headers={"content-type": ENCRYPTED},
                        )
                        if r.status_code == 202:
                            accepted.add(index)
                            break
                        failures[f"http {r.status_code}"] += 1
                    except httpx.HTTPError as exc:
                        failures[type(exc).__name__] += 1
                    await asyncio.sleep(0.05)

    async def killer() -> None:
        for _ in range(KILLS):
            # Wait until a random share of the work is done, then pull the plug.
            target = random.randint(MESSAGES // 5, MESSAGES * 3 // 5)
            while len(accepted) < min(target, MESSAGES - 1):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            server.kill(signal.SIGKILL)
            await asyncio.sleep(0.2)
            await asyncio.to_thread(server.start)

    await asyncio.wait_for(
        asyncio.gather(killer(), *(sender() for _ in range(SENDERS))), timeout=240
    )
    assert len(accepted) == MESSAGES
    assert sum(failures.values()) > 0, "the kills should have interrupted some requests"

    seen = await drain(alice, client)  # each message exactly once
    assert len(seen) == MESSAGES, f"lost {MESSAGES - len(seen)} messages"
    duplicates = {k: v for k, v in seen.items() if v > 1}
    assert not duplicates, f"duplicated: {list(duplicates)[:10]}"
    print(
        f"\ncrash test: sent={MESSAGES} accepted={len(accepted)} delivered={len(seen)} "
        f"lost=0 duplicates=0 interrupted={dict(failures)}"
    )
