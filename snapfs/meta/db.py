"""SQLite plumbing shared by the store catalogue and the region indexes.

Connections run in autocommit mode; every multi-statement change goes through
`transaction()`, one `BEGIN IMMEDIATE ... COMMIT`, so a crash leaves either all of it or none.
WAL with synchronous=FULL makes each commit durable while readers (`snapfs status`, `check`)
never block the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import sqlite_utils

from snapfs.errors import StoreFormat

log = logging.getLogger(__name__)

Migration = Callable[[sqlite_utils.Database], None]


def connect(path: Path, *, readonly: bool = False) -> sqlite_utils.Database:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    return sqlite_utils.Database(conn)


@contextlib.contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite3.Connection]:
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def run_script(db: sqlite_utils.Database, script: str) -> None:
    """Run several statements inside the caller's transaction.

    `sqlite3.executescript` would COMMIT first, so a migration interrupted half-way would
    leave a schema its version number does not describe; this splits the script into
    complete statements (triggers included) and executes them one by one instead.
    """
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            db.conn.execute(statement)
            statement = ""
    if statement.strip():
        raise ValueError(f"incomplete SQL statement: {statement.strip()[:60]!r}")


def get_meta(db: sqlite_utils.Database, key: str, default: str | None = None) -> str | None:
    if "meta" not in db.table_names():
        return default
    row = db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
    return row[0] if row else default


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [key, value],
    )


def migrate(db: sqlite_utils.Database, migrations: Sequence[Migration], what: str) -> int:
    """Bring a database to the newest schema; migration N takes version N to N+1.

    Each step runs in its own transaction together with the version bump, so an interrupted
    upgrade resumes at the step that did not commit. A database newer than this code is
    refused rather than guessed at.
    """
    current = int(get_meta(db, "schema_version", "0") or 0)
    target = len(migrations)
    if current > target:
        raise StoreFormat(
            f"{what} has schema version {current}; this snapfs knows up to {target}, upgrade it"
        )
    for version in range(current, target):
        with transaction(db) as conn:
            migrations[version](db)
            set_meta(conn, "schema_version", str(version + 1))
        if current:
            log.info("migrated %s from schema %d to %d", what, version, version + 1)
    return target
