"""Deleting and renaming snapshots: hidden at once (one small commit), their maps purged
and blocks collected in the background.

Deletion has stages, one verb each, in the order a snapshot goes through them:

- `unlink` (rm, retention, a replacing rename): the user's request; a snapshot still in use
  is only hidden, one nothing uses is destroyed at once;
- `_hide`: out of the namespace (`deleted = 1` committed), data kept while a handle is open
  or a copy reads it; its last close or the copy's end destroys it;
- `_destroy`: a writer's buffered blocks discarded, a `cp` copy's source read ended, then
- `_drop`: gone from every inode and id table, and its map handed to
- `_purge`: the block map deleted in time-budgeted batches, then the row; the blocks nobody
  else names are then collected by the region's garbage collector.

And `_end_copy_read` (lifecycle.py) ends a copy's read of its source, the one other thing
that can keep a hidden snapshot's data.
"""

from __future__ import annotations

import logging

import trio

from snapfs.errors import AlreadyExists, NotFound
from snapfs.faults import fault_point
from snapfs.model.names import check_snapshot_filename
from snapfs.service.region import RENAME_EXCHANGE, RENAME_NOREPLACE, Region
from snapfs.service.snapshots import Snapshot
from snapfs.service.storebase import StoreParts
from snapfs.stalls import BatchSizer

log = logging.getLogger(__name__)

PURGE_CHUNK = 512  # first batch of block-map rows deleted when a snapshot goes


