"""powercutfs: a passthrough FUSE filesystem that can lose power, for crash tests.

Like LazyFS (the filesystem Jepsen uses), but small, in Python, with pyfuse3 and trio.
Run it as ``python -m tests.crash.powercutfs BACKING MOUNTPOINT`` (a foreground process), or use
`PowerCutFS` from a test. Every operation is passed through by path to BACKING at once;
what powercutfs adds is an UNDO log of everything that a real disk would not yet have made
durable, and a power cut that applies it.

What is durable when (a strict POSIX model, stricter than ext4):

- File data: what fsync() or fdatasync() of the file made durable (either `datasync`, any
  descriptor of the inode). For each inode changed since, powercutfs keeps its durable size
  and the old contents of every 4 KiB page below that size that was overwritten or
  truncated away (saved before the first change; bytes appended beyond the durable size
  need nothing saved). Files are durable as found when powercutfs starts; a file created
  in this run is durable with size 0.
- Directory entries: a create, mknod, mkdir, symlink, link, unlink, rmdir or rename is
  durable once the directory holding the new entry is fsync'ed (for an unlink or rmdir the
  directory it was removed from; for a rename the destination directory only). An fsync
  of a file does NOT make its directory entry durable. Until then an unlinked or replaced
  entry waits in ``BACKING/.powercut-trash/`` (hidden from the mount), so that it can come
  back.
- A power cut (`cut`) restores the data of every changed inode (truncate to the durable
  size, write back the saved pages), then undoes the uncommitted namespace operations
  newest first (best effort: an undo that no longer applies is logged and skipped), and
  what is left is the new durable baseline. `sync` makes everything durable, like a
  sync(1) that really worked; sync(1)/syncfs(2) on the mount itself do nothing, because
  the kernel does not forward them to a FUSE filesystem.

Control: ``setxattr(MOUNT, "user.powercut", b"cut" | b"sync")`` acts before it returns;
``getxattr(MOUNT, "user.powercut.stats")`` is JSON: dirty_inodes, saved_pages,
undirty_bytes_appended (bytes beyond durable sizes that a cut would drop), journal
(uncommitted namespace operations) and cuts. Other xattrs pass through to BACKING.

Limits:

- No fallocate: pyfuse3 has no fallocate operation, so the kernel answers EOPNOTSUPP
  (glibc's posix_fallocate then writes zeros, through powercutfs). So hole punches are not
  passed through, and an un-fsync'ed hole punch could not be undone anyway.
- The backing files are never fsync'ed: the backing disk never loses power, only the
  simulated one does. A crash of powercutfs itself is not a power cut: what it wrote
  stays, and the trash is emptied at the next start.
- Only data and names are undone: mode, owner, times and xattrs changed since the last
  fsync stay as they were set.
- Hard links are handled simply: an inode's saved pages are per inode (right for every
  name), but a name's entry is tracked per (directory, name), so an inode remembers the
  names the kernel looked it up by; one that is not a directory forgets them when the
  kernel forgets it.
- FUSE inode numbers are the backing st_ino (the root's and inode 1 swap places), with a
  generation bumped when powercutfs removes an inode's last link, so that the kernel does
  not mistake a new file on a reused inode number for the old one.
- Saved pages are kept in memory: truncating a large durable file without fsync holds all
  of its old contents.
- Entry and attribute timeouts are 0 and files are never opened with keep_cache, so the
  kernel asks again after a cut; the page cache is still used (no direct_io: SQLite mmaps
  its -shm file with MAP_SHARED). Locks (flock, fcntl) are the kernel's own: pyfuse3 has
  no lock operations.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio

log = logging.getLogger("powercutfs")

PAGE = 4096
TRASH = b".powercut-trash"
CONTROL = "user.powercut"
STATS = "user.powercut.stats"
ROOT = pyfuse3.ROOT_INODE
FSTYPE = "fuse.powercutfs"
REPO = Path(__file__).resolve().parents[2]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def fuse_errors(fn: F) -> F:
    """Answer an OSError with its errno, and anything unexpected with EIO and a traceback."""

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed unexpectedly", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def enoent() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.ENOENT)


def pwrite_all(fd: int, data: bytes, offset: int) -> int:
    """pwrite may write less (a full disk); the kernel expects all of a buffered write."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done
    return len(data)


