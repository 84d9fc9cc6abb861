"""Crash matrix: the daemon dies (`SNAPFS_FAULT`, see snapfs/faults.py) at every dangerous
moment of ingest, seal, `cp` copies, `mv` jobs, CopySnapshot jobs, garbage collection and
retention; after the next mount nothing sealed is lost or changed, every interrupted copy
resumes and verifies, and `snapfs check` is clean. The workload and the checks are in
tests/crash/workload.py; `scripts/soak crash` runs them at random points."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import SnapfsMount
from . import workload

# (point, hit): the N-th time the daemon reaches the point it dies. Each is reached by the
# workload's steps in order: ingest, cp copy, mv, snapfs copy into an encrypted region,
# a variant stored as deltas (then made relative to its original), a clone rewritten in
# place, copies of keep and its clone (the clone's relative to keep's copy), rm of the
# variant's original (folded into the variant), retention, rm of the variant.
CASES = [
    ("object_written", 1),  # ingest: the first object, nothing committed
    ("object_written", 200),  # ingest: after the mid-file commit
    ("writer_synced", 1),  # ingest: objects synced, their rows not committed
    ("writer_committed", 1),  # ingest: half the file committed, the rest still to come
    ("seal", 1),  # ingest: flushed at close, the seal not committed
    ("cp_copy_block", 20),  # cp copy: blocks matched so far, lineage in memory
    ("seal", 2),  # cp copy: its seal (the map comparison) not committed
    ("rebase_step", 1),  # the cp copy sealed: tombstones put, not yet relative to old.img
    ("move_inserted", 1),  # mv: destination and job committed, source still visible
    ("copy_batch_written", 1),  # mv job: objects written, not synced
    ("copy_batch_synced", 1),  # mv job: objects synced, batch not committed
    ("copy_batch_committed", 2),  # mv job: two batches done, resumes at the third
    ("copy_finished", 1),  # mv job done, its source not yet released
    ("gc_rows_dropped", 1),  # collection of the moved source: rows gone, objects not
    ("copy_batch_synced", 5),  # snapfs copy (re-encrypting) into vault, mid-job
    ("copy_finished", 2),  # snapfs copy done
    ("delta_written", 1),  # variant ingest: a delta object written, its row not committed
    ("delta_written", 12),  # variant ingest: more deltas, before its seal
    ("rebase_step", 4),  # variant relative to doomed, its redundant rows dropped
    ("clone_mapped", 1),  # snapfs clone: the parent's map taken, the new file not closed
    ("copy_chained", 1),  # snapfs copy of the clone: relative to keep's copy, job committed
    ("fold_step", 1),  # rm doomed: variant's rows merged into doomed's map, which it took
    ("gc_object_deleted", 40),  # rm doomed: collection half-way through its objects
    ("retention_released", 1),  # retention: one of two expired snapshots released
    ("gc_delta_dropped", 1),  # rm variant: delta rows gone, their bases still stored
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, workload.Images]:
    root = tmp_path_factory.mktemp("crash-template")
    images = workload.Images.create(root / "images")
    workload.build_template(root / "store", root / "mnt", images)
    return root / "store", images


@pytest.mark.parametrize(("point", "hit"), CASES, ids=[f"{p}:{n}" for p, n in CASES])
def test_crash_at(
    point: str, hit: int, template: tuple[Path, workload.Images], tmp_path: Path
) -> None:
    store, images = template
    workload.copy_store(store, tmp_path / "store")
    m = SnapfsMount(
        tmp_path / "store", tmp_path / "mnt", env=workload.clock_env(tmp_path / "clock")
    )
    try:
        m.mount(env=workload.fault_env(point, hit))
        steps = workload.Workload(m, images, tmp_path / "clock")
        died_in = steps.run_steps()
        assert died_in is not None, f"the workload never reached {point}:{hit}"
        assert f"fault injection: dying at {point} " in m.log()
        m.mount()
        workload.verify(m, images, workload.COMPLETED_BEFORE.get((point, hit), set()))
    finally:
        m.teardown()


def test_crash_during_recovery(template: tuple[Path, workload.Images], tmp_path: Path) -> None:
    """The daemon dies during ingest (objects synced, their rows not committed), then three
    more times while the next mounts recover (after removing the unfinished snapshot,
    after deleting one orphaned object, after reclaiming one pack's unsynced bytes);
    recovery picks up where it stopped and the store ends up whole."""
    store, images = template
    workload.copy_store(store, tmp_path / "store")
    m = SnapfsMount(
        tmp_path / "store", tmp_path / "mnt", env=workload.clock_env(tmp_path / "clock")
    )
    try:
        m.mount(env=workload.fault_env("writer_synced", 1))
        assert workload.Workload(m, images, tmp_path / "clock").run_steps() == "ingest"
        for point, hit in (("recover_removed", 1), ("orphan_deleted", 1), ("pack_reclaimed", 1)):
            failed = m.mount(env=workload.fault_env(point, hit), check=False)
            assert failed.returncode != 0 and not m.is_mounted()
            assert f"fault injection: dying at {point} " in m.log()
        m.mount()
        assert "removed" in m.log() and "orphaned block objects" in m.log()
        workload.verify(m, images)
    finally:
        m.teardown()
