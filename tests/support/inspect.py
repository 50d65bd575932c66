"""Read a server's SQLite store directly (read-only) to prove what was or was not stored."""

from __future__ import annotations

import sqlite3
import subprocess

from support.server import ServerProcess

TABLES = ("mediations", "recipients", "messages", "dedup", "outbox", "dead_letters")


def snapshot(server: ServerProcess) -> dict[str, int]:
    """Row counts of every state table, in whichever store the server uses."""
    url = server.env.get("DOVECOTE_STORE", "")
    if url.startswith("postgres"):
        query = " UNION ALL ".join(f"SELECT '{t}', COUNT(*) FROM {t}" for t in TABLES)
        out = subprocess.run(
            ["psql", url, "-Atc", query], capture_output=True, text=True, check=True
        ).stdout
        return {
            name: int(count)
            for name, count in (line.split("|") for line in out.splitlines() if line)
        }
    uri = f"file:{server.data_dir / 'dovecote.db'}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        conn.close()


def metric_value(metrics_text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
