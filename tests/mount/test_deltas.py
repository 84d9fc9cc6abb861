"""Scattered 4 KiB page changes cost what they changed (issue 16): a day-2 image stored,
moved and copied as deltas over day 1's blocks, read back exactly, its bases kept while a
delta needs them, and a damaged base is EIO and named by `snapfs check`."""

from __future__ import annotations

import errno
import os
import random
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from ..conftest import SnapfsMount, StoredObject, encrypt_region, gc_settled, sha256, wait_for

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4 * KiB


def status(path: Path) -> str:
    return os.getxattr(path, "user.snapfs.status").decode()


def transferred(path: Path) -> int:
    return int(os.getxattr(path, "user.snapfs.transferred_bytes"))


def day_images(tmp_path: Path, size: int = 8 * MiB, pages: int = 48) -> tuple[Path, Path, int]:
    """Day 1 (random, so nothing compresses) and day 2: `pages` scattered 4 KiB pages of
    it rewritten, some in runs. Returns both and the bytes changed."""
    rng = random.Random(16)
    day1, day2 = tmp_path / "day1.img", tmp_path / "day2.img"
    data = bytearray(rng.randbytes(size))
    day1.write_bytes(data)
    changed: set[int] = set()
    while len(changed) < pages:
        first = rng.randrange(size // PAGE)
        changed.update(range(first, min(first + rng.choice([1, 1, 2, 4]), size // PAGE)))
    for page in changed:
        data[page * PAGE : (page + 1) * PAGE] = rng.randbytes(PAGE)
    day2.write_bytes(data)
    return day1, day2, len(changed) * PAGE


def stored_bytes(m: SnapfsMount, region: str) -> int:
    return m.region_status(region)["totals"]["stored_bytes"]


def ingest(image: Path, dst: Path) -> None:
    shutil.copyfile(image, dst)
    assert status(dst) == "available"


def delta_rows(m: SnapfsMount, region: str) -> int:
    db = sqlite3.connect(f"file:{m.store / 'regions' / region / 'index.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM blocks WHERE base_id IS NOT NULL").fetchone()[0]
    finally:
        db.close()


def test_scattered_pages_are_stored_moved_and_copied_as_what_changed(
    mnt: SnapfsMount, tmp_path: Path
) -> None:
    day1, day2, changed = day_images(tmp_path)
    a, b, c = (mnt.path / name for name in ("us-east-1", "eu-west-1", "ap-south-1"))
    for region in (a, b, c):
        region.mkdir()
    ingest(day1, a / "day1.img")
    before = stored_bytes(mnt, a.name)
    ingest(day2, a / "day2.img")
    added = stored_bytes(mnt, a.name) - before
    assert delta_rows(mnt, a.name) > 0
    assert added <= 2 * changed, (added, changed)
    assert sha256(a / "day2.img") == sha256(day2)
    # Random reads of a delta block: over the base's frames, exact.
    with open(a / "day2.img", "rb") as f, open(day2, "rb") as want:
        for offset in random.Random(3).sample(range(0, day2.stat().st_size, PAGE), 64):
            assert os.pread(f.fileno(), PAGE, offset) == os.pread(want.fileno(), PAGE, offset)

    # mv into a region that has day 1: the deltas move as they are.
    os.system(f"cp {a / 'day1.img'} {b}/")  # noqa: S605 - a cp copy of day 1 first
    assert status(b / "day1.img") == "available"
    os.rename(a / "day2.img", b / "day2.img")
    assert wait_for(lambda: status(b / "day2.img") == "available", 30)
    assert transferred(b / "day2.img") <= 2 * changed
    assert sha256(b / "day2.img") == sha256(day2)

    # cp into a region that has day 1: the same, through the kernel.
    os.system(f"cp {a / 'day1.img'} {c}/")  # noqa: S605
    shutil.copyfile(b / "day2.img", c / "day2.img")
    assert status(c / "day2.img") == "available"
    assert transferred(c / "day2.img") <= 2 * changed
    assert sha256(c / "day2.img") == sha256(day2)

    # Deleting the snapshot that brought the bases in keeps them for the deltas.
    for region in (a, b, c):
        (region / "day1.img").unlink()
    for region in (a, b, c):
        assert wait_for(lambda region=region: gc_settled(mnt.store, region.name), 30)
    assert not (a / "day2.img").exists()
    for region in (b, c):
        assert sha256(region / "day2.img") == sha256(day2)
    mnt.umount()
    code, report = mnt.check()
    assert code == 0, report
    mnt.mount()
    assert sha256(b / "day2.img") == sha256(day2)

    # The last delta gone, its bases go too.
    (b / "day2.img").unlink()
    assert wait_for(lambda: gc_settled(mnt.store, b.name), 30)
    assert mnt.region_status(b.name)["totals"]["stored_bytes"] == 0


def test_deltas_off_stores_blocks_whole(mnt: SnapfsMount, tmp_path: Path) -> None:
    day1, day2, changed = day_images(tmp_path)
    region = mnt.path / "us-east-1"
    region.mkdir()
    os.setxattr(region, "user.snapfs.deltas", b"off")
    assert os.getxattr(region, "user.snapfs.deltas") == b"off"
    ingest(day1, region / "day1.img")
    before = stored_bytes(mnt, region.name)
    ingest(day2, region / "day2.img")
    assert stored_bytes(mnt, region.name) - before > 10 * changed
    assert delta_rows(mnt, region.name) == 0
    with pytest.raises(OSError) as refused:
        os.setxattr(region, "user.snapfs.deltas", b"maybe")
    assert refused.value.errno == errno.EINVAL


def test_encrypted_deltas_are_stored_and_move_re_encrypted(
    mnt: SnapfsMount, tmp_path: Path
) -> None:
    day1, day2, changed = day_images(tmp_path)
    a, b = mnt.path / "us-east-1", mnt.path / "eu-west-1"
    for region in (a, b):
        region.mkdir()
    encrypt_region(mnt, a)
    encrypt_region(mnt, b)  # keys are regional: the copy re-encrypts under b's
    ingest(day1, a / "day1.img")
    before = stored_bytes(mnt, a.name)
    ingest(day2, a / "day2.img")
    assert stored_bytes(mnt, a.name) - before <= 2 * changed
    os.rename(a / "day1.img", b / "day1.img")
    assert wait_for(lambda: status(b / "day1.img") == "available", 30)
    os.rename(a / "day2.img", b / "day2.img")
    assert wait_for(lambda: status(b / "day2.img") == "available", 30)
    assert transferred(b / "day2.img") <= 2 * changed
    assert sha256(b / "day2.img") == sha256(day2)


def a_delta_unmounted(
    mnt: SnapfsMount, tmp_path: Path, pages: int
) -> tuple[Path, Path, Path, bytes, bytes, int]:
    """Day 1 and day 2 (`pages` changed) ingested, then the store unmounted: the images,
    the region, one of day 2's delta blocks, its base, and its block number."""
    day1, day2, _ = day_images(tmp_path, pages=pages)
    region = mnt.path / "us-east-1"
    region.mkdir()
    ingest(day1, region / "day1.img")
    ingest(day2, region / "day2.img")
    mnt.umount()
    db = sqlite3.connect(mnt.store / "regions" / region.name / "index.db")
    try:
        delta_id, base_id = db.execute(
            "SELECT id, base_id FROM blocks WHERE base_id IS NOT NULL LIMIT 1"
        ).fetchone()
        (block_no,) = db.execute(
            "SELECT m.block_no FROM snapshot_blocks m JOIN snapshots s ON s.id = m.snapshot_id "
            "WHERE s.name = 'day2.img' AND m.block_id = ?",
            [delta_id],
        ).fetchone()
    finally:
        db.close()
    return day1, day2, region, delta_id, base_id, block_no


def test_a_damaged_base_reads_as_eio_and_check_names_both(
    mnt: SnapfsMount, tmp_path: Path
) -> None:
    day1, day2, region, delta_id, base_id, block_no = a_delta_unmounted(mnt, tmp_path, 4)
    directory = mnt.store / "regions" / region.name
    base = StoredObject(base_id.hex(), directory / "blocks")
    data = bytearray(base.read_bytes())
    data[len(data) // 2] ^= 0x40
    base.write_bytes(bytes(data))
    code, report = mnt.check()
    assert code == 1
    found = next(r for r in report["regions"] if r["name"] == region.name)
    assert {"block": delta_id.hex(), "base": base_id.hex(), "problem": "corrupt"} in found[
        "bad_bases"
    ]
    assert base_id.hex() in found["corrupt"]
    damaged = {d["name"] for d in found["damaged_snapshots"]}
    assert damaged == {"day1.img", "day2.img"}
    mnt.mount()
    bs = 512 * KiB
    with open(region / "day2.img", "rb") as f:
        with pytest.raises(OSError) as failed:
            os.pread(f.fileno(), bs, block_no * bs)
        assert failed.value.errno == errno.EIO
        other = (block_no + 1) % (day2.stat().st_size // bs)  # over an intact base
        assert os.pread(f.fileno(), bs, other * bs) == day2.read_bytes()[other * bs :][:bs]


def test_pages_written_into_free_space_are_deltas_over_zeros(
    mnt: SnapfsMount, tmp_path: Path
) -> None:
    """A disk image is mostly free space: pages a filesystem writes into a block that was a
    hole in day 1 are a delta over the zero block, so they transfer as what they are too."""
    from snapfs.cli import diskimage

    rng = random.Random(5)
    day1, day2 = tmp_path / "day1.img", tmp_path / "day2.img"
    diskimage.create(day1, 8 * MiB, seed=4, zeros=0.6)
    data = bytearray(day1.read_bytes())
    holes = [n for n in range(16) if not any(data[n * 512 * KiB : (n + 1) * 512 * KiB])]
    assert holes
    pages = [hole * 128 + rng.randrange(128) for hole in holes]
    for page in pages:
        data[page * PAGE : (page + 1) * PAGE] = rng.randbytes(PAGE)
    day2.write_bytes(data)
    changed = len(pages) * PAGE
    a, b = mnt.path / "us-east-1", mnt.path / "eu-west-1"
    for region in (a, b):
        region.mkdir()
    ingest(day1, a / "day1.img")
    ingest(day2, a / "day2.img")
    os.rename(a / "day1.img", b / "day1.img")
    assert wait_for(lambda: status(b / "day1.img") == "available", 30)
    os.rename(a / "day2.img", b / "day2.img")
    assert wait_for(lambda: status(b / "day2.img") == "available", 30)
    assert transferred(b / "day2.img") <= 2 * changed, (transferred(b / "day2.img"), changed)
    assert sha256(b / "day2.img") == sha256(day2)
    mnt.umount()
    code, report = mnt.check()
    assert code == 0, report


def test_a_base_that_is_itself_a_delta_is_eio_not_a_hang(
    mnt: SnapfsMount, tmp_path: Path
) -> None:
    """A damaged (or forged) store whose delta's base was replaced by a delta over that
    very block: reading it is EIO at once, not two loads waiting on each other."""
    from snapfs.formats import codec, delta

    day1, day2, region, delta_id, base_id, block_no = a_delta_unmounted(mnt, tmp_path, 2)
    directory = mnt.store / "regions" / region.name
    bs = 512 * KiB
    base_plain = day1.read_bytes()[block_no * bs : (block_no + 1) * bs]
    block_plain = day2.read_bytes()[block_no * bs : (block_no + 1) * bs]
    pages = delta.changed_pages(base_plain, block_plain)
    forged = delta.encode(base_plain, base_id, delta_id, pages, None, region.name)
    assert codec.content_id(base_plain) == base_id
    StoredObject(base_id.hex(), directory / "blocks").write_bytes(forged.data)
    mnt.mount()
    done = subprocess.run(
        ["dd", f"if={region / 'day2.img'}", "of=/dev/null", f"bs={bs}", f"skip={block_no}",
         "count=1", "status=none"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode != 0 and "Input/output error" in done.stderr, done.stderr
