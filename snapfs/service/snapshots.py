"""Snapshots: their metadata, the writer of a `creating` snapshot, and the block reader.

A snapshot's content is a map from block number to block id (absent = hole). While it is
`creating`, a `SnapshotWriter` collects writes into block-sized buffers and hands each full
buffer to the region to be stored, in the background, so the next write can arrive while the
last block is hashed and compressed. Finished blocks wait in `pending` until a batch commit
makes them part of the index: every `COMMIT_EVERY` blocks, on fsync, on close, and on seal.

Why one module of ~700 lines: `Snapshot` (metadata and the block reader) and
`SnapshotWriter` share the block map's two sources of truth (committed rows and the writer's
`pending`/`dirty` blocks), and a read of a `creating` snapshot must see both consistently;
splitting the reader from the writer would put that rule in two places.
"""

from __future__ import annotations

import functools
import logging
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from snapfs import workers
from snapfs.blocks.blockmap import SealedMap
from snapfs.blocks.cache import Plaintext
from snapfs.blocks.repository import zeros
from snapfs.errors import BlockCorrupt, SnapfsError, SnapshotFailed, as_snapfs_error
from snapfs.faults import fault_point
from snapfs.formats import delta
from snapfs.formats.codec import FRAME_SHIFT, content_id
from snapfs.meta.index import NewBlock
from snapfs.model.names import snapshot_ino
from snapfs.model.states import SnapshotStatus, checked_transition
from snapfs.pacing import Pacer
from snapfs.stalls import BatchSizer

if TYPE_CHECKING:
    from snapfs.blocks.repository import StoredBlock
    from snapfs.meta.keys import BlockKeys
    from snapfs.service.copyjobs import CopyJob
    from snapfs.service.region import Region

log = logging.getLogger(__name__)


COMMIT_EVERY = 256  # blocks per index transaction while writing
ENCODES_IN_FLIGHT = 4  # full blocks a writer may have queued for storing
DIRTY_BLOCKS_MAX = 16  # partly written blocks a writer keeps before storing the oldest
READ_AHEAD = 8  # blocks fetched ahead of a sequential reader
READ_AHEAD_REMOTE = 32  # from a bucket: 16 MiB ahead, fetched READ_AHEAD or more at a time
DELTA_MISSES = 8  # delta attempts in a row that did not pay before a writer mostly stops
DELTA_PROBE = 32  # then one block in this many still tries
# A read of at most 1/this of a block that does not follow the last one is a random read:
# it decodes only the frames it needs (formats/codec.py, version 2).
RANDOM_READ_SHARE = 4


