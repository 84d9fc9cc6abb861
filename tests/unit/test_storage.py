"""Storage without FUSE: index triggers and migrations, local packs, the store's lock, dedup
accounting, GC and recovery. The index tests that take `new_region_index` run on SQLite and
on PostgreSQL (marked `pg`); the migration tests are SQLite's own."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from snapfs.errors import StoreBusy, StoreFormat
from snapfs.meta import db
from snapfs.meta.index import MIGRATIONS, NewBlock, RegionIndex
from snapfs.objects.local import LocalBackend
from snapfs.service.snapshots import SnapshotWriter
from snapfs.service.store import Store

MiB = 1 << 20


# --- index -----------------------------------------------------------------------------------


def _snapshot_row(snapshot_id: str, name: str) -> dict:
    return {
        "id": snapshot_id,
        "name": name,
        "status": "creating",
        "size": 0,
        "mode": 0o644,
        "uid": 0,
        "gid": 0,
        "atime_ns": 0,
        "mtime_ns": 0,
        "ctime_ns": 0,
        "created_at": 0.0,
    }


def _refcounts(index: RegionIndex) -> dict[bytes, int]:
    return dict(index.db.execute("SELECT id, refcount FROM blocks").fetchall())


def test_index_triggers_keep_refcounts(new_region_index) -> None:
    index = new_region_index()
    a, b = b"a" * 32, b"b" * 32
    index.insert_snapshot(_snapshot_row("s-1", "one"))
    index.insert_snapshot(_snapshot_row("s-2", "two"))
    blocks = [NewBlock(a, 10, 20, 1), NewBlock(b, 10, 20, 1)]
    index.commit_blocks("s-1", blocks, [(0, a), (1, a), (2, b)], {"size": 30})
    index.commit_blocks("s-2", blocks, [(0, a)], {})
    assert _refcounts(index) == {a: 3, b: 1}
    assert index.allocated_blocks("s-1") == 3
    index.commit_blocks("s-1", [], [(1, b), (2, None)], {})  # overwrite, then a hole
    assert _refcounts(index) == {a: 2, b: 1}
    assert index.allocated_blocks("s-1") == 2
    assert index.truncate_map_step("s-1", 1, 100, 10, 10)
    assert _refcounts(index) == {a: 2, b: 0}
    index.delete_snapshot("s-1")
    assert _refcounts(index) == {a: 1, b: 0}
    assert index.drop_unreferenced([a, b]) == [b]
    assert _refcounts(index) == {a: 1}


def test_a_delta_keeps_its_base_referenced_until_its_row_goes(new_region_index) -> None:
    """Schema 4: a delta row counts as a reference to its base, by trigger; dropping the
    delta's row releases the base, which only then can be collected; a recount agrees."""
    index = new_region_index()
    base, d = b"b" * 32, b"d" * 32
    index.insert_snapshot(_snapshot_row("s-1", "day1"))
    index.insert_snapshot(_snapshot_row("s-2", "day2"))
    index.commit_blocks("s-1", [NewBlock(base, 10, 20, 1)], [(0, base)], {})
    index.commit_blocks("s-2", [NewBlock(d, 10, 3, 1, None, base)], [(0, d)], {})
    assert _refcounts(index) == {base: 2, d: 1}
    assert index.base_of(d) == base and index.base_of(base) is None
    assert index.deltas_over(base) == [d]
    index.delete_snapshot("s-1")  # day 1 gone: its block stays, as day 2's base
    assert _refcounts(index) == {base: 1, d: 1}
    assert index.drop_unreferenced([base]) == []
    assert [(b, r, u) for b, r, u in index.block_refcounts() if r != u] == []
    index.delete_snapshot("s-2")
    assert index.drop_unreferenced([base, d]) == [d]  # the base: still the delta's
    assert index.bases_released == 1
    assert _refcounts(index) == {base: 0}
    assert index.drop_unreferenced([base]) == [base]
    assert _refcounts(index) == {}


def test_a_schema_3_index_migrates_to_4_and_keeps_its_blocks(tmp_path: Path) -> None:
    from snapfs.meta import index as index_module

    path = tmp_path / "index.db"
    database = db.connect(path)
    db.migrate(database, index_module.MIGRATIONS[:3], "old index")
    database.execute(
        "INSERT INTO blocks (id, refcount, plain_size, stored_size, codec) VALUES (?, 0, 1, 1, 1)",
        [b"x" * 32],
    )
    database.conn.commit()
    database.close()
    index = RegionIndex(path)
    assert db.get_meta(index.db, "schema_version") == str(len(MIGRATIONS))
    assert index.base_of(b"x" * 32) is None and index.has_block(b"x" * 32)


