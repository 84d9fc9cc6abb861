"""Fixtures that mount a real snapfs: the CLI daemonises it on a temp store and mountpoint.

Teardown always unmounts: `snapfs umount`, and if that fails a lazy `fusermount3 -u -z` and
SIGKILL of the daemon, so a failing test never leaves a mount behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapfs import mounts

SNAPFS = [sys.executable, "-m", "snapfs"]


def run(*args: str | os.PathLike, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kw)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class SnapfsMount:
    def __init__(
        self,
        store: Path,
        mountpoint: Path,
        block_size: int | None = None,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        self.env = env  # extra environment of the daemon (e.g. SNAPFS_CLOCK_FILE)
        self.store = store
        self.path = mountpoint
        self.block_size = block_size
        self.extra_args = extra_args
        mountpoint.mkdir(parents=True, exist_ok=True)

    def cli(self, *args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
        return run(*SNAPFS, *args, check=check)

    def mount(
        self, *extra: str, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Mount; `env` adds to the daemon's environment for this mount only (e.g. a
        SNAPFS_FAULT that makes it die at a named point); `check=False` returns a failed
        `snapfs mount` instead of failing the test."""
        args = ["mount", self.path, "--store", self.store, *(extra or self.extra_args)]
        if self.block_size:
            args += ["--block-size", str(self.block_size)]
        daemon_env = {**os.environ, **(self.env or {}), **(env or {})}
        result = run(*SNAPFS, *args, check=False, env=daemon_env)
        if check:
            assert result.returncode == 0, f"mount failed: {result.stderr}\n{self.log()}"
        return result

    def umount(self) -> None:
        result = self.cli("umount", self.path, check=False)
        assert result.returncode == 0, f"umount failed: {result.stderr}"

    @property
    def pid(self) -> int | None:
        record = mounts.lookup(self.path)
        return record.pid if record else None

    def is_mounted(self) -> bool:
        return mounts.mount_fstype(self.path) is not None

    def kill9(self) -> None:
        pid = self.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _alive(pid), 10)

    def alive(self) -> bool:
        """The daemon serving this mount runs (False once it died or was unmounted)."""
        pid = self.pid
        return pid is not None and _alive(pid)

    def remount(self) -> None:
        self.umount()
        self.mount()

    def log(self) -> str:
        path = self.store / "snapfs.log"
        return path.read_text() if path.exists() else ""

    def check(self, *args: str) -> tuple[int, dict]:
        """`snapfs check --store --json`: its exit status and report."""
        return check_store(self.store, *args)

    def status(self, *args: str) -> dict:
        return json.loads(self.cli("status", "--store", self.store, "--json", *args).stdout)

    def region_status(self, region: str) -> dict:
        return next(r for r in self.status()["regions"] if r["name"] == region)

    def objects(self, region: str) -> list[Path]:
        root = self.store / "regions" / region / "blocks"
        return [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".tmp")]

    def teardown(self) -> None:
        pid = self.pid
        umounted = self.is_mounted() and run(*SNAPFS, "umount", self.path, check=False)
        if umounted and umounted.returncode != 0:
            run("fusermount3", "-u", "-z", self.path, check=False)
        if pid is not None and _alive(pid) and not wait_for(lambda: not _alive(pid), 30):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def check_store(store: Path, *args: str) -> tuple[int, dict]:
    result = run(*SNAPFS, "check", "--store", store, "--json", *args, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def region_report(report: dict, name: str) -> dict:
    """One region's part of a `snapfs check --json` report."""
    return next(r for r in report["regions"] if r["name"] == name)


def make_key(m: SnapfsMount, region: str) -> str:
    """A new CMK of `region` through `snapfs key create`; its id."""
    return run(*SNAPFS, "key", "create", "--region", region, "--store", m.store).stdout.split()[-1]


def encrypt_region(m: SnapfsMount, region: Path) -> str:
    """Make a region directory encrypt by default under a new key; the key id."""
    key_id = make_key(m, region.name)
    os.setxattr(region, "user.snapfs.default_kms_key_id", key_id.encode())
    os.setxattr(region, "user.snapfs.encrypt_by_default", b"true")
    return key_id


_alive = mounts.pid_alive


def _mounted(tmp_path: Path, *extra_args: str) -> Iterator[SnapfsMount]:
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt", extra_args=extra_args)
    m.mount()
    try:
        yield m
    finally:
        m.teardown()


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[SnapfsMount]:
    yield from _mounted(tmp_path)


@pytest.fixture
def slow_mnt(tmp_path: Path) -> Iterator[SnapfsMount]:
    """A mount whose copies run at 8 MiB/s (`--copy-bwlimit`), to watch them in progress."""
    yield from _mounted(tmp_path, "--copy-bwlimit", "8M")


@pytest.fixture
def region(mnt: SnapfsMount) -> Path:
    path = mnt.path / "us-east-1"
    path.mkdir()
    return path
