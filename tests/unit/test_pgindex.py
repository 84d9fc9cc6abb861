"""The region index on PostgreSQL (meta/pg.py, issue 19), beyond what the index tests run on
both engines check (test_chains.py, test_storage.py): regions side by side in one database,
the region lock under concurrent writers, sessions, packs and block locations, the schema
version, and the errors of a bad URL. Each test has a fresh database of the session's
private server (tests/conftest.py, `pg_server`)."""

from __future__ import annotations

import threading
from urllib.parse import urlsplit

import psycopg
import pytest

from snapfs.errors import (
    IndexDenied,
    IndexUnavailable,
    InvalidIndexUrl,
    RegionAlreadyExists,
    RegionNotFound,
    StoreFormat,
)
from snapfs.meta.index import NewBlock, RegionIndex, RestoredSnapshot
from snapfs.meta.pg import (
    PG_MIGRATIONS,
    PgRegionIndex,
    redacted,
    region_names,
    without_password,
)
from tests.conftest import PG_PASSWORD, PG_PASSWORD_ROLE, PgServer

pytestmark = pytest.mark.pg

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32


def _row(snapshot_id: str, name: str | None = None, created_at: float = 0.0) -> dict:
    return {
        "id": snapshot_id, "name": name or snapshot_id, "status": "creating", "size": 0,
        "mode": 0o644, "uid": 0, "gid": 0, "atime_ns": 0, "mtime_ns": 0, "ctime_ns": 0,
        "created_at": created_at,
    }  # fmt: skip


def _refcounts(index: PgRegionIndex) -> dict[bytes, int]:
    return dict(index.db.execute("SELECT id, refcount FROM blocks").fetchall())


# --- regions -------------------------------------------------------------------------------


def test_a_second_region_of_a_name_is_refused_and_attach_finds_the_first(pg_dsn: str) -> None:
    first = PgRegionIndex.create(pg_dsn, "us-east-1", created_at=1.0)
    first.set_setting("compression", "zstd")
    with pytest.raises(RegionAlreadyExists) as refused:
        PgRegionIndex.create(pg_dsn, "us-east-1", created_at=2.0)
    assert refused.value.code == "InvalidRegionId.Duplicate"
    assert "us-east-1" in refused.value.message
    other_host = PgRegionIndex.attach(pg_dsn, "us-east-1")
    assert other_host.region_id == first.region_id
    assert other_host.get_setting("compression") == "zstd"
    with pytest.raises(RegionNotFound):
        PgRegionIndex.attach(pg_dsn, "eu-west-1")
    assert region_names(pg_dsn) == ["us-east-1"]
    first.close()
    other_host.close()


def test_two_regions_in_one_database_do_not_see_each_others_rows(pg_dsn: str) -> None:
    """The same snapshot ids and block ids in two regions (a copy keeps ids): each index
    reads, counts, collects and deletes only its own rows."""
    east = PgRegionIndex.create(pg_dsn, "us-east-1", created_at=1.0)
    west = PgRegionIndex.create(pg_dsn, "us-west-1", created_at=1.0)
    for index in (east, west):
        index.insert_snapshot(_row("s-1", "day1"), tags={"env": index.name})
    east.commit_blocks("s-1", [NewBlock(A, 10, 5, 1), NewBlock(B, 10, 5, 1)], [(0, A), (1, B)], {})
    west.commit_blocks("s-1", [NewBlock(A, 10, 5, 1)], [(0, A), (1, A), (2, A)], {})
    east.set_setting("compression", "lz4")

    assert east.block_map("s-1", 0, 9) == {0: A, 1: B}
    assert west.block_map("s-1", 0, 9) == {0: A, 1: A, 2: A}
    assert _refcounts(east) == {A: 1, B: 1} and _refcounts(west) == {A: 3}
    assert east.tags("s-1") == {"env": "us-east-1"} and west.tags("s-1") == {"env": "us-west-1"}
    assert west.get_setting("compression") is None
    assert [r["name"] for r in west.snapshots()] == ["day1"]
    assert "region_id" not in west.snapshots()[0]  # rows look as SQLite's do

    east.delete_snapshot("s-1")
    assert east.drop_unreferenced([A, B]) == [A, B]
    assert west.drop_unreferenced([A]) == []  # still west's three map rows
    assert east.snapshots() == [] and west.block_map("s-1", 0, 9) == {0: A, 1: A, 2: A}
    assert _refcounts(west) == {A: 3}
    assert [(b, r, u) for b, r, u in west.block_refcounts() if r != u] == []
    east.close()
    west.close()