# --- the undo state ------------------------------------------------------------------------


@dataclass
class DataUndo:
    """An inode's data as of its last fsync: its size, and the old contents of the pages
    below that size that changed since. Holds its own descriptor, so the restore reaches the
    inode however it was renamed or unlinked since."""

    fd: int
    durable_size: int
    pages: dict[int, bytes] = field(default_factory=dict)

    def save(self, start: int, end: int) -> None:
        """Keep the durable bytes of the pages that [start, end) touches, before they change."""
        end = min(end, self.durable_size)
        if start >= end:
            return  # only bytes appended beyond the durable size: a cut just truncates them
        missing = [p for p in range(start // PAGE, (end - 1) // PAGE + 1) if p not in self.pages]
        if not missing:
            return
        # One read for the whole span: a large overwrite would otherwise pread page by page.
        first = missing[0]
        data = os.pread(self.fd, (missing[-1] - first + 1) * PAGE, first * PAGE)
        for page in missing:
            self.pages[page] = data[(page - first) * PAGE : (page - first + 1) * PAGE]

    def restore(self) -> None:
        os.ftruncate(self.fd, self.durable_size)
        for page, data in self.pages.items():
            # A page saved across the durable end holds bytes appended since: not durable.
            pwrite_all(self.fd, data[: self.durable_size - page * PAGE], page * PAGE)

    def appended(self) -> int:
        return max(0, os.fstat(self.fd).st_size - self.durable_size)


@dataclass
class Created:
    """A new entry (create, mknod, mkdir, symlink, link): undone by removing it."""

    parent: int
    name: bytes
    ino: int

    @property
    def commit_dir(self) -> int:
        return self.parent

    def undo(self, fs: PowerCutOperations) -> None:
        st = os.lstat(fs.child(self.parent, self.name))
        if fs.ino_of(st) != self.ino:
            raise FileNotFoundError(errno.ENOENT, "the entry names another inode now")
        fs.delete_for_good(self.parent, self.name, st)

    def commit(self, fs: PowerCutOperations) -> None:
        pass


@dataclass
class Removed:
    """An unlinked or rmdir'ed entry (or a rename's replaced target), parked in the trash:
    undone by moving it back, committed by deleting it for good."""

    parent: int
    name: bytes
    ino: int
    trash_name: bytes

    @property
    def commit_dir(self) -> int:
        return self.parent

    def undo(self, fs: PowerCutOperations) -> None:
        fs.move_entry(fs.trash_ino, self.trash_name, self.parent, self.name, self.ino)

    def commit(self, fs: PowerCutOperations) -> None:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(fs.child(fs.trash_ino, self.trash_name))
            fs.delete_for_good(fs.trash_ino, self.trash_name, st)


@dataclass
class Renamed:
    """A rename (its replaced target is a `Removed` before it): undone by renaming back.
    Durable once the destination directory is fsync'ed, whichever the source was."""

    old_parent: int
    old_name: bytes
    parent: int
    name: bytes
    ino: int

    @property
    def commit_dir(self) -> int:
        return self.parent

    def undo(self, fs: PowerCutOperations) -> None:
        fs.move_entry(self.parent, self.name, self.old_parent, self.old_name, self.ino)

    def commit(self, fs: PowerCutOperations) -> None:
        pass


NamespaceOp = Created | Removed | Renamed


@dataclass
class Handle:
    ino: int
    fd: int


@dataclass
class DirHandle:
    ino: int
    entries: list[bytes] | None = None  # the listing readdir offsets index, from offset 0


# --- the filesystem ------------------------------------------------------------------------


class PowerCutOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False  # every write() reaches us before it returns

    def __init__(self, backing: Path):
        super().__init__()
        self.root = os.fsencode(os.path.abspath(backing))
        self.root_st_ino = os.lstat(self.root).st_ino
        # inode -> the (directory inode, name) entries it is known by
        self.names: dict[int, set[tuple[int, bytes]]] = {}
        self.lookups: dict[int, int] = {}
        self.dir_inos: set[int] = {ROOT}  # their names are kept: children's paths need them
        self.generation: dict[int, int] = {}
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, DirHandle] = {}
        self._next_dir_handle = itertools.count(1)
        self.undo: dict[int, DataUndo] = {}
        self.journal: list[NamespaceOp] = []
        self._trash_names = itertools.count()
        self.cuts = 0
        self.trash_ino = self._make_trash()

    def _make_trash(self) -> int:
        """An empty trash: what a previous run left there was never a durable entry."""
        trash = self.root + b"/" + TRASH
        if os.path.lexists(trash):
            shutil.rmtree(trash)
        os.mkdir(trash, 0o700)
        ino = self.ino_of(os.lstat(trash))
        self.names[ino] = {(ROOT, TRASH)}
        self.dir_inos.add(ino)
        return ino

    # --- inodes and paths ------------------------------------------------------------------

    def ino_of(self, st: os.stat_result) -> int:
        """The FUSE inode of a backing file: its st_ino, except that the backing root is
        ROOT_INODE and a backing inode numbered ROOT_INODE takes the root's number."""
        if st.st_ino == self.root_st_ino:
            return ROOT
        if st.st_ino == ROOT:
            return self.root_st_ino
        return st.st_ino

    def path(self, ino: int) -> bytes:
        """The backing path of an inode by one of its names, checked against the backing
        (a name found stale is dropped: nothing else changes the backing tree)."""
        if ino == ROOT:
            return self.root
        for parent, name in list(self.names.get(ino, ())):
            try:
                candidate = self.child(parent, name)
                if self.ino_of(os.lstat(candidate)) == ino:
                    return candidate
            except (OSError, pyfuse3.FUSEError):
                pass
            self.names[ino].discard((parent, name))
        raise enoent()

    def child(self, parent: int, name: bytes) -> bytes:
        return self.path(parent) + b"/" + name

    def remember(self, parent: int, name: bytes, st: os.stat_result) -> int:
        """Count a lookup the kernel now holds, and the name it knows the inode by."""
        ino = self.ino_of(st)
        self.names.setdefault(ino, set()).add((parent, name))
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        if stat.S_ISDIR(st.st_mode):
            self.dir_inos.add(ino)
        return ino

    def entry(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        ino = self.ino_of(st)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.generation = self.generation.get(ino, 0)
        # Never cached: after a cut the kernel must ask again for names and sizes.
        attr.entry_timeout = 0
        attr.attr_timeout = 0
        attr.st_mode = st.st_mode
        attr.st_nlink = self._nlink(ino, st)
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def _nlink(self, ino: int, st: os.stat_result) -> int:
        """Links in the trash are not links (SQLite notices an unlinked database by nlink 0)."""
        names = self.names.get(ino, set())
        trashed = sum(1 for parent, _ in names if parent == self.trash_ino)
        if stat.S_ISDIR(st.st_mode):
            return 0 if trashed else st.st_nlink
        return max(0, st.st_nlink - trashed)

    def lstat(self, ino: int) -> os.stat_result:
        try:
            return os.lstat(self.path(ino))
        except pyfuse3.FUSEError:
            # No name left (unlinked for good) but still open: its descriptor knows it.
            for handle in self.handles.values():
                if handle.ino == ino:
                    return os.fstat(handle.fd)
            raise

    def check_name(self, parent: int, name: bytes) -> None:
        """The trash is not part of the mount."""
        if parent == ROOT and name == TRASH:
            raise pyfuse3.FUSEError(errno.EPERM)

    # --- namespace primitives, shared by the operations, the undo and the commit -----------

    def move_entry(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, ino: int
    ) -> None:
        """Rename an entry that names `ino` to a free name, and keep the name map in step."""
        source, target = self.child(parent, name), self.child(new_parent, new_name)
        if self.ino_of(os.lstat(source)) != ino:
            raise FileNotFoundError(errno.ENOENT, "the entry names another inode now", source)
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "the name is taken", target)
        os.rename(source, target)
        names = self.names.setdefault(ino, set())
        names.discard((parent, name))
        names.add((new_parent, new_name))

    def delete_for_good(self, parent: int, name: bytes, st: os.stat_result) -> None:
        path = self.child(parent, name)
        if stat.S_ISDIR(st.st_mode):
            # Bottom-up, each inode retired: shutil.rmtree would not say what it removed.
            for dirpath, dirnames, filenames in os.walk(path, topdown=False):
                for entry in filenames + dirnames:
                    entry_path = os.path.join(dirpath, entry)
                    entry_st = os.lstat(entry_path)
                    self._retire(entry_st)
                    (os.rmdir if stat.S_ISDIR(entry_st.st_mode) else os.unlink)(entry_path)
            os.rmdir(path)
        else:
            os.unlink(path)
        self._retire(st)
        self.names.get(self.ino_of(st), set()).discard((parent, name))

    def _retire(self, st: os.stat_result) -> None:
        """An inode losing its last link: the backing may reuse its number for a new file,
        which a new generation tells the kernel apart from the old one; its data is gone, so
        is its undo state."""
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            return
        ino = self.ino_of(st)
        self.generation[ino] = self.generation.get(ino, 0) + 1
        undo = self.undo.pop(ino, None)
        if undo is not None:
            os.close(undo.fd)

    def trash_entry(self, parent: int, name: bytes, st: os.stat_result) -> None:
        """Unlink, rmdir, or replace by rename: park the entry where a cut can take it back."""
        ino = self.ino_of(st)
        trash_name = str(next(self._trash_names)).encode()
        self.move_entry(parent, name, self.trash_ino, trash_name, ino)
        self.journal.append(Removed(parent, name, ino, trash_name))

    # --- data undo -------------------------------------------------------------------------

    def data_undo(self, ino: int, fd: int | None = None) -> DataUndo:
        """The inode's undo state, begun now (at its current size) if it has none: nothing
        changed it since its last fsync, or since powercutfs first saw it."""
        undo = self.undo.get(ino)
        if undo is None:
            try:
                own = os.open(self.path(ino), os.O_RDWR | os.O_CLOEXEC)
            except (OSError, pyfuse3.FUSEError):
                if fd is None:
                    raise
                own = os.dup(fd)  # no name left: the caller's descriptor reaches the inode
            undo = self.undo[ino] = DataUndo(own, os.fstat(own).st_size)
        return undo

    def truncate(self, ino: int, size: int, fd: int | None = None) -> None:
        undo = self.data_undo(ino, fd)
        undo.save(size, undo.durable_size)
        os.ftruncate(undo.fd, size)

    def commit_data(self, ino: int) -> None:
        undo = self.undo.pop(ino, None)
        if undo is not None:
            os.close(undo.fd)

    def commit_journal(self, wanted: Callable[[NamespaceOp], bool]) -> None:
        kept = []
        for op in self.journal:
            if not wanted(op):
                kept.append(op)
                continue
            try:
                op.commit(self)
            except (OSError, pyfuse3.FUSEError) as exc:
                log.warning("could not commit %s: %s", op, exc)
        self.journal = kept

    # --- power ---------------------------------------------------------------------------

    def cut(self) -> list[int]:
        """Lose everything not durable; returns the inodes whose data was restored."""
        restored = list(self.undo)
        for ino, undo in self.undo.items():
            try:
                undo.restore()
            except OSError as exc:
                log.warning("could not restore the data of inode %d: %s", ino, exc)
            finally:
                os.close(undo.fd)
        self.undo.clear()
        for op in reversed(self.journal):
            try:
                op.undo(self)
            except (OSError, pyfuse3.FUSEError) as exc:
                log.warning("power cut: cannot undo %s (%s); skipped", op, exc)
        self.journal.clear()
        self._empty_trash()
        self.cuts += 1
        log.info("power cut %d: %d inodes restored", self.cuts, len(restored))
        return restored

    def _empty_trash(self) -> None:
        """What is left in the trash had an undo that did not apply: it is gone."""
        for name in os.listdir(self.path(self.trash_ino)):
            with contextlib.suppress(OSError):
                st = os.lstat(self.child(self.trash_ino, name))
                self.delete_for_good(self.trash_ino, name, st)

    def sync(self) -> None:
        for ino in list(self.undo):
            self.commit_data(ino)
        self.commit_journal(lambda op: True)
        log.info("sync: everything is durable")

    def stats(self) -> dict[str, int]:
        return {
            "dirty_inodes": len(self.undo),
            "saved_pages": sum(len(u.pages) for u in self.undo.values()),
            "undirty_bytes_appended": sum(u.appended() for u in self.undo.values()),
            "journal": len(self.journal),
            "cuts": self.cuts,
        }

    def _invalidate(self, inos: list[int]) -> None:
        """Drop the kernel's cached pages of restored files. In a thread: the kernel may
        wait on a page whose read request only our event loop can answer."""
        for ino in inos:
            with contextlib.suppress(OSError):  # ENOENT: the kernel has forgotten it
                pyfuse3.invalidate_inode(ino)

    # --- lookups and attributes ------------------------------------------------------------

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT and name == TRASH:
            raise enoent()
        if name in (b".", b".."):
            st = os.lstat(self.path(self._dot(parent_inode, name)))
            self.lookups[self.ino_of(st)] = self.lookups.get(self.ino_of(st), 0) + 1
        else:
            st = os.lstat(self.child(parent_inode, name))
            self.remember(parent_inode, name, st)
        return self.entry(st)

    def _dot(self, directory: int, name: bytes) -> int:
        """The inode "." or ".." names (asked for only by NFS exports, which we do not
        enable, but a lookup handler must answer them)."""
        if name == b"." or directory == ROOT:
            return directory
        return next(iter(self.names.get(directory, {(ROOT, b"")})))[0]

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            left = self.lookups.get(ino, 0) - count
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            if ino not in self.dir_inos:
                self.names.pop(ino, None)  # the kernel will look it up again by name

    @fuse_errors
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self.entry(self.lstat(inode))

    @fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        fd = self.handles[fh].fd if fh in self.handles else None
        where: int | bytes = fd if fd is not None else self.path(inode)
        if fields.update_size:
            self.truncate(inode, attr.st_size, fd)
        if fields.update_mode:
            os.chmod(where, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            self._chown(where, uid, gid)
        if fields.update_atime or fields.update_mtime:
            st = self.lstat(inode)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            if isinstance(where, int):
                os.utime(where, ns=(atime, mtime))
            else:
                os.utime(where, ns=(atime, mtime), follow_symlinks=False)
        return self.entry(self.lstat(inode))

    @staticmethod
    def _chown(where: int | bytes, uid: int, gid: int) -> None:
        if isinstance(where, int):
            os.chown(where, uid, gid)
        else:
            os.chown(where, uid, gid, follow_symlinks=False)

    def _own(self, parent: int, path: bytes, ctx: pyfuse3.RequestContext) -> None:
        """A new entry belongs to the caller (we run as root), or to a setgid dir's group."""
        parent_st = os.lstat(self.path(parent))
        gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else ctx.gid
        if (ctx.uid, gid) != (os.geteuid(), os.getegid()):
            os.chown(path, ctx.uid, gid, follow_symlinks=False)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(self.path(inode))

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.root)
        out = pyfuse3.StatvfsData()
        for name in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(out, name, getattr(st, name))
        return out

    # --- directories -----------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not stat.S_ISDIR(self.lstat(inode).st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = next(self._next_dir_handle)
        self.dir_handles[fh] = DirHandle(inode)
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.dir_handles[fh]
        path = self.path(handle.ino)
        if start_id == 0 or handle.entries is None:
            # Offsets index this listing; a listing from 0 (opendir, rewinddir) is new.
            names = os.listdir(path)
            if handle.ino == ROOT:
                names = [n for n in names if n != TRASH]
            handle.entries = names
        for index in range(start_id, len(handle.entries)):
            name = handle.entries[index]
            try:
                st = os.lstat(path + b"/" + name)
            except FileNotFoundError:
                continue  # removed since the listing: not reported, nothing else skipped
            if not pyfuse3.readdir_reply(token, name, self.entry(st), index + 1):
                return
            self.remember(handle.ino, name, st)  # readdirplus counts as a lookup

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        directory = self.dir_handles[fh].ino
        self.commit_journal(lambda op: op.commit_dir == directory)

    def _created(
        self, parent: int, name: bytes, path: bytes, ctx: pyfuse3.RequestContext | None
    ) -> pyfuse3.EntryAttributes:
        """Journal a new entry and hand its attributes (one lookup) to the kernel."""
        if ctx is not None:
            self._own(parent, path, ctx)
        st = os.lstat(path)
        ino = self.remember(parent, name, st)
        self.journal.append(Created(parent, name, ino))
        return self.entry(st)

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.check_name(parent_inode, name)
        path = self.child(parent_inode, name)
        os.mkdir(path, stat.S_IMODE(mode))
        return self._created(parent_inode, name, path, ctx)

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.check_name(parent_inode, name)
        path = self.child(parent_inode, name)
        os.mknod(path, mode, rdev)
        return self._created(parent_inode, name, path, ctx)

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.check_name(parent_inode, name)
        path = self.child(parent_inode, name)
        os.symlink(target, path)
        return self._created(parent_inode, name, path, ctx)

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.check_name(new_parent_inode, new_name)
        path = self.child(new_parent_inode, new_name)
        os.link(self.path(inode), path, follow_symlinks=False)
        return self._created(new_parent_inode, new_name, path, None)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.check_name(parent_inode, name)
        st = os.lstat(self.child(parent_inode, name))
        if stat.S_ISDIR(st.st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        self.trash_entry(parent_inode, name, st)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.check_name(parent_inode, name)
        path = self.child(parent_inode, name)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if os.listdir(path):  # a rename into the trash would not check that
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        self.trash_entry(parent_inode, name, st)

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE: not needed so far
        self.check_name(parent_inode_old, name_old)
        self.check_name(parent_inode_new, name_new)
        source = os.lstat(self.child(parent_inode_old, name_old))
        try:
            target = os.lstat(self.child(parent_inode_new, name_new))
        except FileNotFoundError:
            target = None
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise pyfuse3.FUSEError(errno.EEXIST)
            if target.st_ino == source.st_ino:
                return  # two links to one inode: POSIX says rename does nothing
            self._check_replace(source, target, self.child(parent_inode_new, name_new))
            self.trash_entry(parent_inode_new, name_new, target)
        ino = self.ino_of(source)
        try:
            self.move_entry(parent_inode_old, name_old, parent_inode_new, name_new, ino)
        except OSError:
            if target is not None:  # put the replaced entry back, as if nothing happened
                self.journal.pop().undo(self)
            raise
        self.journal.append(Renamed(parent_inode_old, name_old, parent_inode_new, name_new, ino))

    @staticmethod
    def _check_replace(source: os.stat_result, target: os.stat_result, target_path: bytes) -> None:
        """What rename(2) would refuse; the target goes to the trash before the rename, so
        the backing rename cannot check it."""
        if stat.S_ISDIR(source.st_mode) and not stat.S_ISDIR(target.st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if not stat.S_ISDIR(source.st_mode) and stat.S_ISDIR(target.st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if stat.S_ISDIR(target.st_mode) and os.listdir(target_path):
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)

    # --- files -----------------------------------------------------------------------------

    @staticmethod
    def _backing_flags(flags: int) -> int:
        """Only the access mode: O_APPEND would make pwrite ignore the kernel's offsets (and
        so our saved pages), O_TRUNC is done by `truncate`, O_SYNC comes as fsync requests,
        O_DIRECT needs aligned buffers. Write-only opens read too, in case the kernel asks."""
        access = flags & os.O_ACCMODE
        return (os.O_RDWR if access == os.O_WRONLY else access) | os.O_CLOEXEC

    def _open_handle(self, ino: int, fd: int) -> pyfuse3.FileInfo:
        self.handles[fd] = Handle(ino, fd)
        # No keep_cache: a file opened after a cut must not be read from stale pages.
        return pyfuse3.FileInfo(fh=fd, direct_io=False, keep_cache=False)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fd = os.open(self.path(inode), self._backing_flags(flags))
        try:
            if flags & os.O_TRUNC:  # the kernel passes O_TRUNC here (atomic_o_trunc)
                self.truncate(inode, 0, fd)
        except BaseException:
            os.close(fd)
            raise
        return self._open_handle(inode, fd)

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self.check_name(parent_inode, name)
        path = self.child(parent_inode, name)
        fd = os.open(path, self._backing_flags(flags) | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode))
        attr = self._created(parent_inode, name, path, ctx)
        return self._open_handle(attr.st_ino, fd), attr

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.handles[fh].fd, size, off)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        self.data_undo(handle.ino, handle.fd).save(off, off + len(buf))
        return pwrite_all(handle.fd, buf, off)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        pass  # every write is already in the backing file

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        os.close(handle.fd)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        # fdatasync too: the size is data. The directory entry is not (strict POSIX).
        self.commit_data(self.handles[fh].ino)

    # --- xattrs and the control interface --------------------------------------------------

    @fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if inode == ROOT and name == CONTROL.encode():
            await self._control(value.strip())
            return
        os.setxattr(self.path(inode), name, value, follow_symlinks=False)

    async def _control(self, command: bytes) -> None:
        if command == b"cut":
            known = [ino for ino in self.cut() if ino in self.lookups]
            # After the cut, so other requests may run meanwhile: they see the new baseline.
            await trio.to_thread.run_sync(self._invalidate, known)
        elif command == b"sync":
            self.sync()
        else:
            raise pyfuse3.FUSEError(errno.EINVAL)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT and name == STATS.encode():
            return json.dumps(self.stats()).encode()
        return os.getxattr(self.path(inode), name, follow_symlinks=False)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in os.listxattr(self.path(inode), follow_symlinks=False)]

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.removexattr(self.path(inode), name, follow_symlinks=False)


