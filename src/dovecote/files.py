"""Durable file writes for small files that must never be seen half-written."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE = 0o600


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
