"""The snapshot lifecycle: the state machine of a snapshot's status."""

from __future__ import annotations

import pytest


def test_snapshot_lifecycle_allows_only_its_transitions() -> None:
    from snapfs.errors import InvalidTransition
    from snapfs.model.states import SnapshotStatus as S
    from snapfs.model.states import checked_transition

    allowed = {
        (S.CREATING, S.AVAILABLE), (S.CREATING, S.COPYING), (S.CREATING, S.FAILED),
        (S.COPYING, S.AVAILABLE), (S.COPYING, S.CREATING), (S.COPYING, S.FAILED),
    }  # fmt: skip
    for old in S:
        for new in S:
            if old == new or (old, new) in allowed:
                assert checked_transition(old, new) is new
            else:
                with pytest.raises(InvalidTransition):
                    checked_transition(old.value, new)  # rows hold the plain string
    assert S.AVAILABLE.final and S.FAILED.final and not S.CREATING.final
    assert S.AVAILABLE == "available"  # what the index and `snapfs status --json` hold
