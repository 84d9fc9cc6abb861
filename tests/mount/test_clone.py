"""Clones (issue 17, first part): a new snapshot that starts as a sealed one, so writing only
the changed ranges (dd conv=notrunc, qemu-img dd, rsync --inplace) costs what changed."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import pytest

from ..conftest import SNAPFS, SnapfsMount, encrypt_region, run, sha256

KiB, MiB = 1 << 10, 1 << 20


def status(path: Path) -> str:
    return os.getxattr(path, "user.snapfs.status").decode()


def stored_bytes(m: SnapfsMount, region: str) -> int:
    return m.region_status(region)["totals"]["stored_bytes"]


def clone(src: Path, dst: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run(*SNAPFS, "clone", src, dst, check=check)


def test_a_clone_rewritten_in_place_costs_what_changed(mnt: SnapfsMount, tmp_path: Path) -> None:
    region = mnt.path / "us-east-1"
    region.mkdir()
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(1).randbytes(16 * MiB))
    run("cp", image, region / "day1.img")
    assert status(region / "day1.img") == "available"
    before = stored_bytes(mnt, region.name)  # (snapfs status seals what is settling)
    clone(region / "day1.img", region / "day2.img")

    assert (region / "day2.img").stat().st_size == 16 * MiB
    expected = bytearray(image.read_bytes())
    patch = tmp_path / "patch"
    rng = random.Random(2)
    for offset in (5 * 4 * KiB, 3 * MiB + 8 * KiB, 9 * MiB):
        data = rng.randbytes(4 * KiB)
        patch.write_bytes(data)
        run("dd", f"if={patch}", f"of={region / 'day2.img'}", "bs=4096",
            f"seek={offset // 4096}", "conv=notrunc", "status=none")  # fmt: skip
        expected[offset : offset + len(data)] = data
    assert status(region / "day2.img") == "available"
    assert sha256(region / "day1.img") == sha256(image)  # the parent is unchanged
    want = tmp_path / "want"
    want.write_bytes(expected)
    assert sha256(region / "day2.img") == sha256(want)
    assert stored_bytes(mnt, region.name) - before <= 2 * 3 * 4 * KiB + 4 * KiB
    # A clone nobody wrote to is its parent's content, sealed by the usual rule.
    clone(region / "day1.img", region / "same.img")
    assert status(region / "same.img") == "available"
    assert sha256(region / "same.img") == sha256(image)
    mnt.umount()
    code, report = mnt.check()
    assert code == 0, report


def test_a_clone_keeps_its_parent_key(mnt: SnapfsMount, tmp_path: Path) -> None:
    region = mnt.path / "us-east-1"
    region.mkdir()
    key = encrypt_region(mnt, region)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(2 * MiB))
    run("cp", image, region / "a.img")
    assert status(region / "a.img") == "available"
    os.setxattr(region, "user.snapfs.encrypt_by_default", b"false")  # new files: plain
    clone(region / "a.img", region / "b.img")
    assert os.getxattr(region / "b.img", "user.snapfs.encrypted") == b"true"
    assert os.getxattr(region / "b.img", "user.snapfs.kms_key_id").decode() == key
    assert sha256(region / "b.img") == sha256(image)


def test_bad_clones_are_refused_with_cloud_codes(mnt: SnapfsMount, tmp_path: Path) -> None:
    a, b = mnt.path / "us-east-1", mnt.path / "eu-west-1"
    a.mkdir()
    b.mkdir()
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    run("cp", image, a / "x.img")
    assert status(a / "x.img") == "available"

    run("cp", image, a / "fresh.img")  # still settling: the clone seals it first
    assert clone(a / "fresh.img", a / "fresh-2.img", check=False).returncode == 0
    assert status(a / "fresh.img") == "available"

    missing = clone(a / "nope.img", a / "y.img", check=False)
    assert missing.returncode == 1 and "InvalidSnapshotId.NotFound" in missing.stderr
    assert not (a / "y.img").exists()  # refused: nothing left behind
    across = clone(a / "x.img", b / "y.img", check=False)
    assert across.returncode == 1 and "InvalidParameter" in across.stderr
    exists = clone(a / "x.img", a / "x.img", check=False)
    assert "InvalidSnapshotName.Duplicate" in exists.stderr

    with open(a / "busy.img", "wb") as f:  # still being written: not clonable
        f.write(b"x" * 4096)
        f.flush()
        busy = clone(a / "busy.img", a / "z.img", check=False)
        assert "InvalidSnapshotId.NotReady" in busy.stderr
    with open(a / "written.img", "wb") as f:  # only a new, empty snapshot becomes a clone
        f.write(b"y" * 4096)
        f.flush()
        with pytest.raises(OSError) as refused:
            os.setxattr(a / "written.img", "user.snapfs.parent", b"x.img")
        assert refused.value.errno == errno.EINVAL
    assert sha256(a / "x.img") == sha256(image)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_writes_and_reads_into_a_clone_match_a_model(
    mnt: SnapfsMount, tmp_path: Path, seed: int
) -> None:
    """Writes into parts of blocks are buffered without reading the blocks back
    (snapshots.PartialBlock): reads in between, writes over blocks being stored, a
    truncate, fsyncs and the final content must all be what a plain file gives."""
    region = mnt.path / "us-east-1"
    region.mkdir()
    rng = random.Random(seed)
    base = bytearray(rng.randbytes(4 * MiB))
    (tmp_path / "base").write_bytes(base)
    run("cp", tmp_path / "base", region / "base.img")
    assert status(region / "base.img") == "available"
    clone(region / "base.img", region / "work.img")
    model = bytearray(base)
    fd = os.open(region / "work.img", os.O_RDWR)
    try:
        for _ in range(300):
            action = rng.random()
            offset = rng.randrange(len(model) + 64 * KiB)
            if action < 0.6:
                data = rng.randbytes(rng.choice([1, 100, 4096, 5000, 130 * KiB, 600 * KiB]))
                os.pwrite(fd, data, offset)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + len(data)] = data
            elif action < 0.9:
                length = rng.choice([1, 4096, 70 * KiB, 1 * MiB])
                assert os.pread(fd, length, offset) == bytes(model[offset : offset + length])
            elif action < 0.97:
                os.fsync(fd)
            else:
                size = rng.randrange(len(model) + 1)
                os.ftruncate(fd, size)
                del model[size:]
        assert os.fstat(fd).st_size == len(model)
    finally:
        os.close(fd)
    assert status(region / "work.img") == "available"
    (tmp_path / "want").write_bytes(model)
    assert sha256(region / "work.img") == sha256(tmp_path / "want")
    assert sha256(region / "base.img") == sha256(tmp_path / "base")
