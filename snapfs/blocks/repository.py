"""The block repository of one region: its block index and its object store.

This is the repository layer (objects -> blocks -> service): it turns plaintext blocks into
durable, deduplicated objects and back, and owns the invariants between the objects and the
index:

- an object is written (and synced) before any index row names it;
- dedup is decided here, on the trio thread, so two writers of the same new content write
  one object and wait for each other rather than race;
- garbage collection drops rows first, then objects, and never an object that an uncommitted
  batch has pinned.

CPU and disk work (hashing, compression, object I/O) runs in worker threads limited by a
shared `trio.CapacityLimiter`, which is the backpressure for every writer and reader. A region
on an object store (`backend.remote`) moves its objects under a second, wider limiter
(`io_limiter`): a PUT or GET mostly waits on the network, so more of them run at once than
there are cores, while encoding and verifying stay under the CPU limiter.

Why one module of ~600 lines: dedup, pins, rewrites, garbage collection and the two read
paths (whole blocks, frame ranges) all read and change the same in-memory state
(`_writing`, `_uncommitted`, `_pins`, `_unlinking`) under invariants that rest on there being
no await between a check and the change it guards (docs/DEVELOPING.md, section 2); kept in
one class, those invariants can be read in one place.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from snapfs import workers
from snapfs.blocks.cache import BlockCache, Plaintext
from snapfs.errors import (
    BlockCorrupt,
    InvalidParameter,
    ObjectMissing,
    SnapfsError,
    StoreFull,
)
from snapfs.faults import fault_point
from snapfs.formats import codec, delta
from snapfs.meta.index import NewBlock, RegionIndex
from snapfs.meta.keys import KeyNotFound
from snapfs.objects.local import LocalBackend
from snapfs.objects.s3packs import PackedS3Backend
from snapfs.stalls import BatchSizer

if TYPE_CHECKING:
    from snapfs.meta.keys import BlockKeys, KeyRing
    from snapfs.objects.protocol import ObjectStore

log = logging.getLogger(__name__)

GC_DELAY = 0.2  # seconds: lets a burst of deletes become one collection
RAW_AHEAD_BYTES = 64 << 20  # stored bytes read ahead from a bucket, waiting to be decoded
UPKEEP_EVERY = 60.0  # seconds between pack upkeeps of a bucket region when nothing is freed
GC_BATCH = 512  # first batch of unreferenced blocks dropped per index transaction
# How long a writer that finds the disk full waits for deletes still being collected.
FREES_WAIT = 30.0


@dataclass(slots=True)
class StoredBlock:
    """Where a block of plaintext went: its id, and the row to insert if it is new."""

    block_id: bytes
    new: NewBlock | None
    written: bool = False  # this call wrote the object (the data had to be transferred)


class PendingFrees:
    """Space that deletes have promised but not given back yet, store-wide (the local
    regions share one disk).

    A snapshot's map is purged and its blocks collected in the background after `rm`
    returns. Without this, `rm old.img; cp new.img REGION` on a full store would fail with
    ENOSPC for the fraction of a second the collection takes; a writer that finds the disk
    full while frees are pending waits for them instead, as it would on ext4.
    """

    def __init__(self) -> None:
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()

    @property
    def busy(self) -> bool:
        return self._pending > 0

    def begin(self) -> None:
        if self._pending == 0:
            self._idle = trio.Event()
        self._pending += 1

    def end(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self._idle.set()

    async def wait_until_idle(self, deadline: float) -> bool:
        """True once nothing is pending; False at `deadline` (trio clock)."""
        with trio.move_on_at(deadline):
            await self._idle.wait()
        return not self.busy


@functools.lru_cache(maxsize=8)
def zeros(size: int) -> bytes:
    return bytes(size)


def _hash_unless_zero(plain: bytes | bytearray, id_key: bytes | None) -> bytes | None:
    """None for an all-zero block (a hole), else its content id. Runs in a worker thread."""
    if plain == zeros(len(plain)):  # memcmp, ~10 GB/s
        return None
    return codec.content_id(plain, id_key)


def _new_block(encoded: codec.EncodedBlock) -> NewBlock:
    """The index row of a block object just encoded."""
    return NewBlock(
        encoded.block_id,
        encoded.plain_size,
        encoded.stored_size,
        encoded.codec,
        encoded.key_id,
        encoded.base_id,
    )


def frame_key(block_id: bytes, frame: int) -> bytes:
    """The decoded-block cache's key for one frame of a block (ids are 32 bytes, so no
    frame key equals a block's)."""
    return block_id + frame.to_bytes(2, "little")


