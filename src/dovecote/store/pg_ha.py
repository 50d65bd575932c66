"""PostgreSQL high availability: which host to use, and when a commit is not durable.

Three things asyncpg's multi-host DSN does not do for a Patroni cluster:

- **Per-host connect timeouts.** asyncpg's `timeout` covers the whole host list, so a
  first host that accepts TCP but never answers (a hung machine) uses all of it and every
  new connection fails for as long as the hang lasts. `Hosts.connect` tries the hosts one
  by one, each with its own short timeout, the last one that worked first.
- **Leaving a deposed primary.** `target_session_attrs=read-write` cannot tell a primary
  whose Patroni died (a "zombie": it still accepts writes, and a standby that has not yet
  noticed the failover may even confirm them) from the leader. With the nodes' Patroni
  REST URLs (`DOVECOTE_STORE_PATRONI`) the watch asks every node's `GET /primary` once a
  second, uses only the node that holds the leader lock, and terminates every connection
  to a node that lost it: Patroni's death is seen in about a second, long before its
  leader lock expires and a standby is promoted, so nothing is written to a zombie. Without
  the URLs (or HAProxy doing the same check, deploy/haproxy/) a zombie is not detected.
- **Duplicates answered only once durable.** A transaction that writes no WAL commits
  without waiting for any standby (PostgreSQL waits only when the transaction assigned
  an xid *and* wrote WAL; an xid alone is not enough), so a dedup hit that only reads
  would answer success about a row that may exist on the primary alone (its own commit's
  wait was cancelled). Every duplicate path therefore rewrites the row it found
  (`UPDATE ... SET col = col`): its COMMIT waits until a standby flushed it, and WAL is
  replicated in order, so also the original row.
- **Commits whose durability is unknown.** `is_sync_cancel` recognises PostgreSQL's
  warning that a COMMIT stopped waiting for synchronous replication (it then reports
  success although the transaction may exist on the primary only).

Our own code (about 200 lines) because no asyncio PostgreSQL client on PyPI checks
Patroni's leader; outside the process, HAProxy does the same check (deploy/haproxy/).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import httpx
import structlog

log = structlog.get_logger("dovecote.store.postgres")

Conn = Any  # asyncpg.Connection

# Longest wait for one host before the next is tried (a hung host costs this much).
HOST_CONNECT_TIMEOUT = 2.0
# How often the Patroni leader is asked for, and how long one answer may take.
WATCH_INTERVAL = 1.0
WATCH_TIMEOUT = 1.0
# Unanswered leader checks in a row before a node counts as deposed (an answer that is
# not 200, or a refused connection, counts at once).
WATCH_MISSES = 2
# The start of PostgreSQL's warnings (syncrep.c) when a COMMIT's wait for synchronous
# replication is cut short by a cancel, statement_timeout or termination: the transaction
# is committed locally and maybe not replicated. English texts: lc_messages is a superuser
# setting we cannot force per connection; keep lc_messages = C on the servers (Patroni's
# default) or such commits go unnoticed.
SYNC_CANCEL_PREFIXES = (
    "canceling wait for synchronous replication",
    "canceling the wait for synchronous replication",
)


def is_sync_cancel(message: Any) -> bool:
    """True for PostgreSQL's "stopped waiting for synchronous replication" warning."""
    text = str(getattr(message, "message", "") or "")
    return text.startswith(SYNC_CANCEL_PREFIXES)


@dataclass(frozen=True)
class PgHost:
    """One node of the DSN's host list."""

    label: str  # host[:port] as written
    url: str  # the DSN with only this host
    patroni: str | None  # its Patroni REST API base URL


def split_hosts(url: str, patroni: Sequence[str] = ()) -> list[PgHost]:
    """One single-host DSN per host of a (multi-host) postgresql:// URL."""
    parts = urlsplit(url)
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    specs = hostlist.split(",")
    if patroni and len(patroni) != len(specs):
        raise ValueError(
            f"store_patroni lists {len(patroni)} URLs for {len(specs)} PostgreSQL hosts; "
            "give one per host, in the same order"
        )
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if len(specs) > 1:
        # Several nodes: only the writable one will do (asyncpg checks it per host).
        query.setdefault("target_session_attrs", "read-write")
    hosts = []
    for i, spec in enumerate(specs):
        netloc = f"{userinfo}{at}{spec}"
        single = urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))
        base = patroni[i].rstrip("/") if patroni else None
        hosts.append(PgHost(spec or "(default)", single, base))
    return hosts


