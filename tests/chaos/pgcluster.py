"""A throwaway PostgreSQL cluster that chaos tests may stop, kill and restart.

Never the shared server on 5432: other tests and people use it. initdb/pg_ctl come from
the newest /usr/lib/postgresql/*/bin and run as the `postgres` OS user (runuser) when the
tests run as root, because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from support.server import free_port


def pg_bin(name: str) -> str | None:
    dirs = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0,
    )
    for d in reversed(dirs):
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    return shutil.which(name)


def available() -> str:
    """Empty when a throwaway cluster can be made here, else why not."""
    if pg_bin("initdb") is None or pg_bin("pg_ctl") is None:
        return "initdb/pg_ctl not installed (Debian package postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run the cluster"
    return ""


@dataclass
class PgCluster:
    """initdb + pg_ctl on a free loopback port, in a temporary directory."""

    port: int = field(default_factory=free_port)
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dovecote-pg-")))

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data(self) -> Path:
        return self.home / "data"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd=self.home)

    def init(self) -> PgCluster:
        os.chmod(self.home, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.home, "postgres", "postgres")
        initdb = pg_bin("initdb")
        assert initdb
        self._run(
            initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"
        )
        return self

    def start(self) -> None:
        pg_ctl = pg_bin("pg_ctl")
        assert pg_ctl
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.home} "
            "-c max_connections=200 -c fsync=on"
        )
        self._run(
            pg_ctl,
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.home / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        pg_ctl = pg_bin("pg_ctl")
        assert pg_ctl
        self._run(pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash: the next start runs recovery)."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            import psutil

            pid = int(pid_file.read_text().split()[0])
            # The backends too (by pid, taken before they are orphaned): a crashed
            # postmaster's children would otherwise hold the shared memory for a while.
            children = [c.pid for c in psutil.Process(pid).children()]
            for victim in [pid, *children]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
            time.sleep(0.5)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.home, ignore_errors=True)

    def logs(self) -> str:
        try:
            return (self.home / "log").read_text()[-3000:]
        except OSError:
            return ""
