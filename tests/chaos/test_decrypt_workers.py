"""Decrypt worker processes (DECRYPT_WORKERS) in a real server: forwards accepted through
them are stored once each; a worker killed under load costs no request an error and no
message; a killed server leaves no worker behind.

Senders here do not retry: with decrypt workers every POST must get its 202 the first
time, whatever happens to a worker (its envelopes are opened again elsewhere).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable

import httpx
import psutil
import pytest

from support.agent import BASIC, ENCRYPTED, Agent, forward_to
from support.mailbox import drain
from support.server import ServerProcess

SENDERS = 8
TOKEN = "decrypt-admin-token-0123456789abcdef0123"


def _workers(server: ServerProcess) -> list[psutil.Process]:
    """The server's decrypt worker processes (its children running the worker module)."""
    assert server.proc is not None
    return [
        child
        for child in psutil.Process(server.proc.pid).children()
        if "dovecote.didcomm.decrypt" in " ".join(child.cmdline())
    ]


async def _packed(server: ServerProcess, alice: Agent, count: int) -> list[str]:
    return [
        await forward_to(
            server.base_url, alice, {"id": f"m{i}", "type": BASIC, "body": {"content": f"m{i}"}}
        )
        for i in range(count)
    ]


async def _send_all(
    server: ServerProcess, packed: list[str], during: Callable[[set[int]], object] | None = None
) -> tuple[set[int], Counter[str]]:
    """POST every envelope once from SENDERS concurrent clients; no retries."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(packed)):
        queue.put_nowait(index)
    accepted: set[int] = set()
    refused = Counter[str]()

    async def sender() -> None:
        async with httpx.AsyncClient(timeout=30.0) as http:
            while not queue.empty():
                index = queue.get_nowait()
                try:
                    r = await http.post(
                        server.base_url + "/",
                        content=packed[index],
                        headers={"content-type": ENCRYPTED},
                    )
                except httpx.HTTPError as exc:
                    refused[type(exc).__name__] += 1
                    continue
                if r.status_code == 202:
                    accepted.add(index)
                else:
                    refused[f"http {r.status_code}"] += 1

    tasks = [sender() for _ in range(SENDERS)]
    if during is not None:
        tasks.append(during(accepted))  # type: ignore[arg-type]
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=240)
    return accepted, refused


def _metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_forwards_through_decrypt_workers_are_stored_once(
    store_engine: dict[str, str],
    server_factory: Callable[..., ServerProcess],
    client: httpx.AsyncClient,
) -> None:
    server = server_factory(
        env={**store_engine, "DOVECOTE_DECRYPT_WORKERS": "2", "DOVECOTE_ADMIN_TOKEN": TOKEN}
    )
    workers = _workers(server)
    assert len(workers) == 2
    # The pool in /health details (sampled at start, then every few seconds).
    answer = await client.get(
        server.base_url + "/health", headers={"authorization": f"Bearer {TOKEN}"}
    )
    details = answer.json()
    assert details["decrypt_workers"]["alive"] == 2
    assert sorted(details["decrypt_workers"]["pids"]) == sorted(w.pid for w in workers)
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)  # authcrypt: opened in the server process
    packed = await _packed(server, alice, 200)
    accepted, refused = await _send_all(server, packed)
    assert not refused and len(accepted) == len(packed)
    # Opened by the workers, none in the server process.
    assert _metric(server, "dovecote_decrypt_in_process_total") == 0
    assert _metric(server, "dovecote_decrypt_items_total") == len(packed)
    assert 1 <= _metric(server, "dovecote_decrypt_frames_total") <= len(packed)
    assert _metric(server, "dovecote_decrypt_workers") == 2
    seen = await drain(alice, client)
    assert seen == Counter({f"m{i}": 1 for i in range(len(packed))})


async def test_sigkilled_decrypt_workers_cost_no_request_and_no_message(
    server_factory: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    server = server_factory(env={"DOVECOTE_DECRYPT_WORKERS": "2"})
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    packed = await _packed(server, alice, 800)
    killed: list[int] = []

    async def killer(accepted: set[int]) -> None:
        # One worker, then the other.
        for share, victims, restarts in ((0.25, 1, 1), (0.6, 1, 2)):
            while len(accepted) < len(packed) * share:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            for victim in _workers(server)[:victims]:
                victim.send_signal(signal.SIGKILL)
                killed.append(victim.pid)
            # Until the replacements are ready, so the next kill finds two live workers.
            while (  # noqa: ASYNC110
                await asyncio.to_thread(_metric, server, "dovecote_decrypt_worker_restarts_total")
                < restarts
                or await asyncio.to_thread(_metric, server, "dovecote_decrypt_workers") < 2
            ):
                await asyncio.sleep(0.05)

    accepted, refused = await _send_all(server, packed, killer)
    assert len(killed) == 2
    assert not refused, f"requests failed while workers were killed: {dict(refused)}"
    assert len(accepted) == len(packed)
    assert _metric(server, "dovecote_decrypt_worker_restarts_total") == 2
    seen = await drain(alice, client)
    assert len(seen) == len(packed), f"lost {len(packed) - len(seen)} messages"
    assert not [k for k, v in seen.items() if v > 1], "duplicated messages"
    assert not set(killed) & {w.pid for w in _workers(server)}
    rerun = [e["items"] for e in server.log_events() if e.get("event") == "decrypt.items_rerun"]
    print(f"\nkilled 2 decrypt workers: {len(packed)} accepted, items they held: {rerun}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_no_decrypt_worker_outlives_the_server(
    server_factory: Callable[..., ServerProcess], sig: signal.Signals
) -> None:
    server = server_factory(env={"DOVECOTE_DECRYPT_WORKERS": "2"})
    workers = _workers(server)
    assert len(workers) == 2
    server.kill(sig)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(w.is_running() for w in workers):
        time.sleep(0.05)
    alive = [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"decrypt workers left after {sig.name}: {alive}"
