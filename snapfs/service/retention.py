"""Retention: snapshots whose `retention_days` have run out are released automatically.

A snapshot's expiry is its creation time plus `retention_days` days (the CopySnapshot rule:
the copy is released when its retention period ends). The daemon sweeps every region on
start (so a snapshot that expired while unmounted goes at the next mount) and then every
`interval` seconds of its clock; releasing is an ordinary `rm`, so a snapshot that a running
copy reads from keeps its data until that copy is done. A snapshot that is still `creating`
or `copying` is released once it has finished.

The wall clock is injectable (`SNAPFS_CLOCK_FILE`, see snapfs/model/clock.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from snapfs.faults import fault_point
from snapfs.model.clock import DAY, Clock, expires_at, iso8601
from snapfs.model.states import SnapshotStatus

if TYPE_CHECKING:
    from snapfs.service.snapshots import Snapshot
    from snapfs.service.store import Store

log = logging.getLogger(__name__)


def expired(snap: Snapshot, now: float) -> bool:
    due = expires_at(snap.created_at, snap.retention_days)
    return (
        due is not None
        and due <= now
        and snap.status in (SnapshotStatus.AVAILABLE, SnapshotStatus.FAILED)
    )


async def release_expired(store: Store, now: float) -> int:
    """Release every snapshot whose retention has run out; returns how many."""
    released = 0
    for region in list(store.regions.values()):
        if region.read_only:
            continue  # its owner releases them; the refresh then removes them here
        for snap in [s for s in region.snapshots.values() if expired(s, now)]:
            if region.snapshots.get(snap.name) is not snap:
                continue  # renamed or deleted while an earlier release awaited
            assert snap.retention_days is not None  # expired(); a retention is never unset
            log.info(
                "region %s: releasing snapshot %s (%s): its retention of %d days ended at %s",
                region.name,
                snap.name,
                snap.id,
                snap.retention_days,
                iso8601(snap.created_at + snap.retention_days * DAY),
            )
            await store.unlink(region, snap.name)
            store.names.forget_entry(region.ino, snap.name)
            released += 1
            fault_point("retention_released")
    return released


async def retention_loop(store: Store, clock: Clock) -> None:
    """Runs for the life of the mount: sweeps at once, then every `clock.interval`."""
    while True:
        try:
            await release_expired(store, clock.now())
        except Exception:
            log.exception("retention sweep failed; will retry")
        await trio.sleep(clock.interval)