class Hosts:
    """Connects to the leader among the DSN's hosts and watches for it to change."""

    def __init__(
        self,
        url: str,
        patroni: Sequence[str] = (),
        *,
        connect_timeout: float = HOST_CONNECT_TIMEOUT,
    ) -> None:
        self.hosts = split_hosts(url, patroni)
        self.connect_timeout = connect_timeout
        self.watching = bool(patroni)
        self._preferred = 0
        # Labels whose Patroni holds the leader lock (watching only).
        self.leaders: set[str] = set()
        self.checked_at = 0.0
        self._misses: dict[str, int] = {h.label: 0 for h in self.hosts}
        self._conns: dict[int, tuple[Conn, str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._refreshing: asyncio.Lock | None = None

    # ------------------------------------------------------------------ connecting
    def _order(self) -> list[PgHost]:
        n = len(self.hosts)
        ordered = [self.hosts[(self._preferred + i) % n] for i in range(n)]
        if self.watching:
            ordered = [h for h in ordered if h.label in self.leaders]
        return ordered

    async def connect(self, *_args: Any, **kwargs: Any) -> Conn:
        """asyncpg's `connect`, host by host with a timeout each (the pool's `connect=`)."""
        timeout = min(
            float(kwargs.pop("timeout", None) or self.connect_timeout), self.connect_timeout
        )
        if self.watching and not self.leaders:
            await self.refresh()
        candidates = self._order()
        if not candidates:
            raise ConnectionRefusedError("no PostgreSQL node holds the Patroni leader lock")
        last: BaseException | None = None
        for host in candidates:
            try:
                conn = await asyncpg.connect(host.url, timeout=timeout, **kwargs)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                last = exc
                log.info("store.host_skipped", host=host.label, error=type(exc).__name__)
                continue
            self._preferred = self.hosts.index(host)
            self._register(conn, host.label)
            return conn
        if len(candidates) == 1 and last is not None:
            raise last  # one host: its own error says most (no such database, auth...)
        raise ConnectionRefusedError(
            f"no usable PostgreSQL host ({type(last).__name__}: {last})"
        ) from last

    def _register(self, conn: Conn, label: str) -> None:
        key = id(conn)
        self._conns[key] = (conn, label)
        conn.add_termination_listener(lambda _c: self._conns.pop(key, None))

    def host_of(self, conn: Conn) -> str | None:
        raw = getattr(conn, "_con", conn)  # a pool proxy wraps the connection
        entry = self._conns.get(id(raw))
        return entry[1] if entry else None

    def drop(self, label: str, reason: str) -> int:
        """Terminate every connection to one host (in-flight calls fail: 503)."""
        victims = [c for c, host in list(self._conns.values()) if host == label]
        for conn in victims:
            with contextlib.suppress(Exception):
                conn.terminate()
        if victims:
            log.warning("store.host_dropped", host=label, reason=reason, connections=len(victims))
        return len(victims)

    # ------------------------------------------------------------------ the watch
    def start(self) -> None:
        if self.watching and self._task is None:
            self._task = asyncio.create_task(self._watch(), name="pg-leader-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        for conn, _label in list(self._conns.values()):
            with contextlib.suppress(Exception):
                conn.terminate()
        self._conns.clear()

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # never let the watch die; the next round tries again
                log.exception("store.leader_watch_failed")
            await asyncio.sleep(WATCH_INTERVAL)

    async def _is_leader(self, host: PgHost) -> bool | None:
        """True: holds the leader lock; False: says it does not, or Patroni is not
        running there (refused); None: no answer in time."""
        assert self._http is not None and host.patroni is not None
        try:
            r = await self._http.get(host.patroni + "/primary", timeout=WATCH_TIMEOUT)
        except httpx.ConnectError:
            return False
        except httpx.HTTPError:
            return None
        return r.status_code == 200

    async def refresh(self) -> None:
        """Ask every node's Patroni who leads; drop connections to any other node."""
        if not self.watching:
            return
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if self._http is None:
                self._http = httpx.AsyncClient()
            answers = await asyncio.gather(*(self._is_leader(h) for h in self.hosts))
            leaders = set()
            for host, answer in zip(self.hosts, answers, strict=True):
                if answer:
                    self._misses[host.label] = 0
                    leaders.add(host.label)
                    continue
                self._misses[host.label] = (
                    WATCH_MISSES if answer is False else self._misses[host.label] + 1
                )
                if self._misses[host.label] >= WATCH_MISSES:
                    self.drop(host.label, "not the Patroni leader")
                elif host.label in self.leaders:
                    leaders.add(host.label)  # one missed answer: keep it for now
            if leaders != self.leaders:
                log.warning(
                    "store.leader_changed", leaders=sorted(leaders), before=sorted(self.leaders)
                )
            self.leaders = leaders
            self.checked_at = time.monotonic()
