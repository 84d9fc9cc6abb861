"""Chains of maps (issue 17): a snapshot written whole made relative to the one it follows.

A clone (`snapfs clone`) and a copy whose destination holds the source's ancestor start
relative to a parent (meta/index.py, schema 5). A snapshot written whole, by `cp` or rsync,
holds a full map at its seal; `rebase` then makes it relative to the snapshot it was
written after (the writer's reference: one read while it was written, else the region's
newest sealed one under the same key) when that pays, that is when fewer than half of its
rows differ from the reference's, so a chain of daily `cp` backups costs the index what
changed each day, as one of clones does.

The rebase is three kinds of step, each one transaction that changes no snapshot's
content, so a stop anywhere leaves only unfinished work, never a wrong block:
  1. tombstones where the reference has a block and the snapshot a hole (a full map reads
     them as the holes they are);
  2. the parent set (refused if the reference is gone, unsealed or too deep, or the
     snapshot has a parent or children by then);
  3. the snapshot's rows that say what the parent says dropped.
It holds the region's chain lock, as a fold on delete does (removal.py): one structural
change of a region's chains at a time. The comparison of step 0 reads the two maps in
spans of REBASE_SPAN blocks and lets requests in between.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from snapfs.faults import fault_point
from snapfs.meta.index import MAX_CHAIN_DEPTH
from snapfs.model.states import SnapshotStatus

if TYPE_CHECKING:
    from snapfs.service.region import Region
    from snapfs.service.snapshots import Snapshot

log = logging.getLogger(__name__)

REBASE_SPAN = 4096  # block numbers a step reads and changes


def _spans(last_block: int) -> range:
    return range(0, last_block + 1, REBASE_SPAN)


def worth_trying(snap: Snapshot, reference: Snapshot | None) -> bool:
    return (
        reference is not None
        and reference is not snap
        and reference.region is snap.region
        and reference.kms_key_id == snap.kms_key_id
        and reference.status == SnapshotStatus.AVAILABLE
        and not reference.deleted
    )


async def rebase(region: Region, snap: Snapshot, reference: Snapshot) -> bool:
    """Make `snap` (sealed, a full map) relative to `reference` if that pays; True if done."""
    index = region.index
    async with region.chain_lock:
        if (
            snap.deleted
            or reference.deleted
            or index.parent_of(snap.id) is not None
            or index.depth(reference.id) + 1 > MAX_CHAIN_DEPTH
        ):
            return False
        last = max(snap.size, reference.size) // region.block_size
        differ = 0
        for first in _spans(last):
            mine = index.block_map(snap.id, first, first + REBASE_SPAN - 1)
            theirs = index.block_map(reference.id, first, first + REBASE_SPAN - 1)
            differ += sum(1 for n in mine.keys() | theirs.keys() if mine.get(n) != theirs.get(n))
            await trio.sleep(0)
            if snap.deleted or reference.deleted:
                return False
        own_rows = index.own_row_count(snap.id)
        if differ * 2 >= max(own_rows, 1):
            log.debug("snapshot %s: %d of %d rows differ from %s; kept whole",
                      snap.id, differ, own_rows, reference.id)  # fmt: skip
            return False
        for first in _spans(last):
            index.put_tombstones(snap.id, reference.id, first, first + REBASE_SPAN - 1)
            fault_point("rebase_step")
            await trio.sleep(0)
        if snap.deleted or not index.set_parent(snap.id, reference.id):
            log.info("snapshot %s: not made relative to %s (it changed meanwhile)",
                     snap.id, reference.id)  # fmt: skip
            return False
        for first in _spans(last):
            index.drop_redundant(snap.id, first, first + REBASE_SPAN - 1)
            fault_point("rebase_step")
            await trio.sleep(0)
    log.info(
        "region %s: snapshot %s (%s) is now relative to %s (%s): %d rows of its own, %d before",
        region.name, snap.name, snap.id, reference.name, reference.id,
        index.own_row_count(snap.id), own_rows,
    )  # fmt: skip
    return True


async def rebase_quietly(region: Region, snap: Snapshot, reference: Snapshot) -> None:
    """`rebase` as a background task: a failure only leaves the map whole."""
    try:
        await rebase(region, snap, reference)
    except Exception:  # noqa: BLE001 - an optimisation: the snapshot is sealed and right
        log.exception("snapshot %s: making it relative to %s failed", snap.id, reference.id)