def test_a_schema_4_index_migrates_to_5_and_its_maps_read_and_chain(tmp_path: Path) -> None:
    """Schema 5 rebuilds the map table (maps relative to a parent): every row, refcount and
    allocated count carries over, the old snapshots are full maps, and a clone of one is
    relative to it."""
    from snapfs.meta import index as index_module

    path = tmp_path / "index.db"
    database = db.connect(path)
    db.migrate(database, index_module.MIGRATIONS[:4], "old index")
    a, b = b"a" * 32, b"b" * 32
    database.execute(
        "INSERT INTO blocks (id, refcount, plain_size, stored_size, codec) VALUES "
        "(?, 0, 10, 5, 1), (?, 0, 10, 5, 1)",
        [a, b],
    )
    row = _snapshot_row("s-1", "one")
    database.execute(
        f"INSERT INTO snapshots ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
        list(row.values()),
    )
    database.conn.executemany(
        "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) VALUES ('s-1', ?, ?)",
        [(0, a), (1, b), (2, a)],
    )
    database.conn.commit()
    assert database.execute("SELECT allocated_blocks FROM snapshots").fetchone() == (3,)
    database.close()
    index = RegionIndex(path)
    assert db.get_meta(index.db, "schema_version") == str(len(MIGRATIONS))
    assert index.block_map("s-1", 0, 9) == {0: a, 1: b, 2: a}
    assert _refcounts(index) == {a: 2, b: 1}
    assert index.allocated_blocks("s-1") == 3 and index.parent_of("s-1") is None
    index.insert_snapshot(_snapshot_row("s-2", "two"))
    index.clone_map("s-2", "s-1", {})
    index.commit_blocks("s-2", [], [(1, None)], {})
    assert index.block_map("s-2", 0, 9) == {0: a, 2: a} and index.own_row_count("s-2") == 1
    assert index.allocated_blocks("s-2") == 2
    with pytest.raises(sqlite3.IntegrityError):  # still no row naming a missing block
        index.commit_blocks("s-2", [], [(5, b"z" * 32)], {})


def test_a_shrink_drops_the_map_from_the_top_in_steps(new_region_index) -> None:
    """A shrink in steps (each one transaction, sized by the loop budget) lowers the recorded
    size with every step, so a stop between two leaves a prefix, never rows past the size."""
    index = new_region_index()
    a = b"a" * 32
    index.insert_snapshot(_snapshot_row("s-1", "one"))
    index.commit_blocks("s-1", [NewBlock(a, 10, 20, 1)], [(n, a) for n in range(10)], {"size": 100})
    sizes = []
    while not index.truncate_map_step("s-1", 2, 3, 15, 10):
        sizes.append(index.snapshot_row("s-1")["size"])
        assert max(index.block_map("s-1", 0, 99)) * 10 < sizes[-1]
    assert sizes == [70, 40]
    assert index.snapshot_row("s-1")["size"] == 15
    assert sorted(index.block_map("s-1", 0, 99)) == [0, 1]
    assert _refcounts(index) == {a: 2}


def test_index_refuses_row_without_block(new_region_index) -> None:
    index = new_region_index()
    index.insert_snapshot(_snapshot_row("s-1", "one"))
    with pytest.raises(index.db.IntegrityError):
        index.commit_blocks("s-1", [], [(0, b"z" * 32)], {})
    assert index.block_map("s-1", 0, 10) == {}


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    RegionIndex(tmp_path / "index.db").close()
    conn = sqlite3.connect(tmp_path / "index.db")
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreFormat):
        RegionIndex(tmp_path / "index.db")


def test_migrations_run_once_in_order(tmp_path: Path) -> None:
    calls = []
    steps = [
        lambda d: (
            calls.append(1) or d.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        ),
        lambda d: calls.append(2),
    ]
    database = db.connect(tmp_path / "x.db")
    assert db.migrate(database, steps, "x") == 2
    assert db.migrate(database, steps, "x") == 2
    assert calls == [1, 2]


def test_an_interrupted_migration_leaves_nothing_half_done(tmp_path: Path) -> None:
    def v1(d):
        db.run_script(d, "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);")

    def v2_fails(d):
        db.run_script(
            d,
            """
            CREATE TABLE t (x INTEGER);
            CREATE TRIGGER t_ins AFTER INSERT ON t BEGIN SELECT 1; END;
            CREATE TABLE t (x INTEGER);
            """,
        )

    database = db.connect(tmp_path / "x.db")
    with pytest.raises(sqlite3.OperationalError):
        db.migrate(database, [v1, v2_fails], "x")
    assert db.get_meta(database, "schema_version") == "1"
    assert "t" not in database.table_names()  # the first statement was rolled back too


