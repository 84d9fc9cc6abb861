"""Where snapfs is mounted: the kernel's mount table, stale mounts, and the mount registry.

The registry is one small JSON file per mountpoint in the runtime directory, written by the
daemon once the mount is ready and removed when it exits. It tells `snapfs umount` which
process to wait for and `snapfs status PATH` which store a mount serves.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from snapfs import durable

FSTYPE = "fuse.snapfs"


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "snapfs" if base else Path(f"/tmp/snapfs-{os.getuid()}")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mountinfo(path: Path) -> tuple[str, str] | None:
    """(device "MAJOR:MINOR", filesystem type) of what is mounted exactly at `path`, read
    from the mount table: no request reaches the filesystem itself."""
    target = os.path.abspath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and _unescape(fields[4]) == target:
                found = (fields[2], right.split()[0])  # the last mount on a path is visible
    return found


def mount_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at `path`, or None if nothing is."""
    found = _mountinfo(path)
    return None if found is None else found[1]


def mount_device(path: Path) -> tuple[int, int] | None:
    """(major, minor) of the device mounted exactly at `path`, or None."""
    found = _mountinfo(path)
    if found is None:
        return None
    major, _, minor = found[0].partition(":")
    return int(major), int(minor)


def is_stale(path: Path) -> bool:
    """A FUSE mount whose daemon is gone answers ENOTCONN to every request.

    statvfs() always reaches the daemon; stat() may be answered from the kernel's cache.
    """
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def fusermount_unmount(path: Path, *, lazy: bool = False) -> subprocess.CompletedProcess:
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(path)]
    return subprocess.run(args, capture_output=True, text=True)


def clear_stale_mount(path: Path) -> bool:
    """Unmount a dead FUSE mount left at `path` by a killed daemon; True if there was one."""
    if mount_fstype(path) is None or not is_stale(path):
        return False
    result = fusermount_unmount(path, lazy=True)
    if result.returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
    return True


@dataclass(frozen=True)
class MountRecord:
    mountpoint: str
    store: str
    pid: int

    @property
    def alive(self) -> bool:
        return pid_alive(self.pid)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def _record_path(mountpoint: Path) -> Path:
    key = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:24]
    return runtime_dir() / f"mount-{key}.json"


def register(mountpoint: Path, store: Path) -> None:
    record = {"mountpoint": os.path.abspath(mountpoint), "store": str(store), "pid": os.getpid()}
    path = _record_path(mountpoint)
    durable.write_file(path, json.dumps(record).encode())


def unregister(mountpoint: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        _record_path(mountpoint).unlink()


def lookup(mountpoint: Path) -> MountRecord | None:
    try:
        data = json.loads(_record_path(mountpoint).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return MountRecord(data["mountpoint"], data["store"], int(data["pid"]))


def find_by_store(store: Path) -> MountRecord | None:
    """The live mount serving `store`, if any (for commands that must go through it)."""
    wanted = str(Path(store).resolve())
    return next((record for record in live_mounts() if record.store == wanted), None)


def live_mounts() -> list[MountRecord]:
    """Every snapfs mount whose daemon runs, by mountpoint."""
    records = []
    for path in sorted(runtime_dir().glob("mount-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        record = MountRecord(data["mountpoint"], data["store"], int(data["pid"]))
        if record.alive:
            records.append(record)
    return sorted(records, key=lambda r: r.mountpoint)


def find_mount_root(path: Path) -> tuple[MountRecord, list[str]] | None:
    """The registered snapfs mount containing `path`, and the parts of `path` below it."""
    current = Path(os.path.abspath(path))
    rest: list[str] = []
    while True:
        record = lookup(current)
        if record is not None and record.alive:
            return record, list(reversed(rest))
        if current.parent == current:
            return None
        rest.append(current.name)
        current = current.parent
