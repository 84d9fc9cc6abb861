"""Block objects packed many to an S3 object, with a trailer that lists them.

One PUT per block cost about 2.1 million PUTs per TiB of 512 KiB blocks; restic's 16 MiB
packs need 65 thousand. `PackedS3Backend` keeps the `ObjectStore` interface of a region
(put/get/delete/keys/sync) and stores objects in packs instead:

    PREFIX/packs/<pack id>     objects back to back, then the trailer (below)
    PREFIX/blocks/<key>        objects of regions written before packing (read, listed,
                               deleted; never written any more)

A put appends the object to the open pack, a spool file on local disk (`STATE/spool/`, so
memory stays flat); a pack is closed once it reaches `PACK_TARGET` bytes or `PACK_AGE`
seconds, and then uploaded by the thread whose put closed it. `sync()` closes the open pack,
uploads every closed pack not uploaded yet (retrying one that failed before) and then commits
the locations of their objects in `STATE/packs.db`, one transaction. That keeps the region's
order "object durable -> index row": a location is recorded only once S3 acknowledged its
pack's PUT, and the index rows naming the objects are committed after `sync()` returns. A
crash before the PUT loses only unsynced objects (the spool is emptied at open); a crash
after the PUT and before the location commit leaves a pack that no row names, which
`reclaim_unmapped` (at mount) deletes.

Reads are one ranged GET of the object's bytes (`Range: bytes=a-b`); an object still in
the spool is read from there. Pack ids are random 128-bit hex, so two stores never pick one
id; a pack is never rewritten after its PUT.

Liveness: `packs.db` counts each pack's live bytes. Deleting an object drops its row and its
bytes from the pack's live count; a pack with no live bytes is marked dead and its S3 object
is deleted `grace` seconds later (a reader that looked up a location just before a repack,
and a disaster-recovery copy of the bucket whose manifests still name the old pack, keep
reading it meanwhile). `maintain()` (the region's collector calls it) deletes dead packs past
their grace, merges small packs (a writer that fsyncs often uploads one per `sync()`) once
at least `SMALL_MERGE_MIN` of them have settled, and repacks packs whose dead share passed
`REPACK_DEAD_SHARE`: the live objects
are copied as they are stored, into the open pack, and their rows switched to the new pack
in the commit of that pack, each only if it still points at the old one (an object deleted
meanwhile stays deleted). Bytes are copied verbatim: an encrypted block's AEAD is bound to
its block id and region, never to where it is stored, so repacking never re-encrypts.

The trailer (pack format 1), written after the last object::

    sections   one per key the pack's objects are under (zero key id: plain blocks)
      header   key id (16), nonce (12), entries (u32), body length (u32)
      body     entries of 44 bytes: key (32, the block id), offset (u64), length (u32);
               under an encrypted key, AES-256-GCM of them (key: the CMK's pack-trailer key,
               associated data: the pack id and the section header)
    footer     sections' length (u32), sections (u16), format (u8), flags (u8, 0),
               magic b"SNFPACK\\0"

so a pack describes itself: `read_trailer` lists what a pack holds with one suffix GET,
which lets a bucket be rebuilt into an index without a database (service/regionadmin.py),
while the block ids of encrypted blocks are listed only under their key. Which key an
object is under, and the AEAD, come from the region (`TrailerSealer`, set by the block
repository): this layer does not read block headers itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from snapfs import durable
from snapfs.errors import BackendUnavailable, BlockCorrupt, SnapfsError, StoreFull
from snapfs.faults import fault_point
from snapfs.objects.local import _write_all
from snapfs.objects.protocol import Buffers, pieces
from snapfs.objects.s3 import S3Backend

if TYPE_CHECKING:
    from snapfs.objects.protocol import ObjectStore

log = logging.getLogger(__name__)

PACKS_PREFIX = "packs/"
LEGACY_PREFIX = "blocks/"
PACK_TARGET = 16 << 20  # a pack is closed at this size: restic's choice, 65 Ki PUTs a TiB
PACK_AGE = 5.0  # seconds: a pack is closed this long after its first object at the latest
GRACE = 900.0  # seconds a dead pack stays readable (SNAPFS_PACK_GRACE overrides, for tests)
REPACK_DEAD_SHARE = 0.5  # a pack more dead than this is repacked
REPACK_BYTES = 256 << 20  # live bytes copied per maintain() call at most
SMALL_SHARE = 0.25  # a pack under a quarter of the target size is small
SMALL_AGE = 600.0  # seconds a small pack settles before it is merged (its blocks may die)
SMALL_MERGE_MIN = 4  # small packs merged at once at the least (else it saves too little)
FORMAT = 1
MAGIC = b"SNFPACK\0"
FOOTER = struct.Struct("<IHBB8s")
SECTION = struct.Struct("<16s12sII")
ENTRY = struct.Struct("<32sQI")
TAIL_GUESS = 64 << 10  # bytes of a pack's end fetched to read its trailer in one GET
HEAD_BYTES = 64  # what the sealer sees of an object to tell its key
CLOSE_WAIT = 60.0  # seconds close() waits for uploads under way (unmount interrupts them)
PLAIN = bytes(16)

STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS packs(
    id TEXT PRIMARY KEY,        -- PREFIX/packs/<id>
    size INTEGER NOT NULL,      -- bytes of the S3 object, trailer included
    live INTEGER NOT NULL,      -- bytes of objects rows still name
    created_at REAL NOT NULL,
    dead_since REAL             -- when live reached 0 (its object goes after the grace)
);
CREATE TABLE IF NOT EXISTS objects(
    key BLOB PRIMARY KEY,       -- the object key (block id) as bytes
    pack TEXT NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_by_pack ON objects(pack, offset);
"""


