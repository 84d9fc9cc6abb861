"""A shared region's ledger: what the hosts sharing one region keep in PostgreSQL (issue 19).

A region created or attached with `--index postgresql://...` is shared: several snapfs
stores (hosts) mount it at once, each with a local index (`index.db`, its working copy) and
the region's packs in one bucket. The ledger is the authority they share, in the region's
rows of the `snapfs` schema (meta/pg.py makes it; schema 2 added what this module uses):

- `snapshots`, `snapshot_blocks`, `snapshot_tags`, `meta`: every snapshot of the region,
  with full block maps (no chains of maps here: a host's local index may keep its maps
  relative, the ledger's are resolved), and the region's settings;
- `blocks`: every block object, with where it is (`pack_id`, offset, length) and its
  `refcount` (map rows naming it + deltas over it), kept by triggers;
- `packs`: every pack object, its live bytes (a trigger sums the blocks located in it),
  its state (`open`: registered by a session before its upload; `sealed`: its blocks
  committed; `deleting`: its object is being deleted) and since when it has been dead;
- `sessions`: who has the region mounted, with a heartbeat and a time to live.

Every method here is one short transaction (or one query) on its own connection, and runs
in a worker thread (service/shared.py calls them through `workers.run_sync`): a call blocks
on the network, and an unreachable server must never hold the trio loop.

The invariants the service relies on
------------------------------------
Every write transaction locks the region's row first (`PgConnection.transaction`), so the
writers of a region, the collector and the reaper of all hosts take turns: each transaction
sees what the previous ones committed, and acts on it before the next one starts.

1. **Fencing.** Every transaction that adds or changes something on behalf of a session
   first checks that the session is `active` (`_fence`). The reaper expires a session whose
   heartbeat is older than its ttl under the same region lock, so a late commit of an
   expired host (SIGSTOPped, cut off, killed and restarted) either committed before the
   expiry (and the reaper then sees its rows) or is refused (`SessionExpired`).
2. **No row names missing data.** A commit names only blocks whose objects are in the
   bucket: their pack was uploaded (registered `open` before the PUT, by this session) or is
   another host's `sealed` pack. A block row the collector dropped meanwhile (its last
   reference went on another host) is put back from the committer's own copy of the row,
   if its pack is not `deleting` (the pack is then live again); else the commit fails
   (`BlockLost`): that only happens to a committer away longer than the grace, which
   fencing has refused first.
3. **Collection serializes with references.** The collector deletes block rows whose
   refcount is 0 in short transactions under the region lock: a commit that references a
   block either committed first (refcount > 0, the row stays) or comes after (and restores
   the row, 2.). A pack with no live bytes is dead; its object is deleted only `grace`
   seconds later (readers on other hosts may hold its locations: their maps are pulled,
   their copies of deleted snapshots read on), after it was marked `deleting` in a
   transaction of its own. Nothing ever makes a `deleting` pack live again.
4. **Strays.** A pack registered `open` by a session that expired is deleted by the reaper
   (its blocks were never committed, or the commit naming them was refused). Every pack is
   registered before its PUT, so a pack in the bucket with no row at all is one whose row
   went with its deletion while a stopped host's PUT of it was still under way: it is
   deleted once older than `STRAY_AGE`, after a `deleting` row was committed for it,
   which a late commit naming it would then find.

5. **Claims and pins.** A block a host is about to upload is claimed (`lookup_or_claim`);
   other hosts asking for it wait for its publication (`publish`, after its pack's PUT:
   the pack becomes `uploaded`, the block rows are inserted pinned by the session), so
   hosts writing one template at once store it once. A pinned row is never dropped by the
   collector; the pin goes with the session's commit naming the block, its clean end, or
   the reaper (its pack then `sealed`, its blocks live if anything references them).
6. **Reaping takes two looks.** A session whose heartbeat is older than its ttl is suspected
   and expired only if it stayed silent for another ttl (`suspect_since`): after an outage
   of the server, when every session looks silent, they all beat again first.
7. **One collector at a time**, by a lease on the region's row that lapses (a stopped holder
   blocks nothing), and `idle_in_transaction_session_timeout` on every connection, so a
   host stopped inside a transaction cannot hold the region's lock.

Times come from the server's clock (`clock_timestamp()`), so hosts with skewed clocks agree
on heartbeats and graces.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg.errors

from snapfs.errors import AlreadyExists, NotFound, SnapfsError
from snapfs.meta.pg import PgConnection, PgRegionIndex

log = logging.getLogger(__name__)

NOW = "extract(epoch from clock_timestamp())"
# A pack in the bucket that the ledger does not know is deleted once this old. Every host
# registers a pack before its PUT, so an unknown pack is one whose row went (its pack was
# deleted) while a stopped host's PUT of it was still under way; the age only guards
# against listings that lag behind the bucket.
STRAY_AGE = 600.0
IDLE_LIMIT = 10  # seconds a ledger connection may sit idle inside a transaction
# Map rows a pull reads, or the collector purges, per query or transaction.
MAP_CHUNK = 8192
# The snapshot columns the ledger keeps (the local index's, less its chains and counters).
SHARED_COLUMNS = (
    "id",
    "name",
    "status",
    "size",
    "mode",
    "uid",
    "gid",
    "atime_ns",
    "mtime_ns",
    "ctime_ns",
    "created_at",
    "sealed_at",
    "source_snapshot_id",
    "source_region",
    "description",
    "retention_days",
    "encrypted",
    "kms_key_id",
    "error",
    "transferred_bytes",
)


class SessionExpired(SnapfsError):
    """This host's session in a shared region's ledger expired (its heartbeats stopped for
    longer than its ttl: the host was stopped, cut off or too slow) and other hosts reaped
    what it had not finished: a late commit is refused."""

    code = "OperationAborted.SessionExpired"


class BlockLost(SnapfsError):
    """A commit names a block whose object the shared region deleted (its pack is gone or
    going): the snapshot cannot be completed."""

    code = "InvalidSnapshot.BlockLost"


@dataclass(frozen=True, slots=True)
class SharedBlock:
    """A block as the ledger knows it: its row and where its object is."""

    block_id: bytes
    plain_size: int
    stored_size: int
    codec: int
    key_id: str | None
    base_id: bytes | None
    pack: str
    offset: int
    length: int
    pack_size: int = 0


@dataclass(frozen=True, slots=True)
class Reaped:
    """What a reaper round did: sessions expired, snapshots of theirs sealed (closed by
    their writer: complete) or deleted (unfinished), packs of theirs to delete."""

    sessions: list[str]
    sealed: list[str]
    deleted: list[str]
    packs: list[str]


# What the ledger adds to a snapshot's row: its change number, the session writing it,
# whether its writer closed it, deleted and purged, and the session of its last change.
_STATE_COLUMNS = "seq, owner, closed, deleted, purged, changed_by"
_BLOCK_COLUMNS = (
    "b.id, b.plain_size, b.stored_size, b.codec, b.key_id, b.base_id, "
    "b.pack_id, b.pack_offset, b.pack_length, p.size"
)


def _one(cursor: Any) -> Sequence[Any]:
    """The one row a query that always answers one returned."""
    row = cursor.fetchone()
    if row is None:
        raise SnapfsError("the shared index answered no row where one was due")
    return row


def _block(row: Sequence[Any]) -> SharedBlock:
    return SharedBlock(
        bytes(row[0]), int(row[1]), int(row[2]), int(row[3]), row[4],
        bytes(row[5]) if row[5] is not None else None, str(row[6]), int(row[7]), int(row[8]),
        int(row[9]),
    )  # fmt: skip


class Ledger:
    """A shared region's ledger on one connection (use it from one thread at a time)."""

    def __init__(self, index: PgRegionIndex):
        self.index = index
        self.db: PgConnection = index.db
        self.region_id = index.region_id
        self.name = index.name

    @classmethod
    def attach(cls, url: str, name: str) -> Ledger:
        ledger = cls(PgRegionIndex.attach(url, name))
        # A host stopped in the middle of a transaction (SIGSTOP, a hung process) would hold
        # the region's lock and every other host's writes with it: the server ends such a
        # transaction (its connection) after this long; the host reconnects when it runs.
        try:
            ledger.db.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_LIMIT}s'")
        except BaseException:
            ledger.close()
            raise
        return ledger

    def close(self) -> None:
        self.index.close()

    # --- sessions ----------------------------------------------------------------------------

    def open_session(self, host: str, pid: int, ttl: float) -> str:
        """A new active session of this host's process; its id."""
        session = uuid.uuid4().hex
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO snapfs.sessions (id, region_id, host, pid, started_at, "
                f"heartbeat_at, ttl) VALUES (?, ?, ?, ?, {NOW}, {NOW}, ?)",
                [session, self.region_id, host, pid, ttl],
            )
        return session

    def heartbeat(self, session: str) -> bool:
        """Still alive; False if the session is no longer active (reaped: fenced)."""
        cur = self.db.execute(
            f"UPDATE snapfs.sessions SET heartbeat_at = {NOW} "
            "WHERE id = ? AND region_id = ? AND state = 'active'",
            [session, self.region_id],
        )
        return cur.rowcount == 1

    def take_over(self, previous: str, session: str, keep: Sequence[str]) -> None:
        """A store that restarted: its previous session is over (its process is gone: the
        store lock is ours now). The unfinished snapshots it still has (`keep`: copies to
        resume, closed ones it sealed at mount) pass to `session`; the previous session's
        others are deleted (the store's recovery removed them) and its packs not sealed
        are doomed (nothing will commit them). Nothing if another host reaped it already
        (the session expired: its snapshots were sealed or deleted then)."""
        with self.db.transaction() as conn:
            cur = conn.execute(  # active: it died; ended: it unmounted with copies to resume
                "UPDATE snapfs.sessions SET state = 'ended' WHERE id = ? AND region_id = ? "
                "AND state IN ('active', 'ended')",
                [previous, self.region_id],
            )
            if cur.rowcount != 1:
                return
            conn.execute(
                "UPDATE snapshots SET owner = ? WHERE owner = ? AND deleted = 0 AND id = ANY(?)",
                [session, previous, list(keep)],
            )
            conn.execute(
                "UPDATE snapshots SET deleted = 1, owner = NULL, changed_by = ? "
                "WHERE owner = ? AND deleted = 0",
                [session, previous],
            )
            conn.execute(
                "UPDATE snapfs.packs SET state = 'deleting' WHERE region_id = ? "
                "AND session_id = ? AND state = 'open'",
                [self.region_id, previous],
            )
            conn.execute(  # published, not committed: like any other host's blocks now
                "UPDATE snapfs.packs SET state = 'sealed' WHERE region_id = ? "
                "AND session_id = ? AND state = 'uploaded'",
                [self.region_id, previous],
            )
            self._release(conn, [previous])

    def declare_dead(self, session: str) -> None:
        """A session this store knows to be dead (its process is gone: the store lock is
        ours now): its heartbeat is put far back, so the next reaper round reaps it rather
        than after its ttl."""
        self.db.execute(
            "UPDATE snapfs.sessions SET heartbeat_at = 0, suspect_since = 0 "
            "WHERE id = ? AND region_id = ? AND state = 'active'",
            [session, self.region_id],
        )

    def end_session(self, session: str) -> None:
        """A clean unmount: the session is over; the blocks it published and did not
        commit are the collector's, its claims go. (Copies it stopped stay its own, for
        the store to take over at its next mount.)"""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE snapfs.sessions SET state = 'ended' WHERE id = ? AND region_id = ? "
                "AND state = 'active'",
                [session, self.region_id],
            )
            self._release(conn, [session])

    def _release(self, conn: PgConnection, sessions: list[str]) -> None:
        """Inside a transaction: the pins and claims of sessions that are over."""
        conn.execute("UPDATE blocks SET pinned_by = NULL WHERE pinned_by = ANY(?)", [sessions])
        conn.execute(
            "DELETE FROM snapfs.claims WHERE region_id = ? AND session_id = ANY(?)",
            [self.region_id, sessions],
        )

    def sessions(self) -> list[dict[str, Any]]:
        return self.db.all_rows(
            f"SELECT id, host, pid, started_at, heartbeat_at, ttl, state, {NOW} AS now "
            "FROM snapfs.sessions WHERE region_id = ? ORDER BY started_at, id",
            [self.region_id],
        )

    def _fence(self, conn: PgConnection, session: str) -> None:
        """Inside a transaction (which holds the region lock): refuse an inactive session."""
        row = conn.execute(
            "SELECT state FROM snapfs.sessions WHERE id = ? AND region_id = ?",
            [session, self.region_id],
        ).fetchone()
        if row is None or row[0] != "active":
            raise SessionExpired(
                f"region {self.name}: this host's session {session[:8]} is "
                f"{row[0] if row else 'unknown'} in the shared index; what it had not "
                "finished was reaped by the other hosts"
            )

    # --- packs -------------------------------------------------------------------------------

    def register_pack(self, session: str, pack_id: str) -> None:
        """Before a pack's upload: its row, `open`, owned by the session (a pack whose
        session expires before it is sealed is deleted by the reaper)."""
        with self.db.transaction() as conn:
            self._fence(conn, session)
            conn.execute(
                "INSERT INTO snapfs.packs (region_id, id, size, state, created_at, session_id) "
                f"VALUES (?, ?, 0, 'open', {NOW}, ?) ON CONFLICT DO NOTHING",
                [self.region_id, pack_id, session],
            )
            row = conn.execute(  # a retried upload finds its own row; anything else refuses
                "SELECT state, session_id FROM snapfs.packs WHERE region_id = ? AND id = ?",
                [self.region_id, pack_id],
            ).fetchone()
            if row is None or row[0] != "open" or row[1] != session:
                raise BlockLost(f"region {self.name}: pack {pack_id} cannot be uploaded now")

    def _seal_packs(self, conn: PgConnection, session: str, packs: dict[str, int]) -> None:
        """Inside a commit: the uploaded packs this commit's new blocks are in, sealed."""
        for pack_id, size in packs.items():
            row = conn.execute(
                "SELECT state, session_id FROM snapfs.packs WHERE region_id = ? AND id = ?",
                [self.region_id, pack_id],
            ).fetchone()
            if row is None or row[0] == "deleting":
                raise BlockLost(
                    f"region {self.name}: pack {pack_id} is not in the shared index any more"
                )
            if row[0] in ("open", "uploaded"):
                if row[1] != session:
                    raise BlockLost(f"region {self.name}: pack {pack_id} is another host's")
                conn.execute(
                    "UPDATE snapfs.packs SET state = 'sealed', size = ? "
                    "WHERE region_id = ? AND id = ?",
                    [size, self.region_id, pack_id],
                )

    # --- snapshots: names first --------------------------------------------------------------

    def reserve(
        self,
        session: str,
        row: dict[str, Any],
        tags: dict[str, str] | None = None,
        *,
        displaced_id: str | None = None,
    ) -> None:
        """A new snapshot's row (creating or copying, owned by the session) before the local
        one: its name is the region's. AlreadyExists if another host has the name."""
        cols = [c for c in SHARED_COLUMNS if c in row]
        try:
            with self.db.transaction() as conn:
                self._fence(conn, session)
                if displaced_id is not None:
                    self._mark_deleted(conn, session, displaced_id)
                conn.execute(
                    f"INSERT INTO snapshots ({', '.join(cols)}, owner, changed_by) "
                    f"VALUES ({', '.join('?' for _ in cols)}, ?, ?)",
                    [*(row[c] for c in cols), session, session],
                )
                conn.executemany(
                    "INSERT INTO snapshot_tags (snapshot_id, key, value) VALUES (?, ?, ?)",
                    [(row["id"], k, v) for k, v in (tags or {}).items()],
                )
        except psycopg.errors.UniqueViolation:
            mine = self.db.execute(
                "SELECT owner FROM snapshots WHERE id = ? AND deleted = 0", [row["id"]]
            ).fetchone()
            if mine is not None and mine[0] == session:
                return  # a retry after a commit whose answer the connection lost
            raise AlreadyExists(
                f"snapshot {row.get('name')!r} already exists in shared region {self.name} "
                "(made on another host)"
            ) from None

    def rename(
        self, session: str, snapshot_id: str, name: str, displaced_id: str | None = None
    ) -> None:
        """A rename (the snapshot replacing `displaced_id`, which is then deleted)."""
        try:
            with self.db.transaction() as conn:
                self._fence(conn, session)
                if displaced_id is not None:
                    self._mark_deleted(conn, session, displaced_id)
                cur = conn.execute(
                    "UPDATE snapshots SET name = ?, changed_by = ? WHERE id = ? AND deleted = 0",
                    [name, session, snapshot_id],
                )
                if cur.rowcount != 1:
                    raise NotFound(f"snapshot {snapshot_id} was deleted on another host")
        except psycopg.errors.UniqueViolation:
            raise AlreadyExists(
                f"snapshot {name!r} already exists in shared region {self.name} "
                "(made on another host)"
            ) from None

    def exchange_names(self, session: str, id_a: str, id_b: str, name_a: str, name_b: str) -> None:
        """RENAME_EXCHANGE: `id_a` takes `name_b` and the other way round, at once."""
        with self.db.transaction() as conn:
            self._fence(conn, session)
            conn.execute("UPDATE snapshots SET name = NULL WHERE id = ?", [id_a])
            conn.execute(
                "UPDATE snapshots SET name = ?, changed_by = ? WHERE id = ?",
                [name_a, session, id_b],
            )
            conn.execute(
                "UPDATE snapshots SET name = ?, changed_by = ? WHERE id = ?",
                [name_b, session, id_a],
            )

    def delete(self, session: str, snapshot_id: str) -> None:
        """Deleted everywhere: the name is free at once, the map is the collector's to purge."""
        with self.db.transaction() as conn:
            self._fence(conn, session)
            self._mark_deleted(conn, session, snapshot_id)

    @staticmethod
    def _mark_deleted(conn: PgConnection, session: str, snapshot_id: str) -> None:
        conn.execute(
            "UPDATE snapshots SET deleted = 1, owner = NULL, changed_by = ? "
            "WHERE id = ? AND deleted = 0",
            [session, snapshot_id],
        )

    def update(
        self,
        session: str,
        snapshot_id: str,
        fields: dict[str, Any],
        tags: dict[str, str] | None = None,
        trim_from: int | None = None,
    ) -> bool:
        """A snapshot's metadata as this host changed it (status, seal, size, times,
        description, retention, tags when given). `trim_from`: the map rows from that block
        on go (a sealed snapshot's map ends at its size). False if it is deleted."""
        known = {k: v for k, v in fields.items() if k in SHARED_COLUMNS or k in ("closed", "owner")}
        with self.db.transaction() as conn:
            self._fence(conn, session)
            sets = ", ".join(f"{k} = ?" for k in known)
            cur = conn.execute(
                f"UPDATE snapshots SET {sets + ', ' if sets else ''}changed_by = ? "
                "WHERE id = ? AND deleted = 0",
                [*known.values(), session, snapshot_id],
            )
            if cur.rowcount != 1:
                return False
            if tags is not None:
                conn.execute("DELETE FROM snapshot_tags WHERE snapshot_id = ?", [snapshot_id])
                conn.executemany(
                    "INSERT INTO snapshot_tags (snapshot_id, key, value) VALUES (?, ?, ?)",
                    [(snapshot_id, k, v) for k, v in tags.items()],
                )
            if trim_from is not None:
                conn.execute(
                    "DELETE FROM snapshot_blocks WHERE snapshot_id = ? AND block_no >= ?",
                    [snapshot_id, trim_from],
                )
        return True

    def trim(self, session: str, snapshot_id: str, first_dropped: int) -> None:
        """A shrink: the snapshot's map rows from block `first_dropped` on go."""
        with self.db.transaction() as conn:
            self._fence(conn, session)
            conn.execute(
                "DELETE FROM snapshot_blocks WHERE snapshot_id = ? AND block_no >= ?",
                [snapshot_id, first_dropped],
            )

    def clone(self, session: str, snapshot_id: str, parent_id: str, fields: dict[str, Any]) -> None:
        """A clone's map is its parent's, copied in the server (no rows cross the network)."""
        with self.db.transaction() as conn:
            self._fence(conn, session)
            conn.execute(
                "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) "
                "SELECT ?, block_no, block_id FROM snapshot_blocks WHERE snapshot_id = ? "
                "ON CONFLICT DO NOTHING",
                [snapshot_id, parent_id],
            )
            sets = ", ".join(f"{k} = ?" for k in fields if k in SHARED_COLUMNS)
            conn.execute(
                f"UPDATE snapshots SET {sets + ', ' if sets else ''}changed_by = ? WHERE id = ?",
                [*(v for k, v in fields.items() if k in SHARED_COLUMNS), session, snapshot_id],
            )

    # --- content: map rows and the blocks they name ------------------------------------------

    def commit(
        self,
        session: str,
        snapshot_id: str,
        packs: dict[str, int],
        blocks: Sequence[SharedBlock],
        mapping: Sequence[tuple[int, bytes | None]],
        fields: dict[str, Any],
    ) -> dict[bytes, SharedBlock]:
        """One batch of a writer or a copy, before the local index commits it: the packs its
        new blocks were uploaded in (id -> size), every block its map rows name with where
        this host has it (bases of deltas first), the map rows (None: a hole) and the
        snapshot's fields. Returns the blocks the ledger has elsewhere than this host said
        (another host stored the same content first): their bytes are read from there."""
        ids = list(dict.fromkeys(b.block_id for b in blocks))
        with self.db.transaction() as conn:
            self._fence(conn, session)
            owner = conn.execute(
                "SELECT owner, deleted FROM snapshots WHERE id = ?", [snapshot_id]
            ).fetchone()
            if owner is None or owner[1] or owner[0] != session:
                raise SessionExpired(
                    f"region {self.name}: snapshot {snapshot_id} is no longer this host's to "
                    "write in the shared index (deleted, or reaped)"
                )
            self._seal_packs(conn, session, packs)
            found = {
                bytes(r[0]): _block(r)
                for r in conn.execute(
                    f"SELECT {_BLOCK_COLUMNS} FROM blocks b JOIN snapfs.packs p "
                    "ON p.region_id = b.region_id AND p.id = b.pack_id WHERE b.id = ANY(?)",
                    [ids],
                )
            }
            missing = [b for b in blocks if b.block_id not in found]
            if missing:
                self._restore_blocks(conn, missing, packs)
            conn.executemany(
                "DELETE FROM snapshot_blocks WHERE snapshot_id = ? AND block_no = ?",
                [(snapshot_id, no) for no, bid in mapping if bid is None],
            )
            conn.executemany(
                "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) VALUES (?, ?, ?) "
                f"ON CONFLICT({conn.conflict('snapshot_id, block_no')}) "
                "DO UPDATE SET block_id = excluded.block_id",
                [(snapshot_id, no, bid) for no, bid in mapping if bid is not None],
            )
            sets = ", ".join(f"{k} = ?" for k in fields if k in SHARED_COLUMNS)
            conn.execute(
                f"UPDATE snapshots SET {sets + ', ' if sets else ''}changed_by = ? WHERE id = ?",
                [*(v for k, v in fields.items() if k in SHARED_COLUMNS), session, snapshot_id],
            )
            # Referenced now: the blocks this session published need their pins no more.
            conn.execute(
                "UPDATE blocks SET pinned_by = NULL WHERE pinned_by = ? AND id = ANY(?)",
                [session, ids],
            )
            conn.execute(
                "DELETE FROM snapfs.claims WHERE region_id = ? AND session_id = ? "
                "AND block_id = ANY(?)",
                [self.region_id, session, ids],
            )
        mine = {b.block_id: b for b in blocks}
        return {
            bid: where
            for bid, where in found.items()
            if (where.pack, where.offset) != (mine[bid].pack, mine[bid].offset)
        }

    def _restore_blocks(
        self, conn: PgConnection, missing: Sequence[SharedBlock], new_packs: dict[str, int]
    ) -> None:
        """Rows for blocks the ledger lacks: this commit's new ones, or ones the collector
        dropped since this host learnt of them, whose packs must not be going."""
        packs = {b.pack for b in missing}
        states: dict[str, str] = dict(
            conn.execute(
                "SELECT id, state FROM snapfs.packs WHERE region_id = ? AND id = ANY(?)",
                [self.region_id, list(packs)],
            ).fetchall()
        )
        lost = sorted(
            p for p in packs if states.get(p) not in ("sealed", "uploaded") and p not in new_packs
        )
        if lost:
            raise BlockLost(
                f"region {self.name}: blocks are in packs the shared region deleted "
                f"({', '.join(lost[:3])}{'...' if len(lost) > 3 else ''})"
            )
        # Bases first: a delta's row counts its reference on its base's row.
        ordered = sorted(missing, key=lambda b: b.base_id is not None)
        conn.executemany(
            "INSERT INTO blocks (id, plain_size, stored_size, codec, key_id, base_id, pack_id, "
            "pack_offset, pack_length) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [
                (b.block_id, b.plain_size, b.stored_size, b.codec, b.key_id, b.base_id, b.pack,
                 b.offset, b.length)
                for b in ordered
            ],
        )  # fmt: skip
        conn.execute(  # a dead pack a restored block is in lives again
            "UPDATE snapfs.packs SET dead_since = NULL WHERE region_id = ? AND id = ANY(?) "
            "AND live_bytes > 0",
            [self.region_id, list(packs)],
        )

    def restore(
        self,
        settings: dict[str, str],
        packs: dict[str, int],
        blocks: Sequence[SharedBlock],
        snapshots: Sequence[tuple[dict[str, Any], dict[str, str], Sequence[tuple[int, bytes]]]],
    ) -> None:
        """Fill an empty region's ledger from what its bucket describes (a lost database:
        service/regionadmin.py): its settings, its packs (sealed), every block with where it
        is, and each snapshot's row, tags and map; one transaction."""
        with self.db.transaction() as conn:
            for key, value in settings.items():
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    f"ON CONFLICT({conn.conflict('key')}) DO UPDATE SET value = excluded.value",
                    [key, value],
                )
            conn.executemany(
                "INSERT INTO snapfs.packs (region_id, id, size, state, created_at) "
                f"VALUES (?, ?, ?, 'sealed', {NOW})",
                [(self.region_id, pack, size) for pack, size in packs.items()],
            )
            ordered = sorted(blocks, key=lambda b: b.base_id is not None)
            conn.executemany(
                "INSERT INTO blocks (id, plain_size, stored_size, codec, key_id, base_id, "
                "pack_id, pack_offset, pack_length) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (b.block_id, b.plain_size, b.stored_size, b.codec, b.key_id, b.base_id,
                     b.pack, b.offset, b.length)
                    for b in ordered
                ],
            )  # fmt: skip
            for row, tags, rows in snapshots:
                cols = [c for c in SHARED_COLUMNS if c in row]
                conn.execute(
                    f"INSERT INTO snapshots ({', '.join(cols)}) "
                    f"VALUES ({', '.join('?' for _ in cols)})",
                    [row[c] for c in cols],
                )
                conn.executemany(
                    "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) "
                    "VALUES (?, ?, ?)",
                    [(row["id"], no, bid) for no, bid in rows],
                )
                conn.executemany(
                    "INSERT INTO snapshot_tags (snapshot_id, key, value) VALUES (?, ?, ?)",
                    [(row["id"], k, v) for k, v in tags.items()],
                )

    # --- reading the ledger ------------------------------------------------------------------

    def lookup(self, block_ids: Iterable[bytes]) -> dict[bytes, SharedBlock]:
        """Full blocks (not deltas) the region holds, among `block_ids`, and where: a host
        writing content another host stored reuses it instead of uploading it again."""
        ids = list(block_ids)
        rows = self.db.execute(
            f"SELECT {_BLOCK_COLUMNS} FROM blocks b JOIN snapfs.packs p "
            "ON p.region_id = b.region_id AND p.id = b.pack_id "
            "WHERE b.id = ANY(?) AND b.base_id IS NULL AND p.state IN ('uploaded', 'sealed')",
            [ids],
        )
        return {bytes(r[0]): _block(r) for r in rows}

    def lookup_or_claim(
        self, session: str, block_ids: Sequence[bytes]
    ) -> tuple[dict[bytes, SharedBlock], set[bytes], set[bytes]]:
        """For blocks a host is about to store: those the region holds (reuse them), those
        it now claims (upload them: hosts asking meanwhile wait for it), and those another
        live session claimed (wait for its upload). Hosts copying one template at once so
        upload each block about once."""
        found = self.lookup(block_ids)
        rest = [b for b in block_ids if b not in found]
        if not rest:
            return found, set(), set()
        with self.db.transaction() as conn:
            self._fence(conn, session)
            mine = {
                bytes(r[0])
                for r in conn.execute(
                    "INSERT INTO snapfs.claims (region_id, block_id, session_id, claimed_at) "
                    f"SELECT ?, b, ?, {NOW} FROM unnest(?::bytea[]) AS b "
                    "ON CONFLICT DO NOTHING RETURNING block_id",
                    [self.region_id, session, rest],
                )
            }
            theirs = {
                bytes(r[0])
                for r in conn.execute(
                    "SELECT block_id FROM snapfs.claims WHERE region_id = ? "
                    "AND block_id = ANY(?) AND session_id <> ?",
                    [self.region_id, [b for b in rest if b not in mine], session],
                )
            }
        mine |= {b for b in rest if b not in theirs}  # claimed by this session before
        return found, mine, theirs

    def _move_own_pack(
        self,
        conn: PgConnection,
        session: str,
        pack_id: str,
        size: int,
        states: tuple[str, ...],
        to: str,
    ) -> None:
        """Inside a transaction: a pack this session registered, in one of `states`, to
        state `to` with its size; BlockLost if it is not (reaped, or another's)."""
        cur = conn.execute(
            f"UPDATE snapfs.packs SET state = ?, size = ? WHERE region_id = ? AND id = ? "
            f"AND state IN ({', '.join('?' for _ in states)}) AND session_id = ?",
            [to, size, self.region_id, pack_id, *states, session],
        )
        if cur.rowcount != 1:
            raise BlockLost(f"region {self.name}: pack {pack_id} cannot become {to} now")

    def publish(self, session: str, pack_id: str, size: int, blocks: Sequence[SharedBlock]) -> None:
        """After a pack's upload: its blocks' rows, pinned by the session until it commits
        references to them (or ends), so other hosts reuse them at once."""
        with self.db.transaction() as conn:
            self._fence(conn, session)
            self._move_own_pack(conn, session, pack_id, size, ("open",), "uploaded")
            ordered = sorted(blocks, key=lambda b: b.base_id is not None)
            conn.executemany(
                "INSERT INTO blocks (id, plain_size, stored_size, codec, key_id, base_id, "
                "pack_id, pack_offset, pack_length, pinned_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [
                    (b.block_id, b.plain_size, b.stored_size, b.codec, b.key_id, b.base_id,
                     b.pack, b.offset, b.length, session)
                    for b in ordered
                ],
            )  # fmt: skip
            conn.execute(
                "DELETE FROM snapfs.claims WHERE region_id = ? AND session_id = ? "
                "AND block_id = ANY(?)",
                [self.region_id, session, [b.block_id for b in blocks]],
            )

    def blocks(self, block_ids: Iterable[bytes]) -> dict[bytes, SharedBlock]:
        """The rows and locations of `block_ids` (deltas too)."""
        rows = self.db.execute(
            f"SELECT {_BLOCK_COLUMNS} FROM blocks b JOIN snapfs.packs p "
            "ON p.region_id = b.region_id AND p.id = b.pack_id WHERE b.id = ANY(?)",
            [list(block_ids)],
        )
        return {bytes(r[0]): _block(r) for r in rows}

    def last_change(self) -> int:
        """The newest change number of the region's snapshots (0: none yet)."""
        return self.last_changes()[0]

    def last_changes(self) -> tuple[int, str]:
        """The newest change number of the region's snapshots, and a digest of its settings
        (what a host's pull looks at, in one query)."""
        row = _one(
            self.db.execute(
                "SELECT coalesce(max(seq), 0), (SELECT coalesce(md5(string_agg(key || '=' || "
                "value, ';' ORDER BY key)), '') FROM meta) FROM snapshots"
            )
        )
        return int(row[0]), str(row[1])

    def changes(self, after: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Snapshot rows changed after change number `after`, oldest change first, with the
        ledger's own columns (`_STATE_COLUMNS`)."""
        return self.db.all_rows(
            f"SELECT {', '.join(SHARED_COLUMNS)}, {_STATE_COLUMNS} "
            "FROM snapshots WHERE seq > ? ORDER BY seq LIMIT ?",
            [after, limit],
        )

    def live_snapshots(self) -> list[dict[str, Any]]:
        """Every snapshot row not deleted (what a host's namespace is reconciled with)."""
        return self.db.all_rows(
            f"SELECT {', '.join(SHARED_COLUMNS)}, {_STATE_COLUMNS} "
            "FROM snapshots WHERE deleted = 0 ORDER BY seq"
        )

    def snapshot(self, snapshot_id: str) -> dict[str, Any] | None:
        rows = self.db.all_rows(
            f"SELECT {', '.join(SHARED_COLUMNS)}, {_STATE_COLUMNS} FROM snapshots WHERE id = ?",
            [snapshot_id],
        )
        return rows[0] if rows else None

    def map_from(
        self, snapshot_id: str, first: int, limit: int = MAP_CHUNK
    ) -> list[tuple[int, bytes]]:
        """Up to `limit` (block number, id) rows of a snapshot's map from block `first` on."""
        rows = self.db.execute(
            "SELECT block_no, block_id FROM snapshot_blocks WHERE snapshot_id = ? "
            "AND block_no >= ? ORDER BY block_no LIMIT ?",
            [snapshot_id, first, limit],
        )
        return [(int(no), bytes(bid)) for no, bid in rows]

    def tags(self, snapshot_id: str) -> dict[str, str]:
        rows = self.db.execute(
            "SELECT key, value FROM snapshot_tags WHERE snapshot_id = ? ORDER BY key",
            [snapshot_id],
        )
        return dict(rows.fetchall())

    def settings(self) -> dict[str, str]:
        return self.index.settings()

    def set_settings(self, session: str, settings: dict[str, str | None]) -> None:
        """Region settings as this host changed them (None: cleared)."""
        with self.db.transaction() as conn:
            self._fence(conn, session)
            for key, value in settings.items():
                if value is None:
                    conn.execute("DELETE FROM meta WHERE key = ?", [key])
                else:
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES (?, ?) "
                        f"ON CONFLICT({conn.conflict('key')}) DO UPDATE SET value = excluded.value",
                        [key, value],
                    )

    def packs(self) -> dict[str, dict[str, Any]]:
        """Every pack row: id -> size, live bytes, state, dead_since, created_at."""
        rows = self.db.all_rows(
            "SELECT id, size, live_bytes, state, dead_since, created_at, session_id "
            "FROM snapfs.packs WHERE region_id = ?",
            [self.region_id],
        )
        return {r.pop("id"): r for r in rows}

    def counts(self) -> dict[str, int]:
        """Figures of the region as a whole, for `snapfs status` and the tests."""
        cursor = self.db.execute(
            "SELECT (SELECT count(*) FROM snapshots WHERE deleted = 0), "
            "(SELECT count(*) FROM blocks), (SELECT count(*) FROM blocks WHERE refcount <= 0), "
            "(SELECT count(*) FROM snapfs.packs WHERE region_id = ?), "
            "(SELECT coalesce(sum(size), 0) FROM snapfs.packs WHERE region_id = ?), "
            "(SELECT coalesce(sum(live_bytes), 0) FROM snapfs.packs WHERE region_id = ?)",
            [self.region_id] * 3,
        )
        keys = ("snapshots", "blocks", "unreferenced", "packs", "pack_bytes", "live_bytes")
        return dict(zip(keys, (int(v) for v in _one(cursor)), strict=True))

    # --- the collector and the reaper (one host at a time) ----------------------------------

    def collect_lease(self, session: str, seconds: float) -> bool:
        """The region's collector lease for `seconds` (kept by its holder, taken by anyone
        once it lapsed): one host collects at a time, and a host that stops (SIGSTOP, a
        crash) holds it no longer than that. Only work is saved by it: every step of the
        collector is a transaction under the region lock, safe beside another's."""
        cur = self.db.execute(
            f"UPDATE snapfs.regions SET collector = ?, collector_until = {NOW} + ? "
            f"WHERE id = ? AND (collector_until < {NOW} OR collector = ?)",
            [session, seconds, self.region_id, session],
        )
        return cur.rowcount == 1

    def reap(self) -> Reaped:
        """Expire sessions whose heartbeat is older than their ttl; their snapshots that a
        writer closed (complete) are sealed, the others deleted; their open packs marked
        `deleting` (returned: their objects are the caller's to delete, then `forget_packs`)."""
        with self.db.transaction() as conn:
            # Two looks a ttl apart: a session is suspected when its heartbeat is older
            # than its ttl, cleared when it beats again, expired when it stayed silent a
            # whole ttl while this reaper saw the server. After an outage of the server
            # itself every session looks silent; they all beat again within their ttl.
            conn.execute(
                "UPDATE snapfs.sessions SET suspect_since = NULL WHERE region_id = ? "
                "AND state = 'active' AND heartbeat_at > suspect_since",
                [self.region_id],
            )
            conn.execute(
                f"UPDATE snapfs.sessions SET suspect_since = {NOW} WHERE region_id = ? "
                f"AND state = 'active' AND suspect_since IS NULL AND heartbeat_at < {NOW} - ttl",
                [self.region_id],
            )
            expired = [
                str(r[0])
                for r in conn.execute(
                    "UPDATE snapfs.sessions SET state = 'expired' WHERE region_id = ? "
                    f"AND state = 'active' AND suspect_since <= {NOW} - ttl RETURNING id",
                    [self.region_id],
                )
            ]
            if not expired:
                return Reaped([], [], [], [])
            sealed = [
                str(r[0])
                for r in conn.execute(
                    f"UPDATE snapshots SET status = 'available', sealed_at = {NOW}, owner = NULL "
                    "WHERE owner = ANY(?) AND deleted = 0 AND closed = 1 AND status = 'creating' "
                    "RETURNING id",
                    [expired],
                )
            ]
            for snapshot_id in sealed:  # a sealed map ends at the snapshot's size
                conn.execute(
                    "DELETE FROM snapshot_blocks WHERE snapshot_id = ? AND block_no >= "
                    "(SELECT (size + ? - 1) / ? FROM snapshots WHERE id = ?)",
                    [snapshot_id, self._block_size(conn), self._block_size(conn), snapshot_id],
                )
            deleted = [
                str(r[0])
                for r in conn.execute(
                    "UPDATE snapshots SET deleted = 1, owner = NULL WHERE owner = ANY(?) "
                    "AND deleted = 0 RETURNING id",
                    [expired],
                )
            ]
            packs = [
                str(r[0])
                for r in conn.execute(
                    "UPDATE snapfs.packs SET state = 'deleting' WHERE region_id = ? "
                    "AND session_id = ANY(?) AND state = 'open' RETURNING id",
                    [self.region_id, expired],
                )
            ]
            conn.execute(  # published: their blocks are like any others, live if referenced
                "UPDATE snapfs.packs SET state = 'sealed' WHERE region_id = ? "
                "AND session_id = ANY(?) AND state = 'uploaded'",
                [self.region_id, expired],
            )
            self._release(conn, expired)
        return Reaped(expired, sealed, deleted, packs)

    def _block_size(self, conn: PgConnection) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = 'block_size'").fetchone()
        if row is None:
            raise SnapfsError(f"region {self.name}: the shared index has no block size")
        return int(row[0])

    def purge_step(self, limit: int = MAP_CHUNK) -> int:
        """Delete up to `limit` map rows of deleted snapshots (their blocks' references go);
        a snapshot with none left is marked purged. How many rows went."""
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT id FROM snapshots WHERE deleted = 1 AND purged = 0 LIMIT 1"
            ).fetchone()
            if row is None:
                return 0
            snapshot_id = row[0]
            cur = conn.execute(
                "DELETE FROM snapshot_blocks WHERE snapshot_id = ? AND block_no IN "
                "(SELECT block_no FROM snapshot_blocks WHERE snapshot_id = ? ORDER BY block_no "
                "LIMIT ?)",
                [snapshot_id, snapshot_id, limit],
            )
            if cur.rowcount < limit:
                conn.execute("DELETE FROM snapshot_tags WHERE snapshot_id = ?", [snapshot_id])
                conn.execute("UPDATE snapshots SET purged = 1 WHERE id = ?", [snapshot_id])
            return max(cur.rowcount, 1)

    def drop_unreferenced(self, limit: int = MAP_CHUNK) -> int:
        """Delete up to `limit` block rows nothing references (their packs lose the bytes;
        a pack left with none is dead from now). How many went."""
        with self.db.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM blocks WHERE id IN (SELECT id FROM blocks WHERE refcount <= 0 "
                "AND pinned_by IS NULL LIMIT ?)",
                [limit],
            )
            conn.execute(
                f"UPDATE snapfs.packs SET dead_since = {NOW} WHERE region_id = ? "
                "AND state = 'sealed' AND live_bytes <= 0 AND dead_since IS NULL",
                [self.region_id],
            )
            return cur.rowcount

    def repack_candidates(self, dead_share: float, limit: int = 16) -> list[tuple[str, int, int]]:
        """Sealed packs more dead than `dead_share` (id, size, live bytes), the most dead
        first: their live blocks are worth copying into a new pack."""
        rows = self.db.execute(
            "SELECT id, size, live_bytes FROM snapfs.packs WHERE region_id = ? "
            "AND state = 'sealed' AND live_bytes > 0 AND live_bytes < size * (1 - ?) "
            "ORDER BY live_bytes::float / size LIMIT ?",
            [self.region_id, dead_share, limit],
        )
        return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]

    def blocks_in_pack(self, pack_id: str) -> list[tuple[bytes, int, int]]:
        """(block id, offset, length) of the blocks located in a pack, by offset."""
        rows = self.db.execute(
            "SELECT id, pack_offset, pack_length FROM blocks WHERE pack_id = ? "
            "ORDER BY pack_offset",
            [pack_id],
        )
        return [(bytes(r[0]), int(r[1]), int(r[2])) for r in rows]

    def relocate(
        self,
        session: str,
        pack_id: str,
        size: int,
        moves: Sequence[tuple[bytes, str, int, int]],
    ) -> int:
        """A repack's new pack (registered by the session, uploaded) sealed, and its blocks
        (block id, old pack, offset, length) located in it, each only if it is still in its
        old pack (a block deleted meanwhile stays deleted): one transaction. The old packs'
        live bytes follow by trigger; one left with none is dead from now. How many moved."""
        with self.db.transaction() as conn:
            self._fence(conn, session)
            self._move_own_pack(conn, session, pack_id, size, ("open", "uploaded"), "sealed")
            moved = 0
            for block_id, old, offset, length in moves:
                moved += conn.execute(
                    "UPDATE blocks SET pack_id = ?, pack_offset = ?, pack_length = ? "
                    "WHERE id = ? AND pack_id = ?",
                    [pack_id, offset, length, block_id, old],
                ).rowcount
            conn.execute(
                f"UPDATE snapfs.packs SET dead_since = {NOW} WHERE region_id = ? "
                "AND state = 'sealed' AND live_bytes <= 0 AND dead_since IS NULL",
                [self.region_id],
            )
            return moved

    def doomed_packs(self, grace: float) -> list[str]:
        """Mark `deleting` the packs dead for longer than `grace`: their objects are the
        caller's to delete now, then `forget_packs`."""
        with self.db.transaction() as conn:
            return [
                str(r[0])
                for r in conn.execute(
                    "UPDATE snapfs.packs SET state = 'deleting' WHERE region_id = ? "
                    f"AND state = 'sealed' AND live_bytes <= 0 AND dead_since <= {NOW} - ? "
                    "RETURNING id",
                    [self.region_id, grace],
                )
            ]

    def doom_strays(self, listed: dict[str, float], min_age: float = STRAY_AGE) -> list[str]:
        """Of the bucket's packs (id -> age in seconds), those the ledger does not know and
        older than `min_age`, marked `deleting` (their objects are the caller's to delete)."""
        candidates = [p for p, age in listed.items() if age > min_age]
        if not candidates:
            return []
        with self.db.transaction() as conn:
            return [
                str(r[0])
                for r in conn.execute(
                    "INSERT INTO snapfs.packs (region_id, id, size, state, created_at) "
                    f"SELECT ?, p, 0, 'deleting', {NOW} FROM unnest(?::text[]) AS p "
                    "ON CONFLICT DO NOTHING RETURNING id",
                    [self.region_id, candidates],
                )
            ]

    def deleting_packs(self) -> list[str]:
        """Packs marked `deleting` whose objects may still be there (a collector stopped
        between the mark and the delete): the next collector deletes them."""
        rows = self.db.execute(
            "SELECT id FROM snapfs.packs WHERE region_id = ? AND state = 'deleting'",
            [self.region_id],
        )
        return [str(r[0]) for r in rows]

    def forget_packs(self, pack_ids: Sequence[str]) -> None:
        """The rows of `deleting` packs whose objects are deleted."""
        with self.db.transaction() as conn:
            conn.execute(
                "DELETE FROM snapfs.packs WHERE region_id = ? AND state = 'deleting' "
                "AND id = ANY(?)",
                [self.region_id, list(pack_ids)],
            )

    def forget_claims(self, older_than: float) -> int:
        """Claims older than `older_than` seconds (a block its claimer found elsewhere, or
        dropped): a writer waiting on one stores its own copy instead, at the latest then."""
        cur = self.db.execute(
            f"DELETE FROM snapfs.claims WHERE region_id = ? AND claimed_at < {NOW} - ?",
            [self.region_id, older_than],
        )
        return cur.rowcount

    def forget_tombstones(self, older_than: float) -> int:
        """Purged deleted snapshot rows changed longer than `older_than` seconds ago (the
        hosts have pulled their deletion by then, or reconcile in full at mount)."""
        with self.db.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM snapshots WHERE deleted = 1 AND purged = 1 AND changed_at < "
                f"{NOW} - ?",
                [older_than],
            )
            return cur.rowcount