def test_a_reader_sees_commits_and_writes_nothing(pg_dsn: str) -> None:
    writer = PgRegionIndex.create(pg_dsn, "us-east-1", created_at=1.0)
    reader = writer.reader()
    writer.insert_snapshot(_row("s-1"))
    writer.commit_blocks("s-1", [NewBlock(A, 10, 5, 1)], [(0, A)], {"size": 10})
    assert reader.snapshot_row("s-1")["size"] == 10 and reader.block_map("s-1", 0, 0) == {0: A}
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        reader.update_snapshot("s-1", size=20)
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        reader.db.execute("UPDATE snapshots SET size = 30")
    assert writer.snapshot_row("s-1")["size"] == 10
    reader.close()
    writer.close()


def test_a_readers_snapshot_sees_one_committed_state(pg_dsn: str) -> None:
    """`stats()` adds up several queries: inside `snapshot()` a commit in between is not
    seen (REPEATABLE READ), and a nested snapshot is the outer one."""
    writer = PgRegionIndex.create(pg_dsn, "us-east-1", created_at=1.0)
    reader = writer.reader()
    writer.insert_snapshot(_row("s-1"))
    writer.commit_blocks("s-1", [NewBlock(A, 10, 5, 1)], [(0, A)], {"size": 10})
    with reader.db.snapshot():
        before = reader.stats()  # its own snapshot() nests in this one
        writer.insert_snapshot(_row("s-2"))
        writer.commit_blocks("s-2", [], [(0, A)], {"size": 10})
        assert reader.stats() == before
    assert reader.stats().referenced_plain_bytes == 2 * before.referenced_plain_bytes
    reader.close()
    writer.close()


# --- concurrency: the region lock and the triggers' locks ----------------------------------


