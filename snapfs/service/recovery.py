"""Recovery at mount after any stop: unfinished snapshots removed or sealed, copy jobs
resumed (and verified after an unclean stop), orphans and garbage collected."""

from __future__ import annotations

import logging

from snapfs.faults import fault_point
from snapfs.model.states import SnapshotStatus
from snapfs.service.copyjobs import CopyJob
from snapfs.service.lifecycle import NO_LINEAGE, is_exact_copy, lineage_of
from snapfs.service.region import Region
from snapfs.service.shared import PULLING
from snapfs.service.storebase import StoreParts

log = logging.getLogger(__name__)


class StoreRecovery(StoreParts):
    """The recovery part of `Store` (service/store.py composes it)."""

    async def recover(self) -> None:
        """Make the store consistent before serving, and queue the copy jobs to resume.

        - snapshots deleted while open, and snapshots still `creating` (their writers are
          gone; an unsealed snapshot never becomes visible as complete), are removed, as
          are `cp` copies that were still being written; a deleted snapshot that an
          unfinished copy job reads from is kept until the job is done;
        - but a snapshot whose last writer had closed it, everything committed and nothing
          written since (the close mark, see SnapshotWriter.flush), is sealed: the daemon
          died between the close that `cp` saw succeed and the release that seals;
        - after an unclean stop, objects no index row names are deleted (never in a
          region attached read-only: the bucket is its owner's);
        - unreferenced blocks are collected.
        """
        rows = {
            region: region.index.snapshots(include_deleted=True) for region in self.regions.values()
        }
        deleted = {
            row["id"] for region_rows in rows.values() for row in region_rows if row["deleted"]
        }
        # A job whose destination was deleted while open is abandoned with it.
        jobs = [
            (region, row)
            for region in self.regions.values()
            for row in region.index.copy_jobs()
            if row["dst_snapshot_id"] not in deleted
        ]
        job_targets = {row["dst_snapshot_id"] for _, row in jobs}
        job_sources = {row["src_snapshot_id"] for _, row in jobs}
        for region, region_rows in rows.items():
            for row in region_rows:
                if row["id"] in job_targets or (row["deleted"] and row["id"] in job_sources):
                    continue
                if row["deleted"]:
                    reason = "was deleted while open"
                elif (
                    row["status"] in (SnapshotStatus.CREATING, SnapshotStatus.COPYING)
                    and row["sealed_at"] is not None
                ):
                    await self._seal_closed(region, row)
                    continue
                elif row["status"] in (SnapshotStatus.CREATING, SnapshotStatus.COPYING):
                    reason = "was still being written"
                else:
                    continue
                log.warning(
                    "region %s: removing snapshot %s (%s): it %s when snapfs stopped",
                    region.name,
                    row["name"],
                    row["id"],
                    reason,
                )
                region.index.delete_snapshot(row["id"])
                if row["deleted"] != PULLING:  # not another host's, half copied in
                    region.link.deleted_here(row["id"])  # a shared region's ledger, once joined
                fault_point("recover_removed")
                snap = self.by_id.pop(row["id"], None)
                if snap is not None and not snap.deleted:
                    del region.snapshots[snap.name]
                    self.by_ino.pop(snap.ino, None)
        for region, row in jobs:
            self._resume_job(region, row)
        for region in self.regions.values():
            if region.publisher is not None:
                # Cheap insurance that the bucket can rebuild the region: a stop may have
                # come between a change and its upload (done in the background).
                region.publisher.republish_all()
            # A read-only region's bucket holds its owner's new objects, never orphans.
            if not self.was_clean and not region.read_only:
                await region.collect_orphans()
            await region.collect_garbage()

    async def _seal_closed(self, region: Region, row: dict) -> None:
        """Seal, at mount, a snapshot that was complete at its last close. A `cp` copy keeps
        its lineage if its block map is its source's, as its seal would have decided."""
        snap = self.by_id[row["id"]]
        source = self.by_id.get(row["source_snapshot_id"] or "")
        exact_copy = await is_exact_copy(snap, source, matched=None)
        lineage = (
            lineage_of(snap)
            if exact_copy or row["status"] == SnapshotStatus.CREATING
            else NO_LINEAGE
        )
        region.index.update_snapshot(
            snap.id, status=SnapshotStatus.AVAILABLE, sealed_at=row["sealed_at"], **lineage
        )
        snap.become(SnapshotStatus.AVAILABLE, sealed_at=row["sealed_at"])
        for name, value in lineage.items():
            setattr(snap, name, value)
        log.warning(
            "region %s: sealed snapshot %s (%s) at mount: it was complete at its last close "
            "when snapfs stopped%s",
            region.name,
            snap.name,
            snap.id,
            f", a copy of {snap.source_snapshot_id}" if snap.source_snapshot_id else "",
        )

    def _resume_job(self, region: Region, row: dict) -> None:
        source = self.by_id.get(row["src_snapshot_id"])
        if source is not None and row["kind"] == "move" and not source.deleted:
            self._hide(source)  # the stop came between the job's commit and hiding the source
        job = CopyJob(
            dst=self.by_id[row["dst_snapshot_id"]],
            src_region=row["src_region"],
            src_snapshot_id=row["src_snapshot_id"],
            kind=row["kind"],
            next_block=row["next_block"],
            done_blocks=row["done_blocks"],
            total_blocks=row["total_blocks"],
            created_at=row["created_at"],
            source=source,
            verify_below=0 if self.was_clean else row["next_block"],
            base_id=row.get("base_snapshot_id"),
            compare=row.get("base_snapshot_id") is None
            and region.index.parent_of(row["dst_snapshot_id"]) is not None,
        )
        if source is not None:
            source.copy_readers += 1
        self.copies.add(job)
