"""The ObjectStore contract (snapfs/objects/protocol.py), one suite run against every store.

As restic's and S3QL's backend test suites do: every test takes the `store` fixture, which is
parametrized over the implementations ("local": `LocalBackend` in a temp directory; "s3":
`S3Backend` on `rclone serve s3` on loopback, the `s3` fixture of conftest.py), so a store
that passes it can stand in for the other. Where the contract lets stores differ (whether a
put is durable before `sync()`, whether `interrupt()` refuses later calls), a capability
flag of the case says what this store promises and the test checks exactly that; nothing is
skipped per store.

Each store runs with small units, so that a few dozen objects cross the boundaries real
loads cross: local packs of 1 MiB (a new pack file every few objects), S3 list pages of 7
keys and delete batches of 5 objects.

No FUSE mount: rclone is a subprocess. The local half is in the fast suite (`-m 'not
mount'`); the S3 half is marked `mount` only to keep that suite at seconds (see `S3`).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from snapfs.objects import s3 as s3module
from snapfs.objects.local import LocalBackend
from snapfs.objects.protocol import ObjectStore
from snapfs.objects.s3 import BackendUnavailable, S3Backend, S3Location, make_client
from snapfs.objects.s3packs import PackedS3Backend

from ..conftest import S3Server

KiB, MiB = 1 << 10, 1 << 20
BUCKET = "snapfs-contract"
LOCAL_PACK_BYTES = 1 * MiB
S3_PAGE_KEYS = 7
S3_DELETE_BATCH = 5


def key(n: int) -> str:
    """A key as the region makes them: a 32-byte block id in lowercase hex."""
    return f"{n:064x}"


def random_key() -> str:
    return os.urandom(32).hex()


@dataclass
class StoreCase:
    """One implementation under test, and what it promises beyond the common contract."""

    name: str
    factory: Callable[[], ObjectStore]  # a new instance on the same location
    remote: bool
    # A put is durable when it returns, before any sync() (S3: the PUT was acknowledged).
    # Otherwise only sync() makes it durable and a crash before it loses the object.
    durable_on_put: bool
    # After interrupt(), every call raises BackendUnavailable and `interrupted` is True
    # (S3: unmount must not wait for a dead server). Otherwise interrupt() is a no-op.
    interrupt_refuses_calls: bool
    opened: list[ObjectStore] = field(default_factory=list)

    def open(self) -> ObjectStore:
        store = self.factory()
        self.opened.append(store)
        return store

    def crash_and_reopen(self) -> ObjectStore:
        """What the next process finds after this one died: a new instance on the same
        location while the old one is neither synced nor closed."""
        return self.open()

    def close_all(self) -> None:
        for store in self.opened:
            store.close()


def _local_case(tmp_path: Path) -> StoreCase:
    root = tmp_path / "blocks"

    def factory() -> ObjectStore:
        store = LocalBackend(root)
        store.PACK_BYTES = LOCAL_PACK_BYTES
        return store

    return StoreCase(
        "local", factory, remote=False, durable_on_put=False, interrupt_refuses_calls=False
    )


def _s3_case(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> StoreCase:
    location = S3Location.parse(f"s3://{BUCKET}/region", server.endpoint)
    monkeypatch.setattr(s3module, "DELETE_BATCH", S3_DELETE_BATCH)

    def small_pages(params: dict[str, Any], **_: Any) -> None:
        params.setdefault("MaxKeys", S3_PAGE_KEYS)

    # One client for every instance: it keeps no state of the objects (only connections),
    # and making one costs ~0.1 s, which per instance would make the suite slow.
    client = make_client(location)
    client.meta.events.register("before-parameter-build.s3.ListObjectsV2", small_pages)

    def factory() -> ObjectStore:
        return S3Backend(location, "blocks/", client=client, max_wait=10.0)

    # rclone serves an empty directory: the bucket is created first (as regionadmin does).
    S3Backend(location, client=client, max_wait=10.0).ensure_bucket()
    return StoreCase("s3", factory, remote=True, durable_on_put=True, interrupt_refuses_calls=True)


def _s3_packs_case(
    server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> StoreCase:
    """Packed objects (objects/s3packs.py) with 1 MiB packs: a few objects a pack."""
    plain = _s3_case(server, monkeypatch)
    location = S3Location.parse(f"s3://{BUCKET}/region", server.endpoint)
    plain_store = plain.factory()
    assert isinstance(plain_store, S3Backend)
    client = plain_store.client

    def factory() -> ObjectStore:
        return PackedS3Backend(
            S3Backend(location, client=client, max_wait=10.0),
            tmp_path / "packstate",
            pack_target=LOCAL_PACK_BYTES,
        )

    return StoreCase(
        "s3packs", factory, remote=True, durable_on_put=False, interrupt_refuses_calls=True
    )


# The S3 half starts rclone and a boto3 client per test (~0.15 s each, ~4 s in all): it runs
# with the mount suite, so that `pytest -m 'not mount'` stays at seconds with the local half.
S3 = pytest.param("s3", marks=pytest.mark.mount, id="s3")


S3_PACKS = pytest.param("s3packs", marks=pytest.mark.mount, id="s3packs")


@pytest.fixture(params=["local", S3, S3_PACKS])
def case(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StoreCase]:
    if request.param == "local":
        made = _local_case(tmp_path)
    elif request.param == "s3packs":
        made = _s3_packs_case(request.getfixturevalue("s3"), monkeypatch, tmp_path)
    else:
        made = _s3_case(request.getfixturevalue("s3"), monkeypatch)
    try:
        yield made
    finally:
        made.close_all()


@pytest.fixture
def store(case: StoreCase) -> ObjectStore:
    return case.open()


def listed(store: ObjectStore) -> collections.Counter[str]:
    """keys() as a multiset: a key listed twice shows."""
    return collections.Counter(store.keys())


def put_all(store: ObjectStore, objects: dict[str, bytes]) -> None:
    for k, data in objects.items():
        store.put(k, data)


def assert_holds(store: ObjectStore, objects: dict[str, bytes]) -> None:
    for k, data in objects.items():
        assert store.exists(k), k
        assert store.get(k) == data, k
    assert listed(store) == collections.Counter(list(objects))


# --- the interface ------------------------------------------------------------------------


def test_the_store_is_an_object_store(case: StoreCase, store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)
    assert store.remote is case.remote
    assert store.interrupted is False
    assert list(store.keys()) == []


# --- put, get, exists ---------------------------------------------------------------------

SIZES = [0, 1, 4 * KiB - 1, 4 * KiB, 512 * KiB + 1, LOCAL_PACK_BYTES + 3, 5 * MiB]


def test_put_then_get_gives_the_bytes_back_at_every_size(store: ObjectStore) -> None:
    objects = {key(size): os.urandom(size) for size in SIZES}
    put_all(store, objects)
    assert_holds(store, objects)  # readable before sync
    store.sync()
    assert_holds(store, objects)


def test_an_object_put_in_pieces_reads_back_as_one(store: ObjectStore) -> None:
    """A block's header, table and frames go to `put` as pieces (one pwritev locally)."""
    parts = [os.urandom(44), b"", memoryview(os.urandom(70_000))[5:], bytearray(os.urandom(9))]
    store.put(key(1), parts)
    store.put(key(2), (b"x",))
    store.sync()
    assert store.get(key(1)) == b"".join(bytes(p) for p in parts)
    assert store.get(key(2)) == b"x"


