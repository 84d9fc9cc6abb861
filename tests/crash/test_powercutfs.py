"""powercutfs itself, mounted for real: what a power cut keeps (fsync'ed data, entries of
fsync'ed directories) and what it loses (everything else)."""

from __future__ import annotations

import mmap
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from .powercutfs import PowerCutFS, is_mounted

DURABLE = b"durable " * 1500  # 12000 bytes: three pages, the last one partial


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[PowerCutFS]:
    with PowerCutFS(tmp_path / "backing", tmp_path / "mnt") as mounted:
        yield mounted
    assert not is_mounted(tmp_path / "mnt")
    # A skipped undo or a handler's bug is logged, not raised: it must not hide there.
    assert "Traceback" not in mounted.log()
    assert "cannot undo" not in mounted.log()


@pytest.fixture
def mnt(fs: PowerCutFS) -> Path:
    return fs.mountpoint


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: Path, data: bytes, fsync: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def durable_file(path: Path, data: bytes = DURABLE) -> Path:
    """A file that survives a cut: data fsync'ed, entry fsync'ed in its directory."""
    write(path, data, fsync=True)
    fsync_dir(path.parent)
    return path


def run_until_killed(script: str, *args: str | Path) -> None:
    """Run `script` in a child, wait for it to print "ready", then SIGKILL it: it closes
    nothing and syncs nothing more, like a daemon killed with -9."""
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


# --- file data -----------------------------------------------------------------------------


def test_unsynced_write_to_a_new_file_is_lost(fs: PowerCutFS, mnt: Path) -> None:
    path = mnt / "new"
    write(path, b"")
    fsync_dir(mnt)  # the name is durable, the data never was
    write(path, b"x" * 10000)

    fs.cut()

    assert path.read_bytes() == b""


def test_fsynced_write_survives(fs: PowerCutFS, mnt: Path) -> None:
    durable_file(mnt / "kept")

    fs.cut()

    assert (mnt / "kept").read_bytes() == DURABLE


def test_fdatasync_is_enough_for_data(fs: PowerCutFS, mnt: Path) -> None:
    path = durable_file(mnt / "f", b"")
    with open(path, "r+b") as f:
        f.write(DURABLE)
        f.flush()
        os.fdatasync(f.fileno())

    fs.cut()

    assert path.read_bytes() == DURABLE


def test_unsynced_overwrite_brings_back_the_old_data(fs: PowerCutFS, mnt: Path) -> None:
    path = durable_file(mnt / "f")
    with open(path, "r+b") as f:
        f.seek(4000)  # across the first page boundary
        f.write(b"N" * 500)
        f.seek(len(DURABLE) - 10)  # into the partial last page, and past the end
        f.write(b"A" * 5000)

    assert fs.stats()["saved_pages"] == 3
    fs.cut()

    assert path.read_bytes() == DURABLE


def test_unsynced_truncate_brings_back_the_old_size_and_data(fs: PowerCutFS, mnt: Path) -> None:
    path = durable_file(mnt / "f")
    os.truncate(path, 100)
    os.truncate(path, 20000)  # grown back with zeros: not the old data either
    other = durable_file(mnt / "g")
    write(other, b"short")  # open with O_TRUNC

    fs.cut()

    assert path.read_bytes() == DURABLE
    assert other.read_bytes() == DURABLE


def test_killed_writer_loses_its_unsynced_writes(fs: PowerCutFS, mnt: Path) -> None:
    path = durable_file(mnt / "f")
    run_until_killed(
        """
        import os, sys
        fd = os.open(sys.argv[1], os.O_RDWR)
        os.pwrite(fd, b"overwritten", 0)
        os.pwrite(fd, b"appended" * 1000, os.fstat(fd).st_size)
        print("ready", flush=True)
        import time; time.sleep(60)
        """,
        path,
    )
    assert path.read_bytes() != DURABLE  # the writes went through, to the "page cache"

    fs.cut()

    assert path.read_bytes() == DURABLE


def test_random_writes_and_truncates_match_a_model(fs: PowerCutFS, mnt: Path) -> None:
    """Whatever mix of writes, truncates and fsyncs: a cut leaves what the last fsync saw,
    read through a descriptor open across the cut as well as through a new one."""
    rng = random.Random(7)
    path = durable_file(mnt / "f", b"")
    fd = os.open(path, os.O_RDWR)
    try:
        current, durable = bytearray(), b""
        for _ in range(20):
            for _ in range(rng.randint(1, 30)):
                choice = rng.random()
                if choice < 0.6:
                    offset, data = rng.randint(0, len(current) + 9000), rng.randbytes(9000)
                    os.pwrite(fd, data, offset)
                    current.extend(bytes(max(0, offset - len(current))))
                    current[offset : offset + len(data)] = data
                elif choice < 0.85:
                    size = rng.randint(0, len(current) + 5000)
                    os.ftruncate(fd, size)
                    current = current[:size] + bytes(max(0, size - len(current)))
                else:
                    os.fsync(fd)
                    durable = bytes(current)
            assert os.pread(fd, len(current) + 1, 0) == current
            fs.cut()
            assert os.pread(fd, len(durable) + 1, 0) == durable
            assert path.read_bytes() == durable
            current = bytearray(durable)
    finally:
        os.close(fd)


