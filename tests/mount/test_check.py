"""`snapfs check` on a store written through the mount: it finds a corrupted block, a missing
block file and a wrong reference count, names the damaged snapshots and offsets, and
`--repair` fixes what can be fixed without deleting referenced data."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from snapfs.cli import diskimage

from ..conftest import SNAPFS, SnapfsMount, StoredObject, encrypt_region, region_report, run, sha256
from ..conftest import check_store as check

MiB = 1 << 20


def block_users(store: Path, region: str, block_hex: str) -> list[tuple[str, int]]:
    db = sqlite3.connect(store / "regions" / region / "index.db")
    rows = db.execute(
        "SELECT s.name, m.block_no FROM snapshot_blocks m JOIN snapshots s ON s.id = m.snapshot_id"
        " WHERE m.block_id = ? ORDER BY s.name, m.block_no",
        [bytes.fromhex(block_hex)],
    ).fetchall()
    db.close()
    return rows


def test_check_finds_damage_and_repair_keeps_referenced_data(
    tmp_path: Path, mnt: SnapfsMount
) -> None:
    block = mnt.status()["block_size"]
    region, secret = mnt.path / "us-east-1", mnt.path / "secret-1"
    region.mkdir()
    secret.mkdir()
    encrypt_region(mnt, secret)
    image = tmp_path / "disk.img"
    diskimage.create(image, 8 * MiB, seed=5, zeros=0.25)
    run("cp", image, region / "a.img")
    run("cp", image, region / "b.img")  # shares every block with a.img
    run("cp", image, secret / "enc.img")
    mnt.umount()

    code, report = check(mnt.store)
    assert code == 0 and report["ok"], report
    healthy = region_report(report, "us-east-1")
    assert healthy["blocks_checked"] > 0 and not healthy["damaged_snapshots"]
    assert region_report(report, "secret-1")["blocks_checked"] == healthy["blocks_checked"]

    objects = sorted(mnt.objects("us-east-1"))
    corrupt, gone, counted = objects[0], objects[1], objects[2]
    data = bytearray(corrupt.read_bytes())
    data[-100] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    gone.unlink()
    db = sqlite3.connect(mnt.store / "regions" / "us-east-1" / "index.db")
    with db:
        db.execute(
            "UPDATE blocks SET refcount = refcount + 5 WHERE id = ?", [bytes.fromhex(counted.name)]
        )
    db.close()
    orphan = StoredObject("ab" * 32, corrupt.blocks)  # a file of layout 2, as a crash left it
    orphan.write_bytes(b"left behind by a crash")

    code, report = check(mnt.store)
    r = region_report(report, "us-east-1")
    assert code == 1 and not report["ok"] and r["damaged"]
    assert r["corrupt"] == [corrupt.name] and r["missing"] == [gone.name]
    assert [w["block"] for w in r["wrong_refcounts"]] == [counted.name]
    assert r["wrong_refcounts"][0]["recorded"] == r["wrong_refcounts"][0]["actual"] + 5
    assert r["orphans"] == 1
    expected: dict[str, list[int]] = {}
    for bad in (corrupt.name, gone.name):
        for name, block_no in block_users(mnt.store, "us-east-1", bad):
            expected.setdefault(name, []).append(block_no * block)
    assert {d["name"]: d["offsets"] for d in r["damaged_snapshots"]} == {
        k: sorted(v) for k, v in expected.items()
    }
    assert sorted(expected) == ["a.img", "b.img"]
    assert not region_report(report, "secret-1")["damaged"]

    text = run(*SNAPFS, "check", "--store", mnt.store, check=False)
    assert text.returncode == 1 and "snapshot a.img" in text.stdout and "offset" in text.stdout

    # Checking beside a running daemon works read-only; repairing needs it unmounted.
    mnt.mount()
    code, report = check(mnt.store)
    assert code == 1 and region_report(report, "us-east-1")["corrupt"] == [corrupt.name]
    busy = run(*SNAPFS, "check", "--store", mnt.store, "--repair", check=False)
    assert busy.returncode != 0 and busy.stderr.startswith("StoreBusy")
    assert sha256(secret / "enc.img") == sha256(image)
    mnt.umount()

    code, report = check(mnt.store, "--repair")
    r = region_report(report, "us-east-1")
    assert r["repaired"]["refcounts"] == 1 and r["repaired"]["orphans_deleted"] == 1
    assert code == 1  # the lost blocks are still lost: repair reports, never hides them
    assert not orphan.exists() and corrupt.exists()  # referenced data is never deleted
    code, report = check(mnt.store)
    r = region_report(report, "us-east-1")
    assert not r["wrong_refcounts"] and r["orphans"] == 0
    assert r["corrupt"] == [corrupt.name] and r["missing"] == [gone.name]
    mnt.mount()
    assert sha256(secret / "enc.img") == sha256(image)


def test_check_of_a_missing_store_is_refused(tmp_path: Path) -> None:
    result = run(*SNAPFS, "check", "--store", tmp_path / "nothing", check=False)
    assert result.returncode != 0 and result.stderr.startswith("StoreNotFound")


def test_garbage_collection_is_crash_safe(tmp_path: Path, mnt: SnapfsMount) -> None:
    """Deleting snapshots frees their blocks by itself; a kill -9 in the middle of it leaves
    neither an index row without data nor, after the next mount, an orphaned object."""
    region = mnt.path / "us-east-1"
    region.mkdir()
    keep, doomed = tmp_path / "keep.img", tmp_path / "doomed.img"
    diskimage.create(keep, 8 * MiB, seed=21, zeros=0.0)
    diskimage.create(doomed, 48 * MiB, seed=22, zeros=0.0)
    run("cp", keep, region / "keep.img")
    for n in range(3):
        run("cp", doomed, region / f"doomed-{n}.img")
    before = len(mnt.objects("us-east-1"))
    for n in range(2):
        os.unlink(region / f"doomed-{n}.img")
    assert len(mnt.objects("us-east-1")) == before  # still shared with doomed-2
    os.unlink(region / "doomed-2.img")
    mnt.kill9()  # while the collector is deleting rows and objects
    mnt.mount()
    assert sorted(os.listdir(region)) == ["keep.img"]
    assert sha256(region / "keep.img") == sha256(keep)
    mnt.umount()
    code, report = check(mnt.store)
    r = region_report(report, "us-east-1")
    assert code == 0 and r["orphans"] == 0 and r["unreferenced"] == 0, r
    assert len(mnt.objects("us-east-1")) == r["blocks_checked"] == 16
    mnt.mount()


def test_a_region_whose_files_cannot_be_read_is_left_out_and_named(
    tmp_path: Path, mnt: SnapfsMount
) -> None:
    """Not only a damaged index: any file of one region that cannot be opened (here its
    block store is a file, not a directory) leaves that region out, named in the log and by
    check, while the store mounts and the other regions are served."""
    good, bad = mnt.path / "us-east-1", mnt.path / "eu-west-1"
    good.mkdir()
    bad.mkdir()
    image = tmp_path / "disk.img"
    diskimage.create(image, 2 * MiB, seed=31)
    run("cp", image, good / "disk.img")
    assert os.getxattr(good / "disk.img", "user.snapfs.status") == b"available"
    mnt.umount()
    blocks = mnt.store / "regions" / bad.name / "blocks"
    for path in sorted(blocks.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    blocks.rmdir()
    blocks.write_text("not a directory")
    mnt.mount()
    assert sorted(os.listdir(mnt.path)) == [good.name]
    assert sha256(good / "disk.img") == sha256(image)
    assert f"region {bad.name} is not served: its files cannot be read" in mnt.log()
    mnt.umount()
    code, report = check(mnt.store)
    assert code != 0 and region_report(report, bad.name)["error"].startswith("Region.Unreadable")
    assert not region_report(report, good.name)["damaged"]


def test_check_reports_a_missing_master_key_file(tmp_path: Path, mnt: SnapfsMount) -> None:
    """Without its key file the store cannot mount: check says so instead of "store ok"."""
    region = mnt.path / "us-east-1"
    region.mkdir()
    encrypt_region(mnt, region)
    mnt.umount()
    (mnt.store / "master.key").unlink()
    result = run(*SNAPFS, "check", "--store", mnt.store, check=False)
    assert result.returncode != 0
    assert "master key file" in result.stdout and "store ok" not in result.stdout
    assert "store DAMAGED" in result.stdout
