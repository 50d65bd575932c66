"""Fresh PostgreSQL databases for tests, on the server `make test` made available
(scripts/ensure-postgres.sh writes its URL to .test-env as DOVECOTE_TEST_POSTGRES)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# The store engines a server runs on; fixtures parametrised with these run once per engine.
ENGINES = ("sqlite", "postgres")


def admin_url() -> str:
    return os.environ.get("DOVECOTE_TEST_POSTGRES") or DEFAULT_URL


def _psql(url: str, sql: str) -> None:
    try:
        subprocess.run(
            ["psql", url, "-v", "ON_ERROR_STOP=1", "-qc", sql],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except subprocess.CalledProcessError as exc:  # these tests must fail, never skip
        raise RuntimeError(
            f"psql {sql!r} on {url} failed: {exc.stderr.decode(errors='replace').strip()}; "
            "run `bash scripts/ensure-postgres.sh && . ./.test-env`"
        ) from exc


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new empty database's URL; dropped afterwards."""
    name = f"dovecote_it_{uuid.uuid4().hex[:12]}"
    base = admin_url()
    _psql(base, f'CREATE DATABASE "{name}"')
    parts = urlsplit(base)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        _psql(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def engine_env(engine: str) -> Iterator[dict[str, str]]:
    """The environment that puts a server on `engine` (one of ENGINES): nothing for SQLite
    (a file in its data dir), DOVECOTE_STORE for PostgreSQL (a fresh database, dropped
    afterwards, so it must outlive every server given this environment)."""
    if engine == "sqlite":
        yield {}
        return
    if engine != "postgres":
        raise ValueError(f"unknown engine {engine!r}; one of {ENGINES}")
    with fresh_database() as url:
        yield {"DOVECOTE_STORE": url}


def with_port(url: str, host: str, port: int) -> str:
    """The same URL pointed at another host:port (e.g. a fault-injecting proxy)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}@{host}:{port}"))
