"""The data-directory lock: one process at a time owns a SQLite data directory.

`dovecote serve` (on SQLite) and `dovecote restore` hold an exclusive `flock` on
`DATA_DIR/dovecote.lock` for as long as they run. The kernel drops the lock when the
process exits, kill -9 included, so a stale file never blocks anything; the file's
content (pid, purpose, since) only says who held it last.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

LOCK_FILE = "dovecote.lock"


class DataDirInUse(RuntimeError):
    """Another process holds the data directory (a running server or a restore)."""

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        self.path = path
        self.holder = holder
        who = f"pid {holder.get('pid', '?')} ({holder.get('purpose', 'unknown')})"
        super().__init__(f"{path.parent} is in use by {who}; stop it first")

    def __repr__(self) -> str:
        return f"<DataDirInUse {self.path} holder={self.holder}>"


class DataDirLock:
    """An exclusive, non-blocking lock on a data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, purpose: str) -> DataDirLock:
        """Take the lock or raise DataDirInUse at once (never waits)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirInUse(self.path, self.holder()) from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "purpose": purpose, "since": time.time()}
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> dict[str, Any]:
        """Who wrote the lock file last (may be a process that has since exited)."""
        try:
            data = json.loads(self.path.read_text() or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
