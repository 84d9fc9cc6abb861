"""workers.run_sync: trio's thread hop without the per-job renaming, same guarantees."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from snapfs import workers


async def test_a_job_runs_off_the_loop_and_returns_or_raises() -> None:
    limiter = trio.CapacityLimiter(2)
    loop_thread = threading.get_ident()
    assert await workers.run_sync(threading.get_ident, limiter=limiter) != loop_thread
    assert await workers.run_sync(divmod, 7, 2, limiter=limiter) == (3, 1)

    def fails() -> None:
        raise ValueError("from the worker")

    with pytest.raises(ValueError, match="from the worker"):
        await workers.run_sync(fails, limiter=limiter)
    assert limiter.borrowed_tokens == 0


async def test_the_limiter_bounds_the_jobs_running_at_once() -> None:
    limiter = trio.CapacityLimiter(2)
    running = peak = 0
    lock = threading.Lock()

    def job() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(lambda: workers.run_sync(job, limiter=limiter))
    assert peak == 2


async def test_a_cancelled_caller_waits_for_its_job_to_end() -> None:
    limiter = trio.CapacityLimiter(1)
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.1)
        finished.set()

    with trio.move_on_after(0.01):
        await workers.run_sync(slow, limiter=limiter)
    assert finished.is_set()  # never abandoned: a block write is not left running
    assert limiter.borrowed_tokens == 0
