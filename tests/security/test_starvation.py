"""Slow and idle clients cannot starve others (issue 13 point 3).

A real server process; an attacker process on 127.0.0.1 (tests/security/attacker.py) runs a
bounded attack while the measured client, on another address (127.0.0.2: Linux answers all
of 127/8 on loopback), forwards a message and must get it accepted within a second:

- 1,000 connections each sending a POST body one byte every 2 s;
- 300 WebSocket handshakes/s on /ws, every accepted socket held open;
- 500 idle WebSockets.

MAX_WEBSOCKETS is 400 here so that a seconds-long attack can reach the global socket cap
(at the default 10,000 the same flood needs half a minute); every per-address limit is at
its default, and the timeouts are short so that the test watches them act. Before these
limits the other client got 503 for every forward under the slow bodies, and close 1013 on
/ws under both WebSocket attacks.

The per-address cap is checked on the server's own gauge of open connections, sampled
during the attack, not by counting the attacker's refusals: on a loaded machine the
attacker needs longer than the 2 s body deadline to open its 1,000 connections, so slots
freed by that deadline are taken again (rightly) and "refused" no longer equals 1000 - cap.
"""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from support.agent import BASIC, ENCRYPTED, PICKUP, Agent, forward_to
from support.server import ServerProcess

ATTACKER = Path(__file__).with_name("attacker.py")
OTHER_IP = "127.0.0.2"
# The bound the issue sets for the other client.
WITHIN = 1.0
ENV = {
    "DOVECOTE_MAX_WEBSOCKETS": "400",
    "DOVECOTE_HEADER_TIMEOUT": "2",
    "DOVECOTE_BODY_READ_TIMEOUT": "2",
    "DOVECOTE_WS_IDLE_TIMEOUT": "2",
}

SCENARIOS = {
    "slow_bodies": ["slow-body", "--count", "1000", "--interval", "2", "--seconds", "8"],
    "ws_handshakes": ["ws", "--count", "2400", "--rate", "300", "--seconds", "8"],
    "idle_sockets": ["ws", "--count", "500", "--rate", "250", "--seconds", "8"],
}


async def _http_forward(server: ServerProcess, packed: str) -> tuple[str, float]:
    """POST a forward on a new connection from OTHER_IP: (status or error, seconds)."""
    transport = httpx.AsyncHTTPTransport(local_address=OTHER_IP)
    async with httpx.AsyncClient(transport=transport, timeout=10.0) as client:
        started = time.perf_counter()
        try:
            response = await client.post(
                server.base_url + "/", content=packed, headers={"content-type": ENCRYPTED}
            )
            outcome = str(response.status_code)
        except httpx.HTTPError as exc:
            outcome = type(exc).__name__
        return outcome, time.perf_counter() - started


async def _sample_open_connections(server: ServerProcess, peaks: list[int]) -> None:
    """Append dovecote_connections_open, read from OTHER_IP, until cancelled. Samples can
    miss a peak, never invent one: a sampled peak above the cap is a real breach."""
    transport = httpx.AsyncHTTPTransport(local_address=OTHER_IP)
    async with httpx.AsyncClient(transport=transport, timeout=10.0) as client:
        while True:
            try:
                text = (await client.get(server.base_url + "/metrics")).text
            except httpx.HTTPError:
                text = ""
            for line in text.splitlines():
                if line.startswith("dovecote_connections_open "):
                    peaks.append(int(float(line.split()[1])))
            await asyncio.sleep(0.1)


