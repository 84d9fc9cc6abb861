"""Damaged stores: a flipped byte, a truncated, emptied, swapped or deleted block object, a
damaged SQLite page. Reads of what is affected fail with EIO (never wrong bytes), every
other snapshot keeps working, and `snapfs check` names what is damaged."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from ..conftest import (
    SnapfsMount,
    StoredObject,
    encrypt_region,
    random_image,
    region_report,
    run,
    sha256,
)

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB


@pytest.fixture
def block_mnt(tmp_path: Path) -> SnapfsMount:
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt", block_size=BLOCK)
    m.mount()
    yield m
    m.teardown()


def block_objects(m: SnapfsMount, region: str, snapshot_id: str) -> dict[int, StoredObject]:
    """block number -> the object holding it (read from the index, unmounted)."""
    directory = m.store / "regions" / region
    db = sqlite3.connect(directory / "index.db")
    try:
        rows = db.execute(
            "SELECT block_no, block_id FROM snapshot_blocks WHERE snapshot_id = ?", [snapshot_id]
        ).fetchall()
    finally:
        db.close()
    return {no: StoredObject(bid.hex(), directory / "blocks") for no, bid in rows}


def flip(obj: StoredObject, offset: int) -> None:
    data = bytearray(obj.read_bytes())
    data[offset] ^= 0x40
    obj.write_bytes(bytes(data))


def read_block(path: Path, block_no: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, BLOCK, block_no * BLOCK)
    finally:
        os.close(fd)


def assert_blocks(path: Path, image: Path, damaged: set[int]) -> None:
    """Damaged blocks read as EIO; every other block reads back exactly."""
    content = image.read_bytes()
    for block_no in range(len(content) // BLOCK):
        if block_no in damaged:
            with pytest.raises(OSError) as failed:
                read_block(path, block_no)
            assert failed.value.errno == errno.EIO, block_no
        else:
            expected = content[block_no * BLOCK : (block_no + 1) * BLOCK]
            assert read_block(path, block_no) == expected, block_no


def test_a_truncated_pack_file_loses_only_the_objects_past_the_cut(
    tmp_path: Path, block_mnt: SnapfsMount
) -> None:
    m = block_mnt
    region = m.path / "us-east-1"
    region.mkdir()
    images = {n: random_image(tmp_path / n, 2 * MiB) for n in ("first.img", "second.img")}
    for image in images.values():
        run("cp", image, region)
    ids = {n: os.getxattr(region / n, "user.snapfs.id").decode() for n in images}
    m.umount()
    objects = {n: block_objects(m, "us-east-1", ids[n]) for n in images}
    pack, offset, length = objects["second.img"][5].location()
    cut = offset + length // 2
    with open(objects["second.img"][5].pack_path(pack), "r+b") as f:
        f.truncate(cut)
    damaged = {
        (name, no)
        for name, by_no in objects.items()
        for no, obj in by_no.items()
        if (loc := obj.location())[0] == pack and loc[1] + loc[2] > cut
    }
    assert ("second.img", 5) in damaged and len(damaged) < 2 * 2 * MiB // BLOCK

    m.mount()
    for name, image in images.items():
        assert_blocks(region / name, image, {no for n, no in damaged if n == name})
    m.umount()
    code, report = m.check()
    r = region_report(report, "us-east-1")
    assert code == 1 and set(r["corrupt"]) | set(r["missing"]) == {
        objects[name][no].name for name, no in damaged
    }


def test_damaged_block_objects_read_as_eio_and_check_names_them(
    tmp_path: Path, block_mnt: SnapfsMount
) -> None:
    m = block_mnt
    plain, secret = m.path / "us-east-1", m.path / "secret-1"
    plain.mkdir()
    secret.mkdir()
    encrypt_region(m, secret)
    victim = random_image(tmp_path / "victim.img", 2 * MiB)
    bystander = random_image(tmp_path / "bystander.img", 2 * MiB)
    enc = random_image(tmp_path / "enc.img", 1 * MiB)
    for image, region in ((victim, plain), (bystander, plain), (enc, secret)):
        run("cp", image, region)
    ids = {p.name: os.getxattr(p, "user.snapfs.id").decode() for p in
           (plain / "victim.img", secret / "enc.img")}  # fmt: skip
    m.umount()

    objects = block_objects(m, "us-east-1", ids["victim.img"])
    flip(objects[3], len(objects[3].read_bytes()) - 100)  # a payload byte
    flip(objects[5], 8)  # the header's plaintext length
    objects[7].write_bytes(objects[7].read_bytes()[: len(objects[7].read_bytes()) // 2])  # short
    objects[9].write_bytes(b"")  # emptied
    objects[11].unlink()  # gone
    objects[15].write_bytes(objects[13].read_bytes())  # another block's object in its place
    enc_objects = block_objects(m, "secret-1", ids["enc.img"])
    flip(enc_objects[2], len(enc_objects[2].read_bytes()) - 5)  # ciphertext or tag
    enc_objects[4].write_bytes(enc_objects[6].read_bytes())  # authentic, but not this block's

    m.mount()
    assert_blocks(plain / "victim.img", victim, {3, 5, 7, 9, 11, 15})
    assert_blocks(secret / "enc.img", enc, {2, 4})
    assert sha256(plain / "bystander.img") == sha256(bystander)
    with pytest.raises(OSError) as whole:
        sha256(plain / "victim.img")
    assert whole.value.errno == errno.EIO
    log = m.log()
    assert "Traceback" not in log
    assert f"victim.img ({ids['victim.img']}) at offset {3 * BLOCK}" in log
    m.umount()

    code, report = m.check()
    assert code == 1 and not report["ok"]
    r = region_report(report, "us-east-1")
    damaged = {objects[n].name for n in (3, 5, 7, 9, 15)}
    assert set(r["corrupt"]) == damaged and r["missing"] == [objects[11].name]
    assert [(d["name"], d["offsets"]) for d in r["damaged_snapshots"]] == [
        ("victim.img", [n * BLOCK for n in (3, 5, 7, 9, 11, 15)])
    ]
    s = region_report(report, "secret-1")
    assert set(s["corrupt"]) == {enc_objects[2].name, enc_objects[4].name}
    assert [(d["name"], d["offsets"]) for d in s["damaged_snapshots"]] == [
        ("enc.img", [2 * BLOCK, 4 * BLOCK])
    ]


def leaf_pages(db_path: Path, table: str) -> tuple[int, list[int]]:
    """The page size and the leaf pages of `table`, in key order; the WAL checkpointed."""
    db = sqlite3.connect(db_path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        try:
            rows = db.execute(
                "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY path",
                [table],
            ).fetchall()
        except sqlite3.OperationalError:
            pytest.fail("this SQLite has no dbstat table: the damaged-page test cannot run")
    finally:
        db.close()
    return page_size, [r[0] for r in rows]


def smash_page(db_path: Path, page_size: int, page_no: int) -> None:
    with open(db_path, "r+b") as f:
        f.seek((page_no - 1) * page_size)
        f.write(os.urandom(page_size))


def test_damaged_index_pages_are_eio_for_their_snapshots_only(
    tmp_path: Path, block_mnt: SnapfsMount
) -> None:
    m = block_mnt
    plain, hurt_region, lost_region = (m.path / n for n in ("us-east-1", "eu-west-1", "ap-south-1"))
    for region in (plain, hurt_region, lost_region):
        region.mkdir()
    images = {n: random_image(tmp_path / n, 8 * MiB) for n in ("a.img", "b.img", "c.img")}
    run("cp", images["a.img"], plain)
    run("cp", images["b.img"], hurt_region)
    run("cp", images["c.img"], hurt_region)
    run("cp", images["a.img"], lost_region)
    ids = {n: os.getxattr(hurt_region / n, "user.snapfs.id").decode() for n in ("b.img", "c.img")}
    first = min(ids, key=ids.get)  # its map rows are on the first leaf pages
    second = max(ids, key=ids.get)
    m.umount()

    hurt_db = m.store / "regions" / "eu-west-1" / "index.db"
    page_size, leaves = leaf_pages(hurt_db, "snapshot_blocks")
    assert len(leaves) >= 4  # two snapshots of 128 blocks: the first leaf is `first`'s alone
    smash_page(hurt_db, page_size, leaves[0])
    lost_db = m.store / "regions" / "ap-south-1" / "index.db"
    leaf_pages(lost_db, "snapshot_blocks")  # checkpoints its WAL
    smash_page(lost_db, page_size, 1)  # its header and schema: not a database any more

    m.mount()  # the store still mounts; the region it cannot read is not served
    assert sha256(plain / "a.img") == sha256(images["a.img"])
    assert sha256(hurt_region / second) == sha256(images[second])
    with pytest.raises(OSError) as failed:
        read_block(hurt_region / first, 0)
    assert failed.value.errno == errno.EIO
    assert "ap-south-1" not in os.listdir(m.path)
    with pytest.raises(OSError) as refused:
        lost_region.mkdir()  # would replace the damaged region's data
    assert refused.value.errno == errno.EIO
    log = m.log()
    assert "Traceback" not in log
    assert "RegionIndex.Damaged" in log and "region ap-south-1 is not served" in log
    m.umount()

    code, report = m.check()
    assert code == 1 and not report["ok"]
    assert region_report(report, "us-east-1")["damaged"] is False
    hurt = region_report(report, "eu-west-1")
    assert hurt["index_problems"] and "snapshot_blocks" in " ".join(hurt["index_problems"])
    assert [(d["name"], d["map_unreadable"]) for d in hurt["damaged_snapshots"]] == [(first, True)]
    assert hurt["blocks_checked"] > 0  # the other snapshot's blocks were still verified
    assert region_report(report, "ap-south-1")["error"].startswith("RegionIndex.Damaged")
    text = m.cli("check", "--store", m.store, check=False)
    assert text.returncode == 1 and f"snapshot {first}" in text.stdout
    assert "Traceback" not in text.stderr
