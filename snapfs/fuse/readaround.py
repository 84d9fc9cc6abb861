"""Read-around: a decoded frame around a small read goes into the kernel's page cache.

A random 4 KiB miss of a sealed snapshot makes the daemon decode the 64 KiB frame that
holds it (formats/codec.py). The kernel asked for one page; the other fifteen are decoded
already, and a reader with any locality (a filesystem's metadata inside a loop-mounted
image, a database's neighbouring pages) would ask for them next, each as its own FUSE
request. `pyfuse3.notify_store` puts them in the page cache instead. Sealed snapshots never
change and their inode numbers are per snapshot id, so stored pages are never stale.

Why a thread of its own, and never the trio loop or a block worker: the kernel stores each
page under its page lock. A page the kernel is reading at that moment stays locked until
the daemon answers that read. On the loop thread that would wait for a reply only the loop
can send (a deadlock); on a block worker it could hold the worker the reply needs. This
thread only ever waits for the loop, which never waits for it.

The queue is bounded: when the kernel is slow to take pages, offers are dropped (the pages
are only a hint; a reader that needs them asks). `stop()` must run before the FUSE session
closes, because notify_store after that would use a freed session.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading

import pyfuse3

log = logging.getLogger(__name__)

PAGE = 4096
PENDING_MAX = 64  # offers waiting for the thread; beyond it new ones are dropped


class ReadAround:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, int, memoryview] | None] = queue.SimpleQueue()
        # Each counter has one writer (the loop offers, the thread finishes), so their
        # difference is the queue's length without a lock.
        self._offered = 0
        self._finished = 0
        self._thread: threading.Thread | None = None
        self.enabled = True
        self.stored_bytes = 0  # for tests and the log

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="snapfs-readaround", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            # A store can only wait for a read the loop no longer answers once the loop has
            # stopped; the kernel ends those requests at unmount, so do not wait forever.
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("read-around still storing pages after %.0f s; unmounting", timeout)
            self._thread = None

    def offer(self, ino: int, asked: int, answered: int, start: int, data: memoryview) -> None:
        """Store `data` (at file offset `start`) except the pages of the read just answered
        ([asked, asked + answered)): the kernel fills those from the reply itself."""
        if self._thread is None or not self.enabled:
            return
        if self._offered - self._finished >= PENDING_MAX:
            return
        end = start + len(data)
        skip_from, skip_to = asked // PAGE * PAGE, -(-(asked + answered) // PAGE) * PAGE
        for lo, hi in ((start, min(end, skip_from)), (max(start, skip_to), end)):
            if hi - lo >= PAGE or (hi == end and hi > lo):  # whole pages, or the file's tail
                self._offered += 1
                self._queue.put((ino, lo, data[lo - start : hi - start]))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            ino, offset, data = item
            try:
                # The stub says bytes; the C code takes any contiguous buffer.
                pyfuse3.notify_store(ino, offset, data)  # type: ignore[arg-type]
                self.stored_bytes += len(data)
            except OSError as exc:
                if exc.errno == errno.ENOSYS:  # a kernel without it: stop offering
                    log.info("the kernel does not take notify_store; read-around is off")
                    self.enabled = True
                elif exc.errno != errno.ENOENT:  # ENOENT: the kernel forgot the inode
                    log.debug("notify_store of inode %d failed: %s", ino, exc)
            finally:
                self._finished += 1
