"""Long loop work runs in steps sized by the loop budget and lets other requests in between
(issue 14): shrinking a huge map, and comparing two maps when a copy is sealed.

The maps are made large by writing index rows for one stored block directly (a million-block
disk is too slow to write here); everything else goes through the handlers. What is asserted
is that other tasks ran in the middle of the work, not how long anything took.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from snapfs.service.lifecycle import maps_equal
from snapfs.service.snapshots import Snapshot
from tests.service.test_store_service import BLOCK, CTX, Fields, served

ROWS = 60_000  # several loop-budget steps on any machine


async def ticks_during(
    work: Awaitable[object], watch: Callable[[], object] = lambda: None
) -> tuple[object, int, set[object]]:
    """Run `work` while another task counts how often it got the loop and what `watch`
    returned each time: (result, count, values seen)."""
    ticks = 0
    done = False
    result: list[object] = []
    seen: set[object] = set()

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            await trio.sleep(0)
            ticks += 1
            seen.add(watch())

    async def run() -> None:
        nonlocal done
        result.append(await work)
        done = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        nursery.start_soon(run)
    return result[0], ticks, seen


def widen(snap: Snapshot, rows: int) -> None:
    """Map blocks 1..rows-1 of `snap` to its block 0, as a huge deduplicated disk would."""
    index = snap.region.index
    block_id = index.block_id(snap.id, 0)
    assert block_id is not None
    index.commit_blocks(snap.id, [], [(n, block_id) for n in range(1, rows)], {})
    snap.size = rows * BLOCK
    snap.allocated_blocks = index.allocated_blocks(snap.id)


async def test_a_huge_shrink_lets_other_requests_in_and_keeps_the_prefix(
    tmp_path: Path,
) -> None:
    first = os.urandom(BLOCK)
    async with served(tmp_path / "store") as fs:
        region = await fs.mkdir("us-east-1")
        ino, fh = await fs.write_file(region, "disk.img", first, close=False)
        await fs.ops.flush(fh)
        snap = fs.store.by_ino[ino]
        assert isinstance(snap, Snapshot)
        widen(snap, ROWS)

        attr = await fs.ops.getattr(ino, CTX)
        attr.st_size = BLOCK + 100
        _, _, sizes = await ticks_during(
            fs.ops.setattr(ino, attr, Fields(update_size=True), fh, CTX),  # type: ignore[arg-type]
            lambda: snap.region.index.snapshot_row(snap.id)["size"],
        )
        # Other requests ran between the steps and saw the recorded size come down with
        # each (a prefix, never rows past the size).
        steps = sizes - {ROWS * BLOCK, BLOCK + 100}
        assert len(steps) >= 2, sizes
        assert snap.region.index.allocated_blocks(snap.id) == 2
        assert snap.region.index.snapshot_row(snap.id)["size"] == BLOCK + 100
        await fs.ops.release(fh)
        assert await fs.read_file(ino) == first + first[:100]


async def test_comparing_huge_maps_lets_other_requests_in(tmp_path: Path) -> None:
    content = os.urandom(BLOCK)
    async with served(tmp_path / "store") as fs:
        snaps = []
        for region_name in ("us-east-1", "eu-west-1"):
            region = await fs.mkdir(region_name)
            ino, _ = await fs.write_file(region, "disk.img", content)
            snap = fs.store.by_ino[ino]
            assert isinstance(snap, Snapshot)
            widen(snap, ROWS)
            snaps.append(snap)
        equal, ticks, _ = await ticks_during(maps_equal(snaps[0], snaps[1]))
        assert equal is True and ticks >= 3, ticks
        index = snaps[1].region.index
        index.commit_blocks(snaps[1].id, [], [(ROWS - 1, None)], {})  # the last block differs
        assert await maps_equal(snaps[0], snaps[1]) is False