class BlockRepository:
    """Deduplicated, durable blocks of one region; knows nothing of snapshots or names."""

    def __init__(
        self,
        name: str,
        directory: Path,
        block_size: int,
        limiter: trio.CapacityLimiter,
        cache: BlockCache,
        keys: KeyRing | None = None,
        backend: ObjectStore | None = None,
        io_limiter: trio.CapacityLimiter | None = None,
        frees: PendingFrees | None = None,
    ):
        self.name = name
        self.frees = frees if frees is not None else PendingFrees()
        self.keys = keys
        self.directory = directory
        self.block_size = block_size
        self.limiter = limiter
        self.cache = cache
        self.index = RegionIndex(directory / "index.db")
        self.backend: ObjectStore = (
            backend if backend is not None else LocalBackend(directory / "blocks")
        )
        self.remote = self.backend.remote
        if isinstance(self.backend, PackedS3Backend):
            from snapfs.blocks.packkeys import TrailerKeys

            self.backend.sealer = TrailerKeys(self._keys_for)
        # Called after pack upkeep moved objects (their manifests name the old packs).
        self.on_relocated: Callable[[], None] | None = None
        # Stored bytes a sequential reader's read-ahead fetched from a bucket of packs in one
        # ranged GET per run of neighbours, until each block's own load decodes them.
        self._raw_ahead: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._raw_ahead_bytes = 0
        self._raw_fetching: dict[bytes, trio.Event] = {}
        self.io_limiter = io_limiter if io_limiter is not None and self.remote else limiter
        # Objects some writer is putting right now; others wanting the same id wait.
        self._writing: dict[bytes, trio.Event] = {}
        # Objects written whose index row is not committed yet, with the row to insert.
        self._uncommitted: dict[bytes, NewBlock] = {}
        # Ids named by uncommitted batches: garbage collection must not take them.
        self._pins: collections.Counter[bytes] = collections.Counter()
        self._unlinking: set[bytes] = set()
        self._gc_done = trio.Event()
        self._gc_done.set()
        self._gc_lock = trio.Lock()
        self._loading: dict[bytes, trio.Event] = {}
        self._gc_wanted = trio.Event()
        self._abandoned: set[bytes] = set()  # written objects whose batch was dropped
        self._compression: str | None = None
        self._deltas: bool | None = None
        self.closed = False
        # A shared region's lookup of blocks other hosts stored (service/shared.py): a new
        # block found there is recorded here instead of uploaded again (None: not shared).
        self.shared_lookup: Callable[[bytes], Awaitable[NewBlock | None]] | None = None
        # ...and is told of each block it is about to upload (published once its pack is).
        self.shared_encoded: Callable[[NewBlock], None] | None = None

    def close(self) -> None:
        self.closed = True
        self.request_gc()  # wakes the collector so that it ends
        self.index.close()
        self.backend.close()

    # --- writing blocks --------------------------------------------------------------------

    async def store_block(
        self,
        plain: bytes | bytearray,
        keys: BlockKeys | None = None,
        copy_of: tuple[BlockRepository, bytes] | None = None,
        base_for: Callable[[], bytes | None] | None = None,
    ) -> StoredBlock | None:
        """Make `plain` durable-to-be in this region, encrypted under `keys` if given; None if
        it is all zeros (a hole). The id is pinned until the caller passes it to `committed()`.

        `copy_of` (region, block id) names a stored object this block is expected to equal,
        under the same keys (a `cp` copy): if the ids match, that object is copied as it is
        instead of compressing the plaintext again, as a copy job does.

        `base_for()` names a full block of this region, under the same keys, that this one
        probably resembles (the block at the same place in an earlier snapshot): if the
        block is new and differs from it in few pages, it is stored as a delta over it
        (formats/delta.py). It is asked, and the base's plaintext read, only when the block
        is new: a block already stored (most of an unchanged disk) costs no lookup for it.
        """
        id_key = keys.id_key if keys is not None else None
        block_id = await workers.run_sync(_hash_unless_zero, plain, id_key, limiter=self.limiter)
        if block_id is None:
            return None
        compression = self.compression  # read here: the index belongs to the trio thread
        held: bytes | None = None
        if copy_of is not None and copy_of[1] == block_id and self._can_copy(copy_of[0], block_id):
            make = functools.partial(
                self._copy_or_encode, copy_of[0], plain, block_id, keys, compression
            )
            held = copy_of[0].index.base_of(block_id)  # held by _can_copy, if a delta
        elif (
            base_for is not None
            and not self.knows(block_id)
            and (base_id := base_for()) is not None
            and self.hold_base(base_id)
        ):
            held = base_id
            try:
                base = await self.base_plaintext(base_id, len(plain))
            except Exception:  # noqa: BLE001 - a base that does not read: store it whole
                log.warning("region %s: base %s does not read; storing a block whole",
                            self.name, base_id.hex(), exc_info=True)
                base = b""
            make = functools.partial(
                self._encode_over, plain, block_id, base_id, base, keys, compression
            )
        else:
            make = functools.partial(codec.encode, plain, block_id, keys, self.name, compression)
        stored = await self.put_block(block_id, make, held_base=held)
        if stored.written:
            self.cache.put(block_id, plain)
        return stored

    # --- deltas (formats/delta.py) ---------------------------------------------------------

    def knows(self, block_id: bytes) -> bool:
        """The region holds the block (indexed, or written and awaiting its commit)."""
        return block_id in self._uncommitted or self.index.has_block(block_id)

    def hold_base(self, base_id: bytes) -> bool:
        """Pin `base_id` if this region holds it as a full object, for a delta about to be
        stored over it: garbage collection must not take a base between this check and the
        commit of the delta's row, whose trigger then counts the reference. False (nothing
        pinned) if the region lacks it, is collecting it, or holds it as a delta itself."""
        if base_id == delta.ZERO_BASE:
            return True  # no object to keep: nothing to pin
        if base_id in self._unlinking:
            return False
        known = self._uncommitted.get(base_id)
        if known is not None:
            if known.base_id is not None:
                return False
        elif self.index.block_kind(base_id) != "full":
            return False
        self._pins[base_id] += 1
        return True

    def release_base(self, base_id: bytes) -> None:
        """Undo a `hold_base` whose delta was not stored."""
        if base_id != delta.ZERO_BASE:
            self._unpin(base_id)

    async def base_plaintext(self, base_id: bytes, size: int) -> Plaintext:
        if base_id == delta.ZERO_BASE:
            return zeros(size)
        return await self.read_block(base_id, as_base=True)

    def _base_plaintext_sync(self, base_id: bytes, size: int) -> Plaintext:
        """Worker thread: a base's plaintext, from the store (no cache in threads)."""
        return bytes(size) if base_id == delta.ZERO_BASE else self._get_and_decode(base_id)

    def full_base(self, block_id: bytes) -> bytes:
        """The full block to store a delta over, for a block resembling `block_id`: the
        block itself, or its base if it is a delta (chains stay one deep)."""
        known = self._uncommitted.get(block_id)
        base = known.base_id if known is not None else self.index.base_of(block_id)
        return base if base is not None else block_id

    def _can_copy(self, source: BlockRepository, block_id: bytes) -> bool:
        """Whether `source`'s object for `block_id` can be copied here as it is: a full
        object always; a delta only over a base this region holds (then held)."""
        base = source.index.base_of(block_id)
        return base is None or self.hold_base(base)

    def _encode_over(
        self,
        plain: bytes | bytearray,
        block_id: bytes,
        base_id: bytes,
        base: bytes | bytearray,
        keys: BlockKeys | None,
        compression: str,
    ) -> codec.EncodedBlock:
        """Worker thread: a delta over `base` when few pages differ, else the whole block."""
        pages = delta.changed_pages(plain, base) if base else None
        if pages is None:
            return codec.encode(plain, block_id, keys, self.name, compression)
        return delta.encode(plain, block_id, base_id, pages, keys, self.name, compression)

    def materialize(self, block_id: bytes) -> tuple[bytes, delta.Delta | None]:
        """Worker thread (keys primed): a block's verified plaintext, and its delta if it is
        stored as one (for copies to a region that lacks its base, or to other keys)."""
        data = self._get(block_id)
        if not delta.is_delta(data):
            return self._decode(block_id, data), None
        opened = self._open_delta(block_id, data)
        base = self._base_plaintext_sync(opened.base_id, opened.plain_size)
        return bytes(self._applied(block_id, base, opened)), opened

    def _open_delta(self, block_id: bytes, data: bytes) -> delta.Delta:
        try:
            return delta.open(data, block_id, self._keys_for, self.name)
        except BlockCorrupt as exc:
            exc.message = f"block {block_id.hex()} in region {self.name}: {exc.message}"
            raise

    def _applied(self, block_id: bytes, base: Plaintext, opened: delta.Delta) -> bytearray:
        """Worker thread: the delta laid over its base, checked against the block id (a
        damaged or wrong base is EIO, never wrong bytes)."""
        try:
            plain = delta.apply(base, opened)
        except BlockCorrupt as exc:
            exc.message = f"block {block_id.hex()} in region {self.name}: {exc.message}"
            raise
        keys = self._keys_for(opened.key_id) if opened.encrypted else None
        if codec.content_id(plain, keys.id_key if keys is not None else None) != block_id:
            raise BlockCorrupt(
                f"block {block_id.hex()} in region {self.name} does not match its id over "
                f"its base {opened.base_id.hex()} (the base is damaged or wrong)"
            )
        return plain

    async def put_block(
        self,
        block_id: bytes,
        make_object: Callable[[], codec.EncodedBlock],
        held_base: bytes | None = None,
    ) -> StoredBlock:
        """Ensure the region holds block `block_id`, calling `make_object` (in a worker
        thread) only if it does not; pins the id until `committed()`.

        Dedup happens here: a block in the index, or written and awaiting its commit, is
        reused; a block another task is writing right now is waited for, so two writers or
        copy jobs needing the same new block store it once.

        `held_base`: a base the caller pinned (`hold_base`) because `make_object` may make
        a delta over it. Its pin then stays until the delta's row commits, and is released
        here otherwise.
        """
        try:
            stored = await self._put_block(block_id, make_object)
        except BaseException:
            if held_base is not None:
                self.release_base(held_base)
            raise
        if held_base is not None and (stored.new is None or stored.new.base_id != held_base
                                      or not stored.written):
            self.release_base(held_base)
        return stored

    async def _put_block(
        self, block_id: bytes, make_object: Callable[[], codec.EncodedBlock]
    ) -> StoredBlock:
        while True:
            if block_id in self._unlinking:
                await self._gc_done.wait()
                continue
            writing = self._writing.get(block_id)
            if writing is not None:
                await writing.wait()
                continue
            break
        self._pins[block_id] += 1
        known = self._uncommitted.get(block_id)
        if known is not None or self.index.has_block(block_id):
            return StoredBlock(block_id, known, written=False)
        done = self._writing[block_id] = trio.Event()
        try:
            if self.shared_lookup is not None:
                # After the claim above (`_writing`): other writers here of this block wait
                # for the answer rather than ask too.
                found = await self.shared_lookup(block_id)
                if found is not None:
                    self._uncommitted[block_id] = found
                    return StoredBlock(block_id, found, written=False)
            if self.remote:
                encoded = await workers.run_sync(make_object, limiter=self.limiter)
                if self.shared_encoded is not None:
                    self.shared_encoded(_new_block(encoded))
                await workers.run_sync(
                    self.backend.put, block_id.hex(), encoded.parts, limiter=self.io_limiter
                )
            else:
                encoded = await self._put_local(make_object)
        except BaseException:
            self._unpin(block_id)
            raise
        finally:
            del self._writing[block_id]
            done.set()
        new = _new_block(encoded)
        self._uncommitted[block_id] = new
        fault_point("delta_written" if new.base_id is not None else "object_written")
        return StoredBlock(block_id, new, written=True)

    async def rewrite_block(
        self, block_id: bytes, make_object: Callable[[], codec.EncodedBlock]
    ) -> int:
        """Store again a block whose index row stays but whose object is missing or
        damaged (a resumed copy found it so): the new object replaces the old one's
        location, durable before this returns. Returns the bytes written."""
        while (writing := self._writing.get(block_id)) is not None:
            await writing.wait()
        done = self._writing[block_id] = trio.Event()
        try:
            encoded = await workers.run_sync(make_object, limiter=self.limiter)
            await workers.run_sync(
                self.backend.put, block_id.hex(), encoded.parts, limiter=self.io_limiter
            )
            await self.sync()
        finally:
            del self._writing[block_id]
            done.set()
        self.cache.discard(block_id)
        return encoded.plain_size

    def verify_object(self, block_id: bytes) -> None:
        """Worker thread (keys primed): ObjectMissing or BlockCorrupt unless the stored
        object is there and decodes to its id."""
        self.fetch_object(block_id)

    async def _put_local(self, make_object: Callable[[], codec.EncodedBlock]) -> codec.EncodedBlock:
        """Encode and write in one thread hop; on a full disk, wait for pending frees."""
        deadline = trio.current_time() + FREES_WAIT
        while True:
            try:
                return await workers.run_sync(self._make_and_put, make_object, limiter=self.limiter)
            except StoreFull:
                if not self.frees.busy:
                    raise
                log.info(
                    "region %s: store full; waiting for deleted blocks to be collected",
                    self.name,
                )
                if not await self.frees.wait_until_idle(deadline):
                    raise

    def _make_and_put(self, make_object: Callable[[], codec.EncodedBlock]) -> codec.EncodedBlock:
        encoded = make_object()
        self.backend.put(encoded.block_id.hex(), encoded.parts)
        return encoded

    def _copy_or_encode(
        self,
        source: BlockRepository,
        plain: bytes | bytearray,
        block_id: bytes,
        keys: BlockKeys | None,
        compression: str,
    ) -> codec.EncodedBlock:
        """Worker thread: the source's object (verified: decoding is cheaper than
        compressing), or, if it is gone or damaged there, our own encoding of `plain`."""
        try:
            return source.fetch_object(block_id)
        except (BlockCorrupt, ObjectMissing):
            return codec.encode(plain, block_id, keys, self.name, compression)

    def fetch_object(self, block_id: bytes) -> codec.EncodedBlock:
        """A stored object as it is, verified, for copying to another region without
        recompressing. Runs in a worker thread."""
        data = self._get(block_id)
        header = codec.parse_header(data)
        if not delta.is_delta(data):
            codec.decode(data, block_id, self._keys_for, self.name)
            return codec.EncodedBlock(block_id, (data,), header.plain_size, header.codec)
        opened = self._open_delta(block_id, data)
        self._applied(
            block_id, self._base_plaintext_sync(opened.base_id, opened.plain_size), opened
        )
        return codec.EncodedBlock(
            block_id, (data,), header.plain_size, header.codec, base_id=opened.base_id
        )

    def open_for_copy(
        self, block_id: bytes, new_id_key: bytes | None
    ) -> tuple[bytes, codec.OpenedBlock]:
        """A stored object opened for re-encryption elsewhere (worker thread; keys primed)."""
        data = self._get(block_id)
        return codec.open_for_copy(data, block_id, self._keys_for, self.name, new_id_key)

    def _keys_for(self, key_id: bytes) -> BlockKeys:
        """The CMK named in a block header; KeyNotFound (ENOKEY) or KeyDisabled (EKEYREVOKED)."""
        if self.keys is None:
            raise BlockCorrupt("block is encrypted and this store has no keys")
        return self.keys.loaded(str(uuid.UUID(bytes=key_id)))  # worker thread: no SQLite

    async def sync(self) -> None:
        """Make every object written so far durable (before committing rows that name them)."""
        # On a bucket of packs a sync uploads: it waits on the network, not on a core.
        await workers.run_sync(self.backend.sync, limiter=self.io_limiter)

    def committed(self, block_ids: list[bytes]) -> None:
        """Release the pins of a batch whose rows are now in the index."""
        for block_id in block_ids:
            self._forget_uncommitted(block_id)
            self._unpin(block_id)

    def abandoned(self, block_ids: list[bytes], written: list[bytes]) -> None:
        """Release the pins of a batch that will never be committed (its snapshot is gone).

        Objects it wrote that no one else commits are deleted by the next collection.
        """
        for block_id in block_ids:
            self._unpin(block_id)
        if written:
            self._abandoned.update(written)
            self.request_gc()

    def _forget_uncommitted(self, block_id: bytes) -> None:
        """Its row is committed (or it is deleted): a delta's base pin is no longer needed,
        the row's trigger counts the reference from now on."""
        new = self._uncommitted.pop(block_id, None)
        if new is not None and new.base_id is not None:
            self.release_base(new.base_id)

    def _unpin(self, block_id: bytes) -> None:
        self._pins[block_id] -= 1
        if self._pins[block_id] <= 0:
            del self._pins[block_id]

    # --- reading blocks --------------------------------------------------------------------

    async def read_block(self, block_id: bytes, *, as_base: bool = False) -> Plaintext:
        """Plaintext of a block, verified against its id; BlockCorrupt (EIO) otherwise.

        `as_base`: read as a delta's base, which must be a full object. A damaged store whose
        "base" is a delta again (perhaps over the block being read) is EIO, not a wait for
        a load that waits on this one."""
        while True:
            cached = self.cache.get(block_id)
            if cached is not None:
                return cached
            loading = self._loading.get(block_id)
            if loading is None:
                break
            await loading.wait()
            if block_id not in self._loading and self.cache.get(block_id) is None:
                # The load we waited for failed or was evicted at once: load it ourselves.
                break
        done = self._loading[block_id] = trio.Event()
        try:
            try:
                loaded = await self._load(block_id)
            except KeyNotFound:
                if self.keys is None:
                    raise
                # Worker threads decode with keys unwrapped beforehand on this thread. Not
                # priming before every block keeps SQLite (and a wait for the GIL after it)
                # off the read path; a key not unwrapped yet is unwrapped now, once.
                self.keys.prime()
                loaded = await self._load(block_id)
            if isinstance(loaded, delta.Delta):  # over its base, usually in the cache
                if as_base:
                    raise BlockCorrupt(
                        f"block {block_id.hex()} in region {self.name} is a delta, and a "
                        "delta's base must be a whole block"
                    )
                base = await self.base_plaintext(loaded.base_id, loaded.plain_size)
                plain: Plaintext = await workers.run_sync(
                    self._applied, block_id, base, loaded, limiter=self.limiter
                )
            else:
                plain = loaded
        finally:
            del self._loading[block_id]
            done.set()
        self.cache.put(block_id, plain)
        return plain

    async def read_range(self, block_id: bytes, start: int, end: int) -> Plaintext:
        """Bytes [start, end) of a block's plaintext, decoding only the frames that hold them
        (format version 2; codec.py says how each is verified). For random reads: a 4 KiB
        miss decodes 64 KiB instead of the whole block. Frames are cached on their own
        (`frame_key`); a whole block cached already serves the range."""
        plain = self.cache.get(block_id)
        if plain is not None:
            return plain[start:end]
        shift = codec.FRAME_SHIFT
        first, last = start >> shift, (end - 1) >> shift
        found = [self.cache.get(frame_key(block_id, n)) for n in range(first, last + 1)]
        frames = [frame for frame in found if frame is not None]
        if len(frames) < len(found):
            loaded = await self._load_frames(block_id, first, last)
            if loaded is None:  # a version 1 object: whole blocks only
                return (await self.read_block(block_id))[start:end]
            for n, frame in enumerate(loaded, first):
                self.cache.put(frame_key(block_id, n), frame)
            frames = list(loaded)
        if not frames:  # the range lies past the end of a short block: zeros, for the caller
            return b""
        base = first << shift
        joined = frames[0] if len(frames) == 1 else b"".join(frames)
        return joined[start - base : end - base]

    def cached_frame(self, block_id: bytes, frame: int) -> memoryview | None:
        """A frame's plaintext if the cache holds it (alone or in its whole block), without
        any I/O; short or absent at the end of a short block."""
        shift = codec.FRAME_SHIFT
        plain = self.cache.get(block_id)
        if plain is not None:
            return memoryview(plain)[frame << shift : (frame + 1) << shift]
        found = self.cache.get(frame_key(block_id, frame))
        return None if found is None else memoryview(found)

    async def _load_frames(self, block_id: bytes, first: int, last: int) -> list[bytes] | None:
        if self.remote:
            data = await self._fetch(block_id)
            return await workers.run_sync(
                self._decode_frames, block_id, data, first, last, limiter=self.limiter
            )

        def get_and_decode() -> list[bytes] | None:
            return self._decode_frames(block_id, self._get(block_id), first, last)

        try:
            return await workers.run_sync(get_and_decode, limiter=self.limiter)
        except KeyNotFound:
            if self.keys is None:
                raise
            self.keys.prime()  # as in read_block: a key not unwrapped yet, unwrapped once
            return await workers.run_sync(get_and_decode, limiter=self.limiter)

    def _decode_frames(
        self, block_id: bytes, data: bytes, first: int, last: int
    ) -> list[bytes] | None:
        if delta.is_delta(data):
            return None  # read whole, over its base (which the cache usually has)
        try:
            got = codec.decode_frames(data, block_id, first, last, self._keys_for, self.name)
        except BlockCorrupt as exc:
            exc.message = f"block {block_id.hex()} in region {self.name}: {exc.message}"
            raise
        if got is None or got[0] != 1 << codec.FRAME_SHIFT:
            return None  # version 1, or framed otherwise than this reader counts
        return got[1]

    async def _load(self, block_id: bytes) -> bytes | delta.Delta:
        """Fetch and decode a block in worker threads: a remote fetch waits on the network
        under the I/O limiter, so it does not hold one of the CPU workers meanwhile. A
        delta object comes back opened, for `read_block` to lay over its base."""
        if self.remote:
            data = await self._fetch(block_id)
            return await workers.run_sync(self._open_any, block_id, data, limiter=self.limiter)
        return await workers.run_sync(self._get_and_open, block_id, limiter=self.limiter)

    def _open_any(self, block_id: bytes, data: bytes) -> bytes | delta.Delta:
        if delta.is_delta(data):
            return self._open_delta(block_id, data)
        return self._decode(block_id, data)

    def _get_and_open(self, block_id: bytes) -> bytes | delta.Delta:
        return self._open_any(block_id, self._get(block_id))

    def _get(self, block_id: bytes) -> bytes:
        """The stored object's bytes; ObjectMissing if the store has none (worker thread)."""
        key = block_id.hex()
        try:
            return self.backend.get(key)
        except FileNotFoundError:
            raise ObjectMissing(f"block object {key} is missing from region {self.name}") from None

    def _decode(self, block_id: bytes, data: bytes) -> bytes:
        try:
            return codec.decode(data, block_id, self._keys_for, self.name)
        except BlockCorrupt as exc:
            exc.message = f"block {block_id.hex()} in region {self.name}: {exc.message}"
            raise

    def _get_and_decode(self, block_id: bytes) -> bytes:
        return self._decode(block_id, self._get(block_id))

    async def _fetch(self, block_id: bytes) -> bytes:
        """A remote block's stored bytes: from the read-ahead's batch when it has them (or
        is fetching them), else one GET."""
        fetching = self._raw_fetching.get(block_id)
        if fetching is not None:
            await fetching.wait()
        data = self._raw_ahead.pop(block_id, None)
        if data is not None:
            self._raw_ahead_bytes -= len(data)
            return data
        return await workers.run_sync(self._get, block_id, limiter=self.io_limiter)

    def wants_fetch(self, block_id: bytes) -> bool:
        """Whether a block is neither cached nor being loaded or fetched (read-ahead)."""
        return not (
            block_id in self.cache
            or block_id in self._loading
            or block_id in self._raw_ahead
            or block_id in self._raw_fetching
        )

    async def prefetch_many(self, block_ids: list[bytes]) -> None:
        """Read-ahead of a sequential reader: on a bucket of packs, the stored bytes of the
        blocks in one ranged GET per run of neighbours in a pack (not a GET each), then
        every block decoded into the cache as `prefetch` does."""
        backend = self.backend
        wanted = [b for b in dict.fromkeys(block_ids) if self.wants_fetch(b)]
        if isinstance(backend, PackedS3Backend) and len(wanted) > 1:
            done = trio.Event()
            for block_id in wanted:
                self._raw_fetching[block_id] = done
            got: dict[str, bytes] = {}
            try:
                with contextlib.suppress(Exception):  # each block's own load reports it
                    got = await workers.run_sync(
                        backend.get_many, [b.hex() for b in wanted], limiter=self.io_limiter
                    )
            finally:
                for block_id in wanted:
                    self._raw_fetching.pop(block_id, None)
                done.set()
            for key, data in got.items():
                self._keep_raw(bytes.fromhex(key), data)
        async with trio.open_nursery() as nursery:
            for block_id in wanted:
                nursery.start_soon(self.prefetch, block_id)

    def _keep_raw(self, block_id: bytes, data: bytes) -> None:
        old = self._raw_ahead.pop(block_id, None)
        if old is not None:
            self._raw_ahead_bytes -= len(old)
        self._raw_ahead[block_id] = data
        self._raw_ahead_bytes += len(data)
        while self._raw_ahead_bytes > RAW_AHEAD_BYTES:  # a reader that stopped reading
            _, dropped = self._raw_ahead.popitem(last=False)
            self._raw_ahead_bytes -= len(dropped)

    async def prefetch(self, block_id: bytes) -> None:
        """Read a block into the cache ahead of need; failures wait for the real read."""
        if block_id in self.cache or block_id in self._loading:
            return
        # A failure here is seen and reported by the reader that needs the block.
        with contextlib.suppress(Exception):
            await self.read_block(block_id)

    # --- garbage ---------------------------------------------------------------------------

    def request_gc(self) -> None:
        """Ask the region's collector task to run soon (deletes and rewrites call this)."""
        if not self._gc_wanted.is_set():
            self.frees.begin()  # ended by the collection this request wakes
            self._gc_wanted.set()

    async def gc_loop(self) -> None:
        """Runs for the life of the mount: collects garbage shortly after it is made."""
        upkeep_every = UPKEEP_EVERY if isinstance(self.backend, PackedS3Backend) else math.inf
        while True:
            with trio.move_on_after(upkeep_every):
                await self._gc_wanted.wait()
            if self.closed:
                return
            if not self._gc_wanted.is_set():  # a quiet while: dead packs past their grace
                await self._pack_upkeep()
                continue
            self._gc_wanted = trio.Event()
            try:
                await trio.sleep(GC_DELAY)
                if self.closed:
                    return
                await self.collect_garbage()
                await self._pack_upkeep()
            except Exception:
                log.exception("region %s: garbage collection failed; will retry", self.name)
                self.request_gc()
                await trio.sleep(10)
            finally:
                self.frees.end()

    async def _pack_upkeep(self) -> None:
        """Dead packs past their grace deleted, the most dead repacked (a bucket of packs)."""
        backend = self.backend
        if not isinstance(backend, PackedS3Backend) or self.closed:
            return
        try:
            moved = await workers.run_sync(backend.maintain, limiter=self.io_limiter)
        except SnapfsError as exc:
            log.warning("region %s: pack upkeep failed (%s); will retry", self.name, exc)
            return
        if moved and self.on_relocated is not None:
            self.on_relocated()

    async def collect_garbage(self) -> int:
        """Delete unreferenced blocks: rows first (one transaction), then their objects."""
        freed = 0
        async with self._gc_lock:
            if self.closed:
                return 0
            freed += await self._delete_abandoned()
            after = b""
            sizer = BatchSizer(GC_BATCH)
            while True:
                # A batch at a time, in id order: dropping rows runs on the trio thread, and
                # a short transaction per batch (sized by time, LOOP_BUDGET) keeps requests
                # answered while a large delete is collected (the object deletion in
                # between lets them in).
                size = sizer.start()
                batch = self.index.unreferenced_blocks(size, after=after)
                if not batch:
                    break
                after = batch[-1]
                candidates = [b for b in batch if b not in self._pins]
                dropped = self.index.drop_unreferenced(candidates) if candidates else []
                sizer.done()
                if dropped and self.index.bases_released:
                    # Bases whose last delta went may now be unreferenced themselves; the
                    # next collection (or this one, further on in id order) takes them.
                    fault_point("gc_delta_dropped")
                    self.request_gc()
                if dropped:
                    self._unlinking.update(dropped)
                    self._gc_done = trio.Event()
                    for block_id in dropped:
                        self.cache.discard(block_id)
                    fault_point("gc_rows_dropped")
                    try:
                        await workers.run_sync(
                            self._delete_objects, dropped, limiter=self.io_limiter
                        )
                    finally:
                        self._unlinking.difference_update(dropped)
                        self._gc_done.set()
                    freed += len(dropped)
                if len(batch) < size:
                    break
        if freed:
            log.info("region %s: freed %d unreferenced blocks", self.name, freed)
        return freed

    async def _delete_abandoned(self) -> int:
        """Objects written for batches that were dropped and that nobody else committed."""
        unpinned = [b for b in self._abandoned if b not in self._pins]
        self._abandoned.difference_update(unpinned)
        doomed = [b for b in unpinned if b not in self._writing and not self.index.has_block(b)]
        if not doomed:
            return 0
        for block_id in doomed:
            self._forget_uncommitted(block_id)
            self.cache.discard(block_id)
        self._unlinking.update(doomed)
        self._gc_done = trio.Event()
        try:
            await workers.run_sync(self._delete_objects, doomed, limiter=self.io_limiter)
        finally:
            self._unlinking.difference_update(doomed)
            self._gc_done.set()
        return len(doomed)

    def _delete_objects(self, block_ids: list[bytes]) -> None:
        self.backend.delete_many(
            [block_id.hex() for block_id in block_ids], lambda: fault_point("gc_object_deleted")
        )

    async def collect_orphans(self) -> int:
        """Delete objects that no index row names (left by a crash between write and commit).

        Only safe while no writer is active: it runs at mount, before serving requests.
        """
        known = self.index.all_block_ids()

        def scan_and_delete() -> int:
            orphans = []
            for key in list(self.backend.keys()):
                try:
                    block_id = bytes.fromhex(key)
                except ValueError:
                    continue
                if block_id not in known:
                    orphans.append(key)
            self.backend.delete_many(orphans, lambda: fault_point("orphan_deleted"))
            if orphans:
                log.warning("region %s: removed %d orphaned block objects", self.name, len(orphans))
            self.backend.reclaim_unmapped()  # then the bytes of objects that were never synced
            return len(orphans)

        return await workers.run_sync(scan_and_delete, limiter=self.io_limiter)

    # --- settings -------------------------------------------------------------------------

    @property
    def compression(self) -> str:
        """How new blocks are compressed here (`lz4` or `zstd`); read once, it is on the
        path of every block stored."""
        if self._compression is None:
            value = self.index.get_setting("compression", codec.DEFAULT_COMPRESSION)
            self._compression = value if value in codec.CODECS_BY_NAME else "zstd"
        return self._compression

    @property
    def deltas(self) -> bool:
        """Whether new blocks may be stored as deltas over similar ones (`on` by default;
        `user.snapfs.deltas=off` stores every block whole, as before issue 16)."""
        if self._deltas is None:
            self._deltas = self.index.get_setting("deltas", "on") != "off"
        return self._deltas

    def set_deltas(self, value: str) -> None:
        if value not in ("on", "off"):
            raise InvalidParameter(f"deltas is on or off, got {value!r}")
        self.index.set_setting("deltas", value)
        self._deltas = value == "on"

    def set_compression(self, name: str) -> None:
        if name not in codec.CODECS_BY_NAME:
            raise InvalidParameter(
                f"compression is one of {', '.join(sorted(codec.CODECS_BY_NAME))}, got {name!r}"
            )
        self.index.set_setting("compression", name)
        self._compression = name
