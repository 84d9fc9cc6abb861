"""Snapshot metadata an operator manages on the mount: tags, description, retention, quota."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import SnapfsMount, run, wait_for

DAY = 86400


def xattr(path: Path, name: str) -> str:
    return os.getxattr(path, name).decode()


def setfattr(path: Path, name: str, value: str) -> int:
    return run("setfattr", "-n", name, "-v", value, path, check=False).returncode


def snapshot(region: Path, name: str, data: bytes = b"") -> Path:
    path = region / name
    path.write_bytes(data or os.urandom(1 << 20))
    return path


def test_tags_description_and_retention_through_setfattr(mnt: SnapfsMount) -> None:
    region = mnt.path / "us-east-1"
    region.mkdir()
    snap = snapshot(region, "disk.img")
    assert setfattr(snap, "user.tag.env", "prod") == 0
    assert setfattr(snap, "user.tag.team", "storage") == 0
    assert setfattr(snap, "user.snapfs.description", "nightly backup of db-1") == 0
    assert setfattr(snap, "user.snapfs.retention_days", "30") == 0
    dump = run("getfattr", "-d", "-m", "-", snap).stdout
    for line in (
        'user.tag.env="prod"',
        'user.tag.team="storage"',
        'user.snapfs.description="nightly backup of db-1"',
        'user.snapfs.retention_days="30"',
    ):
        assert line in dump
    # expires_at is computed: read by name, not offered to copying tools.
    assert "user.snapfs.expires_at=" not in dump
    assert run("getfattr", "-n", "user.snapfs.expires_at", snap).stdout

    refused = [
        ("user.tag.env", "see https://example.com"),
        ("user.tag.acs:owner", "x"),
        ("user.tag.aliyun-x", "x"),
        ("user.tag." + "k" * 129, "x"),
        ("user.tag.env", "v" * 129),
        ("user.snapfs.description", "x"),
        ("user.snapfs.description", "http://example.com/backup"),
        ("user.snapfs.description", "d" * 257),
        ("user.snapfs.retention_days", "0"),
        ("user.snapfs.retention_days", "65537"),
        ("user.snapfs.retention_days", "ten"),
        ("user.snapfs.expires_at", "2030-01-01T00:00:00Z"),
    ]
    for name, value in refused:
        assert setfattr(snap, name, value) != 0, (name, value)
        with pytest.raises(OSError) as exc:
            os.setxattr(snap, name, value.encode())
        assert exc.value.errno in (errno.EINVAL, errno.EPERM), (name, value)
    assert run("getfattr", "-d", "-m", "-", snap).stdout == dump  # nothing changed
    assert "InvalidTagValue.Malformed" in mnt.log() and "InvalidRetentionDays" in mnt.log()

    assert run("setfattr", "-x", "user.tag.team", snap).returncode == 0
    assert run("setfattr", "-x", "user.snapfs.retention_days", snap).returncode == 0
    dump = run("getfattr", "-d", "-m", "-", snap).stdout
    assert "user.tag.team" not in dump and "retention_days" not in dump
    assert "expires_at" not in dump
    mnt.remount()
    assert xattr(snap, "user.tag.env") == "prod"
    assert xattr(snap, "user.snapfs.description") == "nightly backup of db-1"


def test_copies_keep_the_description_but_not_the_tags(mnt: SnapfsMount) -> None:
    a, b = mnt.path / "cn-hangzhou", mnt.path / "us-east-1"
    a.mkdir()
    b.mkdir()
    snap = snapshot(a, "disk.img")
    os.setxattr(snap, "user.tag.env", b"prod")
    os.setxattr(snap, "user.snapfs.description", b"the disk of db-1")
    run("cp", snap, b / "by-cp.img")
    mnt.cli("copy", snap, b, "--name", "byApi", "--tag", "copied=yes", "--wait")
    for copy in (b / "by-cp.img", b / "byApi"):
        assert xattr(copy, "user.snapfs.description") == "the disk of db-1"
        with pytest.raises(OSError) as exc:
            os.getxattr(copy, "user.tag.env")
        assert exc.value.errno == errno.ENODATA
    assert xattr(b / "byApi", "user.tag.copied") == "yes"


@pytest.fixture
def clocked(tmp_path: Path) -> Iterator[tuple[SnapfsMount, Path]]:
    """A mount whose retention clock is the number in a file (SNAPFS_CLOCK_FILE)."""
    clock = tmp_path / "clock"
    clock.write_text(str(time.time()))
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt", env={"SNAPFS_CLOCK_FILE": str(clock)})
    m.mount()
    try:
        yield m, clock
    finally:
        m.teardown()


def advance(clock: Path, days: float) -> None:
    clock.write_text(str(float(clock.read_text()) + days * DAY))


def test_retention_releases_snapshots_when_it_runs_out(
    clocked: tuple[SnapfsMount, Path],
) -> None:
    mnt, clock = clocked
    region = mnt.path / "us-east-1"
    region.mkdir()
    short, kept, offline = (snapshot(region, n) for n in ("short.img", "kept.img", "off.img"))
    created = time.time()
    os.setxattr(short, "user.snapfs.retention_days", b"1")
    os.setxattr(kept, "user.snapfs.retention_days", b"5")
    os.setxattr(offline, "user.snapfs.retention_days", b"3")
    expiry = time.strptime(xattr(short, "user.snapfs.expires_at"), "%Y-%m-%dT%H:%M:%SZ")
    assert abs(time.mktime(expiry) - time.timezone - (created + DAY)) < 120
    mnt.cli("copy", kept, region, "--name", "copyFor2Days", "--retention-days", "2", "--wait")
    assert xattr(region / "copyFor2Days", "user.snapfs.retention_days") == "2"
    blocks_before = len(mnt.objects("us-east-1"))

    advance(clock, 0.5)
    time.sleep(0.5)  # several sweeps of the injected clock: nothing is due yet
    assert sorted(os.listdir(region)) == ["copyFor2Days", "kept.img", "off.img", "short.img"]

    advance(clock, 1)  # 1.5 days: short.img has run out
    assert wait_for(lambda: not short.exists(), 10)
    assert sorted(os.listdir(region)) == ["copyFor2Days", "kept.img", "off.img"]
    assert wait_for(lambda: len(mnt.objects("us-east-1")) == blocks_before - 2, 10)
    assert "short.img" in mnt.log() and "retention of 1 days ended" in mnt.log()

    mnt.umount()
    advance(clock, 2)  # 3.5 days, while unmounted: off.img and the 2-day copy run out
    mnt.mount()
    assert wait_for(lambda: sorted(os.listdir(region)) == ["kept.img"], 10)
    # Released before the kernel's INIT was answered: no cache invalidation may be sent
    # then (pyfuse3 logged a traceback for the kernel's ENOSYS).
    assert "Traceback" not in mnt.log()
    advance(clock, 2)  # 5.5 days
    assert wait_for(lambda: os.listdir(region) == [], 10)
    assert wait_for(lambda: not mnt.objects("us-east-1"), 10)


def test_snapshot_quota_is_edquot_for_every_way_in(tmp_path: Path, mnt: SnapfsMount) -> None:
    a, b = mnt.path / "cn-hangzhou", mnt.path / "us-east-1"
    a.mkdir()
    b.mkdir()
    source = snapshot(a, "disk.img")
    assert setfattr(b, "user.snapfs.snapshot_quota", "0") != 0  # 1 or more
    assert setfattr(b, "user.snapfs.snapshot_quota", "2") == 0
    snapshot(b, "one.img")
    run("cp", source, b / "two.img")
    for attempt in (
        run("cp", source, b / "three.img", check=False),
        run("dd", "if=/dev/zero", f"of={b / 'four.img'}", "bs=4k", "count=1", check=False),
        run("mv", source, b / "five.img", check=False),
    ):
        assert attempt.returncode != 0 and "Disk quota exceeded" in attempt.stderr
    refused = mnt.cli("copy", source, b, "--name", "six", check=False)
    assert refused.returncode != 0 and refused.stderr.startswith("QuotaExceed.SnapshotQuota")
    assert sorted(os.listdir(b)) == ["one.img", "two.img"]
    assert os.listdir(a) == ["disk.img"]  # the refused mv left the source where it was
    run("setfattr", "-x", "user.snapfs.snapshot_quota", b)
    run("cp", source, b / "three.img")
    assert len(os.listdir(b)) == 3


def test_status_shows_tags_retention_and_copy_progress(slow_mnt: SnapfsMount) -> None:
    a, b = slow_mnt.path / "cn-hangzhou", slow_mnt.path / "us-east-1"
    a.mkdir()
    b.mkdir()
    snap = snapshot(a, "disk.img", os.urandom(24 << 20))
    os.setxattr(snap, "user.tag.env", b"prod")
    os.setxattr(snap, "user.snapfs.retention_days", b"7")
    os.setxattr(snap, "user.snapfs.description", b"db-1 nightly")
    run("cp", snap, a / "other.img")
    run("mv", a / "other.img", b / "moved.img")  # ~3 s at the 8 MiB/s test throttle

    def entry(region: str, name: str) -> dict:
        data = json.loads(slow_mnt.cli("status", slow_mnt.path, "--json").stdout)
        r = next(r for r in data["regions"] if r["name"] == region)
        return next(s for s in r["snapshots"] if s["name"] == name)

    copying = entry("us-east-1", "moved.img")
    assert copying["status"] == "copying" and 0 <= copying["progress"] < 100
    seen = wait_for(lambda: 0 < (p := entry("us-east-1", "moved.img")["progress"]) < 100 and p)
    assert seen, "status never showed the copy in progress"
    one = entry("cn-hangzhou", "disk.img")
    assert one["tags"] == {"env": "prod"} and one["retention_days"] == 7
    assert one["description"] == "db-1 nightly"
    assert abs(one["expires_at"] - (one["created_at"] + 7 * DAY)) < 1
    table = slow_mnt.cli("status", a).stdout
    assert "env=prod" in table and time.strftime("%Y-", time.gmtime(one["expires_at"])) in table
    assert wait_for(lambda: entry("us-east-1", "moved.img")["status"] == "available", 30)
    assert entry("us-east-1", "moved.img")["progress"] == 100
