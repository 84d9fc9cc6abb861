"""The snapshot lifecycle (model/states.py): creating, writing, the settle period and the
seal, failure, `cp`-copy recognition and lineage by content, size and attribute changes.

Why one module of ~520 lines: creation, the settle period, the seal, failure and `cp`-copy
recognition are one state machine's transitions (model/states.py) with the ordering rules
between them (a seal re-checks what a reopen or a truncate may have changed meanwhile);
they read best together."""

from __future__ import annotations

import contextlib
import logging
import stat
import time
from dataclasses import dataclass

import trio

from snapfs.errors import (
    InvalidParameter,
    NotFound,
    NotReady,
    Sealed,
    SnapfsError,
    SnapshotFailed,
    as_snapfs_error,
)
from snapfs.faults import fault_point
from snapfs.model.names import new_snapshot_id
from snapfs.model.states import SnapshotStatus
from snapfs.service import chains
from snapfs.service.region import Region
from snapfs.service.snapshots import Snapshot, SnapshotWriter
from snapfs.service.storebase import StoreParts
from snapfs.stalls import BatchSizer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class OpenFile:
    snap: Snapshot
    writable: bool
    pid: int = 0


def _empty_writer(snap: Snapshot) -> SnapshotWriter:
    """The writer of a new, empty snapshot (the only kind a clone may become)."""
    writer = snap.writer
    if (
        snap.status != SnapshotStatus.CREATING
        or writer is None
        or snap.size != 0
        or snap.allocated_blocks
        or not writer.is_flushed()
        or writer.map_version
    ):
        raise InvalidParameter(
            f"snapshot {snap.name} ({snap.id}) is not a new, empty snapshot: only one "
            "can become a clone"
        )
    return writer