def test_shared_mapping_sees_the_restored_data(fs: PowerCutFS, mnt: Path) -> None:
    path = durable_file(mnt / "f", b"A" * 8192)
    with open(path, "rb") as reader, open(path, "r+b") as writer:
        seen = mmap.mmap(reader.fileno(), 8192, prot=mmap.PROT_READ)
        written = mmap.mmap(writer.fileno(), 8192)
        written[:5] = b"BBBBB"  # no msync: that would be an fsync
        written.close()
        writer.close()  # close writes the dirty page back
        assert seen[:5] == b"BBBBB"

        fs.cut()

        assert seen[:5] == b"AAAAA"
        seen.close()


# --- directory entries ---------------------------------------------------------------------


def test_new_file_without_a_directory_fsync_disappears(fs: PowerCutFS, mnt: Path) -> None:
    write(mnt / "f", DURABLE, fsync=True)  # an fsync of the file is not one of its directory
    (mnt / "d").mkdir()
    fsync_dir(mnt / "d")

    fs.cut()

    assert os.listdir(mnt) == []


def test_new_file_with_a_directory_fsync_stays(fs: PowerCutFS, mnt: Path) -> None:
    (mnt / "d").mkdir()
    fsync_dir(mnt)
    durable_file(mnt / "d" / "f")

    fs.cut()

    assert (mnt / "d" / "f").read_bytes() == DURABLE


def test_file_in_a_directory_that_was_not_durable_disappears(fs: PowerCutFS, mnt: Path) -> None:
    (mnt / "d").mkdir()
    durable_file(mnt / "d" / "f")  # durable in d, but d itself is not

    fs.cut()

    assert not (mnt / "d").exists()


def test_renamed_directory_keeps_track_of_its_new_entries(fs: PowerCutFS, mnt: Path) -> None:
    """Uncommitted entries are tracked by directory inode, not path: undone after the
    directory moved."""
    (mnt / "a").mkdir()
    fsync_dir(mnt)
    durable_file(mnt / "a" / "kept")
    write(mnt / "a" / "new", b"x", fsync=True)
    os.rename(mnt / "a", mnt / "b")
    fsync_dir(mnt)

    fs.cut()

    assert os.listdir(mnt) == ["b"]
    assert os.listdir(mnt / "b") == ["kept"]


def test_rename_without_a_directory_fsync_is_reverted(fs: PowerCutFS, mnt: Path) -> None:
    durable_file(mnt / "final")
    write(mnt / "final.tmp", b"new", fsync=True)
    os.rename(mnt / "final.tmp", mnt / "final")
    write(mnt / "other.tmp", b"new", fsync=True)
    os.rename(mnt / "other.tmp", mnt / "other")

    fs.cut()

    assert sorted(os.listdir(mnt)) == ["final"]
    assert (mnt / "final").read_bytes() == DURABLE


def test_rename_with_file_and_directory_fsync_is_durable(fs: PowerCutFS, mnt: Path) -> None:
    durable_file(mnt / "final")
    write(mnt / "final.tmp", b"new", fsync=True)
    os.rename(mnt / "final.tmp", mnt / "final")
    fsync_dir(mnt)

    fs.cut()

    assert os.listdir(mnt) == ["final"]
    assert (mnt / "final").read_bytes() == b"new"


def test_rename_between_directories_needs_the_destination_fsync(fs: PowerCutFS, mnt: Path) -> None:
    for name in ("a", "b"):
        (mnt / name).mkdir()
    fsync_dir(mnt)
    durable_file(mnt / "a" / "moved")
    durable_file(mnt / "a" / "stays")
    os.rename(mnt / "a" / "moved", mnt / "b" / "moved")
    os.rename(mnt / "a" / "stays", mnt / "b" / "stays")
    fsync_dir(mnt / "a")  # the source: not enough

    fs.cut()

    assert sorted(os.listdir(mnt / "a")) == ["moved", "stays"]
    os.rename(mnt / "a" / "moved", mnt / "b" / "moved")
    fsync_dir(mnt / "b")
    fs.cut()
    assert os.listdir(mnt / "a") == ["stays"]
    assert (mnt / "b" / "moved").read_bytes() == DURABLE