# --- store, region, writer -------------------------------------------------------------------


def test_file_objects_of_old_layouts_stay_readable_beside_packs(tmp_path: Path) -> None:
    root = tmp_path / "blocks"
    objects = {os.urandom(32).hex(): os.urandom(100) for _ in range(20)}
    for key, data in objects.items():  # layout 1: ab/cd/key
        (root / key[:2] / key[2:4]).mkdir(parents=True, exist_ok=True)
        (root / key[:2] / key[2:4] / key).write_bytes(data)
    backend = LocalBackend(root)
    assert not [p for p in root.rglob("*") if p.is_dir() and p.parent not in (root, tmp_path)]
    assert sorted(backend.keys()) == sorted(objects)
    for key, data in objects.items():
        assert backend.get(key) == data
    new = os.urandom(32).hex()
    backend.put(new, b"packed")
    backend.sync()
    assert sorted(backend.keys()) == sorted([*objects, new])
    gone = next(iter(objects))
    backend.delete_many([gone, new])
    backend.close()
    reopened = LocalBackend(root)
    assert sorted(reopened.keys()) == sorted(set(objects) - {gone})
    with pytest.raises(FileNotFoundError):
        reopened.get(gone)
    reopened.close()


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_packs_keep_synced_objects_and_reclaim_the_rest_after_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "blocks"
    backend = LocalBackend(root)
    kept = {os.urandom(32).hex(): os.urandom(256 << 10) for _ in range(8)}
    for key, data in kept.items():
        backend.put(key, data)
    assert backend.get(next(iter(kept))) == kept[next(iter(kept))]  # readable before sync
    backend.sync()
    lost = {os.urandom(32).hex(): os.urandom(256 << 10) for _ in range(4)}
    for key, data in lost.items():
        backend.put(key, data)
    (pack,) = root.glob("packs/*.pack")
    assert _allocated(pack) >= 12 * (256 << 10)
    # A crash: the unsynced locations are gone with the process, the bytes are in the pack.
    after = LocalBackend(root)
    assert sorted(after.keys()) == sorted(kept)
    assert after.reclaim_unmapped() == 4 * (256 << 10)
    assert _allocated(pack) <= 8 * (256 << 10) + 65536
    for key, data in kept.items():
        assert after.get(key) == data
    after.put(os.urandom(32).hex(), b"x")  # a new pack: never append to a crashed one
    assert len(list(root.glob("packs/*.pack"))) == 2
    some = list(kept)[:4]
    after.delete_many(some)  # punched: the space goes back at once
    assert _allocated(pack) <= 4 * (256 << 10) + 65536
    after.delete_many(list(kept)[4:])  # the last object of a closed pack: the pack goes
    assert not pack.exists()
    after.close()


def test_pack_read_fds_stay_open_are_capped_and_go_with_their_pack(tmp_path: Path) -> None:
    """Gets reuse one open fd per pack (issue 15); the cache is bounded; a pack that is
    unlinked takes its fd with it, so a later get cannot read another file's bytes."""
    backend = LocalBackend(tmp_path / "blocks")
    backend.PACK_BYTES = 1  # every object in its own pack
    backend.READ_FDS = 3
    objects = {os.urandom(32).hex(): os.urandom(4096) for _ in range(6)}
    for key, data in objects.items():
        backend.put(key, data)
    backend.sync()

    def open_packs() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # listdir's own fd
                count += os.readlink(f"/proc/self/fd/{fd}").endswith(".pack")
        return count

    fds_before = open_packs()  # the pack being appended to
    for _ in range(3):
        for key, data in objects.items():
            assert backend.get(key) == data
    assert len(backend._read_fds) == 3  # the most recent three, no more
    assert open_packs() == fds_before + 3
    last = list(objects)[-2]  # the newest pack is still appended to: it stays
    pack_of_last = backend.locate(last)
    assert pack_of_last is not None and pack_of_last.pack in backend._read_fds
    backend.delete_many([last])  # its pack is now empty and unlinked
    assert pack_of_last.pack not in backend._read_fds
    with pytest.raises(FileNotFoundError):
        backend.get(last)
    first = list(objects)[3]  # cached; its pack then unlinked behind the backend's back
    location = backend.locate(first)
    assert location is not None and location.pack in backend._read_fds
    (tmp_path / "blocks" / "packs" / f"{location.pack:08d}.pack").unlink()
    with pytest.raises(FileNotFoundError):
        backend.get(first)  # missing, as when every get opened the pack by name
    assert location.pack not in backend._read_fds
    backend.close()
    assert open_packs() == 0  # nothing leaked