class TrailerSealer(Protocol):
    """What the region tells a packed store about its objects (blocks/repository.py)."""

    def group(self, head: bytes) -> bytes:
        """The 16-byte key id the object starting with `head` is encrypted under; zeros
        for a plain object."""
        ...

    def seal(self, group: bytes, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        """`body` encrypted under `group`'s pack-trailer key."""
        ...

    def open(self, group: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
        """The body of a sealed section; raises (KeyNotFound, BlockCorrupt) if it cannot."""
        ...


@dataclass(frozen=True)
class PackLocation:
    pack: str
    offset: int
    length: int


@dataclass
class _Pack:
    """A pack in the spool: open (appended to), then closed (trailer written), uploaded,
    and committed (its rows in packs.db, its spool file gone)."""

    id: str
    path: Path
    fd: int
    started: float
    size: int = 0
    entries: dict[str, tuple[int, int, bytes]] = field(default_factory=dict)
    moved_from: dict[str, str] = field(default_factory=dict)  # repacked key -> old pack
    closed: bool = False
    uploading: bool = False
    uploaded: bool = False


def new_pack_id() -> str:
    return secrets.token_hex(16)


def encode_trailer(
    pack_id: str, entries: Iterable[tuple[str, int, int, bytes]], sealer: TrailerSealer | None
) -> bytes:
    """The trailer of a pack holding `entries` (key, offset, length, group)."""
    groups: dict[bytes, list[bytes]] = {}
    for key, offset, length, group in entries:
        groups.setdefault(group, []).append(ENTRY.pack(bytes.fromhex(key), offset, length))
    sections = []
    for group, rows in sorted(groups.items()):
        body = b"".join(rows)
        nonce = bytes(12)
        if group != PLAIN:
            if sealer is None:
                raise BlockCorrupt("an encrypted object was packed with no key to list it")
            nonce = secrets.token_bytes(12)
            size = len(body) + 16  # the GCM tag
            header = SECTION.pack(group, nonce, len(rows), size)
            body = sealer.seal(group, nonce, body, pack_id.encode() + header)
        else:
            header = SECTION.pack(group, nonce, len(rows), len(body))
        sections.append(header + body)
    joined = b"".join(sections)
    return joined + FOOTER.pack(len(joined), len(sections), FORMAT, 0, MAGIC)


@dataclass
class Trailer:
    pack: str
    entries: list[tuple[str, int, int]]  # key, offset, length
    unreadable: list[str]  # "N objects under key K: reason"
    sealed: int = 0  # objects listed in sections that did not open


def decode_trailer(pack_id: str, tail: bytes, sealer: TrailerSealer | None) -> Trailer:
    """A pack's trailer from its last bytes (at least the trailer and footer)."""
    if len(tail) < FOOTER.size:
        raise BlockCorrupt(f"pack {pack_id} is too short for a trailer")
    length, count, version, _, magic = FOOTER.unpack_from(tail, len(tail) - FOOTER.size)
    if magic != MAGIC or version != FORMAT:
        raise BlockCorrupt(f"pack {pack_id} has no snapfs pack trailer (format {FORMAT})")
    start = len(tail) - FOOTER.size - length
    if start < 0:
        raise BlockCorrupt(f"pack {pack_id}: its trailer is cut short")
    trailer = Trailer(pack_id, [], [])
    at = start
    for _ in range(count):
        group, nonce, rows, size = SECTION.unpack_from(tail, at)
        header = tail[at : at + SECTION.size]
        body = tail[at + SECTION.size : at + SECTION.size + size]
        at += SECTION.size + size
        if group != PLAIN:
            try:
                if sealer is None:
                    raise BlockCorrupt("no keys here")
                body = sealer.open(group, nonce, body, pack_id.encode() + header)
            except SnapfsError as exc:
                trailer.unreadable.append(f"{rows} objects under key {group.hex()}: {exc}")
                trailer.sealed += rows
                continue
        for n in range(rows):
            key, offset, olen = ENTRY.unpack_from(body, n * ENTRY.size)
            trailer.entries.append((key.hex(), offset, olen))
    if at != len(tail) - FOOTER.size:
        raise BlockCorrupt(f"pack {pack_id}: its trailer's sections do not add up")
    return trailer


def read_trailer(packs: S3Backend, pack_id: str, sealer: TrailerSealer | None) -> Trailer:
    """What a pack holds, from its trailer (one suffix GET, two for a long trailer);
    `packs` is the region's `packs/` prefix."""
    tail = packs.get_tail(pack_id, TAIL_GUESS)
    if len(tail) >= FOOTER.size:
        needed = FOOTER.unpack_from(tail, len(tail) - FOOTER.size)[0] + FOOTER.size
        if needed > len(tail) == TAIL_GUESS:
            tail = packs.get_tail(pack_id, needed)
    return decode_trailer(pack_id, tail, sealer)


RANGE_GAP = 64 << 10  # dead bytes a repack reads through rather than start another GET


K = TypeVar("K")


def live_ranges(
    rows: Sequence[tuple[K, int, int]],
) -> list[tuple[int, int, list[tuple[K, int, int]]]]:
    """Rows (key, offset, length) in offset order as byte ranges to GET: neighbours closer
    than RANGE_GAP share a range. Each item: start, end, the rows inside."""
    ranges: list[tuple[int, int, list[tuple[K, int, int]]]] = []
    for row in rows:
        _, offset, length = row
        if ranges and offset - ranges[-1][1] <= RANGE_GAP:
            start, _, members = ranges[-1]
            members.append(row)
            ranges[-1] = (start, max(ranges[-1][1], offset + length), members)
        else:
            ranges.append((offset, offset + length, [row]))
    return ranges


@dataclass(frozen=True)
class PackSummary:
    packs: int
    bytes: int  # of the pack objects, trailers included
    live_bytes: int  # of blocks a location names; the rest waits for a repack or its grace


def pack_summary(state_dir: Path) -> PackSummary | None:
    """What a bucket region's `packs.db` says of its packs (for `snapfs status`), read-only
    and beside a running daemon; None where there is no packs.db."""
    path = state_dir / "packs.db"
    if not path.exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(live), 0) FROM packs "
            "WHERE live > 0 OR dead_since IS NOT NULL"
        ).fetchone()
    finally:
        conn.close()
    return PackSummary(int(row[0]), int(row[1]), int(row[2]))


