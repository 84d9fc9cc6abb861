"""The connection a region index runs its SQL on: one interface, two engines (issue 19).

`RegionIndex` (meta/index.py) holds every query of the region index and runs them through
an `IndexConnection`, so a query is written once for both engines. An engine supplies its
schema and migrations (SQLite: `index.MIGRATIONS`; PostgreSQL: `pg.PG_MIGRATIONS`) and the
few places where the two SQL dialects differ:

- placeholders: the shared SQL uses `?`; the PostgreSQL connection rewrites them to psycopg's
  `%s` (so a query must hold no literal `?` or `%`);
- the conflict target of an upsert (`ON CONFLICT(...) DO UPDATE`): `conflict()` names the
  key's columns, since PostgreSQL's tables carry the region id in every key;
- a row as a dict (`rows()`), the table and column lists, and SQLite's page checks.

Everything else (`ON CONFLICT DO NOTHING`, `RETURNING`, `WITH RECURSIVE`, `coalesce`,
`length()` of a blob, `CAST(? AS TEXT)`) is SQL both engines read the same.

A connection belongs to one thread (the trio thread, or the worker that opened it).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import sqlite_utils

from snapfs.meta import db as dbutil


class Cursor(Protocol):
    """What a query returns, in both engines (sqlite3's and psycopg's cursors)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class IndexConnection(Protocol):
    """A region index's connection, in autocommit mode: each statement outside
    `transaction()` commits by itself, and `transaction()` is all or nothing."""

    engine: str  # "sqlite" or "postgresql"

    @property
    def IntegrityError(self) -> type[Exception]:  # noqa: N802 (named as DB-API names it)
        """What a statement that breaks a key or a trigger's check raises (sqlite3's or
        psycopg's class)."""
        ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def transaction(self) -> contextlib.AbstractContextManager[IndexConnection]:
        """One transaction that writes; no other writer of the region runs meanwhile."""
        ...

    def snapshot(self) -> contextlib.AbstractContextManager[IndexConnection]:
        """A read of several statements that all see one committed state (no writer's
        commit in between), without taking the write lock: what a reader beside the
        daemon needs when it adds up what two queries return."""
        ...

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """The rows of a query as dicts of column name to value."""
        ...

    def conflict(self, columns: str) -> str:
        """The conflict target of an upsert on the key `columns` of a region table."""
        ...

    def table_names(self) -> list[str]: ...

    def columns(self, table: str) -> set[str]: ...

    def quick_check(self, limit: int) -> list[str]: ...

    def schema_trees(self) -> list[tuple[int, str, str]]: ...

    def close(self) -> None: ...


def dict_rows(cursor: Any, skip: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [
        {n: v for n, v in zip(names, row, strict=True) if n not in skip}
        for row in cursor.fetchall()
    ]


class SqliteConnection:
    """An index in one SQLite file (the embedded default): meta/db.py's connection, WAL,
    synchronous=FULL, `BEGIN IMMEDIATE` transactions (one writer at a time per file)."""

    engine = "sqlite"
    IntegrityError = sqlite3.IntegrityError

    def __init__(self, database: sqlite_utils.Database):
        self.database = database  # for the SQLite-only migrations (db.migrate)
        self.conn: sqlite3.Connection = database.conn

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> SqliteConnection:
        return cls(dbutil.connect(path, readonly=readonly))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SqliteConnection]:
        with dbutil.transaction(self.database):
            yield self

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[SqliteConnection]:
        # A deferred transaction: its first read fixes the WAL snapshot every later
        # statement sees; a read-only connection can take it (BEGIN IMMEDIATE could not).
        if self.conn.in_transaction:
            yield self
            return
        self.conn.execute("BEGIN DEFERRED")
        try:
            yield self
        finally:
            self.conn.execute("COMMIT")

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return dict_rows(self.conn.execute(sql, params))

    def conflict(self, columns: str) -> str:
        return columns

    def table_names(self) -> list[str]:
        return self.database.table_names()

    def columns(self, table: str) -> set[str]:
        return {r[1] for r in self.conn.execute(f'PRAGMA table_info("{table}")')}

    def quick_check(self, limit: int) -> list[str]:
        return [r[0] for r in self.conn.execute(f"PRAGMA quick_check({int(limit)})")]

    def schema_trees(self) -> list[tuple[int, str, str]]:
        return self.conn.execute("SELECT rootpage, name, type FROM sqlite_master").fetchall()

    def close(self) -> None:
        self.database.close()