def test_a_pack_still_being_appended_to_survives_losing_its_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put reserves its range, then writes it: the pack must not be unlinked meanwhile
    because every object it has recorded was deleted (a GC racing an ingest)."""
    backend = LocalBackend(tmp_path / "blocks")
    backend.PACK_BYTES = 100
    slow_data, writing, release = b"s" * 50, threading.Event(), threading.Event()
    real_pwritev = os.pwritev

    def pwritev(fd: int, buffers, offset: int) -> int:
        if b"".join(bytes(b) for b in buffers) == slow_data:
            writing.set()
            release.wait(10)
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    backend.put("0" * 64, b"x" * 50)
    slow = threading.Thread(target=backend.put, args=("1" * 64, slow_data))
    slow.start()
    assert writing.wait(10)
    backend.put("2" * 64, b"n" * 50)  # the first pack is full: a second one starts
    backend.sync()
    backend.delete_many(["0" * 64])
    release.set()
    slow.join()
    backend.sync()
    assert backend.get("1" * 64) == slow_data
    backend.close()


def test_sync_fdatasyncs_each_pack_written_and_the_packs_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durability never rests on syncfs(): the packs a batch appended to are fdatasync'ed,
    and the packs directory fsync'ed when a pack was started, before locations commit."""
    backend = LocalBackend(tmp_path / "blocks")
    backend.PACK_BYTES = 200 << 10
    synced: list[str] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync
    monkeypatch.setattr(
        os, "fdatasync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                     real_fdatasync(fd))[1]
    )  # fmt: skip
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                 real_fsync(fd))[1]
    )  # fmt: skip
    for _ in range(2):  # two packs: the first fills up
        backend.put(os.urandom(32).hex(), os.urandom(256 << 10))
    backend.sync()
    packs = sorted(str(p) for p in (tmp_path / "blocks" / "packs").glob("*.pack"))
    assert len(packs) == 2 and sorted(synced[:2]) == packs
    assert synced[2:] == [str(tmp_path / "blocks" / "packs")]
    synced.clear()
    backend.PACK_BYTES = 1 << 30
    backend.put(os.urandom(32).hex(), b"x" * 100)
    backend.sync()  # an append to the current pack: only that pack
    assert synced == [packs[1]]
    backend.close()