class SnapshotRemoval(StoreParts):
    """The deletion and rename part of `Store` (service/store.py composes it)."""

    # --- deleting and renaming -------------------------------------------------------------

    def _hide(self, snap: Snapshot) -> None:
        """Take a snapshot out of its region's namespace; its data stays while in use."""
        snap.region.index.update_snapshot(snap.id, deleted=1)  # first: it may fail (disk full)
        if snap.region.snapshots.get(snap.name) is snap:
            del snap.region.snapshots[snap.name]
        snap.deleted = True
        if not snap.open_handles and self.by_ino.get(snap.ino) is snap:
            del self.by_ino[snap.ino]

    async def unlink(self, region: Region, name: str) -> None:
        region.check_writable(f"deleting {name}")
        snap = region.lookup(name)
        await self._cancel_copy(snap, "deletion")  # deleting a copy's destination cancels it
        await self._remove(snap)
        # A shared region's other hosts see it gone once `rm` returns (its delete is pushed
        # right after the local commit; nothing to wait for, unshared).
        await region.link.pushed(snap.id)

    async def vanished(self, snap: Snapshot) -> None:
        """A snapshot of a read-only region that its bucket no longer describes (deleted by
        the bucket's owner; refresh.py): out of the namespace like `rm`. One open for
        reading, or read by a copy out of the region, is only hidden and reads on until
        closed (its map stays in the local index, its packs are the owner's to keep for
        their grace period)."""
        name = snap.name
        await self._remove(snap)
        self.names.forget_entry(snap.region.ino, name)

    async def _remove(self, snap: Snapshot) -> None:
        region, name = snap.region, snap.name
        if snap.in_use:
            self._hide(snap)
        else:
            await self._destroy(snap)  # the index first: a failed delete leaves the name
            del region.snapshots[name]
            snap.deleted = True

    async def _destroy(self, snap: Snapshot) -> None:
        if snap.writer is not None:
            await snap.writer.discard()
            snap.writer = None
        self._end_cp_copy(snap, keep_lineage=False)
        self._drop(snap)

    def _drop(self, snap: Snapshot) -> None:
        """Delete a snapshot that nothing uses any more; its unshared blocks are collected.

        It is marked deleted at once (one small commit); its block map then goes a chunk at
        a time in a background task, so deleting a multi-terabyte snapshot (millions of map
        rows) does not stall requests. A crash meanwhile leaves it marked deleted, and the
        next mount's recovery finishes the job.
        """
        if not snap.deleted:
            snap.region.index.update_snapshot(snap.id, deleted=1)
            snap.deleted = True
        for ino in (snap.ino, *snap.inode_aliases):
            if self.by_ino.get(ino) is snap:
                del self.by_ino[ino]
        self.by_id.pop(snap.id, None)
        if self.nursery is None:
            snap.region.index.delete_snapshot(snap.id)
            snap.region.request_gc()
        else:
            self.frees.begin()  # a writer on a full disk waits for what this frees
            self.nursery.start_soon(self._purge, snap, name=f"purge {snap.id}")

    async def _purge(self, snap: Snapshot) -> None:
        index = snap.region.index
        sizer = BatchSizer(PURGE_CHUNK)  # rows per transaction, sized by LOOP_BUDGET
        try:
            async with snap.region.chain_lock:
                # Snapshots whose maps are relative to this one get its rows first
                # (meta/index.py, fold_step); the last one may take its map over whole.
                while True:
                    size = sizer.start()
                    more = index.fold_step(snap.id, size)
                    sizer.done()
                    if not more:
                        break
                    fault_point("fold_step")
                    await trio.sleep(0)
                while index.snapshot_row(snap.id) is not None:
                    size = sizer.start()
                    deleted = index.delete_map_chunk(snap.id, size)
                    sizer.done()
                    if deleted < size:
                        index.delete_snapshot(snap.id)
                        break
                    fault_point("purge_chunk")
                    snap.region.request_gc()
                    await trio.sleep(0)  # let requests in between chunks
        except Exception:  # noqa: BLE001 - left marked deleted; the next mount finishes it
            log.exception("region %s: deleting snapshot %s failed", snap.region.name, snap.id)
            return
        finally:
            snap.region.request_gc()  # before `end`: the frees stay pending until collected
            self.frees.end()
        log.info("region %s: deleted snapshot %s (%s)", snap.region.name, snap.name, snap.id)

    async def rename(
        self, old_region: Region, old: str, new_region: Region, new: str, flags: int
    ) -> None:
        old_region.check_writable(f"renaming {old}")
        new_region.check_writable(f"renaming into it ({new})")
        if old_region is not new_region:
            await self.move_snapshot(old_region, old, new_region, new, flags)
            return
        await self._rename_in_ledger(old_region, old, new, flags)
        displaced = old_region.rename(old, new, flags)
        if displaced is not None:
            await self._displaced(displaced)

    def renamed_elsewhere(self, snap: Snapshot, name: str) -> bool:
        """A rename made by another store (a shared region's other host, a read-only
        region's owner), applied here: False while `name` is still another snapshot's here
        (a swap of names is half way; the caller tries again later)."""
        region = snap.region
        if name == snap.name:
            return True
        if name in region.snapshots:
            return False
        old = snap.name
        region.rename(old, name, RENAME_NOREPLACE)
        self.names.forget_entry(region.ino, old)
        self.names.forget_entry(region.ino, name)
        return True

    async def _rename_in_ledger(self, region: Region, old: str, new: str, flags: int) -> None:
        """A shared region's ledger renames first (another host may have the new name);
        the local rename after it then refuses nothing the ledger accepted, since names
        here come from the ledger. Nothing, unshared."""
        if not region.link.shared:
            return
        snap = region.lookup(old)
        target = region.snapshots.get(new)
        if target is snap:
            return
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise NotFound(f"snapshot {new!r} does not exist in region {region.name}")
            await region.link.exchange(snap, target)
            return
        if target is not None and flags & RENAME_NOREPLACE:
            raise AlreadyExists(f"snapshot {new!r} already exists in region {region.name}")
        check_snapshot_filename(new)
        await region.link.rename(snap, new, target.id if target is not None else None)

    async def _displaced(self, snap: Snapshot) -> None:
        """A snapshot replaced by a rename: gone from the namespace, deleted when unused."""
        await self._cancel_copy(snap, "replacement by a rename")
        if not snap.in_use:
            await self._destroy(snap)
