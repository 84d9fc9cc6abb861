"""The store: one directory holding the catalogue of regions and each region's data.

Layout (format version 1)::

    STORE/
      store.db                  catalogue: meta (format, block size, clean flag), regions
                                (name, backend: 'local' or s3://BUCKET/PREFIX, endpoint), keys
      lock                      flock()ed by the daemon that has the store open; holds its pid
      snapfs.log                the daemon's log
      regions/<name>/index.db   the region's block index and snapshots (see index.py)
      regions/<name>/blocks/    a local region's block objects (see backend.py, codec.py);
                                a region on S3 keeps them in its bucket (s3backend.py)

The `Store` object is the metadata service the FUSE layer talks to: it owns the namespace
(regions and snapshots by name and inode), the snapshot lifecycle (creating -> sealed
`available` once its last writer has been gone for the settle period, or at once when something
needs it sealed), and recovery after an unclean stop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlite_utils
import trio

from snapfs import durable
from snapfs.blocks.cache import BlockCache
from snapfs.blocks.repository import PendingFrees
from snapfs.errors import (
    AlreadyExists,
    IndexDamaged,
    InvalidParameter,
    NotPermitted,
    NotReady,
    RegionNotEmpty,
    RegionNotFound,
    Sealed,
    SnapfsError,
    StoreBusy,
    StoreFormat,
    as_snapfs_error,
    from_sqlite,
)
from snapfs.faults import fault_point
from snapfs.meta import db as dbutil
from snapfs.meta.index import RegionIndex
from snapfs.meta.keys import KeyNotFound, KeyRing, unlock_master
from snapfs.model.clock import Clock
from snapfs.model.names import check_region_name, check_snapshot_filename, new_snapshot_id
from snapfs.model.states import SnapshotStatus
from snapfs.objects.local import LocalBackend
from snapfs.service.copyjobs import CopyEngine, CopyJob
from snapfs.service.region import RENAME_EXCHANGE, RENAME_NOREPLACE, Region
from snapfs.service.retention import retention_loop
from snapfs.service.snapshots import Snapshot, SnapshotWriter

if TYPE_CHECKING:
    from snapfs.objects.s3 import S3Location

log = logging.getLogger(__name__)

STORE_FORMAT = 1
ROOT_INO = 1
# 512 KiB, by measurement (scripts/bench --block-size, 2 GiB image, docs/ARCHITECTURE.md):
# ingest/read MB/s were 286/514 at 256 KiB, 422/908 at 512 KiB and 407/907 at 1 MiB, so
# 512 KiB is as fast as 1 MiB while finding 11% more of the image to be holes and halving
# the bytes a small scattered change costs. It is also EBS's direct-API block size.
DEFAULT_BLOCK_SIZE = 512 << 10
CACHE_BYTES = 64 << 20
PURGE_CHUNK = 512  # block-map rows deleted per transaction when a snapshot goes
PURGE_WAIT = 10.0  # how long rmdir of a region waits for its deleted snapshots' purge
WORKER_THREADS = 4
# Concurrent object-store requests (PUT/GET/DELETE) of the whole store: they wait on the
# network, not a core, so more run than WORKER_THREADS (s3backend.MAX_CONNECTIONS >= this).
REMOTE_IO_THREADS = 16
# Unmount: how long stopping copy jobs may wait on an object store's retries before they are
# interrupted, and how long unpublished manifests are waited for.
STOP_GRACE = 2.0
PUBLISH_GRACE = 30.0
# How long a snapshot whose last writer closed it waits before it seals (`--settle`). Tools
# that create a file, close it and open it again (qemu-img, mkfs, fio, truncate + dd, restic
# restore) reopen it within milliseconds (the daemon logs each gap at DEBUG; the tool tests
# saw at most a few ms); 5 s leaves room for a loaded machine and for scripts that run two
# tools one after the other, and nobody waits for it: whatever needs a snapshot sealed (a
# copy or move out of it, diff, a read of its computed attributes, `snapfs seal`, unmount)
# seals it at once.
DEFAULT_SETTLE = 5.0


def default_store_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "snapfs"


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


MIGRATIONS: list[dbutil.Migration] = [_v1, _v2, _v3]


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


@dataclass(eq=False)
class OpenFile:
    snap: Snapshot
    writable: bool
    pid: int = 0


class Store:
    def __init__(
        self,
        path: Path,
        *,
        block_size: int | None = None,
        copy_bandwidth_limit: int | None = None,
        clock: Clock | None = None,
        settle: float = DEFAULT_SETTLE,
    ):
        self.path = path.resolve()
        self.settle = settle
        self.clock = clock or Clock.from_environment()
        self.limiter = trio.CapacityLimiter(WORKER_THREADS)
        self.io_limiter = trio.CapacityLimiter(REMOTE_IO_THREADS)
        self.cache = BlockCache(CACHE_BYTES)
        self.frees = PendingFrees()  # shared by the regions: they share the store's disk
        self.regions: dict[str, Region] = {}
        self.damaged_regions: dict[str, str] = {}  # name -> why its index cannot be read
        self.by_ino: dict[int, Region | Snapshot] = {}
        # Every snapshot by id, including deleted ones kept while open or read by a copy.
        self.by_id: dict[str, Snapshot] = {}
        self.copies = CopyEngine(self, copy_bandwidth_limit)
        self._readers: dict[int, list[OpenFile]] = {}  # pid -> its read-only handles
        self._writers: set[Snapshot] = set()  # snapshots that had a writer (see _writing)
        # Set by the FUSE layer: tell the kernel to forget a cached name (parent ino, name).
        self.forget_entry: Callable[[int, str], None] = lambda parent, name: None
        self.nursery: trio.Nursery | None = None
        self.was_clean = True
        self._lock_fd: int | None = None
        durable.make_dirs(self.path)
        self._lock()
        try:
            self.db = open_catalogue(self.path)
            self.keys = KeyRing(self.path, self.db, unlock_master(self.path, self.db, create=False))
            self.block_size = self._settle_block_size(block_size)
            self.was_clean = dbutil.get_meta(self.db, "open", "0") == "0"
            with dbutil.transaction(self.db) as conn:
                dbutil.set_meta(conn, "open", "1")
            for row in self.db["regions"].rows_where(order_by="id"):
                self._load_region_if_readable(
                    row["name"], row["id"], row["backend"], row["endpoint"]
                )
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
        size = DEFAULT_BLOCK_SIZE if requested is None else requested
        if size < 4096 or size > (16 << 20) or size & (size - 1):
            raise InvalidParameter("block size must be a power of two from 4 KiB to 16 MiB")
        with dbutil.transaction(self.db) as conn:
            dbutil.set_meta(conn, "format", str(STORE_FORMAT))
            dbutil.set_meta(conn, "block_size", str(size))
            dbutil.set_meta(conn, "created_at", str(time.time()))
        return size

    def _load_region_if_readable(
        self, name: str, region_id: int, backend_url: str, endpoint: str | None
    ) -> None:
        """Load a region at mount; one whose index cannot be read is left out, logged, and
        kept out of the namespace's reach (mkdir of its name is refused, so its data is
        never replaced), while the other regions are served."""
        try:
            self._load_region(name, region_id, backend_url, endpoint)
        except sqlite3.DatabaseError as exc:
            error = from_sqlite(exc) or IndexDamaged(str(exc))
            self.damaged_regions[name] = str(error)
            log.error(
                "region %s is not served: its index is damaged (%s); run snapfs check", name, error
            )
        except (OSError, ValueError) as exc:
            # One region's unreadable files must not take the whole store down with it.
            self.damaged_regions[name] = f"{type(exc).__name__}: {exc}"
            log.error(
                "region %s is not served: its files cannot be read (%s: %s); run snapfs check",
                name,
                type(exc).__name__,
                exc,
            )

    def _load_region(
        self, name: str, region_id: int, backend_url: str = "local", endpoint: str | None = None
    ) -> Region:
        backend = None
        if backend_url != "local":
            from snapfs.objects.s3 import S3Backend, S3Location

            backend = S3Backend(S3Location.parse(backend_url, endpoint), "blocks/")
        region = Region(
            name,
            ROOT_INO + region_id,
            self.path / "regions" / name,
            self.block_size,
            self.limiter,
            self.cache,
            self.keys,
            backend=backend,
            io_limiter=self.io_limiter,
            frees=self.frees,
        )
        if backend is not None:
            from snapfs.service.manifests import ManifestPublisher

            region.publisher = ManifestPublisher(region, backend.sibling("meta/"), self.block_size)
            region.index.on_change = region.publisher.changed
        try:
            rows = region.index.snapshots(include_deleted=True)
        except BaseException:
            region.close()
            raise
        self.regions[name] = region
        self.by_ino[region.ino] = region
        for row in rows:
            snap = Snapshot.from_row(row, region)
            self.by_id[snap.id] = snap
            if not snap.deleted:
                region.snapshots[snap.name] = snap
                self.by_ino[snap.ino] = snap
        return region

    async def recover(self) -> None:
        """Make the store consistent before serving, and queue the copy jobs to resume.

        - snapshots deleted while open, and snapshots still `creating` (their writers are
          gone; an unsealed snapshot never becomes visible as complete), are removed, as
          are `cp` copies that were still being written; a deleted snapshot that an
          unfinished copy job reads from is kept until the job is done;
        - but a snapshot whose last writer had closed it, everything committed and nothing
          written since (the close mark, see SnapshotWriter.flush), is sealed: the daemon
          died between the close that `cp` saw succeed and the release that seals;
        - after an unclean stop, objects no index row names are deleted;
        - unreferenced blocks are collected.
        """
        rows = {
            region: region.index.snapshots(include_deleted=True) for region in self.regions.values()
        }
        deleted = {
            row["id"] for region_rows in rows.values() for row in region_rows if row["deleted"]
        }
        # A job whose destination was deleted while open is abandoned with it.
        jobs = [
            (region, row)
            for region in self.regions.values()
            for row in region.index.copy_jobs()
            if row["dst_snapshot_id"] not in deleted
        ]
        job_targets = {row["dst_snapshot_id"] for _, row in jobs}
        job_sources = {row["src_snapshot_id"] for _, row in jobs}
        for region, region_rows in rows.items():
            for row in region_rows:
                if row["id"] in job_targets or (row["deleted"] and row["id"] in job_sources):
                    continue
                if row["deleted"]:
                    reason = "was deleted while open"
                elif (
                    row["status"] in (SnapshotStatus.CREATING, SnapshotStatus.COPYING)
                    and row["sealed_at"] is not None
                ):
                    self._seal_closed(region, row)
                    continue
                elif row["status"] in (SnapshotStatus.CREATING, SnapshotStatus.COPYING):
                    reason = "was still being written"
                else:
                    continue
                log.warning(
                    "region %s: removing snapshot %s (%s): it %s when snapfs stopped",
                    region.name,
                    row["name"],
                    row["id"],
                    reason,
                )
                region.index.delete_snapshot(row["id"])
                fault_point("recover_removed")
                snap = self.by_id.pop(row["id"], None)
                if snap is not None and not snap.deleted:
                    del region.snapshots[snap.name]
                    self.by_ino.pop(snap.ino, None)
        for region, row in jobs:
            self._resume_job(region, row)
        for region in self.regions.values():
            if region.publisher is not None:
                # Cheap insurance that the bucket can rebuild the region: a stop may have
                # come between a change and its upload (done in the background).
                region.publisher.republish_all()
            if not self.was_clean:
                await region.collect_orphans()
            await region.collect_garbage()

    def _seal_closed(self, region: Region, row: dict) -> None:
        """Seal, at mount, a snapshot that was complete at its last close. A `cp` copy keeps
        its lineage if its block map is its source's, as its seal would have decided."""
        snap = self.by_id[row["id"]]
        source = self.by_id.get(row["source_snapshot_id"] or "")
        exact_copy = (
            row["status"] == SnapshotStatus.COPYING
            and source is not None
            and source.status == SnapshotStatus.AVAILABLE
            and source.size == snap.size
            and source.kms_key_id == snap.kms_key_id
            and maps_equal(source, snap)
        )
        lineage = (
            _lineage(snap)
            if exact_copy or row["status"] == SnapshotStatus.CREATING
            else _NO_LINEAGE
        )
        region.index.update_snapshot(
            snap.id, status=SnapshotStatus.AVAILABLE, sealed_at=row["sealed_at"], **lineage
        )
        snap.become(SnapshotStatus.AVAILABLE, sealed_at=row["sealed_at"])
        for name, value in lineage.items():
            setattr(snap, name, value)
        log.warning(
            "region %s: sealed snapshot %s (%s) at mount: it was complete at its last close "
            "when snapfs stopped%s",
            region.name,
            snap.name,
            snap.id,
            f", a copy of {snap.source_snapshot_id}" if snap.source_snapshot_id else "",
        )

    def _resume_job(self, region: Region, row: dict) -> None:
        source = self.by_id.get(row["src_snapshot_id"])
        if source is not None and row["kind"] == "move" and not source.deleted:
            self._hide(source)  # the stop came between the job's commit and hiding the source
        job = CopyJob(
            dst=self.by_id[row["dst_snapshot_id"]],
            src_region=row["src_region"],
            src_snapshot_id=row["src_snapshot_id"],
            kind=row["kind"],
            next_block=row["next_block"],
            done_blocks=row["done_blocks"],
            total_blocks=row["total_blocks"],
            created_at=row["created_at"],
            source=source,
            verify_below=0 if self.was_clean else row["next_block"],
        )
        if source is not None:
            source.copy_readers += 1
        self.copies.add(job)

    def start(self, nursery: trio.Nursery) -> None:
        """Start background work (garbage collectors, copy jobs) that lives with the mount."""
        self.nursery = nursery
        for region in self.regions.values():
            self._start_region(region)
        self.copies.start(nursery)
        nursery.start_soon(retention_loop, self, self.clock)

    def _start_region(self, region: Region) -> None:
        if self.nursery is None:
            return
        self.nursery.start_soon(region.gc_loop)
        if region.publisher is not None:
            self.nursery.start_soon(region.publisher.run)

    async def shutdown(self) -> None:
        """Stop copy jobs where they are (they resume at the next mount), store what open
        writers buffered (their snapshots stay `creating`, see recover) and seal the
        snapshots waiting out their settle period. Manifests still to
        publish get a while; an object store that does not answer is then given up on (its
        retries interrupted) rather than holding the unmount."""
        with trio.move_on_after(STOP_GRACE) as waited:
            await self.copies.stop_all()
        if waited.cancelled_caught:
            self._interrupt_backends()  # jobs waiting on a dead server's retries
            await self.copies.stop_all()
        for region in self.regions.values():
            for snap in list(region.snapshots.values()):
                if snap.writer is not None:
                    with contextlib.suppress(SnapfsError):
                        await snap.writer.flush()
                    await self.seal_settling(snap, quiet=True)  # unmount seals what is closed
        for region in self.regions.values():
            publisher = region.publisher
            if publisher is not None and not await publisher.drain(PUBLISH_GRACE):
                log.warning(
                    "region %s: manifests not all published; they are at the next mount",
                    region.name,
                )
        self._interrupt_backends()

    def _interrupt_backends(self) -> None:
        for region in self.regions.values():
            region.backend.interrupt()

    def close(self, *, clean: bool = True) -> None:
        """Close the indexes; `clean` (the daemon shut down normally) spares the next mount
        the scan for orphaned objects."""
        for region in self.regions.values():
            region.close()
        with dbutil.transaction(self.db) as conn:
            dbutil.set_meta(conn, "open", "0" if clean else "1")
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

    def _check_new_region(self, name: str) -> None:
        check_region_name(name)
        if name in self.damaged_regions:
            raise IndexDamaged(
                f"region {name!r} exists but is not served: {self.damaged_regions[name]}"
            )
        if name in self.regions:
            raise SnapfsError(
                f"region {name!r} already exists",
                code="InvalidRegionId.Duplicate",
                errno=errno.EEXIST,
            )

    def _region_directory(self, name: str) -> Path:
        directory = self.path / "regions" / name
        if directory.exists():  # left by an interrupted create or remove: nothing references it
            shutil.rmtree(directory)
        durable.make_dirs(directory)
        return directory

    def _register_region(
        self, name: str, backend_url: str = "local", endpoint: str | None = None
    ) -> Region:
        # The catalogue row is the commit point: a crash or power loss before it leaves only
        # a directory, so everything the row will name (index, block store, layout marker,
        # their folders) is made durable first.
        directory = self.path / "regions" / name
        RegionIndex(directory / "index.db").close()
        if backend_url == "local":
            LocalBackend(directory / "blocks").close()
        durable.sync_tree(directory)
        row = {"name": name, "created_at": time.time(), "backend": backend_url}
        row["endpoint"] = endpoint
        region_id = self.db["regions"].insert(row).last_pk
        region = self._load_region(name, region_id, backend_url, endpoint)
        self._start_region(region)
        return region

    def create_region(self, name: str) -> Region:
        """A local region (mkdir)."""
        self._check_new_region(name)
        self._region_directory(name)
        region = self._register_region(name)
        log.info("created region %s", name)
        return region

    async def create_remote_region(self, name: str, location: S3Location) -> Region:
        """A region in a bucket (`snapfs region create --backend s3://...`): the bucket is
        created if missing; a prefix that already holds a region is refused (attach it)."""
        from snapfs.service import regionadmin

        self._check_new_region(name)
        await trio.to_thread.run_sync(
            regionadmin.claim_location, location, name, self.block_size, limiter=self.io_limiter
        )
        self._check_new_region(name)  # another create may have won meanwhile
        self._region_directory(name)
        region = self._register_region(name, location.url, location.endpoint)
        if region.publisher is not None:
            region.publisher.changed(None)
        log.info("created region %s on %s", name, location)
        return region

    async def attach_region(self, name: str, location: S3Location) -> Any:
        """Disaster recovery: rebuild a region and its snapshots from its bucket alone."""
        from snapfs.service import regionadmin

        self._check_new_region(name)
        directory = self._region_directory(name)
        if self.keys is not None:
            self.keys.prime()  # encrypted manifests are opened in a worker thread
        try:
            report = await trio.to_thread.run_sync(
                regionadmin.rebuild_from_bucket,
                location,
                name,
                self.block_size,
                directory / "index.db",
                self.keys,
                limiter=self.io_limiter,
            )
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self._check_new_region(name)
        region = self._register_region(name, location.url, location.endpoint)
        if region.publisher is not None:
            region.publisher.changed(None)
        log.info(
            "attached region %s from %s: %d snapshots restored, %d skipped",
            name,
            location,
            len(report.restored),
            len(report.skipped),
        )
        for reason in report.skipped:
            log.warning("region %s: not restored: %s", name, reason)
        return report

    async def remove_region(self, name: str) -> None:
        region = self.region(name)
        # `rm REGION/*; rmdir REGION`: what rm deleted is purged in the background; wait for
        # that (bounded), but not for a deleted snapshot a copy still reads from.
        with trio.move_on_after(PURGE_WAIT):
            while not region.snapshots and any(
                row["id"] not in self.by_id for row in region.index.snapshots(include_deleted=True)
            ):
                await trio.sleep(0.02)
        if region.snapshots or region.index.snapshots(include_deleted=True):
            raise RegionNotEmpty(f"region {name!r} still holds snapshots")
        self.db["regions"].delete_where("name = ?", [name])
        del self.regions[name]
        self.by_ino.pop(region.ino, None)
        region.close()  # also ends its collector task
        shutil.rmtree(region.directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            durable.fsync_dir(region.directory.parent)  # not resurrected by a power loss
        if region.remote and self.nursery is not None:
            self.nursery.start_soon(self._destroy_remote, region)
        log.info("removed region %s", name)

    async def _destroy_remote(self, region: Region) -> None:
        """An empty region's bucket prefix still holds its metadata (and maybe garbage)."""
        try:
            await trio.to_thread.run_sync(
                region.publisher.meta.destroy if region.publisher else region.backend.destroy,
                limiter=self.io_limiter,
            )
            await trio.to_thread.run_sync(region.backend.destroy, limiter=self.io_limiter)
        except Exception as exc:  # noqa: BLE001 - the region is gone; leftovers are harmless
            log.warning("region %s: removing its objects failed: %s", region.name, exc)

    # --- snapshot lifecycle ----------------------------------------------------------------

    async def create_snapshot(
        self, region: Region, name: str, mode: int, uid: int, gid: int, pid: int = 0
    ) -> Snapshot:
        """A new `creating` snapshot. If the creating process has a snapshot open for
        reading that nobody writes (`cp SRC DST`), that one is sealed now if it was settling
        and the new one is provisionally a copy of it (`copying`); the written blocks must
        then match the source's, or it becomes an ordinary snapshot."""
        region.check_new_name(name)
        region.check_quota()
        source = await self._source_read_by(pid)
        region.check_new_name(name)  # sealing the source yielded: look again
        snap = Snapshot.new(new_snapshot_id(), name, region, mode, uid, gid)
        snap.kms_key_id = region.default_key()
        snap.encrypted = snap.kms_key_id is not None
        if source is not None and source.encrypted and not snap.encrypted:
            # Decrypting is only ever done when asked (`snapfs copy --decrypt`): the bytes a
            # reader wrote into a plain region make an ordinary snapshot, not a copy.
            log.info(
                "region %s: %s is written from encrypted %s/%s into a plain region: an "
                "ordinary snapshot, not a copy",
                region.name,
                name,
                source.region.name,
                source.name,
            )
            source = None
        if source is not None:
            snap.become(SnapshotStatus.COPYING)
            snap.copy_source = source
            snap.source_snapshot_id, snap.source_region = source.id, source.region.name
            snap.description = source.description
            source.copy_readers += 1
        region.index.insert_snapshot(snap.to_row())
        self._add(snap)
        if source is not None:
            log.info(
                "region %s: snapshot %s (%s) is being written as a copy of %s/%s (%s)",
                region.name,
                name,
                snap.id,
                source.region.name,
                source.name,
                source.id,
            )
        else:
            log.info("region %s: creating snapshot %s (%s)", region.name, name, snap.id)
        return snap

    def _add(self, snap: Snapshot) -> None:
        snap.region.snapshots[snap.name] = snap
        self.by_ino[snap.ino] = snap
        self.by_id[snap.id] = snap

    async def _source_read_by(self, pid: int) -> Snapshot | None:
        for handle in reversed(self._readers.get(pid, [])):
            snap = handle.snap
            if snap.deleted:
                continue
            await self.seal_settling(snap, quiet=True)  # a copy out of it needs it sealed
            if snap.status == SnapshotStatus.AVAILABLE and snap.sealed:
                return snap
        return None

    def _reading(self) -> set[Snapshot]:
        """Snapshots some process has open for reading now."""
        return {handle.snap for handles in self._readers.values() for handle in handles}

    async def create_empty_snapshot(
        self, region: Region, name: str, mode: int, uid: int, gid: int
    ) -> Snapshot:
        """mknod(2): a snapshot nobody has open for writing; it settles like a closed one."""
        snap = await self.create_snapshot(region, name, mode, uid, gid)
        handle = self.open(snap, True)
        assert snap.writer is not None
        snap.writer.mark_closed()  # created and complete: a crash keeps it (no FLUSH comes)
        await self.release(handle)
        return snap

    def open(self, snap: Snapshot, writable: bool, pid: int = 0) -> OpenFile:
        if writable:
            if snap.writer is not None and snap.writer.sealing:
                raise NotReady(f"snapshot {snap.name} ({snap.id}) is being sealed")
            if snap.sealed:
                raise Sealed(
                    f"snapshot {snap.name} ({snap.id}) is {snap.status}; "
                    "its content can no longer change"
                )
            if snap.writer is None:
                assert self.nursery is not None
                snap.writer = SnapshotWriter(
                    snap, self.nursery, self.not_a_copy, self.copies.bandwidth_limit
                )
                # Lineage however the copy arrives: what is being read while this is
                # written may be what it is a copy of (see _lineage_by_content).
                snap.writer.read_meanwhile |= self._reading() - {snap}
                self._writers.add(snap)
            snap.writer.reopened()
        snap.open_handles += 1
        handle = OpenFile(snap, writable, pid)
        if not writable and pid:
            self._readers.setdefault(pid, []).append(handle)
            for other in self._writing():
                if other is not snap:
                    other.writer.read_meanwhile.add(snap)  # type: ignore[union-attr]
        return handle

    def _writing(self) -> list[Snapshot]:
        """Snapshots with a writer (open, or settling); forgets those sealed or gone."""
        self._writers = {snap for snap in self._writers if snap.writer is not None}
        return list(self._writers)

    async def flush(self, handle: OpenFile, *, closing: bool = False) -> None:
        """fsync, or (`closing`) the close of a file descriptor."""
        if handle.writable and handle.snap.writer is not None:
            await handle.snap.writer.flush(closing=closing)

    async def release(self, handle: OpenFile) -> None:
        snap = handle.snap
        snap.open_handles -= 1
        if not handle.writable and handle.pid:
            readers = self._readers.get(handle.pid, [])
            if handle in readers:
                readers.remove(handle)
            if not readers:
                self._readers.pop(handle.pid, None)
        writer = snap.writer
        if handle.writable and writer is not None:
            writer.handles -= 1
            if writer.handles == 0 and not snap.deleted:
                await self._settle(snap, writer)
        if snap.deleted and not snap.in_use:
            await self._destroy(snap)

    async def _settle(self, snap: Snapshot, writer: SnapshotWriter) -> None:
        """The last writer closed it: seal it once nobody has reopened it for `settle`
        seconds, so that tools which close a file and open it again simply continue."""
        generation = writer.closed()
        assert self.nursery is not None  # a writer exists only in a mount
        self.nursery.start_soon(
            self._seal_if_idle, snap, writer, generation, name=f"settle {snap.id}"
        )

    async def _seal_if_idle(
        self, snap: Snapshot, writer: SnapshotWriter, generation: int, delay: float | None = None
    ) -> None:
        await trio.sleep(self.settle if delay is None else delay)
        if snap.writer is not writer or not writer.idle(generation) or snap.deleted:
            return
        if writer.sealing:  # a request is sealing it; a failure there schedules the retry
            return
        with contextlib.suppress(SnapfsError):  # logged, and retried (see _seal)
            await self._seal(snap)

    async def seal_settling(
        self, snap: Snapshot, *, wait: bool = True, quiet: bool = False
    ) -> None:
        """Seal now a snapshot that waits out its settle period: something needs it sealed
        (a copy or move out of it, a read of its computed attributes, diff, unmount). One
        that a writer has open stays `creating`. One that is being sealed already is waited
        for, unless not `wait` (a seal looking for its source must not wait for a seal that
        may be looking at it). A seal that cannot commit (a full disk) leaves it `creating`
        and raises, unless `quiet` (the caller then sees it as it is)."""
        writer = snap.writer
        if writer is None or snap.deleted or writer.handles > 0:
            return
        if writer.sealing:
            if wait:
                await writer.seal_tried.wait()  # another request is sealing it: its outcome
            return
        try:
            await self._seal(snap)
        except SnapfsError:
            if not quiet:
                raise

    async def seal(self, snap: Snapshot) -> None:
        """`snapfs seal PATH`: seal a `creating` snapshot now."""
        if snap.writer is not None and snap.writer.handles > 0:
            raise NotReady(f"snapshot {snap.name} ({snap.id}) is open for writing; close it first")
        await self.seal_settling(snap)
        if snap.writer is not None and not snap.deleted:
            raise NotReady(f"snapshot {snap.name} ({snap.id}) could not be sealed yet; see the log")
        if snap.status == SnapshotStatus.FAILED:
            raise SnapfsError(
                f"snapshot {snap.name} ({snap.id}) could not be sealed: {snap.error}",
                code="InvalidSnapshot.Failed",
                errno=errno.EIO,
            )

    async def _seal(self, snap: Snapshot) -> None:
        writer = snap.writer
        assert writer is not None
        writer.sealing = True  # no new writer may join while the last data is stored
        try:
            await self._seal_writer(snap, writer)
        except SnapfsError:
            # Complete but not sealed (a full index): try again while nobody writes it.
            assert self.nursery is not None
            self.nursery.start_soon(
                self._seal_if_idle, snap, writer, writer.generation, max(self.settle, 1.0),
                name=f"settle {snap.id}",
            )  # fmt: skip
            raise
        finally:
            writer.sealing = False
            tried, writer.seal_tried = writer.seal_tried, trio.Event()
            tried.set()

    async def _seal_writer(self, snap: Snapshot, writer: SnapshotWriter) -> None:
        """Seal, or fail a snapshot whose data could not be stored; a snapshot whose data
        is all committed but whose seal cannot be (its index is full) stays `creating`,
        with its close mark, and the error is raised."""
        try:
            if not writer.is_flushed():
                await writer.flush()
                if snap.deleted:  # unlinked while we waited: release() destroys it
                    return
                writer.mark_closed()  # complete: a crash from here on keeps it
        except Exception as exc:  # noqa: BLE001 - the data is not all stored: failed
            await self._fail_creation(snap, as_snapfs_error(exc))
            return
        try:
            found = await self._lineage_by_content(snap, writer) if not snap.copy_source else None
            fault_point("seal")
            # Every await is behind us: from this check to the commit nothing can change it.
            if not writer.idle(writer.generation) or snap.writer is not writer or snap.deleted:
                return  # written, truncated or deleted meanwhile: its next close settles it
            if not writer.is_flushed():
                return  # ditto (a truncate by path came in between)
            # The index first: memory changes only once the seal is durable.
            exact_copy = self._is_exact_copy(snap)
            if found is not None:
                lineage = found
            elif exact_copy or snap.copy_source is None:
                lineage = _lineage(snap)
            else:
                lineage = _NO_LINEAGE
            sealed_at = time.time()
            snap.region.index.update_snapshot(
                snap.id,
                status=SnapshotStatus.AVAILABLE,
                sealed_at=sealed_at,
                size=snap.size,
                mtime_ns=snap.mtime_ns,
                ctime_ns=snap.ctime_ns,
                **lineage,
            )
        except Exception as exc:  # noqa: BLE001 - a full or failing index: retried
            error = as_snapfs_error(exc)
            log.warning(
                "region %s: snapshot %s (%s) is complete but not sealed yet: %s",
                snap.region.name,
                snap.name,
                snap.id,
                error,
            )
            raise error from None
        self._end_cp_copy(snap, keep_lineage=exact_copy)
        for name, value in lineage.items():
            setattr(snap, name, value)
        snap.sealed_at = sealed_at
        snap.become(SnapshotStatus.AVAILABLE)
        snap.writer = None
        log.info(
            "region %s: sealed snapshot %s (%s), %d bytes%s%s",
            snap.region.name,
            snap.name,
            snap.id,
            snap.size,
            f", a copy of {snap.source_snapshot_id}" if snap.source_snapshot_id else "",
            f"; reopened {writer.reopens} times within its settle period, at most "
            f"{writer.longest_reopen_gap:.3f} s after a close"
            if writer.reopens
            else "",
        )

    async def _fail_creation(self, snap: Snapshot, error: SnapfsError) -> None:
        """A snapshot that could not be completed (the store is full, its index failed):
        `failed`, with the reason in user.snapfs.error, so that a reader gets EIO, never
        zeros in place of blocks that were written but not stored. close() already reported
        the error to the writer. Like a failed copy it stays until deleted."""
        log.error("snapshot %s (%s) not sealed: %s", snap.name, snap.id, error)
        if snap.writer is not None:
            await snap.writer.discard()
            snap.writer = None
        self._end_cp_copy(snap, keep_lineage=False)
        snap.become(SnapshotStatus.FAILED, error=str(error))
        try:
            snap.region.index.update_snapshot(
                snap.id, status=SnapshotStatus.FAILED, error=snap.error
            )
        except Exception as exc:  # noqa: BLE001 - still `creating` on disk: removed at mount
            log.error("snapshot %s (%s): its failure is not recorded: %s", snap.name, snap.id,
                      as_snapfs_error(exc))  # fmt: skip

    async def _lineage_by_content(
        self, snap: Snapshot, writer: SnapshotWriter
    ) -> dict[str, object] | None:
        """A snapshot written by other processes than the reader of its source (rsync's
        sender and receiver, `restic dump`, a pipe) is still a copy when its final block
        map equals that of a snapshot in another region that was open for reading while it
        was written, under the same key or both plain: the lineage to record, or None.

        A candidate that is still settling counts only if its map is final as it stands
        (no writer, all committed) and equal; it is then sealed (a copy out of it needs
        that), so an unrelated image of the same size is never sealed by this."""
        for source in sorted(writer.read_meanwhile, key=lambda s: s.created_at, reverse=True):
            if (
                source.region is snap.region
                or source.deleted
                or source.size != snap.size
                or source.kms_key_id != snap.kms_key_id
                or source.status not in (SnapshotStatus.AVAILABLE, SnapshotStatus.CREATING)
                or source.copy_source is not None
            ):
                continue
            settling = source.writer
            if settling is not None and (
                settling.handles or settling.sealing or not settling.is_flushed()
            ):
                continue
            if source.allocated_blocks != snap.allocated_blocks or not maps_equal(source, snap):
                continue
            if settling is not None:
                await self.seal_settling(source, wait=False, quiet=True)
                if snap.deleted or snap.writer is not writer:
                    return None
            if source.status != SnapshotStatus.AVAILABLE or not source.sealed:
                continue
            log.info(
                "region %s: %s (%s) holds exactly %s/%s (%s), read while it was written: "
                "recorded as its copy",
                snap.region.name,
                snap.name,
                snap.id,
                source.region.name,
                source.name,
                source.id,
            )
            return {
                "source_snapshot_id": source.id,
                "source_region": source.region.name,
                "description": snap.description or source.description,
                "transferred_bytes": writer.written_bytes,
            }
        return None

    def _is_exact_copy(self, snap: Snapshot) -> bool:
        source = snap.copy_source
        if source is None or snap.status != SnapshotStatus.COPYING or source.size != snap.size:
            return False
        if source.kms_key_id == snap.kms_key_id:
            return maps_equal(source, snap)
        # Different keys give the same content different ids: every source block must have
        # been matched by content, and nothing else written.
        return (
            len(snap.copy_matched)
            == source.allocated_blocks
            == snap.region.index.allocated_blocks(snap.id)
        )

    def _end_cp_copy(self, snap: Snapshot, *, keep_lineage: bool) -> None:
        """A `cp` copy is over: keep its lineage if it matched, release the source."""
        source = snap.copy_source
        if source is None:
            return
        snap.copy_source = None
        if not keep_lineage:
            snap.source_snapshot_id = snap.source_region = snap.description = None
            snap.transferred_bytes = 0
        self._release_source(source)

    def not_a_copy(self, snap: Snapshot, reason: str) -> None:
        """The writer found a block that differs from the source: an ordinary snapshot."""
        log.info(
            "region %s: %s (%s) is not a copy of %s: %s",
            snap.region.name,
            snap.name,
            snap.id,
            snap.source_snapshot_id,
            reason,
        )
        snap.become(SnapshotStatus.CREATING)
        self._end_cp_copy(snap, keep_lineage=False)

    def _release_source(self, source: Snapshot) -> None:
        source.copy_readers -= 1
        if source.deleted and not source.in_use:
            self._drop(source)

    # --- deleting and renaming -------------------------------------------------------------

    def _hide(self, snap: Snapshot) -> None:
        """Take a snapshot out of its region's namespace; its data stays while in use."""
        snap.region.index.update_snapshot(snap.id, deleted=1)  # first: it may fail (disk full)
        if snap.region.snapshots.get(snap.name) is snap:
            del snap.region.snapshots[snap.name]
        snap.deleted = True
        if not snap.open_handles and self.by_ino.get(snap.ino) is snap:
            del self.by_ino[snap.ino]

    async def unlink(self, region: Region, name: str) -> None:
        snap = region.lookup(name)
        await self._cancel_copy(snap, "deletion")  # deleting a copy's destination cancels it
        if snap.in_use:
            self._hide(snap)
        else:
            await self._destroy(snap)  # the index first: a failed delete leaves the name
            del region.snapshots[name]
            snap.deleted = True

    async def _destroy(self, snap: Snapshot) -> None:
        if snap.writer is not None:
            await snap.writer.discard()
            snap.writer = None
        self._end_cp_copy(snap, keep_lineage=False)
        self._drop(snap)

    def _drop(self, snap: Snapshot) -> None:
        """Delete a snapshot that nothing uses any more; its unshared blocks are collected.

        It is marked deleted at once (one small commit); its block map then goes a chunk at
        a time in a background task, so deleting a multi-terabyte snapshot (millions of map
        rows) does not stall requests. A crash meanwhile leaves it marked deleted, and the
        next mount's recovery finishes the job.
        """
        if not snap.deleted:
            snap.region.index.update_snapshot(snap.id, deleted=1)
            snap.deleted = True
        for ino in (snap.ino, *snap.inode_aliases):
            if self.by_ino.get(ino) is snap:
                del self.by_ino[ino]
        self.by_id.pop(snap.id, None)
        if self.nursery is None:
            snap.region.index.delete_snapshot(snap.id)
            snap.region.request_gc()
        else:
            self.frees.begin()  # a writer on a full disk waits for what this frees
            self.nursery.start_soon(self._purge, snap)

    async def _purge(self, snap: Snapshot) -> None:
        index = snap.region.index
        try:
            while index.delete_map_chunk(snap.id, PURGE_CHUNK) == PURGE_CHUNK:
                fault_point("purge_chunk")
                snap.region.request_gc()
                await trio.sleep(0)  # let requests in between chunks
            index.delete_snapshot(snap.id)
        except Exception:  # noqa: BLE001 - left marked deleted; the next mount finishes it
            log.exception("region %s: deleting snapshot %s failed", snap.region.name, snap.id)
            return
        finally:
            snap.region.request_gc()  # before `end`: the frees stay pending until collected
            self.frees.end()
        log.info("region %s: deleted snapshot %s (%s)", snap.region.name, snap.name, snap.id)

    async def rename(
        self, old_region: Region, old: str, new_region: Region, new: str, flags: int
    ) -> None:
        if old_region is not new_region:
            await self.move_snapshot(old_region, old, new_region, new, flags)
            return
        displaced = old_region.rename(old, new, flags)
        if displaced is not None:
            await self._displaced(displaced)

    async def _displaced(self, snap: Snapshot) -> None:
        """A snapshot replaced by a rename: gone from the namespace, deleted when unused."""
        await self._cancel_copy(snap, "replacement by a rename")
        if not snap.in_use:
            await self._destroy(snap)

    # --- copies ----------------------------------------------------------------------------

    async def move_snapshot(
        self, src_region: Region, name: str, dst_region: Region, new_name: str, flags: int
    ) -> Snapshot:
        """`mv` across regions: the destination appears at once as `copying`, the source
        name disappears at once, a job transfers the missing blocks in the background."""
        if flags & RENAME_EXCHANGE:
            raise InvalidParameter("snapshots in different regions cannot be exchanged")
        source = await self._sealed_source(src_region, name)
        displaced = dst_region.snapshots.get(new_name)
        if displaced is not None and flags & RENAME_NOREPLACE:
            raise AlreadyExists(f"snapshot {new_name!r} already exists in region {dst_region.name}")
        dst = self._start_copy(
            source,
            dst_region,
            new_name,
            kind="move",
            replace=displaced,
            description=source.description,
            retention_days=source.retention_days,
            tags={},
        )
        fault_point("move_inserted")
        self._hide(source)
        # The kernel moves its dentry and inode (the source's) to the new name: until it
        # looks the name up again, the source's inode number must mean the destination, as
        # the moved file would on any filesystem. Processes that still have the source open
        # keep reading it through their handles, which name the snapshot, not the inode.
        self.by_ino[source.ino] = dst
        dst.inode_aliases.append(source.ino)
        self.forget_entry(dst_region.ino, new_name)
        if displaced is not None:
            displaced.deleted = True
            await self._displaced(displaced)
        return dst

    async def _sealed_source(self, region: Region, name: str) -> Snapshot:
        """The snapshot a copy or move starts from, sealed now if it was settling."""
        await self.seal_settling(region.lookup(name))
        return region.lookup(name)  # sealing yielded: whatever the name means now

    async def copy_snapshot(
        self,
        src_region: Region,
        name: str,
        dst_region: Region,
        new_name: str,
        *,
        description: str | None = None,
        retention_days: int | None = None,
        tags: dict[str, str] | None = None,
        encrypted: bool | None = None,
        kms_key_id: str | None = None,
    ) -> Snapshot:
        """The CopySnapshot API (`snapfs copy`): a new snapshot, filled by a job. The
        description is the source's unless one is given; tags are only those given."""
        source = await self._sealed_source(src_region, name)
        return self._start_copy(
            source,
            dst_region,
            new_name,
            kind="copy",
            replace=None,
            description=source.description if description is None else description,
            retention_days=retention_days,
            tags=tags or {},
            encrypted=encrypted,
            kms_key_id=kms_key_id,
        )

    def _copy_key(
        self, source: Snapshot, dst_region: Region, encrypted: bool | None, kms_key_id: str | None
    ) -> str | None:
        """The key a copy is encrypted with, by the CopySnapshot rules: an explicit key; else
        the region's default when it encrypts by default or `encrypted` is asked for; an
        encrypted source is only copied in the clear when asked explicitly."""
        if kms_key_id is not None:
            return self.keys.usable(kms_key_id, dst_region.name).id
        default = dst_region.default_key()
        if default is not None:
            if encrypted is False:
                raise InvalidParameter(f"region {dst_region.name} encrypts every snapshot")
            return default
        if encrypted:
            if dst_region.default_kms_key_id is None:
                raise KeyNotFound(
                    f"an encrypted copy needs a key of region {dst_region.name}:"
                    " give --kms-key-id or set default_kms_key_id"
                )
            return self.keys.usable(dst_region.default_kms_key_id, dst_region.name).id
        if source.encrypted and encrypted is None:
            raise KeyNotFound(
                f"{source.name} is encrypted: copying it into region "
                f"{dst_region.name} needs a key there (--kms-key-id, or the "
                "region's default_kms_key_id), or --decrypt to copy in the clear"
            )
        return None

    def _start_copy(
        self,
        source: Snapshot,
        dst_region: Region,
        name: str,
        *,
        kind: str,
        replace: Snapshot | None,
        description: str | None,
        retention_days: int | None,
        tags: dict[str, str],
        encrypted: bool | None = None,
        kms_key_id: str | None = None,
    ) -> Snapshot:
        if source.status != SnapshotStatus.AVAILABLE or not source.sealed:
            raise NotReady(
                f"snapshot {source.name} ({source.id}) is {source.status}; only "
                "available snapshots can be copied"
            )
        check_snapshot_filename(name)
        if replace is None:
            dst_region.check_new_name(name)
            dst_region.check_quota()
        dst = Snapshot.new(new_snapshot_id(), name, dst_region, source.mode, source.uid, source.gid)
        dst.become(SnapshotStatus.COPYING)
        dst.size = source.size
        dst.atime_ns, dst.mtime_ns = source.atime_ns, source.mtime_ns
        dst.source_snapshot_id, dst.source_region = source.id, source.region.name
        dst.description, dst.retention_days = description, retention_days
        dst.kms_key_id = self._copy_key(source, dst_region, encrypted, kms_key_id)
        dst.encrypted = dst.kms_key_id is not None
        job = CopyJob(
            dst=dst,
            src_region=source.region.name,
            src_snapshot_id=source.id,
            kind=kind,
            next_block=0,
            done_blocks=0,
            total_blocks=source.allocated_blocks,
            created_at=time.time(),
            source=source,
        )
        dst_region.index.insert_snapshot(
            dst.to_row(),
            tags=tags,
            displaced_id=replace.id if replace else None,
            job={
                "src_region": job.src_region,
                "src_snapshot_id": job.src_snapshot_id,
                "kind": kind,
                "total_blocks": job.total_blocks,
                "created_at": job.created_at,
            },
        )
        if replace is not None:
            del dst_region.snapshots[name]
        self._add(dst)
        source.copy_readers += 1
        self.copies.add(job)
        log.info(
            "region %s: %s of %s/%s (%s) started as %s (%s)%s",
            dst_region.name,
            kind,
            source.region.name,
            source.name,
            source.id,
            name,
            dst.id,
            ""
            if job.dst.copy_job is None
            or self.copies.running(dst_region) <= dst_region.max_parallel_copies
            else ", queued",
        )
        return dst

    def copy_finished(self, job: CopyJob, *, succeeded: bool) -> None:
        """Called by the engine when a job has succeeded or failed: release its source.

        A failed `mv` gives the source back its name: a move must never lose the data.
        """
        source, job.source = job.source, None
        if source is None:
            return
        if not succeeded and job.kind == "move" and source.deleted:
            self._unhide(source)
        self._release_source(source)

    def _unhide(self, snap: Snapshot) -> None:
        region = snap.region
        alias_of = self.by_ino.get(snap.ino)
        if alias_of is not None and alias_of is not snap:
            alias_of.inode_aliases.remove(snap.ino)
            self.forget_entry(alias_of.region.ino, alias_of.name)
        if snap.name in region.snapshots:
            snap.name = f"{snap.name}.restored-{snap.id}"
        snap.deleted = False
        region.index.update_snapshot(snap.id, deleted=0, name=snap.name)
        self._add(snap)
        log.warning(
            "region %s: the move of %s (%s) failed; the snapshot is back as %s",
            region.name,
            snap.source_snapshot_id or snap.id,
            snap.id,
            snap.name,
        )

    async def _cancel_copy(self, snap: Snapshot, why: str) -> None:
        """Stop the job filling `snap` (being deleted or replaced) and release its source.

        The snapshot becomes `failed`, so a process still reading it gets EIO for blocks that
        were never transferred, not zeros; its job row goes, so it never resumes.
        """
        job = snap.copy_job
        if job is None:
            return
        await self.copies.cancel(job)
        snap.become(
            SnapshotStatus.FAILED, error=f"OperationCancelled: the copy was cancelled ({why})"
        )
        snap.region.index.finish_copy(
            snap.id, {"status": SnapshotStatus.FAILED, "error": snap.error}
        )
        log.info(
            "region %s: copy into %s (%s) cancelled by its %s",
            snap.region.name,
            snap.name,
            snap.id,
            why,
        )
        source, job.source = job.source, None
        if source is not None:
            self._release_source(source)

    async def set_size(self, snap: Snapshot, size: int) -> None:
        if size < 0:
            raise InvalidParameter(f"size {size} is negative")
        if snap.sealed or snap.writer is None:
            if size == snap.size:
                return
            raise Sealed(
                f"snapshot {snap.name} ({snap.id}) is {snap.status}; its size can no longer change"
            )
        writer = snap.writer
        if writer.sealing:
            raise NotReady(f"snapshot {snap.name} ({snap.id}) is being sealed")
        # truncate(2) by path holds no handle: count it as one, so that no seal runs
        # meanwhile and the settle period starts again after it.
        writer.reopened()
        try:
            await writer.truncate(size)
        finally:
            writer.handles -= 1
            if writer.handles == 0 and not snap.deleted:
                writer.mark_closed()
                await self._settle(snap, writer)

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
            fields["mode"] = stat.S_IMODE(mode)
        if uid is not None:
            fields["uid"] = uid
        if gid is not None:
            fields["gid"] = gid
        if atime_ns is not None:
            fields["atime_ns"] = atime_ns
        if mtime_ns is not None:
            fields["mtime_ns"] = mtime_ns
        fields["ctime_ns"] = time.time_ns()
        snap.region.index.update_snapshot(snap.id, **fields)  # first: nothing changes if it fails
        for name, value in fields.items():
            setattr(snap, name, value)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.path)


_NO_LINEAGE: dict[str, object] = {
    "source_snapshot_id": None,
    "source_region": None,
    "description": None,
    "transferred_bytes": 0,
}


def _lineage(snap: Snapshot) -> dict[str, object]:
    return {
        "source_snapshot_id": snap.source_snapshot_id,
        "source_region": snap.source_region,
        "description": snap.description,
        "transferred_bytes": snap.transferred_bytes,
    }


def maps_equal(a: Snapshot, b: Snapshot, chunk: int = 4096) -> bool:
    """Two snapshots, possibly in different regions, map every block to the same id."""
    next_a = next_b = 0
    while True:
        rows_a = a.region.index.block_map_from(a.id, next_a, chunk)
        rows_b = b.region.index.block_map_from(b.id, next_b, chunk)
        if rows_a != rows_b:
            return False
        if not rows_a:
            return True
        next_a = next_b = rows_a[-1][0] + 1
