"""`--workers 2` on PostgreSQL: two processes share the port, metrics add up, SIGTERM
stops both."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx

from support.agent import BASIC, ENCRYPTED, PICKUP, Agent, forward_to
from support.inspect import metric_value
from support.postgres import fresh_database

TOKEN = "workers-admin-token-0123456789abcdef012"


def _instances_seen(base_url: str, tries: int = 40) -> set[str]:
    seen = set()
    for _ in range(tries):
        # A new connection each time, so the kernel spreads them over both workers.
        # The instance id is a /health detail: it needs the admin token.
        seen.add(
            httpx.get(
                base_url + "/health", timeout=10, headers={"authorization": f"Bearer {TOKEN}"}
            ).json()["instance"]
        )
    return seen


async def test_two_workers_share_port_and_metrics(server_factory: Any) -> None:
    with fresh_database() as url:
        server = server_factory(
            env={"DOVECOTE_STORE": url, "DOVECOTE_ADMIN_TOKEN": TOKEN}, args=["--workers", "2"]
        )
        instances = await asyncio.to_thread(_instances_seen, server.base_url)
        assert len(instances) == 2, instances

        async with httpx.AsyncClient(timeout=30) as client:
            alice = Agent.create(server.base_url, server.did, via_mediator=True)
            await alice.mediate(client)
            total = 20
            for i in range(total):
                packed = await forward_to(server.base_url, alice, {"type": BASIC, "body": {"n": i}})
                async with httpx.AsyncClient() as fresh:  # new connection per message
                    r = await fresh.post(
                        server.base_url + "/", content=packed, headers={"content-type": ENCRYPTED}
                    )
                assert r.status_code == 202
            status = await alice.request(client, f"{PICKUP}/status-request")
            assert status["body"]["message_count"] == total
            text = (await client.get(server.base_url + "/metrics")).text
            assert metric_value(text, "dovecote_messages_accepted_total") == total

        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0


def test_killed_supervisor_takes_its_workers_along(server_factory: Any) -> None:
    import os
    import time

    with fresh_database() as url:
        server = server_factory(env={"DOVECOTE_STORE": url}, args=["--workers", "2"])
        assert server.proc is not None
        children = [
            int(p)
            for p in open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read().split()
        ]
        assert len(children) == 2
        server.kill(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(
            os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
            for pid in children
        ):
            assert time.monotonic() < deadline, "workers outlived their supervisor"
            time.sleep(0.2)


def test_workers_refuse_sqlite(server_factory: Any) -> None:
    server = server_factory(args=["--workers", "2"], start=False)
    server.start(wait=False)
    assert server.proc is not None
    assert server.proc.wait(timeout=60) != 0
    assert "PostgreSQL" in server.logs()
