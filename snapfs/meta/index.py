"""A region's block index: one SQLite database per region, beside its block objects.

Design notes (schema version 4: MIGRATIONS below)
-------------------------------------------------
- `blocks` has one row per stored block object, keyed by its 32-byte content id. A row is
  only ever inserted after the object is durable (see `BlockRepository.sync`), so a row never points
  at missing data. `refcount` counts the `snapshot_blocks` rows that name the block and the
  delta objects stored over it (`base_id`, version 4).
- `snapshot_blocks` maps (snapshot, block number) to a block id; a block number with no row
  is a hole (all zeros, costs nothing).
- Triggers on `snapshot_blocks` keep `blocks.refcount` and `snapshots.allocated_blocks` right
  by construction: no code path adjusts a count by hand, so no code path can forget to.
- A block whose refcount reaches 0 stays until garbage collection deletes the row and then
  the object (row first: a crash in between leaves an orphan object, which is harmless and
  collected, never a row without data).
- `snapshots` keeps every snapshot of the region with its metadata, so a region directory
  (index + objects) is self-contained and could be moved or rebuilt on its own.

All methods run on the trio thread that owns the connection; each is short.

Why one module of ~600 lines: issue 14 put all region-index SQL here, on purpose, so that a
schema change (MIGRATIONS) and every query it affects are read and changed in one file;
each method is one short statement or transaction.
"""

from __future__ import annotations

import bisect
import sqlite3
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from snapfs.meta import db as dbutil
from snapfs.meta.engine import IndexConnection, SqliteConnection


def _v1(db: sqlite_utils.Database) -> None:
    dbutil.run_script(
        db,
        """
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE blocks (
            id BLOB PRIMARY KEY,
            refcount INTEGER NOT NULL DEFAULT 0,
            plain_size INTEGER NOT NULL,
            stored_size INTEGER NOT NULL,
            codec INTEGER NOT NULL,
            key_id TEXT
        ) WITHOUT ROWID;
        CREATE INDEX blocks_unreferenced ON blocks(refcount) WHERE refcount <= 0;
        CREATE TABLE snapshots (
            id TEXT PRIMARY KEY,
            name TEXT,
            status TEXT NOT NULL,
            size INTEGER NOT NULL DEFAULT 0,
            mode INTEGER NOT NULL,
            uid INTEGER NOT NULL,
            gid INTEGER NOT NULL,
            atime_ns INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            ctime_ns INTEGER NOT NULL,
            created_at REAL NOT NULL,
            sealed_at REAL,
            allocated_blocks INTEGER NOT NULL DEFAULT 0,
            deleted INTEGER NOT NULL DEFAULT 0,
            source_snapshot_id TEXT,
            source_region TEXT,
            description TEXT,
            retention_days INTEGER,
            encrypted INTEGER NOT NULL DEFAULT 0,
            kms_key_id TEXT,
            error TEXT,
            transferred_bytes INTEGER NOT NULL DEFAULT 0
        );
        CREATE UNIQUE INDEX snapshots_name ON snapshots(name) WHERE deleted = 0;
        CREATE TABLE snapshot_blocks (
            snapshot_id TEXT NOT NULL REFERENCES snapshots(id),
            block_no INTEGER NOT NULL,
            block_id BLOB NOT NULL REFERENCES blocks(id),
            PRIMARY KEY (snapshot_id, block_no)
        ) WITHOUT ROWID;
        CREATE TRIGGER snapshot_blocks_insert AFTER INSERT ON snapshot_blocks BEGIN
            UPDATE blocks SET refcount = refcount + 1 WHERE id = NEW.block_id;
            UPDATE snapshots SET allocated_blocks = allocated_blocks + 1
                WHERE id = NEW.snapshot_id;
        END;
        CREATE TRIGGER snapshot_blocks_delete AFTER DELETE ON snapshot_blocks BEGIN
            UPDATE blocks SET refcount = refcount - 1 WHERE id = OLD.block_id;
            UPDATE snapshots SET allocated_blocks = allocated_blocks - 1
                WHERE id = OLD.snapshot_id;
        END;
        CREATE TRIGGER snapshot_blocks_update AFTER UPDATE OF block_id ON snapshot_blocks
        WHEN OLD.block_id != NEW.block_id BEGIN
            UPDATE blocks SET refcount = refcount - 1 WHERE id = OLD.block_id;
            UPDATE blocks SET refcount = refcount + 1 WHERE id = NEW.block_id;
        END;
        """,
    )


def _v2(db: sqlite_utils.Database) -> None:
    """Copy jobs (durable, resumable) and snapshot tags."""
    dbutil.run_script(
        db,
        """
        CREATE TABLE copy_jobs (
            dst_snapshot_id TEXT PRIMARY KEY REFERENCES snapshots(id),
            src_region TEXT NOT NULL,
            src_snapshot_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            next_block INTEGER NOT NULL DEFAULT 0,
            done_blocks INTEGER NOT NULL DEFAULT 0,
            total_blocks INTEGER NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE snapshot_tags (
            snapshot_id TEXT NOT NULL REFERENCES snapshots(id),
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (snapshot_id, key)
        ) WITHOUT ROWID;
        """,
    )


def _v3(db: sqlite_utils.Database) -> None:
    """What a source block id is under this region's key, learnt by re-encrypting copies.

    A copy between different keys must otherwise open every source block to learn its id
    here (ids are keyed); with this table an incremental copy opens only blocks it has not
    seen. Both ids are keyed hashes, so a row reveals only that two objects hold the same
    content, which the copy's lineage says anyway. A row is a hint: the block it names is
    used only if this region still holds it, and re-derived (and checked) if not.
    """
    db.execute(
        "CREATE TABLE id_translations ("
        " dst_key_id TEXT NOT NULL,"  # '' for blocks stored in the clear
        " src_block_id BLOB NOT NULL,"
        " dst_block_id BLOB NOT NULL,"
        " PRIMARY KEY (dst_key_id, src_block_id)) WITHOUT ROWID"
    )
    db.execute("CREATE INDEX id_translations_dst ON id_translations(dst_block_id)")


def _v4(db: sqlite_utils.Database) -> None:
    """Delta objects (formats/delta.py): a block may be stored over a base block.

    `base_id` names the base of a delta object (NULL: a full object). A base counts as
    referenced while a delta row names it: the triggers add the reference when the delta's
    row is inserted and drop it when the row is deleted, so garbage collection takes a base
    only after its last delta, by construction, as it does for map rows. Existing rows are
    full objects, so the migration adds the column and nothing else changes.
    """
    dbutil.run_script(
        db,
        """
        ALTER TABLE blocks ADD COLUMN base_id BLOB;
        CREATE INDEX blocks_base ON blocks(base_id) WHERE base_id IS NOT NULL;
        CREATE TRIGGER blocks_base_insert AFTER INSERT ON blocks
        WHEN NEW.base_id IS NOT NULL BEGIN
            UPDATE blocks SET refcount = refcount + 1 WHERE id = NEW.base_id;
        END;
        CREATE TRIGGER blocks_base_delete AFTER DELETE ON blocks
        WHEN OLD.base_id IS NOT NULL BEGIN
            UPDATE blocks SET refcount = refcount - 1 WHERE id = OLD.base_id;
        END;
        CREATE TRIGGER blocks_base_update AFTER UPDATE OF base_id ON blocks
        WHEN OLD.base_id IS NOT NEW.base_id BEGIN
            UPDATE blocks SET refcount = refcount - 1 WHERE id = OLD.base_id;
            UPDATE blocks SET refcount = refcount + 1 WHERE id = NEW.base_id;
        END;
        """,
    )


