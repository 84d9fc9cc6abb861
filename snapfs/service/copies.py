"""Copies between regions: `mv` (a move job), `snapfs copy` (CopySnapshot), the copy-key
policy, and the end of a job (its source released, or given back on failure)."""

from __future__ import annotations

import logging
import time

from snapfs.errors import (
    AlreadyExists,
    InvalidParameter,
    NotReady,
)
from snapfs.faults import fault_point
from snapfs.meta.index import MAX_CHAIN_DEPTH
from snapfs.meta.keys import KeyNotFound
from snapfs.model.names import check_snapshot_filename, new_snapshot_id
from snapfs.model.states import SnapshotStatus
from snapfs.service.copyjobs import CopyJob
from snapfs.service.region import RENAME_EXCHANGE, RENAME_NOREPLACE, Region
from snapfs.service.snapshots import Snapshot
from snapfs.service.storebase import StoreParts

log = logging.getLogger(__name__)


SAMPLE_BLOCKS = 256  # block numbers compared to tell whether two maps are of one disk


def _mostly_alike(source: Snapshot, candidate: Snapshot) -> bool:
    """Whether most of `candidate`'s map is `source`'s, judged on SAMPLE_BLOCKS block
    numbers spread over the disk (a few index lookups): only then does a copy relative to
    it pay; relative to another disk its map would hold every row and tombstones too."""
    blocks = -(-max(source.size, candidate.size) // source.region.block_size)
    step = max(1, blocks // SAMPLE_BLOCKS)
    sample = range(0, blocks, step)
    mine = source.region.index.resolve(source.id, sample)
    theirs = candidate.region.index.resolve(candidate.id, sample)
    used = [n for n in sample if mine[n] is not None or theirs[n] is not None]
    alike = sum(1 for n in used if mine[n] == theirs[n])
    return alike * 2 > len(used)


def _same_content(copy: Snapshot, original: Snapshot) -> bool:
    """By lineage: `copy` is `original` (same region), one is the other's copy, or both
    are copies of one snapshot. Copies are exact (a copy keeps its lineage only then)."""
    if copy is original:
        return True
    return (
        copy.source_snapshot_id == original.id
        or original.source_snapshot_id == copy.id
        or (
            copy.source_snapshot_id is not None
            and copy.source_snapshot_id == original.source_snapshot_id
        )
    )


class SnapshotCopies(StoreParts):
    """The copy part of `Store` (service/store.py composes it)."""

    # --- copies ----------------------------------------------------------------------------

    async def move_snapshot(
        self, src_region: Region, name: str, dst_region: Region, new_name: str, flags: int
    ) -> Snapshot:
        """`mv` across regions: the destination appears at once as `copying`, the source
        name disappears at once, a job transfers the missing blocks in the background."""
        src_region.check_writable(f"moving {name} out of it")
        dst_region.check_writable(f"moving {name} into it")
        if flags & RENAME_EXCHANGE:
            raise InvalidParameter("snapshots in different regions cannot be exchanged")
        source = await self._sealed_source(src_region, name)
        displaced = dst_region.snapshots.get(new_name)
        if displaced is not None and flags & RENAME_NOREPLACE:
            raise AlreadyExists(f"snapshot {new_name!r} already exists in region {dst_region.name}")
        dst = await self._start_copy(
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
        self.names.forget_entry(dst_region.ino, new_name)
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
        dst_region.check_writable(f"copying {name} into it")
        source = await self._sealed_source(src_region, name)
        return await self._start_copy(
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

    async def _start_copy(
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
        # The destination starts relative to a snapshot it already holds when one fits:
        # the copy of one of the source's ancestors (the job then walks only the rows
        # between the two), else a snapshot of the same disk found by lineage (the job
        # compares the two maps and brings what differs). See _copy_base.
        ancestor, parent = self._copy_base(source, dst_region, dst.kms_key_id)
        total = source.allocated_blocks
        if ancestor is not None:
            changed = source.region.index.changed_count(source.id, ancestor.id)
            assert changed is not None  # on the chain: _copy_base found it there
            total = changed
        elif parent is not None:
            total = -(-max(source.size, parent.size) // dst_region.block_size)
        job = CopyJob(
            dst=dst,
            src_region=source.region.name,
            src_snapshot_id=source.id,
            kind=kind,
            next_block=0,
            done_blocks=0,
            total_blocks=total,
            created_at=time.time(),
            source=source,
            base_id=ancestor.id if ancestor is not None else None,
            compare=ancestor is None and parent is not None,
        )
        if parent is not None:
            dst.allocated_blocks = parent.allocated_blocks
        # A shared region's ledger first: the name is the region's (with a parent, the
        # ledger's map starts as the parent's, copied in the server).
        await dst_region.link.reserve(
            dst.to_row(), tags, replace.id if replace else None,
            parent.id if parent is not None else None,
        )  # fmt: skip
        if dst_region.snapshots.get(name) is not replace:  # taken meanwhile (never, unshared)
            raise AlreadyExists(f"snapshot {name!r} already exists in region {dst_region.name}")
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
                "base_snapshot_id": job.base_id,
            },
            parent_id=parent.id if parent is not None else None,
        )
        if parent is not None:
            fault_point("copy_chained")
        if replace is not None:
            del dst_region.snapshots[name]
        self._add(dst)
        source.copy_readers += 1
        self.copies.add(job)
        log.info(
            "region %s: %s of %s/%s (%s) started as %s (%s)%s%s",
            dst_region.name,
            kind,
            source.region.name,
            source.name,
            source.id,
            name,
            dst.id,
            ""
            if parent is None
            else f", relative to {parent.name} ({parent.id}), a copy of its ancestor "
            f"{ancestor.id}: {total} blocks to walk"
            if ancestor is not None
            else f", relative to {parent.name} ({parent.id}): {total} blocks to compare",
            ""
            if job.dst.copy_job is None
            or self.copies.running(dst_region) <= dst_region.max_parallel_copies
            else ", queued",
        )
        return dst

    def _copy_base(
        self, source: Snapshot, dst_region: Region, key: str | None
    ) -> tuple[Snapshot | None, Snapshot | None]:
        """(ancestor, parent): what an incremental copy's destination starts relative to.

        First the source itself or the nearest snapshot on its chain of parents of which
        the destination holds an available copy under the destination's key (by lineage,
        with sizes and block counts agreeing): (that ancestor, its copy); the job walks
        only the rows between source and ancestor, so it costs what changed.

        Else, when the destination's ids are the source's (the same key, or both plain), a
        snapshot of the same disk there: an available one under that key whose lineage
        leads to the source's region, the largest in size and then the newest, preferred,
        any other of that key after: (None, it). The job then compares the two maps (in
        memory, a few microseconds a block) and brings only the rows that differ: what
        `mv day1; mv day2` needs, where day 1's departure left day 2 a full map."""
        fits = [
            s
            for s in dst_region.snapshots.values()
            if s.status == SnapshotStatus.AVAILABLE
            and s.sealed
            and not s.deleted
            and s.kms_key_id == key
            and dst_region.index.depth(s.id) < MAX_CHAIN_DEPTH
        ]
        index = source.region.index
        for ancestor_id in (source.id, *index.ancestors(source.id)):
            ancestor = self.by_id.get(ancestor_id)
            if ancestor is None or ancestor.status != SnapshotStatus.AVAILABLE:
                continue
            for candidate in fits:
                if (
                    candidate.size == ancestor.size
                    and candidate.allocated_blocks == ancestor.allocated_blocks
                    and _same_content(candidate, ancestor)
                ):
                    return ancestor, candidate
        if source.kms_key_id != key or not fits:
            return None, None
        same_disk = max(
            fits,
            key=lambda s: (
                s.source_region == source.region.name,
                s.size == source.size,
                s.sealed_at or 0.0,
            ),
        )
        return (None, same_disk) if _mostly_alike(source, same_disk) else (None, None)

    def copy_finished(self, job: CopyJob, *, succeeded: bool) -> None:
        """Called by the engine when a job has succeeded or failed: release its source.

        A failed `mv` has given the source back its name already (`give_back_source`): a
        move must never lose the data.
        """
        source, job.source = job.source, None
        if source is None:
            return
        if not succeeded and job.kind == "move" and source.deleted:
            self._unhide(source)  # not given back before (a job that failed at a mount)
        self._end_copy_read(source)

    def give_back_source(self, job: CopyJob) -> None:
        """A move is failing: its source gets its name back, committed before the engine
        commits the job's failure (CopyEngine._fail says why the order matters)."""
        source = job.source
        if source is not None and source.deleted:
            self._unhide(source)

    def _unhide(self, snap: Snapshot) -> None:
        region = snap.region
        name = snap.name
        if name in region.snapshots:
            name = f"{name}.restored-{snap.id}"
        # The index first, memory after, like every metadata change.
        region.index.update_snapshot(snap.id, deleted=0, name=name)
        alias_of = self.by_ino.get(snap.ino)
        if alias_of is not None and alias_of is not snap:
            assert isinstance(alias_of, Snapshot)  # a snapshot's inode, the move's destination
            alias_of.inode_aliases.remove(snap.ino)
            self.names.forget_entry(alias_of.region.ino, alias_of.name)
        snap.name, snap.deleted = name, False
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
            self._end_copy_read(source)
