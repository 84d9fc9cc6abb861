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

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from snapfs.meta import db as dbutil


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


MIGRATIONS: list[dbutil.Migration] = [_v1, _v2, _v3, _v4]

SNAPSHOT_COLUMNS = (
    "id", "name", "status", "size", "mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns",
    "created_at", "sealed_at", "allocated_blocks", "deleted", "source_snapshot_id",
    "source_region", "description", "retention_days", "encrypted", "kms_key_id", "error",
    "transferred_bytes",
)  # fmt: skip


# What a block's refcount must be: the map rows naming it, and the deltas stored over it.
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
    def __init__(self, path: Path, *, readonly: bool = False):
        self.path = path
        self.db = dbutil.connect(path, readonly=readonly)
        if not readonly:
            dbutil.migrate(self.db, MIGRATIONS, f"region index {path}")
        self.bases_released = 0  # by the last drop_unreferenced
        # Told after each commit that changes a snapshot's row, tags or name (its id) or the
        # region's settings (None): a region on an object store republishes its manifests.
        self.on_change: Callable[[str | None], None] | None = None

    def _changed(self, *snapshot_ids: str | None) -> None:
        if self.on_change is not None:
            for snapshot_id in snapshot_ids:
                self.on_change(snapshot_id)

    def close(self) -> None:
        self.db.close()

    # --- region settings -------------------------------------------------------------------

    def get_setting(self, key: str, default: str | None = None) -> str | None:
        return dbutil.get_meta(self.db, key, default)

    def set_setting(self, key: str, value: str) -> None:
        with dbutil.transaction(self.db) as conn:
            dbutil.set_meta(conn, key, value)
        self._changed(None)

    def settings(self) -> dict[str, str]:
        """Every region setting (the `meta` table but the schema version)."""
        rows = self.db.execute("SELECT key, value FROM meta").fetchall()
        return {k: v for k, v in rows if k != "schema_version"}

    # --- snapshots -------------------------------------------------------------------------

    def snapshots(self, *, include_deleted: bool = False) -> list[dict[str, Any]]:
        where = None if include_deleted else "deleted = 0"
        return list(self.db["snapshots"].rows_where(where, order_by="created_at"))

    def snapshot_row(self, snapshot_id: str) -> dict[str, Any] | None:
        rows = list(self.db["snapshots"].rows_where("id = ?", [snapshot_id]))
        return rows[0] if rows else None

    def snapshot_named(self, name: str) -> dict[str, Any] | None:
        """The row of the live (not deleted) snapshot called `name`."""
        rows = list(self.db["snapshots"].rows_where("name = ? AND deleted = 0", [name]))
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
    ) -> None:
        """A new snapshot row with its tags and copy job, and the snapshot it replaces
        marked deleted, in one transaction."""
        cols = [c for c in SNAPSHOT_COLUMNS if c in row]
        sql = f"INSERT INTO snapshots ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        with dbutil.transaction(self.db) as conn:
            if displaced_id is not None:
                conn.execute("UPDATE snapshots SET deleted = 1 WHERE id = ?", [displaced_id])
            conn.execute(sql, [row[c] for c in cols])
            conn.executemany(
                "INSERT INTO snapshot_tags (snapshot_id, key, value) VALUES (?, ?, ?)",
                [(row["id"], k, v) for k, v in (tags or {}).items()],
            )
            if job is not None:
                conn.execute(
                    "INSERT INTO copy_jobs (dst_snapshot_id, src_region, src_snapshot_id, kind, "
                    "total_blocks, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        row["id"],
                        job["src_region"],
                        job["src_snapshot_id"],
                        job["kind"],
                        job["total_blocks"],
                        job["created_at"],
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
        with dbutil.transaction(self.db) as conn:
            if value is None:
                conn.execute(
                    "DELETE FROM snapshot_tags WHERE snapshot_id = ? AND key = ?",
                    [snapshot_id, key],
                )
            else:
                conn.execute(
                    "INSERT INTO snapshot_tags (snapshot_id, key, value) VALUES (?, ?, ?) "
                    "ON CONFLICT(snapshot_id, key) DO UPDATE SET value = excluded.value",
                    [snapshot_id, key, value],
                )
        self._changed(snapshot_id)

    def copy_jobs(self) -> list[dict[str, Any]]:
        if "copy_jobs" not in self.db.table_names():  # read-only look at a v1 index
            return []
        return list(self.db["copy_jobs"].rows_where(order_by="created_at"))

    def block_map_from(self, snapshot_id: str, first: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` (block number, id) pairs from block `first` on, in order."""
        rows = self.db.execute(
            "SELECT block_no, block_id FROM snapshot_blocks WHERE snapshot_id = ? "
            "AND block_no >= ? ORDER BY block_no LIMIT ?",
            [snapshot_id, first, limit],
        )
        return rows.fetchall()

    def update_snapshot(self, snapshot_id: str, **fields: Any) -> None:
        with dbutil.transaction(self.db) as conn:
            self._update_snapshot(conn, snapshot_id, fields)
        self._changed(snapshot_id)

    @staticmethod
    def _update_snapshot(conn: sqlite3.Connection, snapshot_id: str, fields: dict) -> None:
        if not fields:
            return
        assignments = ", ".join(f"{name} = ?" for name in fields)
        conn.execute(
            f"UPDATE snapshots SET {assignments} WHERE id = ?", [*fields.values(), snapshot_id]
        )

    def delete_map_chunk(self, snapshot_id: str, limit: int) -> int:
        """Delete up to `limit` rows of a snapshot's block map (its first blocks); returns how
        many went. Deleting a large snapshot a chunk at a time keeps each transaction short."""
        with dbutil.transaction(self.db) as conn:
            cur = conn.execute(
                "DELETE FROM snapshot_blocks WHERE snapshot_id = ? AND block_no IN "
                "(SELECT block_no FROM snapshot_blocks WHERE snapshot_id = ? "
                "ORDER BY block_no LIMIT ?)",
                [snapshot_id, snapshot_id, limit],
            )
        return cur.rowcount

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Drop a snapshot and its block map; its blocks' refcounts fall by the triggers."""
        with dbutil.transaction(self.db) as conn:
            conn.execute("DELETE FROM snapshot_blocks WHERE snapshot_id = ?", [snapshot_id])
            conn.execute("DELETE FROM snapshot_tags WHERE snapshot_id = ?", [snapshot_id])
            conn.execute("DELETE FROM copy_jobs WHERE dst_snapshot_id = ?", [snapshot_id])
            conn.execute("DELETE FROM snapshots WHERE id = ?", [snapshot_id])
        self._changed(snapshot_id)

    def rename_snapshot(self, snapshot_id: str, name: str, *, displaced_id: str | None) -> None:
        """Rename; a snapshot already holding `name` is marked deleted in the same commit."""
        with dbutil.transaction(self.db) as conn:
            if displaced_id is not None:
                conn.execute("UPDATE snapshots SET deleted = 1 WHERE id = ?", [displaced_id])
            conn.execute("UPDATE snapshots SET name = ? WHERE id = ?", [name, snapshot_id])
        self._changed(displaced_id, snapshot_id)

    def exchange_names(self, id_a: str, id_b: str, name_a: str, name_b: str) -> None:
        with dbutil.transaction(self.db) as conn:
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
        row = self.db.execute(
            "SELECT block_id FROM snapshot_blocks WHERE snapshot_id = ? AND block_no = ?",
            [snapshot_id, block_no],
        ).fetchone()
        return row[0] if row else None

    def referenced_by(self, snapshot_id: str) -> list[bytes]:
        """The block ids in one snapshot's map (with repeats): a read of that snapshot's rows
        alone, so in a damaged index it fails (sqlite3.DatabaseError) only for the snapshots
        whose rows are on damaged pages."""
        rows = self.db.execute(
            "SELECT block_id FROM snapshot_blocks WHERE snapshot_id = ?", [snapshot_id]
        ).fetchall()
        return [r[0] for r in rows]

    def block_map_with_sizes(
        self, snapshot_id: str
    ) -> list[tuple[int, str, int, int, int, str | None]]:
        """A snapshot's map in block order as (block number, id in upper-case hex, plain
        size, stored size, codec, base id in hex or None): what its manifest lists."""
        return self.db.execute(
            "SELECT m.block_no, hex(m.block_id), b.plain_size, b.stored_size, b.codec, "
            "CASE WHEN b.base_id IS NULL THEN NULL ELSE hex(b.base_id) END "
            "FROM snapshot_blocks m JOIN blocks b ON b.id = m.block_id "
            "WHERE m.snapshot_id = ? ORDER BY m.block_no",
            [snapshot_id],
        ).fetchall()

    def bases_of(self, snapshot_id: str) -> list[tuple[str, int, int, int]]:
        """The bases a snapshot's delta blocks are stored over, as (id in upper-case hex,
        plain size, stored size, codec): a manifest lists them too, since no map may name
        them any more."""
        return self.db.execute(
            "SELECT DISTINCT hex(b.id), b.plain_size, b.stored_size, b.codec "
            "FROM snapshot_blocks m JOIN blocks d ON d.id = m.block_id "
            "JOIN blocks b ON b.id = d.base_id WHERE m.snapshot_id = ?",
            [snapshot_id],
        ).fetchall()

    def block_map(self, snapshot_id: str, first: int, last: int) -> dict[int, bytes]:
        """Block ids of block numbers first..last inclusive; holes are absent."""
        rows = self.db.execute(
            "SELECT block_no, block_id FROM snapshot_blocks "
            "WHERE snapshot_id = ? AND block_no BETWEEN ? AND ?",
            [snapshot_id, first, last],
        )
        return dict(rows.fetchall())

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

        The objects named in `new_blocks` must already be durable.
        """
        upserts = [(snapshot_id, no, bid) for no, bid in mapping if bid is not None]
        holes = [(snapshot_id, no) for no, bid in mapping if bid is None]
        with dbutil.transaction(self.db) as conn:
            conn.executemany(
                "INSERT INTO blocks (id, plain_size, stored_size, codec, key_id, base_id) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                [
                    (b.block_id, b.plain_size, b.stored_size, b.codec, b.key_id, b.base_id)
                    for b in new_blocks
                ],
            )
            conn.executemany(
                "DELETE FROM snapshot_blocks WHERE snapshot_id = ? AND block_no = ?", holes
            )
            conn.executemany(
                "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) VALUES (?, ?, ?) "
                "ON CONFLICT(snapshot_id, block_no) DO UPDATE SET block_id = excluded.block_id",
                upserts,
            )
            conn.executemany(
                "INSERT OR REPLACE INTO id_translations (dst_key_id, src_block_id, dst_block_id)"
                " VALUES (?, ?, ?)",
                translations,
            )
            self._update_snapshot(conn, snapshot_id, snapshot_fields)
            if job_fields:
                assignments = ", ".join(f"{name} = ?" for name in job_fields)
                conn.execute(
                    f"UPDATE copy_jobs SET {assignments} WHERE dst_snapshot_id = ?",
                    [*job_fields.values(), snapshot_id],
                )

    def clone_map(self, snapshot_id: str, parent_id: str, fields: dict[str, Any]) -> None:
        """One transaction: an empty snapshot takes its parent's whole block map (the
        triggers count the new references) and `fields` (size, key)."""
        with dbutil.transaction(self.db) as conn:
            conn.execute(
                "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) "
                "SELECT ?, block_no, block_id FROM snapshot_blocks WHERE snapshot_id = ?",
                [snapshot_id, parent_id],
            )
            self._update_snapshot(conn, snapshot_id, fields)

    def finish_copy(self, snapshot_id: str, fields: dict[str, Any]) -> None:
        """The job's last step: the snapshot's final state and the job row gone, atomically."""
        with dbutil.transaction(self.db) as conn:
            conn.execute("DELETE FROM copy_jobs WHERE dst_snapshot_id = ?", [snapshot_id])
            self._update_snapshot(conn, snapshot_id, fields)
        self._changed(snapshot_id)

    def truncate_map_step(
        self, snapshot_id: str, first_dropped: int, limit: int, size: int, block_size: int
    ) -> bool:
        """One step of a shrink to `size`: drop up to `limit` of the highest mapped blocks
        from `first_dropped` on, and record the size where they began (`size` itself once
        none is left past it), in one transaction. True when the shrink is complete."""
        with dbutil.transaction(self.db) as conn:
            row = conn.execute(
                "SELECT block_no FROM snapshot_blocks WHERE snapshot_id = ? AND block_no >= ? "
                "ORDER BY block_no DESC LIMIT 1 OFFSET ?",
                [snapshot_id, first_dropped, limit - 1],
            ).fetchone()
            cut = first_dropped if row is None else max(first_dropped, row[0])
            conn.execute(
                "DELETE FROM snapshot_blocks WHERE snapshot_id = ? AND block_no >= ?",
                [snapshot_id, cut],
            )
            done = cut == first_dropped
            self._update_snapshot(conn, snapshot_id, {"size": size if done else cut * block_size})
        return done

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
        with dbutil.transaction(self.db) as conn:
            conn.execute("UPDATE blocks SET base_id = ? WHERE id = ?", [base_id, block_id])

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
        with dbutil.transaction(self.db) as conn:
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
        return [r[0] for r in self.db.execute("SELECT DISTINCT block_id FROM snapshot_blocks")]

    def block_users(self, block_id: bytes) -> Iterator[tuple[str | None, str, int]]:
        """(snapshot name, snapshot id, block number) of every map row naming the block."""
        yield from self.db.execute(
            "SELECT s.name, s.id, m.block_no FROM snapshot_blocks m "
            "JOIN snapshots s ON s.id = m.snapshot_id WHERE m.block_id = ?",
            [block_id],
        )

    def stats(self) -> RegionStats:
        blocks, plain, stored = self.db.execute(
            "SELECT count(*), coalesce(sum(plain_size), 0), coalesce(sum(stored_size), 0) "
            "FROM blocks WHERE refcount > 0"
        ).fetchone()
        (referenced,) = self.db.execute(
            "SELECT coalesce(sum(b.plain_size), 0) FROM snapshot_blocks m "
            "JOIN blocks b ON b.id = m.block_id"
        ).fetchone()
        (garbage,) = self.db.execute("SELECT count(*) FROM blocks WHERE refcount <= 0").fetchone()
        return RegionStats(blocks, plain, stored, referenced, garbage)

    def snapshot_stored_bytes(self) -> dict[str, int]:
        """Per snapshot: stored bytes of the distinct blocks it references (shared counted)."""
        rows = self.db.execute(
            "SELECT m.snapshot_id, sum(b.stored_size) FROM "
            "(SELECT DISTINCT snapshot_id, block_id FROM snapshot_blocks) m "
            "JOIN blocks b ON b.id = m.block_id GROUP BY m.snapshot_id"
        )
        return dict(rows.fetchall())

    # --- checking, repair and rebuild (service/check.py, service/manifests.py) -------------

    def block_refcounts(self) -> Iterator[tuple[bytes, int, int]]:
        """(block id, recorded refcount, map rows naming it) for every block row."""
        yield from self.db.execute(
            f"SELECT b.id, b.refcount, {_USERS} FROM blocks b"
        )

    def snapshot_allocations(self) -> Iterator[tuple[str, int, int]]:
        """(snapshot id, recorded allocated_blocks, its map rows) for every snapshot row."""
        yield from self.db.execute(
            "SELECT s.id, s.allocated_blocks, "
            "(SELECT count(*) FROM snapshot_blocks m WHERE m.snapshot_id = s.id) FROM snapshots s"
        )

    def recount(self) -> list[bytes]:
        """One transaction: every refcount and allocated-block count recomputed from the
        block maps, and the rows of blocks no map names deleted; returns their ids."""
        with dbutil.transaction(self.db) as conn:
            conn.execute(f"UPDATE blocks SET refcount = {_USERS.replace('b.id', 'blocks.id')}")
            conn.execute(
                "UPDATE snapshots SET allocated_blocks = "
                "(SELECT count(*) FROM snapshot_blocks m WHERE m.snapshot_id = snapshots.id)"
            )
            dropped = [r[0] for r in conn.execute("SELECT id FROM blocks WHERE refcount = 0")]
            # By id, not by refcount: deleting a delta's row lowers its base's count, and
            # a base that reaches 0 meanwhile goes with the next collection, not here.
            conn.executemany("DELETE FROM blocks WHERE id = ?", [(i,) for i in dropped])
        return dropped

    def quick_check(self, limit: int) -> list[str]:
        """SQLite's check of every page (`PRAGMA quick_check`, at most `limit` problems):
        ["ok"] when sound; sqlite3.DatabaseError when the damage stops the check itself."""
        return [r[0] for r in self.db.execute(f"PRAGMA quick_check({int(limit)})")]

    def schema_trees(self) -> list[tuple[int, str, str]]:
        """(root page, name, type) of every schema object (`sqlite_master`)."""
        return self.db.execute("SELECT rootpage, name, type FROM sqlite_master").fetchall()

    def read_through(self, table: str) -> None:
        """Read every row of `table`; sqlite3.DatabaseError if one of its pages is damaged."""
        for _ in self.db.execute(f'SELECT * FROM "{table}"'):
            pass

    def restore(self, settings: dict[str, str], snapshots: Iterable[RestoredSnapshot]) -> None:
        """Fill an empty index, in one transaction: the region's settings, then each
        snapshot's row, block rows (those not there yet), block map and tags."""
        with dbutil.transaction(self.db) as conn:
            for key, value in settings.items():
                dbutil.set_meta(conn, key, value)
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
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                    [(*base, snap.key_id) for base in snap.bases],
                )
                conn.executemany(
                    "INSERT INTO blocks (id, plain_size, stored_size, codec, key_id, base_id) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
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
                conn.executemany(
                    "INSERT INTO snapshot_tags (snapshot_id, key, value) VALUES (?, ?, ?)",
                    [(snap.row["id"], k, v) for k, v in snap.tags.items()],
                )
