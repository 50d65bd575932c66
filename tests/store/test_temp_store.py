"""The SQLite writer keeps a group of enqueues' statement journal in memory.

Inside BEGIN, each INSERT that may abort journals the prior image of every existing page
it changes; a group's dedup claims touch one random index leaf per message, so past
SQLite's 64 KiB spill threshold that journal became a temp file, created, written and
deleted per commit. Watched here with inotify on SQLITE_TMPDIR in a process of its own
(SQLite reads the variable once, when the module loads), beside a control: the same
kind of insert as a plain write, which keeps the file (its pages are not bounded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="inotify is Linux's")

SCRIPT = textwrap.dedent(
    """
    import asyncio, ctypes, json, os, secrets, sys, time

    from dovecote.store.sqlite import SQLiteStore
    from tests.store.helpers import ROOMY, mediate, message

    libc = ctypes.CDLL(None, use_errno=True)
    IN_CREATE, IN_NONBLOCK = 0x100, 0o4000
    watch = libc.inotify_init1(IN_NONBLOCK)
    tmpdir = os.environ["SQLITE_TMPDIR"].encode()
    assert watch >= 0 and libc.inotify_add_watch(watch, tmpdir, IN_CREATE) >= 0

    def created() -> int:
        count = 0
        while True:
            try:
                data = os.read(watch, 65536)
            except BlockingIOError:
                return count
            offset = 0
            while offset < len(data):  # struct inotify_event: wd, mask, cookie, len, name
                length = int.from_bytes(data[offset + 12 : offset + 16], "little")
                count += 1
                offset += 16 + length

    DEDUP = "INSERT INTO dedup (recipient, digest, message_id, created_at) {rows}"
    TYPES = ("text", "text", "text", "float8")

    def rows(n):
        now = time.time()
        return [
            ("did:example:alice-r1", secrets.token_hex(32), secrets.token_hex(16), now)
            for _ in range(n)
        ]

    async def main():
        store = SQLiteStore(f"sqlite:///{sys.argv[1]}", group_commit_wait=0.2)
        await store.open()
        try:
            await mediate(store, "did:example:alice", "did:example:alice-r1")
            # Enough dedup entries that 100 random claims touch ~100 distinct leaves.
            for _ in range(10):
                await store._write(lambda tx: tx.rows(DEDUP, TYPES, rows(2_000)))
            created()
            results = await asyncio.gather(
                *(store.enqueue(message(body=os.urandom(64)), **ROOMY) for _ in range(100))
            )
            assert not any(r.duplicate for r in results)
            enqueues = created()
            await store._write(lambda tx: tx.rows(DEDUP, TYPES, rows(100)))
            control = created()
            # And back to memory for the next group.
            await asyncio.gather(
                *(store.enqueue(message(body=os.urandom(64)), **ROOMY) for _ in range(100))
            )
            again = created()
        finally:
            await store.close()
        print(json.dumps({"enqueues": enqueues, "control": control, "again": again}))

    asyncio.run(main())
    """
)


def test_a_group_of_enqueues_writes_no_temp_file(tmp_path: Path) -> None:
    tmpdir = tmp_path / "sqlite-tmp"
    tmpdir.mkdir()
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "store.db")],
        env={**os.environ, "SQLITE_TMPDIR": str(tmpdir), "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    # The control shows the watch sees SQLite's temp files at all.
    assert seen["control"] > 0, seen
    assert seen["enqueues"] == 0, seen
    assert seen["again"] == 0, seen
