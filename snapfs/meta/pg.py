"""A region index in PostgreSQL (issue 19): many regions in one database, joined by any host.

`PgRegionIndex.create(url, name)` makes a region in the database at `url`;
`PgRegionIndex.attach(url, name)` opens it (on this host or any other). It is a `RegionIndex`:
every query is the one in meta/index.py, run through `PgConnection` (meta/engine.py's
interface). This module holds only what is PostgreSQL's own: the schema and its triggers
(PG_MIGRATIONS), the connection (URL, errors, placeholders, the region's views), and the
connection to a region's rows. What only a shared region uses (sessions, packs, block
locations, change numbers) is read and written by meta/ledger.py.

Schema (`snapfs` schema; version in `snapfs.schema_info`)
---------------------------------------------------------
- `regions(id, name UNIQUE, created_at)`: one row per region; a second region of a name is
  refused (`RegionAlreadyExists`).
- The region tables of meta/index.py (`meta`, `blocks`, `snapshots`, `snapshot_blocks`,
  `copy_jobs`, `snapshot_tags`, `id_translations`) with the columns of SQLite's schema 5,
  each with `region_id` first in its primary key, so one database holds many regions.
- `blocks.pack_id, pack_offset, pack_length`: where a block's object is inside a pack object
  (all three or none); `packs(region_id, id, size, live_bytes, state, created_at)`, with
  `live_bytes` kept by a trigger on `blocks` (the lengths of the blocks located in it).
- `sessions(id, region_id, host, pid, started_at, heartbeat_at, state, ttl)`: who has a
  shared region mounted (meta/ledger.py).
- Schema 2: `snapshots.seq` (a change number from a sequence, set by a trigger on every
  insert and update), `owner`, `closed`, `changed_by`, `changed_at`, `purged`; packs keyed
  by the bucket's pack ids (text) with `dead_since` and the registering `session_id`.
- The refcount triggers of SQLite's schema (map rows and deltas count on `blocks.refcount`),
  and the check that a map row names a block with a row, in PL/pgSQL.

The shared queries say `blocks`, not `snapfs.blocks`: each connection makes, at connect, a
temporary view per region table (`CREATE TEMP VIEW blocks AS SELECT * FROM snapfs.blocks
WHERE region_id = N`, with `region_id` defaulting to N). PostgreSQL inlines such a view into
each query (the planner sees `region_id = N` and uses the primary keys) and writes through
it, triggers included; so the one set of queries reads and writes only its region's rows, and
an upsert's conflict target names `region_id` first (`PgConnection.conflict`).

Isolation: why READ COMMITTED plus one lock per region
------------------------------------------------------
Each write transaction (`PgConnection.transaction`) first locks its region's row in
`snapfs.regions` (`SELECT ... FOR NO KEY UPDATE`), at READ COMMITTED. So the writers of one
region run one at a time, which is what SQLite's `BEGIN IMMEDIATE` gave the same code, and
writers of different regions never wait for each other. Readers take no lock and never wait.

READ COMMITTED alone is not enough. The triggers' increments would be safe by themselves
(`UPDATE ... SET refcount = refcount + 1` waits for the row's lock and re-reads it), but the
code reads and then acts: a commit's trigger sees block B's row and names it while garbage
collection deletes B at refcount 0 (a map row naming no block); `commit_blocks` moves
`allocated_blocks` by what it read of the map; `fold_step`, `set_parent` and `clone_map` act
on rows read earlier in the transaction. Under the region lock, no other writer of the region
commits between those reads and writes, so each statement sees exactly what the transaction
read before it plus its own changes: serializable for the region's writers.

SERIALIZABLE (with a retry on a serialization failure) would let one region's writers overlap,
but a retry must run the transaction's Python again, and `with index.db.transaction()` bodies
cannot be re-run; the lock gives the guarantee without retries. The cost is SQLite's: one
writer per region at a time, with transactions kept short (each method is one).

As a second line, the triggers lock what they rely on, as a foreign key would: the check
that a map row names a block takes that block's row `FOR KEY SHARE`, so a DELETE of it (from
any connection) waits for the commit and then re-checks `refcount <= 0`.

Connections: autocommit, READ COMMITTED, `synchronous_commit = on` (a commit is durable
when it returns, as SQLite's synchronous=FULL). A `PgConnection` is one psycopg connection:
use it from one thread at a time (the `RegionIndex` caches are not thread-safe either); a
worker thread opens its own with `reader()`. Every call blocks on the network: the service
calls it off the trio thread (workers.run_sync), one call at a time per index.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.errors
from psycopg.adapt import Dumper
from psycopg.pq import Format

from snapfs.errors import (
    IndexDenied,
    IndexUnavailable,
    InvalidIndexUrl,
    RegionAlreadyExists,
    RegionNotFound,
    SnapfsError,
    StoreFormat,
)
from snapfs.meta.engine import dict_rows
from snapfs.meta.index import RegionIndex

log = logging.getLogger(__name__)

# The per-region tables, as the shared queries name them (and as the base tables are named
# in the `snapfs` schema).
REGION_TABLES = (
    "meta",
    "blocks",
    "snapshots",
    "snapshot_blocks",
    "copy_jobs",
    "snapshot_tags",
    "id_translations",
)
# Columns of the shared tables that SQLite's index does not have (schema 2: the ledger's).
_NOT_IN_SQLITE = frozenset(
    {"region_id", "seq", "owner", "closed", "changed_by", "changed_at", "purged",
     "pack_id", "pack_offset", "pack_length", "pinned_by"}
)  # fmt: skip
CONNECT_TIMEOUT = 10  # seconds, unless the URL says otherwise
_MIGRATION_LOCK = 0x736E617066730001  # pg_advisory_xact_lock key: "snapfs" + 1

PgMigration = Callable[[psycopg.Connection], None]


def _v1(conn: psycopg.Connection) -> None:
    """SQLite's schema 5 with a region id in every key, and regions, sessions and packs."""
    conn.execute(
        """
        CREATE TABLE snapfs.regions (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name TEXT COLLATE "C" NOT NULL UNIQUE,
            created_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE snapfs.meta (
            region_id BIGINT NOT NULL REFERENCES snapfs.regions(id),
            key TEXT COLLATE "C" NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (region_id, key)
        );
        CREATE TABLE snapfs.packs (
            region_id BIGINT NOT NULL REFERENCES snapfs.regions(id),
            id BIGINT GENERATED ALWAYS AS IDENTITY,
            size BIGINT NOT NULL DEFAULT 0,
            live_bytes BIGINT NOT NULL DEFAULT 0,
            state TEXT COLLATE "C" NOT NULL DEFAULT 'open'
                CHECK (state IN ('open', 'sealed', 'deleting')),
            created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (region_id, id)
        );
        CREATE TABLE snapfs.blocks (
            region_id BIGINT NOT NULL REFERENCES snapfs.regions(id),
            id BYTEA NOT NULL,
            refcount BIGINT NOT NULL DEFAULT 0,
            plain_size BIGINT NOT NULL,
            stored_size BIGINT NOT NULL,
            codec INTEGER NOT NULL,
            key_id TEXT COLLATE "C",
            base_id BYTEA,
            pack_id BIGINT,
            pack_offset BIGINT,
            pack_length BIGINT,
            PRIMARY KEY (region_id, id),
            FOREIGN KEY (region_id, pack_id) REFERENCES snapfs.packs(region_id, id),
            CHECK ((pack_id IS NULL) = (pack_offset IS NULL)
                AND (pack_id IS NULL) = (pack_length IS NULL))
        );
        CREATE INDEX blocks_unreferenced ON snapfs.blocks(region_id, id) WHERE refcount <= 0;
        CREATE INDEX blocks_base ON snapfs.blocks(region_id, base_id) WHERE base_id IS NOT NULL;
        CREATE INDEX blocks_pack ON snapfs.blocks(region_id, pack_id) WHERE pack_id IS NOT NULL;
        CREATE TABLE snapfs.snapshots (
            region_id BIGINT NOT NULL REFERENCES snapfs.regions(id),
            id TEXT COLLATE "C" NOT NULL,
            name TEXT COLLATE "C",
            status TEXT COLLATE "C" NOT NULL,
            size BIGINT NOT NULL DEFAULT 0,
            mode BIGINT NOT NULL,
            uid BIGINT NOT NULL,
            gid BIGINT NOT NULL,
            atime_ns BIGINT NOT NULL,
            mtime_ns BIGINT NOT NULL,
            ctime_ns BIGINT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            sealed_at DOUBLE PRECISION,
            allocated_blocks BIGINT NOT NULL DEFAULT 0,
            deleted INTEGER NOT NULL DEFAULT 0,
            source_snapshot_id TEXT COLLATE "C",
            source_region TEXT COLLATE "C",
            description TEXT,
            retention_days INTEGER,
            encrypted INTEGER NOT NULL DEFAULT 0,
            kms_key_id TEXT COLLATE "C",
            error TEXT,
            transferred_bytes BIGINT NOT NULL DEFAULT 0,
            parent_id TEXT COLLATE "C",
            map_id TEXT COLLATE "C",
            depth INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (region_id, id)
        );
        CREATE UNIQUE INDEX snapshots_name ON snapfs.snapshots(region_id, name)
            WHERE deleted = 0;
        CREATE INDEX snapshots_parent ON snapfs.snapshots(region_id, parent_id)
            WHERE parent_id IS NOT NULL;
        -- No foreign key to blocks: a tombstone (block_id = '') names none; the trigger
        -- below refuses a row naming a block that has no row, as in SQLite's schema 5.
        CREATE TABLE snapfs.snapshot_blocks (
            region_id BIGINT NOT NULL,
            snapshot_id TEXT COLLATE "C" NOT NULL,
            block_no BIGINT NOT NULL,
            block_id BYTEA NOT NULL,
            PRIMARY KEY (region_id, snapshot_id, block_no)
        );
        CREATE TABLE snapfs.copy_jobs (
            region_id BIGINT NOT NULL,
            dst_snapshot_id TEXT COLLATE "C" NOT NULL,
            src_region TEXT COLLATE "C" NOT NULL,
            src_snapshot_id TEXT COLLATE "C" NOT NULL,
            kind TEXT COLLATE "C" NOT NULL,
            next_block BIGINT NOT NULL DEFAULT 0,
            done_blocks BIGINT NOT NULL DEFAULT 0,
            total_blocks BIGINT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            base_snapshot_id TEXT COLLATE "C",
            PRIMARY KEY (region_id, dst_snapshot_id),
            FOREIGN KEY (region_id, dst_snapshot_id) REFERENCES snapfs.snapshots(region_id, id)
        );
        CREATE TABLE snapfs.snapshot_tags (
            region_id BIGINT NOT NULL,
            snapshot_id TEXT COLLATE "C" NOT NULL,
            key TEXT COLLATE "C" NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (region_id, snapshot_id, key),
            FOREIGN KEY (region_id, snapshot_id) REFERENCES snapfs.snapshots(region_id, id)
        );
        CREATE TABLE snapfs.id_translations (
            region_id BIGINT NOT NULL REFERENCES snapfs.regions(id),
            dst_key_id TEXT COLLATE "C" NOT NULL,
            src_block_id BYTEA NOT NULL,
            dst_block_id BYTEA NOT NULL,
            PRIMARY KEY (region_id, dst_key_id, src_block_id)
        );
        CREATE INDEX id_translations_dst ON snapfs.id_translations(region_id, dst_block_id);
        CREATE TABLE snapfs.sessions (
            id TEXT COLLATE "C" PRIMARY KEY,
            region_id BIGINT NOT NULL REFERENCES snapfs.regions(id),
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            heartbeat_at DOUBLE PRECISION NOT NULL,
            state TEXT COLLATE "C" NOT NULL DEFAULT 'active'
                CHECK (state IN ('active', 'ended', 'expired'))
        );
        CREATE INDEX sessions_region ON snapfs.sessions(region_id, state);

        -- A map row names a block that has a row; its lock keeps that row from being
        -- deleted until this transaction ends (what a foreign key's check does).
        CREATE FUNCTION snapfs.map_row_named() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF length(NEW.block_id) > 0 THEN
                PERFORM 1 FROM snapfs.blocks
                    WHERE region_id = NEW.region_id AND id = NEW.block_id FOR KEY SHARE;
                IF NOT FOUND THEN
                    RAISE EXCEPTION 'FOREIGN KEY constraint failed: a map row names no block'
                        USING ERRCODE = 'foreign_key_violation';
                END IF;
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER snapshot_blocks_named BEFORE INSERT OR UPDATE OF block_id
            ON snapfs.snapshot_blocks FOR EACH ROW EXECUTE FUNCTION snapfs.map_row_named();

        -- AFTER, not BEFORE: an upsert fires BEFORE INSERT for a row it then updates.
        CREATE FUNCTION snapfs.map_row_counted() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP IN ('UPDATE', 'DELETE') THEN
                UPDATE snapfs.blocks SET refcount = refcount - 1
                    WHERE region_id = OLD.region_id AND id = OLD.block_id;
            END IF;
            IF TG_OP IN ('INSERT', 'UPDATE') THEN
                UPDATE snapfs.blocks SET refcount = refcount + 1
                    WHERE region_id = NEW.region_id AND id = NEW.block_id;
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER snapshot_blocks_counted AFTER INSERT OR DELETE ON snapfs.snapshot_blocks
            FOR EACH ROW EXECUTE FUNCTION snapfs.map_row_counted();
        CREATE TRIGGER snapshot_blocks_update AFTER UPDATE OF block_id ON snapfs.snapshot_blocks
            FOR EACH ROW WHEN (OLD.block_id IS DISTINCT FROM NEW.block_id)
            EXECUTE FUNCTION snapfs.map_row_counted();

        -- A delta's row counts as a reference to its base (SQLite's schema 4).
        CREATE FUNCTION snapfs.base_counted() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.base_id IS NOT NULL THEN
                UPDATE snapfs.blocks SET refcount = refcount - 1
                    WHERE region_id = OLD.region_id AND id = OLD.base_id;
            END IF;
            IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.base_id IS NOT NULL THEN
                UPDATE snapfs.blocks SET refcount = refcount + 1
                    WHERE region_id = NEW.region_id AND id = NEW.base_id;
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER blocks_base_counted AFTER INSERT OR DELETE ON snapfs.blocks
            FOR EACH ROW EXECUTE FUNCTION snapfs.base_counted();
        CREATE TRIGGER blocks_base_update AFTER UPDATE OF base_id ON snapfs.blocks
            FOR EACH ROW WHEN (OLD.base_id IS DISTINCT FROM NEW.base_id)
            EXECUTE FUNCTION snapfs.base_counted();

        -- A pack's live bytes: the lengths of the blocks located in it, by construction.
        CREATE FUNCTION snapfs.pack_bytes_counted() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.pack_id IS NOT NULL THEN
                UPDATE snapfs.packs SET live_bytes = live_bytes - OLD.pack_length
                    WHERE region_id = OLD.region_id AND id = OLD.pack_id;
            END IF;
            IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.pack_id IS NOT NULL THEN
                UPDATE snapfs.packs SET live_bytes = live_bytes + NEW.pack_length
                    WHERE region_id = NEW.region_id AND id = NEW.pack_id;
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER blocks_pack_counted AFTER INSERT OR DELETE ON snapfs.blocks
            FOR EACH ROW EXECUTE FUNCTION snapfs.pack_bytes_counted();
        CREATE TRIGGER blocks_pack_update AFTER UPDATE OF pack_id, pack_length ON snapfs.blocks
            FOR EACH ROW WHEN (OLD.pack_id IS DISTINCT FROM NEW.pack_id
                OR OLD.pack_length IS DISTINCT FROM NEW.pack_length)
            EXECUTE FUNCTION snapfs.pack_bytes_counted();
        """
    )


