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
