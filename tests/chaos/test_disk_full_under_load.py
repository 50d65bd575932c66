"""Fill the disk under load (a tmpfs of a few MB), then free it: refusals are 507/503 with
Retry-After, nothing accepted is lost, senders' retries succeed once space is back."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from chaos.load import Load, assert_clean, outcome
from support.agent import BASIC, Agent, forward_to
from support.mailbox import drain
from support.server import ServerProcess

pytestmark = pytest.mark.slow

PAD = "x" * 8_000  # about 11 KB per message once encrypted
HEADROOM = 700_000


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(
            "cannot mount a tmpfs here (needs root); the page-limit variant is "
            "tests/reliability/test_disk_full.py"
        )
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


async def test_disk_full_under_load_refuses_then_recovers_without_loss(
    tiny_disk: Path,
    server_factory: Callable[..., ServerProcess],
    client: httpx.AsyncClient,
) -> None:
    server = server_factory(env={"DOVECOTE_MIN_FREE_DISK_BYTES": "0"}, data_dir=tiny_disk / "data")
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    count = 200
    packed = {
        f"d-{i}": await forward_to(
            server.base_url,
            alice,
            {"id": f"d-{i}", "type": BASIC, "body": {"content": f"d-{i}", "pad": PAD}},
        )
        for i in range(count)
    }
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(tiny_disk).free - HEADROOM))
    load = Load(server.base_url + "/", packed, senders=4, pace=0.01)
    marks: dict[str, float] = {}

    async def free_space() -> None:
        while not (load.failures["http 507"] + load.failures["http 503"]) >= 5:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        marks["full"] = time.monotonic()
        await asyncio.sleep(2.0)  # refusing for a while
        filler.unlink()
        marks["freed"] = time.monotonic()

    await asyncio.gather(load.run(within=120), free_space())
    delivered = await drain(alice, client, batch=10)
    result = outcome(
        "disk-full",
        load,
        delivered,
        load.recovery_after(marks["freed"]),
        f"refused_for={marks['freed'] - marks['full']:.2f}s",
    )
    assert_clean(result)
    assert set(load.failures) <= {"http 507", "http 503"}, load.failures
    assert (await client.get(server.base_url + "/health/live")).status_code == 200
