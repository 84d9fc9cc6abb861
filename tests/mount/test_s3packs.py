"""Packed objects in a bucket region, through the mount (objects/s3packs.py): blocks go
into ~16 MiB packs, a delete that leaves packs mostly dead repacks them, a disaster-recovery
attach after a repack finds every block, a crash between a pack's upload and its locations
leaves nothing behind, and a region of the old one-object-per-block layout keeps reading."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

from snapfs.objects.s3 import S3Backend, S3Location
from snapfs.objects.s3packs import decode_trailer

from ..conftest import SNAPFS, S3Server, SnapfsMount, run, sha256, wait_for
from .test_s3 import BUCKET, attr, create_s3_region

MiB = 1 << 20


def random_image(path: Path, blocks: int, block: int) -> Path:
    with path.open("wb") as f:
        for _ in range(blocks):
            f.write(os.urandom(block))
    return path


def packs_db(m: SnapfsMount, region: str, query: str) -> list[tuple]:
    """Rows of a query on the region's pack locations (s3packs/packs.db), read-only."""
    db = m.store / "regions" / region / "s3packs" / "packs.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(query).fetchall()


def live_objects(m: SnapfsMount, region: str) -> int:
    return int(packs_db(m, region, "SELECT count(*) FROM objects")[0][0])


def test_blocks_are_packed_repacked_and_found_again_by_a_new_store(
    s3: S3Server, s3mnt: SnapfsMount, tmp_path: Path
) -> None:
    m = s3mnt
    try:
        remote = create_s3_region(m, s3, "eu-west-1", "eu")
        block = m.status()["block_size"]
        a = random_image(tmp_path / "a.img", 80, block)  # 40 MiB, incompressible
        run("cp", a, remote / "a.img")
        packs = s3.packs(BUCKET, "eu")
        assert 3 <= len(packs) <= 4, [p.stat().st_size for p in packs]  # not 80 PUTs
        assert len(s3.objects(BUCKET, "eu")) == 80
        # b keeps every fourth block of a: once a goes, a's packs are three quarters dead.
        data = bytearray(a.read_bytes())
        for n in range(80):
            if n % 4:
                data[n * block : (n + 1) * block] = os.urandom(block)
        b = tmp_path / "b.img"
        b.write_bytes(bytes(data))
        run("cp", b, remote / "b.img")
        assert len(s3.objects(BUCKET, "eu")) == 140
        os.unlink(remote / "a.img")
        # Repacked: the 20 shared blocks moved out of a's packs, which then went.
        assert wait_for(lambda: len(s3.objects(BUCKET, "eu")) == 80, 30), m.log()
        assert len(set(s3.objects(BUCKET, "eu"))) == 80  # no copy left in an old pack
        assert "repacked 20 objects" in m.log()
        stored = sum(p.stat().st_size for p in s3.packs(BUCKET, "eu"))
        assert 40 * MiB <= stored < 41 * MiB
        # snapfs status and its metrics show the packs as the bucket holds them.
        packs = m.region_status("eu-west-1")["packs"]
        assert packs["count"] == len(s3.packs(BUCKET, "eu")) and packs["bytes"] == stored
        assert 80 * block <= packs["live_bytes"] < stored
        text = m.cli("status", "--store", m.store, "--metrics").stdout
        assert f'snapfs_pack_objects{{region="eu-west-1"}} {packs["count"]}' in text
        assert f'snapfs_pack_live_bytes{{region="eu-west-1"}} {packs["live_bytes"]}' in text
        assert "pack objects in the bucket" in m.cli("status", "--store", m.store).stdout
        assert sha256(remote / "b.img") == sha256(b)
        m.remount()
        assert sha256(remote / "b.img") == sha256(b)
        report = json.loads(m.cli("check", "--store", m.store, "--json").stdout)
        assert report["ok"], report
        b_id = attr(remote / "b.img", "id")
    finally:
        m.teardown()
    shutil.rmtree(m.store)  # the machine is lost; the bucket describes the region alone
    new = SnapfsMount(tmp_path / "new-store", tmp_path / "new-mnt")
    result = run(
        *SNAPFS, "region", "attach", "eu-west-1", "--backend", f"s3://{BUCKET}/eu",
        "--endpoint", s3.endpoint, "--store", new.store,
    )  # fmt: skip
    assert "1 snapshot" in result.stdout, result.stdout + result.stderr
    new.mount()
    try:
        region = new.path / "eu-west-1"
        assert attr(region / "b.img", "id") == b_id
        assert sha256(region / "b.img") == sha256(b)
        assert live_objects(new, "eu-west-1") == 80
    finally:
        new.teardown()