@dataclass(eq=False)
class Snapshot:
    """A snapshot's metadata (mirroring its `snapshots` row) and its runtime state."""

    id: str
    name: str
    region: Region
    status: SnapshotStatus
    size: int
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    created_at: float
    sealed_at: float | None = None
    allocated_blocks: int = 0
    source_snapshot_id: str | None = None
    source_region: str | None = None
    description: str | None = None
    retention_days: int | None = None
    encrypted: bool = False
    kms_key_id: str | None = None
    error: str | None = None
    transferred_bytes: int = 0
    deleted: bool = False
    open_handles: int = 0
    writer: SnapshotWriter | None = field(default=None, repr=False)
    last_read_block: int = -2
    # Copies: the job filling this snapshot (mv, snapfs copy), the source a `cp` is
    # recognised to be copying, and how many jobs or copies are reading this one.
    copy_job: CopyJob | None = field(default=None, repr=False)
    copy_source: Snapshot | None = field(default=None, repr=False)
    copy_matched: set[int] = field(default_factory=set, repr=False)  # blocks equal to source
    copy_readers: int = 0
    inode_aliases: list[int] = field(default_factory=list, repr=False)
    page_cache_valid: bool = False  # sealed, and opened through the page cache since
    # A sealed snapshot's whole map, loaded by its first read and dropped at its last
    # close (blocks/blockmap.py); `_map_loaded` is the event of a load in progress, set
    # when it ends.
    _sealed_map: SealedMap | None = field(default=None, repr=False)
    _map_loaded: trio.Event | None = field(default=None, repr=False)

    @classmethod
    def from_row(cls, row: dict[str, Any], region: Region) -> Snapshot:
        return cls(
            id=row["id"], name=row["name"], region=region, status=SnapshotStatus(row["status"]),
            size=row["size"], mode=row["mode"], uid=row["uid"], gid=row["gid"],
            atime_ns=row["atime_ns"], mtime_ns=row["mtime_ns"], ctime_ns=row["ctime_ns"],
            created_at=row["created_at"], sealed_at=row["sealed_at"],
            allocated_blocks=row["allocated_blocks"],
            source_snapshot_id=row["source_snapshot_id"], source_region=row["source_region"],
            description=row["description"], retention_days=row["retention_days"],
            encrypted=bool(row["encrypted"]), kms_key_id=row["kms_key_id"],
            error=row["error"], transferred_bytes=row["transferred_bytes"],
            deleted=bool(row["deleted"]),
        )  # fmt: skip

    @classmethod
    def new(
        cls, snapshot_id: str, name: str, region: Region, mode: int, uid: int, gid: int
    ) -> Snapshot:
        now = time.time_ns()
        return cls(
            id=snapshot_id, name=name, region=region, status=SnapshotStatus.CREATING, size=0,
            mode=stat.S_IMODE(mode), uid=uid, gid=gid, atime_ns=now, mtime_ns=now,
            ctime_ns=now, created_at=now / 1e9,
        )  # fmt: skip

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "status": self.status, "size": self.size,
            "mode": self.mode, "uid": self.uid, "gid": self.gid, "atime_ns": self.atime_ns,
            "mtime_ns": self.mtime_ns, "ctime_ns": self.ctime_ns,
            "created_at": self.created_at, "sealed_at": self.sealed_at,
            "source_snapshot_id": self.source_snapshot_id,
            "source_region": self.source_region, "description": self.description,
            "retention_days": self.retention_days, "encrypted": int(self.encrypted),
            "kms_key_id": self.kms_key_id, "error": self.error,
            "transferred_bytes": self.transferred_bytes,
        }  # fmt: skip

    @property
    def ino(self) -> int:
        return snapshot_ino(self.id)

    def become(self, status: SnapshotStatus, **fields: Any) -> None:
        """The one place a snapshot's status changes in memory, checked against the
        lifecycle (model/states.py): after the index committed the change, as every
        metadata change; only failures are set here first and recorded after, so that a
        snapshot is `failed` even when its index is full (recovery records it then)."""
        self.status = checked_transition(self.status, status)
        for name, value in fields.items():
            setattr(self, name, value)

    @property
    def sealed(self) -> bool:
        """Content can no longer change (a `cp` copy is written until its last close)."""
        return (
            self.writer is None
            and self.status != SnapshotStatus.CREATING
            and self.copy_source is None
        )

    @property
    def progress(self) -> float:
        if self.status == SnapshotStatus.AVAILABLE:
            return 100.0
        if self.copy_job is not None:
            return self.copy_job.progress
        if self.status == SnapshotStatus.COPYING and self.copy_source is not None:
            total = self.copy_source.allocated_blocks
            return 100.0 * min(1.0, len(self.copy_matched) / total) if total else 0.0
        return 0.0

    def block_keys(self) -> BlockKeys | None:
        """The keys of an encrypted snapshot's CMK; KeyNotFound/KeyDisabled if unusable."""
        keys = self.region.keys
        if keys is None:  # only tests build a region without a key ring
            assert not self.encrypted
            return None
        return keys.for_snapshot(self.encrypted, self.kms_key_id)

    @property
    def in_use(self) -> bool:
        """Open, or read by a copy: a deleted snapshot's data must stay until neither."""
        return self.open_handles > 0 or self.copy_readers > 0

    @property
    def allocated_bytes(self) -> int:
        """Bytes of non-hole blocks, what `du` shows (like a sparse file's allocation)."""
        return min(self.allocated_blocks * self.region.block_size, _round_up(self.size, 512))

    def touch_ctime(self) -> None:
        self.ctime_ns = time.time_ns()

    async def read(self, offset: int, length: int, nursery: trio.Nursery | None = None) -> bytes:
        """Bytes [offset, offset+length) clipped to the size; holes read as zeros."""
        if self.status == SnapshotStatus.FAILED:
            # Its missing blocks are unknown, not zeros: never hand out wrong bytes.
            raise SnapshotFailed(
                f"snapshot {self.name} ({self.id}) is a failed copy: {self.error}",
            )
        if self.encrypted:
            self.block_keys()  # a disabled key refuses reads too (EKEYREVOKED), cache or not
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        bs = self.region.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        # Only an available snapshot's map is fixed; a writer or a copy job can change the
        # map at any await below, so their blocks are looked up one at a time.
        stable = (
            self.status == SnapshotStatus.AVAILABLE
            and self.writer is None
            and self.copy_job is None
        )
        ids = (await self._map()).between(first, last) if stable else {}
        if stable and not ids:
            # All holes (a sparse image's free space): one shared zero buffer, no copying.
            self._after_read(first, last, nursery)
            return zeros(length)
        # A small read away from the last one (fio, a database, a filesystem's metadata
        # inside the image) decodes only the frames it needs; sequential readers decode
        # whole blocks, which read-ahead fetches before they are asked for.
        random_read = (
            stable
            and length <= bs // RANDOM_READ_SHARE
            and first not in (self.last_read_block, self.last_read_block + 1)
        )
        parts: list[memoryview] = []
        for block_no in range(first, last + 1):
            start = offset - block_no * bs if block_no == first else 0
            end = offset + length - block_no * bs if block_no == last else bs
            try:
                block_id = ids.get(block_no) if random_read else None
                if block_id is not None:
                    part = memoryview(await self.region.read_range(block_id, start, end))
                else:
                    plain = await self._block_content(block_no, ids if stable else None)
                    part = memoryview(plain)[start:end]
            except BlockCorrupt as exc:  # say where, for the log and `snapfs check`
                raise BlockCorrupt(
                    f"snapshot {self.name} ({self.id}) at offset {block_no * bs}: {exc.message}"
                ) from None
            parts.append(part)
            if len(part) < end - start:  # a short (or hole) block: zeros after it
                parts.append(memoryview(zeros(bs))[: end - start - len(part)])
        self._after_read(first, last, nursery)
        return b"".join(parts)  # the one copy of the reply

    def frame_around(self, offset: int, length: int) -> tuple[int, memoryview] | None:
        """After a small read of a sealed snapshot: the decoded frame that held it, as
        (file offset, bytes) clipped to the size, if the block cache has it (no I/O).

        The FUSE layer gives it to the kernel's page cache (read-around): the decode was
        paid already, and a reader near this one (a filesystem's metadata inside the image)
        then finds its pages cached instead of making a request each."""
        frame_bytes = 1 << FRAME_SHIFT
        if self._sealed_map is None or length > frame_bytes // 2 or offset >= self.size:
            return None
        bs = self.region.block_size
        block_no, within = divmod(offset, bs)
        frame = within >> FRAME_SHIFT
        if (within + length - 1) >> FRAME_SHIFT != frame:
            return None  # across two frames: rare, and not worth a second lookup
        block_id = self._sealed_map.get(block_no)
        if block_id is None:
            return None  # a hole: zeros cost the kernel little to ask for again
        data = self.region.cached_frame(block_id, frame)
        if data is None or not len(data):
            return None
        start = block_no * bs + (frame << FRAME_SHIFT)
        return start, memoryview(data)[: max(0, self.size - start)]

    def _after_read(self, first: int, last: int, nursery: trio.Nursery | None) -> None:
        if nursery is not None and self.writer is None:
            self._read_ahead(first, last, nursery)
        self.last_read_block = last

    async def _block_content(self, block_no: int, ids: dict[int, bytes] | None) -> Plaintext:
        if self.writer is not None:
            return await self.writer.current_content(block_no)
        if self.copy_job is not None:
            return await self._read_copying(block_no)
        block_id = (
            ids.get(block_no) if ids is not None else self.region.index.block_id(self.id, block_no)
        )
        return await self.region.read_block(block_id) if block_id else b""

    async def _read_copying(self, block_no: int) -> Plaintext:
        """A block of a snapshot a job is filling: transferred, or served from the source."""
        block_id = self.region.index.block_id(self.id, block_no)
        if block_id is not None:
            return await self.region.read_block(block_id)
        job = self.copy_job
        source = job.source if job is not None else None
        if source is None:
            raise SnapshotFailed(
                f"snapshot {self.name} ({self.id}): block {block_no} was not "
                "copied and its source is gone",
            )
        block_id = source.region.index.block_id(source.id, block_no)
        return await source.region.read_block(block_id) if block_id else b""

    def _read_ahead(self, first: int, last: int, nursery: trio.Nursery) -> None:
        if first not in (self.last_read_block, self.last_read_block + 1):
            return
        bs = self.region.block_size
        window = READ_AHEAD_REMOTE if self.region.remote else READ_AHEAD
        end = min(last + window, (self.size - 1) // bs)
        if end <= last:
            return
        ids = self._block_ids(last + 1, end)
        if self.region.remote:
            # From a bucket, ahead in batches: a run of neighbours in a pack is one ranged
            # GET, so wait until a batch's worth is wanted (or the next block is).
            ahead = [b for b in ids.values() if self.region.wants_fetch(b)]
            if len(ahead) >= READ_AHEAD or ids.get(last + 1) in ahead:
                nursery.start_soon(self.region.prefetch_many, ahead)
            return
        for block_id in ids.values():
            if block_id not in self.region.cache:
                nursery.start_soon(self.region.prefetch, block_id)

    def _block_ids(self, first: int, last: int) -> dict[int, bytes]:
        """Block ids of first..last (holes absent): from the sealed map once it is loaded."""
        if self._sealed_map is not None:
            return self._sealed_map.between(first, last)
        return self.region.index.block_map(self.id, first, last)

    async def _map(self) -> SealedMap:
        """The sealed map, loaded on first need; concurrent readers wait for one load."""
        while self._sealed_map is None:
            if self._map_loaded is not None:
                await self._map_loaded.wait()
                continue
            loaded = self._map_loaded = trio.Event()
            try:
                self._sealed_map = await SealedMap.load(
                    functools.partial(self.region.index.block_map_from, self.id)
                )
            finally:
                self._map_loaded = None
                loaded.set()
        return self._sealed_map

    def closed_by_all(self) -> None:
        """The last handle went: the kernel's page cache holds what is worth keeping."""
        self._sealed_map = None


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


class PartialBlock(bytearray):
    """A block written in parts, whose old content has not been read: the bytes written and
    where (`ranges`). Merged over the old content only when something needs the whole block
    (its store, a read of it), so a write into part of a block returns without waiting for
    that block to be read back and decoded, and writes that end up covering the whole block
    (`cp`'s 128 KiB pieces) never read it at all."""

    __slots__ = ("ranges",)

    def __init__(self, size: int):
        super().__init__(size)
        self.ranges: list[tuple[int, int]] = []

    def mark(self, start: int, end: int) -> None:
        ranges = self.ranges
        if ranges and ranges[-1][1] == start:  # sequential writes: one growing range
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))

    def covered(self) -> bool:
        """Every byte of the block was written."""
        reach = 0
        for start, end in sorted(self.ranges):
            if start > reach:
                return False
            reach = max(reach, end)
        return reach >= len(self)

    def merged(self, old: bytes | bytearray | memoryview) -> bytearray:
        """The whole block: `old`, zero-padded, with the written ranges laid over it."""
        full = bytearray(len(self))
        full[: len(old)] = old
        for start, end in self.ranges:
            full[start:end] = self[start:end]
        return full


