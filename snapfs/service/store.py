"""The store: one directory holding the catalogue of regions and each region's data.

Layout (format version 1)::

    STORE/
      store.db                  catalogue: meta (format, block size, clean flag), regions
                                (name, backend: 'local' or s3://BUCKET/PREFIX, endpoint), keys
      lock                      flock()ed by the daemon that has the store open; holds its pid
      snapfs.log                the daemon's log
      regions/<name>/index.db   the region's block index and snapshots (see meta/index.py)
      regions/<name>/blocks/    a local region's block objects (see objects/local.py,
                                formats/codec.py); a region on S3 keeps them in its bucket
                                (objects/s3.py)

The `Store` object is the metadata service the FUSE layer talks to. This module holds its
opening and closing, the catalogue, the namespace lookups and the regions; the rest of it is
composed from one module per concern: recovery.py (after any stop), lifecycle.py (creating
-> sealed `available` once its last writer has been gone for the settle period, or at once
when something needs it sealed), removal.py (delete, rename, purge) and copies.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

import trio

from snapfs import durable, workers
from snapfs.blocks.cache import BlockCache
from snapfs.blocks.repository import PendingFrees
from snapfs.errors import (
    IndexDamaged,
    InvalidParameter,
    NotFound,
    NotPermitted,
    RegionAlreadyExists,
    RegionNotEmpty,
    RegionNotFound,
    SnapfsError,
    StoreFormat,
    from_sqlite,
)
from snapfs.meta import catalogue
from snapfs.meta import db as dbutil
from snapfs.meta.index import RegionIndex
from snapfs.meta.keys import KeyRing, unlock_master
from snapfs.model.clock import Clock
from snapfs.model.names import check_region_name
from snapfs.objects.local import LocalBackend
from snapfs.objects.stores import open_block_store
from snapfs.service.copyjobs import CopyEngine
from snapfs.service.region import Region
from snapfs.service.retention import retention_loop
from snapfs.service.shared import SharedLink
from snapfs.service.snapshots import Snapshot
from snapfs.service.storebase import NameCache, NoNameCache

if TYPE_CHECKING:
    from snapfs.objects.s3 import S3Location
    from snapfs.service.manifests import RebuildReport

from snapfs.service.copies import SnapshotCopies
from snapfs.service.lifecycle import OpenFile, SnapshotLifecycle
from snapfs.service.recovery import StoreRecovery
from snapfs.service.removal import SnapshotRemoval

log = logging.getLogger(__name__)

STORE_FORMAT = 1
ROOT_INO = 1
# 512 KiB, by measurement (scripts/bench --block-size, 2 GiB image, docs/ARCHITECTURE.md):
# ingest/read MB/s were 286/514 at 256 KiB, 422/908 at 512 KiB and 407/907 at 1 MiB, so
# 512 KiB is as fast as 1 MiB while finding 11% more of the image to be holes and halving
# the bytes a small scattered change costs. It is also EBS's direct-API block size.
DEFAULT_BLOCK_SIZE = 512 << 10
CACHE_BYTES = 64 << 20
PURGE_WAIT = 10.0  # how long rmdir of a region waits for its deleted snapshots' purge
WORKER_THREADS = 4
# Concurrent object-store requests (PUT/GET/DELETE) of the whole store: they wait on the
# network, not a core, so more run than WORKER_THREADS (objects/s3.py MAX_CONNECTIONS >= this).
REMOTE_IO_THREADS = 16
# Unmount: how long stopping copy jobs may wait on an object store's retries before they are
# interrupted, and how long unpublished manifests are waited for.
STOP_GRACE = 2.0
PUBLISH_GRACE = 30.0
JOIN_WAIT = 60.0  # seconds a mounted attach of a shared region waits for its snapshots
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


class Store(StoreRecovery, SnapshotLifecycle, SnapshotRemoval, SnapshotCopies):
    """The metadata service the FUSE layer talks to, composed of its parts: recovery,
    lifecycle, removal and copies, each in its own module."""

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
        self.copies = CopyEngine(
            lambda: self.regions.values(),
            lambda job, succeeded: self.copy_finished(job, succeeded=succeeded),
            self.give_back_source,
            copy_bandwidth_limit,
        )
        self._readers: dict[int, list[OpenFile]] = {}  # pid -> its read-only handles
        self._writers: set[Snapshot] = set()  # snapshots that had a writer (see _writing)
        self.names: NameCache = NoNameCache()  # the FUSE layer attaches the kernel's
        self.nursery: trio.Nursery | None = None
        self.was_clean = True
        self._lock_fd: int | None = None
        durable.make_dirs(self.path)
        self._lock()
        try:
            self.db = catalogue.open_catalogue(self.path)
            self.keys = KeyRing(self.path, self.db, unlock_master(self.path, self.db, create=False))
            self.block_size = self._settle_block_size(block_size)
            self.was_clean = dbutil.get_meta(self.db, "open", "0") == "0"
            with dbutil.transaction(self.db) as conn:
                dbutil.set_meta(conn, "open", "1")
            for row in self.db["regions"].rows_where(order_by="id"):
                self._load_region_if_readable(
                    row["name"],
                    row["id"],
                    row["backend"],
                    row["endpoint"],
                    read_only=bool(row.get("read_only")),
                    refresh=row.get("refresh"),
                    index_url=row.get("index_url"),
                )
        except BaseException:
            self._unlock()
            raise

    # --- opening and closing ---------------------------------------------------------------

    def _lock(self) -> None:
        self._lock_fd = catalogue.lock_for_daemon(self.path)

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
        self,
        name: str,
        region_id: int,
        backend_url: str,
        endpoint: str | None,
        *,
        read_only: bool = False,
        refresh: float | None = None,
        index_url: str | None = None,
    ) -> None:
        """Load a region at mount; one whose index cannot be read is left out, logged, and
        kept out of the namespace's reach (mkdir of its name is refused, so its data is
        never replaced), while the other regions are served."""
        try:
            self._load_region(
                name, region_id, backend_url, endpoint, read_only=read_only, refresh=refresh,
                index_url=index_url,
            )  # fmt: skip
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
        self,
        name: str,
        region_id: int,
        backend_url: str = "local",
        endpoint: str | None = None,
        *,
        read_only: bool = False,
        refresh: float | None = None,
        index_url: str | None = None,
    ) -> Region:
        directory = self.path / "regions" / name
        backend = open_block_store(
            directory, backend_url, endpoint, bucket_readonly=read_only,
            shared=index_url is not None,
        )  # fmt: skip
        region = Region(
            name,
            ROOT_INO + region_id,
            directory,
            self.block_size,
            self.limiter,
            self.cache,
            self.keys,
            backend=backend,
            io_limiter=self.io_limiter,
            frees=self.frees,
        )
        region.read_only = read_only
        if read_only:  # follows what the bucket's owner publishes, and publishes nothing
            from snapfs.service.refresh import DEFAULT_REFRESH, RegionRefresher

            every = DEFAULT_REFRESH if refresh is None else refresh
            region.refresher = RegionRefresher(self, region, every, self.keys)
        elif region.remote:  # a bucket region publishes what disaster recovery needs
            from snapfs.objects.s3packs import PackedS3Backend
            from snapfs.service.manifests import ManifestPublisher

            assert isinstance(backend, PackedS3Backend)
            region.publisher = ManifestPublisher(
                region, backend.packs.sibling("meta/"), self.block_size
            )
            region.index.on_change = region.publisher.changed
            region.on_relocated = region.publisher.republish_all
            if index_url is not None:  # shared with other stores (service/shared.py)
                region.link = SharedLink.attach_to(self, region, index_url)
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

    def appeared(self, snap: Snapshot) -> None:
        """A snapshot a read-only region's refresh found in its bucket (refresh.py)."""
        self._add(snap)
        self.names.forget_entry(snap.region.ino, snap.name)

    def attach_name_cache(self, names: NameCache) -> None:
        """The FUSE layer: told when a name goes or changes without a request through it."""
        self.names = names

    def start(self, nursery: trio.Nursery) -> None:
        """Start background work (garbage collectors, copy jobs) that lives with the mount."""
        self.nursery = nursery
        for region in self.regions.values():
            self._start_region(region)
        self.copies.start(nursery)
        nursery.start_soon(retention_loop, self, self.clock, name="retention")

    def _start_region(self, region: Region) -> None:
        if self.nursery is None:
            return
        self.nursery.start_soon(region.gc_loop, name=f"gc {region.name}")
        if region.publisher is not None:
            self.nursery.start_soon(region.publisher.run, name=f"publish {region.name}")
        if region.refresher is not None:
            self.nursery.start_soon(region.refresher.run, name=f"refresh {region.name}")
        if isinstance(region.link, SharedLink):
            region.link.run(self.nursery)

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
            if isinstance(region.link, SharedLink):
                await region.link.stop()
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

    def node(self, ino: int) -> Region | Snapshot | None:
        """The region or snapshot behind an inode (an open, even deleted, snapshot too)."""
        return self.by_ino.get(ino)

    def child(self, parent_ino: int, name: str) -> Region | Snapshot | None:
        """A region of the root (ROOT_INO), or a snapshot of a region directory, by name."""
        if parent_ino == ROOT_INO:
            return self.regions.get(name)
        return self.region_by_ino(parent_ino).snapshots.get(name)

    def children(self, ino: int) -> list[Region] | list[Snapshot]:
        """A directory's entries in inode order (readdir's offsets are inode numbers)."""
        if ino == ROOT_INO:
            return sorted(self.regions.values(), key=lambda r: r.ino)
        return sorted(self.region_by_ino(ino).snapshots.values(), key=lambda s: s.ino)

    def region_by_ino(self, ino: int) -> Region:
        node = self.by_ino.get(ino)
        if not isinstance(node, Region):
            raise NotPermitted("snapshots live in region directories, not here")
        return node

    def snapshot_by_ino(self, ino: int) -> Snapshot:
        node = self.by_ino.get(ino)
        if not isinstance(node, Snapshot):
            raise NotFound("no such snapshot")
        return node

    # --- regions ---------------------------------------------------------------------------

    def _check_new_region(self, name: str) -> None:
        check_region_name(name)
        if name in self.damaged_regions:
            raise IndexDamaged(
                f"region {name!r} exists but is not served: {self.damaged_regions[name]}"
            )
        if name in self.regions:
            raise RegionAlreadyExists(
                f"region {name!r} already exists",
            )

    def _region_directory(self, name: str) -> Path:
        directory = self.path / "regions" / name
        if directory.exists():  # left by an interrupted create or remove: nothing references it
            shutil.rmtree(directory)
        durable.make_dirs(directory)
        return directory

    def _register_region(
        self,
        name: str,
        backend_url: str = "local",
        endpoint: str | None = None,
        *,
        read_only: bool = False,
        refresh: float | None = None,
        index_url: str | None = None,
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
        row["read_only"] = int(read_only)
        row["refresh"] = refresh
        row["index_url"] = index_url
        # `id` is the INTEGER PRIMARY KEY: last_pk is the new row's rowid.
        region_id = cast(int, self.db.table("regions").insert(row).last_pk)
        region = self._load_region(
            name, region_id, backend_url, endpoint, read_only=read_only, refresh=refresh,
            index_url=index_url,
        )  # fmt: skip
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
        await workers.run_sync(
            regionadmin.claim_location, location, name, self.block_size, limiter=self.io_limiter
        )
        self._check_new_region(name)  # another create may have won meanwhile
        self._region_directory(name)
        region = self._register_region(name, location.url, location.endpoint)
        if region.publisher is not None:
            region.publisher.changed(None)
        log.info("created region %s on %s", name, location)
        return region

    async def attach_region(
        self,
        name: str,
        location: S3Location,
        *,
        read_only: bool = False,
        refresh: float | None = None,
    ) -> RebuildReport:
        """Disaster recovery: rebuild a region and its snapshots from its bucket alone.
        `read_only`: a view of a bucket another store goes on owning (refresh.py), which
        this store never changes."""
        from snapfs.service import regionadmin

        self._check_new_region(name)
        directory = self._region_directory(name)
        if self.keys is not None:
            self.keys.prime()  # encrypted manifests are opened in a worker thread
        try:
            report = await workers.run_sync(
                regionadmin.rebuild_from_bucket,
                location,
                name,
                self.block_size,
                directory / "index.db",
                self.keys,
                read_only,
                limiter=self.io_limiter,
            )
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self._check_new_region(name)
        region = self._register_region(
            name, location.url, location.endpoint, read_only=read_only, refresh=refresh
        )
        if region.publisher is not None:
            region.publisher.changed(None)
        log.info(
            "attached region %s from %s%s: %d snapshots restored, %d skipped",
            name,
            location,
            " read-only" if read_only else "",
            len(report.restored),
            len(report.skipped),
        )
        for reason in report.skipped:
            log.warning("region %s: not restored: %s", name, reason)
        return report

    async def create_shared_region(self, name: str, location: S3Location, url: str) -> Region:
        """A region shared with other stores (`snapfs region create --index
        postgresql://...`): its ledger made in that database, its bucket claimed."""
        from snapfs.service import regionadmin

        self._check_new_region(name)
        await workers.run_sync(
            regionadmin.create_shared, location, name, self.block_size, url,
            limiter=self.io_limiter,
        )  # fmt: skip
        return await self._join_shared(name, location, url, "created")

    async def attach_shared_region(
        self, name: str, location: S3Location, url: str, *, wait: bool = False
    ) -> Region:
        """Join a shared region another store made (`snapfs region attach --index ...`):
        its snapshots arrive from its ledger once the mount joins it (`wait`: mounted, the
        request returns once they are here, or after JOIN_WAIT)."""
        from snapfs.service import regionadmin

        self._check_new_region(name)
        try:
            await workers.run_sync(
                regionadmin.check_shared, location, name, self.block_size, url,
                limiter=self.io_limiter,
            )  # fmt: skip
        except RegionNotFound:
            # The database lacks it: a lost ledger made again from the bucket, if the bucket
            # holds this shared region.
            if not await workers.run_sync(
                regionadmin.is_shared, location, name, limiter=self.io_limiter
            ):
                raise
            await self._rebuild_ledger(name, location, url)
        region = await self._join_shared(name, location, url, "attached")
        if wait and isinstance(region.link, SharedLink):
            with trio.move_on_after(JOIN_WAIT):
                await region.link.joined.wait()
        return region

    async def _rebuild_ledger(self, name: str, location: S3Location, url: str) -> None:
        from snapfs.meta.pg import redacted
        from snapfs.service import regionadmin

        work = self.path / "regions" / f".{name}.rebuild"
        shutil.rmtree(work, ignore_errors=True)
        durable.make_dirs(work)
        if self.keys is not None:
            self.keys.prime()  # encrypted manifests are opened in a worker thread
        try:
            report = await workers.run_sync(
                regionadmin.rebuild_ledger, location, name, self.block_size, url, work,
                self.keys, limiter=self.io_limiter,
            )  # fmt: skip
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log.warning("region %s: rebuilt the shared index %s from the bucket: %d snapshots "
                    "restored, %d skipped", name, redacted(url), len(report.restored),
                    len(report.skipped))  # fmt: skip
        for reason in report.skipped:
            log.warning("region %s: not restored: %s", name, reason)

    async def _join_shared(self, name: str, location: S3Location, url: str, how: str) -> Region:
        from snapfs.meta.pg import without_password

        self._check_new_region(name)  # another request may have won meanwhile
        self._region_directory(name)
        region = self._register_region(
            name, location.url, location.endpoint, index_url=without_password(url)
        )
        if isinstance(region.link, SharedLink):
            region.link.use_url(url)  # this process may use the password it was given
        if region.publisher is not None:
            region.publisher.changed(None)
        log.info("%s shared region %s on %s, its index in %s", how, name, location,
                 without_password(url))  # fmt: skip
        return region

    async def fail_fenced(self, snap: Snapshot, error: SnapfsError) -> None:
        """An unfinished snapshot of a shared region whose session expired (the other
        hosts reaped it): it fails here (a copy's job stops, a writer's buffers go)."""
        if snap.copy_job is not None:
            await self._cancel_copy(snap, f"an expired session: {error.message}")
        elif snap.writer is not None:
            await self._fail_creation(snap, error)

    async def remove_region(self, name: str) -> None:
        region = self.region(name)
        # Removing an empty bucket region clears its prefix, which is the owner's.
        region.check_writable("rmdir")
        # `rm REGION/*; rmdir REGION`: what rm deleted is purged in the background; wait for
        # that (bounded), but not for a deleted snapshot a copy still reads from.
        with trio.move_on_after(PURGE_WAIT):
            while not region.snapshots and any(
                row["id"] not in self.by_id for row in region.index.snapshots(include_deleted=True)
            ):
                await trio.sleep(0.02)
        if region.snapshots or region.index.snapshots(include_deleted=True):
            raise RegionNotEmpty(f"region {name!r} still holds snapshots")
        shared = isinstance(region.link, SharedLink)
        if isinstance(region.link, SharedLink):
            # This host leaves the shared region; the region (ledger and bucket) stays the
            # other hosts'.
            await region.link.stop()
        self.db.table("regions").delete_where("name = ?", [name])
        del self.regions[name]
        self.by_ino.pop(region.ino, None)
        region.close()  # also ends its collector task
        shutil.rmtree(region.directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            durable.fsync_dir(region.directory.parent)  # not resurrected by a power loss
        if region.remote and self.nursery is not None and not shared:
            self.nursery.start_soon(self._destroy_remote, region, name=f"destroy {region.name}")
        log.info("%s region %s", "left shared" if shared else "removed", name)

    async def _destroy_remote(self, region: Region) -> None:
        """An empty region's bucket prefix still holds its metadata (and maybe garbage)."""
        try:
            await workers.run_sync(
                region.publisher.meta.destroy if region.publisher else region.backend.destroy,
                limiter=self.io_limiter,
            )
            await workers.run_sync(region.backend.destroy, limiter=self.io_limiter)
        except Exception as exc:  # noqa: BLE001 - the region is gone; leftovers are harmless
            log.warning("region %s: removing its objects failed: %s", region.name, exc)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.path)
