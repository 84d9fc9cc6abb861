"""Load: 100 copies into one region at once (mv, cp and the CopySnapshot API), with readers
and writers beside them; every copy completes and verifies, every byte read is right, and
the mount keeps answering `ls`. `scripts/soak load` runs rounds of this for longer."""

from __future__ import annotations

from pathlib import Path

from ..conftest import SnapfsMount, gc_settled, wait_for
from . import loadwork


def test_hundred_concurrent_copies_with_readers_and_writers(tmp_path: Path) -> None:
    # Each copy limited to 1 MB/s: a 2 MiB copy lasts two seconds, so they overlap.
    m = SnapfsMount(
        tmp_path / "store", tmp_path / "mnt", block_size=64 << 10,
        extra_args=("--copy-bwlimit", "1M"),
    )  # fmt: skip
    m.mount()
    try:
        digests = loadwork.create_sources(m, tmp_path / "images")
        result = loadwork.run_round(m, digests, "0", copies=100, writers=4, readers=4)
        assert not result.problems, result.problems
        assert result.copies_started == result.copies_verified == 100
        assert result.writes_verified == 4 and result.reads_verified > 0
        assert result.probes > 0  # `ls` kept answering while all of it ran
        assert result.most_running > 1  # side by side (how many depends on the machine)
        assert m.region_status(loadwork.DST)["totals"]["snapshots"] == 100
        loadwork.clear_round(m, "0")
        assert wait_for(lambda: gc_settled(m.store, loadwork.DST), 30)
        assert wait_for(lambda: gc_settled(m.store, loadwork.SRC), 30)
        assert "Traceback" not in m.log()
        m.umount()
        code, report = m.check()
        assert code == 0 and report["ok"], report
    finally:
        m.teardown()