# --- the process ---------------------------------------------------------------------------


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m tests.crash.powercutfs BACKING MOUNTPOINT", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s powercutfs: %(message)s"
    )
    backing, mountpoint = Path(args[0]), Path(args[1])
    os.umask(0)  # the kernel has applied the caller's umask to the modes we get
    operations = PowerCutOperations(backing)
    options = set(pyfuse3.default_options) | {"fsname=powercutfs", "subtype=powercutfs"}
    pyfuse3.init(operations, str(mountpoint), options)
    log.info("serving %s on %s (pid %d)", backing, mountpoint, os.getpid())
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    log.info("unmounted %s", mountpoint)
    return 0


# --- the test helper -----------------------------------------------------------------------


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def is_mounted(mountpoint: Path) -> bool:
    """Whether powercutfs is mounted at `mountpoint`, from the mount table: no request
    reaches the filesystem (a stat of a dead mount would fail, a hung one would hang)."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and _unescape(fields[4]) == target and right.startswith(FSTYPE):
                return True
    return False


class PowerCutFS:
    """A powercutfs process serving `backing` on `mountpoint`; `stop` (or leaving the
    `with` block) always unmounts, even if the process died."""

    def __init__(self, backing: Path, mountpoint: Path, log_path: Path | None = None):
        self.backing = Path(backing)
        self.mountpoint = Path(mountpoint)
        self.log_path = log_path or self.mountpoint.with_name(self.mountpoint.name + ".log")
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PowerCutFS:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logfile:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.crash.powercutfs", self.backing, self.mountpoint],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C of pytest reaches teardown, not the daemon
            )
        deadline = time.monotonic() + timeout
        while not self.is_mounted():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"powercutfs did not mount {self.mountpoint}:\n{self.log()}")
            time.sleep(0.02)

    def is_mounted(self) -> bool:
        return is_mounted(self.mountpoint)

    def cut(self) -> None:
        """Lose power: what was not durable is gone when this returns."""
        os.setxattr(self.mountpoint, CONTROL, b"cut")

    def sync(self) -> None:
        """Make everything durable."""
        os.setxattr(self.mountpoint, CONTROL, b"sync")

    def stats(self) -> dict[str, int]:
        return json.loads(os.getxattr(self.mountpoint, STATS))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Unmount (politely, then lazily) and end the process (politely, then SIGKILL)."""
        if self.is_mounted():
            self._unmount()
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        if self.is_mounted():  # the process died without unmounting
            _fusermount("-u", "-z", self.mountpoint)

    def _unmount(self) -> None:
        deadline = time.monotonic() + 5
        while _fusermount("-u", self.mountpoint) != 0:
            if not self.is_mounted():
                return
            if time.monotonic() > deadline:  # still busy: detach it now, it goes when idle
                _fusermount("-u", "-z", self.mountpoint)
                return
            time.sleep(0.05)


def _fusermount(*args: str | Path) -> int:
    done = subprocess.run(
        ["fusermount3", *map(str, args)], capture_output=True, check=False, timeout=30
    )
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
