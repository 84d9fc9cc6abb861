"""Crash safety and clean stops: kill -9, SIGTERM, fusermount3 -u, stale mounts."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from snapfs.cli import diskimage
from snapfs.fuse import mounts

from ..conftest import SnapfsMount, StoredObject, run, sha256, wait_for

MiB = 1 << 20


def assert_index_consistent(mnt: SnapfsMount, region: str) -> None:
    """No dangling rows, refcounts equal to the map, every row's object present."""
    directory = mnt.store / "regions" / region
    conn = sqlite3.connect(directory / "index.db")
    try:
        dangling = conn.execute(
            "SELECT count(*) FROM snapshot_blocks m LEFT JOIN blocks b ON b.id = m.block_id "
            "WHERE b.id IS NULL"
        ).fetchone()[0]
        assert dangling == 0
        orphan_maps = conn.execute(
            "SELECT count(*) FROM snapshot_blocks m LEFT JOIN snapshots s "
            "ON s.id = m.snapshot_id WHERE s.id IS NULL"
        ).fetchone()[0]
        assert orphan_maps == 0
        wrong_counts = conn.execute(
            "SELECT count(*) FROM blocks b WHERE refcount != "
            "(SELECT count(*) FROM snapshot_blocks m WHERE m.block_id = b.id)"
        ).fetchone()[0]
        assert wrong_counts == 0
        for (block_id,) in conn.execute("SELECT id FROM blocks"):
            key = block_id.hex()
            assert StoredObject(key, directory / "blocks").read_bytes()[:4] == b"SNFB"
        statuses = {s for (s,) in conn.execute("SELECT status FROM snapshots")}
        assert statuses <= {"available"}
    finally:
        conn.close()


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for seed in (1, 2):
        path = tmp_path / f"img{seed}.img"
        diskimage.create(path, 16 * MiB + seed, seed=seed)
        paths.append(path)
    return paths


def test_kill9_keeps_sealed_snapshots_and_drops_unsealed(
    images: list[Path], region: Path, mnt: SnapfsMount
) -> None:
    for image in images:
        run("cp", image, region)
    sealed = {image.name: sha256(image) for image in images}
    writer = open(region / "half-written.img", "wb")  # noqa: SIM115 - left open across the kill
    writer.write(os.urandom(5 * MiB))
    writer.flush()
    time.sleep(0.3)
    mnt.kill9()
    with pytest.raises(OSError):
        writer.close()
    assert mounts.is_stale(mnt.path)
    mnt.mount()  # clears the stale mount the dead daemon left
    assert sorted(os.listdir(region)) == sorted(sealed)
    for name, digest in sealed.items():
        assert sha256(region / name) == digest
    assert "was still being written" in mnt.log()
    mnt.umount()
    assert_index_consistent(mnt, "us-east-1")
    mnt.mount()


def test_kill9_during_ingest_repeatedly(tmp_path: Path, region: Path, mnt: SnapfsMount) -> None:
    image = tmp_path / "big.img"
    diskimage.create(image, 64 * MiB, seed=3, zeros=0.2)
    run("cp", image, region / "done.img")
    digest = sha256(image)
    for delay in (0.05, 0.2, 0.5):
        proc = run_bg("cp", image, region / "partial.img")
        time.sleep(delay)
        mnt.kill9()
        proc.wait()
        mnt.mount()
        assert sha256(region / "done.img") == digest
        assert "partial.img" not in os.listdir(region) or (
            os.getxattr(region / "partial.img", "user.snapfs.status") == b"available"
            and sha256(region / "partial.img") == digest
        )
        if (region / "partial.img").exists():
            os.unlink(region / "partial.img")
    mnt.umount()
    assert_index_consistent(mnt, "us-east-1")
    mnt.mount()


