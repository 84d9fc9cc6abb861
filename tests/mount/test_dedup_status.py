"""Dedup through the mount, and `snapfs status`."""

from __future__ import annotations

import shutil
from pathlib import Path

from snapfs.cli import diskimage

from ..conftest import SnapfsMount, run, sha256, wait_for

MiB = 1 << 20


def getfattr(path: Path, name: str) -> str:
    return run("getfattr", "--only-values", "-n", name, path).stdout


def test_second_snapshot_with_5_percent_changed_adds_only_those_blocks(
    tmp_path: Path, region: Path, mnt: SnapfsMount
) -> None:
    base = tmp_path / "base.img"
    diskimage.create(base, 64 * MiB, seed=11, zeros=0.0)  # every block holds data
    run("cp", base, region / "monday.img")
    block = mnt.status()["block_size"]
    before = mnt.region_status("us-east-1")["totals"]
    objects_before = len(mnt.objects("us-east-1"))
    assert objects_before == 64 * MiB // block

    changed = tmp_path / "changed.img"
    shutil.copy(base, changed)
    changed_bytes = diskimage.mutate(changed, 0.05, block_size=block, seed=12)
    changed_blocks = changed_bytes // block
    assert changed_blocks == round(0.05 * 64 * MiB / block)
    run("cp", changed, region / "tuesday.img")
    after = mnt.region_status("us-east-1")["totals"]
    assert len(mnt.objects("us-east-1")) == objects_before + changed_blocks
    assert after["unique_bytes"] - before["unique_bytes"] == changed_bytes
    assert after["dedup_ratio"] > 1.9

    # An identical third copy adds nothing at all.
    run("cp", base, region / "copy-of-monday.img")
    assert len(mnt.objects("us-east-1")) == objects_before + changed_blocks

    # Deleting frees exactly the blocks nobody else uses.
    run("rm", region / "monday.img", region / "copy-of-monday.img")
    assert wait_for(lambda: len(mnt.objects("us-east-1")) == objects_before)
    run("rm", region / "tuesday.img")
    assert wait_for(lambda: len(mnt.objects("us-east-1")) == 0)
    assert mnt.region_status("us-east-1")["totals"]["stored_bytes"] == 0


def test_region_compression_is_lz4_by_default_and_zstd_when_asked(
    tmp_path: Path, mnt: SnapfsMount
) -> None:
    image = tmp_path / "text.img"
    diskimage.create(image, 8 * MiB, seed=21, zeros=0.0, random_share=0.0)  # text only
    fast, small = mnt.path / "us-east-1", mnt.path / "eu-west-1"
    fast.mkdir()
    small.mkdir()
    assert getfattr(fast, "user.snapfs.compression") == "lz4"
    run("setfattr", "-n", "user.snapfs.compression", "-v", "zstd", small)
    bad = run("setfattr", "-n", "user.snapfs.compression", "-v", "gzip", small, check=False)
    assert bad.returncode != 0 and "Invalid argument" in bad.stderr
    assert getfattr(small, "user.snapfs.compression") == "zstd"
    run("cp", image, fast / "a.img")
    run("cp", image, small / "a.img")

    def codecs(region: str) -> set[int]:
        return {obj.read_bytes()[5] for obj in mnt.objects(region)}

    assert codecs("us-east-1") == {2} and codecs("eu-west-1") == {1}  # header byte 5
    assert sha256(fast / "a.img") == sha256(small / "a.img") == sha256(image)
    stored = {r["name"]: r["totals"]["stored_bytes"] for r in mnt.status()["regions"]}
    assert stored["eu-west-1"] < stored["us-east-1"] < 8 * MiB
    mnt.remount()  # the setting is kept with the region
    assert getfattr(small, "user.snapfs.compression") == "zstd"


def test_zero_blocks_cost_nothing(region: Path, mnt: SnapfsMount) -> None:
    run("dd", "if=/dev/zero", f"of={region / 'zeros.img'}", "bs=1M", "count=32")
    assert mnt.objects("us-east-1") == []
    assert (region / "zeros.img").stat().st_blocks == 0
    assert (region / "zeros.img").read_bytes() == bytes(32 * MiB)


def test_status_table_and_json(tmp_path: Path, region: Path, mnt: SnapfsMount) -> None:
    image = tmp_path / "a.img"
    diskimage.create(image, 8 * MiB, seed=5)
    run("cp", image, region / "a.img")
    run("cp", image, region / "b.img")
    (mnt.path / "eu-west-1").mkdir()

    data = mnt.status()
    assert [r["name"] for r in data["regions"]] == ["us-east-1", "eu-west-1"]
    us = data["regions"][0]
    snaps = {s["name"]: s for s in us["snapshots"]}
    assert set(snaps) == {"a.img", "b.img"}
    for snap in snaps.values():
        assert snap["status"] == "available" and snap["progress"] == 100
        assert snap["size"] == 8 * MiB
        assert snap["id"].startswith("s-")
        assert 0 < snap["stored_bytes"] <= snap["allocated_bytes"] + 4096
    assert us["totals"]["dedup_ratio"] == 2.0
    assert us["totals"]["snapshots"] == 2

    # PATH forms: a region directory and a snapshot file inside the mount.
    by_region = mnt.cli("status", region, "--json").stdout
    assert '"us-east-1"' in by_region and '"eu-west-1"' not in by_region
    one = mnt.cli("status", region / "a.img", "--json").stdout
    assert '"a.img"' in one and '"b.img"' not in one

    table = mnt.cli("status", mnt.path).stdout
    assert "a.img" in table and "dedup 2x" in table and "eu-west-1" in table
    missing = mnt.cli("status", region / "nope", check=False)
    assert missing.returncode != 0 and "InvalidSnapshotId.NotFound" in missing.stderr
