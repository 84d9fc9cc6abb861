"""The one copy throttle: bytes per second over a copy's life, little credit carried."""

from __future__ import annotations

import trio
import trio.testing

from snapfs.pacing import Pacer


def run_virtual(fn) -> float:  # type: ignore[no-untyped-def]
    """Run `fn` on a virtual clock; the virtual seconds it took."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    took: list[float] = []

    async def main() -> None:
        start = trio.current_time()
        await fn()
        took.append(trio.current_time() - start)

    trio.run(main, clock=clock)
    return took[0]


def test_a_stream_is_held_to_the_rate() -> None:
    async def send() -> None:
        pacer = Pacer(1 << 20)  # 1 MiB/s
        for _ in range(40):
            await pacer.pace(256 << 10)  # 10 MiB in all

    took = run_virtual(send)
    assert 9.7 <= took <= 10.0, took  # the first burst (0.25 s) is free, the rest paced


def test_no_rate_means_no_wait() -> None:
    async def send() -> None:
        pacer = Pacer(None)
        for _ in range(100):
            await pacer.pace(1 << 30)

    assert run_virtual(send) == 0


def test_time_lost_elsewhere_is_caught_up_only_by_the_burst() -> None:
    async def send() -> None:
        pacer = Pacer(1 << 20, burst=0.25)
        await pacer.pace(1 << 20)  # 0.75 s
        await trio.sleep(5)  # the copy was held up elsewhere
        start = trio.current_time()
        await pacer.pace(1 << 20)  # not free: only 0.25 s of the idle time counts
        assert abs(trio.current_time() - start - 0.75) < 1e-9

    run_virtual(send)