def test_unlinked_file_comes_back_with_its_durable_content(fs: PowerCutFS, mnt: Path) -> None:
    path = durable_file(mnt / "f")
    with open(path, "ab") as f:
        f.write(b"never fsync'ed")
    os.unlink(path)
    assert os.listdir(mnt) == []  # the trash is not part of the mount

    fs.cut()

    assert path.read_bytes() == DURABLE


def test_unlink_with_a_directory_fsync_is_durable(fs: PowerCutFS, mnt: Path) -> None:
    path = durable_file(mnt / "f")
    os.unlink(path)
    fsync_dir(mnt)

    fs.cut()

    assert os.listdir(mnt) == []
    assert os.listdir(fs.backing / ".powercut-trash") == []


def test_removed_tree_comes_back(fs: PowerCutFS, mnt: Path) -> None:
    (mnt / "top" / "sub").mkdir(parents=True)
    for directory in (mnt, mnt / "top"):
        fsync_dir(directory)
    durable_file(mnt / "top" / "a")
    durable_file(mnt / "top" / "sub" / "b")
    shutil.rmtree(mnt / "top")
    assert not (mnt / "top").exists()

    fs.cut()

    assert (mnt / "top" / "a").read_bytes() == DURABLE
    assert (mnt / "top" / "sub" / "b").read_bytes() == DURABLE


def test_rename_errors_are_checked_before_the_target_goes(fs: PowerCutFS, mnt: Path) -> None:
    (mnt / "d").mkdir()
    write(mnt / "d" / "inside", b"")
    write(mnt / "f", b"kept")
    (mnt / "e").mkdir()
    with pytest.raises(OSError):  # ENOTEMPTY or EEXIST
        os.rename(mnt / "e", mnt / "d")
    with pytest.raises(IsADirectoryError):
        os.rename(mnt / "f", mnt / "d")
    with pytest.raises(NotADirectoryError):
        os.rename(mnt / "e", mnt / "f")
    assert (mnt / "f").read_bytes() == b"kept"
    assert os.listdir(mnt / "d") == ["inside"]


# --- SQLite --------------------------------------------------------------------------------


def test_sqlite_wal_commits_survive_an_abandoned_connection(fs: PowerCutFS, mnt: Path) -> None:
    db = mnt / "test.db"
    run_until_killed(
        """
        import sqlite3, sys
        db = sqlite3.connect(sys.argv[1], isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, v BLOB)")
        for n in range(200):
            db.execute("INSERT INTO t VALUES (?, randomblob(300))", [n])
            if n == 100:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        db.execute("BEGIN")
        db.execute("INSERT INTO t VALUES (1000, 'never committed')")
        print("ready", flush=True)
        import time; time.sleep(60)
        """,
        db,
    )
    assert fs.stats()["journal"] == 0  # the WAL's first sync fsync'ed the directory

    fs.cut()

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*), max(n) FROM t").fetchone() == (200, 199)
    finally:
        conn.close()


# --- the control interface -----------------------------------------------------------------


def test_stats_count_what_a_cut_would_lose(fs: PowerCutFS, mnt: Path) -> None:
    path = durable_file(mnt / "f")
    with open(path, "ab") as f:
        f.write(b"x" * 5000)
    write(mnt / "new", b"y" * 100)

    assert fs.stats() == {
        "dirty_inodes": 2,
        "saved_pages": 0,
        "undirty_bytes_appended": 5100,
        "journal": 1,
        "cuts": 0,
    }
    fs.cut()
    assert fs.stats() == {
        "dirty_inodes": 0,
        "saved_pages": 0,
        "undirty_bytes_appended": 0,
        "journal": 0,
        "cuts": 1,
    }


def test_sync_makes_everything_durable(fs: PowerCutFS, mnt: Path) -> None:
    durable_file(mnt / "gone")
    (mnt / "d").mkdir()
    write(mnt / "d" / "f", DURABLE)
    os.unlink(mnt / "gone")

    fs.sync()
    assert fs.stats()["dirty_inodes"] == fs.stats()["journal"] == 0
    fs.cut()

    assert os.listdir(mnt) == ["d"]
    assert (mnt / "d" / "f").read_bytes() == DURABLE
    assert os.listdir(fs.backing / ".powercut-trash") == []


def test_other_xattrs_pass_through(fs: PowerCutFS, mnt: Path) -> None:
    path = durable_file(mnt / "f")
    os.setxattr(path, "user.test", b"value")
    assert os.getxattr(path, "user.test") == b"value"
    assert "user.test" in os.listxattr(path)
    assert os.getxattr(fs.backing / "f", "user.test") == b"value"
    os.removexattr(path, "user.test")
    with pytest.raises(OSError):
        os.getxattr(path, "user.test")
    with pytest.raises(OSError):
        os.setxattr(mnt, "user.powercut", b"bogus")
