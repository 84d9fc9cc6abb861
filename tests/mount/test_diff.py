"""`snapfs diff` through the mount: ranges from the index, and applying them reproduces B."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from snapfs.cli import diskimage

from ..conftest import SnapfsMount, encrypt_region, run, sha256

MiB = 1 << 20


def diff(mnt: SnapfsMount, a: Path, b: Path) -> dict:
    return json.loads(mnt.cli("diff", a, b, "--json").stdout)


def apply(result: dict, base: Path, second: Path, out: Path) -> Path:
    """Copy A, write B's bytes over each range, truncate to B's size: must be B."""
    shutil.copyfile(base, out)
    size_b = result["second"]["size"]
    with open(second, "rb") as src, open(out, "r+b") as dst:
        for r in result["ranges"]:
            length = max(0, min(r["length"], size_b - r["offset"]))
            dst.seek(r["offset"])
            dst.write(os.pread(src.fileno(), length, r["offset"]))
        dst.truncate(size_b)
    return out


def test_diff_ranges_apply_back_to_the_second_snapshot(tmp_path: Path, mnt: SnapfsMount) -> None:
    block = mnt.status()["block_size"]
    a, b = mnt.path / "cn-hangzhou", mnt.path / "us-east-1"
    a.mkdir()
    b.mkdir()
    day1, day2, longer = tmp_path / "day1.img", tmp_path / "day2.img", tmp_path / "longer.img"
    diskimage.create(day1, 16 * MiB, seed=7, zeros=0.4)
    shutil.copy(day1, day2)
    changed = diskimage.mutate(day2, 0.1, block_size=block, seed=8)
    shutil.copy(day2, longer)
    with open(longer, "r+b") as f:  # one and a half blocks more, and a block zeroed
        f.seek(0, os.SEEK_END)
        f.write(os.urandom(block + block // 2))
        f.seek(3 * block)
        f.write(bytes(block))
    for image in (day1, day2, longer):
        run("cp", image, a / image.name)
    run("cp", a / "day2.img", b / "day2.img")  # the same content in another region

    result = diff(mnt, a / "day1.img", a / "day2.img")
    assert result["compared_by"] == "index" and result["block_size"] == block
    assert result["changed_bytes"] == changed
    assert all(r["offset"] % block == 0 for r in result["ranges"])
    assert sha256(apply(result, day1, a / "day2.img", tmp_path / "out")) == sha256(day2)

    across = diff(mnt, a / "day1.img", b / "day2.img")
    assert across["ranges"] == result["ranges"] and across["second"]["region"] == "us-east-1"

    for first, second in (("day2", "longer"), ("longer", "day1"), ("day1", "longer")):
        r = diff(mnt, a / f"{first}.img", a / f"{second}.img")
        out = apply(r, tmp_path / f"{first}.img", a / f"{second}.img", tmp_path / "out")
        assert sha256(out) == sha256(tmp_path / f"{second}.img"), (first, second)

    same = diff(mnt, a / "day2.img", b / "day2.img")
    assert same["ranges"] == [] and same["changed_bytes"] == 0

    text = mnt.cli("diff", a / "day1.img", a / "day2.img").stdout.splitlines()
    assert text[0].startswith("# cn-hangzhou/day1.img")
    assert [tuple(map(int, line.split())) for line in text[1:]] == [
        (r["offset"], r["length"]) for r in result["ranges"]
    ]


def test_diff_between_keys_compares_content(tmp_path: Path, mnt: SnapfsMount) -> None:
    block = mnt.status()["block_size"]
    plain, secret = mnt.path / "plain-1", mnt.path / "secret-1"
    plain.mkdir()
    secret.mkdir()
    encrypt_region(mnt, secret)
    day1, day2 = tmp_path / "day1.img", tmp_path / "day2.img"
    diskimage.create(day1, 8 * MiB, seed=9, zeros=0.3)
    shutil.copy(day1, day2)
    changed = diskimage.mutate(day2, 0.25, block_size=block, seed=10)
    run("cp", day1, plain / "day1.img")
    run("cp", day2, secret / "day2.img")
    result = diff(mnt, plain / "day1.img", secret / "day2.img")
    assert result["compared_by"] == "content" and result["changed_bytes"] == changed
    assert sha256(apply(result, day1, secret / "day2.img", tmp_path / "out")) == sha256(day2)


def test_diff_refuses_what_it_cannot_compare(tmp_path: Path, mnt: SnapfsMount) -> None:
    region = mnt.path / "us-east-1"
    region.mkdir()
    (region / "done.img").write_bytes(b"x" * 4096)
    missing = mnt.cli("diff", region / "done.img", region / "nope.img", check=False)
    assert missing.returncode != 0 and missing.stderr.startswith("InvalidSnapshotId.NotFound")
    with open(region / "busy.img", "wb") as f:
        f.write(b"y" * 4096)
        f.flush()
        busy = mnt.cli("diff", region / "done.img", region / "busy.img", check=False)
    assert busy.returncode != 0 and busy.stderr.startswith("InvalidSnapshotId.NotReady")
    outside = mnt.cli("diff", tmp_path, region / "done.img", check=False)
    assert outside.returncode != 0 and outside.stderr.startswith("InvalidParameter")
