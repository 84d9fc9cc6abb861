"""The store: one directory holding the catalogue of regions and each region's data.

Layout (format version 1)::

    STORE/
      store.db                  catalogue: meta (format, block size, clean flag), regions
      lock                      flock()ed by the daemon that has the store open; holds its pid
      snapfs.log                the daemon's log
      regions/<name>/index.db   the region's block index and snapshots (see index.py)
      regions/<name>/blocks/    the region's block objects (see backend.py, codec.py)

The `Store` object is the metadata service the FUSE layer talks to: it owns the namespace
(regions and snapshots by name and inode), the snapshot lifecycle (creating -> sealed
`available` on last close), and recovery after an unclean stop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils
import trio

from . import db as dbutil
from .cache import BlockCache
from .errors import (
    InvalidParameter,
    NotPermitted,
    RegionNotEmpty,
    RegionNotFound,
    Sealed,
    SnapfsError,
    StoreBusy,
    StoreFormat,
)
from .names import check_region_name, new_snapshot_id
from .region import Region
from .snapshots import AVAILABLE, CREATING, Snapshot, SnapshotWriter

log = logging.getLogger(__name__)

STORE_FORMAT = 1
ROOT_INO = 1
# 512 KiB, by measurement (scripts/bench --block-size, 2 GiB image, docs/ARCHITECTURE.md):
# ingest/read MB/s were 286/514 at 256 KiB, 422/908 at 512 KiB and 407/907 at 1 MiB, so
# 512 KiB is as fast as 1 MiB while finding 11% more of the image to be holes and halving
# the bytes a small scattered change costs. It is also EBS's direct-API block size.
DEFAULT_BLOCK_SIZE = 512 << 10
CACHE_BYTES = 64 << 20
WORKER_THREADS = 4


def default_store_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "snapfs"


def _v1(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE regions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            backend TEXT NOT NULL DEFAULT 'local'
        );
        """
    )


MIGRATIONS: list[dbutil.Migration] = [_v1]


@dataclass(eq=False)
class OpenFile:
    snap: Snapshot
    writable: bool


