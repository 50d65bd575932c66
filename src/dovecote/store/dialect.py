"""What the shared store operations run on: a transaction (`Tx`) and an SQL dialect.

Every statement is written once, in PostgreSQL's syntax with `$n` placeholders
(store/operations.py, store/rooms.py). An engine supplies a `Tx` over its connection; the
SQLite one renders each statement through `SQLITE` first, which rewrites the few
constructs SQLite lacks:

- `$n` -> `?n` (SQLite's numbered placeholders bind the same positional arguments);
- `= ANY($n::type[])` / `<> ALL($n::type[])` -> `IN` / `NOT IN (SELECT value FROM
  json_each(?n))`, and the Tx passes a list argument as JSON text;
- row locks (`FOR UPDATE [OF t] [SKIP LOCKED]`) are dropped: SQLite has one writer, whose
  transaction already excludes every other;
- `COLLATE "C"` is dropped: SQLite's default BINARY collation is the same byte order;
- `strpos(` -> `instr(` (same arguments, same meaning).

Multi-row statements name their row source `{rows}`: `unnest` over one array per column
on PostgreSQL (one round trip, any number of rows), a `VALUES` list on SQLite.
"""

from __future__ import annotations

import abc
import functools
import re
from collections.abc import Sequence
from typing import Any

Row = Sequence[Any]

_PLACEHOLDER = re.compile(r"\$(\d+)")
_ARRAY = re.compile(r"(=\s*ANY|<>\s*ALL)\(\$(\d+)::\w+\[\]\)")
_LOCK = re.compile(r"\s+FOR UPDATE(?: OF \w+)?(?: SKIP LOCKED)?")
_COLLATE = re.compile(r'\s+COLLATE "C"')


class Dialect:
    """Renders a statement written for PostgreSQL for one engine."""

    name = "postgres"

    def render(self, sql: str) -> str:
        """The statement as this engine accepts it."""
        return sql

    def rows(self, sql: str, types: Sequence[str], count: int) -> str:
        """`sql` with `{rows}` replaced by a source of `count` rows of `types` columns."""
        arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, 1))
        return sql.replace("{rows}", f"SELECT * FROM unnest({arrays})")


class SQLiteDialect(Dialect):
    name = "sqlite"

    @functools.lru_cache(maxsize=512)  # noqa: B019 (two module-level instances, never freed)
    def render(self, sql: str) -> str:
        sql = _ARRAY.sub(
            lambda m: (
                f"{'IN' if m[1].startswith('=') else 'NOT IN'} "
                f"(SELECT value FROM json_each(${m[2]}))"
            ),
            sql,
        )
        sql = _LOCK.sub("", sql)
        sql = _COLLATE.sub("", sql).replace("strpos(", "instr(")
        return _PLACEHOLDER.sub(r"?\1", sql)

    @functools.lru_cache(maxsize=512)  # noqa: B019
    def rows(self, sql: str, types: Sequence[str], count: int) -> str:
        width = len(types)
        values = ", ".join(
            "(" + ", ".join(f"?{r * width + c + 1}" for c in range(width)) + ")"
            for r in range(count)
        )
        return sql.replace("{rows}", f"VALUES {values}")


POSTGRES = Dialect()
SQLITE = SQLiteDialect()


class Tx(abc.ABC):
    """One transaction (or one read) of an engine; every method is one statement.

    Written as coroutines so that one body serves both engines: on SQLite nothing inside
    ever suspends and the engine runs the body to completion on its own thread.
    """

    dialect: Dialect
    # True when a duplicate's answer must come from a transaction that wrote: only then
    # does COMMIT wait for a synchronous standby (PostgreSQL, see store/pg_ha.py).
    replicated: bool = False

    def __init__(self) -> None:
        self.woken_mailboxes: list[str] = []
        self.woken_rooms: list[str] = []
        self.changed_recipients: list[str] = []

    @abc.abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Every row."""

    @abc.abstractmethod
    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        """The first row, or None."""

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None."""
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]

    @abc.abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it touched."""

    @abc.abstractmethod
    async def executemany(self, sql: str, args: Sequence[Row]) -> None:
        """Run a statement once per argument row."""

    @abc.abstractmethod
    async def rows(self, sql: str, types: Sequence[str], rows: Sequence[Row]) -> list[Row]:
        """Run a statement over the row source `{rows}` in one go; its RETURNING rows."""

    async def lock_mailboxes(self, mediatees: Sequence[str]) -> None:  # noqa: B027 (a no-op unless the engine locks rows)
        """Lock these mailboxes' totals rows, in sorted order, until COMMIT.

        PostgreSQL only; SQLite's single writer already excludes every other transaction.
        """

    async def lock(self, name: str) -> None:  # noqa: B027 (likewise)
        """Serialise transactions taking the same named lock until COMMIT (PostgreSQL)."""

    def wake_mailbox(self, mediatee: str) -> None:
        """After COMMIT, wake the listeners of this mailbox (on every instance)."""
        self.woken_mailboxes.append(mediatee)

    def wake_room(self, room: str) -> None:
        """After COMMIT, wake the listeners of this room (on every instance)."""
        self.woken_rooms.append(room)

    def recipient_changed(self, recipient: str) -> None:
        """This recipient's registration changed: engines that keep `find_mediatee`
        answers forget it (on every instance)."""
        self.changed_recipients.append(recipient)
