"""Packed objects on a bucket (objects/s3packs.py): what the ObjectStore contract suite does
not cover — the pack sizes and PUT counts, trailers (plain and sealed), live bytes, dead
packs and their grace, repacking beside deletes, stray packs, and old one-object-per-block
regions read through the packed store.

On `rclone serve s3` (the `s3` fixture), so marked `mount` like the S3 half of the contract
suite (no FUSE mount is made).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from snapfs.errors import BlockCorrupt, KeyNotFound
from snapfs.objects.s3 import S3Backend, S3Location, make_client
from snapfs.objects.s3packs import (
    LEGACY_PREFIX,
    PLAIN,
    PackedS3Backend,
    decode_trailer,
    encode_trailer,
)

from ..conftest import S3Server

pytestmark = pytest.mark.mount

KiB, MiB = 1 << 10, 1 << 20
BUCKET = "snapfs-packs"


def key(n: int) -> str:
    return f"{n:064x}"


class Sealer:
    """Blocks whose first byte is 1 are 'encrypted' under key id K; as the region's sealer
    does with block headers, but without the codec."""

    K = b"K" * 16

    def __init__(self) -> None:
        self.aead = AESGCM(bytes(32))

    def group(self, head: bytes) -> bytes:
        return self.K if head[:1] == b"\1" else PLAIN

    def seal(self, group: bytes, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        return self.aead.encrypt(nonce, body, aad)

    def open(self, group: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        try:
            return self.aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise BlockCorrupt("trailer section fails authentication") from None


class NoKeys(Sealer):
    def open(self, group: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
        raise KeyNotFound("no such key here")


@pytest.fixture
def base(s3: S3Server) -> S3Backend:
    location = S3Location.parse(f"s3://{BUCKET}/r{os.urandom(4).hex()}", s3.endpoint)
    backend = S3Backend(location, client=make_client(location), max_wait=10.0)
    backend.ensure_bucket()
    return backend


@pytest.fixture
def open_store(base: S3Backend, tmp_path: Path) -> Iterator:
    made: list[PackedS3Backend] = []

    def make(**kwargs: object) -> PackedS3Backend:
        kwargs.setdefault("pack_target", 1 * MiB)
        store = PackedS3Backend(base, tmp_path / "state", **kwargs)  # type: ignore[arg-type]
        store.sealer = Sealer()
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def count_ranged_gets(store: PackedS3Backend) -> list[int]:
    """The lengths of the ranged GETs the store makes of its packs from now on."""
    fetched: list[int] = []
    ranged = store.packs.get_range

    def counting(pack: str, offset: int, length: int) -> bytes:
        fetched.append(length)
        return ranged(pack, offset, length)

    store.packs.get_range = counting  # type: ignore[method-assign]
    return fetched


def packs_in_bucket(store: PackedS3Backend) -> dict[str, int]:
    return dict(store.packs.sized_keys())


def test_objects_go_into_packs_of_about_the_target_size(open_store) -> None:
    store = open_store()
    objects = {key(n): os.urandom(100 * KiB) for n in range(50)}  # ~4.9 MiB
    for k, data in objects.items():
        store.put(k, data)
    store.sync()
    sizes = packs_in_bucket(store)
    assert len(sizes) == 5  # 4 full packs of 11 objects, the tail at sync
    assert store.puts == 5
    assert all(size >= 1 * MiB for size in sorted(sizes.values())[1:])
    for k, data in objects.items():
        where = store.locate(k)
        assert where is not None and where.length == len(data)
        assert store.get(k) == data
    count, total, live = store.pack_stats()
    assert count == 5 and live == 50 * 100 * KiB and total > live  # trailers


def test_a_trailer_lists_its_objects_and_seals_the_encrypted_ones(open_store) -> None:
    store = open_store()
    plain = {key(n): b"\0" + os.urandom(1000) for n in range(3)}
    secret = {key(n): b"\1" + os.urandom(1000) for n in range(3, 6)}
    for k, data in {**plain, **secret}.items():
        store.put(k, data)
    store.sync()
    (pack,) = packs_in_bucket(store)
    trailer = store.read_trailer(pack)
    listed = {k: (off, length) for k, off, length in trailer.entries}
    assert set(listed) == set(plain) | set(secret) and not trailer.unreadable
    for k, (off, length) in listed.items():
        assert store.packs.get_range(pack, off, length) == {**plain, **secret}[k]
    raw = store.packs.get(pack)
    for k in secret:  # the encrypted blocks' ids are not in the bucket in the clear
        assert bytes.fromhex(k) not in raw
    for k in plain:
        assert bytes.fromhex(k) in raw
    blind = decode_trailer(pack, raw, NoKeys())
    assert {k for k, _, _ in blind.entries} == set(plain)
    assert len(blind.unreadable) == 1 and "3 objects" in blind.unreadable[0]


def test_a_trailer_section_moved_to_another_pack_does_not_open() -> None:
    sealer = Sealer()
    trailer = encode_trailer("a" * 32, [(key(1), 0, 10, Sealer.K)], sealer)
    bent = b"x" * 10 + trailer[:-20] + b"y" * 4 + trailer[-16:]
    tampered = decode_trailer("a" * 32, bent, sealer)
    assert tampered.entries == [] and "authentication" in tampered.unreadable[0]
    assert decode_trailer("a" * 32, b"x" * 10 + trailer, sealer).entries == [(key(1), 0, 10)]
    moved = decode_trailer("b" * 32, b"x" * 10 + trailer, sealer)
    assert moved.entries == [] and "authentication" in moved.unreadable[0]
    with pytest.raises(BlockCorrupt):
        decode_trailer("a" * 32, b"not a pack at all, no footer", sealer)


def test_deletes_count_live_bytes_and_an_empty_pack_goes_after_its_grace(open_store) -> None:
    store = open_store(grace=60)
    objects = {key(n): os.urandom(300 * KiB) for n in range(4)}  # one pack (closed at 1.2 MiB)
    for k, data in objects.items():
        store.put(k, data)
    store.sync()
    (pack,) = packs_in_bucket(store)
    store.delete_many([key(0), key(1)])
    assert store.pack_stats()[2] == 2 * 300 * KiB
    store.delete_many([key(2), key(3)])
    assert store.pack_stats()[2] == 0
    store.maintain()  # within the grace: the pack stays readable for old locations
    assert pack in packs_in_bucket(store)
    store.maintain(now=__import__("time").time() + 61)
    assert packs_in_bucket(store) == {}
    assert store.pack_stats() == (0, 0, 0)


def test_repack_moves_live_objects_and_keeps_them_readable(open_store) -> None:
    import time

    store = open_store(grace=60)
    objects = {key(n): os.urandom(200 * KiB) for n in range(5)}
    for k, data in objects.items():
        store.put(k, data)
    store.sync()
    (old,) = packs_in_bucket(store)
    store.delete_many([key(0), key(1), key(2)])  # 60% dead
    fetched = count_ranged_gets(store)
    moved = store.maintain(now=time.time() + 1)
    assert moved == 2
    assert fetched == [400 * KiB]  # the live range only: one GET, no dead bytes
    for k in (key(3), key(4)):
        where = store.locate(k)
        assert where is not None and where.pack != old
        assert store.get(k) == objects[k]
    assert old in packs_in_bucket(store)  # dead, inside its grace
    store.maintain(now=time.time() + 120)
    assert old not in packs_in_bucket(store)
    again = open_store(grace=60)
    store.close()
    assert {k: again.get(k) for k in (key(3), key(4))} == {k: objects[k] for k in (key(3), key(4))}


def test_repack_beside_deletes_never_brings_an_object_back(open_store) -> None:
    import time

    store = open_store(grace=0)
    objects = {key(n): os.urandom(64 * KiB) for n in range(40)}
    for k, data in objects.items():
        store.put(k, data)
    store.sync()
    store.delete_many([key(n) for n in range(0, 40, 2)])  # every pack half dead (and more)
    store.delete_many([key(n) for n in range(1, 40, 4)])
    doomed = [key(n) for n in range(3, 40, 4)]
    stop = threading.Event()

    def deleter() -> None:
        for k in doomed:
            store.delete_many([k])
        stop.set()

    thread = threading.Thread(target=deleter)
    thread.start()
    store.maintain(now=time.time() + 1)
    thread.join()
    assert set(store.keys()) == set()
    assert store.pack_stats()[2] == 0


def test_a_pack_no_location_names_is_deleted_at_reclaim(open_store, base: S3Backend) -> None:
    store = open_store()
    store.put(key(1), b"kept")
    store.sync()
    stray = "f" * 32
    base.sibling("packs/").put(stray, b"uploaded, then a crash before its rows committed")
    assert store.reclaim_unmapped() > 0
    assert stray not in packs_in_bucket(store)
    assert store.get(key(1)) == b"kept"


def test_objects_of_the_one_object_per_block_layout_are_still_read(
    open_store, base: S3Backend
) -> None:
    old = base.sibling(LEGACY_PREFIX)
    old.put(key(7), b"written before packing")
    store = open_store()
    assert store.get(key(7)) == b"written before packing"
    assert store.exists(key(7)) and set(store.keys()) == {key(7)}
    store.put(key(8), b"new")
    store.sync()
    assert set(store.keys()) == {key(7), key(8)}
    assert list(old.keys()) == [key(7)]  # new writes pack
    calls: list[int] = []
    store.delete_many([key(7), key(8)], lambda: calls.append(1))
    assert len(calls) == 2 and list(old.keys()) == [] and set(store.keys()) == set()


def test_a_rebuild_finds_blocks_by_trailers_where_a_manifest_names_a_gone_pack(
    open_store, base: S3Backend
) -> None:
    from snapfs.service.regionadmin import locate_blocks

    store = open_store()
    for n in range(4):
        store.put(key(n), (b"\1" if n % 2 else b"\0") + os.urandom(5000))  # plain and sealed
    store.sync()
    where = {key(n): store.locate(key(n)) for n in range(4)}
    sizes = dict(store.packs.sized_keys())
    gone = "0" * 32  # repacked away since this manifest was written
    doc = {
        "blocks": [[n, key(n), 5001, 5001, 2] for n in range(4)],
        "bases": [],
        "locations": {
            key(0): [where[key(0)].pack, where[key(0)].offset, where[key(0)].length],
            **{key(n): [gone, 0, 5001] for n in range(1, 4)},
        },
    }
    located = locate_blocks(base, [doc], set(), sizes, Sealer())
    assert located == where
    blind = locate_blocks(base, [doc], set(), sizes, NoKeys())
    assert set(blind) == {key(0), key(2)}  # the sealed ones need their key


@pytest.mark.parametrize("seed", [1, 2])
def test_puts_deletes_syncs_and_upkeep_at_once_match_a_model(open_store, seed: int) -> None:
    """Threads put (new blocks, and blocks deleted before: a collected id written again),
    delete, sync and run the upkeep (repacks, dead packs with no grace) at once; then every
    synced live key reads back its bytes, from this instance and a new one, nothing else is
    listed, and the live bytes add up."""
    import random
    import time

    store = open_store(grace=0, pack_target=256 * KiB)
    lock = threading.Lock()
    live: dict[str, bytes] = {}  # what the region believes is stored (put and not deleted)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        try:
            for _ in range(150):
                k = key(rng.randrange(60))
                with lock:
                    if k in live and rng.random() < 0.5:
                        store.delete_many([k])
                        del live[k]
                        continue
                    if k in live:
                        continue
                    data = rng.randbytes(rng.randrange(1, 40 * KiB))
                    live[k] = data
                    store.put(k, data)  # under the lock: the model and the store agree
                if rng.random() < 0.1:
                    store.sync()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    def upkeep() -> None:
        try:
            while not stop.is_set():
                store.sync()
                store.maintain(now=time.time() + 1)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    keeper = threading.Thread(target=upkeep)
    keeper.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    keeper.join()
    assert not errors, errors
    store.sync()
    store.maintain(now=time.time() + 1)
    assert set(store.keys()) == set(live)
    for k, data in live.items():
        assert store.get(k) == data, k
    assert store.pack_stats()[2] == sum(len(d) for d in live.values())
    again = open_store(grace=0)
    assert set(again.keys()) == set(live)
    assert all(again.get(k) == data for k, data in live.items())


def test_live_ranges_join_neighbours_and_skip_dead_gaps() -> None:
    from snapfs.objects.s3packs import RANGE_GAP, live_ranges

    rows = [(b"a", 0, 10), (b"b", 10, 5), (b"c", 15 + RANGE_GAP, 7), (b"d", 1 << 30, 0)]
    got = [(start, end, [r[0] for r in members]) for start, end, members in live_ranges(rows)]
    assert got == [(0, 15 + RANGE_GAP + 7, [b"a", b"b", b"c"]), (1 << 30, 1 << 30, [b"d"])]
    assert live_ranges([(b"a", 0, 10), (b"b", 11 + RANGE_GAP, 1)])[1][0] == 11 + RANGE_GAP


def test_small_packs_of_a_writer_that_syncs_often_are_merged_once_settled(open_store) -> None:
    import time

    from snapfs.objects.s3packs import SMALL_AGE

    store = open_store(grace=0)
    objects = {key(n): os.urandom(20 * KiB) for n in range(6)}
    for k, data in objects.items():  # an fsync after every block: one small pack each
        store.put(k, data)
        store.sync()
    assert len(packs_in_bucket(store)) == 6
    assert store.maintain(now=time.time() + 1) == 0  # not settled yet: left alone
    store.put(key(99), b"one of a kind")
    store.sync()
    assert store.maintain(now=time.time() + SMALL_AGE + 1) == 7
    assert len(packs_in_bucket(store)) == 1
    for k, data in {**objects, key(99): b"one of a kind"}.items():
        assert store.get(k) == data
    assert store.maintain(now=time.time() + SMALL_AGE + 1) == 0  # ...and one alone stays


def test_get_many_reads_neighbours_in_one_ranged_get(open_store, base: S3Backend) -> None:
    store = open_store(pack_target=4 * MiB)
    objects = {key(n): os.urandom(100 * KiB) for n in range(10)}
    for k, data in objects.items():
        store.put(k, data)
    store.sync()
    store.put(key(50), b"still in the spool")
    base.sibling(LEGACY_PREFIX).put(key(60), b"old layout")
    fetched = count_ranged_gets(store)
    wanted = [key(n) for n in (3, 4, 5, 6, 9, 50, 60, 70)]
    got = store.get_many(wanted)
    assert got == {k: objects[k] for k in wanted[:5]} | {key(50): b"still in the spool"}
    assert fetched == [400 * KiB, 100 * KiB]  # 3..6 in one GET, 9 in another