class Store:
    def __init__(self, path: Path, *, block_size: int | None = None):
        self.path = path.resolve()
        self.limiter = trio.CapacityLimiter(WORKER_THREADS)
        self.cache = BlockCache(CACHE_BYTES)
        self.regions: dict[str, Region] = {}
        self.by_ino: dict[int, Region | Snapshot] = {}
        self.nursery: trio.Nursery | None = None
        self.was_clean = True
        self._lock_fd: int | None = None
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock()
        try:
            self.db = dbutil.connect(self.path / "store.db")
            dbutil.migrate(self.db, MIGRATIONS, f"store {self.path}")
            self.block_size = self._settle_block_size(block_size)
            self.was_clean = dbutil.get_meta(self.db, "open", "0") == "0"
            with dbutil.transaction(self.db) as conn:
                dbutil.set_meta(conn, "open", "1")
            for row in self.db["regions"].rows_where(order_by="id"):
                self._load_region(row["name"], row["id"])
        except BaseException:
            self._unlock()
            raise

    # --- opening and closing ---------------------------------------------------------------

    def _lock(self) -> None:
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreBusy(f"store {self.path} is in use by pid {holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _settle_block_size(self, requested: int | None) -> int:
        stored = dbutil.get_meta(self.db, "block_size")
        fmt = dbutil.get_meta(self.db, "format")
        if fmt is not None and int(fmt) != STORE_FORMAT:
            raise StoreFormat(
                f"store {self.path} has format {fmt}, this snapfs reads {STORE_FORMAT}"
            )
        if stored is not None:
            if requested is not None and int(stored) != requested:
                raise InvalidParameter(
                    f"store {self.path} uses {stored}-byte blocks; the block size is fixed "
                    "when a store is created"
                )
            return int(stored)
        size = requested or DEFAULT_BLOCK_SIZE
        if size < 4096 or size > (16 << 20) or size & (size - 1):
            raise InvalidParameter("block size must be a power of two from 4 KiB to 16 MiB")
        with dbutil.transaction(self.db) as conn:
            dbutil.set_meta(conn, "format", str(STORE_FORMAT))
            dbutil.set_meta(conn, "block_size", str(size))
            dbutil.set_meta(conn, "created_at", str(time.time()))
        return size

    def _load_region(self, name: str, region_id: int) -> Region:
        region = Region(
            name,
            ROOT_INO + region_id,
            self.path / "regions" / name,
            self.block_size,
            self.limiter,
            self.cache,
        )
        self.regions[name] = region
        self.by_ino[region.ino] = region
        for row in region.index.snapshots(include_deleted=True):
            snap = Snapshot.from_row(row, region)
            if not snap.deleted:
                region.snapshots[snap.name] = snap
                self.by_ino[snap.ino] = snap
        return region

    async def recover(self) -> None:
        """Make the store consistent before serving: drop what an unclean stop left behind.

        - snapshots deleted while open, and snapshots still `creating` (their writers are
          gone; an unsealed snapshot never becomes visible as complete), are removed;
        - after an unclean stop, objects no index row names are deleted;
        - unreferenced blocks are collected.
        """
        for region in self.regions.values():
            for row in region.index.snapshots(include_deleted=True):
                if row["deleted"] or row["status"] == CREATING:
                    reason = "deleted while open" if row["deleted"] else "was still being written"
                    log.warning(
                        "region %s: removing snapshot %s (%s): it %s when snapfs stopped",
                        region.name,
                        row["name"],
                        row["id"],
                        reason,
                    )
                    region.index.delete_snapshot(row["id"])
                    snap = region.snapshots.get(row["name"])
                    if snap is not None and snap.id == row["id"]:
                        del region.snapshots[row["name"]]
                        self.by_ino.pop(snap.ino, None)
            if not self.was_clean:
                await region.collect_orphans()
            await region.collect_garbage()

    def start(self, nursery: trio.Nursery) -> None:
        """Start background work (garbage collectors) that lives as long as the mount."""
        self.nursery = nursery
        for region in self.regions.values():
            nursery.start_soon(region.gc_loop)

    async def shutdown(self) -> None:
        """Store what open writers buffered; their snapshots stay `creating` (see recover)."""
        for region in self.regions.values():
            for snap in list(region.snapshots.values()):
                if snap.writer is not None:
                    with contextlib.suppress(SnapfsError):
                        await snap.writer.flush()

    def close(self) -> None:
        for region in self.regions.values():
            region.close()
        with dbutil.transaction(self.db) as conn:
            dbutil.set_meta(conn, "open", "0")
        self.db.close()
        self._unlock()

    # --- lookups ---------------------------------------------------------------------------

    def region(self, name: str) -> Region:
        try:
            return self.regions[name]
        except KeyError:
            raise RegionNotFound(f"region {name!r} does not exist") from None

    def region_by_ino(self, ino: int) -> Region:
        node = self.by_ino.get(ino)
        if not isinstance(node, Region):
            raise NotPermitted("snapshots live in region directories, not here")
        return node

    def snapshot_by_ino(self, ino: int) -> Snapshot:
        node = self.by_ino.get(ino)
        if not isinstance(node, Snapshot):
            raise SnapfsError(
                "no such snapshot", code="InvalidSnapshotId.NotFound", errno=errno.ENOENT
            )
        return node

    # --- regions ---------------------------------------------------------------------------

    def create_region(self, name: str) -> Region:
        check_region_name(name)
        if name in self.regions:
            raise SnapfsError(
                f"region {name!r} already exists",
                code="InvalidRegionId.Duplicate",
                errno=errno.EEXIST,
            )
        directory = self.path / "regions" / name
        if directory.exists():  # left by an interrupted create or remove: nothing references it
            shutil.rmtree(directory)
        directory.mkdir(parents=True, mode=0o700)
        # The catalogue row is the commit point: a crash before it leaves only a directory.
        region_id = (
            self.db["regions"]
            .insert({"name": name, "created_at": time.time(), "backend": "local"})
            .last_pk
        )
        region = self._load_region(name, region_id)
        if self.nursery is not None:
            self.nursery.start_soon(region.gc_loop)
        log.info("created region %s", name)
        return region

    def remove_region(self, name: str) -> None:
        region = self.region(name)
        if region.snapshots or region.index.snapshots(include_deleted=True):
            raise RegionNotEmpty(f"region {name!r} still holds snapshots")
        self.db["regions"].delete_where("name = ?", [name])
        del self.regions[name]
        self.by_ino.pop(region.ino, None)
        region.close()
        shutil.rmtree(region.directory, ignore_errors=True)
        log.info("removed region %s", name)

    # --- snapshot lifecycle ----------------------------------------------------------------

    def create_snapshot(self, region: Region, name: str, mode: int, uid: int, gid: int) -> Snapshot:
        region.check_new_name(name)
        snap = Snapshot.new(new_snapshot_id(), name, region, mode, uid, gid)
        region.index.insert_snapshot(snap.to_row())
        region.snapshots[name] = snap
        self.by_ino[snap.ino] = snap
        log.info("region %s: creating snapshot %s (%s)", region.name, name, snap.id)
        return snap

    async def create_empty_snapshot(
        self, region: Region, name: str, mode: int, uid: int, gid: int
    ) -> Snapshot:
        """mknod(2): a snapshot nobody has open for writing is sealed as it stands."""
        snap = self.create_snapshot(region, name, mode, uid, gid)
        await self.release(self.open(snap, True))
        return snap

    def open(self, snap: Snapshot, writable: bool) -> OpenFile:
        if writable:
            if snap.sealed:
                raise Sealed(
                    f"snapshot {snap.name} ({snap.id}) is {snap.status}; "
                    "its content can no longer change"
                )
            if snap.writer is None:
                assert self.nursery is not None
                snap.writer = SnapshotWriter(snap, self.nursery)
            snap.writer.handles += 1
        snap.open_handles += 1
        return OpenFile(snap, writable)

    async def flush(self, handle: OpenFile) -> None:
        if handle.writable and handle.snap.writer is not None:
            await handle.snap.writer.flush()

    async def release(self, handle: OpenFile) -> None:
        snap = handle.snap
        snap.open_handles -= 1
        writer = snap.writer
        if handle.writable and writer is not None:
            writer.handles -= 1
            if writer.handles == 0 and not snap.deleted:
                await self._seal(snap)
        if snap.deleted and snap.open_handles == 0:
            await self._destroy(snap)

    async def _seal(self, snap: Snapshot) -> None:
        writer = snap.writer
        assert writer is not None
        if writer.is_flushed():
            # The close() before this release already stored everything (FUSE sends FLUSH on
            # every close). Seal without yielding, so that a request the kernel queued after
            # the release, like a getfattr right after `cp` returns, already sees `available`.
            snap.sealed_at = time.time()
            snap.region.index.update_snapshot(
                snap.id,
                status=AVAILABLE,
                sealed_at=snap.sealed_at,
                size=snap.size,
                mtime_ns=snap.mtime_ns,
                ctime_ns=snap.ctime_ns,
            )
            self._sealed(snap)
            return
        try:
            await writer.flush()
        except SnapfsError as exc:
            # The writer's close() already reported this; keep the snapshot writable-free but
            # unsealed so that it is removed at the next mount rather than sealed incomplete.
            log.error("snapshot %s (%s) not sealed: %s", snap.name, snap.id, exc)
            await writer.discard()
            snap.writer = None
            return
        snap.sealed_at = time.time()
        await writer.commit(status=AVAILABLE, sealed_at=snap.sealed_at)
        self._sealed(snap)

    def _sealed(self, snap: Snapshot) -> None:
        snap.status = AVAILABLE
        snap.writer = None
        log.info(
            "region %s: sealed snapshot %s (%s), %d bytes",
            snap.region.name,
            snap.name,
            snap.id,
            snap.size,
        )

    async def unlink(self, region: Region, name: str) -> None:
        snap = region.lookup(name)
        del region.snapshots[name]
        snap.deleted = True
        if snap.open_handles:
            region.index.update_snapshot(snap.id, deleted=1)
        else:
            await self._destroy(snap)

    async def _destroy(self, snap: Snapshot) -> None:
        if snap.writer is not None:
            await snap.writer.discard()
            snap.writer = None
        snap.region.index.delete_snapshot(snap.id)
        if self.by_ino.get(snap.ino) is snap:
            del self.by_ino[snap.ino]
        snap.region.request_gc()
        log.info("region %s: deleted snapshot %s (%s)", snap.region.name, snap.name, snap.id)

    async def rename(
        self, old_region: Region, old: str, new_region: Region, new: str, flags: int
    ) -> None:
        if old_region is not new_region:
            raise SnapfsError(
                "moving a snapshot between regions is a copy, not supported by rename yet",
                code="OperationDenied.CrossRegion",
                errno=errno.EXDEV,
            )
        displaced = old_region.rename(old, new, flags)
        if displaced is not None and displaced.open_handles == 0:
            await self._destroy(displaced)

    async def set_size(self, snap: Snapshot, size: int) -> None:
        if size < 0:
            raise InvalidParameter(f"size {size} is negative")
        if snap.sealed or snap.writer is None:
            if size == snap.size:
                return
            raise Sealed(
                f"snapshot {snap.name} ({snap.id}) is {snap.status}; its size can no longer change"
            )
        await snap.writer.truncate(size)

    def set_attrs(
        self,
        snap: Snapshot,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        """Metadata changes, allowed in every state (tar and rsync set them after writing)."""
        fields: dict[str, int] = {}
        if mode is not None:
            snap.mode = fields["mode"] = stat.S_IMODE(mode)
        if uid is not None:
            snap.uid = fields["uid"] = uid
        if gid is not None:
            snap.gid = fields["gid"] = gid
        if atime_ns is not None:
            snap.atime_ns = fields["atime_ns"] = atime_ns
        if mtime_ns is not None:
            snap.mtime_ns = fields["mtime_ns"] = mtime_ns
        snap.touch_ctime()
        fields["ctime_ns"] = snap.ctime_ns
        snap.region.index.update_snapshot(snap.id, **fields)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.path)
