"""Copy jobs: the background transfer behind `mv` across regions and `snapfs copy`.

A job copies the block map of a source snapshot into a destination snapshot of another (or
the same) region, transferring only the blocks the destination region lacks:

    for each batch of the source's blocks, in block order, from the job's resume point:
        a block id the destination already holds (any snapshot, any earlier copy) -> map it;
        else fetch the source object, verify it, write it to the destination unchanged;
        sync the destination's objects, then ONE transaction: block rows, map rows, the
        destination's transferred_bytes and the job's resume point.

So a job killed at any moment resumes at the first batch that did not commit, and a block
two jobs need at once is written once (the region makes the second wait for the first).
Jobs live in the destination region's `copy_jobs` table until they finish; at most
`max_parallel_copies` run per destination region, the rest wait in creation order.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from snapfs import workers
from snapfs.blocks.repository import StoredBlock
from snapfs.errors import (
    BlockCorrupt,
    NotFound,
    ObjectMissing,
    SnapfsError,
    SnapshotDamaged,
    as_snapfs_error,
)
from snapfs.faults import fault_point
from snapfs.formats import codec, delta
from snapfs.model.states import SnapshotStatus
from snapfs.pacing import Pacer

if TYPE_CHECKING:
    from snapfs.service.region import Region
    from snapfs.service.snapshots import Snapshot

log = logging.getLogger(__name__)

BATCH_BLOCKS = 64
COMPARE_SPAN = 4096  # blocks of two maps compared at a time
COMPARE_SPANS_PER_STEP = 4  # then the loop lets other requests in (~10 ms)
TRANSFERS_PER_JOB = 8
# Into an object store each transfer mostly waits on a PUT's round trip: more run at once
# (bounded again by the store's I/O limiter).
TRANSFERS_PER_REMOTE_JOB = 16


@dataclass(eq=False)
class CopyJob:
    dst: Snapshot
    src_region: str
    src_snapshot_id: str
    kind: str  # "move" (mv across regions) or "copy" (snapfs copy)
    next_block: int
    done_blocks: int
    total_blocks: int
    created_at: float
    source: Snapshot | None = None  # None if the source is gone (the job then fails)
    # Resumed after an unclean stop (crash, power loss): blocks below this were committed
    # before it and are read back and checked before the job goes on.
    verify_below: int = 0
    # The source's ancestor whose copy the destination's map is relative to (None: a full
    # copy): the job walks only the rows between the source and it.
    base_id: str | None = None
    # The destination starts relative to a snapshot of the same disk found by lineage: the
    # job compares the maps and brings what differs; done/total count blocks compared.
    compare: bool = False
    scanned_to: int = 0  # comparing: the blocks before this were compared
    compare_end: int = 0  # comparing: the block numbers to compare end here
    state: str = "queued"
    scope: trio.CancelScope | None = None
    finished: trio.Event = field(default_factory=trio.Event)

    @property
    def progress(self) -> float:
        if self.total_blocks <= 0:
            return 100.0 if self.state == "done" else 0.0
        return min(100.0, 100.0 * self.done_blocks / self.total_blocks)


class CopyEngine:
    """Schedules and runs the store's copy jobs."""

    def __init__(
        self,
        regions: Callable[[], Iterable[Region]],
        job_ended: Callable[[CopyJob, bool], None],
        give_back_source: Callable[[CopyJob], None],
        bandwidth_limit: int | None = None,
    ):
        # The engine knows the store only by these: the regions whose queues it starts at
        # mount, whom to tell that a job ended (done or failed; not stopped) to release its
        # source, and who gives a failing move's source its name back. It does not import
        # the Store.
        self._regions = regions
        self._job_ended = job_ended
        self._give_back_source = give_back_source
        self.jobs: dict[str, CopyJob] = {}
        self._queues: dict[str, collections.deque[CopyJob]] = collections.defaultdict(
            collections.deque
        )
        self._running: collections.Counter[str] = collections.Counter()
        self._nursery: trio.Nursery | None = None
        # Bytes of source data per second, per job: a documented throttle (`snapfs mount
        # --copy-bwlimit`) for sharing a link; tests use it to watch progress move.
        self.bandwidth_limit = bandwidth_limit

    # --- scheduling ------------------------------------------------------------------------

    def add(self, job: CopyJob) -> None:
        """Register a job (new, or loaded from the index at mount) and run it when a slot
        in its destination region is free."""
        self.jobs[job.dst.id] = job
        job.dst.copy_job = job
        self._queues[job.dst.region.name].append(job)
        self._schedule(job.dst.region)

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        for region in self._regions():
            self._schedule(region)

    def _schedule(self, region: Region) -> None:
        if self._nursery is None:
            return
        queue = self._queues[region.name]
        while queue and self._running[region.name] < region.max_parallel_copies:
            job = queue.popleft()
            self._running[region.name] += 1
            job.scope = trio.CancelScope()  # from now on cancel() can stop it
            self._nursery.start_soon(self._run, job, name=f"copy into {job.dst.id}")

    def reschedule(self, region: Region) -> None:
        """The region's max_parallel_copies changed: start what now fits."""
        self._schedule(region)

    def queued(self, region: Region) -> int:
        return len(self._queues[region.name])

    def running(self, region: Region) -> int:
        return self._running[region.name]

    async def cancel(self, job: CopyJob) -> None:
        """Stop a job (its destination is being deleted); returns once it has stopped."""
        queue = self._queues[job.dst.region.name]
        if job in queue:
            queue.remove(job)
            self._forget(job)
            return
        if job.scope is not None:
            job.scope.cancel()
            await job.finished.wait()

    async def stop_all(self) -> None:
        """Unmount: stop running jobs where they are; they resume at the next mount."""
        for job in list(self.jobs.values()):
            if job.scope is not None:
                job.scope.cancel()
        for job in list(self.jobs.values()):
            if job.state == "running":
                await job.finished.wait()

    def _forget(self, job: CopyJob) -> None:
        self.jobs.pop(job.dst.id, None)
        job.dst.copy_job = None
        job.finished.set()

    # --- running ---------------------------------------------------------------------------

    async def _run(self, job: CopyJob) -> None:
        region = job.dst.region
        job.state = "running"
        assert job.scope is not None
        try:
            with job.scope:
                await self._transfer(job)
        except Exception as exc:  # noqa: BLE001 - a failed copy is a state, not a crash
            if job.scope.cancel_called:
                # Stopped (unmount interrupts an object store's retries, which then raise):
                # not a failure; the job resumes at the next mount.
                log.info("copy into %s stopped: %s", job.dst.id, exc)
            else:
                self._fail(job, as_snapfs_error(exc))
        finally:
            job.scope = None
            self._running[region.name] -= 1
            if job.state == "running":
                # Cancelled (unmount, or the destination is being deleted): the job row
                # stays, so an unmount resumes it at the next mount.
                job.state = "stopped"
                log.info("copy into %s stopped at block %d of its walk; the job stays",
                         job.dst.id, job.next_block)  # fmt: skip
            self._forget(job)
            self._schedule(region)
        if job.state in ("done", "failed"):
            fault_point("copy_finished")
            try:
                self._job_ended(job, job.state == "done")
            except Exception:  # noqa: BLE001 - never let bookkeeping end the mount
                log.exception("copy into %s: releasing the source failed", job.dst.id)

    async def _transfer(self, job: CopyJob) -> None:
        dst = job.dst
        src = job.source
        if src is None:
            raise NotFound(
                f"source snapshot {job.src_snapshot_id} in region {job.src_region} no longer exists"
            )
        if job.next_block:
            log.info(
                "copy %s -> %s/%s: resuming at block %d (%d of %d blocks done)",
                src.id,
                dst.region.name,
                dst.id,
                job.next_block,
                job.done_blocks,
                job.total_blocks,
            )
        else:
            log.info(
                "copy %s/%s (%s) -> %s/%s (%s): %d blocks",
                src.region.name,
                src.name,
                src.id,
                dst.region.name,
                dst.name,
                dst.id,
                job.total_blocks,
            )
        if job.verify_below:
            await self._verify_committed(job, src)
        batch_blocks = self._batch_blocks(dst.region.block_size)
        pacer = Pacer(self.bandwidth_limit)
        while True:
            batch = self._next_batch(job, src, batch_blocks)
            if batch:
                await self._copy_batch(job, src, batch)
                await pacer.pace(len(batch) * dst.region.block_size)
            elif job.compare and job.scanned_to < job.compare_end:
                # Spans that differ in nothing: on, letting requests in between.
                job.next_block = job.done_blocks = job.scanned_to
                await trio.sleep(0)
            else:
                break
        self._finish(job)

    @staticmethod
    def _next_batch(job: CopyJob, src: Snapshot, limit: int) -> list[tuple[int, bytes | None]]:
        """The next source rows to bring: with a base, only those where the source may
        differ from it (None: a hole there); comparing, those that differ from the
        destination's parent; else the whole map. A base that left the source's chain
        (deleted, its rows folded into its children) makes the job compare instead: what
        the destination already has is then only mapped."""
        index = src.region.index
        if job.base_id is not None:
            rows = index.changed_since(src.id, job.base_id, job.next_block, limit)
            if rows is not None:
                return rows
            log.info("copy into %s: its base %s is gone; comparing maps instead",
                     job.dst.id, job.base_id)  # fmt: skip
            job.base_id = None
        parent = job.dst.region.index.parent_of(job.dst.id)
        if parent is None:
            return list(index.block_map_from(src.id, job.next_block, limit))
        job.compare = True
        return CopyEngine._differing(job, src, parent, limit)

    @staticmethod
    def _differing(
        job: CopyJob, src: Snapshot, parent: str, limit: int
    ) -> list[tuple[int, bytes | None]]:
        """Source rows from job.next_block on that differ from the destination parent's,
        up to `limit`, comparing COMPARE_SPAN blocks at a time; sets job.scanned_to."""
        bs = job.dst.region.block_size
        dst_index = job.dst.region.index
        end = -(-max(src.size, job.dst.size) // bs)
        parent_row = dst_index.snapshot_row(parent)
        if parent_row is not None:
            end = max(end, -(-parent_row["size"] // bs))
        job.compare_end = end
        rows: list[tuple[int, bytes | None]] = []
        first = job.next_block
        spans = 0
        while first < end and len(rows) < limit and spans < COMPARE_SPANS_PER_STEP:
            spans += 1
            last = min(first + COMPARE_SPAN, end) - 1
            mine = src.region.index.block_map(src.id, first, last)
            theirs = dst_index.block_map(parent, first, last)
            for no in sorted(mine.keys() | theirs.keys()):
                if mine.get(no) != theirs.get(no):
                    rows.append((no, mine.get(no)))
            first = last + 1
        job.scanned_to = first if len(rows) < limit else rows[limit - 1][0] + 1
        return rows[:limit]

    async def _verify_committed(self, job: CopyJob, src: Snapshot) -> None:
        """Read back every destination block committed before an unclean stop and check
        it against its id; one missing or damaged (its bytes never reached the disk, or
        were lost since) is copied again from the source. So a move can only release its
        source once the destination is known good, whatever the store's disk did."""
        dst = job.dst
        region = dst.region
        log.info(
            "copy %s -> %s/%s: resumed after an unclean stop; verifying the %d blocks "
            "committed before it",
            src.id,
            region.name,
            dst.id,
            job.done_blocks,
        )
        if region.keys is not None:
            region.keys.prime()
        if src.region.keys is not None:
            src.region.keys.prime()
        checked = rewritten = 0
        first = 0
        while first < job.verify_below:
            batch = [
                (block_no, block_id)
                for block_no, block_id in region.index.block_map_from(dst.id, first, BATCH_BLOCKS)
                if block_no < job.verify_below
            ]
            if not batch:
                break
            damaged = await self._damaged_blocks(region, batch)
            for block_no, block_id, why in damaged:
                log.warning(
                    "copy into %s/%s (%s): block %d (%s) %s; copying it again from %s",
                    region.name,
                    dst.name,
                    dst.id,
                    block_no,
                    block_id.hex(),
                    why,
                    src.id,
                )
                await self._copy_again(job, src, block_no, block_id)
            checked += len(batch)
            rewritten += len(damaged)
            first = batch[-1][0] + 1
        job.verify_below = 0
        log.info(
            "copy into %s/%s (%s): %d committed blocks verified, %d copied again",
            region.name,
            dst.name,
            dst.id,
            checked,
            rewritten,
        )

    async def _damaged_blocks(
        self, region: Region, batch: list[tuple[int, bytes]]
    ) -> list[tuple[int, bytes, str]]:
        damaged: list[tuple[int, bytes, str]] = []
        limiter = trio.Semaphore(TRANSFERS_PER_REMOTE_JOB if region.remote else TRANSFERS_PER_JOB)

        async def verify(block_no: int, block_id: bytes) -> None:
            async with limiter:
                try:
                    await workers.run_sync(
                        region.verify_object,
                        block_id,
                        limiter=region.io_limiter if region.remote else region.limiter,
                    )
                except (ObjectMissing, BlockCorrupt) as exc:
                    damaged.append((block_no, block_id, f"failed verification: {exc.message}"))

        async with trio.open_nursery() as nursery:
            for block_no, block_id in batch:
                nursery.start_soon(verify, block_no, block_id)
        return sorted(damaged)

    async def _copy_again(self, job: CopyJob, src: Snapshot, block_no: int, dst_id: bytes) -> None:
        """Rewrite destination block `dst_id` (block `block_no`) from the source's block."""
        found = src.region.index.block_map_from(src.id, block_no, 1)
        if not found or found[0][0] != block_no:
            raise SnapshotDamaged(
                f"destination block {block_no} of {job.dst.id} is damaged and the source "
                f"{src.id} has no block there to copy it from",
            )
        src_id = found[0][1]
        dst_region = job.dst.region
        dst_keys = job.dst.block_keys()
        id_key = dst_keys.id_key if dst_keys is not None else None

        source_is_delta = src.region.index.base_of(src_id) is not None
        compression = dst_region.compression

        def make_object() -> codec.EncodedBlock:
            if source_is_delta:
                # Rewritten whole: a repair must not depend on another block of the
                # destination, which may be what is damaged.
                plain, _ = src.region.materialize(src_id)
                if codec.content_id(plain, id_key) != dst_id:
                    raise BlockCorrupt(
                        f"source block {block_no} of {src.id} no longer matches the destination's"
                    )
                return codec.encode(plain, dst_id, dst_keys, dst_region.name, compression)
            if src_id == dst_id and (dst_keys is None or src.region is dst_region):
                return src.region.fetch_object(src_id)
            new_id, opened = src.region.open_for_copy(src_id, id_key)
            if new_id != dst_id:
                raise BlockCorrupt(
                    f"source block {block_no} of {src.id} no longer matches the destination's"
                )
            return codec.reseal(opened, dst_id, dst_keys, dst_region.name)

        try:
            await dst_region.rewrite_block(dst_id, make_object)
        except ObjectMissing as exc:
            raise NotFound(
                f"source snapshot {src.id} in region {src.region.name} lost block {block_no}: "
                f"{exc.message}"
            ) from None
        if dst_region.index.base_of(dst_id) is not None:
            dst_region.index.set_base(dst_id, None)  # the object is whole now

    def _batch_blocks(self, block_size: int) -> int:
        if not self.bandwidth_limit:
            return BATCH_BLOCKS
        # About four progress steps a second when throttled.
        return max(1, min(BATCH_BLOCKS, self.bandwidth_limit // 4 // block_size))

    async def _copy_batch(
        self, job: CopyJob, src: Snapshot, batch: list[tuple[int, bytes | None]]
    ) -> None:
        dst_region = job.dst.region
        stored: list[StoredBlock] = []
        mapping: dict[int, bytes | None] = {}
        remote = dst_region.remote or src.region.remote
        limiter = trio.Semaphore(TRANSFERS_PER_REMOTE_JOB if remote else TRANSFERS_PER_JOB)
        # Objects can move unchanged when both sides use the same keys (or none) and, for
        # encrypted ones, the same region (the region is bound into each object's AEAD).
        dst_keys = job.dst.block_keys()
        same_keys = src.kms_key_id == job.dst.kms_key_id
        raw = same_keys and (dst_keys is None or src.region is dst_region)
        if src.region.keys is not None:
            src.region.keys.prime()  # fetch_object verifies in a worker thread

        id_key = dst_keys.id_key if dst_keys is not None else None
        key_tag = job.dst.kms_key_id or ""
        learnt: list[tuple[str, bytes, bytes]] = []

        def open_block(block_id: bytes, expected: bytes | None) -> tuple[bytes, codec.OpenedBlock]:
            """Worker thread: open and verify under the source key, re-id under the
            destination's (checked against a translation learnt before, if any)."""
            new_id, opened = src.region.open_for_copy(block_id, id_key)
            if expected is not None and new_id != expected:
                raise BlockCorrupt(f"block {block_id.hex()} does not match its translation")
            return new_id, opened

        def seal(opened: codec.OpenedBlock, new_id: bytes) -> codec.EncodedBlock:
            # The same compressed payload under the destination's key: no recompression.
            return codec.reseal(opened, new_id, dst_keys, dst_region.name)

        def open_and_seal(block_id: bytes, expected: bytes) -> codec.EncodedBlock:
            return seal(open_block(block_id, expected)[1], expected)

        compression = dst_region.compression  # read here: the index is the trio thread's

        def whole(block_id: bytes, new_id: bytes) -> codec.EncodedBlock:
            plain, _ = src.region.materialize(block_id)
            if new_id != block_id and codec.content_id(plain, id_key) != new_id:
                raise BlockCorrupt(f"block {block_id.hex()} does not match its translation")
            return codec.encode(plain, new_id, dst_keys, dst_region.name, compression)

        async def put_delta(block_id: bytes, base: bytes) -> StoredBlock:
            """A source block stored as a delta: moved as a delta when the destination holds
            its base (the bytes that changed, not the block), else whole."""
            if raw:
                if dst_region.hold_base(base):
                    fetch = functools.partial(src.region.fetch_object, block_id)
                    return await dst_region.put_block(block_id, fetch, held_base=base)
                return await dst_region.put_block(
                    block_id, functools.partial(whole, block_id, block_id)
                )
            # Another key or region: the delta is opened and sealed again for the
            # destination, over the base's id there (the same id under the same key).
            dst_base = (
                base
                if same_keys or base == delta.ZERO_BASE
                else dst_region.index.translation(key_tag, base)
            )
            # Held already (under a translation learnt before, between keys): only mapped.
            known = block_id if same_keys else dst_region.index.translation(key_tag, block_id)
            if known is not None and dst_region.knows(known):
                return await dst_region.put_block(known, functools.partial(whole, block_id, known))
            plain, opened = await workers.run_sync(
                src.region.materialize, block_id, limiter=dst_region.limiter
            )
            new_id = block_id if same_keys else codec.content_id(plain, id_key)
            if not same_keys:
                learnt.append((key_tag, block_id, new_id))
            if opened is not None and dst_base is not None and dst_region.hold_base(dst_base):
                make = functools.partial(
                    delta.reseal, opened, new_id, dst_base, dst_keys, dst_region.name, compression
                )
                return await dst_region.put_block(new_id, make, held_base=dst_base)
            make = functools.partial(
                codec.encode, plain, new_id, dst_keys, dst_region.name, compression
            )
            return await dst_region.put_block(new_id, make)

        async def put(block_id: bytes) -> StoredBlock:
            base = src.region.index.base_of(block_id)
            if base is not None:
                return await put_delta(block_id, base)
            if raw:
                fetch = functools.partial(src.region.fetch_object, block_id)
                return await dst_region.put_block(block_id, fetch)
            # Different keys: a block seen before is found by its translated id without
            # opening it (what makes an incremental re-encrypting copy incremental in time,
            # not only in bytes); any other is opened to learn its id here.
            known = dst_region.index.translation(key_tag, block_id)
            if known is not None:
                return await dst_region.put_block(
                    known, functools.partial(open_and_seal, block_id, known)
                )
            new_id, opened = await workers.run_sync(
                open_block, block_id, None, limiter=dst_region.limiter
            )
            learnt.append((key_tag, block_id, new_id))
            return await dst_region.put_block(new_id, functools.partial(seal, opened, new_id))

        async def transfer(block_no: int, block_id: bytes) -> None:
            async with limiter:
                try:
                    result = await put(block_id)
                    stored.append(result)
                    mapping[block_no] = result.block_id
                except ObjectMissing as exc:
                    raise NotFound(
                        f"source snapshot {src.id} in region {src.region.name} "
                        f"lost block {block_no} during the copy: {exc.message}"
                    ) from None
                except BlockCorrupt as exc:
                    raise SnapshotDamaged(
                        f"source snapshot {src.id} block {block_no} is damaged: {exc.message}",
                    ) from None

        pins: list[bytes] = []
        try:
            async with trio.open_nursery() as nursery:
                for block_no, block_id in batch:
                    if block_id is None:
                        mapping[block_no] = None  # a hole over the base's block
                    else:
                        nursery.start_soon(transfer, block_no, block_id)
            pins = [s.block_id for s in stored]
            new_blocks = {s.block_id: s.new for s in stored if s.new is not None}
            written = sum(s.new.transferred_size for s in stored if s.written and s.new)
            if new_blocks:
                fault_point("copy_batch_written")
                await dst_region.sync()
                fault_point("copy_batch_synced")
            dst = job.dst
            next_block, done = batch[-1][0] + 1, job.done_blocks + len(batch)
            if job.compare:
                next_block = done = max(next_block, job.scanned_to)
            transferred = dst.transferred_bytes + written
            await dst_region.link.commit(  # a shared region's ledger first
                dst.id, list(new_blocks.values()), sorted(mapping.items()),
                {"transferred_bytes": transferred},
            )  # fmt: skip
            dst_region.index.commit_blocks(
                dst.id,
                list(new_blocks.values()),
                sorted(mapping.items()),
                {"transferred_bytes": transferred},
                {"next_block": next_block, "done_blocks": done},
                learnt,
            )
        except BaseException:
            dst_region.abandoned(
                [s.block_id for s in stored], [s.block_id for s in stored if s.new is not None]
            )
            raise
        dst_region.committed(pins)
        fault_point("copy_batch_committed")
        job.next_block, job.done_blocks = next_block, done
        dst.transferred_bytes = transferred
        dst.allocated_blocks = dst_region.index.allocated_blocks(dst.id)

    def _finish(self, job: CopyJob) -> None:
        dst = job.dst
        sealed_at = time.time()
        dst.region.index.finish_copy(
            dst.id, {"status": SnapshotStatus.AVAILABLE, "sealed_at": sealed_at}
        )
        dst.become(SnapshotStatus.AVAILABLE, sealed_at=sealed_at)
        job.state = "done"
        log.info(
            "copy into %s/%s (%s) finished: %d bytes transferred",
            dst.region.name,
            dst.name,
            dst.id,
            dst.transferred_bytes,
        )

    def _fail(self, job: CopyJob, error: SnapfsError) -> None:
        dst = job.dst
        if job.kind == "move":
            # The source gets its name back (its own region's index) before the job's end
            # is committed (the destination's): a stop between the two then resumes the
            # job, which hides the source again, instead of finding a hidden source with no
            # job and removing it. If that commit fails, the job is left to the next mount.
            try:
                self._give_back_source(job)
            except Exception:  # noqa: BLE001 - e.g. the source's index is on a full disk
                log.exception(
                    "copy into %s failed (%s) and its source could not be given back; the "
                    "job is left as it is and retried at the next mount",
                    dst.id,
                    error,
                )
                return
        dst.become(SnapshotStatus.FAILED, error=str(error))
        job.state = "failed"
        log.error("copy into %s/%s (%s) failed: %s", dst.region.name, dst.name, dst.id, error)
        try:
            dst.region.index.finish_copy(
                dst.id, {"status": SnapshotStatus.FAILED, "error": dst.error}
            )
        except Exception:  # noqa: BLE001 - e.g. the index's disk is full too
            log.exception(
                "copy into %s: recording the failure failed; it is retried at the next mount",
                dst.id,
            )
