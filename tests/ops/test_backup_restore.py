"""Backup under load, restore elsewhere, every accepted message still there.

The server is real, the messages are real DIDComm forwards (SICPA didcomm), the backup,
verify and restore are the `dovecote` commands an operator runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from support.agent import Agent
from support.mailbox import drain, pack_forwards, post, post_all
from support.server import ROOT, ServerProcess

BEFORE = 100  # accepted before the background sender starts
COMMAND_TIMEOUT = 120.0


def _read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def dovecote(*args: str) -> tuple[int, str]:
    """Run a `dovecote` command without blocking the event loop (senders keep sending)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dovecote",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"dovecote {' '.join(args)} still running") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_backup_under_load_restores_every_message_accepted_before_it(
    server_factory: Callable[..., ServerProcess], client: httpx.AsyncClient, tmp_path: Path
) -> None:
    server = server_factory()
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    accepted = await post_all(
        client,
        server.base_url,
        await pack_forwards(server.base_url, alice, [f"before-{i}" for i in range(BEFORE)]),
    )
    assert len(accepted) == BEFORE

    # A sender that keeps forwarding (one fresh message at a time) through the backup.
    load: list[tuple[float, str]] = []
    sent: set[str] = set()
    stop = asyncio.Event()

    async def sender() -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            while not stop.is_set():
                mid = f"load-{uuid.uuid4().hex[:12]}"
                packed = await pack_forwards(server.base_url, alice, [mid])
                sent.add(mid)
                if await post(http, server.base_url, packed[mid]) == 202:
                    load.append((time.time(), mid))

    task = asyncio.create_task(sender())
    while len(load) < 20:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    before_backup = accepted | {mid for _, mid in load}

    # Small steps with pauses, so the copy spans many steps while the sender writes.
    backup = tmp_path / "backups" / "relay.db"
    started = time.time()
    code, out = await dovecote(
        "backup",
        str(backup),
        "--data-dir",
        str(server.data_dir),
        "--step-pages",
        "4",
        "--step-sleep",
        "0.01",
    )
    finished = time.time()
    await asyncio.sleep(0.3)
    stop.set()
    await task
    assert code == 0, out
    during = [mid for at, mid in load if started <= at <= finished]
    assert during, "the sender should have been accepted while the backup ran"

    manifest = _read_json(Path(f"{backup}.manifest.json"))
    copy_start = manifest["created_at"]
    copying = [mid for at, mid in load if copy_start <= at <= copy_start + manifest["seconds"]]
    assert copying, "writes must go on while the stepped copy runs"
    assert manifest["schema_version"] >= 1
    assert manifest["tables"]["messages"] >= len(before_backup)
    assert stat.S_IMODE(os.stat(f"{backup}.identity.json").st_mode) == 0o600

    # Verify; restore into the running server's data directory (refused) and into a
    # fresh one (done), all three at once.
    restored_dir = tmp_path / "restored"
    (code, out), (busy_code, busy_out), (restore_code, restore_out) = await asyncio.gather(
        dovecote("verify", str(backup)),
        dovecote("restore", str(backup), "--data-dir", str(server.data_dir)),
        dovecote("restore", str(backup), "--data-dir", str(restored_dir)),
    )
    assert code == 0 and out.startswith("OK"), out
    assert busy_code == 1 and "in use by pid" in busy_out, busy_out
    assert restore_code == 0, restore_out
    assert stat.S_IMODE(os.stat(restored_dir / "identity.json").st_mode) == 0o600

    restored = server_factory(data_dir=restored_dir)
    alice.base_url, alice.mediator_did = restored.base_url, restored.did
    seen = await drain(alice, client)

    missing = before_backup - set(seen)
    assert not missing, f"{len(missing)} messages accepted before the backup are missing"
    assert all(count == 1 for count in seen.values()), "duplicates after restore"
    assert set(seen) <= accepted | sent
    assert sum(seen.values()) == manifest["tables"]["messages"]
    print(
        f"\nbackup under load: accepted before={len(before_backup)} "
        f"during backup={len(during)} (during the copy itself {len(copying)}) "
        f"restored={len(seen)} "
        f"backup took {finished - started:.2f}s (incl. process start) "
        f"copy {manifest['seconds']}s, {manifest['database']['bytes']} bytes"
    )


async def test_second_server_on_a_held_data_dir_is_refused(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory()  # SQLite: the lock is the SQLite store's
    code, out = await dovecote("serve", "--port", "0", "--data-dir", str(server.data_dir))
    assert code == 1 and "in use by pid" in out, out
    assert server.proc is not None and server.proc.poll() is None


async def test_scheduled_backups_are_made_verified_and_pruned(
    server_factory: Callable[..., ServerProcess], client: httpx.AsyncClient, tmp_path: Path
) -> None:
    backups = tmp_path / "scheduled"
    server = server_factory(
        args=[
            "--backup-dir",
            str(backups),
            "--backup-interval",
            "1",
            "--backup-keep-hourly",
            "1",
            "--backup-keep-daily",
            "1",
        ]
    )
    deadline = time.monotonic() + 30
    while sum(e["event"] == "backup.made" for e in server.log_events()) < 3:
        assert time.monotonic() < deadline, server.logs()
        await asyncio.sleep(0.2)
    metrics = (await client.get(server.base_url + "/metrics")).text
    await asyncio.to_thread(server.stop)
    made = sum(e["event"] == "backup.made" for e in server.log_events())
    assert any(e["event"] == "backup.pruned" for e in server.log_events())
    # Every backup falls in the same hour and day, so retention keeps only the newest; one
    # more may have completed between the last prune and the stop.
    manifests = sorted(backups.glob("dovecote-*.db.manifest.json"))
    assert made >= 3 and 1 <= len(manifests) <= 2, [p.name for p in backups.iterdir()]
    for manifest in manifests:
        code, out = await dovecote("verify", str(manifest).removesuffix(".manifest.json"))
        assert code == 0, out
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith("dovecote_backup_last_success_timestamp_seconds ")
    )
    assert abs(float(line.split()[1]) - time.time()) < 60