def test_get_of_a_missing_key_raises_file_not_found(store: ObjectStore) -> None:
    with pytest.raises(FileNotFoundError):
        store.get(key(1))
    assert not store.exists(key(1))
    store.put(key(2), b"present")
    store.sync()
    with pytest.raises(FileNotFoundError):
        store.get(key(1))
    assert not store.exists(key(1)) and store.exists(key(2))


def test_overwrite_then_sync_gives_the_new_bytes(case: StoreCase, store: ObjectStore) -> None:
    store.put(key(1), b"old" * 1000)
    store.sync()
    store.put(key(1), b"new, and of another length")
    assert store.get(key(1)) == b"new, and of another length"
    store.sync()
    assert store.get(key(1)) == b"new, and of another length"
    assert listed(store) == {key(1): 1}
    assert case.open().get(key(1)) == b"new, and of another length"


def test_keys_lists_an_overwritten_key_once_before_sync(store: ObjectStore) -> None:
    store.put(key(1), b"old")
    store.sync()
    store.put(key(1), b"new")
    assert listed(store) == {key(1): 1}


# --- delete -------------------------------------------------------------------------------


def test_an_empty_object_can_be_deleted(store: ObjectStore) -> None:
    store.put(key(1), b"")
    store.sync()
    assert store.get(key(1)) == b""
    store.delete(key(1))
    assert not store.exists(key(1))


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put(key(1), b"synced")
    store.sync()
    store.put(key(2), b"not synced yet")
    for k in (key(1), key(2)):
        store.delete(k)
        assert not store.exists(k)
        with pytest.raises(FileNotFoundError):
            store.get(k)
        store.delete(k)  # again: not an error
    store.delete(key(3))  # never stored: not an error
    store.sync()
    assert list(store.keys()) == []


