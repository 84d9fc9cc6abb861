"""Storage backends: where a region's block objects live.

A backend stores opaque objects under string keys (the hex block id). It knows nothing of
blocks, snapshots or the index, so a region can move to another disk or to an object store
by swapping the backend (`S3Backend` in objects/s3.py). All methods block; callers run them in
worker threads, several at once, so every method is thread-safe. `remote` tells the region
whether I/O waits on a network (and so runs under the store's I/O limiter rather than the
CPU one).

The contract the region relies on (crash safety): after `put(key)` returns, `get(key)` gives
the object back; after the next `sync()` returns, it survives a crash or a power loss.
`delete` of a key that is not there is not an error.

Why one module of ~700 lines: the pack format (append-only packs, the `.layout` marker, the
pack table, the read-fd cache and its rule against reused numbers), its durability order
(fdatasync each pack, fsync `packs/` for a new one, then commit the locations) and hole
punching on delete are one on-disk format whose invariants hold only together; the older
one-file-per-object layout it migrates from is read here too.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from snapfs import durable
from snapfs.errors import StoreFull
from snapfs.faults import fault_point
from snapfs.objects.protocol import Buffers, pieces

if TYPE_CHECKING:
    from snapfs.objects.protocol import ObjectStore

log = logging.getLogger(__name__)

# Room kept free on the store's filesystem when writing block objects: 1% of it, at least
# 1 MiB and at most 64 MiB. New blocks are refused (ENOSPC) before the disk is quite full,
# so that the index can still commit what was written, seal snapshots, record failures and
# delete snapshots (SQLite needs room in its WAL even to delete): a full store stays
# manageable, and nothing already stored is lost.
RESERVE_SHARE = 0.01
RESERVE_MIN = 1 << 20
RESERVE_MAX = 64 << 20


def space_reserve(path: Path) -> int:
    st = os.statvfs(path)
    return int(min(RESERVE_MAX, max(RESERVE_MIN, st.f_blocks * st.f_frsize * RESERVE_SHARE)))


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def object_path(root: Path, key: str) -> Path:
    """Where layout 2 kept object `key` as a file of its own (read, listed and deleted still)."""
    return root / key[:2] / key


def is_object_name(name: str) -> bool:
    """Object files of layouts 1-2 and temp files of an unfinished put, not the backend's own."""
    return not name.startswith(".") and len(name.removesuffix(".tmp")) == 64


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give a range of a file back to the filesystem; it reads as zeros afterwards."""
    if _libc.fallocate(
        fd,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
        ctypes.c_long(offset),
        ctypes.c_long(length),
    ):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True, slots=True)
class Location:
    pack: int
    offset: int
    length: int


PACKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS objects(
    key BLOB PRIMARY KEY,       -- the object key (block id) as bytes
    pack INTEGER NOT NULL,      -- packs/<pack>.pack
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_by_pack ON objects(pack, offset);
"""


