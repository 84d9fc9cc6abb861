"""Time as snapfs counts it: the wall clock (injectable for tests), retention expiry, and
the cloud APIs' time format.

`SNAPFS_CLOCK_FILE=PATH` makes the daemon read "now" (seconds since the epoch, as text) from
that file, re-read on every sweep, and sweep 10 times a second. Tests use it to move time
forward by days without sleeping; nothing else should.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

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
