"""Queue many messages for one mailbox straight into Dovecote's SQLite schema.

    python -m bench.fill DATA_DIR/dovecote.db MEDIATEE_DID COUNT [BODY_FILE]

For pickup benchmarks with 1M queued messages: posting them would take longer than the
measurement itself. Writes the same rows `SQLiteStore.enqueue` writes (messages and the
mailbox's running totals; no dedup rows, which pickup never reads) while the server is
stopped. The mediatee must already have mediation (the schema's foreign keys hold for
recipients, not messages). BODY_FILE: one encrypted message to copy (default: a JSON
placeholder of ~1.5 KB).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path

from dovecote.store.engine import message_id

BATCH = 50_000


def fill(db: Path, mediatee: str, body: bytes, count: int) -> float:
    """Insert `count` copies of `body` for `mediatee`; seconds taken."""
    started = time.perf_counter()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")  # setup, not measurement
    now = time.time()
    done = 0
    while done < count:
        n = min(BATCH, count - done)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages (id, mediatee, recipient, body, size, received_at, "
            "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                # Ids as the store makes them, one per millisecond up to now: the id
                # index looks like one the store grew.
                (
                    message_id(now - (count - done - i) / 1000),
                    mediatee,
                    mediatee,
                    body,
                    len(body),
                    now,
                    now + 30 * 86400,
                )
                for i in range(n)
            ),
        )
        conn.execute(
            "INSERT INTO mailboxes (mediatee, message_count, total_bytes) VALUES (?, ?, ?) "
            "ON CONFLICT (mediatee) DO UPDATE SET message_count = message_count + "
            "excluded.message_count, total_bytes = total_bytes + excluded.total_bytes",
            (mediatee, n, n * len(body)),
        )
        conn.execute("COMMIT")
        done += n
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    # Written with synchronous=OFF: the pages are still dirty in the page cache, and the
    # server's first checkpoint fsync would write them all (~1 s of stall for 1M rows, a
    # cost of this setup, not of the server).
    fd = os.open(db, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    body = (
        Path(argv[3]).read_bytes()
        if len(argv) > 3
        else json.dumps(
            {
                "protected": "x" * 200,
                "recipients": [],
                "iv": "x" * 32,
                "ciphertext": "x" * 1200,
                "tag": "x" * 22,
            }
        ).encode()
    )
    took = fill(Path(argv[0]), argv[1], body, int(argv[2]))
    print(f"queued {int(argv[2])} messages in {took:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