def test_concurrent_refcount_increments_from_two_connections_lose_no_update(
    pg_dsn: str,
) -> None:
    """Two hosts' indexes of one region commit map rows naming the same blocks at once, in
    threads: every reference counts, and allocated_blocks is each snapshot's."""
    PgRegionIndex.create(pg_dsn, "us-east-1", created_at=1.0).close()
    hosts = [PgRegionIndex.attach(pg_dsn, "us-east-1") for _ in range(2)]
    hosts[0].commit_blocks("x", [NewBlock(A, 10, 5, 1), NewBlock(B, 10, 5, 1)], [], {})
    commits, rows = 40, 8
    start = threading.Barrier(2)
    failures: list[BaseException] = []

    def write(n: int) -> None:
        index = hosts[n]
        try:
            start.wait()
            for i in range(commits):
                sid = f"s-{n}-{i}"
                index.insert_snapshot(_row(sid))
                index.commit_blocks(sid, [], [(no, (A, B)[no % 2]) for no in range(rows)], {})
        except BaseException as exc:  # surfaced below: a thread's failure fails the test
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    total = 2 * commits * rows
    assert _refcounts(hosts[0]) == {A: total // 2, B: total // 2}
    assert {hosts[1].allocated_blocks(f"s-{n}-{i}") for n in range(2) for i in range(commits)} == {
        rows
    }
    for index in hosts:
        index.close()


def _in_thread(fn, *args) -> tuple[threading.Thread, list]:
    result: list = []

    def run() -> None:
        try:
            result.append(fn(*args))
        except BaseException as exc:  # handed to the test through `result`
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_garbage_collection_waits_for_a_commit_that_names_its_block(pg_dsn: str) -> None:
    """A block at refcount 0 is named by a map row in a transaction not yet committed; a
    collector on another connection waits for it (the region lock), then finds the block
    referenced and keeps it. Without the lock it would delete the row the map names."""
    committer = PgRegionIndex.create(pg_dsn, "us-east-1", created_at=1.0)
    collector = PgRegionIndex.attach(pg_dsn, "us-east-1")
    committer.insert_snapshot(_row("s-1"))
    committer.commit_blocks("x", [NewBlock(A, 10, 5, 1)], [], {})
    assert collector.unreferenced_blocks() == [A]
    with committer.db.transaction() as conn:
        conn.execute(
            "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) VALUES (?, ?, ?)",
            ["s-1", 0, A],
        )
        thread, result = _in_thread(collector.drop_unreferenced, [A])
        thread.join(0.5)
        assert thread.is_alive(), f"the collector did not wait: {result}"
    thread.join(10)
    assert result == [[]]
    assert _refcounts(collector) == {A: 1} and collector.block_map("s-1", 0, 0) == {0: A}
    committer.close()
    collector.close()


def test_writers_of_a_region_take_turns_and_other_regions_do_not_wait(pg_dsn: str) -> None:
    """The region lock: while one transaction of a region is open, another host's write to
    the same region (even to other rows) waits for it; a write to another region does not.
    This is what makes commit_blocks' and fold_step's read-then-write steps safe."""
    first = PgRegionIndex.create(pg_dsn, "us-east-1", created_at=1.0)
    second = PgRegionIndex.attach(pg_dsn, "us-east-1")
    elsewhere = PgRegionIndex.create(pg_dsn, "us-west-1", created_at=1.0)
    first.insert_snapshot(_row("s-1"))
    first.insert_snapshot(_row("s-2"))
    with first.db.transaction():
        first.db.execute("UPDATE snapshots SET size = 1 WHERE id = 's-1'")
        elsewhere.set_setting("compression", "lz4")  # returns: another region's lock
        thread, result = _in_thread(lambda: second.update_snapshot("s-2", size=2))
        thread.join(0.5)
        assert thread.is_alive(), f"the second writer did not wait: {result}"
    thread.join(10)
    assert result == [None]
    assert [r["size"] for r in second.snapshots()] == [1, 2]
    for index in (first, second, elsewhere):
        index.close()


def test_a_delete_outside_the_index_waits_for_the_map_row_that_names_the_block(
    pg_server: PgServer, pg_dsn: str
) -> None:
    """The triggers' own lock (the second line): even a DELETE that does not take the
    region lock waits for the transaction naming the block, then re-checks its refcount."""
    index = PgRegionIndex.create(pg_dsn, "us-east-1", created_at=1.0)
    index.insert_snapshot(_row("s-1"))
    index.commit_blocks("x", [NewBlock(A, 10, 5, 1)], [], {})
    raw = psycopg.connect(pg_dsn, autocommit=True)

    def delete_if_unreferenced() -> int:
        return raw.execute(
            "DELETE FROM snapfs.blocks WHERE region_id = %s AND id = %s AND refcount <= 0",
            [index.region_id, A],
        ).rowcount

    with index.db.transaction() as conn:
        conn.execute(
            "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) VALUES (?, ?, ?)",
            ["s-1", 0, A],
        )
        thread, result = _in_thread(delete_if_unreferenced)
        thread.join(0.5)
        assert thread.is_alive(), f"the DELETE did not wait: {result}"
    thread.join(10)
    assert result == [0]
    assert _refcounts(index) == {A: 1}
    raw.close()
    index.close()


def test_a_map_row_naming_a_block_deleted_meanwhile_is_refused(pg_dsn: str) -> None:
    """The other order: the collector's transaction deletes the block first; a commit
    naming it waits, then is refused (IntegrityError), never left naming no block."""
    collector = PgRegionIndex.create(pg_dsn, "us-east-1", created_at=1.0)
    committer = PgRegionIndex.attach(pg_dsn, "us-east-1")
    committer.insert_snapshot(_row("s-1"))
    committer.commit_blocks("x", [NewBlock(A, 10, 5, 1)], [], {})
    with collector.db.transaction() as conn:
        conn.execute("DELETE FROM blocks WHERE id = ? AND refcount <= 0", [A])
        thread, result = _in_thread(committer.commit_blocks, "s-1", [], [(0, A)], {})
        thread.join(0.5)
        assert thread.is_alive(), f"the commit did not wait: {result}"
    thread.join(10)
    assert len(result) == 1 and isinstance(result[0], psycopg.IntegrityError), result
    assert committer.block_map("s-1", 0, 0) == {} and _refcounts(committer) == {}
    committer.close()
    collector.close()


# --- schema ----------------------------------------------------------------------------------


def test_the_schema_is_made_once_and_a_newer_one_is_refused(pg_dsn: str) -> None:
    """Hosts that attach at once migrate one after the other (the advisory lock); a
    database of a newer snapfs is refused, read-write or read-only."""
    made: list = []
    threads = [
        threading.Thread(
            target=lambda n=n: made.append(
                PgRegionIndex.create(pg_dsn, f"region-{n}", created_at=1.0)
            )
        )
        for n in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(made) == 3, "a concurrent first migration failed"
    for index in made:
        index.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT value FROM snapfs.schema_info").fetchall() == [
            (str(len(PG_MIGRATIONS)),)
        ]
        conn.execute("UPDATE snapfs.schema_info SET value = '99'")
    with pytest.raises(StoreFormat):
        PgRegionIndex.attach(pg_dsn, "region-0")
    with pytest.raises(StoreFormat):
        PgRegionIndex.attach(pg_dsn, "region-0", readonly=True)


# --- a bad URL, server or credentials ------------------------------------------------------


def test_a_bad_url_server_or_credentials_is_a_clear_error_without_the_password(
    pg_server: PgServer, pg_dsn: str
) -> None:
    database = urlsplit(pg_dsn).path.lstrip("/")
    with pytest.raises(InvalidIndexUrl) as not_pg:
        PgRegionIndex.create("mysql://u:secret@host/db", "r", created_at=1.0)
    assert not_pg.value.code == "InvalidParameter.IndexUrl"
    assert "secret" not in str(not_pg.value) and "mysql://u:***@host/db" in str(not_pg.value)

    wrong = pg_server.url(database, user=PG_PASSWORD_ROLE, password="not-the-password")
    with pytest.raises(IndexDenied) as denied:
        PgRegionIndex.create(wrong, "r", created_at=1.0)
    assert denied.value.code == "Forbidden.RegionIndex"
    assert "not-the-password" not in str(denied.value)
    assert f"postgresql://{PG_PASSWORD_ROLE}:***@/{database}" in str(denied.value)
    assert "password authentication failed" in str(denied.value)

    with pytest.raises(IndexUnavailable) as down:
        PgRegionIndex.attach(f"postgresql://postgres@/{database}?host=/nonexistent", "r")
    assert down.value.code == "ServiceUnavailable.RegionIndex"
    assert "host=/nonexistent" in str(down.value) and "cannot be reached" in str(down.value)

    with pytest.raises(InvalidIndexUrl) as no_database:
        PgRegionIndex.attach(pg_server.url("no_such_database"), "r")
    assert "no_such_database" in str(no_database.value)

    with pytest.raises(InvalidIndexUrl):
        PgRegionIndex.attach(pg_dsn + "&no_such_option=1", "r")

    # The right password, but a role that may not create the schema in that database.
    right = pg_server.url(database, user=PG_PASSWORD_ROLE, password=PG_PASSWORD)
    with pytest.raises(IndexDenied) as not_allowed:
        PgRegionIndex.create(right, "r", created_at=1.0)
    assert "does not let its user make snapfs's tables" in str(not_allowed.value)
    assert PG_PASSWORD not in str(not_allowed.value)

    # Once the role owns the database, the same URL works.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {database} OWNER TO {PG_PASSWORD_ROLE}")
    index = PgRegionIndex.create(right, "r", created_at=1.0)
    assert (
        index.url == f"postgresql://{PG_PASSWORD_ROLE}:***@/{database}?host={pg_server.socket_dir}"
    )
    index.reader().close()  # a reader connects again, with the password
    index.close()


def test_a_lost_connection_is_index_unavailable(pg_dsn: str) -> None:
    index = PgRegionIndex.create(pg_dsn, "us-east-1", created_at=1.0)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [index.db.conn.info.backend_pid])
    with pytest.raises(IndexUnavailable):
        index.snapshots()
    with pytest.raises(IndexUnavailable):  # and so is every call after it
        index.set_setting("compression", "lz4")
    index.close()


