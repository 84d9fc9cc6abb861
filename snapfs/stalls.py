"""A watchdog for the trio loop: names the code that held it too long.

Every FUSE request is answered on the loop, so anything that blocks it (a slow SQLite call,
a stray synchronous read) delays every `ls` and `getfattr` on the mount. With
`SNAPFS_STALL_MS=N`, a watchdog thread looks at the loop every N/4 ms, and when one task
step has run for more than N ms it logs the step's current stack, once per stall. Off by
default: the per-step bookkeeping is cheap but not free.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

STALL_ENV = "SNAPFS_STALL_MS"


class StallWatch(trio.abc.Instrument):
    def __init__(self, threshold_ms: float):
        self.threshold = threshold_ms / 1000
        self.loop_thread = threading.get_ident()
        self.step_started: float | None = None
        self.step_task = ""
        self.reported = False
        self.stop = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="snapfs-stallwatch", daemon=True)
        self.watcher.start()

    def before_task_step(self, task: Any) -> None:
        self.step_task, self.reported = task.name, False
        self.step_started = time.perf_counter()

    def after_task_step(self, task: Any) -> None:
        started, self.step_started = self.step_started, None
        if started is not None and self.reported:
            log.warning(
                "loop stalled %.0f ms in task %s", (time.perf_counter() - started) * 1e3, task.name
            )

    def after_run(self) -> None:
        # Wait for the watcher: a stall it is still describing (formatting the stacks takes
        # a while on a busy machine) is logged before trio.run returns, not after.
        self.stop.set()
        self.watcher.join(timeout=5)

    def _watch(self) -> None:
        while not self.stop.wait(self.threshold / 4):
            started = self.step_started
            if started is None or self.reported:
                continue
            if time.perf_counter() - started > self.threshold:
                frame = sys._current_frames().get(self.loop_thread)
                if frame is None or self.step_started != started:
                    continue
                self.reported = True
                stack = "".join(traceback.format_stack(frame, limit=12))
                log.warning("loop blocked > %.0f ms in %s at:\n%s%s", self.threshold * 1e3,
                            self.step_task, stack, self._others())  # fmt: skip

    def _others(self) -> str:
        """Where every other thread is: a loop stuck in plain Python code is waiting for the
        GIL, and the thread holding it is among these."""
        lines = ["other threads:"]
        for ident, frame in sys._current_frames().items():
            if ident in (self.loop_thread, threading.get_ident()):
                continue
            where = traceback.extract_stack(frame, limit=3)
            lines.append("  " + " <- ".join(f"{f.name} ({Path(f.filename).name}:{f.lineno})"
                                           for f in reversed(where)))  # fmt: skip
        return "\n".join(lines)


def instruments_from_env() -> list[trio.abc.Instrument]:
    value = os.environ.get(STALL_ENV)
    if not value:
        return []
    try:
        threshold_ms = float(value)
    except ValueError:
        threshold_ms = 0.0
    if not threshold_ms > 0:
        log.warning("%s=%r is not a number of milliseconds; no stall watch", STALL_ENV, value)
        return []
    log.info("watching the loop for steps longer than %.0f ms", threshold_ms)
    return [StallWatch(threshold_ms)]


# Long work on the trio thread (purging a deleted snapshot's map, dropping unreferenced
# block rows) is cut into batches that each take about this long, so requests wait at most
# that between two batches whatever the machine's speed and the rows' size.
LOOP_BUDGET = 0.03  # seconds


class BatchSizer:
    """Batch sizes sized by time, not by a fixed row count: the next size doubles while a
    batch takes under half of `budget` and halves when one takes longer than `budget`."""

    def __init__(
        self,
        initial: int,
        *,
        minimum: int = 16,
        maximum: int = 1 << 16,
        budget: float = LOOP_BUDGET,
    ):
        self.size = max(minimum, min(maximum, initial))
        self.minimum, self.maximum, self.budget = minimum, maximum, budget
        self._started = 0.0

    def start(self) -> int:
        """Begin a batch: its size."""
        self._started = time.perf_counter()
        return self.size

    def done(self) -> None:
        """The batch's loop work ended: adapt the next size to how long it took."""
        took = time.perf_counter() - self._started
        if took > self.budget:
            self.size = max(self.minimum, self.size // 2)
        elif took < self.budget / 2:
            self.size = min(self.maximum, self.size * 2)