class LocalBackend:
    """Block objects appended to pack files on local disk (layout 3).

    `root/packs/<n>.pack` holds objects back to back; `root/packs.db` (SQLite) maps each key
    to (pack, offset, length). Why packs: creating an inode costs ~0.8 ms of kernel CPU on
    the development machine, which made one file per 512 KiB block a third of the CPU of an
    ingest and of a copy; appending costs nothing of the sort, and restic and borg pack for
    the same reason. Deleting an object punches a hole in its pack (the space goes back to
    the filesystem at once, with no repacking), and a pack whose objects are all gone is
    unlinked.

    Durability follows the region's order: `put` appends (no sync) and remembers the
    location in memory; `sync` fdatasyncs the packs the batch appended to (and fsyncs the
    packs directory if a pack was started), then commits the new locations in one
    transaction, before the region commits index rows naming them. Never syncfs(): most FUSE
    filesystems and overlayfs `volatile` ignore it and return 0 (see durable.py). After a
    crash, bytes appended but never mapped are garbage that `reclaim_unmapped` punches out.
    A new pack is started at every open, so a pack's tail is never appended to after a crash.
    On a filesystem without hole punching (fallocate EOPNOTSUPP: NFS 3, most FUSE ones) a
    deleted object's bytes stay in its pack until every object there is gone and the pack
    is unlinked.

    Objects of layouts 1 and 2 (one file each, `ab/cd/key` then `ab/key`) are still read,
    listed and deleted where they are; new ones go to packs. Layout 1 is renamed to 2 on open.
    """

    TMP_SUFFIX = ".tmp"
    remote = False
    interrupted = False
    LAYOUT = 3
    LAYOUT_FILE = ".layout"  # holds the layout number; absent before layout 2
    PACK_BYTES = 64 << 20  # a pack is closed once it reaches this size
    READ_FDS = 64  # pack fds kept open for reads (4 GiB of packs; far below RLIMIT_NOFILE)

    def __init__(self, root: Path, *, readonly: bool = False):
        self.root = root
        self.readonly = readonly
        self.packs_dir = root / "packs"
        self._db_path = root / "packs.db"
        self._idle_readers: list[sqlite3.Connection] = []
        self._lock = threading.Lock()  # the current pack, the unsynced map, the writer
        self._sync_lock = threading.Lock()
        self._unsynced: dict[str, Location] = {}
        self._appending: dict[int, int] = {}  # pack -> puts reserved there, not yet recorded
        self._retired_fds: dict[int, int] = {}  # full packs' fds, closed after their last put
        self._new_pack_entries = False  # a pack was created since the last sync
        # Read fds of packs, kept open across gets (opening and closing a pack for every
        # block was 13% of a sequential read's CPU, issue 15); see `_borrow_fd`.
        self._read_fds: collections.OrderedDict[int, _ReadFd] = collections.OrderedDict()
        self.can_punch = True  # False once the filesystem said fallocate is not supported
        self._connections: list[sqlite3.Connection] = []
        self._writer: sqlite3.Connection | None = None
        self._pack_fd = -1
        self._pack_id = 0
        self._pack_size = 0
        if readonly:
            return
        durable.make_dirs(root)
        self.reserve = space_reserve(root)
        layout = self.layout()
        if layout < 2:
            self._migrate_from_layout_1()
        durable.make_dirs(self.packs_dir)
        self._writer = self._connect()
        self._writer.executescript(PACKS_SCHEMA)
        if layout < self.LAYOUT or self._layout_text() != f"{self.LAYOUT}\n":
            self._write_layout()
        self._pack_id = self._last_pack_id()

    # --- connections and layout ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            conn = sqlite3.connect(
                f"file:{self._db_path}?mode=ro", uri=True, check_same_thread=False
            )
        else:
            conn = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA busy_timeout = 10000")
        with self._lock:
            self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection | None]:
        """A connection for lookups, one thread at a time; idle ones are kept for reuse, so
        worker threads that come and go do not each leave a connection behind."""
        with self._lock:
            conn = self._idle_readers.pop() if self._idle_readers else None
        if conn is None:
            if self.readonly and not self._db_path.exists():
                yield None  # a layout 2 store that no daemon has opened since
                return
            conn = self._connect()
        try:
            yield conn
        finally:
            with self._lock:
                self._idle_readers.append(conn)

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
            self._idle_readers = []
            for pack in list(self._read_fds):
                self._forget_read_fd(pack)
            for fd in [self._pack_fd, *self._retired_fds.values()]:
                if fd >= 0:
                    os.close(fd)
            self._pack_fd, self._retired_fds = -1, {}
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _layout_text(self) -> str | None:
        try:
            return (self.root / self.LAYOUT_FILE).read_text(errors="replace")
        except FileNotFoundError:
            return None

    def layout_problem(self) -> str | None:
        """What is wrong with the layout marker, if anything (`snapfs check` reports it;
        opening the backend rebuilds it from what is on disk)."""
        text = self._layout_text()
        if text is None:
            if self._db_path.exists() or self.packs_dir.exists():
                return f"{self.LAYOUT_FILE} is missing"
            return None
        if not text.strip():
            return f"{self.LAYOUT_FILE} is empty"
        try:
            number = int(text)
        except ValueError:
            return f"{self.LAYOUT_FILE} does not hold a layout number ({text[:20]!r})"
        if not 1 <= number <= self.LAYOUT:
            return f"{self.LAYOUT_FILE} names layout {number}, this snapfs knows 1-{self.LAYOUT}"
        return None

    def layout(self) -> int:
        """The layout of the objects on disk. The marker is derivable: if it is missing
        beside packs, empty or unreadable (a power loss before it reached the disk), the
        layout is read from what is there instead, with a warning, and the marker
        rewritten; no store becomes unmountable because of one small file."""
        problem = self.layout_problem()
        if problem is None:
            text = self._layout_text()
            return 1 if text is None else int(text)
        layout = self._layout_on_disk()
        log.warning(
            "block store %s: %s; layout %d found on disk%s",
            self.root,
            problem,
            layout,
            "" if self.readonly else ", marker rewritten",
        )
        return layout

    def _layout_on_disk(self) -> int:
        if self._db_path.exists() or self.packs_dir.exists():
            return 3
        for first in os.scandir(self.root):
            if first.is_dir(follow_symlinks=False) and len(first.name) == 2:
                for second in os.scandir(first.path):
                    if is_object_name(second.name):
                        return 2
                    if second.is_dir(follow_symlinks=False):
                        return 1
        return 1  # nothing stored yet: a fresh directory, treated as the oldest layout

    def _write_layout(self) -> None:
        durable.write_file(self.root / self.LAYOUT_FILE, f"{self.LAYOUT}\n".encode())

    def _migrate_from_layout_1(self) -> None:
        """`ab/cd/key` -> `ab/key`. Every step is a rename, so a crash midway leaves objects
        at one of the two places and the next open carries on; the layout file comes last."""
        moved = 0
        for first in os.scandir(self.root):
            if not first.is_dir(follow_symlinks=False) or first.name == "packs":
                continue
            for second in os.scandir(first.path):
                if not second.is_dir(follow_symlinks=False):
                    continue
                for entry in os.scandir(second.path):
                    os.rename(entry.path, os.path.join(first.path, entry.name))
                    moved += 1
                durable.fsync_dir(first.path)  # the moved entries, before their old dir goes
                os.rmdir(second.path)
        if moved:
            durable.fsync_dir(self.root)
            log.info("block objects in %s moved to layout 2: %d objects", self.root, moved)

    def _pack_path(self, pack: int) -> Path:
        return self.packs_dir / f"{pack:08d}.pack"

    def _last_pack_id(self) -> int:
        ids = [int(p.stem) for p in self.packs_dir.glob("*.pack") if p.stem.isdigit()]
        return max(ids, default=0)

    # --- the object interface --------------------------------------------------------------

    def put(self, key: str, data: Buffers) -> None:
        """Append an object to the current pack; durable after the next `sync()`."""
        buffers = pieces(data)
        size = sum(len(buffer) for buffer in buffers)
        if free_bytes(self.root) < size + self.reserve:
            raise StoreFull(
                f"no space left in the block store at {self.root} (the last "
                f"{self.reserve >> 20} MiB are kept for the index)"
            )
        with self._lock:
            if self._pack_fd < 0 or self._pack_size >= self.PACK_BYTES:
                self._start_pack()
            fd, pack, offset = self._pack_fd, self._pack_id, self._pack_size
            self._pack_size += size
            self._appending[pack] = self._appending.get(pack, 0) + 1
        try:
            _write_all(fd, buffers, offset)
        except OSError as exc:
            with contextlib.suppress(OSError):
                punch_hole(fd, offset, size)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left in the block store at {self.root}") from exc
            raise
        else:
            with self._lock:
                self._unsynced[key] = Location(pack, offset, size)
        finally:
            with self._lock:
                self._appending[pack] -= 1
                if not self._appending[pack]:
                    del self._appending[pack]
                    retired = self._retired_fds.pop(pack, None)
                    if retired is not None:
                        os.close(retired)

    def _start_pack(self) -> None:
        """Under `_lock`: retire the full pack and open the next one (never an old one). A
        put still writing into the full pack holds its fd: closing it now would let the next
        open reuse the number and send those bytes into the wrong pack."""
        if self._pack_fd >= 0:
            if self._pack_id in self._appending:
                self._retired_fds[self._pack_id] = self._pack_fd
            else:
                os.close(self._pack_fd)
            self._pack_fd = -1
        pack = self._pack_id + 1
        try:
            fd = os.open(self._pack_path(pack), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left in the block store at {self.root}") from exc
            raise
        self._pack_fd, self._pack_id, self._pack_size = fd, pack, 0
        self._new_pack_entries = True

    def locate(self, key: str) -> Location | None:
        with self._lock:
            location = self._unsynced.get(key)
        if location is not None:
            return location
        with self._reader() as conn:
            if conn is None:
                return None
            row = conn.execute(
                "SELECT pack, offset, length FROM objects WHERE key = ?", [bytes.fromhex(key)]
            ).fetchone()
        return Location(*row) if row else None

    def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError if it is not stored (or its pack is gone).
        A pack cut short returns the bytes that are left: the caller's decode rejects them."""
        location = self.locate(key)
        if location is None:
            with open(object_path(self.root, key), "rb") as f:
                return f.read()
        entry = self._borrow_fd(location.pack)
        try:
            if os.fstat(entry.fd).st_nlink == 0:
                # Unlinked behind our back (a damaged or hand-edited store): its objects are
                # missing, as they were when every get opened the pack by name.
                with self._lock:
                    self._forget_read_fd(location.pack)
                raise FileNotFoundError(errno.ENOENT, "pack is gone", str(location.pack))
            return os.pread(entry.fd, location.length, location.offset)
        finally:
            self._return_fd(entry)

    def _borrow_fd(self, pack: int) -> _ReadFd:
        """A read fd of `pack`, from the cache or opened now; hand it back with `_return_fd`.

        An fd is closed only when nobody holds it (`users`): closing one that another thread
        is about to pread would let the number be reused for another file and that thread
        read the wrong bytes. A pack that is unlinked is forgotten here first
        (`_forget_read_fd`), and pack numbers are never reused within a process (see
        `_start_pack`), so a cached fd always belongs to the pack its number names."""
        with self._lock:
            entry = self._read_fds.get(pack)
            if entry is not None:
                self._read_fds.move_to_end(pack)
                entry.users += 1
                return entry
        fd = os.open(self._pack_path(pack), os.O_RDONLY)  # FileNotFoundError: pack gone
        with self._lock:
            entry = self._read_fds.get(pack)
            if entry is None:
                entry = self._read_fds[pack] = _ReadFd(fd)
                self._evict_read_fds()
            else:  # another thread opened it meanwhile
                os.close(fd)
            entry.users += 1
            return entry

    def _return_fd(self, entry: _ReadFd) -> None:
        with self._lock:
            entry.users -= 1
            if entry.forgotten and not entry.users:
                os.close(entry.fd)

    def _evict_read_fds(self) -> None:
        """Under `_lock`: close the least recently used idle fds beyond `READ_FDS`."""
        excess = len(self._read_fds) - self.READ_FDS
        for pack in list(self._read_fds):
            if excess <= 0:
                break
            if not self._read_fds[pack].users:
                self._forget_read_fd(pack)
                excess -= 1

    def _forget_read_fd(self, pack: int) -> None:
        """Under `_lock`: drop `pack`'s cached fd (it is being unlinked, or evicted); it is
        closed now, or by its last user."""
        entry = self._read_fds.pop(pack, None)
        if entry is None:
            return
        entry.forgotten = True
        if not entry.users:
            os.close(entry.fd)

    def exists(self, key: str) -> bool:
        return self.locate(key) is not None or object_path(self.root, key).exists()

    def delete(self, key: str) -> None:
        self.delete_many([key])

    def delete_many(self, keys: Iterable[str], each: Callable[[], None] | None = None) -> None:
        """Punch the objects out of their packs, then forget them (one transaction); a pack
        left without objects is unlinked. A crash midway leaves mapped zeros that nothing
        names, which orphan collection deletes again. `each` is called after every object
        is punched (a fault point for the crash tests)."""
        located: list[tuple[str, Location]] = []
        for key in keys:
            location = self.locate(key)
            if location is None:
                with contextlib.suppress(FileNotFoundError):
                    object_path(self.root, key).unlink()
                if each is not None:
                    each()
            else:
                located.append((key, location))
        if not located:
            return
        for pack, ranges in _by_pack(loc for _, loc in located).items():
            try:
                fd = os.open(self._pack_path(pack), os.O_WRONLY)
            except FileNotFoundError:
                continue
            try:
                for offset, length in ranges:
                    self._punch(fd, offset, length)
                    if each is not None:
                        each()
            finally:
                os.close(fd)
        with self._lock:
            assert self._writer is not None, "read-only backend"
            for key, location in located:
                if self._unsynced.get(key) == location:
                    del self._unsynced[key]
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                self._writer.executemany(
                    "DELETE FROM objects WHERE key = ?", [(bytes.fromhex(k),) for k, _ in located]
                )
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            empty = [
                pack
                for pack in {loc.pack for _, loc in located}
                if not self._pack_in_use(pack)
                and self._writer.execute(
                    "SELECT 1 FROM objects WHERE pack = ? LIMIT 1", [pack]
                ).fetchone()
                is None
            ]
        for pack in empty:
            with self._lock:
                self._forget_read_fd(pack)
            with contextlib.suppress(FileNotFoundError):
                self._pack_path(pack).unlink()

    def _punch(self, fd: int, offset: int, length: int) -> None:
        """Punch a hole if the filesystem can; if it cannot, the bytes stay (unmapped, so
        harmless) until the pack is unlinked. Said once per backend, not per object."""
        if not self.can_punch or length == 0:  # fallocate refuses an empty range (EINVAL)
            return
        try:
            punch_hole(fd, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self.can_punch = False
            log.warning(
                "block store %s: the filesystem cannot punch holes (fallocate: %s); space of "
                "deleted blocks comes back only when a whole pack is empty",
                self.root,
                os.strerror(exc.errno),
            )

    def interrupt(self) -> None:
        """Nothing waits on a local disk the way a remote store is waited for."""

    def _pack_in_use(self, pack: int) -> bool:
        """Under `_lock`: being appended to, or holding objects not synced yet. (A put
        reserves its range before writing it: a pack that looks empty may not be.)"""
        return (
            pack == self._pack_id
            or pack in self._appending
            or any(loc.pack == pack for loc in self._unsynced.values())
        )

    def keys(self) -> Iterator[str]:
        """Every stored object key (packed, unsynced or a file of layouts 1-2); leftover
        temp files of an interrupted put are removed (read-only: listed as they are)."""
        with self._lock:
            unsynced = set(self._unsynced)
        yield from unsynced
        with self._reader() as conn:
            packed = [] if conn is None else conn.execute("SELECT key FROM objects").fetchall()
        for (key,) in packed:
            if key.hex() not in unsynced:  # overwritten, the new copy not synced yet
                yield key.hex()
        for dirpath, dirs, files in os.walk(self.root):
            if dirpath == str(self.root) and "packs" in dirs:
                dirs.remove("packs")
            for name in files:
                if not is_object_name(name):
                    continue
                if name.endswith(self.TMP_SUFFIX) and not self.readonly:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(dirpath, name))
                    continue
                yield name

    def sync(self) -> None:
        """Make every object put so far durable: the packs they were appended to first
        (fdatasync each; fsync of the packs directory if a pack is new), then their
        locations, in one transaction."""
        with self._sync_lock:
            with self._lock:
                batch = dict(self._unsynced)
                new_entries, self._new_pack_entries = self._new_pack_entries, False
            try:
                for pack in sorted({loc.pack for loc in batch.values()}):
                    # A pack unlinked meanwhile held only objects deleted meanwhile.
                    with contextlib.suppress(FileNotFoundError):
                        durable.fdatasync_path(self._pack_path(pack))
                if new_entries:
                    durable.fsync_dir(self.packs_dir)
            except BaseException:
                with self._lock:
                    self._new_pack_entries = self._new_pack_entries or new_entries
                raise
            with self._lock:
                # An object deleted while the packs were synced must not get its location back.
                batch = {k: loc for k, loc in batch.items() if self._unsynced.get(k) == loc}
                if not batch:
                    return
                assert self._writer is not None, "read-only backend"
                self._writer.execute("BEGIN IMMEDIATE")
                try:
                    self._writer.executemany(
                        "INSERT OR REPLACE INTO objects(key, pack, offset, length) "
                        "VALUES (?, ?, ?, ?)",
                        [
                            (bytes.fromhex(k), loc.pack, loc.offset, loc.length)
                            for k, loc in batch.items()
                        ],
                    )
                    self._writer.execute("COMMIT")
                except BaseException:
                    self._writer.execute("ROLLBACK")
                    raise
                for key, location in batch.items():
                    if self._unsynced.get(key) == location:
                        del self._unsynced[key]

    def pack_problems(self) -> list[str]:
        """Packs the locations name that are missing or shorter than the bytes named in
        them: what a power loss leaves when pack data was not durable before its index
        rows were (`snapfs check`)."""
        with self._reader() as conn:
            if conn is None:
                return []
            rows = conn.execute(
                "SELECT pack, count(*), max(offset + length) FROM objects GROUP BY pack"
            ).fetchall()
        problems = []
        for pack, count, end in rows:
            path = self._pack_path(pack)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                problems.append(f"pack {path.name} is missing; {count} objects are named in it")
                continue
            if size < end:
                problems.append(
                    f"pack {path.name} is {size} bytes but its objects reach byte {end}"
                )
        return problems

    def reclaim_unmapped(self) -> int:
        """Punch out pack bytes no location names (appended before a crash, never synced)
        and unlink packs with no objects. Only while no put runs: at mount, like orphan
        collection. Returns the bytes given back."""
        assert self._writer is not None, "read-only backend"
        reclaimed = 0
        for path in sorted(self.packs_dir.glob("*.pack")):
            if not path.stem.isdigit():
                continue
            pack = int(path.stem)
            if pack == self._pack_id and self._pack_fd >= 0:
                continue
            ranges = self._writer.execute(
                "SELECT offset, length FROM objects WHERE pack = ? ORDER BY offset", [pack]
            ).fetchall()
            if not ranges:
                reclaimed += path.stat().st_size
                with self._lock:
                    self._forget_read_fd(pack)
                path.unlink()
                continue
            with open(path, "r+b") as f:
                end = ranges[-1][0] + ranges[-1][1]
                size = os.fstat(f.fileno()).st_size
                if size > end:
                    os.ftruncate(f.fileno(), end)
                    reclaimed += size - end
                position = 0
                for offset, length in ranges:
                    if offset > position:
                        self._punch(f.fileno(), position, offset - position)
                    position = max(position, offset + length)
            fault_point("pack_reclaimed")
        if reclaimed:
            log.warning("block store %s: reclaimed %d unmapped pack bytes", self.root, reclaimed)
        return reclaimed

    def destroy(self) -> None:
        """Remove every object and the root itself (the region is being deleted)."""
        self.close()
        for dirpath, dirs, files in os.walk(self.root, topdown=False):
            for name in files:
                os.unlink(os.path.join(dirpath, name))
            for name in dirs:
                os.rmdir(os.path.join(dirpath, name))
        with contextlib.suppress(FileNotFoundError):
            self.root.rmdir()


def _write_all(fd: int, buffers: list[bytes | bytearray | memoryview], offset: int) -> None:
    """Write the buffers back to back at `offset`: one pwritev, and more only if the
    kernel took part of them (a signal, a nearly full disk)."""
    views = [memoryview(buffer).cast("B") for buffer in buffers if len(buffer)]
    while views:
        written = os.pwritev(fd, views, offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


@dataclass
class _ReadFd:
    """A cached read fd of one pack: how many gets use it now, and whether it has left the
    cache (then its last user closes it)."""

    fd: int
    users: int = 0
    forgotten: bool = False


def _by_pack(locations: Iterable[Location]) -> dict[int, list[tuple[int, int]]]:
    ranges: dict[int, list[tuple[int, int]]] = {}
    for location in locations:
        ranges.setdefault(location.pack, []).append((location.offset, location.length))
    return ranges


if TYPE_CHECKING:
    _conforms: type[ObjectStore] = LocalBackend  # mypy checks that LocalBackend is an ObjectStore
