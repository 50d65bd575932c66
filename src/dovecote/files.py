"""Durable file writes for small files that must never be seen half-written."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE = 0o600
PRIVATE_DIR = 0o700


def private_dir(path: Path) -> None:
    """Create `path` (and parents) and make it 0700: it holds keys and every message."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(path, PRIVATE_DIR)
    except PermissionError:
        pass  # a mounted volume we do not own: its owner decides (docs/security.md)


def private_file(path: Path) -> None:
    """Create `path` if missing and make it 0600 (before SQLite opens it, so its WAL and
    SHM files, which SQLite creates with the database file's mode, are 0600 too)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE)
    try:
        os.fchmod(fd, PRIVATE)
    finally:
        os.close(fd)
    for side in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        if side.exists():
            os.chmod(side, PRIVATE)


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write to a temp file, fsync, set `mode`, then rename over `path`."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = Path(f"{path}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(raw)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask
    os.replace(tmp, path)


def write_private(path: Path, data: bytes | str) -> None:
    """`write_atomic` with mode 0600, for files that hold private keys."""
    write_atomic(path, data, PRIVATE)