class SnapshotLifecycle(StoreParts):
    """The lifecycle part of `Store` (service/store.py composes it)."""

    # --- snapshot lifecycle ----------------------------------------------------------------

    async def create_snapshot(
        self, region: Region, name: str, mode: int, uid: int, gid: int, pid: int = 0
    ) -> Snapshot:
        """A new `creating` snapshot. If the creating process has a snapshot open for
        reading that nobody writes (`cp SRC DST`), that one is sealed now if it was settling
        and the new one is provisionally a copy of it (`copying`); the written blocks must
        then match the source's, or it becomes an ordinary snapshot."""
        region.check_writable(f"creating {name}")
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
        try:
            # A shared region's ledger first: the name is the region's, not this host's.
            await region.link.reserve(snap.to_row())
            region.check_new_name(name)  # the ledger's answer yielded (never, unshared)
        except BaseException:
            if source is not None:
                source.copy_readers -= 1
            raise
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
            snap.region.check_writable(f"opening {snap.name} for writing")
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
                    assert other.writer is not None  # _writing() keeps only those with one
                    other.writer.read_meanwhile.add(snap)
        return handle

    def _writing(self) -> list[Snapshot]:
        """Snapshots with a writer (open, or settling); forgets those sealed or gone."""
        self._writers = {snap for snap in self._writers if snap.writer is not None}
        return list(self._writers)

    async def flush(self, handle: OpenFile, *, closing: bool = False) -> None:
        """fsync, or (`closing`) the close of a file descriptor. In a shared region the
        close mark is in the ledger before the close returns: if this host dies then, the
        other hosts seal the snapshot rather than remove it."""
        snap = handle.snap
        if handle.writable and snap.writer is not None:
            await snap.writer.flush(closing=closing)
            await snap.region.link.pushed(snap.id)

    async def release(self, handle: OpenFile) -> None:
        snap = handle.snap
        snap.open_handles -= 1
        if not snap.open_handles:
            snap.closed_by_all()
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

    async def clone_from(self, snap: Snapshot, parent_name: str) -> None:
        """`snapfs clone` (`user.snapfs.parent` on a new, empty snapshot): `snap` takes the
        content of `parent_name`, a sealed snapshot of the same region, and stays `creating`:
        writes change only what they touch, and it seals by the usual rule.

        Within its region only: a clone shares its parent's blocks, and another region has
        other blocks (and keys); a copy (mv, cp, snapfs copy) brings a snapshot there first.
        Its map is relative to the parent's (meta/index.py, schema 5): it costs no rows until
        written, then the rows it changes (a full copy of the map only where the chain
        would grow past MAX_CHAIN_DEPTH)."""
        snap.region.check_writable(f"cloning into {snap.name}")
        parent = snap.region.snapshots.get(parent_name.strip())
        if parent is None or parent is snap:
            where = "/" in parent_name and " (a clone stays in its parent's region)" or ""
            raise NotFound(
                f"no snapshot {parent_name!r} in region {snap.region.name} to clone{where}"
            )
        # A parent still in its settle period is sealed now, as a copy out of it would be:
        # `cp img a && snapfs clone a b` must not wait for the period to pass.
        await self.seal_settling(parent, quiet=True)
        if parent.status != SnapshotStatus.AVAILABLE:
            raise NotReady(
                f"snapshot {parent.name} ({parent.id}) is {parent.status}: only an available "
                "snapshot can be cloned"
            )
        writer = _empty_writer(snap)
        if parent.encrypted:
            self.keys.usable(parent.kms_key_id or "", snap.region.name)  # disabled: refused
        fields = {
            "size": parent.size,
            "encrypted": parent.encrypted,
            "kms_key_id": parent.kms_key_id,
            "mtime_ns": parent.mtime_ns,
        }
        # A shared region's ledger copies the parent's map first (in the server). Its await
        # lets writes in (never, unshared): the snapshot must still be new and empty after.
        await snap.region.link.clone(snap, parent, fields)
        try:
            writer = _empty_writer(snap)
        except InvalidParameter:
            await snap.region.link.trim(snap, 0)
            raise
        snap.region.index.clone_map(snap.id, parent.id, fields)
        fault_point("clone_mapped")
        snap.size, snap.mtime_ns = parent.size, parent.mtime_ns
        snap.encrypted, snap.kms_key_id = parent.encrypted, parent.kms_key_id
        snap.allocated_blocks = snap.region.index.allocated_blocks(snap.id)
        writer.cloned_from(parent)
        log.info(
            "region %s: snapshot %s (%s) is a clone of %s (%s), %d bytes",
            snap.region.name, snap.name, snap.id, parent.name, parent.id, parent.size,
        )  # fmt: skip

    async def seal(self, snap: Snapshot) -> None:
        """`snapfs seal PATH`: seal a `creating` snapshot now."""
        if snap.writer is not None and snap.writer.handles > 0:
            raise NotReady(f"snapshot {snap.name} ({snap.id}) is open for writing; close it first")
        await self.seal_settling(snap)
        if snap.writer is not None and not snap.deleted:
            raise NotReady(f"snapshot {snap.name} ({snap.id}) could not be sealed yet; see the log")
        if snap.status == SnapshotStatus.FAILED:
            raise SnapshotFailed(
                f"snapshot {snap.name} ({snap.id}) could not be sealed: {snap.error}",
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
            map_version = writer.map_version
            found = await self._lineage_by_content(snap, writer) if not snap.copy_source else None
            exact_copy = await self._is_exact_copy(snap)
            fault_point("seal")
            # Every await is behind us: from this check to the commit nothing can change it.
            if not writer.idle(writer.generation) or snap.writer is not writer or snap.deleted:
                return  # written, truncated or deleted meanwhile: its next close settles it
            if not writer.is_flushed() or writer.map_version != map_version:
                return  # ditto (a truncate by path came in between)
            # The index first: memory changes only once the seal is durable.
            if found is not None:
                lineage = found
            elif exact_copy or snap.copy_source is None:
                lineage = lineage_of(snap)
            else:
                lineage = NO_LINEAGE
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
        reference = writer.reference()
        if self.nursery is not None and chains.worth_trying(snap, reference):
            assert reference is not None
            self.nursery.start_soon(
                chains.rebase_quietly, snap.region, snap, reference, name=f"rebase {snap.id}"
            )
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
            if source.allocated_blocks != snap.allocated_blocks:
                continue
            source_version = settling.map_version if settling is not None else None
            if not await maps_equal(source, snap):
                continue
            if (
                source.writer is not settling
                or source.deleted
                or (
                    settling is not None
                    and (settling.handles or settling.map_version != source_version)
                )
            ):
                continue  # the candidate changed while it was compared
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

    async def _is_exact_copy(self, snap: Snapshot) -> bool:
        return await is_exact_copy(snap, snap.copy_source, len(snap.copy_matched))

    def _end_cp_copy(self, snap: Snapshot, *, keep_lineage: bool) -> None:
        """A `cp` copy is over: keep its lineage if it matched, release the source."""
        source = snap.copy_source
        if source is None:
            return
        snap.copy_source = None
        if not keep_lineage:
            snap.source_snapshot_id = snap.source_region = snap.description = None
            snap.transferred_bytes = 0
        self._end_copy_read(source)

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

    def _end_copy_read(self, source: Snapshot) -> None:
        source.copy_readers -= 1
        if source.deleted and not source.in_use:
            self._drop(source)

    async def set_size(self, snap: Snapshot, size: int) -> None:
        snap.region.check_writable(f"truncating {snap.name}")
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
        """Metadata changes, allowed in every state (tar and rsync set them after writing),
        but not in a read-only region."""
        snap.region.check_writable(f"changing the attributes of {snap.name}")
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


NO_LINEAGE: dict[str, object] = {
    "source_snapshot_id": None,
    "source_region": None,
    "description": None,
    "transferred_bytes": 0,
}


def lineage_of(snap: Snapshot) -> dict[str, object]:
    return {
        "source_snapshot_id": snap.source_snapshot_id,
        "source_region": snap.source_region,
        "description": snap.description,
        "transferred_bytes": snap.transferred_bytes,
    }


async def is_exact_copy(snap: Snapshot, source: Snapshot | None, matched: int | None) -> bool:
    """The one rule for a `cp` copy keeping its lineage (at its seal, and at a mount that
    seals it): it is `copying`, its source is sealed and as large, and it holds exactly the
    source's content: with the same keys, the same block map; with different keys (the
    same content has different ids), every source block matched by content (`matched`, known
    only while the copy ran: None after a restart) and nothing else written."""
    if (
        source is None
        or snap.status != SnapshotStatus.COPYING
        or source.status != SnapshotStatus.AVAILABLE
        or source.size != snap.size
    ):
        return False
    if source.kms_key_id == snap.kms_key_id:
        return await maps_equal(source, snap)
    if matched is None:
        return False
    return matched == source.allocated_blocks == snap.region.index.allocated_blocks(snap.id)


async def maps_equal(a: Snapshot, b: Snapshot) -> bool:
    """Two snapshots, possibly in different regions, map every block to the same id.

    A disk of a million blocks takes about a second to compare, so the comparison runs in
    chunks sized by the loop budget and lets other requests in between. The caller checks,
    after it, that neither map changed meanwhile (`SnapshotWriter.map_version`)."""
    sizer = BatchSizer(4096, minimum=256)
    next_block = 0
    while True:
        chunk = sizer.start()
        rows_a = a.region.index.block_map_from(a.id, next_block, chunk)
        rows_b = b.region.index.block_map_from(b.id, next_block, chunk)
        sizer.done()
        if rows_a != rows_b:
            return False
        if not rows_a:
            return True
        next_block = rows_a[-1][0] + 1
        await trio.sleep(0)
