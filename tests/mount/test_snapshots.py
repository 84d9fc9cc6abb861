"""Snapshots are files: real tools create them, they seal on last close, then never change."""

from __future__ import annotations

import errno
import os
import random
import stat
import tarfile
from pathlib import Path

import pytest

from snapfs.cli import diskimage

from ..conftest import SNAPFS, SnapfsMount, run, sha256, wait_for

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    diskimage.create(path, 24 * MiB + 12345, seed=7)
    return path


def xattr(path: Path, name: str) -> str:
    return os.getxattr(path, name).decode()


def test_cp_roundtrip_is_exact_and_sealed(image: Path, region: Path) -> None:
    run("cp", image, region)
    snap = region / image.name
    assert sha256(snap) == sha256(image)
    assert snap.stat().st_size == image.stat().st_size
    assert xattr(snap, "user.snapfs.status") == "available"
    assert xattr(snap, "user.snapfs.progress") == "100"
    assert xattr(snap, "user.snapfs.id").startswith("s-")
    assert len(xattr(snap, "user.snapfs.id")) == 18


def test_sealed_snapshot_cannot_change(image: Path, region: Path) -> None:
    run("cp", image, region)
    snap = region / image.name
    assert run(*SNAPFS, "seal", snap).stdout.strip() == "available"
    before = sha256(snap)
    for mode in ("r+b", "ab", "wb"):
        with pytest.raises(PermissionError) as exc, open(snap, mode):
            pass
        assert exc.value.errno == errno.EPERM
    with pytest.raises(PermissionError):
        os.truncate(snap, 10)
    result = run(
        "dd", "if=/dev/zero", f"of={snap}", "bs=4k", "count=1", "conv=notrunc", check=False
    )
    assert result.returncode != 0 and "not permitted" in result.stderr
    assert run("cp", image, snap, check=False).returncode != 0
    assert sha256(snap) == before
    # Metadata still changes.
    os.chmod(snap, 0o600)
    os.utime(snap, ns=(1_000_000_000, 2_000_000_000))
    st = snap.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == 2_000_000_000


def test_dd_with_seek_and_notrunc(tmp_path: Path, region: Path) -> None:
    chunk, ref, snap = tmp_path / "chunk", tmp_path / "ref.img", region / "dd.img"
    run("dd", "if=/dev/urandom", f"of={chunk}", "bs=1M", "count=3")
    for target in (ref, snap):
        run("dd", f"if={chunk}", f"of={target}", "bs=1M", "seek=5", "conv=notrunc")
    assert snap.stat().st_size == 8 * MiB
    assert sha256(snap) == sha256(ref)
    assert snap.stat().st_blocks * 512 == 3 * MiB  # the first 5 MiB are a hole


def test_random_overlapping_writes_and_reads_before_close(tmp_path: Path, region: Path) -> None:
    rng = random.Random(3)
    ref = bytearray()
    snap = region / "random.img"
    with open(snap, "w+b") as f:
        for _ in range(300):
            off = rng.randrange(0, 9 * MiB)
            data = rng.randbytes(rng.choice([1, 511, 4096, 70_000, MiB + 17]))
            f.seek(off)
            f.write(data)
            if len(ref) < off + len(data):
                ref.extend(bytes(off + len(data) - len(ref)))
            ref[off : off + len(data)] = data
            if rng.random() < 0.1:
                f.flush()
                f.seek(off)
                assert f.read(len(data)) == data
        f.flush()
        f.seek(0)
        assert f.read() == bytes(ref)
    assert snap.read_bytes() == bytes(ref)


