"""Cross-region copies through the mount: cp, mv and `snapfs copy`."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import pty
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from snapfs.cli import diskimage
from snapfs.fuse import mounts

from ..conftest import SNAPFS, SnapfsMount, run, sha256, wait_for

MiB = 1 << 20
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(src: Path, dst: Path, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def attr(path: Path, name: str) -> str:
    return os.getxattr(path, f"user.snapfs.{name}").decode()


def regions(m: SnapfsMount, *names: str) -> list[Path]:
    paths = [m.path / n for n in names]
    for p in paths:
        p.mkdir()
    return paths


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    diskimage.create(path, 32 * MiB, seed=21, zeros=0.0)  # every block holds data
    return path


def copy_done(path: Path, timeout: float = 60) -> str:
    return wait_for(
        lambda: attr(path, "status") in ("available", "failed") and attr(path, "status"), timeout
    )


# --- cp ----------------------------------------------------------------------------------------


def test_cp_between_regions_is_a_copy_with_lineage(image: Path, mnt: SnapfsMount) -> None:
    a, b = regions(mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")
    source_id = attr(a / "disk.img", "id")
    run("cp", a / "disk.img", b)
    copy = b / "disk.img"
    assert sha256(copy) == sha256(image)
    assert attr(copy, "status") == "available" and attr(copy, "progress") == "100"
    assert attr(copy, "id") != source_id
    assert attr(copy, "source_snapshot_id") == source_id
    assert attr(copy, "source_region") == "cn-hangzhou"
    assert int(attr(copy, "transferred_bytes")) == 32 * MiB
    objects = len(mnt.objects("us-east-1"))
    # A second copy under another name transfers nothing and shares the storage.
    run("cp", a / "disk.img", b / "other-name")
    assert attr(b / "other-name", "source_snapshot_id") == source_id
    assert attr(b / "other-name", "transferred_bytes") == "0"
    assert len(mnt.objects("us-east-1")) == objects
    # cp of a file from outside the mount is an ordinary snapshot.
    run("cp", image, b / "plain.img")
    assert (
        "user.snapfs.source_snapshot_id"
        not in run("getfattr", "-d", "-m", "-", b / "plain.img").stdout
    )


def test_cp_progress_climbs_while_copying(image: Path, slow_mnt: SnapfsMount) -> None:
    a, b = regions(slow_mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")
    proc = subprocess.Popen(["cp", str(a / "disk.img"), str(b / "disk.img")])
    seen = []
    while proc.poll() is None:
        with contextlib.suppress(FileNotFoundError):
            seen.append((attr(b / "disk.img", "status"), float(attr(b / "disk.img", "progress"))))
        time.sleep(0.1)
    assert proc.returncode == 0
    middle = [p for s, p in seen if s == "copying" and 0 < p < 100]
    assert len(set(middle)) >= 3, seen
    progress = [p for _, p in seen]
    assert progress == sorted(progress)  # never goes back
    assert attr(b / "disk.img", "status") == "available"
    assert attr(b / "disk.img", "progress") == "100"
    assert sha256(b / "disk.img") == sha256(image)


def test_writer_with_source_open_but_other_content_is_ordinary(
    image: Path, mnt: SnapfsMount
) -> None:
    a, b = regions(mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")
    script = (
        "import os, sys\n"
        "src = open(sys.argv[1], 'rb'); data = bytearray(src.read())\n"
        "data[5 * 2**20] ^= 0xff\n"
        "open(sys.argv[2], 'wb').write(data)\n"
    )
    run("python3", "-c", script, a / "disk.img", b / "edited.img")
    edited = b / "edited.img"
    assert attr(edited, "status") == "available"
    listed = run("getfattr", "-d", "-m", "-", edited).stdout
    assert "source_snapshot_id" not in listed and attr(edited, "transferred_bytes") == "0"
    expected = bytearray(image.read_bytes())
    expected[5 * MiB] ^= 0xFF
    assert edited.read_bytes() == bytes(expected)


# --- mv ----------------------------------------------------------------------------------------


def test_mv_returns_at_once_and_copies_in_background(image: Path, slow_mnt: SnapfsMount) -> None:
    a, b = regions(slow_mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")
    source_id = attr(a / "disk.img", "id")
    started = time.monotonic()
    run("mv", a / "disk.img", b)
    assert time.monotonic() - started < 2  # the copy itself takes ~4 s at 8 MiB/s
    moved = b / "disk.img"
    assert os.listdir(a) == []
    assert attr(moved, "status") == "copying"
    assert attr(moved, "source_snapshot_id") == source_id and attr(moved, "id") != source_id
    # Reads are served at once: untransferred blocks come from the source.
    assert sha256(moved) == sha256(image)
    assert attr(moved, "status") == "copying"
    progress = [float(attr(moved, "progress"))]
    while attr(moved, "status") == "copying":
        progress.append(float(attr(moved, "progress")))
        time.sleep(0.2)
    assert progress == sorted(progress) and len({p for p in progress if 0 < p < 100}) >= 2
    assert attr(moved, "status") == "available" and attr(moved, "progress") == "100"
    assert int(attr(moved, "transferred_bytes")) == 32 * MiB
    assert sha256(moved) == sha256(image)
    # The source's data is released once the copy is done.
    assert wait_for(lambda: slow_mnt.objects("cn-hangzhou") == [])


def test_mv_of_an_open_source_shows_the_copy_at_once(image: Path, slow_mnt: SnapfsMount) -> None:
    a, b = regions(slow_mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")
    source_id = attr(a / "disk.img", "id")
    with open(a / "disk.img", "rb") as reader:
        run("mv", a / "disk.img", b)
        moved = b / "disk.img"
        assert attr(moved, "status") == "copying" and attr(moved, "id") != source_id
        assert attr(moved, "source_snapshot_id") == source_id
        assert reader.read(4096) == image.read_bytes()[:4096]  # the reader keeps its file


def test_mv_within_region_is_a_plain_rename(image: Path, mnt: SnapfsMount) -> None:
    (a,) = regions(mnt, "cn-hangzhou")
    run("cp", image, a / "x.img")
    snap_id = attr(a / "x.img", "id")
    run("mv", a / "x.img", a / "y.img")
    assert attr(a / "y.img", "id") == snap_id and attr(a / "y.img", "status") == "available"


def test_mv_honours_noreplace_and_refuses_exchange(image: Path, mnt: SnapfsMount) -> None:
    a, b = regions(mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")
    (b / "disk.img").write_bytes(b"already here")
    with pytest.raises(OSError) as exc:
        renameat2(a / "disk.img", b / "disk.img", RENAME_NOREPLACE)
    assert exc.value.errno == errno.EEXIST
    with pytest.raises(OSError) as exc:
        renameat2(a / "disk.img", b / "disk.img", RENAME_EXCHANGE)
    assert exc.value.errno == errno.EINVAL
    assert (b / "disk.img").read_bytes() == b"already here"
    assert sha256(a / "disk.img") == sha256(image)
    # Without NOREPLACE the destination is replaced, as rename(2) does.
    os.rename(a / "disk.img", b / "disk.img")
    assert copy_done(b / "disk.img") == "available"
    assert sha256(b / "disk.img") == sha256(image)
    assert os.listdir(b) == ["disk.img"]


def test_mv_of_snapshot_being_written_is_ebusy(mnt: SnapfsMount) -> None:
    a, b = regions(mnt, "cn-hangzhou", "us-east-1")
    with open(a / "busy.img", "wb") as f:
        f.write(b"x" * MiB)
        with pytest.raises(OSError) as exc:
            os.rename(a / "busy.img", b / "busy.img")
        assert exc.value.errno == errno.EBUSY
    assert os.listdir(b) == []
    (a / "done.img").write_bytes(b"sealed")
    with pytest.raises(OSError) as exc:
        os.rename(a / "done.img", mnt.path / "no-such-region" / "done.img")
    assert exc.value.errno == errno.ENOENT
    assert sorted(os.listdir(a)) == ["busy.img", "done.img"]


# --- snapfs copy ----------------------------------------------------------------------------


def test_snapfs_copy_api(image: Path, mnt: SnapfsMount) -> None:
    a, b = regions(mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")
    os.setxattr(a / "disk.img", "user.tag.team", b"storage")
    os.setxattr(a / "disk.img", "user.snapfs.description", b"web server disk")
    result = mnt.cli(
        "copy",
        a / "disk.img",
        b,
        "--name",
        "web-01-copy",
        "--description",
        "copied for DR",
        "--retention-days",
        "30",
        "--tag",
        "env=prod",
        "--wait",
    )
    new_id = result.stdout.strip().splitlines()[-1]
    copy = b / "web-01-copy"
    assert attr(copy, "id") == new_id and new_id.startswith("s-")
    assert attr(copy, "status") == "available"
    assert attr(copy, "description") == "copied for DR"
    assert attr(copy, "retention_days") == "30"
    assert os.getxattr(copy, "user.tag.env") == b"prod"
    with pytest.raises(OSError):
        os.getxattr(copy, "user.tag.team")  # tags are not copied
    assert sha256(copy) == sha256(image)
    # Without --name the copy keeps the source's name; the description is copied by mv/cp.
    mnt.cli("copy", a / "disk.img", b, "--wait")
    assert sha256(b / "disk.img") == sha256(image)


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--name", "1starts-with-digit"], "InvalidSnapshotName.Malformed"),
        (["--name", "http://x"], "InvalidSnapshotName.Malformed"),
        (["--name", "x"], "InvalidSnapshotName.Malformed"),
        (["--name", "a" * 129], "InvalidSnapshotName.Malformed"),
        (["--description", "x"], "InvalidDescription.Malformed"),
        (["--description", "https://example.com"], "InvalidDescription.Malformed"),
        (["--description", "d" * 257], "InvalidDescription.Malformed"),
        (["--retention-days", "0"], "InvalidRetentionDays.Malformed"),
        (["--retention-days", "65537"], "InvalidRetentionDays.Malformed"),
        (["--retention-days", "ten"], "InvalidRetentionDays.Malformed"),
        (["--tag", "acs:key=v"], "InvalidTagKey.Malformed"),
        (["--tag", "aliyunx=v"], "InvalidTagKey.Malformed"),
        (["--tag", "=v"], "InvalidTagKey.Malformed"),
        (["--tag", "k=http://x"], "InvalidTagValue.Malformed"),
        (["--tag", "k=" + "v" * 129], "InvalidTagValue.Malformed"),
        (["--tag", "k=1", "--tag", "k=2"], "Duplicate.TagKey"),
    ],
)
def test_snapfs_copy_refuses_bad_parameters(
    tmp_path: Path, mnt: SnapfsMount, args: list[str], code: str
) -> None:
    a, b = regions(mnt, "cn-hangzhou", "us-east-1")
    (a / "disk.img").write_bytes(b"x" * 1000)
    result = mnt.cli("copy", a / "disk.img", b, *args, check=False)
    assert result.returncode != 0
    assert result.stderr.startswith(code + ":"), result.stderr
    assert os.listdir(b) == []


def test_snapfs_copy_errors_from_the_daemon(image: Path, mnt: SnapfsMount) -> None:
    a, b = regions(mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")

    def copy(*args) -> subprocess.CompletedProcess:
        return mnt.cli("copy", *args, check=False)

    result = copy(a / "nope.img", b)
    assert result.returncode != 0 and result.stderr.startswith("InvalidSnapshotId.NotFound")
    result = copy(a / "disk.img", mnt.path / "eu-west-1")
    assert result.returncode != 0 and result.stderr.startswith("InvalidRegionId.NotFound")
    with open(a / "creating.img", "wb") as f:
        f.write(b"x")
        result = copy(a / "creating.img", b)
        assert result.returncode != 0 and result.stderr.startswith("InvalidSnapshotId.NotReady")
    mnt.cli("copy", a / "disk.img", b, "--wait")
    result = copy(a / "disk.img", b)
    assert result.returncode != 0 and result.stderr.startswith("InvalidSnapshotName.Duplicate")
    os.setxattr(b, "user.snapfs.snapshot_quota", b"1")
    result = copy(a / "disk.img", b, "--name", "second")
    assert result.returncode != 0 and result.stderr.startswith("QuotaExceed.SnapshotQuota")
    with pytest.raises(OSError) as exc:
        (b / "by-cp.img").write_bytes(b"x")
    assert exc.value.errno == errno.EDQUOT
    assert os.listdir(b) == ["disk.img"]
    assert "QuotaExceed.SnapshotQuota" in mnt.log()


# --- incremental ---------------------------------------------------------------------------


def test_copies_are_incremental_by_content_in_any_order(tmp_path: Path, mnt: SnapfsMount) -> None:
    a, b = regions(mnt, "cn-hangzhou", "us-east-1")
    day1 = tmp_path / "day1.img"
    diskimage.create(day1, 32 * MiB, seed=31, zeros=0.0)
    day2 = tmp_path / "day2.img"
    shutil.copy(day1, day2)
    block = mnt.status()["block_size"]
    changed = diskimage.mutate(day2, 0.1, block_size=block, seed=32)
    run("cp", day1, a / "day1.img")
    run("cp", day2, a / "day2.img")
    # The newer snapshot first (Azure insists on creation order; snapfs does not care).
    run("mv", a / "day2.img", b)
    assert copy_done(b / "day2.img") == "available"
    assert int(attr(b / "day2.img", "transferred_bytes")) == 32 * MiB
    mnt.cli("copy", a / "day1.img", b, "--wait")
    assert int(attr(b / "day1.img", "transferred_bytes")) == changed
    # The cp path is incremental too: only the blocks b lacks are stored.
    run("cp", day1, a / "unrelated-but-same.img")
    run("cp", a / "unrelated-but-same.img", b)
    assert attr(b / "unrelated-but-same.img", "transferred_bytes") == "0"
    for name, source in (("day1.img", day1), ("day2.img", day2)):
        assert sha256(b / name) == sha256(source)
    assert len(mnt.objects("us-east-1")) == (32 * MiB + changed) // block


# --- durability, cancel, concurrency ---------------------------------------------------------


def _wait_progress(path: Path, low: float, high: float) -> float:
    value = wait_for(
        lambda: low <= float(attr(path, "progress")) <= high and float(attr(path, "progress")),
        30,
        0.02,
    )
    assert value, f"progress never reached {low}-{high}"
    return value


@pytest.mark.parametrize("stop", ["kill9", "umount"])
def test_mv_copy_resumes_after_stop(image: Path, slow_mnt: SnapfsMount, stop: str) -> None:
    a, b = regions(slow_mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")
    run("mv", a / "disk.img", b)
    before = _wait_progress(b / "disk.img", 20, 70)
    if stop == "kill9":
        slow_mnt.kill9()
    else:
        slow_mnt.umount()
    slow_mnt.mount()
    moved = b / "disk.img"
    assert os.listdir(a) == []
    after = float(attr(moved, "progress"))
    assert after >= before, "the copy restarted from zero"
    assert "resuming at block" in slow_mnt.log()
    assert copy_done(moved) == "available"
    assert sha256(moved) == sha256(image)
    # Every block was transferred exactly once across the stop.
    assert int(attr(moved, "transferred_bytes")) == 32 * MiB
    assert wait_for(lambda: slow_mnt.objects("cn-hangzhou") == [])


def test_rm_of_copying_destination_cancels_and_frees(image: Path, slow_mnt: SnapfsMount) -> None:
    a, b = regions(slow_mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")
    slow_mnt.cli("copy", a / "disk.img", b)
    _wait_progress(b / "disk.img", 10, 80)
    os.unlink(b / "disk.img")
    assert os.listdir(b) == []
    assert wait_for(lambda: slow_mnt.objects("us-east-1") == [])
    assert "cancelled by its deletion" in slow_mnt.log()
    assert sha256(a / "disk.img") == sha256(image)  # the source is untouched


def test_deleting_the_source_during_a_copy_lets_it_finish(
    image: Path, slow_mnt: SnapfsMount
) -> None:
    a, b = regions(slow_mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")
    slow_mnt.cli("copy", a / "disk.img", b)
    _wait_progress(b / "disk.img", 5, 60)
    os.unlink(a / "disk.img")
    assert os.listdir(a) == []
    assert copy_done(b / "disk.img") == "available"
    assert sha256(b / "disk.img") == sha256(image)
    assert wait_for(lambda: slow_mnt.objects("cn-hangzhou") == [])


def test_source_that_vanishes_mid_copy_fails_with_reason(
    image: Path, slow_mnt: SnapfsMount
) -> None:
    a, b = regions(slow_mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")
    slow_mnt.cli("copy", a / "disk.img", b)
    _wait_progress(b / "disk.img", 1, 50)
    shutil.rmtree(slow_mnt.store / "regions" / "cn-hangzhou" / "blocks")
    assert copy_done(b / "disk.img") == "failed"
    error = attr(b / "disk.img", "error")
    assert error.startswith("InvalidSnapshotId.NotFound:") and "lost block" in error
    result = slow_mnt.cli("copy", b / "disk.img", a, check=False)
    assert result.stderr.startswith("InvalidSnapshotId.NotReady")
    with pytest.raises(OSError) as exc:
        (b / "disk.img").read_bytes()  # untransferred blocks are unknown, never zeros
    assert exc.value.errno == errno.EIO
    # The daemon is fine, and a failed copy can be removed.
    os.unlink(b / "disk.img")
    (b / "after.img").write_bytes(b"still serving")
    assert (b / "after.img").read_bytes() == b"still serving"


def test_many_copies_at_once_respect_the_limit_and_share_blocks(
    image: Path, slow_mnt: SnapfsMount
) -> None:
    a, b = regions(slow_mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")
    os.setxattr(b, "user.snapfs.max_parallel_copies", b"3")
    for i in range(8):  # the request `snapfs copy` sends, without 8 process start-ups
        request = {"source": "cn-hangzhou/disk.img", "name": f"copy-{i}"}
        os.setxattr(b, "user.snapfs.copy", json.dumps(request).encode())
    running = [int(os.getxattr(b, "user.snapfs.copies_running"))]
    queued = [int(os.getxattr(b, "user.snapfs.copies_queued"))]
    assert running[0] == 3 and queued[0] == 5
    for i in range(8):
        assert copy_done(b / f"copy-{i}", 120) == "available"
        running.append(int(os.getxattr(b, "user.snapfs.copies_running")))
    assert max(running) <= 3
    assert {sha256(b / f"copy-{i}") for i in range(8)} == {sha256(image)}
    # Jobs needing the same missing blocks at the same time transferred each block once.
    total = sum(int(attr(b / f"copy-{i}", "transferred_bytes")) for i in range(8))
    assert total == 32 * MiB
    assert len(slow_mnt.objects("us-east-1")) == len(slow_mnt.objects("cn-hangzhou"))


def test_region_copy_settings_are_validated(mnt: SnapfsMount) -> None:
    (b,) = regions(mnt, "us-east-1")
    assert os.getxattr(b, "user.snapfs.max_parallel_copies") == b"100"
    for bad in (b"0", b"-1", b"many", b""):
        with pytest.raises(OSError) as exc:
            os.setxattr(b, "user.snapfs.max_parallel_copies", bad)
        assert exc.value.errno == errno.EINVAL
    assert os.getxattr(b, "user.snapfs.max_parallel_copies") == b"100"
    # Region settings are virtual: readable by name, never offered to copying tools.
    assert run("getfattr", "-d", "-m", "-", b).stdout == ""
    shown = run("getfattr", "-n", "user.snapfs.encrypt_by_default", b).stdout
    assert 'user.snapfs.encrypt_by_default="false"' in shown


def test_copy_cli_outside_a_mount_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    result = run(*SNAPFS, "copy", tmp_path / "f", tmp_path, check=False)
    assert result.returncode != 0 and "not inside a snapfs mount" in result.stderr
    assert mounts.find_mount_root(tmp_path) is None


def test_failed_move_gives_the_source_back(image: Path, slow_mnt: SnapfsMount) -> None:
    a, b = regions(slow_mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")
    source_id = attr(a / "disk.img", "id")
    run("mv", a / "disk.img", b)
    _wait_progress(b / "disk.img", 1, 50)
    shutil.rmtree(slow_mnt.store / "regions" / "cn-hangzhou" / "blocks")  # the job fails
    # A move never loses the snapshot: the source is back under its name.
    assert wait_for(lambda: os.listdir(a) == ["disk.img"])
    assert attr(a / "disk.img", "id") == source_id
    assert "is back as disk.img" in slow_mnt.log()
    assert wait_for(lambda: attr(b / "disk.img", "status") == "failed")
    assert attr(b / "disk.img", "error").startswith("InvalidSnapshotId.NotFound")


def test_copy_wait_shows_a_progress_bar(image: Path, slow_mnt: SnapfsMount) -> None:
    """`snapfs copy --wait` on a terminal: percent, bytes, rate and time left, to 100%."""
    a, b = regions(slow_mnt, "cn-hangzhou", "us-east-1")
    run("cp", image, a / "disk.img")
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [*SNAPFS, "copy", a / "disk.img", b, "--wait"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, "COLUMNS": "120"},
    )
    os.close(secondary)
    screen = b""
    with contextlib.suppress(OSError):  # EIO once the child has exited
        while chunk := os.read(primary, 65536):
            screen += chunk
    os.close(primary)
    assert proc.wait(30) == 0
    text = screen.decode(errors="replace")
    assert "disk.img" in text and "100.0%" in text and "32.0 MiB/32.0 MiB" in text, text[-400:]
    partial = [float(p) for p in re.findall(r"(\d+\.\d)%", text) if 0 < float(p) < 100]
    assert partial, "no intermediate percentage was drawn"
    assert "/s" in text and re.search(r"\d:\d\d:\d\d", text)  # a rate and a time left
    assert re.search(r"s-[0-9a-f]{16}\s*$", text)  # the new id, last


def test_copying_a_snapshot_that_is_still_copying_is_ebusy(
    image: Path, slow_mnt: SnapfsMount
) -> None:
    a, b, c = regions(slow_mnt, "cn-hangzhou", "us-east-1", "eu-west-1")
    run("cp", image, a / "disk.img")
    run("mv", a / "disk.img", b)
    assert attr(b / "disk.img", "status") == "copying"
    refused = slow_mnt.cli("copy", b / "disk.img", c, check=False)
    assert refused.returncode != 0 and refused.stderr.startswith("InvalidSnapshotId.NotReady")
    with pytest.raises(OSError) as exc:
        os.rename(b / "disk.img", c / "disk.img")
    assert exc.value.errno == errno.EBUSY
    assert os.listdir(c) == []
    assert copy_done(b / "disk.img") == "available"
