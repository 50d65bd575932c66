"""SIGTERM mid-load: the server drains (503 + Retry-After to new POSTs), exits, restarts;
senders retry; every message that got a 202 is there after the restart, once."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import httpx

from chaos.load import Load, assert_clean, outcome
from support.agent import Agent
from support.mailbox import drain, pack_forwards
from support.server import ServerProcess

MESSAGES = 400


async def test_sigterm_mid_load_every_202_survives_the_restart(
    server_factory: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    server = server_factory(env={"DOVECOTE_DRAIN_DELAY": "0.5", "DOVECOTE_SHUTDOWN_TIMEOUT": "5"})
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    packed = await pack_forwards(server.base_url, alice, [f"t-{i}" for i in range(MESSAGES)])
    load = Load(server.base_url + "/", packed, senders=6)
    fault: dict[str, float] = {}

    async def terminate_and_restart() -> None:
        while len(load.accepted) < MESSAGES // 3:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        assert server.proc is not None
        fault["at"] = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(server.proc.wait, 60)
        fault["exited"] = time.monotonic()
        await asyncio.to_thread(server.start)

    await asyncio.gather(load.run(), terminate_and_restart())
    delivered = await drain(alice, client)
    # Recovery: from the signal until the restarted process accepted again.
    back = load.recovery_after(fault["exited"])
    recovery = None if back is None else fault["exited"] - fault["at"] + back
    result = outcome(
        "sigterm", load, delivered, recovery, f"drain_and_exit={fault['exited'] - fault['at']:.2f}s"
    )
    assert_clean(result)
    assert load.failures, "SIGTERM should have refused or cut some requests"