async def _ws_forward(
    server: ServerProcess, alice: Agent, packed: str, status_request: str
) -> tuple[str, float]:
    """Connect /ws from OTHER_IP, send the forward, then the recipient's status-request:
    ('ok', seconds) when the status reply comes back (so the forward was handled)."""
    started = time.perf_counter()
    try:
        async with websockets.connect(
            server.ws_url, open_timeout=10, compression=None, proxy=None, local_addr=(OTHER_IP, 0)
        ) as ws:
            await ws.send(packed)
            await ws.send(status_request)
            frame = await asyncio.wait_for(ws.recv(), 10)
            if '"error"' in str(frame)[:200]:
                return f"error {str(frame)[:120]}", time.perf_counter() - started
            reply = await alice.unpack(frame)
            assert reply["type"] == f"{PICKUP}/status"
            return "ok", time.perf_counter() - started
    except websockets.ConnectionClosed as exc:
        return f"closed {exc.rcvd.code if exc.rcvd else None}", time.perf_counter() - started
    except (OSError, TimeoutError, websockets.InvalidStatus) as exc:
        return type(exc).__name__, time.perf_counter() - started


@pytest.fixture
def open_files() -> Iterator[None]:
    """Room for a thousand sockets in the server, which inherits this process's limit (a
    soft limit of 1024 is common; the attacker raises its own)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_other_client_is_served_during_attack(
    scenario: str,
    open_files: None,
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(env=dict(ENV))
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    async with httpx.AsyncClient(timeout=30.0) as client:
        await alice.mediate(client)
    probes = 4
    forwards = [
        await forward_to(server.base_url, alice, {"type": BASIC, "body": {"n": n}})
        for n in range(2 * probes)
    ]
    status_request = await alice.pack(alice.message(f"{PICKUP}/status-request"))

    attacker = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ATTACKER),
        *SCENARIOS[scenario],
        "--port",
        str(server.port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    results: list[tuple[str, str, float]] = []
    open_connections: list[int] = []
    sampler = asyncio.ensure_future(
        _sample_open_connections(server, open_connections)
        if scenario == "slow_bodies"
        else asyncio.sleep(0)
    )
    try:
        await asyncio.sleep(3.0)  # the attack is in place
        for n in range(probes):
            results.append(("http", *await _http_forward(server, forwards[n])))
            if scenario != "slow_bodies":
                results.append(
                    ("ws", *await _ws_forward(server, alice, forwards[probes + n], status_request))
                )
            await asyncio.sleep(0.5)
        out, err = await asyncio.wait_for(attacker.communicate(), 60)
    finally:
        sampler.cancel()
        if attacker.returncode is None:
            attacker.kill()
            await attacker.wait()
    lines = out.decode().strip().splitlines()
    assert attacker.returncode == 0 and lines, err.decode()[-3000:]
    attack: dict[str, Any] = json.loads(lines[-1])
    latencies = [round(seconds, 3) for _, _, seconds in results]
    print(
        f"\n{scenario}: attacker {attack}; other client {results}; "
        f"open connections (sampled) peak {max(open_connections, default=None)}"
    )

    assert all(outcome in ("202", "ok") for _, outcome, _ in results), (results, attack)
    # Every probe within the bound on a quiet machine; the median keeps one hiccup of a
    # loaded 2-core CI runner from failing the test, the max keeps "very slow" out.
    assert statistics.median(latencies) <= WITHIN, (latencies, attack)
    assert max(latencies) <= 3 * WITHIN, (latencies, attack)
    if scenario == "slow_bodies":
        # Past the per-address cap (256) connections are refused at once (429); the rest are
        # cut off by the body deadline (408, or reset if the attacker's next byte crossed
        # the close), none is still held when the attack ends.
        refused = attack.get("429_at_once", 0) + attack.get("429_later", 0)
        cut = attack.get("408_later", 0) + attack.get("reset", 0)
        assert refused >= 1 and attack.get("408_later", 0) >= 1, attack
        assert refused + cut == 1000, attack  # none held to the end, none failed to connect
        # The attacker's connections plus the probe's and the sampler's: never past the cap.
        assert open_connections, "no /metrics sample"
        assert max(open_connections) <= 256 + 2, (max(open_connections), attack)
    else:
        # Past the handshake rate or the per-address socket cap (128): 429 before the
        # handshake; the sockets it keeps are closed when idle.
        assert attack.get("http_429", 0) >= 1, attack
        assert attack.get("open_at_end", 0) <= 128, attack
        assert attack.get("closed_1000", 0) >= 1, attack
