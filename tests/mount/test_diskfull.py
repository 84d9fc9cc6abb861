"""A full store disk: writers get ENOSPC, the daemon keeps serving, nothing stored is lost,
and writing works again once space is freed. The store lives on a small tmpfs."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import SnapfsMount, gc_settled, random_image, run, sha256, wait_for

MiB = 1 << 20
DISK = "24m"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", disk], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", disk], check=False)


@pytest.fixture
def full_mnt(small_disk: Path, tmp_path: Path) -> Iterator[SnapfsMount]:
    m = SnapfsMount(small_disk / "store", tmp_path / "mnt", block_size=64 << 10)
    m.mount()
    try:
        yield m
    finally:
        m.teardown()


def assert_serving(m: SnapfsMount, region: Path, sealed: dict[str, str]) -> None:
    """Reads, listings, xattrs and statfs still work and sealed snapshots read back right."""
    assert m.alive()
    for name, digest in sealed.items():
        assert sha256(region / name) == digest
        assert os.getxattr(region / name, "user.snapfs.status") == b"available"
    assert set(sealed) <= set(os.listdir(region))
    assert os.statvfs(m.path).f_blocks > 0


def test_snapshots_filling_the_store_get_enospc_and_space_comes_back(
    tmp_path: Path, full_mnt: SnapfsMount
) -> None:
    m = full_mnt
    region = m.path / "us-east-1"
    region.mkdir()
    keep = random_image(tmp_path / "keep.img", 4 * MiB)
    run("cp", keep, region)
    assert os.getxattr(region / "keep.img", "user.snapfs.status") == b"available"  # seals it
    sealed = {"keep.img": sha256(keep)}

    dd = run("dd", "if=/dev/urandom", f"of={region / 'big.img'}", "bs=1M", "count=40",
             check=False)  # fmt: skip
    assert dd.returncode != 0 and "No space left on device" in dd.stderr
    assert_serving(m, region, sealed)
    # The snapshot that did not fit failed with the reason (at its release, which the
    # kernel sends after dd's close returned); it never reads as zeros.
    big = region / "big.img"
    assert wait_for(lambda: os.getxattr(big, "user.snapfs.status") == b"failed", 10)
    assert os.getxattr(region / "big.img", "user.snapfs.error").startswith(b"StoreFull: ")
    with open(region / "big.img", "rb") as f, pytest.raises(OSError) as read:
        f.read(4096)
    assert read.value.errno == errno.EIO
    # The index keeps room to work: tags, deletes and renames still commit.
    os.setxattr(region / "keep.img", "user.tag.env", b"prod")
    os.rename(region / "big.img", region / "big.failed")

    # `rm` then `cp` at once, as on any filesystem: the space the delete frees is collected
    # in the background, and a writer that finds the disk full meanwhile waits for it.
    again = random_image(tmp_path / "again.img", 6 * MiB)
    os.unlink(region / "big.failed")
    run("cp", again, region)
    assert wait_for(lambda: gc_settled(m.store, "us-east-1"), 10)
    sealed["again.img"] = sha256(again)
    assert_serving(m, region, sealed)

    m.remount()
    assert_serving(m, region, sealed)
    assert os.getxattr(region / "keep.img", "user.tag.env") == b"prod"
    m.umount()
    code, report = m.check()
    assert code == 0 and report["ok"], report
    assert "Traceback" not in m.log()
    assert "StoreFull" in m.log()


def test_a_disk_filled_by_something_else_refuses_writes_cleanly(
    tmp_path: Path, small_disk: Path, full_mnt: SnapfsMount
) -> None:
    m = full_mnt
    region = m.path / "us-east-1"
    region.mkdir()
    keep = random_image(tmp_path / "keep.img", 3 * MiB)
    run("cp", keep, region)
    assert os.getxattr(region / "keep.img", "user.snapfs.status") == b"available"  # seals it
    sealed = {"keep.img": sha256(keep)}
    other = m.path / "eu-west-1"
    other.mkdir()

    filler = small_disk / "filler"
    run("dd", "if=/dev/zero", f"of={filler}", "bs=64k", check=False)  # to the last byte
    assert os.statvfs(small_disk).f_bavail == 0

    new = random_image(tmp_path / "new.img", 2 * MiB)
    cp = run("cp", new, region / "new.img", check=False)
    assert cp.returncode != 0 and "No space left on device" in cp.stderr
    mv = run("mv", region / "keep.img", other / "keep.img", check=False)
    # Metadata changes either still fit in the index's journal or are refused with ENOSPC:
    # never EIO, never half done.
    for change in (
        lambda: os.setxattr(region / "keep.img", "user.tag.env", b"prod"),
        lambda: os.setxattr(region / "keep.img", "user.snapfs.description", b"a description"),
        lambda: os.utime(region / "keep.img", (1, 1)),
        lambda: (region / "empty.img").touch(),
    ):
        try:
            change()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    if mv.returncode == 0:  # the move committed: its job cannot store blocks, so it fails
        assert wait_for(lambda: os.getxattr(other / "keep.img", "user.snapfs.status")
                        == b"failed", 10)  # fmt: skip
        os.unlink(other / "keep.img")  # the failed move gave the source back its name
    assert_serving(m, region, sealed)

    filler.unlink()
    run("cp", new, region / "new.img")
    run("mv", region / "keep.img", other / "keep.img")
    assert wait_for(lambda: os.getxattr(other / "keep.img", "user.snapfs.status")
                    == b"available", 20)  # fmt: skip
    assert sha256(other / "keep.img") == sealed["keep.img"]
    assert sha256(region / "new.img") == sha256(new)
    m.umount()
    code, report = m.check()
    assert code == 0 and report["ok"], report
    assert "Traceback" not in m.log()
