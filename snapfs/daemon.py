"""The mount daemon: opens the store, mounts, serves FUSE requests until unmounted.

`snapfs mount` without `--foreground` starts this same code in a new session and waits on a
pipe for one line: `ok` once the mount is ready, or the error that stopped it. The daemon
stops cleanly on `snapfs umount`, `fusermount3 -u`, SIGTERM, SIGINT or SIGHUP: pending
writes are stored, the index is closed and the store marked clean.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import logging.handlers
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from snapfs import __version__, durable, faults
from snapfs.errors import MountPointInUse, MountPointNotFound, SnapfsError, from_sqlite, restated
from snapfs.fuse import mounts
from snapfs.fuse.operations import Operations
from snapfs.service.store import DEFAULT_SETTLE, Store
from snapfs.stalls import instruments_from_env

log = logging.getLogger("snapfs")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Block buffers (512 KiB) come from the heap and freed ones are reused, not handed back:
# see tame_malloc.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(store_path: Path, *, to_stderr: bool, debug: bool = False) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # The log lives in the store: when its disk is full a line is lost, not turned into a
    # traceback on stderr (which is on the same disk).
    logging.raiseExceptions = False
    durable.make_dirs(store_path)
    handler = logging.handlers.RotatingFileHandler(
        store_path / "snapfs.log", maxBytes=32 << 20, backupCount=3
    )
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    if to_stderr:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(stream)


def tame_malloc() -> None:
    """Keep the daemon's memory flat whatever the image size, and its buffers warm.

    Block buffers are ~512 KiB and short-lived, allocated in one thread and freed in
    another. With glibc's default of one heap per worker thread they fragment and peak RSS
    grew with the image size (191 MiB for 512 MiB, 245 MiB for 2 GiB). One shared heap
    stays at ~140 MiB for both and is as fast (the GIL serialises allocation anyway).

    glibc also mmaps each buffer of 512 KiB or more, or trims the heap's top once 1 MiB of it
    is free, and this VM hands freed pages back to the host: every decoded block then
    page-faults 128 fresh pages, which made a 512 KiB LZ4 decode take 500 µs instead of 125
    (issue 15, measured). A fixed mmap threshold above the block size and a trim threshold
    of 128 MiB keep freed buffers in the heap for the next block. (A *low* fixed threshold,
    tried before, made every buffer an mmap and cost a third of the ingest.)
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, 1)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        pass


def fuse_options(store_path: Path, allow_other: bool) -> set[str]:
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    # df and the mount table show the store; option syntax cannot carry a comma in it.
    source = str(store_path) if "," not in str(store_path) else "snapfs"
    options.add(f"fsname={source}")
    options.add("subtype=snapfs")
    if allow_other:
        options.add("allow_other")
    return options


# Read-ahead of the mount's backing device, for sealed snapshots read through the page cache.
# Measured here (2 GiB image, cold `dd bs=1M`, memory in use): 615 MB/s at the kernel's
# 128 KiB, 1238 at 1 MiB, 1254 at 4 MiB, no better at 16 MiB; fusectl's max_background
# (12, 4 or 64) made no difference, so it is left alone. pyfuse3 cannot set
# max_readahead, so the bdi's sysfs file it is.
READ_AHEAD_KB = 4096