def test_delete_many_calls_each_once_per_object(store: ObjectStore) -> None:
    objects = {key(n): os.urandom(200 * KiB) for n in range(23)}  # several packs / batches
    put_all(store, objects)
    store.sync()
    doomed = [*list(objects)[:12], key(100), key(101)]  # two that were never stored
    calls: list[int] = []
    store.delete_many(doomed, lambda: calls.append(1))
    assert len(calls) == len(doomed)
    kept = {k: v for k, v in objects.items() if k not in doomed}
    assert_holds(store, kept)
    store.delete_many([], lambda: calls.append(1))  # nothing to do, nothing called
    store.delete_many(list(kept))  # `each` is optional
    assert list(store.keys()) == []


def test_delete_many_of_objects_not_synced_yet(store: ObjectStore) -> None:
    objects = {key(n): os.urandom(100) for n in range(6)}
    put_all(store, objects)
    store.delete_many(list(objects)[:3])
    store.sync()
    assert_holds(store, dict(list(objects.items())[3:]))


# --- keys ---------------------------------------------------------------------------------


def test_keys_lists_exactly_what_was_put_and_not_deleted(
    case: StoreCase, store: ObjectStore
) -> None:
    synced = {key(n): os.urandom(n * 10 + 1) for n in range(20)}  # crosses list pages
    put_all(store, synced)
    store.sync()
    unsynced = {key(n): os.urandom(50) for n in range(20, 30)}
    put_all(store, unsynced)
    everything = {**synced, **unsynced}
    assert listed(store) == collections.Counter(list(everything))  # synced or not
    gone = [key(n) for n in range(0, 30, 3)]
    for k in gone[:5]:
        store.delete(k)
    store.delete_many(gone[5:])
    left = {k: v for k, v in everything.items() if k not in gone}
    assert listed(store) == collections.Counter(list(left))
    store.sync()
    assert_holds(store, left)
    assert_holds(case.open(), left)


# --- threads ------------------------------------------------------------------------------


def test_concurrent_puts_from_threads_then_sync(case: StoreCase, store: ObjectStore) -> None:
    threads, per_thread = 8, 8
    made: dict[str, bytes] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(threads)
    lock = threading.Lock()

    def writer(t: int) -> None:
        try:
            start.wait(10)
            for _ in range(per_thread):
                k, data = random_key(), os.urandom(int.from_bytes(os.urandom(2)))
                store.put(k, data)
                assert store.get(k) == data  # this thread reads its own put back at once
                with lock:
                    made[k] = data
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not errors, errors
    assert len(made) == threads * per_thread
    store.sync()
    assert_holds(store, made)
    assert_holds(case.open(), made)


def test_puts_while_another_thread_syncs(case: StoreCase, store: ObjectStore) -> None:
    made: dict[str, bytes] = {}
    done = threading.Event()

    def syncer() -> None:
        while not done.wait(0.001):  # a no-op sync (S3) would otherwise hog the GIL
            store.sync()

    background = threading.Thread(target=syncer)
    background.start()
    try:
        for _ in range(40):
            k, data = random_key(), os.urandom(30 * KiB)
            store.put(k, data)
            made[k] = data
    finally:
        done.set()
        background.join(30)
    store.sync()
    assert_holds(case.open(), made)