def test_truncate_up_and_down(region: Path) -> None:
    snap = region / "trunc.img"
    pattern = bytes(range(256)) * (3 * MiB // 256 + 1)
    with open(snap, "w+b") as f:
        f.write(pattern[: 3 * MiB + 100])
        f.truncate(MiB + 10)  # shrink into the second block
        f.truncate(4 * MiB)  # grow: the cut-off bytes must come back as zeros
        f.seek(0)
        data = f.read()
    expected = pattern[: MiB + 10] + bytes(4 * MiB - MiB - 10)
    assert data == expected
    assert snap.read_bytes() == expected
    # truncate(1) on a new name makes a sparse snapshot.
    run("truncate", "-s", "100M", region / "sparse.img")
    sparse = region / "sparse.img"
    assert sparse.stat().st_size == 100 * MiB and sparse.stat().st_blocks == 0
    assert xattr(sparse, "user.snapfs.status") == "available"


def test_rsync_temp_file_and_rename(image: Path, tmp_path: Path, region: Path) -> None:
    run("rsync", "-a", image, region / "disk.img")
    assert sha256(region / "disk.img") == sha256(image)
    assert os.listdir(region) == ["disk.img"]
    assert (region / "disk.img").stat().st_mtime_ns // 10**9 == image.stat().st_mtime_ns // 10**9
    # A second rsync of changed content replaces the snapshot by rename (sealed ones are
    # immutable, so rsync's temp file + rename is the way to update).
    old_id = xattr(region / "disk.img", "user.snapfs.id")
    diskimage.mutate(image, 0.1, seed=9)
    # A later mtime, as a real change has: within the same second as the first copy, rsync's
    # quick check (size + mtime) would skip the changed file and the test would race.
    later = image.stat().st_mtime + 10
    os.utime(image, (later, later))
    run("rsync", "-a", "--no-whole-file", image, region / "disk.img")
    assert sha256(region / "disk.img") == sha256(image)
    assert xattr(region / "disk.img", "user.snapfs.id") != old_id
    assert os.listdir(region) == ["disk.img"]


def test_tar_extract_keeps_content_modes_and_times(tmp_path: Path, region: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    files = {}
    for i, size in enumerate([0, 1, 4096, MiB, 3 * MiB + 7]):
        path = src / f"vol{i}.img"
        path.write_bytes(random.Random(i).randbytes(size))
        os.chmod(path, 0o640)
        os.utime(path, (1_600_000_000, 1_600_000_000 + i))
        files[path.name] = sha256(path)
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        for name in sorted(files):
            tar.add(src / name, arcname=name)
    run("tar", "-C", region, "-xpf", archive)
    assert sorted(os.listdir(region)) == sorted(files)
    for i, (name, digest) in enumerate(sorted(files.items())):
        st = (region / name).stat()
        assert sha256(region / name) == digest
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert st.st_mtime == 1_600_000_000 + i


def test_stat_du_df(image: Path, region: Path, mnt: SnapfsMount) -> None:
    run("cp", "--sparse=always", image, region)
    snap = region / image.name
    st = snap.stat()
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
    assert st.st_size == image.stat().st_size
    # Whole zero blocks of the image are stored as holes, so du shows less than the size.
    assert st.st_blocks * 512 < st.st_size * 0.9
    du = int(run("du", "-k", snap).stdout.split()[0])
    assert du * 1024 == st.st_blocks * 512
    assert "/mnt" in run("df", "-h", mnt.path).stdout
    assert run("stat", snap).returncode == 0
    vfs = os.statvfs(mnt.path)
    assert vfs.f_blocks > 0 and vfs.f_namemax == 255


def test_rm_and_rename_within_region(image: Path, region: Path, mnt: SnapfsMount) -> None:
    run("cp", image, region / "a.img")
    snap_id = xattr(region / "a.img", "user.snapfs.id")
    ino = (region / "a.img").stat().st_ino
    run("mv", region / "a.img", region / "b.img")
    assert os.listdir(region) == ["b.img"]
    assert xattr(region / "b.img", "user.snapfs.id") == snap_id
    assert (region / "b.img").stat().st_ino == ino
    run("cp", image, region / "c.img")
    # mv -n never replaces; a refused rename changes nothing.
    run("mv", "-n", region / "c.img", region / "b.img", check=False)
    assert sorted(os.listdir(region)) == ["b.img", "c.img"]
    assert xattr(region / "b.img", "user.snapfs.id") == snap_id
    run("rm", region / "b.img", region / "c.img")
    assert os.listdir(region) == []
    assert wait_for(lambda: not mnt.objects("us-east-1")), "blocks were not freed"


def test_rename_over_existing_replaces_it(region: Path, mnt: SnapfsMount) -> None:
    (region / "old").write_bytes(b"A" * MiB)
    (region / "new").write_bytes(b"B" * MiB)
    os.rename(region / "new", region / "old")
    assert (region / "old").read_bytes() == b"B" * MiB
    assert wait_for(lambda: len(mnt.objects("us-east-1")) == 1)


def test_unlinked_open_snapshot_stays_readable(region: Path, mnt: SnapfsMount) -> None:
    data = random.Random(5).randbytes(2 * MiB)
    (region / "s").write_bytes(data)
    with open(region / "s", "rb") as f:
        os.unlink(region / "s")
        assert os.listdir(region) == []
        assert f.read() == data
    assert wait_for(lambda: not mnt.objects("us-east-1"))


def test_xattrs_interface(image: Path, region: Path, mnt: SnapfsMount) -> None:
    run("cp", image, region)
    snap = region / image.name
    # Computed attributes are virtual: not listed (copying tools never try to restore them)...
    assert run("getfattr", "-d", "-m", "-", snap).stdout == ""
    os.setxattr(snap, "user.snapfs.description", b"listed, copyable")
    listed = run("getfattr", "-d", "-m", "-", snap).stdout
    assert 'user.snapfs.description="listed, copyable"' in listed
    # ... but each is readable by name.
    for name in (
        "user.snapfs.id",
        "user.snapfs.status",
        "user.snapfs.progress",
        "user.snapfs.encrypted",
        "user.snapfs.kms_key_id",
        "user.snapfs.transferred_bytes",
    ):
        assert name not in listed
        assert run("getfattr", "-n", name, snap).stdout
    assert run("getfattr", "-n", "user.snapfs.status", "--only-values", snap).stdout == (
        "available"
    )
    with pytest.raises(OSError) as exc:
        os.getxattr(snap, "user.snapfs.nope")
    assert exc.value.errno == errno.ENODATA
    with pytest.raises(OSError) as exc:
        os.setxattr(snap, "user.snapfs.id", b"s-0000000000000000")
    assert exc.value.errno == errno.EPERM
    assert run("setfattr", "-n", "user.snapfs.status", "-v", "x", snap, check=False).returncode != 0
    snap_id = xattr(snap, "user.snapfs.id")
    mnt.remount()
    assert xattr(snap, "user.snapfs.id") == snap_id


def test_status_during_write_is_creating(region: Path) -> None:
    with open(region / "w.img", "wb") as f:
        f.write(b"x" * 100)
        assert xattr(region / "w.img", "user.snapfs.status") == "creating"
        assert xattr(region / "w.img", "user.snapfs.progress") == "0"
    assert xattr(region / "w.img", "user.snapfs.status") == "available"


def test_shell_redirection_writes_after_first_close(region: Path) -> None:
    # bash opens, dup2()s and closes the original fd before `echo` writes: sealing must wait
    # for the last handle, not the first close.
    run("bash", "-c", f"echo hello > {region / 'echo.txt'}; printf more >> /dev/null")
    assert (region / "echo.txt").read_bytes() == b"hello\n"