def _v5(db: sqlite_utils.Database) -> None:
    """Maps relative to a parent (issue 17): a snapshot may hold only the rows where it
    differs from another, sealed snapshot of its region.

    - `snapshots.parent_id`: the snapshot its map is relative to (NULL: a full map), and
      `depth`, its distance from a full map (bounded by MAX_CHAIN_DEPTH).
    - `snapshots.map_id`: the key of its own rows in `snapshot_blocks` (NULL: its id). When
      a parent with one child is deleted, the child's few rows are merged into the parent's
      map and the child takes that map over, so deleting the oldest of a chain costs what
      the next one changed, not the disk's size.
    - A row whose block id is empty (TOMBSTONE) is a hole over the parent's block.

    `snapshot_blocks` is rebuilt without its foreign keys for that: a map's key may outlive
    the snapshot that first held it, and a tombstone names no block; a trigger refuses a
    row naming a block that has no row, as the key did (so an index row still never
    points at missing data). The triggers keep the
    refcounts by construction as before; `allocated_blocks` (the resolved map's blocks) is
    no longer one trigger's count of one table's rows, so commit_blocks keeps it in the
    same transaction. Existing maps are full maps: rows and counts carry over unchanged.
    """
    dbutil.run_script(
        db,
        """
        ALTER TABLE snapshots ADD COLUMN parent_id TEXT;
        ALTER TABLE snapshots ADD COLUMN map_id TEXT;
        ALTER TABLE snapshots ADD COLUMN depth INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX snapshots_parent ON snapshots(parent_id) WHERE parent_id IS NOT NULL;
        ALTER TABLE copy_jobs ADD COLUMN base_snapshot_id TEXT;
        DROP TRIGGER snapshot_blocks_insert;
        DROP TRIGGER snapshot_blocks_delete;
        DROP TRIGGER snapshot_blocks_update;
        CREATE TABLE snapshot_blocks_v5 (
            snapshot_id TEXT NOT NULL,
            block_no INTEGER NOT NULL,
            block_id BLOB NOT NULL,
            PRIMARY KEY (snapshot_id, block_no)
        ) WITHOUT ROWID;
        INSERT INTO snapshot_blocks_v5 SELECT snapshot_id, block_no, block_id FROM snapshot_blocks;
        DROP TABLE snapshot_blocks;
        ALTER TABLE snapshot_blocks_v5 RENAME TO snapshot_blocks;
        CREATE TRIGGER snapshot_blocks_named BEFORE INSERT ON snapshot_blocks
        WHEN length(NEW.block_id) > 0
            AND NOT EXISTS (SELECT 1 FROM blocks WHERE id = NEW.block_id) BEGIN
            SELECT RAISE(ABORT, 'FOREIGN KEY constraint failed: a map row names no block');
        END;
        CREATE TRIGGER snapshot_blocks_renamed BEFORE UPDATE OF block_id ON snapshot_blocks
        WHEN length(NEW.block_id) > 0
            AND NOT EXISTS (SELECT 1 FROM blocks WHERE id = NEW.block_id) BEGIN
            SELECT RAISE(ABORT, 'FOREIGN KEY constraint failed: a map row names no block');
        END;
        CREATE TRIGGER snapshot_blocks_insert AFTER INSERT ON snapshot_blocks BEGIN
            UPDATE blocks SET refcount = refcount + 1 WHERE id = NEW.block_id;
        END;
        CREATE TRIGGER snapshot_blocks_delete AFTER DELETE ON snapshot_blocks BEGIN
            UPDATE blocks SET refcount = refcount - 1 WHERE id = OLD.block_id;
        END;
        CREATE TRIGGER snapshot_blocks_update AFTER UPDATE OF block_id ON snapshot_blocks
        WHEN OLD.block_id != NEW.block_id BEGIN
            UPDATE blocks SET refcount = refcount - 1 WHERE id = OLD.block_id;
            UPDATE blocks SET refcount = refcount + 1 WHERE id = NEW.block_id;
        END;
        """,
    )


MIGRATIONS: list[dbutil.Migration] = [_v1, _v2, _v3, _v4, _v5]

SNAPSHOT_COLUMNS = (
    "id", "name", "status", "size", "mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns",
    "created_at", "sealed_at", "allocated_blocks", "deleted", "source_snapshot_id",
    "source_region", "description", "retention_days", "encrypted", "kms_key_id", "error",
    "transferred_bytes",
)  # fmt: skip


# What a block's refcount must be: the map rows naming it, and the deltas stored over it.
TOMBSTONE = b""  # a map row with this block id is a hole over the parent's block
# How far a snapshot's map may be from a full one. A lookup of a block the chain did not
# change asks each level once (~15 us each), and a sealed map loads level by level, so the
# bound keeps both small; a snapshot that would be deeper keeps a full map, so a chain of
# daily snapshots costs a full map every MAX_CHAIN_DEPTH + 1 days and the changes between.
MAX_CHAIN_DEPTH = 32
_IN_CHUNK = 500  # block numbers per `IN (...)` lookup


# A lookup through a chain at least this deep uses the parent's resolved map held in memory
# (ParentMap: 40 bytes a block), for at most PARENT_MAPS parents of at most PARENT_MAP_BLOCKS
# blocks each: a clone rewritten in place looks up every block it touches, and a query per
# level made that grow with the chain's depth. The map is built on the trio thread in one
# go (about 1 us a row per level), so only for disks of up to 64 Ki blocks (32 GiB at
# 512 KiB: tens of milliseconds); a larger one's lookups ask each level, as before.
PARENT_MAP_DEPTH = 3
PARENT_MAPS = 2
PARENT_MAP_BLOCKS = 1 << 16


class ParentMap:
    """(block number -> id) of a sealed snapshot's resolved map, compact; holes absent."""

    __slots__ = ("_numbers", "_ids")

    def __init__(self, rows: list[tuple[int, bytes]]):
        self._numbers = array("q", (no for no, _ in rows))
        self._ids = b"".join(bid for _, bid in rows)

    def get(self, block_no: int) -> bytes | None:
        i = bisect.bisect_left(self._numbers, block_no)
        if i < len(self._numbers) and self._numbers[i] == block_no:
            return self._ids[i * 32 : (i + 1) * 32]
        return None


class ChainBroken(sqlite3.DatabaseError):
    """A snapshot's map names a parent that is not in the index: damage (snapfs check)."""


_USERS = (
    "((SELECT count(*) FROM snapshot_blocks m WHERE m.block_id = b.id)"
    " + (SELECT count(*) FROM blocks d WHERE d.base_id = b.id))"
)


@dataclass(frozen=True, slots=True)
class NewBlock:
    """A block object that is durable and needs its index row (if not already there)."""

    block_id: bytes
    plain_size: int
    stored_size: int
    codec: int
    key_id: str | None = None
    base_id: bytes | None = None  # a delta object: the block it is stored over

    @property
    def transferred_size(self) -> int:
        """What a copy counts for it: a full block its plaintext (as the clouds count a
        copied block), a delta the bytes of its object (what actually moved)."""
        return self.stored_size if self.base_id is not None else self.plain_size


@dataclass(frozen=True, slots=True)
class RestoredSnapshot:
    """A snapshot rebuilt from its manifest: its row, its block map with each block's sizes,
    its tags, and the key its blocks are encrypted under (None: in the clear)."""

    row: dict[str, Any]
    # block_no, id, plain, stored, codec, base id (None: a full object)
    blocks: Sequence[tuple[int, bytes, int, int, int, bytes | None]]
    tags: dict[str, str]
    key_id: str | None = None
    bases: Sequence[tuple[bytes, int, int, int]] = ()  # id, plain, stored, codec


@dataclass(frozen=True, slots=True)
class RegionStats:
    blocks: int
    plain_bytes: int
    stored_bytes: int
    referenced_plain_bytes: int
    unreferenced_blocks: int