def tune_read_ahead(mountpoint: Path) -> None:
    """Raise the mount's read-ahead (root only; a refusal leaves the kernel's default,
    which only reads slower)."""
    # Not os.stat(): that would be a request to this daemon, which is answering INIT.
    device = mounts.mount_device(mountpoint)
    if device is None:
        return
    path = Path(f"/sys/class/bdi/{device[0]}:{device[1]}/read_ahead_kb")
    try:
        path.write_text(f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log.info("could not set %s (%s); reads use the kernel's read-ahead", path, exc.strerror)
        return
    log.info("read-ahead of the mount set to %d KiB (%s)", READ_AHEAD_KB, path)


def notify_systemd(state: str) -> None:
    """sd_notify(3) without libsystemd: a datagram to $NOTIFY_SOCKET, which systemd sets for
    a `Type=notify` unit (scripts/snapfs@.service). READY=1 once the mount answers, so
    units ordered after this one start on a working mount; STOPPING=1 on SIGTERM. Nothing
    when the variable is unset."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", address, exc)


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s, unmounting", signal.Signals(signum).name)
            notify_systemd("STOPPING=1")
            pyfuse3.terminate()
            return


async def serve(
    store: Store, mountpoint: Path, options: set[str], ready: Callable[[], None]
) -> None:
    await store.recover()
    async with trio.open_nursery() as nursery:
        store.start(nursery)
        # After INIT: its answer sets the read-ahead the kernel then uses.
        operations = Operations(store, nursery, on_init=lambda: tune_read_ahead(mountpoint))
        pyfuse3.init(operations, str(mountpoint), options)
        log.info("mounted %s on %s (pid %d)", store.path, mountpoint, os.getpid())
        try:
            mounts.register(mountpoint, store.path)
            ready()
            notify_systemd(f"READY=1\nSTATUS=serving {store.path} on {mountpoint}")
            nursery.start_soon(_stop_on_signal, name="signals")
            await pyfuse3.main()
        finally:
            operations.read_around.stop()  # before close: it uses the session
            pyfuse3.close(unmount=True)
            mounts.unregister(mountpoint)
            log.info("unmounted %s", mountpoint)
        await store.shutdown()
        nursery.cancel_scope.cancel()


def open_store(
    store_path: Path,
    block_size: int | None,
    copy_bandwidth_limit: int | None,
    settle: float | None = None,
) -> Store:
    """The store, or a SnapfsError (a damaged or full catalogue is a refusal, not a crash)."""
    try:
        return Store(
            store_path,
            block_size=block_size,
            copy_bandwidth_limit=copy_bandwidth_limit,
            settle=DEFAULT_SETTLE if settle is None else settle,
        )
    except sqlite3.Error as exc:
        error = from_sqlite(exc)
        if error is None:
            raise
        raise restated(error, f"store {store_path}: {error.message}") from None


def run(
    mountpoint: Path,
    store_path: Path,
    *,
    allow_other: bool = False,
    to_stderr: bool = True,
    ready_fd: int | None = None,
    block_size: int | None = None,
    copy_bandwidth_limit: int | None = None,
    settle: float | None = None,
    debug: bool = False,
) -> int:
    """Run the daemon in this process; returns the exit status."""

    def report(line: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, (line + "\n").encode())
                os.close(ready_fd)
            except OSError:
                pass

    setup_logging(store_path, to_stderr=to_stderr, debug=debug)
    log.info("snapfs %s starting (pid %d, python %s, pyfuse3 %s)", __version__, os.getpid(),
             sys.version.split()[0], pyfuse3.__version__)  # fmt: skip
    tame_malloc()
    mountpoint = Path(os.path.abspath(mountpoint))
    try:
        faults.check_configuration()
        if mounts.clear_stale_mount(mountpoint):
            log.warning("cleared a stale mount left at %s by a daemon that died", mountpoint)
        if mounts.mount_fstype(mountpoint) is not None:
            raise MountPointInUse(f"{mountpoint} is already a mountpoint")
        if not mountpoint.is_dir():
            raise MountPointNotFound(f"mountpoint {mountpoint} is not a directory")
        store = open_store(store_path, block_size, copy_bandwidth_limit, settle)
    except SnapfsError as exc:
        log.error("%s", exc)
        report(f"error {exc}")
        return 1
    if not store.was_clean:
        log.warning("store %s was not closed cleanly; recovering", store.path)
    clean = False
    try:
        options = fuse_options(store.path, allow_other)
        trio.run(
            serve, store, mountpoint, options, lambda: report("ok"),
            instruments=instruments_from_env(),
        )  # fmt: skip
        clean = True
    except Exception as exc:
        log.exception("daemon failed")
        report(f"error InternalError: {exc}")
        return 1
    finally:
        store.close(clean=clean)
        log.info("store %s closed%s", store.path, "" if clean else " (not cleanly)")
    return 0
