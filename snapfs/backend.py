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


def object_path(root: Path, key: str) -> Path:
    """Where a local backend rooted at `root` keeps object `key` (layout 2)."""
    return root / key[:2] / key


def is_object_name(name: str) -> bool:
    """Object files and temp files of an unfinished put; not the backend's own files."""
    return not name.startswith(".")


class LocalBackend:
    """Block objects as files under `root`, fanned out by the first byte of the key:
    `ab/abcd...` (layout 2).

    Layout 1 fanned out two levels (`ab/cd/abcd...`). Creating an inode costs ~0.8 ms of
    kernel CPU on the development machine, and with 65,536 second-level directories almost
    every new object also created a directory: two inodes per block. One level keeps at
    most 256 directories, and ext4's hashed directories stay fast with millions of entries.
    A store of layout 1 is migrated when it is opened (renames only, restartable).
    """

    TMP_SUFFIX = ".tmp"
    LAYOUT = 2
    LAYOUT_FILE = ".layout"  # holds the layout number; absent before layout 2

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        if self._layout() < self.LAYOUT:
            self._migrate_from_layout_1()

    def object_path(self, key: str) -> Path:
        return object_path(self.root, key)

    def _layout(self) -> int:
        try:
            return int((self.root / self.LAYOUT_FILE).read_text())
        except FileNotFoundError:
            return 1

    def _migrate_from_layout_1(self) -> None:
        """`ab/cd/key` -> `ab/key`. Every step is a rename, so a crash midway leaves objects
        at one of the two places and the next open carries on; the layout file comes last."""
        moved = 0
        for first in os.scandir(self.root):
            if not first.is_dir(follow_symlinks=False):
                continue
            for second in os.scandir(first.path):
                if not second.is_dir(follow_symlinks=False):
                    continue
                for entry in os.scandir(second.path):
                    os.rename(entry.path, os.path.join(first.path, entry.name))
                    moved += 1
                os.rmdir(second.path)
        if moved:
            syncfs(self.root)
            log.info(
                "block objects in %s moved to layout %d: %d objects", self.root, self.LAYOUT, moved
            )
        marker = self.root / (self.LAYOUT_FILE + self.TMP_SUFFIX)
        marker.write_text(f"{self.LAYOUT}\n")
        os.rename(marker, self.root / self.LAYOUT_FILE)

    def put(self, key: str, data: bytes) -> None:
        """Store an object atomically (temp file + rename); durable after the next sync()."""
        path = self.object_path(key)
        tmp = path.with_name(path.name + self.TMP_SUFFIX)
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
        with open(self.object_path(key), "rb") as f:
            return f.read()

    def exists(self, key: str) -> bool:
        return self.object_path(key).exists()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.object_path(key).unlink()

    def keys(self) -> Iterator[str]:
        """Every stored object key; leftover temp files of an interrupted put are removed."""
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not is_object_name(name):
                    continue
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
