"""Bandwidth pacing: the one throttle behind `snapfs mount --copy-bwlimit`.

Both ways a snapshot is copied honour the limit: a copy job (`mv`, or the `copy` xattr)
paces its block batches, and a `cp` into a region paces the writes of its copy. Both use a
`Pacer`, so the two cannot drift apart in what the limit means: bytes per second over the
copy's life, with at most `burst` seconds of unused time carried forward (a copy that was
slowed by something else may catch up by that much, not more).
"""

from __future__ import annotations

import trio


class Pacer:
    """Holds a stream of bytes to `rate` bytes a second; no limit when `rate` is falsy."""

    def __init__(self, rate: int | None, *, burst: float = 0.25):
        self.rate = rate or None
        self.burst = burst
        self._due: float | None = None  # when the bytes passed so far may all have gone

    async def pace(self, nbytes: int) -> None:
        """`nbytes` went (or are about to): sleep until the rate allows them."""
        if self.rate is None:
            return
        now = trio.current_time()
        due = now - self.burst if self._due is None else max(self._due, now - self.burst)
        self._due = due + nbytes / self.rate
        await trio.sleep_until(self._due)
