"""Running snapfs as operators run FUSE file systems (issue 18): `--version`, commands that
find the store the user means, `mount -t fuse.snapfs` and fstab lines, the systemd unit's
command line started and stopped as systemd does, a copy's progress on a terminal, metrics."""

from __future__ import annotations

import os
import pty
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapfs import __version__
from snapfs.fuse import mounts

from ..conftest import SNAPFS, SnapfsMount, random_image, run, sha256, wait_for

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@pytest.fixture
def private_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Mount records and the default store of this test only: other mounts on the machine
    must not count as "the one store mounted"."""
    env = {
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "XDG_DATA_HOME": str(tmp_path / "xdg"),
    }
    (tmp_path / "run").mkdir(mode=0o700)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def snapfs(*args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
    return run(*SNAPFS, *args, check=check)


def test_version_is_printed_logged_and_in_status(mnt: SnapfsMount) -> None:
    assert snapfs("--version").stdout.strip() == f"snapfs {__version__}"
    first = mnt.log().splitlines()[0]
    assert f"snapfs {__version__} starting" in first, first
    assert mnt.status()["version"] == __version__


def test_commands_use_the_store_that_is_mounted_and_never_make_one(
    tmp_path: Path, private_env: dict[str, str]
) -> None:
    default = tmp_path / "xdg" / "snapfs"
    one = SnapfsMount(tmp_path / "store-one", tmp_path / "mnt-one", env=private_env)
    two = SnapfsMount(tmp_path / "store-two", tmp_path / "mnt-two", env=private_env)
    try:
        one.mount()
        # No --store: the one store mounted is meant, not a new default one.
        assert "created region us-west-2" in snapfs("region", "create", "us-west-2").stdout
        assert (one.path / "us-west-2").is_dir()
        snapfs("region", "create", one.path / "eu-west-3")
        assert (one.path / "eu-west-3").is_dir()
        key = snapfs("key", "create", "--region", one.path / "eu-west-3").stdout.split()[-1]
        assert key in snapfs("key", "list", "--store", one.store).stdout
        assert not default.exists()

        two.mount()
        refused = snapfs("region", "create", "ap-south-1", check=False)
        assert refused.returncode == 1
        assert str(one.store) in refused.stderr and str(two.store) in refused.stderr
        assert not (one.path / "ap-south-1").exists() and not (two.path / "ap-south-1").exists()
        snapfs("region", "create", two.path / "ap-south-1")  # a path says which
        assert (two.path / "ap-south-1").is_dir() and not (one.path / "ap-south-1").exists()
        one.umount()
        two.umount()
        missing = snapfs("key", "list", check=False)
        assert missing.returncode == 1 and missing.stderr.startswith("StoreNotFound")
        assert "snapfs mount" in missing.stderr
        assert not default.exists()
    finally:
        one.teardown()
        two.teardown()


@pytest.fixture
def mount_helper() -> Iterator[Path]:
    """/sbin/mount.fuse.snapfs, as scripts/install-service installs it (pointing at this
    checkout's python): mount(8) looks for helpers there only."""
    helper = Path("/sbin/mount.fuse.snapfs")
    if os.geteuid() != 0:
        pytest.skip("installing a mount helper needs root")
    existed = helper.exists() or helper.is_symlink()
    if not existed:
        helper.write_text(f'#!/bin/sh\nexec {sys.executable} -m snapfs "$@"\n')
        helper.chmod(0o755)
    try:
        yield helper
    finally:
        if not existed:
            helper.unlink()


def daemon_gone_cleanly(m: SnapfsMount, pid: int) -> bool:
    return (
        wait_for(lambda: not mounts.pid_alive(pid), 30)
        and not m.is_mounted()
        and m.log().rstrip().endswith("closed")
    )


def test_mount_t_fuse_snapfs_and_an_fstab_line(
    tmp_path: Path, private_env: dict[str, str], mount_helper: Path
) -> None:
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt", env=private_env)
    image = random_image(tmp_path / "disk.img", 2 * MiB)
    try:
        (tmp_path / "store").mkdir()
        run("mount", "-t", "fuse.snapfs", m.store, m.path,
            "-o", "settle=0.5,_netdev,nofail,x-systemd.device-timeout=10")  # fmt: skip
        assert m.is_mounted() and mounts.mount_fstype(m.path) == "fuse.snapfs"
        (m.path / "us-east-1").mkdir()
        run("cp", image, m.path / "us-east-1" / "disk.img")
        pid = m.pid
        assert pid is not None
        run("umount", m.path)
        assert daemon_gone_cleanly(m, pid), m.log()[-2000:]

        fstab = tmp_path / "fstab"
        fstab.write_text(f"# test\nsnapfs#{m.store} {m.path} fuse.snapfs "
                         "settle=1,copy_bwlimit=8M,nofail,_netdev 0 0\n")  # fmt: skip
        run("mount", "-T", fstab, m.path)
        assert sha256(m.path / "us-east-1" / "disk.img") == sha256(image)
        pid = m.pid
        assert pid is not None
        run("fusermount3", "-u", m.path)
        assert daemon_gone_cleanly(m, pid), m.log()[-2000:]

        bad = run("mount", "-t", "fuse.snapfs", m.store, m.path, "-o", "colour=blue",
                  check=False)  # fmt: skip
        assert bad.returncode != 0 and "unknown mount option 'colour=blue'" in bad.stderr
        assert not m.is_mounted()
    finally:
        m.teardown()


def unit_command(store: Path, mountpoint: Path) -> list[str]:
    """ExecStart of packaging/snapfs@.service for this store and mountpoint, with this
    checkout's python for /usr/local/bin/snapfs (what scripts/install-service puts there)."""
    unit = (ROOT / "packaging" / "snapfs@.service").read_text()
    (line,) = [x for x in unit.splitlines() if x.startswith("ExecStart=")]
    words = shlex.split(line.removeprefix("ExecStart="))
    assert words[0] == "/usr/local/bin/snapfs"
    out = [*SNAPFS]
    for word in words[1:]:
        if word == "$SNAPFS_OPTIONS":
            continue
        out.append(word.replace("${SNAPFS_STORE}", str(store)).replace("%f", str(mountpoint)))
    return out


def test_the_unit_runs_as_systemd_runs_it_ready_and_stopped_by_sigterm(
    tmp_path: Path, private_env: dict[str, str]
) -> None:
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt", env=private_env)
    sock_path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    (tmp_path / "store").mkdir()
    proc = subprocess.Popen(
        unit_command(m.store, m.path),
        env={**os.environ, **private_env, "NOTIFY_SOCKET": str(sock_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ready = sock.recv(4096).decode()
        assert ready.startswith("READY=1"), ready
        assert m.is_mounted()  # ready means the mount answers
        (m.path / "us-east-1").mkdir()
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(60) == 0
        assert not m.is_mounted()
        assert "received SIGTERM, unmounting" in m.log()
        assert m.log().rstrip().endswith("closed")
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
        m.teardown()


def read_pty(command: list[str], timeout: float) -> str:
    """Run `command` on a pseudo-terminal (as a person would) and return all it printed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child
        os.environ["COLUMNS"] = "160"
        os.execvp(command[0], command)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_copy_wait_shows_progress_with_a_real_rate_to_the_end(tmp_path: Path) -> None:
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt", extra_args=("--copy-bwlimit", "8M"))
    try:
        m.mount()
        for region in ("us-east-1", "eu-west-1"):
            (m.path / region).mkdir()
        image = random_image(tmp_path / "disk.img", 16 * MiB)
        run("cp", image, m.path / "us-east-1" / "disk.img")
        shown = read_pty(
            [*map(str, SNAPFS), "copy", str(m.path / "us-east-1" / "disk.img"),
             str(m.path / "eu-west-1"), "--wait"],
            60,
        )  # fmt: skip
        frames = [f for f in re.split(r"[\r\n]+", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown))
                  if "disk.img" in f]  # fmt: skip
        assert len(frames) >= 3, shown  # it moved while the copy ran
        last = frames[-1]
        assert "100.0%" in last and "16.0 MiB/16.0 MiB" in last, last
        rate = re.search(r"(\d+\.\d) MiB/s", last)
        assert rate and 2 <= float(rate.group(1)) <= 16, last  # ~8 MiB/s, the limit
        assert "?" not in last and "done" in last
        assert any("ETA" in f for f in frames[:-1]), frames
    finally:
        m.teardown()


def test_metrics_in_the_prometheus_text_format(mnt: SnapfsMount, tmp_path: Path) -> None:
    (mnt.path / "us-east-1").mkdir()
    run("cp", random_image(tmp_path / "disk.img", 1 * MiB), mnt.path / "us-east-1" / "a.img")
    text = snapfs("status", "--store", mnt.store, "--metrics").stdout
    assert f'snapfs_info{{version="{__version__}"' in text
    assert "snapfs_up 1" in text
    assert 'snapfs_snapshots{region="us-east-1",status="available"} 1' in text
    assert 'snapfs_copies_running{region="us-east-1"} 0' in text
    assert re.search(r"^snapfs_store_free_bytes \d+$", text, re.M)
    for line in text.splitlines():  # every sample line: NAME{LABELS} VALUE
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? [0-9.e+]+", line), line


def test_status_watch_redraws_the_copies_until_none_is_left(tmp_path: Path) -> None:
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt", extra_args=("--copy-bwlimit", "8M"))
    try:
        m.mount()
        for region in ("us-east-1", "eu-west-1"):
            (m.path / region).mkdir()
        run("cp", random_image(tmp_path / "disk.img", 16 * MiB), m.path / "us-east-1" / "a.img")
        snapfs("copy", m.path / "us-east-1" / "a.img", m.path / "eu-west-1" / "moved")
        shown = read_pty([*map(str, SNAPFS), "status", "--store", str(m.store), "--watch",
                          "0.3"], 60)  # fmt: skip
        plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)
        percents = {float(p) for p in re.findall(r"copying\s+│?\s*(\d+\.\d)%", plain)}
        assert len(percents) >= 2, plain  # redrawn as the copy moved
        assert plain.rstrip().endswith("no copy running or queued")
        assert os.getxattr(m.path / "eu-west-1" / "moved", "user.snapfs.status") == b"available"
    finally:
        m.teardown()
