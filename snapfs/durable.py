"""Making files and directory entries survive a power loss, on any filesystem.

snapfs never relies on syncfs(): on FUSE filesystems (sshfs, s3fs, rclone, mergerfs...) the
kernel forwards it only when the connection asks for it (virtiofs, fuseblk), overlayfs
mounted `volatile` ignores it, and all of them still return 0. What every POSIX filesystem
honours is fsync()/fdatasync() of the file that was written and fsync() of the directory
whose entries changed. So:

- data an index row will name is fdatasync'ed file by file before the row commits;
- a new file or directory is made durable by fsync of its parent directory;
- a small file replaced by name is written to a temp file, fsync'ed, renamed, and the
  directory fsync'ed (a rename alone can leave an empty file behind on ext4 and others).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path | str) -> None:
    """Make the entries of directory `path` (files created, renamed or removed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _fsync_directory_fd(fd)
    finally:
        os.close(fd)


def _fsync_directory_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        # A few filesystems (some FUSE ones, old NFS clients) cannot fsync a directory and
        # say so; there is nothing more we could do there, and their entries are durable
        # through their own protocol (NFS makes namespace operations synchronous).
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise


def fdatasync_path(path: Path | str) -> None:
    """fdatasync a file by name (a read-only descriptor is enough on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that after a crash it holds either its old contents
    or all of `data`, never a prefix or nothing: temp file, fsync, rename, fsync dir."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def make_dirs(path: Path, mode: int = 0o700) -> None:
    """mkdir -p, with each directory created made durable in its parent."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=mode)
        fsync_dir(directory.parent)


def sync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, and `root`'s entry in its parent: a
    tree built without syncs (a new region's folders) becomes durable as a whole."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                fdatasync_path(os.path.join(dirpath, name))
        fsync_dir(dirpath)
    fsync_dir(root.parent)
