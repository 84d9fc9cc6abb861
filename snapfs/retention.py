"""Retention: snapshots whose `retention_days` have run out are released automatically.

A snapshot's expiry is its creation time plus `retention_days` days (the CopySnapshot rule:
the copy is released when its retention period ends). The daemon sweeps every region on
start (so a snapshot that expired while unmounted goes at the next mount) and then every
`interval` seconds of its clock; releasing is an ordinary `rm`, so a snapshot that a running
copy reads from keeps its data until that copy is done. A snapshot that is still `creating`
or `copying` is released once it has finished.

The wall clock is injectable: `SNAPFS_CLOCK_FILE=PATH` makes the daemon read "now" (seconds
since the epoch, as text) from that file, re-read on every sweep, and sweep 10 times a second.
Tests use it to move time forward by days without sleeping; nothing else should.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .faults import fault_point
from .snapshots import AVAILABLE, FAILED

if TYPE_CHECKING:
    from .snapshots import Snapshot
    from .store import Store

log = logging.getLogger(__name__)

CLOCK_FILE_ENV = "SNAPFS_CLOCK_FILE"
DAY = 86400.0
SWEEP_EVERY = 60.0  # seconds; retention is counted in days, a minute late is on time


@dataclass(frozen=True)
class Clock:
    """Wall-clock time for retention; reads an injected time from `file` when one is set."""

    file: Path | None = None

    @classmethod
    def from_environment(cls) -> Clock:
        path = os.environ.get(CLOCK_FILE_ENV)
        return cls(Path(path) if path else None)

    def now(self) -> float:
        if self.file is None:
            return time.time()
        try:
            return float(self.file.read_text().strip())
        except (OSError, ValueError):
            log.warning("clock file %s is unreadable; using the system clock", self.file)
            return time.time()

    @property
    def interval(self) -> float:
        return SWEEP_EVERY if self.file is None else 0.1


def expires_at(created_at: float, retention_days: int | None) -> float | None:
    """When a snapshot created at `created_at` (epoch seconds) is released, or None."""
    return None if retention_days is None else created_at + retention_days * DAY


def iso8601(epoch: float) -> str:
    """UTC, to the second, like the cloud APIs' time fields: 2026-11-23T14:01:57Z."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def expired(snap: Snapshot, now: float) -> bool:
    due = expires_at(snap.created_at, snap.retention_days)
    return due is not None and due <= now and snap.status in (AVAILABLE, FAILED)


async def release_expired(store: Store, now: float) -> int:
    """Release every snapshot whose retention has run out; returns how many."""
    released = 0
    for region in list(store.regions.values()):
        for snap in [s for s in region.snapshots.values() if expired(s, now)]:
            if region.snapshots.get(snap.name) is not snap:
                continue  # renamed or deleted while an earlier release awaited
            log.info(
                "region %s: releasing snapshot %s (%s): its retention of %d days ended at %s",
                region.name,
                snap.name,
                snap.id,
                snap.retention_days,
                iso8601(snap.created_at + snap.retention_days * DAY),
            )
            await store.unlink(region, snap.name)
            store.forget_entry(region.ino, snap.name)
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
