"""PostgreSQL: base backup + WAL archive, restored twice, with Dovecote on top.

The procedure is docs/runbook.md's, run for real on throwaway clusters:
1. a cluster with WAL archiving; a Dovecote server accepts batch A;
2. `pg_basebackup`; batch B accepted; restore point `before-c`; batch C accepted;
3. the WAL is switched and archived, then Dovecote and the cluster are killed;
4. restore to the end of the archive: Dovecote on it hands out A + B + C;
5. point-in-time restore to `before-c`: Dovecote on it hands out A + B and nothing of C.
Every message is picked up over DIDComm and decrypted by its recipient.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from support.agent import Agent
from support.mailbox import drain, pack_forwards, post_all
from support.server import ServerProcess, free_port

BATCH = 25
RUN_USER = os.environ.get("DOVECOTE_PG_USER", "postgres")


def _pg_bin() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
    )
    return Path(found[-1]).parent if found else None


PG_BIN = _pg_bin()
pytestmark = pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL server binaries missing")


def _as_owner(*cmd: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool as the clusters' owner (initdb refuses root)."""
    args = [str(c) for c in cmd]
    if os.geteuid() == 0:
        args = ["runuser", "-u", RUN_USER, "--", *args]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert not check or result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


@dataclass
class Cluster:
    """One throwaway PostgreSQL cluster in `data`, listening on 127.0.0.1:`port`."""

    home: Path
    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def configure(self, **settings: str) -> None:
        lines = [f"{k} = '{v}'" for k, v in settings.items()]
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n".join(["", "# dovecote test", *lines, ""]))

    @property
    def log(self) -> Path:
        return self.data.parent / f"{self.data.name}.log"

    def start(self) -> None:
        assert PG_BIN is not None
        for _ in range(3):
            result = _as_owner(
                PG_BIN / "pg_ctl",
                "-D",
                self.data,
                "-l",
                self.log,
                "-w",
                "-t",
                "60",
                "start",
                check=False,
            )
            if result.returncode == 0:
                return
            log = self.log.read_text() if self.log.exists() else ""
            if "could not bind" not in log and "already in use" not in log:
                break
            # Another process took the port between free_port() and the bind: move on.
            self.port = free_port()
            self.configure(port=str(self.port))
        raise AssertionError(
            f"{self.data.name} did not start:\n{result.stderr}\n"
            + (self.log.read_text()[-3000:] if self.log.exists() else "")
        )

    def stop(self, mode: str = "fast") -> None:
        assert PG_BIN is not None
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                ["runuser", "-u", RUN_USER, "--"] * (os.geteuid() == 0)
                + [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
                capture_output=True,
                timeout=60,
            )

    async def sql(self, query: str) -> object:
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetchval(query)
        finally:
            await conn.close()

    async def wait_promoted(self) -> None:
        """Wait until recovery has ended (a hot standby accepts reads before that)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                if await self.sql("SELECT pg_is_in_recovery()") is False:
                    return
            except (OSError, asyncpg.PostgresError):
                pass
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            await asyncio.sleep(0.2)


@pytest.fixture
def pg_home() -> Iterator[Path]:
    """A directory the clusters' owner can use (pytest's tmp_path is root-only)."""
    home = Path(tempfile.mkdtemp(prefix="dovecote-pitr-"))
    if os.geteuid() == 0:
        shutil.chown(home, RUN_USER)
    yield home
    for data in home.iterdir():
        if (data / "postmaster.pid").exists():
            Cluster(home, data, 0).stop("immediate")
    shutil.rmtree(home, ignore_errors=True)


def _restore(home: Path, base: Path, archive: Path, name: str, **target: str) -> Cluster:
    """A new cluster from the base backup, replaying the archive (up to `target`)."""
    cluster = Cluster(home, home / name, free_port())
    _as_owner("cp", "-a", base, cluster.data)
    # fsync off: this copy only has to show what the archive holds, not survive a crash.
    cluster.configure(
        port=str(cluster.port),
        archive_mode="off",
        fsync="off",
        restore_command=f"cp {archive}/%f %p",
        **target,
    )
    _as_owner("touch", cluster.data / "recovery.signal")
    return cluster


def _server_on(
    server_factory: Callable[..., ServerProcess], cluster: Cluster, identity: Path, data_dir: Path
) -> ServerProcess:
    """A Dovecote server on `cluster` with the mediator keys from the original."""
    data_dir.mkdir(parents=True)
    shutil.copy2(identity, data_dir / "identity.json")
    return server_factory(
        env={"DOVECOTE_STORE": cluster.url}, data_dir=data_dir, start=False
    ).start(wait=False)


async def test_base_backup_and_wal_archive_restore_every_accepted_message(
    server_factory: Callable[..., ServerProcess],
    client: httpx.AsyncClient,
    pg_home: Path,
    tmp_path: Path,
) -> None:
    assert PG_BIN is not None
    archive = pg_home / "archive"
    _as_owner("mkdir", archive)
    primary = Cluster(pg_home, pg_home / "primary", free_port())
    _as_owner(
        PG_BIN / "initdb",
        "-D",
        primary.data,
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    )
    primary.configure(
        listen_addresses="127.0.0.1",
        port=str(primary.port),
        unix_socket_directories=str(pg_home),
        wal_level="replica",
        archive_mode="on",
        # Copy then rename: a restore that reads the archive while a segment is
        # being copied must never see a partial file ("wrong size", seen on a
        # loaded machine).
        archive_command=(
            f"test ! -f {archive}/%f && cp %p {archive}/%f.part"
            f" && mv {archive}/%f.part {archive}/%f"
        ),
        max_wal_senders="4",
    )
    primary.start()

    server = server_factory(env={"DOVECOTE_STORE": primary.url})
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)

    async def accept(prefix: str) -> set[str]:
        batch = await pack_forwards(server.base_url, alice, [f"{prefix}-{i}" for i in range(BATCH)])
        accepted = await post_all(client, server.base_url, batch)
        assert len(accepted) == BATCH
        return accepted

    batch_a = await accept("a")
    base = pg_home / "base"
    _as_owner(
        PG_BIN / "pg_basebackup",
        "-D",
        base,
        "-h",
        "127.0.0.1",
        "-p",
        str(primary.port),
        "-U",
        "postgres",
        "-X",
        "stream",
        "-c",
        "fast",
        "--no-password",
        "--no-sync",
    )  # the test's only shortcut; the runbook's command syncs
    batch_b = await accept("b")
    await primary.sql("SELECT pg_create_restore_point('before-c')")
    batch_c = await accept("c")
    segment = await primary.sql("SELECT pg_walfile_name(pg_switch_wal())")
    deadline = time.monotonic() + 60
    while not (archive / str(segment)).exists():
        assert time.monotonic() < deadline, f"{segment} not archived"
        await asyncio.sleep(0.1)

    # The original is gone: Dovecote killed, the cluster stopped without a checkpoint.
    server.kill()
    primary.stop("immediate")

    latest = _restore(pg_home, base, archive, "latest")
    pitr = _restore(
        pg_home,
        base,
        archive,
        "pitr",
        recovery_target_name="before-c",
        recovery_target_action="promote",
    )
    for cluster in (latest, pitr):
        cluster.start()
    await asyncio.gather(latest.wait_promoted(), pitr.wait_promoted())

    identity = server.data_dir / "identity.json"
    on_latest = _server_on(server_factory, latest, identity, tmp_path / "on-latest")
    on_pitr = _server_on(server_factory, pitr, identity, tmp_path / "on-pitr")
    await asyncio.gather(
        asyncio.to_thread(on_latest.wait_ready), asyncio.to_thread(on_pitr.wait_ready)
    )

    found: dict[str, set[str]] = {}
    for name, restored in (("latest", on_latest), ("pitr", on_pitr)):
        alice.base_url, alice.mediator_did = restored.base_url, restored.did
        seen = await drain(alice, client)
        assert all(count == 1 for count in seen.values()), name
        found[name] = set(seen)

    assert found["latest"] == batch_a | batch_b | batch_c
    assert found["pitr"] == batch_a | batch_b
    print(
        f"\npostgres restore: base backup after {len(batch_a)}, archive replay "
        f"{len(found['latest'])}/{3 * BATCH}, PITR to 'before-c' {len(found['pitr'])}"
    )