def test_redacted_hides_passwords_in_the_user_part_and_the_query() -> None:
    assert redacted("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redacted("postgresql://u@h/db?password=pw&sslmode=require") == (
        "postgresql://u@h/db?password=***&sslmode=require"
    )
    assert redacted("postgresql://h/db") == "postgresql://h/db"


# --- the same answers as SQLite ---------------------------------------------------------------


def _sweep(index: RegionIndex, fresh: RegionIndex) -> list:
    """Drive every public RegionIndex method the other tests leave out through one region's
    life (copy job, tags, names, deltas, translations, a chain, a shrink, a recount, a
    restore into `fresh`), recording each answer, order-free ones sorted."""
    seen: list = []
    d, e = b"d" * 32, b"e" * 32
    index.set_setting("compression", "zstd")
    index.set_setting("compression", "lz4")
    index.set_setting("block_size", "4096")
    seen.append(index.settings())
    index.insert_snapshot(_row("s-1", "day1", 1.0), tags={"env": "prod", "team": "a"})
    blocks = [NewBlock(A, 10, 6, 1, "key-1"), NewBlock(B, 10, 7, 2), NewBlock(d, 10, 3, 1, None, A)]
    index.commit_blocks(
        "s-1", blocks, [(0, A), (1, B), (2, d), (3, A)], {"size": 40},
        translations=[("key-1", C, A), ("", C, B)],
    )  # fmt: skip
    index.commit_blocks("s-1", [], [], {}, translations=[("key-1", C, B)])  # replaced
    index.update_snapshot("s-1", status="available", sealed_at=2.0, encrypted=True)
    job = {"src_region": "eu", "src_snapshot_id": "src", "kind": "copy", "total_blocks": 9,
           "created_at": 3.0, "base_snapshot_id": "s-1"}  # fmt: skip
    index.insert_snapshot(_row("s-2", "day2", 2.0), job=job, parent_id="s-1")
    index.commit_blocks(
        "s-2", [NewBlock(e, 10, 8, 1)], [(1, e), (2, None), (3, A)], {"transferred_bytes": 10},
        job_fields={"next_block": 4, "done_blocks": 2},
    )  # fmt: skip
    seen.append([{k: v for k, v in j.items()} for j in index.copy_jobs()])
    index.finish_copy("s-2", {"status": "available", "sealed_at": 4.0})
    seen += [index.copy_jobs(), index.translation("key-1", C), index.translation("", C)]
    seen.append(index.translation("nope", C))
    index.set_tag("s-1", "team", "b")
    index.set_tag("s-1", "env", None)
    seen.append(index.tags("s-1"))
    index.insert_snapshot(_row("s-3", "day3", 3.0))
    index.clone_map("s-3", "s-2", {"size": 40})
    index.rename_snapshot("s-3", "latest", displaced_id=None)
    index.exchange_names("s-1", "s-2", "day1", "day2")
    index.insert_snapshot(_row("s-4", "latest", 4.0), displaced_id="s-3")
    index.set_base(B, e)
    seen += [index.base_of(B), index.block_kind(B), index.block_kind(A), index.block_kind(C)]
    seen += [sorted(index.deltas_over(A)), index.has_block(d), index.depth("s-3")]
    seen += [index.parent_of("s-2"), index.children("s-1"), index.ancestors("s-3")]
    seen += [index.changed_since("s-3", "s-1", 0, 10), index.changed_count("s-3", "s-1")]
    seen += [index.common_levels("s-3", "s-1"), index.rows_of("s-3", ["s-2"], 0, 10)]
    seen += [index.own_rows_from("s-2", 0, 10), index.resolve("s-3", range(5))]
    seen += [index.block_map_from("s-3", 1, 2), index.block_map_with_sizes("s-3")]
    seen += [sorted(index.bases_of("s-1")), index.stats(), index.snapshot_stored_bytes()]
    seen += [sorted(index.referenced_block_ids()), index.all_block_ids()]
    seen += [sorted(index.block_users(A)), sorted(index.block_refcounts())]
    seen += [sorted(index.snapshot_allocations()), index.broken_chains()]
    seen += [sorted(index.snapshot_ids_and_names()), index.snapshot_named("latest")]
    seen.append(index.snapshots(include_deleted=True))
    seen += [index.quick_check(10), index.unreferenced_blocks(), index.own_row_count("s-2")]
    index.read_through("blocks")
    seen.append({name for _, name, kind in index.schema_trees() if kind == "table"} >= {"blocks"})

    index.insert_snapshot(_row("big", "big", 5.0))
    index.commit_blocks("big", [], [(no, A) for no in range(20)], {"size": 200})
    seen.append([index.delete_map_chunk("big", 7), index.allocated_blocks("big")])
    seen.append(index.truncate_map_step("big", 10, 100, 95, 10))
    index.db.execute("UPDATE blocks SET refcount = 99")  # damage, for the recount to mend
    seen.append(sorted(index.recount()))
    seen += [sorted(index.block_refcounts()), sorted(index.snapshot_allocations())]
    index.delete_snapshot("s-1")  # folds into its child first
    seen += [index.snapshots(include_deleted=True), sorted(index.block_refcounts())]

    manifests = [
        RestoredSnapshot(
            row={k: v for k, v in row.items() if k not in ("parent_id", "map_id", "depth")},
            blocks=[
                (no, bytes.fromhex(h), plain, stored, codec, base and bytes.fromhex(base))
                for no, h, plain, stored, codec, base in index.block_map_with_sizes(row["id"])
            ],
            tags=index.tags(row["id"]),
            bases=[(bytes.fromhex(h), *sizes) for h, *sizes in index.bases_of(row["id"])],
        )
        for row in index.snapshots()
    ]
    fresh.restore(index.settings(), manifests)
    seen += [fresh.settings(), fresh.snapshots(), sorted(fresh.block_refcounts())]
    seen += [fresh.block_map("s-3", 0, 99), fresh.stats()]
    return seen


def test_every_method_answers_as_on_sqlite(tmp_path, pg_dsn: str) -> None:
    sqlite = _sweep(RegionIndex(tmp_path / "a.db"), RegionIndex(tmp_path / "b.db"))
    pg = _sweep(
        PgRegionIndex.create(pg_dsn, "a", created_at=1.0),
        PgRegionIndex.create(pg_dsn, "b", created_at=1.0),
    )
    assert len(pg) == len(sqlite)
    for step, (theirs, ours) in enumerate(zip(sqlite, pg, strict=True)):
        assert ours == theirs, f"answer {step} differs"


def test_a_stored_url_keeps_no_password() -> None:
    assert without_password("postgresql://u:secret@db:5432/x?password=s2&sslmode=require") == (
        "postgresql://u@db:5432/x?sslmode=require"
    )
    assert without_password("postgresql://u@/x?host=/run/pg") == "postgresql://u@/x?host=/run/pg"