def _v2(conn: psycopg.Connection) -> None:
    """What shared regions need (meta/ledger.py): a change number on every snapshot row
    (hosts pull what changed since the last one they saw), who owns an unfinished snapshot
    and whether its writer closed it, purged deletions; packs named by the bucket's pack ids
    (text), owned by the session that registered them, dead since when, and `uploaded`
    (published before their blocks are committed); block rows pinned by the session that
    published them; claims of blocks being written; sessions' ttl and since when the
    reaper suspects them; the region's collector lease."""
    conn.execute(
        """
        ALTER TABLE snapfs.snapshots
            ADD COLUMN seq BIGINT NOT NULL DEFAULT 0,
            ADD COLUMN owner TEXT COLLATE "C",
            ADD COLUMN closed INTEGER NOT NULL DEFAULT 0,
            ADD COLUMN changed_by TEXT COLLATE "C",
            ADD COLUMN changed_at DOUBLE PRECISION NOT NULL DEFAULT 0,
            ADD COLUMN purged INTEGER NOT NULL DEFAULT 0;
        CREATE SEQUENCE snapfs.changes;
        CREATE FUNCTION snapfs.snapshot_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.seq := nextval('snapfs.changes');
            NEW.changed_at := extract(epoch from clock_timestamp());
            RETURN NEW;
        END $$;
        CREATE TRIGGER snapshots_changed BEFORE INSERT OR UPDATE ON snapfs.snapshots
            FOR EACH ROW EXECUTE FUNCTION snapfs.snapshot_changed();
        CREATE INDEX snapshots_seq ON snapfs.snapshots(region_id, seq);
        CREATE INDEX snapshots_owner ON snapfs.snapshots(region_id, owner)
            WHERE owner IS NOT NULL;

        ALTER TABLE snapfs.blocks DROP CONSTRAINT blocks_region_id_pack_id_fkey;
        DROP TRIGGER blocks_pack_update ON snapfs.blocks;
        ALTER TABLE snapfs.packs ALTER COLUMN id DROP IDENTITY;
        ALTER TABLE snapfs.packs ALTER COLUMN id TYPE TEXT COLLATE "C";
        ALTER TABLE snapfs.blocks ALTER COLUMN pack_id TYPE TEXT COLLATE "C";
        CREATE TRIGGER blocks_pack_update AFTER UPDATE OF pack_id, pack_length ON snapfs.blocks
            FOR EACH ROW WHEN (OLD.pack_id IS DISTINCT FROM NEW.pack_id
                OR OLD.pack_length IS DISTINCT FROM NEW.pack_length)
            EXECUTE FUNCTION snapfs.pack_bytes_counted();
        ALTER TABLE snapfs.blocks ADD FOREIGN KEY (region_id, pack_id)
            REFERENCES snapfs.packs(region_id, id);
        ALTER TABLE snapfs.packs
            ADD COLUMN dead_since DOUBLE PRECISION,
            ADD COLUMN session_id TEXT COLLATE "C";
        CREATE INDEX packs_state ON snapfs.packs(region_id, state);
        CREATE INDEX blocks_unreferenced_all ON snapfs.blocks(region_id) WHERE refcount <= 0;

        ALTER TABLE snapfs.packs DROP CONSTRAINT packs_state_check;
        ALTER TABLE snapfs.packs ADD CONSTRAINT packs_state_check
            CHECK (state IN ('open', 'uploaded', 'sealed', 'deleting'));
        ALTER TABLE snapfs.blocks ADD COLUMN pinned_by TEXT COLLATE "C";
        CREATE INDEX blocks_pinned ON snapfs.blocks(region_id, pinned_by)
            WHERE pinned_by IS NOT NULL;
        CREATE TABLE snapfs.claims (
            region_id BIGINT NOT NULL REFERENCES snapfs.regions(id),
            block_id BYTEA NOT NULL,
            session_id TEXT COLLATE "C" NOT NULL,
            claimed_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (region_id, block_id)
        );
        CREATE INDEX claims_session ON snapfs.claims(region_id, session_id);

        ALTER TABLE snapfs.sessions
            ADD COLUMN ttl DOUBLE PRECISION NOT NULL DEFAULT 30,
            ADD COLUMN suspect_since DOUBLE PRECISION;
        ALTER TABLE snapfs.regions
            ADD COLUMN collector TEXT COLLATE "C",
            ADD COLUMN collector_until DOUBLE PRECISION NOT NULL DEFAULT 0;
        """
    )