class PackedS3Backend:
    """A region's objects in packs under `PREFIX/packs/`; see the module docstring."""

    remote = True

    def __init__(
        self,
        location_backend: S3Backend,
        state_dir: Path,
        *,
        readonly: bool = False,
        grace: float | None = None,
        pack_target: int = PACK_TARGET,
        pack_age: float = PACK_AGE,
    ):
        self.packs = location_backend.sibling(PACKS_PREFIX)
        self.legacy = location_backend.sibling(LEGACY_PREFIX)
        self.state_dir = state_dir
        self.spool = state_dir / "spool"
        self.readonly = readonly
        if grace is None:
            grace = float(os.environ.get("SNAPFS_PACK_GRACE", GRACE))
        self.grace = grace
        self.pack_target = pack_target
        self.pack_age = pack_age
        self.sealer: TrailerSealer | None = None  # set by the region before its first put
        # Called (in the uploading thread) with a pack's id before its PUT: a shared region
        # registers the pack in its ledger first (service/shared.py), so that a pack of a
        # host that dies is found and deleted, never mistaken for a live one.
        self.on_upload: Callable[[str], None] | None = None
        # Called (in the uploading thread) after a pack's PUT with its id, size and the
        # objects in it (key, offset, length): a shared region publishes them at once.
        self.on_uploaded: Callable[[str, int, list[tuple[str, int, int]]], None] | None = None
        self._lock = threading.Lock()
        self._uploaded = threading.Condition(self._lock)
        self._open: _Pack | None = None
        self._closed: dict[str, _Pack] = {}
        self._pending: dict[str, tuple[_Pack, int, int]] = {}  # key -> pack, offset, length
        self.puts = 0  # PUTs of packs done by this instance (for the bench and the log)
        if not readonly:
            durable.make_dirs(self.spool)
        self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            path = self.state_dir / "packs.db"
            if not path.exists():
                conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
                conn.executescript(STATE_SCHEMA)
                return conn
            uri = f"file:{path}?mode=ro"
            return sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        path = self.state_dir / "packs.db"
        new = not path.exists()
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.executescript(STATE_SCHEMA)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(FORMAT),))
        if new:  # its entry must survive a power loss before the first location commits
            durable.fsync_dir(self.state_dir)
        return conn

    @property
    def interrupted(self) -> bool:
        return self.packs.interrupted

    def interrupt(self) -> None:
        self.packs.interrupt()

    # --- writing ---------------------------------------------------------------------------

    def put(self, key: str, data: Buffers) -> None:
        """Append to the open pack in the spool; durable after the next `sync()`."""
        self._append(key, pieces(data), moved_from=None)

    def _append(
        self, key: str, buffers: list[bytes | bytearray | memoryview], moved_from: str | None
    ) -> None:
        if len(key) != 64:
            raise ValueError(f"a packed store keeps block ids, not {key!r}")
        if self.packs.interrupted:
            raise BackendUnavailable(f"put {key} interrupted: snapfs stops")
        size = sum(len(b) for b in buffers)
        group = self._group_of(buffers)
        with self._lock:
            if moved_from is not None and (
                key in self._pending or self._pack_of(key) != moved_from
            ):
                return  # a repack copy of an object deleted or put again meanwhile: drop it
            pack = self._open if self._open is not None else self._start_pack()
            offset = pack.size
            try:
                _write_all(pack.fd, buffers, offset)  # the spool is local: microseconds
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StoreFull(f"no space left for the upload spool at {self.spool}") from exc
                raise
            pack.size += size
            pack.entries[key] = (offset, size, group)
            if moved_from is not None:
                pack.moved_from[key] = moved_from
            else:
                pack.moved_from.pop(key, None)
            self._pending[key] = (pack, offset, size)
            full = pack.size >= self.pack_target or time.monotonic() - pack.started > self.pack_age
            closed = self._close_open() if full else None
        if closed is not None:
            try:
                self._upload(closed)
            except SnapfsError as exc:  # sync() retries it; the put itself is spooled
                log.warning("pack %s: upload failed (%s); retried at the next sync", closed.id, exc)

    def _group_of(self, buffers: Sequence[bytes | bytearray | memoryview]) -> bytes:
        if self.sealer is None:
            return PLAIN
        head = bytearray()
        for buffer in buffers:
            head += bytes(buffer[: HEAD_BYTES - len(head)])
            if len(head) >= HEAD_BYTES:
                break
        return self.sealer.group(bytes(head))

    def _start_pack(self) -> _Pack:
        pack_id = new_pack_id()
        path = self.spool / pack_id
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._open = _Pack(pack_id, path, fd, time.monotonic())
        return self._open

    def _close_open(self) -> _Pack | None:
        """Under `_lock`: write the open pack's trailer and move it to the closed ones."""
        pack, self._open = self._open, None
        if pack is None:
            return None
        if not pack.entries:
            os.close(pack.fd)
            pack.path.unlink()
            return None
        rows = [(k, off, length, group) for k, (off, length, group) in pack.entries.items()]
        trailer = encode_trailer(pack.id, rows, self.sealer)
        _write_all(pack.fd, [trailer], pack.size)
        pack.size += len(trailer)
        pack.closed = True
        self._closed[pack.id] = pack
        return pack

    def _upload(self, pack: _Pack) -> None:
        """PUT a closed pack (one upload of a pack at a time; others wait for it)."""
        with self._lock:
            while pack.uploading:
                self._uploaded.wait()
            if pack.uploaded:
                return
            pack.uploading = True
        try:
            if self.on_upload is not None:
                self.on_upload(pack.id)
            data = os.pread(pack.fd, pack.size, 0)  # closed: nobody writes to it any more
            self.packs.put(pack.id, data)
            fault_point("pack_uploaded")
            if self.on_uploaded is not None:
                with self._lock:
                    entries = [(k, off, length) for k, (off, length, _) in pack.entries.items()]
                self.on_uploaded(pack.id, pack.size, entries)
            with self._lock:
                pack.uploaded = True
                self.puts += 1
            log.debug("uploaded pack %s (%d objects, %d bytes)", pack.id, len(pack.entries),
                      pack.size)  # fmt: skip
        finally:
            with self._lock:
                pack.uploading = False
                self._uploaded.notify_all()

    def flush_open(self) -> None:
        """Close the open pack and upload it now, without recording its locations (a
        shared region's writer about to wait for another host's upload first makes its
        own claimed blocks available: two hosts never wait on each other's spool)."""
        with self._lock:
            pack = self._close_open()
        if pack is not None:
            try:
                self._upload(pack)
            except SnapfsError as exc:  # sync() retries it
                log.warning("pack %s: upload failed (%s); retried at the next sync", pack.id, exc)

    def sync(self) -> None:
        """Upload every pack with objects put so far, then record where they are."""
        with self._lock:
            self._close_open()
            waiting = list(self._closed.values())
        if waiting and self.packs.interrupted:  # what was put cannot be made durable now
            raise BackendUnavailable(f"{len(waiting)} packs not uploaded: snapfs stops")
        for pack in waiting:
            self._upload(pack)
        with self._lock:
            done = [pack for pack in self._closed.values() if pack.uploaded]
            if done:
                self._commit(done)

    def _commit(self, packs: list[_Pack]) -> None:
        """Under `_lock`: the uploaded packs' objects into packs.db, one transaction."""
        now = time.time()
        conn = self._db
        conn.execute("BEGIN IMMEDIATE")
        try:
            for pack in packs:
                conn.execute(
                    "INSERT INTO packs(id, size, live, created_at) VALUES (?, ?, 0, ?)",
                    (pack.id, pack.size, now),
                )
                for key, (offset, length, _) in pack.entries.items():
                    if self._pending.get(key, (None,))[0] is not pack:
                        continue  # deleted, or put again since: its bytes here are dead
                    old = pack.moved_from.get(key)
                    if old is not None and self._pack_of(key) != old:
                        continue  # a repack copy of an object deleted (or moved) meanwhile
                    self._drop_row(key, now)
                    conn.execute(
                        "INSERT INTO objects VALUES (?, ?, ?, ?)",
                        (bytes.fromhex(key), pack.id, offset, length),
                    )
                    conn.execute("UPDATE packs SET live = live + ? WHERE id = ?", (length, pack.id))
                conn.execute(
                    "UPDATE packs SET dead_since = ? WHERE id = ? AND live = 0", (now, pack.id)
                )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        for pack in packs:
            for key in pack.entries:
                if self._pending.get(key, (None,))[0] is pack:
                    del self._pending[key]
            del self._closed[pack.id]
            os.close(pack.fd)
            with contextlib.suppress(FileNotFoundError):
                pack.path.unlink()

    def _pack_of(self, key: str) -> str | None:
        row = self._db.execute(
            "SELECT pack FROM objects WHERE key = ?", (bytes.fromhex(key),)
        ).fetchone()
        return None if row is None else str(row[0])

    def _drop_row(self, key: str, now: float) -> bool:
        """Inside a transaction: forget a committed object; its pack loses its bytes."""
        conn = self._db
        row = conn.execute(
            "DELETE FROM objects WHERE key = ? RETURNING pack, length", (bytes.fromhex(key),)
        ).fetchone()
        if row is None:
            return False
        conn.execute("UPDATE packs SET live = live - ? WHERE id = ?", (row[1], row[0]))
        conn.execute(
            "UPDATE packs SET dead_since = ? WHERE id = ? AND live <= 0 AND dead_since IS NULL",
            (now, row[0]),
        )
        return True

    # --- reading ---------------------------------------------------------------------------

    def locate(self, key: str) -> PackLocation | None:
        """Where a committed object is (None: in the spool, in the old layout, or nowhere)."""
        with self._lock:
            row = self._db.execute(
                "SELECT pack, offset, length FROM objects WHERE key = ?", (bytes.fromhex(key),)
            ).fetchone()
        return None if row is None else PackLocation(str(row[0]), int(row[1]), int(row[2]))

    def locations(self, keys: Sequence[str]) -> tuple[dict[str, PackLocation], dict[str, int]]:
        """Where committed objects are, and the sizes of their packs (objects still in the
        spool, or of the old layout, are left out)."""
        found: dict[str, PackLocation] = {}
        sizes: dict[str, int] = {}
        with self._lock:
            for key in keys:
                row = self._db.execute(
                    "SELECT o.pack, o.offset, o.length, p.size FROM objects o "
                    "JOIN packs p ON p.id = o.pack WHERE o.key = ?",
                    (bytes.fromhex(key),),
                ).fetchone()
                if row is not None:
                    found[key] = PackLocation(str(row[0]), int(row[1]), int(row[2]))
                    sizes[str(row[0])] = int(row[3])
        return found, sizes

    def get(self, key: str) -> bytes:
        with self._lock:
            spooled = self._pending.get(key)
            if spooled is not None:
                pack, offset, length = spooled
                return os.pread(pack.fd, length, offset)
        try:
            found = self.locate(key)
        except ValueError:
            raise FileNotFoundError(key) from None
        if found is not None:
            if not found.length:  # an empty object: S3 has no empty range to ask for
                return b""
            return self.packs.get_range(found.pack, found.offset, found.length)
        return self.legacy.get(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The bytes of those of `keys` that are packed or spooled, with one ranged GET per
        run of neighbours in a pack (a sequential reader's read-ahead: blocks written one
        after another lie one after another). Keys of the old layout, or not stored, are
        left out: the caller gets them one by one."""
        found: dict[str, bytes] = {}
        by_pack: dict[str, list[tuple[str, int, int]]] = {}
        with self._lock:
            for key in keys:
                spooled = self._pending.get(key)
                if spooled is not None:
                    pack, offset, length = spooled
                    found[key] = os.pread(pack.fd, length, offset)
                    continue
                row = self._db.execute(
                    "SELECT pack, offset, length FROM objects WHERE key = ?",
                    (bytes.fromhex(key),),
                ).fetchone()
                if row is not None:
                    by_pack.setdefault(str(row[0]), []).append((key, int(row[1]), int(row[2])))
        for pack_id, rows in by_pack.items():
            rows.sort(key=lambda row: row[1])
            for start, end, members in live_ranges(rows):
                data = self.packs.get_range(pack_id, start, end - start) if end > start else b""
                for key, offset, length in members:
                    found[key] = data[offset - start : offset - start + length]
        return found

    def exists(self, key: str) -> bool:
        with self._lock:
            if key in self._pending:
                return True
        if self.locate(key) is not None:
            return True
        return self.legacy.exists(key)

    def keys(self) -> Iterator[str]:
        with self._lock:
            listed = set(self._pending)
            listed.update(k.hex() for (k,) in self._db.execute("SELECT key FROM objects"))
        yield from listed
        for key in self.legacy.keys():  # noqa: SIM118 - a backend, not a dict
            if key not in listed:
                yield key

    # --- deleting ----------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        self.delete_many([key])

    def delete_many(self, keys: Sequence[str], each: Callable[[], None] | None = None) -> None:
        """Forget packed objects (their packs lose live bytes) and delete old-layout ones."""
        legacy = self._forget(keys, each)
        if legacy:
            self.legacy.delete_many(legacy, each)

    def _forget(self, keys: Sequence[str], each: Callable[[], None] | None) -> list[str]:
        """Drop the spooled and packed objects among `keys` (one packs.db transaction);
        the keys that are neither (objects of the old layout, or none)."""
        legacy: list[str] = []
        packed = 0
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for key in keys:
                    spooled = self._pending.pop(key, None)
                    if spooled is not None and not spooled[0].closed:
                        spooled[0].entries.pop(key, None)  # the trailer will not list it
                    dropped = self._drop_row(key, now)
                    if spooled is not None or dropped:
                        packed += 1
                    else:
                        legacy.append(key)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        if each is not None:
            for _ in range(packed):
                each()
        return legacy

    # --- upkeep ------------------------------------------------------------------------------

    def maintain(self, *, now: float | None = None) -> int:
        """Delete dead packs past their grace and repack the most dead ones (worker thread,
        beside puts and reads). Returns how many objects moved (their manifests name the
        old packs, so the region republishes them)."""
        now = time.time() if now is None else now
        self._delete_dead(now)
        moved = self._repack(now)
        if moved and not self.grace:
            # The packs just emptied, where no grace keeps them: their dead_since is later
            # than `now`, so ask with the clock as it is after the repack.
            self._delete_dead(max(now, time.time()))
        return moved

    def _delete_dead(self, now: float) -> None:
        with self._lock:
            doomed = [
                str(pid)
                for (pid,) in self._db.execute(
                    "SELECT id FROM packs WHERE live <= 0 AND dead_since <= ?", (now - self.grace,)
                )
            ]
        if not doomed:
            return
        self.packs.delete_many(doomed)  # the objects first: a row never outlives... its pack
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "DELETE FROM packs WHERE id = ? AND live <= 0", [(p,) for p in doomed]
            )
            self._db.execute("COMMIT")
        log.info("deleted %d packs with no live objects", len(doomed))

    def _repack(self, now: float) -> int:
        with self._lock:
            candidates = self._db.execute(
                "SELECT id, size, live FROM packs WHERE live > 0 AND live < size * ? "
                "ORDER BY live * 1.0 / size LIMIT 64",
                (1 - REPACK_DEAD_SHARE,),
            ).fetchall()
            candidates += self._small_packs(now, {str(row[0]) for row in candidates})
        moved = budget = 0
        for pack_id, size, live in candidates:
            if budget >= REPACK_BYTES:
                break
            moved += self._repack_one(str(pack_id), int(size), int(live))
            budget += int(live)
        if moved:
            self.sync()
            log.info("repacked %d objects out of %d packs", moved, len(candidates))
        return moved

    def _small_packs(self, now: float, taken: set[str]) -> list[tuple[str, int, int]]:
        """Under `_lock`: packs far below the target size (each `sync()` of a writer that
        fsyncs often uploads one) that have settled, when there are enough of them that
        merging makes the bucket hold fewer objects; at most a target's worth at a time."""
        rows = self._db.execute(
            "SELECT id, size, live FROM packs WHERE live > 0 AND size < ? AND created_at <= ? "
            "ORDER BY created_at LIMIT 256",
            (self.pack_target * SMALL_SHARE, now - SMALL_AGE),
        ).fetchall()
        rows = [row for row in rows if str(row[0]) not in taken]
        if len(rows) < SMALL_MERGE_MIN:
            return []
        chosen, total = [], 0
        for row in rows:
            if total + row[2] > self.pack_target:
                break
            chosen.append(row)
            total += row[2]
        return chosen if len(chosen) >= SMALL_MERGE_MIN else []

    def _repack_one(self, pack_id: str, size: int, live: int) -> int:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, offset, length FROM objects WHERE pack = ? ORDER BY offset",
                (pack_id,),
            ).fetchall()
        if not rows:
            return 0
        for start, end, members in live_ranges(rows):  # the live ranges only, not the dead
            data = self.packs.get_range(pack_id, start, end - start) if end > start else b""
            for key, offset, length in members:
                piece = data[offset - start : offset - start + length]
                self._append(bytes(key).hex(), [piece], moved_from=pack_id)
        log.debug("pack %s: %d of %d bytes live, %d objects repacked", pack_id, live, size,
                  len(rows))  # fmt: skip
        return len(rows)

    def pack_stats(self) -> tuple[int, int, int]:
        """Packs, their bytes and their live bytes, as packs.db has them."""
        with self._lock:
            row = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(live), 0) FROM packs"
            ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def read_trailer(self, pack_id: str) -> Trailer:
        return read_trailer(self.packs, pack_id, self.sealer)

    def adopt(self, locations: dict[str, PackLocation], sizes: dict[str, int]) -> None:
        """Record objects found in the bucket (a rebuild from it): rows and live counts."""
        now = time.time()
        live: dict[str, int] = {}
        for where in locations.values():
            live[where.pack] = live.get(where.pack, 0) + where.length
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT OR REPLACE INTO packs(id, size, live, created_at) VALUES (?, ?, ?, ?)",
                [(pack, sizes[pack], n, now) for pack, n in live.items()],
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?)",
                [(bytes.fromhex(k), w.pack, w.offset, w.length) for k, w in locations.items()],
            )
            self._db.execute("COMMIT")

    def reclaim_unmapped(self) -> int:
        """Delete packs that no row names (uploaded, then a crash before their locations
        committed). Only while no put runs: at mount, or from `check --repair`."""
        with self._lock:
            known = {str(p) for (p,) in self._db.execute("SELECT id FROM packs")}
            known.update(self._closed)
            if self._open is not None:
                known.add(self._open.id)
        cleared = 0
        for leftover in self.spool.iterdir():  # an earlier process's unsynced puts
            if leftover.name not in known:
                cleared += leftover.stat().st_size
                leftover.unlink()
        stray = [(key, size) for key, size in self.packs.sized_keys() if key not in known]
        if stray:
            self.packs.delete_many([key for key, _ in stray])
            log.warning("deleted %d packs that no location named (a crash after their "
                        "upload)", len(stray))  # fmt: skip
        return cleared + sum(size for _, size in stray)

    def pack_problems(self) -> list[str]:
        """Where packs.db and the bucket disagree (for `snapfs check`): a pack it names that
        the bucket lacks or holds at another size."""
        with self._lock:
            rows = self._db.execute("SELECT id, size, live FROM packs").fetchall()
        present = dict(self.packs.sized_keys())
        problems = []
        for pack_id, size, live in rows:
            if pack_id not in present:
                if live > 0:
                    problems.append(f"pack {pack_id} ({live} live bytes) is not in the bucket")
            elif present[pack_id] != size:
                problems.append(
                    f"pack {pack_id} is {present[pack_id]} bytes in the bucket, {size} recorded"
                )
        return problems

    def close(self) -> None:
        with self._lock:
            # An upload reads its pack's fd outside the lock: closing that fd under it would
            # let the number be reused and another file's bytes be uploaded as the pack.
            deadline = time.monotonic() + CLOSE_WAIT
            while any(p.uploading for p in self._closed.values()):
                if not self._uploaded.wait(max(0.0, deadline - time.monotonic())):
                    log.warning("closing with a pack upload still running")
                    return  # its fds stay open: the process is ending
            for pack in [*self._closed.values(), *([self._open] if self._open else [])]:
                with contextlib.suppress(OSError):
                    os.close(pack.fd)
            self._open = None
            self._closed.clear()
            self._pending.clear()
            with contextlib.suppress(sqlite3.Error):
                self._db.close()

    def destroy(self) -> None:
        """Delete every pack and old-layout object, and the local state."""
        self.packs.delete_many(list(self.packs.keys()))
        self.legacy.delete_many(list(self.legacy.keys()))
        self.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)


if TYPE_CHECKING:
    _conforms: type[ObjectStore] = PackedS3Backend  # mypy checks that it is an ObjectStore
