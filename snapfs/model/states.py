"""The snapshot state machine (SPEC "Snapshot lifecycle"): the statuses and the changes
between them. Every status in the code is a `SnapshotStatus`; no other module spells one.

    creating --seal--> available          the last writer closed and the settle period passed
    creating --cp of a snapshot--> copying    its first block matched a sealed snapshot's
    copying --diverged--> creating         a later block did not: an ordinary snapshot after all
    copying --job or cp done--> available
    creating | copying --error--> failed   a write or a copy failed, or the copy was cancelled

`available` and `failed` are final: a snapshot leaves them only by being deleted, which is
not a status (the row is marked deleted, then purged).
"""

from __future__ import annotations

import enum

from snapfs.errors import InvalidTransition


class SnapshotStatus(enum.StrEnum):
    CREATING = "creating"
    COPYING = "copying"
    AVAILABLE = "available"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return not TRANSITIONS[self]


TRANSITIONS: dict[SnapshotStatus, frozenset[SnapshotStatus]] = {
    SnapshotStatus.CREATING: frozenset(
        {SnapshotStatus.AVAILABLE, SnapshotStatus.COPYING, SnapshotStatus.FAILED}
    ),
    SnapshotStatus.COPYING: frozenset(
        {SnapshotStatus.AVAILABLE, SnapshotStatus.CREATING, SnapshotStatus.FAILED}
    ),
    SnapshotStatus.AVAILABLE: frozenset(),
    SnapshotStatus.FAILED: frozenset(),
}


def checked_transition(old: SnapshotStatus | str, new: SnapshotStatus) -> SnapshotStatus:
    """`new`, if the lifecycle allows going there from `old` (staying put is allowed)."""
    old = SnapshotStatus(old)
    if new != old and new not in TRANSITIONS[old]:
        raise InvalidTransition(f"a snapshot cannot go from {old} to {new}")
    return new