class RegionIndex:
    def __init__(
        self,
        path: Path | None = None,
        *,
        readonly: bool = False,
        connection: IndexConnection | None = None,
    ):
        """The index in the SQLite file `path` (created and migrated unless `readonly`), or
        on an engine's `connection` that is already at its newest schema (meta/pg.py)."""
        self.path = path
        self.readonly = readonly
        if connection is None:
            if path is None:
                raise ValueError("a region index needs a path or a connection")
            sqlite = SqliteConnection.open(path, readonly=readonly)
            if not readonly:
                dbutil.migrate(sqlite.database, MIGRATIONS, f"region index {path}")
            connection = sqlite
        self.db: IndexConnection = connection
        self.bases_released = 0  # by the last drop_unreferenced
        # Told after each commit that changes a snapshot's row, tags or name (its id) or the
        # region's settings (None): a region on an object store republishes its manifests.
        self.on_change: Callable[[str | None], None] | None = None
        # schema 5 (a read-only look may be older)
        self._chained = "parent_id" in self.db.columns("snapshots")
        self._chains: dict[str, tuple[str, ...]] = {}
        self._parents: dict[str, str | None] = {}
        # Resolved maps of parents (sealed, so they only change by a fold), for lookups
        # through deep chains: one bisection instead of a query per level.
        self._parent_maps: dict[str, ParentMap] = {}
        self._fold_cursors: dict[tuple[str, str], int] = {}

    def _changed(self, *snapshot_ids: str | None) -> None:
        if self.on_change is not None:
            for snapshot_id in snapshot_ids:
                self.on_change(snapshot_id)

    def close(self) -> None:
        self.db.close()

    def reader(self) -> RegionIndex:
        """A read-only index of the same region on a connection of its own, for a worker
        thread (the manifest publisher): this one stays the trio thread's."""
        assert self.path is not None, "an engine's index overrides reader()"
        return RegionIndex(self.path, readonly=True)

    # --- region settings -------------------------------------------------------------------

    def get_setting(self, key: str, default: str | None = None) -> str | None:
        if "meta" not in self.db.table_names():  # a read-only look at an empty file
            return default
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else default

    def set_setting(self, key: str, value: str) -> None:
        with self.db.transaction() as conn:
            self._set_setting(conn, key, value)
        self._changed(None)

    @staticmethod
    def _set_setting(conn: IndexConnection, key: str, value: str) -> None:
        conn.execute(
            f"INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT({conn.conflict('key')}) "
            "DO UPDATE SET value = excluded.value",
            [key, value],
        )

    def settings(self) -> dict[str, str]:
        """Every region setting (the `meta` table but the schema version)."""
        rows = self.db.execute("SELECT key, value FROM meta").fetchall()
        return {k: v for k, v in rows if k != "schema_version"}

    # --- snapshots -------------------------------------------------------------------------

    def snapshots(self, *, include_deleted: bool = False) -> list[dict[str, Any]]:
        where = "" if include_deleted else " WHERE deleted = 0"
        return self.db.rows(f"SELECT * FROM snapshots{where} ORDER BY created_at")

    def snapshot_row(self, snapshot_id: str) -> dict[str, Any] | None:
        rows = self.db.rows("SELECT * FROM snapshots WHERE id = ?", [snapshot_id])
        return rows[0] if rows else None

    def snapshot_named(self, name: str) -> dict[str, Any] | None:
        """The row of the live (not deleted) snapshot called `name`."""
        rows = self.db.rows("SELECT * FROM snapshots WHERE name = ? AND deleted = 0", [name])
        return rows[0] if rows else None

    def snapshot_ids_and_names(self) -> list[tuple[str, str | None]]:
        """(id, name) of every snapshot row, deleted ones too."""
        return self.db.execute("SELECT id, name FROM snapshots").fetchall()

    def insert_snapshot(
        self,
        row: dict[str, Any],
        *,
        tags: dict[str, str] | None = None,
        job: dict[str, Any] | None = None,
        displaced_id: str | None = None,
        parent_id: str | None = None,
    ) -> None:
        """A new snapshot row with its tags and copy job, and the snapshot it replaces
        marked deleted, in one transaction. With `parent_id` it starts with that sealed
        snapshot's content, its map relative to it (a copy whose destination holds the
        source's ancestor: the job then brings only what changed since)."""
        cols = [c for c in SNAPSHOT_COLUMNS if c in row]
        sql = f"INSERT INTO snapshots ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        with self.db.transaction() as conn:
            if displaced_id is not None:
                conn.execute("UPDATE snapshots SET deleted = 1 WHERE id = ?", [displaced_id])
            conn.execute(sql, [row[c] for c in cols])
            if parent_id is not None:
                conn.execute(
                    "UPDATE snapshots SET parent_id = ?, depth = ?, allocated_blocks = "
                    "(SELECT allocated_blocks FROM snapshots WHERE id = ?) WHERE id = ?",
                    [parent_id, self.depth(parent_id) + 1, parent_id, row["id"]],
                )
                self._invalidate()
            conn.executemany(
                "INSERT INTO snapshot_tags (snapshot_id, key, value) VALUES (?, ?, ?)",
                [(row["id"], k, v) for k, v in (tags or {}).items()],
            )
            if job is not None:
                conn.execute(
                    "INSERT INTO copy_jobs (dst_snapshot_id, src_region, src_snapshot_id, kind, "
                    "total_blocks, created_at, base_snapshot_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        row["id"],
                        job["src_region"],
                        job["src_snapshot_id"],
                        job["kind"],
                        job["total_blocks"],
                        job["created_at"],
                        job.get("base_snapshot_id"),
                    ],
                )
        self._changed(displaced_id, row["id"])

    # --- tags and copy jobs ----------------------------------------------------------------

    def tags(self, snapshot_id: str) -> dict[str, str]:
        rows = self.db.execute(
            "SELECT key, value FROM snapshot_tags WHERE snapshot_id = ? ORDER BY key",
            [snapshot_id],
        )
        return dict(rows.fetchall())

    def set_tag(self, snapshot_id: str, key: str, value: str | None) -> None:
        """Set a tag, or remove it when `value` is None."""
        with self.db.transaction() as conn:
            if value is None:
                conn.execute(
                    "DELETE FROM snapshot_tags WHERE snapshot_id = ? AND key = ?",
                    [snapshot_id, key],
                )
            else:
                conn.execute(
                    "INSERT INTO snapshot_tags (snapshot_id, key, value) VALUES (?, ?, ?) "
                    f"ON CONFLICT({conn.conflict('snapshot_id, key')}) "
                    "DO UPDATE SET value = excluded.value",
                    [snapshot_id, key, value],
                )
        self._changed(snapshot_id)

    def replace_tags(self, snapshot_id: str, tags: dict[str, str]) -> bool:
        """Make a snapshot's tags exactly `tags` (what another store says they are), in one
        transaction; whether any changed."""
        current = self.tags(snapshot_id)
        if current == tags:
            return False
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM snapshot_tags WHERE snapshot_id = ?", [snapshot_id])
            conn.executemany(
                "INSERT INTO snapshot_tags (snapshot_id, key, value) VALUES (?, ?, ?)",
                [(snapshot_id, k, v) for k, v in tags.items()],
            )
        self._changed(snapshot_id)
        return True

    def copy_jobs(self) -> list[dict[str, Any]]:
        if "copy_jobs" not in self.db.table_names():  # read-only look at a v1 index
            return []
        return self.db.rows("SELECT * FROM copy_jobs ORDER BY created_at")

    def block_map_from(self, snapshot_id: str, first: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` (block number, id) pairs of the snapshot's resolved map (its own rows
        over its parent's, holes and tombstones left out) from block `first` on, in order."""
        chain = self._chain(snapshot_id)
        out: list[tuple[int, bytes]] = []
        while len(out) < limit:
            levels = [self._own_rows(map_id, first, limit) for map_id in chain]
            # Past the last row of a level that filled its limit, that level is unknown:
            # only numbers up to the smallest such row are resolved in this round.
            bound = min((rows[-1][0] for rows in levels if len(rows) == limit), default=None)
            merged: dict[int, bytes] = {}
            for rows in levels:
                for block_no, block_id in rows:
                    if bound is not None and block_no > bound:
                        break
                    merged.setdefault(block_no, block_id)
            for block_no in sorted(merged):
                if merged[block_no]:
                    out.append((block_no, merged[block_no]))
                    if len(out) == limit:
                        return out
            if bound is None:
                return out
            first = bound + 1
        return out

    def own_rows_from(
        self, snapshot_id: str, first: int, limit: int
    ) -> list[tuple[int, bytes | None]]:
        """Up to `limit` rows of the snapshot's own map from block `first` on (None: a
        tombstone, a hole over its parent's block)."""
        rows = self._own_rows(self._chain(snapshot_id)[0], first, limit)
        return [(no, block_id or None) for no, block_id in rows]

    def _own_rows(self, map_id: str, first: int, limit: int) -> list[tuple[int, bytes]]:
        return self.db.execute(
            "SELECT block_no, block_id FROM snapshot_blocks WHERE snapshot_id = ? "
            "AND block_no >= ? ORDER BY block_no LIMIT ?",
            [map_id, first, limit],
        ).fetchall()

    # --- chains: maps relative to a parent (schema 5) -------------------------------------

    def _invalidate(self) -> None:
        """A parent or a map id changed, or a fold moved rows into a parent's map."""
        self._chains.clear()
        self._parents.clear()
        self._parent_maps.clear()

    def _parent_map(self, chain: Sequence[str], parent_id: str) -> ParentMap | None:
        """The resolved map of `parent_id` (whose chain is `chain`), built on first use when
        the chain is deep enough for it to pay and the map small enough to hold."""
        cached = self._parent_maps.get(parent_id)
        if cached is not None or len(chain) < PARENT_MAP_DEPTH:
            return cached
        (allocated,) = self.db.execute(
            "SELECT allocated_blocks FROM snapshots WHERE id = ?", [parent_id]
        ).fetchone() or (None,)
        if allocated is None or allocated > PARENT_MAP_BLOCKS:
            return None
        if len(self._parent_maps) >= PARENT_MAPS:
            self._parent_maps.pop(next(iter(self._parent_maps)))
        built = ParentMap(self._resolved(parent_id))
        self._parent_maps[parent_id] = built
        return built

    def _chain(self, snapshot_id: str) -> tuple[str, ...]:
        """The map ids a snapshot's content resolves through, its own first, a full map
        last. Cached: only this class changes parents and map ids, and every method that
        does clears the cache."""
        chain = self._chains.get(snapshot_id)
        if chain is not None:
            return chain
        maps: list[str] = []
        current: str | None = snapshot_id
        while current is not None:
            row = (
                self.db.execute(
                    "SELECT coalesce(map_id, id), parent_id FROM snapshots WHERE id = ?",
                    [current],
                ).fetchone()
                if self._chained
                else None
            )
            if row is None:
                if maps:
                    raise ChainBroken(
                        f"snapshot {snapshot_id}: its map's parent {current} is not in the index"
                    )
                maps.append(current)  # no row (yet, or any more): its own rows only
                break
            maps.append(row[0])
            current = row[1]
            if len(maps) > 4 * MAX_CHAIN_DEPTH:
                raise ChainBroken(f"snapshot {snapshot_id}: its chain of parents has a loop")
        self._chains[snapshot_id] = chain = tuple(maps)
        return chain

    def _resolve(self, chain: Sequence[str], numbers: Iterable[int]) -> dict[int, bytes | None]:
        """What each block number resolves to through `chain` (None: a hole)."""
        pending = set(numbers)
        out: dict[int, bytes | None] = {}
        for map_id in chain:
            if not pending:
                break
            ordered = sorted(pending)
            for i in range(0, len(ordered), _IN_CHUNK):
                part = ordered[i : i + _IN_CHUNK]
                rows = self.db.execute(
                    "SELECT block_no, block_id FROM snapshot_blocks WHERE snapshot_id = ? "
                    f"AND block_no IN ({','.join('?' * len(part))})",
                    [map_id, *part],
                )
                for block_no, block_id in rows:
                    out[block_no] = block_id or None
                    pending.discard(block_no)
        for block_no in pending:
            out[block_no] = None
        return out

    def parent_of(self, snapshot_id: str) -> str | None:
        """The snapshot whose map this one's is relative to (None: a full map). Cached
        with the chains (a lookup through a chain asks it for every block)."""
        if not self._chained:
            return None
        if snapshot_id not in self._parents:
            row = self.db.execute(
                "SELECT parent_id FROM snapshots WHERE id = ?", [snapshot_id]
            ).fetchone()
            self._parents[snapshot_id] = row[0] if row else None
        return self._parents[snapshot_id]

    def depth(self, snapshot_id: str) -> int:
        return len(self._chain(snapshot_id)) - 1

    def children(self, snapshot_id: str) -> list[str]:
        """The snapshots whose maps are relative to this one, oldest first."""
        if not self._chained:
            return []
        rows = self.db.execute(
            "SELECT id FROM snapshots WHERE parent_id = ? ORDER BY created_at, id", [snapshot_id]
        )
        return [r[0] for r in rows]

    def ancestors(self, snapshot_id: str) -> list[str]:
        """The snapshot's parent, its parent's parent, ..., up to a full map."""
        out: list[str] = []
        current = self.parent_of(snapshot_id)
        while current is not None and len(out) <= 4 * MAX_CHAIN_DEPTH:
            out.append(current)
            current = self.parent_of(current)
        return out

    def own_row_count(self, snapshot_id: str) -> int:
        """Rows the snapshot's own map holds (tombstones included): what it costs."""
        (count,) = self.db.execute(
            "SELECT count(*) FROM snapshot_blocks WHERE snapshot_id = ?",
            [self._chain(snapshot_id)[0]],
        ).fetchone()
        return count

    def changed_since(
        self, snapshot_id: str, ancestor_id: str, first: int, limit: int
    ) -> list[tuple[int, bytes | None]] | None:
        """The rows where `snapshot_id` may differ from its ancestor `ancestor_id`: every
        block number some map between them (the snapshot's own included, the ancestor's
        not) names, from `first` on, up to `limit`, each with what the snapshot resolves it
        to (None: a hole). Costs what changed between the two, not the disk's size. None
        when `ancestor_id` is not on the snapshot's chain (any more)."""
        cut = self._cut(snapshot_id, ancestor_id)
        if cut is None:
            return None
        chain = self._chain(snapshot_id)
        return self._rows_of_levels(chain, chain[:cut], first, limit) if cut else []

    def _cut(self, snapshot_id: str, ancestor_id: str) -> int | None:
        """Where the ancestor's map is on the snapshot's chain; None if it is not there or
        the ancestor is gone (a folded-away ancestor's id may name its heir's map now)."""
        if self.snapshot_row(ancestor_id) is None:
            return None
        try:
            return self._chain(snapshot_id).index(self._chain(ancestor_id)[0])
        except ValueError:
            return None

    def _rows_of_levels(
        self, chain: Sequence[str], levels: Sequence[str], first: int, limit: int
    ) -> list[tuple[int, bytes | None]]:
        numbers: set[int] = set()
        bound = None
        for map_id in levels:
            rows = self.db.execute(
                "SELECT block_no FROM snapshot_blocks WHERE snapshot_id = ? AND block_no >= ? "
                "ORDER BY block_no LIMIT ?",
                [map_id, first, limit],
            ).fetchall()
            numbers.update(r[0] for r in rows)
            if len(rows) == limit:
                bound = rows[-1][0] if bound is None else min(bound, rows[-1][0])
        wanted = sorted(n for n in numbers if bound is None or n <= bound)[:limit]
        resolved = self._resolve(chain, wanted)
        return [(n, resolved[n]) for n in wanted]

    def changed_count(self, snapshot_id: str, ancestor_id: str) -> int | None:
        """How many rows `changed_since` walks from block 0 (None: not an ancestor)."""
        cut = self._cut(snapshot_id, ancestor_id)
        if cut is None:
            return None
        if cut == 0:
            return 0
        levels = self._chain(snapshot_id)[:cut]
        (count,) = self.db.execute(
            "SELECT count(DISTINCT block_no) FROM snapshot_blocks "
            f"WHERE snapshot_id IN ({','.join('?' * len(levels))})",
            list(levels),
        ).fetchone()
        return count

    def common_levels(self, id_a: str, id_b: str) -> tuple[list[str], list[str]] | None:
        """For two snapshots sharing a chain: the map ids each resolves through that the
        other does not (a diff of the two reads only those rows); None if they share none."""
        chain_a, chain_b = self._chain(id_a), self._chain(id_b)
        shared = set(chain_a) & set(chain_b)
        if not shared:
            return None
        return [m for m in chain_a if m not in shared], [m for m in chain_b if m not in shared]

    def rows_of(
        self, snapshot_id: str, levels: Sequence[str], first: int, limit: int
    ) -> list[tuple[int, bytes | None]]:
        """Block numbers the maps `levels` name from `first` on (up to `limit`), each with
        what `snapshot_id` resolves it to: the rows of a diff between relatives."""
        return self._rows_of_levels(self._chain(snapshot_id), levels, first, limit)

    def resolve(self, snapshot_id: str, numbers: Iterable[int]) -> dict[int, bytes | None]:
        return self._resolve(self._chain(snapshot_id), numbers)

    def set_parent(self, snapshot_id: str, parent_id: str) -> bool:
        """Make a full map relative to `parent_id` (a rebase, service/chains.py): only if
        the parent is live and sealed, not too deep, and the snapshot has no parent and no
        children yet. The caller has put tombstones where the parent has blocks and the
        snapshot holes, so its content is the same before and after. True if done."""
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT depth FROM snapshots WHERE id = ? AND deleted = 0 AND sealed_at IS NOT "
                "NULL AND status = 'available'",
                [parent_id],
            ).fetchone()
            mine = conn.execute(
                "SELECT parent_id, (SELECT count(*) FROM snapshots c WHERE c.parent_id = ?) "
                "FROM snapshots WHERE id = ?",
                [snapshot_id, snapshot_id],
            ).fetchone()
            if row is None or mine is None or mine[0] is not None or mine[1]:
                return False
            if row[0] + 1 > MAX_CHAIN_DEPTH or parent_id == snapshot_id:
                return False
            conn.execute(
                "UPDATE snapshots SET parent_id = ?, depth = ? WHERE id = ?",
                [parent_id, row[0] + 1, snapshot_id],
            )
        self._invalidate()
        return True

    def put_tombstones(self, snapshot_id: str, parent_id: str, first: int, last: int) -> int:
        """Before a rebase onto `parent_id`: a tombstone at each block first..last where
        the parent resolves to a block and the snapshot (a full map) has none. A full map
        reads a tombstone as the hole it is, so this changes no content."""
        own = self._chain(snapshot_id)[0]
        theirs = self.block_map(parent_id, first, last)
        with self.db.transaction() as conn:
            mine = {
                r[0]
                for r in conn.execute(
                    "SELECT block_no FROM snapshot_blocks WHERE snapshot_id = ? "
                    "AND block_no BETWEEN ? AND ?",
                    [own, first, last],
                )
            }
            rows = [(own, no, TOMBSTONE) for no in theirs if no not in mine]
            conn.executemany(
                "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) VALUES (?, ?, ?)",
                rows,
            )
        return len(rows)

    def drop_redundant(self, snapshot_id: str, first: int, last: int) -> int:
        """Delete the snapshot's own rows first..last that say what its parent already
        does (the same block, or a tombstone over a hole): no content changes."""
        chain = self._chain(snapshot_id)
        if len(chain) < 2:
            return 0
        own = chain[0]
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT block_no, block_id FROM snapshot_blocks WHERE snapshot_id = ? "
                "AND block_no BETWEEN ? AND ?",
                [own, first, last],
            ).fetchall()
            under = self._resolve(chain[1:], [no for no, _ in rows])
            gone = [(own, no) for no, block_id in rows if under[no] == (block_id or None)]
            conn.executemany(
                "DELETE FROM snapshot_blocks WHERE snapshot_id = ? AND block_no = ?", gone
            )
        return len(gone)

    def fold_step(self, snapshot_id: str, limit: int) -> bool:
        """One transaction of folding a deleted snapshot's map into its children, so it can
        go without changing theirs. False when nothing is left to fold (no children, or the
        snapshot's row is gone: its map was handed to its last child).

        Each child but the newest gets the snapshot's rows it lacks, `limit` at a time, and
        is then made a child of the snapshot's parent. The newest child, once it is the
        only one, has its own rows merged into the snapshot's map (`limit` at a time, each
        moved row leaving the child's map) and then takes that map over, in the same
        transaction as the snapshot's row goes: so deleting the oldest of a chain costs the
        rows the next one changed. Every step leaves every child's content as it was, so
        a stop between steps only leaves work for the next mount's deletion."""
        row = self.db.execute(
            "SELECT coalesce(map_id, id), parent_id FROM snapshots WHERE id = ?", [snapshot_id]
        ).fetchone()
        if row is None or not self._chained:
            return False
        own, grandparent = row
        kids = self.db.execute(
            "SELECT id, coalesce(map_id, id) FROM snapshots WHERE parent_id = ? "
            "ORDER BY created_at, id",
            [snapshot_id],
        ).fetchall()
        if not kids:
            return False
        child, child_map = kids[0]
        if len(kids) > 1:
            self._fold_copy(own, grandparent, child, child_map, snapshot_id, limit)
        else:
            self._fold_merge(own, grandparent, child, child_map, snapshot_id, limit)
        return True

    def _fold_copy(
        self, own: str, grandparent: str | None, child: str, child_map: str, gone: str, limit: int
    ) -> None:
        cursor = self._fold_cursors.get((gone, child), 0)
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT block_no, block_id FROM snapshot_blocks WHERE snapshot_id = ? "
                "AND block_no >= ? ORDER BY block_no LIMIT ?",
                [own, cursor, limit],
            ).fetchall()
            conn.executemany(
                "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                # Over no parent a tombstone says nothing a missing row does not.
                [(child_map, no, bid) for no, bid in rows if bid or grandparent is not None],
            )
            if len(rows) < limit:
                self._reparent(conn, child, grandparent)
        if len(rows) < limit:
            self._fold_cursors.pop((gone, child), None)
            self._invalidate()
        else:
            self._fold_cursors[(gone, child)] = rows[-1][0] + 1

    def _fold_merge(
        self, own: str, grandparent: str | None, child: str, child_map: str, gone: str, limit: int
    ) -> None:
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT block_no, block_id FROM snapshot_blocks WHERE snapshot_id = ? "
                "ORDER BY block_no LIMIT ?",
                [child_map, limit],
            ).fetchall()
            holes = [(own, no) for no, bid in rows if not bid and grandparent is None]
            conn.executemany(
                "DELETE FROM snapshot_blocks WHERE snapshot_id = ? AND block_no = ?", holes
            )
            conn.executemany(
                "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) VALUES (?, ?, ?) "
                f"ON CONFLICT({conn.conflict('snapshot_id, block_no')}) "
                "DO UPDATE SET block_id = excluded.block_id",
                [(own, no, bid) for no, bid in rows if bid or grandparent is not None],
            )
            conn.executemany(
                "DELETE FROM snapshot_blocks WHERE snapshot_id = ? AND block_no = ?",
                [(child_map, no) for no, _ in rows],
            )
            if len(rows) < limit:
                conn.execute("UPDATE snapshots SET map_id = ? WHERE id = ?", [own, child])
                self._reparent(conn, child, grandparent)
                self._delete_row(conn, gone)
        self._invalidate()  # every step: the deleted snapshot's map (a parent's) changed
        if len(rows) < limit:
            self._changed(gone, child)

    @staticmethod
    def _reparent(conn: IndexConnection, child: str, parent: str | None) -> None:
        """`child` (and its descendants) one level nearer to a full map."""
        conn.execute("UPDATE snapshots SET parent_id = ? WHERE id = ?", [parent, child])
        conn.execute(
            # The first term reads the id from its row, not from `?`, so that both terms
            # have the column's type (and, in PostgreSQL, its collation).
            "WITH RECURSIVE sub(id) AS (SELECT id FROM snapshots WHERE id = ? UNION ALL "
            "SELECT s.id FROM snapshots s JOIN sub ON s.parent_id = sub.id) "
            "UPDATE snapshots SET depth = CASE WHEN depth > 0 THEN depth - 1 ELSE 0 END "
            "WHERE id IN (SELECT id FROM sub)",
            [child],
        )

    @staticmethod
    def _delete_row(conn: IndexConnection, snapshot_id: str) -> None:
        conn.execute("DELETE FROM snapshot_tags WHERE snapshot_id = ?", [snapshot_id])
        conn.execute("DELETE FROM copy_jobs WHERE dst_snapshot_id = ?", [snapshot_id])
        conn.execute("DELETE FROM snapshots WHERE id = ?", [snapshot_id])

    def broken_chains(self) -> list[tuple[str, str | None, str]]:
        """(snapshot id, name, why) of every snapshot whose chain of parents is damaged: a
        parent missing, not sealed, a loop, a depth that does not match, or a map id that
        two snapshots claim."""
        if not self._chained:
            return []
        rows = self.db.execute(
            "SELECT id, name, parent_id, depth, coalesce(map_id, id) FROM snapshots"
        ).fetchall()
        by_id = {r[0]: r for r in rows}
        owners: dict[str, str] = {}
        broken = []
        for snapshot_id, name, parent_id, depth, map_id in rows:
            if map_id in owners:
                broken.append((snapshot_id, name, f"its map {map_id} is also {owners[map_id]}'s"))
            owners[map_id] = snapshot_id
            if parent_id is None:
                if depth:
                    broken.append((snapshot_id, name, f"a full map recorded at depth {depth}"))
                continue
            seen = [snapshot_id]
            current: str | None = parent_id
            while current is not None and current not in seen:
                parent = by_id.get(current)
                if parent is None:
                    broken.append((snapshot_id, name, f"its parent {current} is missing"))
                    break
                seen.append(current)
                current = parent[2]
            else:
                if current is not None:
                    broken.append((snapshot_id, name, "its chain of parents has a loop"))
                elif len(seen) - 1 != depth:
                    broken.append(
                        (snapshot_id, name, f"depth {depth} recorded, {len(seen) - 1} found")
                    )
        return broken

    def update_snapshot(self, snapshot_id: str, **fields: Any) -> None:
        with self.db.transaction() as conn:
            self._update_snapshot(conn, snapshot_id, fields)
        self._changed(snapshot_id)

    @staticmethod
    def _update_snapshot(conn: IndexConnection, snapshot_id: str, fields: dict) -> None:
        if not fields:
            return
        assignments = ", ".join(f"{name} = ?" for name in fields)
        conn.execute(
            f"UPDATE snapshots SET {assignments} WHERE id = ?", [*fields.values(), snapshot_id]
        )

    def delete_map_chunk(self, snapshot_id: str, limit: int) -> int:
        """Delete up to `limit` rows of a snapshot's own map (its first blocks); returns how
        many went. Deleting a large snapshot a chunk at a time keeps each transaction short.
        Only for a snapshot no other's map is relative to (fold_step first)."""
        own = self._chain(snapshot_id)[0]
        with self.db.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM snapshot_blocks WHERE snapshot_id = ? AND block_no IN "
                "(SELECT block_no FROM snapshot_blocks WHERE snapshot_id = ? "
                "ORDER BY block_no LIMIT ?)",
                [own, own, limit],
            )
        return cur.rowcount

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Drop a snapshot and its own map, its children's maps folded first (at once: the
        service folds a chunk at a time, this is for a mount's recovery and the last step);
        its blocks' refcounts fall by the triggers."""
        while self.fold_step(snapshot_id, 4096):
            pass
        own = self._chain(snapshot_id)[0]
        with self.db.transaction() as conn:
            if conn.execute("SELECT 1 FROM snapshots WHERE id = ?", [snapshot_id]).fetchone():
                conn.execute("DELETE FROM snapshot_blocks WHERE snapshot_id = ?", [own])
                self._delete_row(conn, snapshot_id)
        self._invalidate()
        self._changed(snapshot_id)

    def rename_snapshot(self, snapshot_id: str, name: str, *, displaced_id: str | None) -> None:
        """Rename; a snapshot already holding `name` is marked deleted in the same commit."""
        with self.db.transaction() as conn:
            if displaced_id is not None:
                conn.execute("UPDATE snapshots SET deleted = 1 WHERE id = ?", [displaced_id])
            conn.execute("UPDATE snapshots SET name = ? WHERE id = ?", [name, snapshot_id])
        self._changed(displaced_id, snapshot_id)

    def exchange_names(self, id_a: str, id_b: str, name_a: str, name_b: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("UPDATE snapshots SET name = NULL WHERE id = ?", [id_a])
            conn.execute("UPDATE snapshots SET name = ? WHERE id = ?", [name_a, id_b])
            conn.execute("UPDATE snapshots SET name = ? WHERE id = ?", [name_b, id_a])
        self._changed(id_a, id_b)

    def allocated_blocks(self, snapshot_id: str) -> int:
        row = self.db.execute(
            "SELECT allocated_blocks FROM snapshots WHERE id = ?", [snapshot_id]
        ).fetchone()
        return row[0] if row else 0

    # --- block map -------------------------------------------------------------------------

    def block_id(self, snapshot_id: str, block_no: int) -> bytes | None:
        chain = self._chain(snapshot_id)
        if len(chain) > 1:
            parent = self.parent_of(snapshot_id)
            cached = self._parent_map(chain[1:], parent) if parent is not None else None
            if cached is not None:
                row = self.db.execute(
                    "SELECT block_id FROM snapshot_blocks WHERE snapshot_id = ? "
                    "AND block_no = ?",
                    [chain[0], block_no],
                ).fetchone()
                return (row[0] or None) if row is not None else cached.get(block_no)
        for map_id in chain:
            row = self.db.execute(
                "SELECT block_id FROM snapshot_blocks WHERE snapshot_id = ? AND block_no = ?",
                [map_id, block_no],
            ).fetchone()
            if row is not None:
                return row[0] or None
        return None

    def referenced_by(self, snapshot_id: str) -> list[bytes]:
        """The block ids in one snapshot's resolved map (with repeats): a read of the rows of
        that snapshot's chain alone, so in a damaged index it fails (sqlite3.DatabaseError)
        only for the snapshots whose rows are on damaged pages."""
        return [block_id for _, block_id in self._resolved(snapshot_id)]

    def _resolved(self, snapshot_id: str) -> list[tuple[int, bytes]]:
        """The whole resolved map, in block order (a sealed map's load, a manifest)."""
        chain = self._chain(snapshot_id)
        if len(chain) == 1:
            rows = self.db.execute(
                "SELECT block_no, block_id FROM snapshot_blocks WHERE snapshot_id = ? "
                "ORDER BY block_no",
                chain,
            )
            return [(no, bid) for no, bid in rows if bid]
        merged: dict[int, bytes] = {}
        for map_id in chain:
            for no, bid in self.db.execute(
                "SELECT block_no, block_id FROM snapshot_blocks WHERE snapshot_id = ?", [map_id]
            ):
                merged.setdefault(no, bid)
        return [(no, merged[no]) for no in sorted(merged) if merged[no]]

    def _sizes(self, block_ids: Iterable[bytes]) -> dict[bytes, tuple[int, int, int, bytes | None]]:
        """(plain, stored, codec, base id) of each block row."""
        ids = list(set(block_ids))
        out = {}
        for i in range(0, len(ids), _IN_CHUNK):
            part = ids[i : i + _IN_CHUNK]
            for bid, *sizes in self.db.execute(
                "SELECT id, plain_size, stored_size, codec, base_id FROM blocks "
                f"WHERE id IN ({','.join('?' * len(part))})",
                part,
            ):
                out[bid] = (sizes[0], sizes[1], sizes[2], sizes[3])
        return out

    def block_map_with_sizes(
        self, snapshot_id: str
    ) -> list[tuple[int, str, int, int, int, str | None]]:
        """A snapshot's resolved map in block order as (block number, id in upper-case hex,
        plain size, stored size, codec, base id in hex or None): what its manifest lists
        (a manifest is a full map: the bucket describes each snapshot on its own)."""
        resolved = self._resolved(snapshot_id)
        sizes = self._sizes(bid for _, bid in resolved)
        out = []
        for no, bid in resolved:
            if bid not in sizes:
                raise sqlite3.DatabaseError(f"block {bid.hex()} of {snapshot_id} has no row")
            plain, stored, codec, base = sizes[bid]
            base_hex = base.hex().upper() if base is not None else None
            out.append((no, bid.hex().upper(), plain, stored, codec, base_hex))
        return out

    def bases_of(self, snapshot_id: str) -> list[tuple[str, int, int, int]]:
        """The bases a snapshot's delta blocks are stored over, as (id in upper-case hex,
        plain size, stored size, codec): a manifest lists them too, since no map may name
        them any more."""
        sizes = self._sizes(bid for _, bid in self._resolved(snapshot_id))
        bases = {s[3] for s in sizes.values() if s[3] is not None}
        return [
            (bid.hex().upper(), plain, stored, codec)
            for bid, (plain, stored, codec, _) in self._sizes(bases).items()
        ]

    def block_map(self, snapshot_id: str, first: int, last: int) -> dict[int, bytes]:
        """Block ids of block numbers first..last inclusive; holes are absent."""
        seen: dict[int, bytes] = {}
        for map_id in self._chain(snapshot_id):
            for no, bid in self.db.execute(
                "SELECT block_no, block_id FROM snapshot_blocks "
                "WHERE snapshot_id = ? AND block_no BETWEEN ? AND ?",
                [map_id, first, last],
            ):
                seen.setdefault(no, bid)
        return {no: bid for no, bid in seen.items() if bid}

    def commit_blocks(
        self,
        snapshot_id: str,
        new_blocks: Iterable[NewBlock],
        mapping: Sequence[tuple[int, bytes | None]],
        snapshot_fields: dict[str, Any],
        job_fields: dict[str, Any] | None = None,
        translations: Sequence[tuple[str, bytes, bytes]] = (),
    ) -> None:
        """One transaction: block rows for new objects, the map changes, snapshot fields,
        (for a copy) the job's resume point and the id translations it learnt.

        A snapshot relative to a parent keeps only the rows that differ from it: a block the
        parent already has there is no row, a hole over the parent's block a tombstone.
        `allocated_blocks` moves by what the resolved map gained and lost.

        The objects named in `new_blocks` must already be durable.
        """
        changes = dict(mapping)
        chain = self._chain(snapshot_id)
        own = chain[0]
        with self.db.transaction() as conn:
            before, under = self._before_and_under(snapshot_id, chain, changes)
            upserts, deletes = [], []
            allocated = 0
            for no, bid in changes.items():
                allocated += (bid is not None) - (before[no] is not None)
                if len(chain) > 1 and under[no] == bid:
                    deletes.append((own, no))  # what the parent says already
                elif bid is not None:
                    upserts.append((own, no, bid))
                elif len(chain) > 1:
                    upserts.append((own, no, TOMBSTONE))
                else:
                    deletes.append((own, no))
            conn.executemany(
                "INSERT INTO blocks (id, plain_size, stored_size, codec, key_id, base_id) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [
                    (b.block_id, b.plain_size, b.stored_size, b.codec, b.key_id, b.base_id)
                    for b in new_blocks
                ],
            )
            conn.executemany(
                "DELETE FROM snapshot_blocks WHERE snapshot_id = ? AND block_no = ?", deletes
            )
            conn.executemany(
                "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) VALUES (?, ?, ?) "
                f"ON CONFLICT({conn.conflict('snapshot_id, block_no')}) "
                "DO UPDATE SET block_id = excluded.block_id",
                upserts,
            )
            conn.executemany(
                "INSERT INTO id_translations (dst_key_id, src_block_id, dst_block_id) "
                f"VALUES (?, ?, ?) ON CONFLICT({conn.conflict('dst_key_id, src_block_id')}) "
                "DO UPDATE SET dst_block_id = excluded.dst_block_id",
                translations,
            )
            if allocated:
                conn.execute(
                    "UPDATE snapshots SET allocated_blocks = allocated_blocks + ? WHERE id = ?",
                    [allocated, snapshot_id],
                )
            self._update_snapshot(conn, snapshot_id, snapshot_fields)
            if job_fields:
                assignments = ", ".join(f"{name} = ?" for name in job_fields)
                conn.execute(
                    f"UPDATE copy_jobs SET {assignments} WHERE dst_snapshot_id = ?",
                    [*job_fields.values(), snapshot_id],
                )

    def clone_map(self, snapshot_id: str, parent_id: str, fields: dict[str, Any]) -> None:
        """One transaction: an empty snapshot takes its parent's content and `fields` (size,
        key). It becomes relative to the parent (no rows: O(1)) unless that would make its
        chain deeper than MAX_CHAIN_DEPTH; it then takes a full copy of the resolved map."""
        depth = self.depth(parent_id) + 1
        with self.db.transaction() as conn:
            (allocated,) = conn.execute(
                "SELECT allocated_blocks FROM snapshots WHERE id = ?", [parent_id]
            ).fetchone()
            if depth <= MAX_CHAIN_DEPTH and self._chained:
                conn.execute(
                    "UPDATE snapshots SET parent_id = ?, depth = ? WHERE id = ?",
                    [parent_id, depth, snapshot_id],
                )
            else:
                own = self._chain(snapshot_id)[0]
                rows = self._resolved(parent_id)
                conn.executemany(
                    "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) "
                    "VALUES (?, ?, ?)",
                    [(own, no, bid) for no, bid in rows],
                )
                allocated = len(rows)
            self._update_snapshot(conn, snapshot_id, {**fields, "allocated_blocks": allocated})
        self._invalidate()

    def _before_and_under(
        self, snapshot_id: str, chain: Sequence[str], numbers: Iterable[int]
    ) -> tuple[dict[int, bytes | None], dict[int, bytes | None]]:
        """What each block resolves to now, and what the parent's chain says for it."""
        wanted = list(numbers)
        if len(chain) == 1:
            return self._resolve(chain, wanted), {}
        parent = self.parent_of(snapshot_id)
        cached = self._parent_map(chain[1:], parent) if parent is not None else None
        if cached is None:
            return self._resolve(chain, wanted), self._resolve(chain[1:], wanted)
        under = {no: cached.get(no) for no in wanted}
        own: dict[int, bytes | None] = {}
        for i in range(0, len(wanted), _IN_CHUNK):
            part = wanted[i : i + _IN_CHUNK]
            for no, bid in self.db.execute(
                "SELECT block_no, block_id FROM snapshot_blocks WHERE snapshot_id = ? "
                f"AND block_no IN ({','.join('?' * len(part))})",
                [chain[0], *part],
            ):
                own[no] = bid or None
        return {no: own[no] if no in own else under[no] for no in wanted}, under

    def finish_copy(self, snapshot_id: str, fields: dict[str, Any]) -> None:
        """The job's last step: the snapshot's final state and the job row gone, atomically."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM copy_jobs WHERE dst_snapshot_id = ?", [snapshot_id])
            self._update_snapshot(conn, snapshot_id, fields)
        self._changed(snapshot_id)

    def truncate_map_step(
        self, snapshot_id: str, first_dropped: int, limit: int, size: int, block_size: int
    ) -> bool:
        """One step of a shrink to `size`: drop up to `limit` of the highest mapped blocks
        from `first_dropped` on, and record the size where they began (`size` itself once
        none is left past it), in one transaction. True when the shrink is complete. Over
        a parent, a dropped block the parent has becomes a tombstone."""
        chain = self._chain(snapshot_id)
        own = chain[0]
        with self.db.transaction() as conn:
            mapped = [no for no, _ in self._resolved_from(chain, first_dropped)]
            cut = first_dropped if len(mapped) <= limit else mapped[-limit]
            dropped = [no for no in mapped if no >= cut]
            conn.execute(  # the tombstones of earlier steps stay: holes over the parent
                "DELETE FROM snapshot_blocks WHERE snapshot_id = ? AND block_no >= ? "
                "AND length(block_id) > 0",
                [own, cut],
            )
            if len(chain) > 1:
                under = self._resolve(chain[1:], dropped)
                conn.executemany(
                    "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) "
                    "VALUES (?, ?, ?)",
                    [(own, no, TOMBSTONE) for no in dropped if under[no] is not None],
                )
            if dropped:
                conn.execute(
                    "UPDATE snapshots SET allocated_blocks = allocated_blocks - ? WHERE id = ?",
                    [len(dropped), snapshot_id],
                )
            done = cut == first_dropped
            self._update_snapshot(conn, snapshot_id, {"size": size if done else cut * block_size})
        return done

    def _resolved_from(self, chain: Sequence[str], first: int) -> list[tuple[int, bytes]]:
        merged: dict[int, bytes] = {}
        for map_id in chain:
            for no, bid in self.db.execute(
                "SELECT block_no, block_id FROM snapshot_blocks WHERE snapshot_id = ? "
                "AND block_no >= ?",
                [map_id, first],
            ):
                merged.setdefault(no, bid)
        return [(no, merged[no]) for no in sorted(merged) if merged[no]]

    # --- blocks ----------------------------------------------------------------------------

    def translation(self, dst_key_id: str, src_block_id: bytes) -> bytes | None:
        row = self.db.execute(
            "SELECT dst_block_id FROM id_translations WHERE dst_key_id = ? AND src_block_id = ?",
            [dst_key_id, src_block_id],
        ).fetchone()
        return row[0] if row else None

    def base_of(self, block_id: bytes) -> bytes | None:
        """The base a delta object is stored over; None for a full object (or no row)."""
        row = self.db.execute("SELECT base_id FROM blocks WHERE id = ?", [block_id]).fetchone()
        return row[0] if row else None

    def block_kind(self, block_id: bytes) -> str | None:
        """'full' or 'delta' for a block the index holds, None if it holds none (one
        lookup where has_block and base_of would be two)."""
        row = self.db.execute("SELECT base_id FROM blocks WHERE id = ?", [block_id]).fetchone()
        if row is None:
            return None
        return "full" if row[0] is None else "delta"

    def deltas_over(self, base_id: bytes) -> list[bytes]:
        """The delta objects stored over `base_id`."""
        rows = self.db.execute("SELECT id FROM blocks WHERE base_id = ?", [base_id])
        return [r[0] for r in rows]

    def set_base(self, block_id: bytes, base_id: bytes | None) -> None:
        """Record that a block's object was replaced by one over `base_id` (None: whole);
        the triggers move the base's reference."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE blocks SET base_id = ? WHERE id = ?", [base_id, block_id])

    def block_rows(self, block_ids: Sequence[bytes]) -> dict[bytes, NewBlock]:
        """The rows of those of `block_ids` the index has (a shared region's commit sends
        them to its ledger, meta/ledger.py)."""
        found: dict[bytes, NewBlock] = {}
        for i in range(0, len(block_ids), _IN_CHUNK):
            part = list(block_ids[i : i + _IN_CHUNK])
            for row in self.db.execute(
                "SELECT id, plain_size, stored_size, codec, key_id, base_id FROM blocks "
                f"WHERE id IN ({','.join('?' * len(part))})",
                part,
            ):
                found[bytes(row[0])] = NewBlock(
                    bytes(row[0]), row[1], row[2], row[3], row[4],
                    bytes(row[5]) if row[5] is not None else None,
                )  # fmt: skip
        return found

    def has_block(self, block_id: bytes) -> bool:
        row = self.db.execute("SELECT 1 FROM blocks WHERE id = ?", [block_id]).fetchone()
        return row is not None

    def unreferenced_blocks(self, limit: int = 10_000, after: bytes = b"") -> list[bytes]:
        """Ids of blocks no snapshot names, in id order from just after `after`."""
        rows = self.db.execute(
            "SELECT id FROM blocks WHERE refcount <= 0 AND id > ? ORDER BY id LIMIT ?",
            [after, limit],
        ).fetchall()
        return [r[0] for r in rows]

    def drop_unreferenced(self, block_ids: Iterable[bytes]) -> list[bytes]:
        """Delete the rows of blocks still unreferenced; returns the ids actually dropped.
        A dropped delta's base loses that reference (its trigger): `bases_released` counts
        them, so the collector knows to look again."""
        dropped = []
        self.bases_released = 0
        with self.db.transaction() as conn:
            for block_id in block_ids:
                row = conn.execute(
                    "DELETE FROM blocks WHERE id = ? AND refcount <= 0 RETURNING base_id",
                    [block_id],
                ).fetchone()
                if row is not None:
                    dropped.append(block_id)
                    self.bases_released += row[0] is not None
                    conn.execute("DELETE FROM id_translations WHERE dst_block_id = ?", [block_id])
        return dropped

    def all_block_ids(self) -> set[bytes]:
        return {r[0] for r in self.db.execute("SELECT id FROM blocks")}

    def referenced_block_ids(self) -> list[bytes]:
        """Every block id some snapshot's map names, once each."""
        return [
            r[0]
            for r in self.db.execute(
                "SELECT DISTINCT block_id FROM snapshot_blocks WHERE length(block_id) > 0"
            )
        ]

    def block_users(self, block_id: bytes) -> Iterator[tuple[str | None, str, int]]:
        """(snapshot name, snapshot id, block number) of every snapshot whose resolved map
        names the block: the owner of each row naming it, and its descendants that do not
        override that block."""
        rows = self.db.execute(
            "SELECT snapshot_id, block_no FROM snapshot_blocks WHERE block_id = ?", [block_id]
        ).fetchall()
        for map_id, block_no in rows:
            owner = (
                self.db.execute(
                    "SELECT id, name FROM snapshots WHERE coalesce(map_id, id) = ?", [map_id]
                ).fetchone()
                if self._chained
                else self.db.execute(
                    "SELECT id, name FROM snapshots WHERE id = ?", [map_id]
                ).fetchone()
            )
            if owner is None:
                yield None, map_id, block_no
                continue
            todo = [tuple(owner)]
            while todo:
                sid, name = todo.pop()
                yield name, sid, block_no
                if not self._chained:
                    continue
                for child, child_name, child_map in self.db.execute(
                    "SELECT id, name, coalesce(map_id, id) FROM snapshots WHERE parent_id = ?",
                    [sid],
                ).fetchall():
                    overridden = self.db.execute(
                        "SELECT 1 FROM snapshot_blocks WHERE snapshot_id = ? AND block_no = ?",
                        [child_map, block_no],
                    ).fetchone()
                    if overridden is None:
                        todo.append((child, child_name))

    def stats(self) -> RegionStats:
        # One read snapshot: a rebase or fold committing between the queries below would
        # count a snapshot both as a full map and through its chain.
        with self.db.snapshot():
            if self.readonly:  # beside the daemon: chains cached before may have changed
                self._invalidate()
            return self._stats()

    def _stats(self) -> RegionStats:
        blocks, plain, stored = self.db.execute(
            # CAST: PostgreSQL sums a bigint column as numeric (a Decimal in Python).
            "SELECT count(*), CAST(coalesce(sum(plain_size), 0) AS BIGINT), "
            "CAST(coalesce(sum(stored_size), 0) AS BIGINT) "
            "FROM blocks WHERE refcount > 0"
        ).fetchone()
        (referenced,) = self.db.execute(
            "SELECT CAST(coalesce(sum(b.plain_size), 0) AS BIGINT) FROM snapshot_blocks m "
            "JOIN blocks b ON b.id = m.block_id"
            + (
                " JOIN snapshots s ON s.id = m.snapshot_id WHERE s.parent_id IS NULL "
                "AND s.map_id IS NULL"
                if self._chained
                else ""
            )
        ).fetchone()
        if self._chained:  # relative maps and handed-over ones: through their chains
            for (snapshot_id,) in self.db.execute(
                "SELECT id FROM snapshots WHERE parent_id IS NOT NULL OR map_id IS NOT NULL"
            ).fetchall():
                resolved = [bid for _, bid in self._resolved(snapshot_id)]
                sizes = self._sizes(resolved)
                referenced += sum(sizes[b][0] for b in resolved if b in sizes)
        (garbage,) = self.db.execute("SELECT count(*) FROM blocks WHERE refcount <= 0").fetchone()
        return RegionStats(blocks, plain, stored, referenced, garbage)

    def snapshot_stored_bytes(self) -> dict[str, int]:
        """Per snapshot: stored bytes of the distinct blocks it references (shared counted)."""
        out = {}
        for (snapshot_id,) in self.db.execute("SELECT id FROM snapshots").fetchall():
            sizes = self._sizes(bid for _, bid in self._resolved(snapshot_id))
            if sizes:
                out[snapshot_id] = sum(s[1] for s in sizes.values())
        return out

    # --- checking, repair and rebuild (service/check.py, service/manifests.py) -------------

    def block_refcounts(self) -> Iterator[tuple[bytes, int, int]]:
        """(block id, recorded refcount, map rows naming it) for every block row."""
        yield from self.db.execute(f"SELECT b.id, b.refcount, {_USERS} FROM blocks b")

    def snapshot_allocations(self, skip: Iterable[str] = ()) -> Iterator[tuple[str, int, int]]:
        """(snapshot id, recorded allocated_blocks, blocks its resolved map has), but for
        the snapshots in `skip` (those whose chain is broken)."""
        skipped = set(skip)
        for snapshot_id, recorded in self.db.execute(
            "SELECT id, allocated_blocks FROM snapshots"
        ).fetchall():
            if snapshot_id not in skipped:
                yield snapshot_id, recorded, len(self._resolved(snapshot_id))

    def recount(self) -> list[bytes]:
        """One transaction: every refcount and allocated-block count recomputed from the
        block maps, and the rows of blocks no map names deleted; returns their ids."""
        broken = {sid for sid, _, _ in self.broken_chains()}  # left as recorded
        counts = {
            sid: len(self._resolved(sid))
            for (sid,) in self.db.execute("SELECT id FROM snapshots").fetchall()
            if sid not in broken
        }
        with self.db.transaction() as conn:
            conn.execute(f"UPDATE blocks SET refcount = {_USERS.replace('b.id', 'blocks.id')}")
            conn.executemany(
                "UPDATE snapshots SET allocated_blocks = ? WHERE id = ?",
                [(n, sid) for sid, n in counts.items()],
            )
            dropped = [r[0] for r in conn.execute("SELECT id FROM blocks WHERE refcount = 0")]
            # By id, not by refcount: deleting a delta's row lowers its base's count, and
            # a base that reaches 0 meanwhile goes with the next collection, not here.
            conn.executemany("DELETE FROM blocks WHERE id = ?", [(i,) for i in dropped])
        return dropped

    def quick_check(self, limit: int) -> list[str]:
        """SQLite's check of every page (`PRAGMA quick_check`, at most `limit` problems):
        ["ok"] when sound; sqlite3.DatabaseError when the damage stops the check itself."""
        return self.db.quick_check(limit)

    def schema_trees(self) -> list[tuple[int, str, str]]:
        """(root page, name, type) of every schema object (`sqlite_master`)."""
        return self.db.schema_trees()

    def read_through(self, table: str) -> None:
        """Read every row of `table`; sqlite3.DatabaseError if one of its pages is damaged."""
        for _ in self.db.execute(f'SELECT * FROM "{table}"'):
            pass

    def restore(self, settings: dict[str, str], snapshots: Iterable[RestoredSnapshot]) -> None:
        """Fill an empty index, in one transaction: the region's settings, then each
        snapshot's row, block rows (those not there yet), block map and tags."""
        with self.db.transaction() as conn:
            for key, value in settings.items():
                self._set_setting(conn, key, value)
            for snap in snapshots:
                cols = list(snap.row)
                conn.execute(
                    f"INSERT INTO snapshots ({', '.join(cols)}) "
                    f"VALUES ({', '.join('?' for _ in cols)})",
                    [snap.row[c] for c in cols],
                )
                # Bases first: a delta's row counts its reference on the base's row.
                conn.executemany(
                    "INSERT INTO blocks (id, plain_size, stored_size, codec, key_id) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [(*base, snap.key_id) for base in snap.bases],
                )
                conn.executemany(
                    "INSERT INTO blocks (id, plain_size, stored_size, codec, key_id, base_id) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [
                        (block_id, plain, stored, codec, snap.key_id, base)
                        for _, block_id, plain, stored, codec, base in snap.blocks
                    ],
                )
                conn.executemany(
                    "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) "
                    "VALUES (?, ?, ?)",
                    [(snap.row["id"], no, block_id) for no, block_id, *_ in snap.blocks],
                )
                conn.execute(  # a full map: its rows are its blocks
                    "UPDATE snapshots SET allocated_blocks = ? WHERE id = ?",
                    [len(snap.blocks), snap.row["id"]],
                )
                conn.executemany(
                    "INSERT INTO snapshot_tags (snapshot_id, key, value) VALUES (?, ?, ?)",
                    [(snap.row["id"], k, v) for k, v in snap.tags.items()],
                )
        self._invalidate()