PG_MIGRATIONS: list[PgMigration] = [_v1, _v2]


# --- URLs and connecting ---------------------------------------------------------------------


def redacted(url: str) -> str:
    """The URL without its password (in the user part or a `password=` parameter)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user, _, host = netloc.rpartition("@")
            netloc = f"{user.split(':', 1)[0]}:***@{host}"
        query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # not even a URL: show nothing of it that could be a secret
        return "<an unparsable URL>"


def without_password(url: str) -> str:
    """The URL as a store records it: no password (in the user part or a `password=`
    parameter). libpq then takes it from PGPASSWORD, ~/.pgpass or a service file, as psql
    does, so a secret never lands in store.db."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}@{host}"
    query = "&".join(p for p in parts.query.split("&") if p and not p.startswith("password="))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def check_url(url: str) -> dict[str, Any]:
    shown = redacted(url)
    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        raise InvalidIndexUrl(f"the region index {shown} is not a postgresql:// URL")
    try:
        return psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        reason = _one_line(exc)
        raise InvalidIndexUrl(f"the region index {shown} is not a usable URL: {reason}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# SQLSTATEs a server sends while refusing a connection.
_DENIED = {"28000", "28P01", "42501"}  # authorization, password, privilege
_NO_DATABASE = "3D000"


def connect(url: str) -> psycopg.Connection:
    """An autocommit connection to the database at `url`; a clear SnapfsError when the URL
    is malformed (InvalidIndexUrl), the server unreachable (IndexUnavailable) or the
    credentials wrong (IndexDenied), naming the URL without its password."""
    params = check_url(url)
    params.setdefault("connect_timeout", CONNECT_TIMEOUT)
    shown = redacted(url)
    try:
        conn = psycopg.connect(**params, autocommit=True)
    except psycopg.OperationalError as exc:
        raise _refusal(exc, shown) from None
    except psycopg.ProgrammingError as exc:  # an option libpq does not know
        raise InvalidIndexUrl(f"the region index {shown}: {_one_line(exc)}") from None
    conn.adapters.register_dumper(bool, _BoolAsInteger)
    try:
        conn.execute("SET synchronous_commit = on")
    except psycopg.OperationalError as exc:  # ended by the server as soon as it was made
        conn.close()
        raise IndexUnavailable(f"the region index {shown}: {_one_line(exc)}") from exc
    return conn


def _refusal(exc: psycopg.OperationalError, shown: str) -> SnapfsError:
    reason = _one_line(exc)
    state = exc.sqlstate or ""
    if state in _DENIED or "authentication failed" in reason or "no password" in reason:
        return IndexDenied(f"the region index {shown} refused the credentials: {reason}")
    if state == _NO_DATABASE or ("database" in reason and "does not exist" in reason):
        return InvalidIndexUrl(f"the region index {shown} names no database there: {reason}")
    return IndexUnavailable(f"the region index {shown} cannot be reached: {reason}")


class _BoolAsInteger(Dumper):
    """Python booleans as 0/1, as SQLite stores them (the columns are integers)."""

    format = Format.TEXT
    oid = psycopg.adapters.types["int4"].oid

    def dump(self, obj: Any) -> bytes:
        return b"1" if obj else b"0"


@functools.lru_cache(maxsize=2048)
def _placeholders(sql: str) -> str:
    """The shared SQL's `?` as psycopg's `%s` (a literal `%` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def migrate(conn: psycopg.Connection, migrations: Sequence[PgMigration] = PG_MIGRATIONS) -> int:
    """Bring the database to the newest schema, as meta/db.py's migrate does for SQLite:
    migration N takes version N to N+1 in one transaction with the version bump. An
    advisory lock makes hosts that attach at once migrate one after another; a database
    newer than this code is refused."""
    target = len(migrations)
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_MIGRATION_LOCK])
            current = _schema_version(conn, create=True)
            if current > target:
                raise StoreFormat(
                    f"the region index has schema version {current}; this snapfs knows up "
                    f"to {target}, upgrade it"
                )
            if current == target:
                return target
            migrations[current](conn)
            conn.execute(
                "UPDATE snapfs.schema_info SET value = %s WHERE key = 'schema_version'",
                [str(current + 1)],
            )
        if current:
            log.info("migrated the region index from schema %d to %d", current, current + 1)


def _schema_version(conn: psycopg.Connection, *, create: bool = False) -> int:
    if create:
        conn.execute("CREATE SCHEMA IF NOT EXISTS snapfs")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS snapfs.schema_info "
            "(key TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        conn.execute(
            "INSERT INTO snapfs.schema_info VALUES ('schema_version', '0') ON CONFLICT DO NOTHING"
        )
    row = conn.execute(
        "SELECT value FROM snapfs.schema_info WHERE key = 'schema_version'"
    ).fetchone()
    return int(row[0]) if row else 0


# --- the connection the shared queries run on ------------------------------------------------


class PgConnection:
    """meta/engine.py's IndexConnection on PostgreSQL, scoped to one region by the
    temporary views made at connect (see the module's docstring)."""

    engine = "postgresql"
    IntegrityError = psycopg.IntegrityError

    def __init__(self, conn: psycopg.Connection, region_id: int, *, readonly: bool = False):
        self.conn = conn
        self.region_id = int(region_id)
        with conn.transaction():
            for table in REGION_TABLES:
                conn.execute(
                    f"CREATE TEMP VIEW {table} AS SELECT * FROM snapfs.{table} "
                    f"WHERE region_id = {self.region_id}"
                )
                conn.execute(
                    f"ALTER VIEW {table} ALTER COLUMN region_id SET DEFAULT {self.region_id}"
                )
        if readonly:
            conn.execute("SET default_transaction_read_only = on")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        with self._mapped():
            return self.conn.execute(_placeholders(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        batch = list(rows)
        if batch:
            with self._mapped(), self.conn.cursor() as cur:
                cur.executemany(_placeholders(sql), batch)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PgConnection]:
        with self._mapped(), self.conn.transaction():
            locked = self.conn.execute(
                "SELECT 1 FROM snapfs.regions WHERE id = %s FOR NO KEY UPDATE", [self.region_id]
            ).fetchone()
            if locked is None:
                raise RegionNotFound(f"region {self.region_id} is no longer in the index")
            yield self

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[PgConnection]:
        if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            yield self  # inside a transaction already: it has its snapshot
            return
        with self._mapped(), self.conn.transaction():
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield self

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as the shared queries expect them: as SQLite's, without the region id and
        the columns only a shared region's ledger keeps (meta/ledger.py reads those with
        `all_rows`)."""
        return dict_rows(self.execute(sql, params), skip=_NOT_IN_SQLITE)

    def all_rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return dict_rows(self.execute(sql, params), skip=frozenset({"region_id"}))

    def conflict(self, columns: str) -> str:
        return f"region_id, {columns}"

    def table_names(self) -> list[str]:
        return list(REGION_TABLES)

    def columns(self, table: str) -> set[str]:
        rows = self.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'snapfs' AND table_name = ?",
            [table],
        )
        return {r[0] for r in rows} - _NOT_IN_SQLITE

    def quick_check(self, limit: int) -> list[str]:
        """SQLite's page check has no counterpart here: the server checks its own pages
        (data checksums, WAL); that it answers is the check."""
        self.execute("SELECT 1").fetchone()
        return ["ok"]

    def schema_trees(self) -> list[tuple[int, str, str]]:
        return [(0, table, "table") for table in REGION_TABLES]

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[None]:
        """A lost connection as IndexUnavailable; anything else (an integrity error, a bug)
        as psycopg raised it."""
        try:
            yield
        except psycopg.OperationalError as exc:
            # No SQLSTATE: the client lost the connection; class 08: connection exception;
            # 57P: the server shut down, crashed or is starting, or ended this connection.
            state = exc.sqlstate
            if state is None or state.startswith(("08", "57P")):
                raise IndexUnavailable(f"the region index: {_one_line(exc)}") from exc
            raise
        except psycopg.InterfaceError as exc:  # a connection the server closed, used again
            raise IndexUnavailable(f"the region index: {_one_line(exc)}") from exc


# --- a region's index ------------------------------------------------------------------------


class PgRegionIndex(RegionIndex):
    """A region's index in PostgreSQL: RegionIndex's methods on the region's rows (a shared
    region's own tables are meta/ledger.py's)."""

    db: PgConnection

    def __init__(self, connection: PgConnection, *, url: str, name: str, readonly: bool = False):
        super().__init__(readonly=readonly, connection=connection)
        self._url = url  # with its password: reader() connects again
        self.url = redacted(url)
        self.name = name
        self.region_id = connection.region_id

    @classmethod
    def create(cls, url: str, name: str, *, created_at: float) -> PgRegionIndex:
        """A new region `name` in the database at `url` (its schema made or brought up to
        date first); RegionAlreadyExists if the database has a region of that name."""
        conn = connect(url)
        try:
            _migrate_as_allowed(conn, url)
            try:
                row = conn.execute(
                    "INSERT INTO snapfs.regions (name, created_at) VALUES (%s, %s) RETURNING id",
                    [name, created_at],
                ).fetchone()
            except psycopg.errors.UniqueViolation:
                raise RegionAlreadyExists(
                    f"region {name} already exists in the region index {redacted(url)}"
                ) from None
            assert row is not None
            log.info("created region %s (id %d) in %s", name, row[0], redacted(url))
            return cls(PgConnection(conn, row[0]), url=url, name=name)
        except psycopg.OperationalError as exc:  # the server went away while we set up
            conn.close()
            raise IndexUnavailable(f"the region index {redacted(url)}: {_one_line(exc)}") from exc
        except BaseException:
            conn.close()
            raise

    @classmethod
    def attach(cls, url: str, name: str, *, readonly: bool = False) -> PgRegionIndex:
        """The region `name` of the database at `url` (RegionNotFound if it has none). A
        read-write attach brings the schema up to date; a read-only one needs it current."""
        conn = connect(url)
        try:
            if readonly:
                version = _schema_version(conn) if _has_schema(conn) else 0
                if version != len(PG_MIGRATIONS):
                    raise StoreFormat(
                        f"the region index {redacted(url)} has schema version {version}; "
                        f"this snapfs reads version {len(PG_MIGRATIONS)}"
                    )
            else:
                _migrate_as_allowed(conn, url)
            row = conn.execute("SELECT id FROM snapfs.regions WHERE name = %s", [name]).fetchone()
            if row is None:
                raise RegionNotFound(f"no region {name} in the region index {redacted(url)}")
            connection = PgConnection(conn, row[0], readonly=readonly)
            return cls(connection, url=url, name=name, readonly=readonly)
        except psycopg.OperationalError as exc:  # the server went away while we set up
            conn.close()
            raise IndexUnavailable(f"the region index {redacted(url)}: {_one_line(exc)}") from exc
        except BaseException:
            conn.close()
            raise

    def reader(self) -> PgRegionIndex:
        return PgRegionIndex.attach(self._url, self.name, readonly=True)

    def drop_region(self) -> None:
        """Take the region out of the database with all its rows (a create whose other
        half, claiming the bucket, failed)."""
        with self.db.conn.transaction():
            for table in (*reversed(REGION_TABLES), "sessions", "packs"):
                self.db.conn.execute(
                    f"DELETE FROM snapfs.{table} WHERE region_id = %s", [self.region_id]
                )
            self.db.conn.execute("DELETE FROM snapfs.regions WHERE id = %s", [self.region_id])


def _migrate_as_allowed(conn: psycopg.Connection, url: str) -> None:
    """migrate(), with a role that may not make the schema told as IndexDenied."""
    try:
        migrate(conn)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise IndexDenied(
            f"the region index {redacted(url)} does not let its user make snapfs's tables "
            f"(grant CREATE on the database, or make the schema as its owner): {_one_line(exc)}"
        ) from None


def _has_schema(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT to_regclass('snapfs.schema_info')").fetchone()
    return row is not None and row[0] is not None


def region_names(url: str) -> list[str]:
    """The regions in the database at `url`, by name (none if it has no snapfs schema)."""
    conn = connect(url)
    try:
        if not _has_schema(conn):
            return []
        return [r[0] for r in conn.execute("SELECT name FROM snapfs.regions ORDER BY name")]
    finally:
        conn.close()
