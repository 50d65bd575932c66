"""Two instances on one PostgreSQL database: a registration changed through one is what a
forward through the other sees, over HTTP (each instance keeps find_mediatee answers in
memory; tests/store/test_postgres.py proves the NOTIFY that keeps them true at the store).

No forward is stored for a recipient after its removal is known everywhere, none is lost
while it was registered, and an added one is served by the instance that did not add it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from support.agent import BASIC, CM3, ENCRYPTED, PICKUP, Agent, forward_to
from support.postgres import fresh_database
from support.server import ServerProcess, free_port


@pytest.fixture
def two_instances(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    first_port = free_port()
    with fresh_database() as url:
        env = {
            "DOVECOTE_STORE": url,
            "DOVECOTE_IDENTITY_FILE": str(tmp_path / "identity.json"),
            # One public address for both, as behind a load balancer.
            "DOVECOTE_PUBLIC_URL": f"http://127.0.0.1:{first_port}",
        }
        servers = [
            ServerProcess(
                data_dir=tmp_path / f"node{i}",
                port=port,
                env=env,
                log_path=tmp_path / f"node{i}.log",
            )
            for i, port in enumerate((first_port, free_port()))
        ]
        try:
            for server in servers:
                server.start()
            yield servers[0], servers[1]
        finally:
            for server in servers:
                server.kill()


# Well under MEDIATEE_CACHE_SECONDS (5 s), after which an instance would ask the
# database again even if no NOTIFY told it of the change: within this, only NOTIFY can.
WITHIN = 1.5


async def _until(check: Callable[[], object], what: str, seconds: float = WITHIN) -> None:
    for _ in range(int(seconds / 0.05)):
        if await check():  # type: ignore[misc]
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"{what} not seen within {seconds} s")


async def test_registration_changes_reach_the_other_instance(
    two_instances: tuple[ServerProcess, ServerProcess], client: httpx.AsyncClient
) -> None:
    first, second = two_instances
    alice = Agent.create(first.base_url, first.did, via_mediator=True)
    await alice.mediate(client)
    sent = {"accepted": 0}

    async def forward_via(server: ServerProcess, n: int) -> int:
        packed = await forward_to(server.base_url, alice, {"type": BASIC, "body": {"n": n}})
        r = await client.post(
            server.base_url + "/", content=packed, headers={"content-type": ENCRYPTED}
        )
        assert r.status_code in (202, 404), r.text
        sent["accepted"] += r.status_code == 202
        return r.status_code

    async def queued() -> int:
        status = await alice.request(client, f"{PICKUP}/status-request")
        return int(status["body"]["message_count"])

    async def update(via: ServerProcess, action: str) -> None:
        agent = dataclasses.replace(alice, base_url=via.base_url)
        body = {"updates": [{"recipient_did": alice.did, "action": action}]}
        reply = await agent.request(client, f"{CM3}/recipient-update", body)
        assert reply["body"]["updated"][0]["result"] == "success", reply

    # Registered through the first: the second stores for it, and keeps that answer.
    assert await forward_via(second, 0) == 202
    assert await forward_via(second, 1) == 202
    assert await queued() == 2

    # Removed through the first: the second stops storing for it (404) within moments.
    await update(first, "remove")
    counter = iter(range(2, 1000))

    async def refused() -> bool:
        return await forward_via(second, next(counter)) == 404

    await _until(refused, "a forward refused by the second instance after the removal")
    assert await forward_via(first, 999) == 404
    # Whatever the second accepted before it heard of the removal was stored, not lost.
    assert await queued() == sent["accepted"]

    # Added back through the second: the first, which last answered "nobody", serves it.
    await update(second, "add")
    before = sent["accepted"]

    async def stored_via_first() -> bool:
        return await forward_via(first, next(counter)) == 202

    await _until(stored_via_first, "a forward stored by the first instance after the add")
    assert sent["accepted"] == before + 1
    assert await queued() == sent["accepted"]