@pytest.mark.parametrize("marker", ["", "garbage", None])
def test_a_lost_layout_marker_is_rebuilt_from_the_packs(
    tmp_path: Path, marker: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "blocks"
    backend = LocalBackend(root)
    key = os.urandom(32).hex()
    backend.put(key, b"data")
    backend.sync()
    backend.close()
    if marker is None:
        (root / ".layout").unlink()
    else:
        (root / ".layout").write_text(marker)
    assert LocalBackend(root, readonly=True).layout_problem() is not None
    with caplog.at_level(logging.WARNING):
        again = LocalBackend(root)
    assert "layout 3 found on disk, marker rewritten" in caplog.text
    assert (root / ".layout").read_text() == "3\n"
    assert again.layout_problem() is None and again.get(key) == b"data"
    again.close()


def test_pack_problems_name_packs_shorter_than_their_objects(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "blocks")
    backend.put(os.urandom(32).hex(), b"y" * 1000)
    backend.sync()
    assert backend.pack_problems() == []
    (pack,) = (tmp_path / "blocks" / "packs").glob("*.pack")
    os.truncate(pack, 10)
    assert backend.pack_problems() == [
        f"pack {pack.name} is 10 bytes but its objects reach byte 1000"
    ]
    pack.unlink()
    assert "is missing" in backend.pack_problems()[0]
    backend.close()


def test_store_lock_refuses_second_opener(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", block_size=MiB)
    try:
        with pytest.raises(StoreBusy):
            Store(tmp_path / "store", block_size=MiB)
    finally:
        store.close()


async def _write_snapshot(store: Store, nursery, region, name: str, data: bytes):
    snap = await store.create_snapshot(region, name, 0o644, 0, 0)
    handle = store.open(snap, True)
    assert isinstance(snap.writer, SnapshotWriter)
    for off in range(0, len(data), 128 * 1024):
        await snap.writer.write(off, data[off : off + 128 * 1024])
    await store.flush(handle)
    await store.release(handle)
    await store.seal(snap)  # without waiting out the settle period
    return snap


async def test_dedup_accounting_and_gc(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", block_size=MiB)
    try:
        async with trio.open_nursery() as nursery:
            store.start(nursery)
            region = store.create_region("us-east-1")
            blocks = [os.urandom(MiB) for _ in range(4)]
            data_a = blocks[0] + blocks[1] + bytes(MiB) + blocks[2] + blocks[0]
            data_b = blocks[0] + blocks[1] + bytes(MiB) + blocks[3] + blocks[0]
            a = await _write_snapshot(store, nursery, region, "a", data_a)
            b = await _write_snapshot(store, nursery, region, "b", data_b)
            assert a.status == b.status == "available"
            assert await a.read(0, len(data_a)) == data_a
            assert await b.read(0, len(data_b)) == data_b
            assert a.allocated_blocks == 4  # the zero block is a hole
            assert len(list(region.backend.keys())) == 4  # 0, 1, 2, 3 once each
            stats = region.index.stats()
            assert stats.blocks == 4 and stats.referenced_plain_bytes == 8 * MiB
            await store.unlink(region, "a")
            await trio.testing.wait_all_tasks_blocked()  # its map goes in the background
            await region.collect_garbage()
            assert len(list(region.backend.keys())) == 3  # block 2 was only in a
            await store.unlink(region, "b")
            await trio.testing.wait_all_tasks_blocked()
            await region.collect_garbage()
            assert list(region.backend.keys()) == []
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_concurrent_writers_of_same_block_store_it_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", block_size=MiB)
    try:
        async with trio.open_nursery() as nursery:
            store.start(nursery)
            region = store.create_region("us-east-1")
            data = os.urandom(3 * MiB)
            async with trio.open_nursery() as writers:
                for i in range(5):
                    writers.start_soon(_write_snapshot, store, nursery, region, f"s{i}", data)
            assert len(list(region.backend.keys())) == 3
            refs = _refcounts(region.index)
            assert sorted(refs.values()) == [5, 5, 5]
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_recover_drops_creating_snapshots_and_orphans(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", block_size=MiB)
    region = store.create_region("us-east-1")
    async with trio.open_nursery() as nursery:
        store.start(nursery)
        snap = await store.create_snapshot(region, "unsealed", 0o644, 0, 0)
        store.open(snap, True)
        await snap.writer.write(0, os.urandom(2 * MiB))
        await snap.writer.flush()
        nursery.cancel_scope.cancel()
    region.backend.put("ab" * 32, b"orphan object")
    # Simulate a crash: no close(), the lock released as the process would on death.
    store._unlock()
    for r in store.regions.values():
        r.close()
    store.db.close()

    again = Store(tmp_path / "store", block_size=MiB)
    try:
        assert not again.was_clean
        await again.recover()
        region = again.region("us-east-1")
        assert region.snapshots == {}
        assert list(region.backend.keys()) == []
        assert region.index.stats().blocks == 0
    finally:
        again.close()


async def test_read_range_decodes_frames_and_matches_the_block(tmp_path: Path) -> None:
    """A random read's range comes from the frames that hold it (format version 2), the
    same bytes as the whole block; version 1 objects and short blocks read the same."""
    from snapfs.blocks.repository import frame_key
    from snapfs.formats import codec

    store = Store(tmp_path / "store", block_size=512 * 1024)
    try:
        region = store.create_region("us-east-1")
        plain = os.urandom(200_000) + b"text " * 60_000 + bytes(12_288)
        plain = plain[: 512 * 1024]
        block_id = codec.content_id(plain)
        region.backend.put(block_id.hex(), codec.encode(plain, block_id).data)
        region.backend.sync()
        for start, end in [(0, 4096), (65_530, 65_600), (300_000, 300_001), (400_000, 524_288)]:
            assert bytes(await region.read_range(block_id, start, end)) == plain[start:end]
        assert block_id not in region.cache  # only frames were decoded
        assert frame_key(block_id, 0) in region.cache
        old = codec.encode(plain[:1000], version=1)  # a version 1 object, and a short block
        region.backend.put(old.block_id.hex(), old.data)
        region.backend.sync()
        assert bytes(await region.read_range(old.block_id, 10, 20)) == plain[10:20]
        short = codec.encode(plain[:1000])
        region.backend.put(short.block_id.hex(), short.data)
        assert bytes(await region.read_range(short.block_id, 70_000, 74_096)) == b""
    finally:
        store.close()
