"""Disk full: accepts are refused (507/503) without a 202, nothing accepted is lost, and
the service recovers when space returns.

A real small filesystem (tmpfs, needs root) when it can be mounted; otherwise SQLite's
page limit (DOVECOTE_STORE_MAX_PAGES) stands in for the full disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from reliability.helpers import post, wait_until
from support.agent import BASIC, PICKUP, Agent, forward_to
from support.server import ServerProcess

PAD = "x" * 16_000  # each message about 22 KB once encrypted
HEADROOM = 600_000  # free bytes left on the tiny disk before the test starts filling it


@dataclass
class TinyDisk:
    path: Path
    mounted: bool


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[TinyDisk]:
    """A 4 MB tmpfs; DOVECOTE_TEST_TINY_DISK=pages uses the page limit even as root."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = (
        os.environ.get("DOVECOTE_TEST_TINY_DISK") != "pages"
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
            capture_output=True,
        ).returncode
        == 0
    )
    yield TinyDisk(mount, mounted)
    if mounted:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


async def test_disk_full_refuses_keeps_everything_and_recovers(
    tiny_disk: TinyDisk,
    server_factory: Callable[..., ServerProcess],
    client: httpx.AsyncClient,
) -> None:
    env = {"DOVECOTE_MIN_FREE_DISK_BYTES": "0"}
    if not tiny_disk.mounted:
        env["DOVECOTE_STORE_MAX_PAGES"] = "300"  # 1.2 MB of 4 KiB pages
    server = server_factory(env=env, data_dir=tiny_disk.path / "data")
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    bob = Agent.create(server.base_url)

    filler = tiny_disk.path / "filler"
    if tiny_disk.mounted:
        free = shutil.disk_usage(tiny_disk.path).free
        filler.write_bytes(b"\0" * max(0, free - HEADROOM))

    async def send(n: int) -> int:
        packed = await forward_to(
            server.base_url,
            alice,
            {"id": f"m-{n}", "type": BASIC, "body": {"n": n, "pad": PAD}},
            bob,
        )
        response = await post(client, server, packed)
        if response.status_code != 202:
            assert response.headers.get("retry-after"), response.headers
        return response.status_code

    accepted: list[str] = []
    refusals: list[int] = []
    for n in range(300):
        status = await send(n)
        if status == 202:
            accepted.append(f"m-{n}")
        else:
            refusals.append(status)
            if len(refusals) >= 3:
                break
    assert refusals and set(refusals) <= {507, 503}, refusals
    assert len(accepted) >= 5
    assert (await client.get(server.base_url + "/health/live")).status_code == 200

    # Space returns: a bigger disk, or (page limit) the mailbox owner picks up and acks.
    picked: set[str] = set()

    async def pick_up(limit: int, ack: bool) -> None:
        delivery = await alice.request(client, f"{PICKUP}/delivery-request", {"limit": limit})
        ids = []
        for attachment in delivery.get("attachments", []):
            inner = await alice.unpack(json.dumps(attachment["data"]["json"]))
            picked.add(inner["id"])
            ids.append(attachment["id"])
        if ack and ids:
            await alice.request(client, f"{PICKUP}/messages-received", {"message_id_list": ids})

    if tiny_disk.mounted:
        filler.unlink()
    else:
        await pick_up(min(5, len(accepted) // 2), ack=True)
    late = 1000

    async def accepted_again() -> bool:
        nonlocal late
        late += 1
        if await send(late) == 202:
            accepted.append(f"m-{late}")
            return True
        return False

    assert await wait_until(accepted_again, 15, interval=0.5)

    # Nothing accepted was lost: every 202 is either picked up already or still queued.
    # (Small batches: SICPA's didcomm cannot decrypt messages past about 190 KB.)
    while True:
        before = len(picked)
        await pick_up(5, ack=True)
        if len(picked) == before:
            break
    assert set(accepted) <= picked, sorted(set(accepted) - picked)[:10]
