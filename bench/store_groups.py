"""The SQLite store's CPU per enqueue at fixed group sizes, in-process, on a real file.

    PYTHONPATH=src python -m bench.store_groups [--groups 1,4,16,64] [--messages 2000]

Each round enqueues `--messages` forward-sized messages (random bodies, distinct digests,
8 mailboxes of 2 recipients) as concurrent batches of one group size; GROUP_COMMIT_WAIT
(8 ms, the default) makes each batch one commit. Per message it prints the writer
thread's CPU (user / system from /proc, total from schedstat), the event-loop thread's CPU
(`time.thread_time`, which includes building the envelopes' rows and the futures), and
the bytes the writer thread wrote (WAL frames and checkpoints, from /proc's task io).
Synchronous=FULL as served. A checkpoint lands in whichever round crosses it: run enough
messages (and rounds) that each round holds several.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sqlite3
import tempfile
import time
from pathlib import Path

from dovecote.store.base import NewMessage
from dovecote.store.sqlite import SQLiteStore

MAILBOXES = 8
BODY = 1000  # bytes: a bench forward's inner envelope is about this size
TICK = os.sysconf("SC_CLK_TCK")


def _thread_cpu(tid: int) -> tuple[float, float, float, int]:
    """user s, system s, total s (schedstat, ns precision), bytes written."""
    task = Path(f"/proc/self/task/{tid}")
    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
    user, system = int(fields[11]) / TICK, int(fields[12]) / TICK
    total = int((task / "schedstat").read_text().split()[0]) / 1e9
    wchar = 0
    for line in (task / "io").read_text().splitlines():
        if line.startswith("wchar:"):
            wchar = int(line.split()[1])
    return user, system, total, wchar


async def _round(store: SQLiteStore, group: int, messages: int, ttl: float) -> dict[str, float]:
    assert store._writer is not None and store._writer.native_id is not None
    tid = store._writer.native_id
    commits = 0
    original = store._commit_batch

    def counted(conn, batch, temp_store):  # type: ignore[no-untyped-def]
        nonlocal commits
        commits += 1
        return original(conn, batch, temp_store)

    store._commit_batch = counted  # type: ignore[method-assign]
    store._fruitless = 0  # the previous round's groups of 1 stopped the group wait
    limits = {"max_messages": 10**9, "max_bytes": 10**15}
    w0, l0 = _thread_cpu(tid), time.thread_time()
    sent = 0
    while sent < messages:
        batch = []
        for i in range(group):
            box = (sent + i) % MAILBOXES
            batch.append(
                store.enqueue(
                    NewMessage(
                        mediatee=f"did:peer:2.mediatee{box}",
                        recipient=f"did:peer:2.recipient{box}-{i % 2}",
                        body=secrets.token_bytes(BODY),
                        digest=secrets.token_hex(32),
                        expires_at=time.time() + ttl,
                    ),
                    **limits,  # type: ignore[arg-type]
                )
            )
        await asyncio.gather(*batch)
        sent += group
    w1, l1 = _thread_cpu(tid), time.thread_time()
    store._commit_batch = original  # type: ignore[method-assign]
    return {
        "group": sent / commits,
        "writer_user": (w1[0] - w0[0]) / sent * 1e6,
        "writer_sys": (w1[1] - w0[1]) / sent * 1e6,
        "writer": (w1[2] - w0[2]) / sent * 1e6,
        "loop": (l1 - l0) / sent * 1e6,
        "written": (w1[3] - w0[3]) / sent,
        "written_commit": (w1[3] - w0[3]) / commits,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", default="1,4,16,64")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where the database file goes")
    parser.add_argument("--label", default="")
    parser.add_argument(
        "--pragma", action="append", default=[], help="e.g. wal_autocheckpoint=0 (writer's)"
    )
    args = parser.parse_args()
    groups = [int(g) for g in args.groups.split(",")]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = SQLiteStore(f"sqlite:///{tmp}/store.db", group_commit_wait=0.008)
        if args.pragma:
            connect = store._connect

            def with_pragmas() -> sqlite3.Connection:
                conn = connect()
                for pragma in args.pragma:
                    conn.execute(f"PRAGMA {pragma}")
                return conn

            store._connect = with_pragmas  # type: ignore[method-assign]
        await store.open()
        try:
            for box in range(MAILBOXES):
                mediatee = f"did:peer:2.mediatee{box}"
                await store.set_mediation(mediatee, "granted", "did:peer:2.routing")
                await store.update_recipients(
                    mediatee, [(f"did:peer:2.recipient{box}-{r}", "add") for r in range(2)]
                )
            await _round(store, 16, 2000, 3600)  # warm-up: a queue, a WAL past its first pages
            for _ in range(args.rounds):
                for group in groups:
                    r = await _round(store, group, args.messages, 3600)
                    print(
                        f"{args.label} group {r['group']:5.1f}: writer {r['writer']:6.1f} us "
                        f"(user {r['writer_user']:5.0f} sys {r['writer_sys']:5.0f}) "
                        f"loop {r['loop']:6.1f} us  written {r['written'] / 1024:5.1f} KiB/msg "
                        f"{r['written_commit'] / 1024:6.1f} KiB/commit  "
                        f"load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
        finally:
            await store.close()


if __name__ == "__main__":
    asyncio.run(main())
