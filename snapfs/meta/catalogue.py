"""The store's catalogue (`store.db`): its schema and migrations, and the store lock.

The catalogue lists the regions (name, backend, endpoint, read_only, refresh and the
shared index's URL), holds
the customer master keys (meta/keys.py) and the store's meta (format, block size, the
clean-stop flag). The lock file is flock()ed by whoever has the store open for writing
(the daemon, `check --repair`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from snapfs import durable
from snapfs.errors import StoreBusy
from snapfs.meta import db as dbutil

log = logging.getLogger(__name__)

LOCK_FILE = "lock"


def _v1(db: sqlite_utils.Database) -> None:
    dbutil.run_script(
        db,
        """
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS regions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            backend TEXT NOT NULL DEFAULT 'local'
        );
        """,
    )


def _v2(db: sqlite_utils.Database) -> None:
    """Customer master keys, wrapped under the store master key (see keys.py)."""
    dbutil.run_script(
        db,
        """
        CREATE TABLE IF NOT EXISTS keys (
            id TEXT PRIMARY KEY,
            region TEXT NOT NULL,
            alias TEXT,
            enabled INTEGER NOT NULL DEFAULT 1,
            created_at REAL NOT NULL,
            wrapped BLOB NOT NULL
        );
        """,
    )


def _v3(db: sqlite_utils.Database) -> None:
    """Regions on object storage: `backend` holds s3://BUCKET/PREFIX, `endpoint` the server
    (NULL: AWS). Never credentials: those come from the environment, as for AWS tools."""
    db.execute("ALTER TABLE regions ADD COLUMN endpoint TEXT")


def _v4(db: sqlite_utils.Database) -> None:
    """Regions attached read-only (issue 19, disaster recovery): `read_only` 1 for a view of
    a bucket another store owns, `refresh` its seconds between re-reads of the bucket's
    manifests (NULL: the default). Older rows are read-write, as they were."""
    db.execute("ALTER TABLE regions ADD COLUMN read_only INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE regions ADD COLUMN refresh REAL")


def _v5(db: sqlite_utils.Database) -> None:
    """Regions shared by several stores (issue 19): `index_url` names the PostgreSQL
    database of the region's ledger (meta/ledger.py), without a password (libpq takes it
    from PGPASSWORD or ~/.pgpass, as psql does); NULL: the region is this store's alone."""
    db.execute("ALTER TABLE regions ADD COLUMN index_url TEXT")


MIGRATIONS: list[dbutil.Migration] = [_v1, _v2, _v3, _v4, _v5]


def make_private(path: Path) -> None:
    """The store directory is its owner's alone: block objects, indexes, logs and the key
    file inside it must not be readable by other users, whatever the umask was when it (or
    an existing directory given as --store, e.g. a tmpfs root of mode 1777) was made."""
    durable.make_dirs(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("store %s was accessible to other users (mode %o); now 0700", path, mode)
        path.chmod(0o700)


def open_catalogue(path: Path) -> sqlite_utils.Database:
    """The store's catalogue, created and migrated as needed (also used without a mount)."""
    make_private(path)
    catalogue = dbutil.connect(path / "store.db")
    dbutil.migrate(catalogue, MIGRATIONS, f"store {path}")
    return catalogue


def try_lock(store: Path) -> int | None:
    """Take the store's lock without waiting: its file descriptor (closing it unlocks), or
    None if another process holds it."""
    fd = os.open(store / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def lock_holder(store: Path) -> str:
    """Who holds the lock, as its holder wrote it (a pid), for error messages."""
    try:
        text = (store / LOCK_FILE).read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def lock_for_daemon(store: Path) -> int:
    """The daemon's lock: StoreBusy (naming the holder) if the store is in use; the pid is
    written into the lock file for the next one to name."""
    fd = try_lock(store)
    if fd is None:
        raise StoreBusy(f"store {store} is in use by pid {lock_holder(store)}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def held_if_free(store: Path) -> Iterator[bool]:
    """Hold the lock for the block if nobody else does; yields whether it is held (a check
    beside a running daemon goes on read-only)."""
    fd = try_lock(store)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)