class SnapshotWriter:
    """Buffers, stores and commits the writes to one `creating` snapshot.

    Errors of background stores (a full disk) are kept and raised by the next write, flush
    or fsync, like writeback errors on any Linux filesystem; the block's data stays buffered,
    so a retry after space is freed loses nothing.
    """

    def __init__(
        self,
        snap: Snapshot,
        nursery: trio.Nursery,
        not_a_copy: Callable[[Snapshot, str], None] | None = None,
        copy_bandwidth_limit: int | None = None,
    ):
        self.snap = snap
        self._not_a_copy = not_a_copy
        self._copy_pacer = Pacer(copy_bandwidth_limit)  # `cp` copies honour --copy-bwlimit
        self.region = snap.region
        self.nursery = nursery
        self.block_size = self.region.block_size
        self.dirty: dict[int, bytearray] = {}
        self.inflight: dict[int, trio.Event] = {}
        self.pending: dict[int, bytes | None] = {}
        self.new_blocks: dict[bytes, NewBlock] = {}
        self.pinned: list[bytes] = []
        self.error: SnapfsError | None = None
        self._store_failing = False
        self._closed_mark = False  # the index holds the close mark (see flush)
        self.handles = 0
        self.sealing = False
        self.seal_tried = trio.Event()  # set once a seal has ended (sealed, or failed)
        # The settle period: which close it counts from, and how soon writers came back.
        self._generation = 0
        self._closed_at: float | None = None
        self.reopens = 0
        self.longest_reopen_gap = 0.0
        # Snapshots open for reading while this one was written: its possible sources.
        self.read_meanwhile: set[Snapshot] = set()
        self.written_bytes = 0  # plaintext of the new objects this writer stored
        # Deltas (formats/delta.py): the snapshot new blocks are compared with.
        self._reference_chosen = False
        self._reference_snap: Snapshot | None = None
        self._delta_misses = 0
        # Counts every change to the block map in the index: a comparison that awaits
        # (lifecycle.maps_equal) holds only if this did not move meanwhile.
        self.map_version = 0
        self._slots = trio.Semaphore(ENCODES_IN_FLIGHT)
        self._commit_lock = trio.Lock()
        self._meta_dirty = False

    # --- handles and the settle period ------------------------------------------------------

    def reopened(self) -> None:
        """A handle opened for writing (the first, or one during the settle period)."""
        if self.handles == 0 and self._closed_at is not None:
            gap = trio.current_time() - self._closed_at
            self.reopens += 1
            self.longest_reopen_gap = max(self.longest_reopen_gap, gap)
            log.debug(
                "snapshot %s (%s) reopened for writing %.3f s after its last close",
                self.snap.name,
                self.snap.id,
                gap,
            )
        self.handles += 1
        self._generation += 1

    def closed(self) -> int:
        """The last handle open for writing went: the settle period starts; its token."""
        self._closed_at = trio.current_time()
        self._generation += 1
        return self._generation

    @property
    def generation(self) -> int:
        return self._generation

    def idle(self, generation: int) -> bool:
        """No writer has come back since the close that gave `generation`."""
        return self.handles == 0 and self._generation == generation

    # --- the write path --------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> int:
        self._raise_deferred()
        self._unmark_closed()
        bs = self.block_size
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            block_no, start = divmod(offset + pos, bs)
            count = min(bs - start, len(data) - pos)
            if count == bs and block_no not in self.dirty and block_no not in self.inflight:
                # The whole block is replaced: its old content need not be looked up.
                self.dirty[block_no] = bytearray(view[pos : pos + count])
            else:
                buf = self.dirty.get(block_no)
                if buf is None and block_no in self.inflight:
                    # Being stored: wait for that store (never two of one block at once,
                    # so a failed one's buffer, put back, is still the newest content).
                    buf = await self._buffer(block_no)
                elif buf is None:  # its old content is merged in when needed
                    buf = self.dirty[block_no] = PartialBlock(bs)
                buf[start : start + count] = view[pos : pos + count]
                if isinstance(buf, PartialBlock):
                    buf.mark(start, start + count)
            pos += count
            self.snap.size = max(self.snap.size, offset + pos)
            if start + count == bs:
                await self._store(block_no)
        self.snap.mtime_ns = self.snap.ctime_ns = time.time_ns()
        self._meta_dirty = True
        if len(self.dirty) > DIRTY_BLOCKS_MAX:
            await self._store(next(iter(self.dirty)))
        if self.snap.copy_source is not None:
            await self._copy_pacer.pace(len(data))
        return len(data)

    async def _buffer(self, block_no: int) -> bytearray:
        """The writable buffer of a block, filled with its current content."""
        buf = self.dirty.get(block_no)
        if buf is not None and not isinstance(buf, PartialBlock):
            return buf
        content = await self.current_content(block_no)
        buf = self.dirty.get(block_no)  # another request may have made it meanwhile
        if buf is None or isinstance(buf, PartialBlock):
            buf = bytearray(self.block_size)
            buf[: len(content)] = content
            self.dirty[block_no] = buf
        return buf

    async def current_content(self, block_no: int) -> Plaintext:
        """The newest content of a block: buffered, being stored, pending or committed."""
        while True:
            while (event := self.inflight.get(block_no)) is not None:
                await event.wait()
            buf = self.dirty.get(block_no)
            if buf is None:
                return await self._stored_content(block_no)
            if not isinstance(buf, PartialBlock):
                return bytes(buf)
            if buf.covered():
                self.dirty[block_no] = full = bytearray(buf)
                return bytes(full)
            old = await self._stored_content(block_no)
            # Writes into it meanwhile changed `buf` itself; a store that took it means
            # looking again (its result is then the content).
            if self.dirty.get(block_no) is buf and block_no not in self.inflight:
                self.dirty[block_no] = full = buf.merged(old)
                return bytes(full)

    async def _stored_content(self, block_no: int) -> Plaintext:
        """The block as its last store left it: pending a commit, or committed."""
        if block_no in self.pending:
            block_id = self.pending[block_no]
        else:
            block_id = self.region.index.block_id(self.snap.id, block_no)
        if block_id is None:
            return b""
        return await self.region.read_block(block_id)

    async def _store(self, block_no: int) -> None:
        """Hand a block's buffer to a background task that stores it."""
        buf = self.dirty.pop(block_no, None)
        if buf is None:
            return
        before = self.inflight.get(block_no)  # an earlier store of it, still running
        done = self.inflight[block_no] = trio.Event()
        await self._slots.acquire()
        self.nursery.start_soon(
            self._store_task, block_no, buf, done, before,
            name=f"store {self.snap.id}:{block_no}",
        )  # fmt: skip

    async def _store_task(
        self, block_no: int, buf: bytearray, done: trio.Event, before: trio.Event | None
    ) -> None:
        try:
            if before is not None:  # never, by the write path; kept as the rule it keeps
                await before.wait()
            if isinstance(buf, PartialBlock):
                if buf.covered():
                    buf = bytearray(buf)
                else:
                    # The old content now, in this background task (several run at once),
                    # not in the write that made the block.
                    try:
                        buf = buf.merged(await self._stored_content(block_no))
                    except Exception as exc:  # noqa: BLE001 - reported by the next write
                        self.error = as_snapfs_error(exc)
                        log.error("snapshot %s (%s) block %d: its old content does not "
                                  "read: %s", self.snap.name, self.snap.id, block_no,
                                  self.error)  # fmt: skip
                        self.dirty.setdefault(block_no, buf)
                        return
            # The whole block, zeros past the end of the file (truncate clears them): a
            # block's id must depend on its content alone, not on the file's size when it was
            # stored; `cp` of a sparse image writes data blocks before it sets the size.
            # The buffer itself, not a copy: it left `dirty` for good (a failed store puts
            # it back, but then it was never cached), so nothing writes to it any more.
            plain = buf if block_no * self.block_size < self.snap.size else b""
            asked: list[bytes] = []  # the base store_block asked for, if the block was new

            def base_for() -> bytes | None:
                base = self._delta_base(block_no)
                if base is not None:
                    asked.append(base)
                return base

            try:
                stored = await self.region.store_block(
                    plain, self.snap.block_keys(), self._raw_copy_source(block_no), base_for
                )
            except Exception as exc:  # a background task must not end the mount
                self.error = as_snapfs_error(exc)
                # Once per run of failures: a full disk fails every block, and the log is
                # on that disk too.
                log.log(
                    logging.DEBUG if self._store_failing else logging.ERROR,
                    "snapshot %s (%s) block %d not stored: %s",
                    self.snap.name,
                    self.snap.id,
                    block_no,
                    self.error,
                )
                self._store_failing = True
                self.dirty.setdefault(block_no, buf)
                return
            self._store_failing = False
            if stored is None:
                self.pending[block_no] = None
            else:
                self.pending[block_no] = stored.block_id
                self.pinned.append(stored.block_id)
                if stored.new is not None:
                    self.new_blocks[stored.block_id] = stored.new
            if stored is not None and stored.written and stored.new is not None:
                self.written_bytes += stored.new.transferred_size
                if asked:
                    self._delta_tried(stored.new.base_id is not None)
            if self.snap.copy_source is not None:
                try:
                    self._check_copy(block_no, stored, await self._source_id(plain, stored))
                except Exception:  # a background task must not end the mount
                    log.exception(
                        "snapshot %s: checking block %d against the copy source failed",
                        self.snap.id,
                        block_no,
                    )
        finally:
            if self.inflight.get(block_no) is done:  # not a later store's of the block
                del self.inflight[block_no]
            done.set()
            self._slots.release()
        if len(self.pending) >= COMMIT_EVERY and not self._commit_lock.locked():
            try:
                await self.commit()
            except Exception as exc:  # reported by the next write or close
                self.error = as_snapfs_error(exc)
                log.error(
                    "snapshot %s (%s): commit failed: %s", self.snap.name, self.snap.id, self.error
                )

    # --- deltas: which block a new one is probably a variant of -----------------------------

    def reference(self) -> Snapshot | None:
        """The snapshot this one was most likely written after (chosen now if no block
        chose it yet): deltas are over its blocks, and a chain makes the map relative to it."""
        return self._reference()

    def _reference(self) -> Snapshot | None:
        """The snapshot this one most likely descends from, chosen at its first new block:
        one read while this was written (rsync reads the file it replaces, `cp --reflink`
        style tools the original), else the region's most recently sealed snapshot, under
        the same key (a delta is bound to its base's id, which is keyed)."""
        if self._reference_chosen:
            return self._reference_snap
        self._reference_chosen = True
        snap = self.snap
        candidates = [
            s
            for s in self.region.snapshots.values()
            if s is not snap
            and s.status == SnapshotStatus.AVAILABLE
            and s.kms_key_id == snap.kms_key_id
        ]
        read = [s for s in candidates if s in self.read_meanwhile]
        pool = read or candidates
        self._reference_snap = max(pool, key=lambda s: s.sealed_at or 0.0, default=None)
        if self._reference_snap is not None:
            log.debug("snapshot %s stores deltas over %s", snap.id, self._reference_snap.id)
        return self._reference_snap

    def _delta_base(self, block_no: int) -> bytes | None:
        """The block to try storing block `block_no` as a delta over: the reference's block
        at the same place (its own base if it is a delta). After DELTA_MISSES attempts in a
        row that did not pay (an unrelated image), only every DELTA_PROBE-th block tries,
        so an ingest unlike its reference stops paying a base read per block."""
        if not self.region.deltas or self.snap.copy_source is not None:
            return None
        if self._delta_misses >= DELTA_MISSES and block_no % DELTA_PROBE:
            return None
        reference = self._reference()
        if reference is None or reference.region is not self.region:
            return None
        block_id = self.region.index.block_id(reference.id, block_no)
        if block_id is None:
            # A hole there (free space): a few pages written into it are a delta over zeros.
            inside = block_no * self.block_size < reference.size
            return delta.ZERO_BASE if inside else None
        return self.region.full_base(block_id)

    def cloned_from(self, parent: Snapshot) -> None:
        """The snapshot took `parent`'s map (a clone): its map moved, and new blocks are
        variants of the parent's."""
        self.map_version += 1
        self._reference_chosen, self._reference_snap = True, parent

    def _delta_tried(self, paid: bool) -> None:
        self._delta_misses = 0 if paid else self._delta_misses + 1

    def _raw_copy_source(self, block_no: int) -> tuple[Region, bytes] | None:
        """The source's object for this block of a `cp` copy, when it could move as it is:
        same keys (or none) and, for encrypted ones, the same region (objects are bound to
        their region)."""
        source = self.snap.copy_source
        if source is None or source.kms_key_id != self.snap.kms_key_id:
            return None
        if source.encrypted and source.region is not self.region:
            return None
        block_id = source.region.index.block_id(source.id, block_no)
        return (source.region, block_id) if block_id is not None else None

    async def _source_id(self, plain: Plaintext, stored: StoredBlock | None) -> bytes | None:
        """What the source's id of this content is: ours when both use the same keys (or
        none), else the content hashed under the source's id key."""
        source = self.snap.copy_source
        if stored is None or source is None or source.kms_key_id == self.snap.kms_key_id:
            return None if stored is None else stored.block_id
        keys = source.block_keys()
        id_key = keys.id_key if keys is not None else None
        return await workers.run_sync(content_id, plain, id_key, limiter=self.region.limiter)

    def _check_copy(
        self, block_no: int, stored: StoredBlock | None, source_id: bytes | None
    ) -> None:
        """A `cp` copy stays one while each block it writes is the source's block."""
        source = self.snap.copy_source
        if source is None:
            return
        if source.region.index.block_id(source.id, block_no) != source_id:
            self._meta_dirty = True
            if self._not_a_copy is not None:
                self._not_a_copy(self.snap, f"block {block_no} differs")
            return
        if stored is not None:
            self.snap.copy_matched.add(block_no)
            if stored.written and stored.new is not None:
                self.snap.transferred_bytes += stored.new.transferred_size
            fault_point("cp_copy_block")

    def _raise_deferred(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    # --- making it durable -----------------------------------------------------------------

    def is_flushed(self) -> bool:
        """Everything written is committed to the index (nothing buffered or pending)."""
        return not (
            self.dirty
            or self.inflight
            or self.pending
            or self.new_blocks
            or self.error
            or self._commit_lock.locked()
        )

    async def flush(self, *, closing: bool = False) -> None:
        """Store every buffered block and commit: after this, the data survives a crash.

        At a close (`closing`) of the only handle open for writing, with everything
        committed, the snapshot gets the close mark (its `sealed_at` set while it is still
        `creating`): if the daemon dies before it seals (during the settle period, or before
        the release), the next mount seals it instead of removing it, since `cp` has seen its
        close succeed. A later write or truncate (through a reopened or duplicated
        descriptor) takes the mark away first.
        """
        for block_no in list(self.dirty):
            await self._store(block_no)
        while self.inflight:
            await next(iter(self.inflight.values())).wait()
        self._raise_deferred()
        await self.commit()
        self._raise_deferred()
        if closing and self.handles == 1:
            self.mark_closed()

    def mark_closed(self) -> None:
        """Set the close mark if everything is committed (see flush)."""
        if self.is_flushed() and not self._closed_mark:
            # No await from the check to the commit: nothing can be written in between.
            self.region.index.update_snapshot(self.snap.id, sealed_at=time.time())
            self._closed_mark = True

    def _unmark_closed(self) -> None:
        """Data is about to change after a close: the close mark must go first (durably)."""
        if self._closed_mark:
            self.region.index.update_snapshot(self.snap.id, sealed_at=None)
            self._closed_mark = False

    async def commit(self, **fields: Any) -> None:
        """Sync the objects of the pending blocks, then commit them in one transaction."""
        async with self._commit_lock:
            if not self.pending and not self.new_blocks and not self._meta_dirty and not fields:
                return
            mapping = list(self.pending.items())
            new_blocks = list(self.new_blocks.values())
            pinned, self.pinned = self.pinned, []
            try:
                if new_blocks:
                    await self.region.sync()
                    fault_point("writer_synced")
                snap = self.snap
                fields = {
                    "size": snap.size, "mtime_ns": snap.mtime_ns, "ctime_ns": snap.ctime_ns,
                    "status": snap.status, "source_snapshot_id": snap.source_snapshot_id,
                    "source_region": snap.source_region, "description": snap.description,
                    "transferred_bytes": snap.transferred_bytes, **fields,
                }  # fmt: skip
                # A shared region's ledger first (its references keep the blocks from the
                # region's collector); nothing to tell, and no checkpoint, unshared.
                await self.region.link.commit(self.snap.id, new_blocks, mapping, fields)
                self.region.index.commit_blocks(self.snap.id, new_blocks, mapping, fields)
                if mapping:
                    self.map_version += 1
            except BaseException:
                self.pinned[:0] = pinned
                raise
            self._meta_dirty = False
            for block_no, block_id in mapping:
                if self.pending.get(block_no, b"") == block_id:
                    del self.pending[block_no]
            for block in new_blocks:
                self.new_blocks.pop(block.block_id, None)
            self.region.committed(pinned)
            if mapping:
                fault_point("writer_committed")
            self.snap.allocated_blocks = self.region.index.allocated_blocks(self.snap.id)
            if any(block_id is not None for _, block_id in mapping):
                self.region.request_gc()

    async def truncate(self, size: int) -> None:
        """Shrink or grow; bytes past a shrink read as zeros if the file grows again."""
        self._unmark_closed()
        await self.flush()
        bs = self.block_size
        if size < self.snap.size:
            await self._drop_map_past(size)
            tail = size % bs
            if tail:
                buf = await self._buffer(size // bs)
                buf[tail:] = bytes(bs - tail)
        self.snap.size = size
        self.snap.mtime_ns = self.snap.ctime_ns = time.time_ns()
        self._meta_dirty = True  # a grown size must reach the index (and the close mark)
        await self.flush()

    async def _drop_map_past(self, size: int) -> None:
        """Drop the map past a shrink from the top down, in transactions sized by the loop
        budget (a terabyte disk cut to nothing is a million rows). Each step lowers the
        recorded size to where its rows began, so a stop in between leaves a shorter
        prefix of the old content, never rows past the size."""
        first_dropped = -(-size // self.block_size)
        sizer = BatchSizer(4096, minimum=256)
        async with self._commit_lock:  # no commit may add rows behind the cut
            await self.region.link.trim(self.snap, first_dropped)  # a shared region's ledger
            while True:
                rows = sizer.start()
                done = self.region.index.truncate_map_step(
                    self.snap.id, first_dropped, rows, size, self.block_size
                )
                sizer.done()
                self.map_version += 1
                if done:
                    break
                await trio.sleep(0)
        self.snap.allocated_blocks = self.region.index.allocated_blocks(self.snap.id)
        self.region.request_gc()

    async def discard(self) -> None:
        """Drop everything not committed (the snapshot is being deleted)."""
        async with self._commit_lock:  # let a commit in progress finish first
            while self.inflight:
                await next(iter(self.inflight.values())).wait()
            self.dirty.clear()
            self.pending.clear()
            written = list(self.new_blocks)
            self.new_blocks.clear()
            pinned, self.pinned = self.pinned, []
            self.region.abandoned(pinned, written)
