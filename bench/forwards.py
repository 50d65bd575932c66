"""Packed forwards, made once and cached on disk.

Packing a forward (an anoncrypt for the recipient inside an anoncrypt for the mediator)
costs two ECDH-ES encryptions, about as much CPU as the mediator spends accepting it, so
the pool is packed before any clock starts, in one process per core, and cached in
bench/.cache keyed by the mediator keys and recipients. Every forward in a pool is
distinct (Dovecote deduplicates by the digest of the inner message).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.agents import BenchAgent, make_forward

CACHE = Path(__file__).resolve().parent / ".cache"


def _pack_range(args: tuple[list[str], str, int, int, int, str]) -> list[bytes]:
    recipients, mediator_did, start, stop, pad, kid = args

    async def run() -> list[bytes]:
        return [
            await make_forward(recipients[i % len(recipients)], mediator_did, i, pad, kid)
            for i in range(start, stop)
        ]

    return asyncio.run(run())


def _write(path: Path, items: list[bytes]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for item in items:
            out.write(struct.pack("<I", len(item)))
            out.write(item)
    os.replace(tmp, path)


def _read(path: Path) -> list[bytes]:
    data = path.read_bytes()
    items, offset = [], 0
    while offset + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, offset)
        if offset + 4 + size > len(data):
            break  # a record cut short by an interrupted run
        items.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return items


def pool(
    recipients: list[str],
    mediator_did: str,
    count: int,
    pad: int = 200,
    processes: int | None = None,
    log: bool = True,
    kid: str = "#key-2",
) -> list[bytes]:
    """`count` distinct forwards spread round-robin over `recipients` (cached), each
    anoncrypted for the mediator's key `mediator_did + kid` (Dovecote's did:peer:2 lists
    its key-agreement key second, Veramo's first)."""
    CACHE.mkdir(exist_ok=True)
    # The mediator's keys, not its DID (which embeds the port), identify the cache.
    what: list[object] = [recipients, mediator_did.split(".")[1:3], pad]
    key = hashlib.sha256(json.dumps(what if kid == "#key-2" else [*what, kid]).encode())
    path = CACHE / f"forwards-{key.hexdigest()[:16]}.bin"
    have: list[bytes] = _read(path) if path.exists() else []
    if len(have) >= count:
        return have[:count]
    started, before = time.perf_counter(), len(have)
    processes = processes or os.cpu_count() or 1
    chunk = 2000
    jobs = [
        (recipients, mediator_did, s, min(s + chunk, count), pad, kid)
        for s in range(len(have), count, chunk)
    ]
    if not path.exists():
        _write(path, [])
    from bench.servers import all_cpus

    with ProcessPoolExecutor(processes, initializer=all_cpus) as executor, open(path, "ab") as out:
        # Appended chunk by chunk: an interrupted run keeps what it packed.
        for part in executor.map(_pack_range, jobs):
            have.extend(part)
            for item in part:
                out.write(struct.pack("<I", len(item)))
                out.write(item)
            out.flush()
    if log:
        took = time.perf_counter() - started
        print(f"  packed {len(have) - before} forwards in {took:.0f}s ({path.name})", flush=True)
    return have[:count]


async def load_agents(names: list[str]) -> dict[str, BenchAgent]:
    """Agents with keys kept in bench/.cache (so cached forwards stay valid)."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / "agents.json"
    seeds: dict[str, dict[str, str]] = json.loads(path.read_text()) if path.exists() else {}
    agents = {}
    for name in names:
        agents[name] = await BenchAgent.create(seeds.get(name))
        seeds[name] = agents[name].seed()
    path.write_text(json.dumps(seeds, indent=1))
    return agents


def mediator_identity() -> Path:
    """The mediator key file every benchmarked server uses (created on first use)."""
    from dovecote.didcomm import identity

    CACHE.mkdir(exist_ok=True)
    path = CACHE / "mediator-identity.json"
    identity.load_or_create(path, ["http://127.0.0.1:1", "ws://127.0.0.1:1/ws"])
    return path


def mediator_did() -> str:
    return str(json.loads(mediator_identity().read_text())["dids"][0])
