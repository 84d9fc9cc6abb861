"""Storage backends: where a region's block objects live.

A backend stores opaque objects under string keys (the hex block id). It knows nothing of
blocks, snapshots or the index, so a region can move to another disk or, later, to an object
store by swapping the backend. All methods block; callers run them in worker threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import StoreFull

log = logging.getLogger(__name__)

# Room kept free on the store's filesystem when writing block objects: 1% of it, at least
# 1 MiB and at most 64 MiB. New blocks are refused (ENOSPC) before the disk is quite full,
# so that the index can still commit what was written, seal snapshots, record failures and
# delete snapshots (SQLite needs room in its WAL even to delete): a full store stays
# manageable, and nothing already stored is lost.
RESERVE_SHARE = 0.01
RESERVE_MIN = 1 << 20
RESERVE_MAX = 64 << 20


def space_reserve(path: Path) -> int:
    st = os.statvfs(path)
    return int(min(RESERVE_MAX, max(RESERVE_MIN, st.f_blocks * st.f_frsize * RESERVE_SHARE)))


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def syncfs(path: Path) -> None:
    """Flush every dirty page and inode of the filesystem holding `path` to stable storage.

    One syncfs() per batch replaces one fsync() per block file and per new directory: block
    files are written without syncing, then the whole batch is made durable before the index
    rows that point at it commit.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


class LocalBackend:
    """Block objects as files under `root`, fanned out as `ab/cd/abcd...` by key."""

    TMP_SUFFIX = ".tmp"

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.reserve = space_reserve(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key[2:4] / key

    def put(self, key: str, data: bytes) -> None:
        """Store an object atomically (temp file + rename); durable after the next sync()."""
        path = self._path(key)
        tmp = path.with_name(path.name + self.TMP_SUFFIX)
        if free_bytes(self.root) < len(data) + self.reserve:
            raise StoreFull(
                f"no space left in the block store at {self.root} (the last "
                f"{self.reserve >> 20} MiB are kept for the index)"
            )
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left in the block store at {self.root}") from exc
            raise

    def get(self, key: str) -> bytes:
        with open(self._path(key), "rb") as f:
            return f.read()

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def keys(self) -> Iterator[str]:
        """Every stored object key; leftover temp files of an interrupted put are removed."""
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.endswith(self.TMP_SUFFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(dirpath, name))
                    continue
                yield name

    def sync(self) -> None:
        syncfs(self.root)

    def destroy(self) -> None:
        """Remove every object and the root itself (the region is being deleted)."""
        for dirpath, dirs, files in os.walk(self.root, topdown=False):
            for name in files:
                os.unlink(os.path.join(dirpath, name))
            for name in dirs:
                os.rmdir(os.path.join(dirpath, name))
        with contextlib.suppress(FileNotFoundError):
            self.root.rmdir()
