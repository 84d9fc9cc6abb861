"""FUSE translation: pyfuse3 requests in, Store calls out, errnos back.

Nothing here decides anything about storage; each handler finds the node, calls the store,
and turns the answer into attributes. `SnapfsError`s become their errno and a log line with
the cloud code; anything else is a bug, logged with its traceback and answered with EIO.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import sqlite3
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from snapfs.errors import NotPermitted, SnapfsError, from_sqlite
from snapfs.fuse import xattrs
from snapfs.fuse.readaround import ReadAround
from snapfs.model.states import SnapshotStatus
from snapfs.service.region import Region
from snapfs.service.snapshots import Snapshot
from snapfs.service.store import ROOT_INO, OpenFile, Store

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 1.0
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def translate_errors(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except SnapfsError as exc:
            level = logging.DEBUG if exc.errno in (errno.ENOENT, errno.ENODATA) else logging.WARNING
            log.log(level, "%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except sqlite3.Error as exc:
            fault = from_sqlite(exc)  # a full disk or a damaged index: not a bug
            if fault is None:
                log.exception("%s failed unexpectedly", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None
            log.error("%s: %s", fn.__name__, fault)
            raise pyfuse3.FUSEError(fault.errno) from None
        except OSError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed unexpectedly", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast(F, wrapper)  # functools.wraps: the same signature


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self, store: Store, nursery: trio.Nursery, on_init: Callable[[], None] | None = None
    ):
        super().__init__()
        self._on_init = on_init
        self.store = store
        self.nursery = nursery
        self.handles: dict[int, OpenFile] = {}
        self._next_fh = itertools.count(1)
        self.cached_handles: set[int] = set()  # opened through the page cache (sealed)
        self.read_around = ReadAround()
        self.root_uid = os.getuid()
        self.root_gid = os.getgid()
        # The kernel refuses cache invalidations (ENOSYS) until its INIT request has been
        # answered; background work (the retention sweep at mount) can start before that.
        self.connected = False
        store.attach_name_cache(self)

    def init(self) -> None:
        self.connected = True
        self.read_around.start()
        if self._on_init is not None:
            # After this returns the INIT answer is sent, and the kernel applies it; what
            # the hook tunes (the read-ahead) must come after that, so it runs as a task.
            self.nursery.start_soon(trio.to_thread.run_sync, self._on_init)

    def forget_entry(self, parent_ino: int, name: str) -> None:
        """Drop a name from the kernel's cache (it changed without a request through it).

        Before INIT the kernel has cached nothing, so there is nothing to drop."""
        if not self.connected:
            return
        try:
            pyfuse3.invalidate_entry_async(parent_ino, os.fsencode(name), ignore_enoent=True)
        except Exception:  # noqa: BLE001 - only a cache hint; the entry times out anyway
            log.debug("could not invalidate %s in %d", name, parent_ino, exc_info=True)

    # --- attributes ------------------------------------------------------------------------

    def _attrs(self, node: Region | Snapshot | None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.entry_timeout = ATTR_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_blksize = self.store.block_size
        if node is None:
            attr.st_ino = ROOT_INO
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2 + len(self.store.children(ROOT_INO))
            attr.st_uid, attr.st_gid = self.root_uid, self.root_gid
            attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = 0
        elif isinstance(node, Region):
            attr.st_ino = node.ino
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
            attr.st_uid, attr.st_gid = self.root_uid, self.root_gid
            attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.created_ns
        else:
            attr.st_ino = node.ino
            attr.st_mode = stat.S_IFREG | node.mode
            attr.st_nlink = 0 if node.deleted else 1
            attr.st_uid, attr.st_gid = node.uid, node.gid
            attr.st_size = node.size
            attr.st_blocks = node.allocated_bytes // 512
            attr.st_atime_ns = node.atime_ns
            attr.st_mtime_ns = node.mtime_ns
            attr.st_ctime_ns = node.ctime_ns
        return attr

    def _node(self, ino: int) -> Region | Snapshot | None:
        if ino == ROOT_INO:
            return None
        node = self.store.node(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    @translate_errors
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    @translate_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        text = _name(name)
        node = self.store.child(parent_inode, text)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(node)

    @translate_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if not isinstance(node, Snapshot):
            # Directories have fixed attributes; changes are accepted and ignored, so that
            # `rsync -a DIR/ MNT/REGION/` and `tar -x` (which set a directory's times and
            # mode after filling it) succeed.
            log.debug("ignoring attribute changes of directory inode %d", inode)
            return self._attrs(node)
        if fields.update_size:
            await self.store.set_size(node, attr.st_size)
        self.store.set_attrs(
            node,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self._attrs(node)

    # --- directories -----------------------------------------------------------------------

    @translate_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._node(inode)
        if inode != ROOT_INO:
            self.store.region_by_ino(inode)
        return inode

    @translate_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.store.children(fh)
        # The entry's inode is its offset cookie: stable while entries come and go.
        for node in entries:
            if node.ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(
                token, os.fsencode(node.name), self._attrs(node), node.ino
            ):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    @translate_errors
    async def mkdir(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT_INO:
            self.store.region_by_ino(parent_inode).check_writable("mkdir")
            raise NotPermitted("a region holds snapshot files only, not directories")
        return self._attrs(self.store.create_region(_name(name)))

    @translate_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if parent_inode != ROOT_INO:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        await self.store.remove_region(_name(name))

    # --- snapshot files --------------------------------------------------------------------

    def _open_file(self, snap: Snapshot, flags: int, pid: int) -> pyfuse3.FileInfo:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        handle = self.store.open(snap, writable, pid)
        fh = next(self._next_fh)
        self.handles[fh] = handle
        if snap.sealed and snap.status == SnapshotStatus.AVAILABLE:
            # Sealed content never changes, so the page cache is always right for it: mmap
            # (MAP_SHARED) works and repeated reads come from memory. The first such open
            # drops whatever the kernel kept of the inode from before the seal.
            keep_cache, snap.page_cache_valid = snap.page_cache_valid, True
            self.cached_handles.add(fh)
            return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=keep_cache)
        # direct_io while content can change: requests reach us in up to 1 MiB pieces,
        # without page-cache copies (measured here: writes 0.25 -> 1.6 GB/s on a no-op fs),
        # and a reader never sees pages older than the last write.
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    @translate_errors
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode == ROOT_INO:
            raise NotPermitted("snapshots live in region directories; mkdir a region first")
        if not stat.S_ISREG(mode) and stat.S_IFMT(mode):
            raise NotPermitted("a region holds regular files (snapshots) only")
        region = self.store.region_by_ino(parent_inode)
        snap = await self.store.create_snapshot(
            region, _name(name), mode, ctx.uid, ctx.gid, ctx.pid
        )
        return self._open_file(snap, flags, ctx.pid), self._attrs(snap)

    @translate_errors
    async def mknod(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT_INO:
            self.store.region_by_ino(parent_inode).check_writable("mknod")
        if parent_inode == ROOT_INO or not stat.S_ISREG(mode):
            raise NotPermitted("a region holds regular files (snapshots) only")
        region = self.store.region_by_ino(parent_inode)
        snap = await self.store.create_empty_snapshot(region, _name(name), mode, ctx.uid, ctx.gid)
        return self._attrs(snap)

    @translate_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return self._open_file(self.store.snapshot_by_ino(inode), flags, ctx.pid)

    @translate_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        snap = self.handles[fh].snap
        data = await snap.read(off, size, self.nursery)
        if fh in self.cached_handles and (around := snap.frame_around(off, size)) is not None:
            self.read_around.offer(snap.ino, off, len(data), *around)
        return data

    @translate_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        if handle.snap.writer is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await handle.snap.writer.write(off, buf)

    @translate_errors
    async def flush(self, fh: int) -> None:
        await self.store.flush(self.handles[fh], closing=True)  # FLUSH: a close(2)

    @translate_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.store.flush(self.handles[fh])

    @translate_errors
    async def release(self, fh: int) -> None:
        self.cached_handles.discard(fh)
        await self.store.release(self.handles.pop(fh))

    @translate_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if parent_inode == ROOT_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        await self.store.unlink(self.store.region_by_ino(parent_inode), _name(name))

    @translate_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if ROOT_INO in (parent_inode_old, parent_inode_new):
            raise NotPermitted("regions cannot be renamed, and snapshots live inside them")
        await self.store.rename(
            self.store.region_by_ino(parent_inode_old),
            _name(name_old),
            self.store.region_by_ino(parent_inode_new),
            _name(name_new),
            flags,
        )

    @translate_errors
    async def link(
        self,
        inode: int,
        new_parent_inode: int,
        new_name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if new_parent_inode != ROOT_INO:
            self.store.region_by_ino(new_parent_inode).check_writable("link")
        raise NotPermitted("snapshots cannot have hard links")

    @translate_errors
    async def symlink(
        self,
        parent_inode: int,
        name: bytes,
        target: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT_INO:
            self.store.region_by_ino(parent_inode).check_writable("symlink")
        raise NotPermitted("a region holds regular files (snapshots) only")

    @translate_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.store.statvfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = st.f_bsize
        data.f_frsize = st.f_frsize
        data.f_blocks = st.f_blocks
        data.f_bfree = st.f_bfree
        data.f_bavail = st.f_bavail
        data.f_files = st.f_files
        data.f_ffree = st.f_ffree
        data.f_favail = st.f_favail
        data.f_namemax = 255
        return data

    # --- extended attributes ---------------------------------------------------------------

    @translate_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await xattrs.get(self.store, self._node(inode), _name(name))

    @translate_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in xattrs.names(self.store, self._node(inode))]

    @translate_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await xattrs.set(self.store, self._node(inode), _name(name), value)

    @translate_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await xattrs.remove(self.store, self._node(inode), _name(name))