def run_bg(*args):
    import subprocess

    return subprocess.Popen(
        [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def test_sigterm_unmounts_cleanly(images: list[Path], region: Path, mnt: SnapfsMount) -> None:
    run("cp", images[0], region)
    pid = mnt.pid
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not mounts.pid_alive(pid), 20)
    assert not mnt.is_mounted()
    assert "store" in mnt.log().splitlines()[-1] and "closed" in mnt.log().splitlines()[-1]
    mnt.mount()
    assert sha256(region / images[0].name) == sha256(images[0])
    assert "not closed cleanly" not in mnt.log()


def test_fusermount_unmounts_cleanly(images: list[Path], region: Path, mnt: SnapfsMount) -> None:
    run("cp", images[1], region)
    pid = mnt.pid
    run("fusermount3", "-u", mnt.path)
    assert wait_for(lambda: not mounts.pid_alive(pid), 20)
    mnt.mount()
    assert sha256(region / images[1].name) == sha256(images[1])
    assert "not closed cleanly" not in mnt.log()


def test_second_mount_of_same_store_is_refused(mnt: SnapfsMount, tmp_path: Path) -> None:
    other = tmp_path / "mnt2"
    other.mkdir()
    result = mnt.cli("mount", other, "--store", mnt.store, check=False)
    assert result.returncode != 0
    assert "StoreBusy" in result.stderr
    assert not mounts.mount_fstype(other)


def test_umount_of_unmounted_path_fails_clearly(tmp_path: Path) -> None:
    from ..conftest import SNAPFS

    result = run(*SNAPFS, "umount", tmp_path, check=False)
    assert result.returncode != 0
    assert "MountPoint.NotMounted" in result.stderr


def test_foreground_mount_logs_to_stderr_and_umount_ends_it(tmp_path: Path) -> None:
    import subprocess

    from ..conftest import SNAPFS, SnapfsMount

    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt")
    proc = subprocess.Popen(
        [*SNAPFS, "mount", str(m.path), "--store", str(m.store), "--foreground"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(m.is_mounted, 30), "the foreground daemon did not mount"
        (m.path / "us-east-1").mkdir()
        (m.path / "us-east-1" / "disk.img").write_bytes(b"x" * 100_000)
        assert (m.path / "us-east-1" / "disk.img").read_bytes() == b"x" * 100_000
        m.umount()
        assert proc.wait(30) == 0
        stderr = proc.stderr.read() if proc.stderr else ""
        assert "mounted" in stderr and "created region us-east-1" in stderr
        assert "created region us-east-1" in m.log()  # the store's log file has it too
    finally:
        if proc.poll() is None:
            m.teardown()
            proc.kill()


def test_a_closed_snapshot_survives_a_crash_before_its_seal(
    images: list[Path], region: Path, mnt: SnapfsMount
) -> None:
    """`cp` returns once close() has committed everything; the seal follows at the release.
    A daemon dying in between (SNAPFS_FAULT=seal) must not lose what `cp` reported done:
    the next mount seals it (a `cp` copy with its lineage)."""
    other = mnt.path / "eu-west-1"
    other.mkdir()
    run("cp", images[0], region / "a.img")
    mnt.umount()
    mnt.mount(env={"SNAPFS_FAULT": "seal:2"})  # the second seal: the cp copy's
    run("cp", images[1], region / "b.img")
    # A copy as cp makes it (the source open for reading while the copy is written); cp
    # itself would then fail closing the source, after the daemon died.
    with open(region / "a.img", "rb") as source:
        with open(other / "a.img", "wb") as copy:
            shutil.copyfileobj(source, copy, 1 << 20)
        # close() of the copy returned: everything is committed; the release kills.
        assert wait_for(lambda: not mnt.alive(), 10)
        with pytest.raises(OSError):
            source.close()
    assert "fault injection: dying at seal" in mnt.log()
    mnt.mount()
    assert sha256(region / "b.img") == sha256(images[1])
    assert sha256(other / "a.img") == sha256(images[0])
    assert os.getxattr(other / "a.img", "user.snapfs.status") == b"available"
    source_id = os.getxattr(region / "a.img", "user.snapfs.id")
    assert os.getxattr(other / "a.img", "user.snapfs.source_snapshot_id") == source_id
    assert "sealed snapshot a.img" in mnt.log() and "at mount" in mnt.log()
    mnt.umount()
    assert_index_consistent(mnt, "eu-west-1")
    mnt.mount()


def test_a_write_after_a_close_takes_the_close_mark_away(region: Path, mnt: SnapfsMount) -> None:
    """A close of one descriptor marks the snapshot complete; a write through another
    (dup'd) one must unmark it first, or a crash would seal a snapshot missing that write's
    neighbours. Closed and not written since: sealed at the next mount; written since:
    removed, like any snapshot being written."""
    kept, dropped = region / "kept.img", region / "dropped.img"
    writers = []
    for path in (kept, dropped):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"first " * 50_000)
        os.close(os.dup(fd))  # FLUSH of the only open file: the close mark
        writers.append(fd)
    os.pwrite(writers[1], b"second", 1 << 20)  # through the other descriptor: unmarked
    mnt.kill9()
    for fd in writers:
        with pytest.raises(OSError):
            os.close(fd)
    mnt.mount()
    assert kept.read_bytes() == b"first " * 50_000
    assert os.getxattr(kept, "user.snapfs.status") == b"available"
    assert not dropped.exists()


def test_a_large_snapshot_is_deleted_a_chunk_at_a_time_and_a_crash_midway_loses_nothing(
    tmp_path: Path,
) -> None:
    """More map rows than one purge chunk: `rm` returns at once, the map goes in chunks; the
    daemon dies after the first chunk, and the next mount finishes the deletion."""
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt", block_size=4096)
    try:
        m.mount(env={"SNAPFS_FAULT": "purge_chunk:1"})
        region = m.path / "us-east-1"
        region.mkdir()
        keep, doomed = tmp_path / "keep.img", tmp_path / "doomed.img"
        keep.write_bytes(os.urandom(2 * MiB))
        doomed.write_bytes(keep.read_bytes()[:MiB] + os.urandom(3 * MiB))  # 1024 blocks
        run("cp", keep, region)
        run("cp", doomed, region)
        run("rm", region / "doomed.img")
        assert wait_for(lambda: "fault injection: dying at purge_chunk" in m.log(), 20)
        m.mount()
        assert sorted(os.listdir(region)) == ["keep.img"]
        assert sha256(region / "keep.img") == sha256(keep)
        assert wait_for(lambda: len(m.objects("us-east-1")) == 2 * MiB // 4096, 20)
        m.umount()
        code, report = m.check()
        assert code == 0 and report["ok"], report
        assert all(r["orphans"] == 0 and r["unreferenced"] == 0 for r in report["regions"])
    finally:
        m.teardown()


def test_a_stop_right_after_a_failed_move_keeps_the_source(tmp_path: Path) -> None:
    """A move whose destination cannot store its blocks fails and gives the source back
    its name; the daemon then dies before it releases the source (fault point
    `copy_finished`). The next mount must find the source visible, not hidden with no job,
    which recovery removes: the name is given back before the job's end is committed."""
    image = tmp_path / "disk.img"
    diskimage.create(image, 24 * MiB, seed=11)
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt", extra_args=("--copy-bwlimit", "4M"))
    try:
        m.mount(env={"SNAPFS_FAULT": "copy_finished:1"})
        a, b = m.path / "cn-hangzhou", m.path / "us-east-1"
        a.mkdir()
        b.mkdir()
        run("cp", image, a / "disk.img")
        source_id = os.getxattr(a / "disk.img", "user.snapfs.id").decode()
        run("mv", a / "disk.img", b)
        assert wait_for(lambda: float(os.getxattr(b / "disk.img", "user.snapfs.progress")) > 5)
        shutil.rmtree(m.store / "regions" / "us-east-1" / "blocks")  # the job cannot go on
        assert wait_for(lambda: not m.alive(), 30), "the daemon never reached copy_finished"
        assert "fault injection: dying at copy_finished " in m.log()
        m.mount()
        assert os.listdir(a) == ["disk.img"]
        assert "is back as disk.img" in m.log()
        assert os.getxattr(a / "disk.img", "user.snapfs.id").decode() == source_id
        assert sha256(a / "disk.img") == sha256(image)
    finally:
        m.teardown()
