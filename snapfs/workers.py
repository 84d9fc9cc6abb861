"""The one way snapfs runs blocking work off the trio loop: `run_sync(fn, *args, limiter=)`.

It does what `trio.to_thread.run_sync` does for us, without what we do not use: trio's
version copies the context, builds two names and renames the worker thread (a `prctl` call
each way) for every job, which showed as 3% of the daemon's CPU in a profile of a sequential
read (issue 15), where every block is one hop. Here a job is one `start_thread_soon` on
trio's thread cache (the same threads, reused) and one `reschedule` back.

Semantics kept from trio: the limiter is held while the job runs (it is the backpressure of
every reader and writer); cancellation waits for the job to finish (a job is never
abandoned, so a block write or an fsync is never left running behind a cancelled task);
an exception in the job is raised in the caller. Worker code must not call back into trio
(`trio.from_thread`): nothing in snapfs does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")


async def run_sync(fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter) -> T:
    """`fn(*args)` in a worker thread while holding a token of `limiter`."""
    await trio.lowlevel.checkpoint_if_cancelled()
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    borrower = object()  # one token per job, even for a task with several in flight
    await limiter.acquire_on_behalf_of(borrower)
    try:

        def deliver(result: outcome.Outcome[T]) -> None:
            # If the loop is gone, nobody waits any more.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        trio.lowlevel.start_thread_soon(lambda: fn(*args), deliver)
        result: T = await trio.lowlevel.wait_task_rescheduled(
            lambda _raise_cancel: trio.lowlevel.Abort.FAILED
        )
        return result
    finally:
        limiter.release_on_behalf_of(borrower)
