"""The stall watch: a step of the trio loop that blocks it is named in the log."""

from __future__ import annotations

import logging
import time

import pytest
import trio

from snapfs import stalls


def test_stall_watch_names_the_code_that_blocks_the_loop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def blocking_call() -> None:
        time.sleep(0.15)

    async def task() -> None:
        await trio.sleep(0.05)  # a step that waits is not a stall
        blocking_call()

    monkeypatch.setenv("SNAPFS_STALL_MS", "40")
    with caplog.at_level(logging.INFO, logger="snapfs.stalls"):
        trio.run(task, instruments=stalls.instruments_from_env())
    blocked = [r.getMessage() for r in caplog.records if "loop blocked" in r.getMessage()]
    assert len(blocked) == 1 and "in blocking_call" in blocked[0], caplog.text
    assert any("loop stalled" in r.getMessage() for r in caplog.records)

    monkeypatch.setenv("SNAPFS_STALL_MS", "soon")
    assert stalls.instruments_from_env() == []


def test_batch_sizer_sizes_loop_work_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches double while quick, halve when slow, within their bounds."""
    from snapfs import stalls

    now = [0.0]
    monkeypatch.setattr(stalls.time, "perf_counter", lambda: now[0])
    sizer = stalls.BatchSizer(512, minimum=16, maximum=4096, budget=0.03)

    def batch(seconds: float) -> int:
        size = sizer.start()
        now[0] += seconds
        sizer.done()
        return size

    assert [batch(0.001) for _ in range(5)] == [512, 1024, 2048, 4096, 4096]
    assert [batch(0.1) for _ in range(10)][-1] == 16  # slow batches shrink to the minimum
    assert batch(0.02) == 16 and sizer.size == 16  # within the budget: kept
