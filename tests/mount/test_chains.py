"""Maps relative to a parent (issue 17): daily `cp` snapshots, clones and incremental copies
cost index rows for what changed; deleting the oldest folds it into the next; copies keep the
chain at the destination; `snapfs diff` of relatives; `snapfs check` names a broken chain."""

from __future__ import annotations

import json
import os
import random
import sqlite3
from pathlib import Path

from ..conftest import SNAPFS, SnapfsMount, run, sha256, wait_for

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 512 * KiB  # the store's default block size


def status(path: Path) -> str:
    return os.getxattr(path, "user.snapfs.status").decode()


def snap_id(path: Path) -> str:
    return os.getxattr(path, "user.snapfs.id").decode()


def index_rows(m: SnapfsMount, region: str, sql: str, *args: object) -> list[tuple]:
    db = sqlite3.connect(f"file:{m.store / 'regions' / region / 'index.db'}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def parent_of(m: SnapfsMount, region: str, snapshot_id: str) -> str | None:
    rows = index_rows(m, region, "SELECT parent_id FROM snapshots WHERE id = ?", snapshot_id)
    return rows[0][0] if rows else None


def own_rows(m: SnapfsMount, region: str, snapshot_id: str) -> int:
    ((count,),) = index_rows(
        m, region,
        "SELECT count(*) FROM snapshot_blocks WHERE snapshot_id = "
        "(SELECT coalesce(map_id, id) FROM snapshots WHERE id = ?)", snapshot_id,
    )  # fmt: skip
    return count


def gone(m: SnapfsMount, region: str, snapshot_id: str) -> bool:
    return not index_rows(m, region, "SELECT 1 FROM snapshots WHERE id = ?", snapshot_id)


def days(tmp_path: Path, count: int, size: int = 8 * MiB) -> list[Path]:
    """Images of one disk on `count` days, each with three 4 KiB pages rewritten."""
    rng = random.Random(7)
    data = bytearray(rng.randbytes(size))
    out = []
    for day in range(count):
        if day:
            for _ in range(3):
                page = rng.randrange(size // (4 * KiB))
                data[page * 4 * KiB : (page + 1) * 4 * KiB] = rng.randbytes(4 * KiB)
        path = tmp_path / f"day{day + 1}.img"
        path.write_bytes(data)
        out.append(path)
    return out


def chain_in_two_regions(
    mnt: SnapfsMount, tmp_path: Path, count: int
) -> tuple[Path, Path, list[Path]]:
    """Regions us-east-1 (with `count` days of one disk `cp`'d in, sealed) and eu-west-1."""
    src, dst = mnt.path / "us-east-1", mnt.path / "eu-west-1"
    src.mkdir()
    dst.mkdir()
    images = days(tmp_path, count)
    for image in images:
        run("cp", image, src / image.name)
        assert status(src / image.name) == "available"
    return src, dst, images


def test_daily_cp_snapshots_keep_only_what_changed_and_the_oldest_folds(
    mnt: SnapfsMount, tmp_path: Path
) -> None:
    region = mnt.path / "us-east-1"
    region.mkdir()
    images = days(tmp_path, 3)
    for image in images:
        run("cp", image, region / image.name)
        assert status(region / image.name) == "available"
    ids = [snap_id(region / i.name) for i in images]
    # Made relative to the day before in the background, once sealed.
    assert wait_for(lambda: parent_of(mnt, "us-east-1", ids[2]) == ids[1], 20), mnt.log()
    assert parent_of(mnt, "us-east-1", ids[1]) == ids[0]
    assert own_rows(mnt, "us-east-1", ids[0]) == 16
    assert own_rows(mnt, "us-east-1", ids[1]) <= 3 and own_rows(mnt, "us-east-1", ids[2]) <= 3
    for image in images:
        assert sha256(region / image.name) == sha256(image)

    # The oldest goes: day 2's few rows are merged into its map, which day 2 takes over.
    (region / "day1.img").unlink()
    assert wait_for(lambda: gone(mnt, "us-east-1", ids[0]), 20), mnt.log()
    assert parent_of(mnt, "us-east-1", ids[1]) is None and own_rows(mnt, "us-east-1", ids[1]) == 16
    assert parent_of(mnt, "us-east-1", ids[2]) == ids[1]
    # The middle one goes: its rows fold into day 3.
    (region / "day2.img").unlink()
    assert wait_for(lambda: gone(mnt, "us-east-1", ids[1]), 20), mnt.log()
    assert parent_of(mnt, "us-east-1", ids[2]) is None
    assert sha256(region / "day3.img") == sha256(images[2])
    mnt.remount()
    assert sha256(region / "day3.img") == sha256(images[2])
    mnt.umount()
    code, report = mnt.check()
    assert code == 0, report


def test_an_incremental_copy_walks_what_changed_and_keeps_the_chain(
    mnt: SnapfsMount, tmp_path: Path
) -> None:
    src, dst, images = chain_in_two_regions(mnt, tmp_path, 2)
    day1, day2 = (snap_id(src / i.name) for i in images)
    assert wait_for(lambda: parent_of(mnt, "us-east-1", day2) == day1, 20), mnt.log()

    run("mv", src / "day1.img", dst / "day1.img")
    assert wait_for(lambda: status(dst / "day1.img") == "available", 20)
    run(*SNAPFS, "copy", src / "day2.img", dst / "day2", "--wait")
    assert status(dst / "day2") == "available"
    copy1, copy2 = snap_id(dst / "day1.img"), snap_id(dst / "day2")
    assert parent_of(mnt, "eu-west-1", copy2) == copy1  # the chain is kept at the destination
    assert own_rows(mnt, "eu-west-1", copy2) <= 3
    # day 1's move folded it into day 2, so the copy found day 1's copy by lineage and
    # compared the maps.
    assert "blocks to compare" in mnt.log()
    transferred = int(os.getxattr(dst / "day2", "user.snapfs.transferred_bytes"))
    assert transferred <= 3 * BLOCK
    assert sha256(dst / "day2") == sha256(images[1])

    diff = json.loads(
        run(*SNAPFS, "diff", dst / "day1.img", dst / "day2", "--json").stdout
    )
    want = {
        (no * BLOCK) for no in range(16)
        if images[0].read_bytes()[no * BLOCK : (no + 1) * BLOCK]
        != images[1].read_bytes()[no * BLOCK : (no + 1) * BLOCK]
    }  # fmt: skip
    starts = {r["offset"] + k for r in diff["ranges"] for k in range(0, r["length"], BLOCK)}
    assert starts == want
    mnt.umount()
    code, report = mnt.check()
    assert code == 0, report


def test_a_copy_of_a_chained_snapshot_walks_only_the_rows_since_its_copied_ancestor(
    mnt: SnapfsMount, tmp_path: Path
) -> None:
    src, dst, images = chain_in_two_regions(mnt, tmp_path, 3)
    ids = [snap_id(src / i.name) for i in images]
    assert wait_for(lambda: parent_of(mnt, "us-east-1", ids[2]) == ids[1], 20), mnt.log()
    run(*SNAPFS, "copy", src / "day1.img", dst / "day1", "--wait")
    # day 2 goes from the source region: day 3 is now relative to day 1, with day 2's rows.
    (src / "day2.img").unlink()
    assert wait_for(lambda: gone(mnt, "us-east-1", ids[1]), 20), mnt.log()
    assert parent_of(mnt, "us-east-1", ids[2]) == ids[0]
    run(*SNAPFS, "copy", src / "day3.img", dst / "day3", "--wait")
    assert "blocks to walk" in mnt.log()
    assert parent_of(mnt, "eu-west-1", snap_id(dst / "day3")) == snap_id(dst / "day1")
    assert sha256(dst / "day3") == sha256(images[2])
    assert sha256(dst / "day1") == sha256(images[0])
    mnt.umount()
    code, report = mnt.check()
    assert code == 0, report


def test_deleting_a_parent_of_two_clones_folds_into_both(
    mnt: SnapfsMount, tmp_path: Path
) -> None:
    region = mnt.path / "us-east-1"
    region.mkdir()
    (image,) = days(tmp_path, 1)
    run("cp", image, region / "base.img")
    assert status(region / "base.img") == "available"
    expected = {}
    for name, offset in (("a.img", 0), ("b.img", 5 * MiB + 4 * KiB)):
        run(*SNAPFS, "clone", region / "base.img", region / name)
        with open(region / name, "r+b") as f:
            f.seek(offset)
            f.write(b"x" * 4096)
        data = bytearray(image.read_bytes())
        data[offset : offset + 4096] = b"x" * 4096
        (tmp_path / name).write_bytes(data)
        expected[name] = sha256(tmp_path / name)
        assert status(region / name) == "available"
    base = snap_id(region / "base.img")
    (region / "base.img").unlink()
    assert wait_for(lambda: gone(mnt, "us-east-1", base), 20), mnt.log()
    for name, digest in expected.items():
        assert parent_of(mnt, "us-east-1", snap_id(region / name)) is None
        assert sha256(region / name) == digest
    mnt.umount()
    code, report = mnt.check()
    assert code == 0, report


def test_check_names_a_snapshot_whose_chain_is_broken(mnt: SnapfsMount, tmp_path: Path) -> None:
    region = mnt.path / "us-east-1"
    region.mkdir()
    (image,) = days(tmp_path, 1)
    run("cp", image, region / "a.img")
    assert status(region / "a.img") == "available"
    run(*SNAPFS, "clone", region / "a.img", region / "b.img")
    assert status(region / "b.img") == "available"
    b = snap_id(region / "b.img")
    mnt.umount()
    db = sqlite3.connect(mnt.store / "regions" / "us-east-1" / "index.db")
    db.execute("UPDATE snapshots SET parent_id = 'snap-0000000000000000' WHERE id = ?", [b])
    db.commit()
    db.close()
    code, report = mnt.check()
    assert code != 0
    (chain,) = next(r for r in report["regions"] if r["name"] == "us-east-1")["broken_chains"]
    assert chain["snapshot"] == b and chain["name"] == "b.img"
    assert "snap-0000000000000000 is missing" in chain["problem"]