def test_a_crash_between_a_pack_upload_and_its_locations_leaves_nothing(
    s3: S3Server, s3mnt: SnapfsMount, tmp_path: Path
) -> None:
    m = s3mnt
    try:
        remote = create_s3_region(m, s3, "eu-west-1", "eu")
        block = m.status()["block_size"]
        kept = random_image(tmp_path / "kept.img", 8, block)
        run("cp", kept, remote / "kept.img")
        m.umount()
        m.mount(env={"SNAPFS_FAULT": "pack_uploaded:1"})
        doomed = random_image(tmp_path / "doomed.img", 40, block)  # the first pack fills up
        result = run("cp", doomed, remote / "doomed.img", check=False)
        assert result.returncode != 0
        assert wait_for(lambda: not m.alive(), 10)
        assert "fault injection: dying at pack_uploaded" in m.log()
        m.teardown()
        m.mount()
        assert "deleted 1 packs that no location named" in m.log(), m.log()
        assert sha256(remote / "kept.img") == sha256(kept)
        run("cp", doomed, remote / "again.img")
        assert sha256(remote / "again.img") == sha256(doomed)
        names = {p.name for p in s3.packs(BUCKET, "eu")}
        assert names == {row[0] for row in packs_db(m, "eu-west-1", "SELECT id FROM packs")}
        report = json.loads(m.cli("check", "--store", m.store, "--json").stdout)
        assert report["ok"], report
    finally:
        m.teardown()


def test_a_region_of_one_object_per_block_keeps_reading(
    s3: S3Server, s3mnt: SnapfsMount, tmp_path: Path
) -> None:
    m = s3mnt
    try:
        remote = create_s3_region(m, s3, "eu-west-1", "eu")
        block = m.status()["block_size"]
        old = random_image(tmp_path / "old.img", 8, block)
        run("cp", old, remote / "old.img")
        m.umount()
        # The bucket as snapfs wrote it before packs: blocks/<id>, no packs, no locations
        # (through the server: rclone does not see files changed behind its back).
        bucket = S3Backend(S3Location.parse(f"s3://{BUCKET}/eu", s3.endpoint), max_wait=10.0)
        for pack in s3.packs(BUCKET, "eu"):
            data = pack.read_bytes()
            for key, offset, length in decode_trailer(pack.name, data, None).entries:
                bucket.sibling("blocks/").put(key, data[offset : offset + length])
            bucket.sibling("packs/").delete(pack.name)
        shutil.rmtree(m.store / "regions" / "eu-west-1" / "s3packs")
        legacy = sorted(bucket.sibling("blocks/").keys())
        assert len(legacy) == 8 and not s3.packs(BUCKET, "eu")
        m.mount()
        assert sha256(remote / "old.img") == sha256(old)
        new = random_image(tmp_path / "new.img", 8, block)
        run("cp", new, remote / "new.img")
        assert sorted(bucket.sibling("blocks/").keys()) == legacy  # new ones pack
        assert len(s3.packs(BUCKET, "eu")) == 1
        os.unlink(remote / "old.img")
        assert wait_for(lambda: not list(bucket.sibling("blocks/").keys()), 10), m.log()
        m.remount()
        assert sha256(remote / "new.img") == sha256(new)
        report = json.loads(m.cli("check", "--store", m.store, "--json").stdout)
        assert report["ok"], report
    finally:
        m.teardown()