# --- durability ---------------------------------------------------------------------------


def test_sync_then_reopen_gets_everything_back(case: StoreCase, store: ObjectStore) -> None:
    objects = {key(n): os.urandom(n * 1000 + 1) for n in range(10)}
    put_all(store, objects)
    store.sync()
    store.close()
    reopened = case.open()
    assert_holds(reopened, objects)
    reopened.delete_many([key(0), key(1)])
    reopened.delete(key(2))
    reopened.sync()
    reopened.close()
    assert_holds(
        case.open(), {k: v for k, v in objects.items() if k not in (key(0), key(1), key(2))}
    )


def test_a_crash_keeps_what_was_synced(case: StoreCase, store: ObjectStore) -> None:
    """The local semantics are those of test_storage.py (packs keep synced objects and
    reclaim the rest after a crash); a store durable on put keeps the rest too."""
    synced = {key(n): os.urandom(256 * KiB) for n in range(6)}
    put_all(store, synced)
    store.sync()
    unsynced = {key(n): os.urandom(256 * KiB) for n in range(6, 10)}
    put_all(store, unsynced)
    store.put(key(0), b"overwritten, not synced")

    after = case.crash_and_reopen()
    if case.durable_on_put:
        expected = {**synced, **unsynced, key(0): b"overwritten, not synced"}
    else:  # the unsynced puts are gone, the overwritten object is its synced version
        expected = synced
        for k in unsynced:
            assert not after.exists(k)
            with pytest.raises(FileNotFoundError):
                after.get(k)
    assert_holds(after, expected)

    reclaimed = after.reclaim_unmapped()  # at mount: the bytes of the lost puts go back
    if case.durable_on_put:
        assert reclaimed == 0
    else:
        assert reclaimed >= 4 * 256 * KiB
    assert_holds(after, expected)
    after.put(key(50), b"the next process writes on")
    after.sync()
    assert_holds(case.open(), {**expected, key(50): b"the next process writes on"})


def test_reclaim_unmapped_keeps_every_object(case: StoreCase, store: ObjectStore) -> None:
    objects = {key(n): os.urandom(300 * KiB) for n in range(8)}
    put_all(store, objects)
    store.sync()
    store.put(key(0), b"replaced")  # the old bytes are nobody's once this is synced
    store.sync()
    objects[key(0)] = b"replaced"
    store.close()
    reopened = case.open()
    # Not asserted > 0 for local: LocalBackend counts only the pack tails it truncates and
    # the packs it unlinks, not the holes it punches (the old bytes of key 0 here).
    assert reopened.reclaim_unmapped() >= 0
    assert_holds(reopened, objects)
    assert reopened.reclaim_unmapped() == 0  # nothing left to give back
    assert_holds(reopened, objects)


# --- interrupt, close, destroy ------------------------------------------------------------


def test_interrupt_then_a_later_call(case: StoreCase, store: ObjectStore) -> None:
    store.put(key(1), b"before")
    store.sync()
    store.interrupt()
    if case.interrupt_refuses_calls:
        assert store.interrupted
        with pytest.raises(BackendUnavailable):
            store.get(key(1))
        with pytest.raises(BackendUnavailable):
            store.put(key(2), b"after")
        store.sync()  # nothing to wait for: not refused
        assert_holds(case.open(), {key(1): b"before"})  # a new instance is not interrupted
    else:
        assert not store.interrupted
        store.put(key(2), b"after")
        store.sync()
        assert_holds(store, {key(1): b"before", key(2): b"after"})


def test_close_is_idempotent(case: StoreCase, store: ObjectStore) -> None:
    store.put(key(1), b"kept")
    store.sync()
    store.close()
    store.close()
    assert_holds(case.open(), {key(1): b"kept"})


def test_destroy_removes_every_object(case: StoreCase, store: ObjectStore) -> None:
    objects = {key(n): os.urandom(1000) for n in range(12)}
    put_all(store, objects)
    store.sync()
    store.destroy()
    assert list(case.open().keys()) == []
