"""A disaster-recovery host mounts a bucket region read-only (issue 19): a second store
attaches the primary's bucket `--read-only`, reads its snapshots, refuses every change with
EROFS while the bucket stays byte for byte as it was, and follows what the primary
publishes later (new snapshots appear, deleted ones go, a repack does not break reads)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from ..conftest import SNAPFS, S3Server, SnapfsMount, make_key, run, sha256, wait_for
from .test_s3 import BUCKET, attr, create_s3_region
from .test_s3packs import random_image

REGION = "eu-west-1"
PREFIX = "eu"


def attach_read_only(
    store: Path, s3: S3Server, *extra: str, check: bool = True
) -> str:
    result = run(
        *SNAPFS, "region", "attach", REGION, "--backend", f"s3://{BUCKET}/{PREFIX}",
        "--endpoint", s3.endpoint, "--store", store, "--read-only", *extra, check=False,
    )  # fmt: skip
    if check:
        assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def bucket_state(s3: S3Server) -> dict[str, str]:
    """Every object of the region's prefix with the sha256 of its bytes."""
    root = s3.data / BUCKET / PREFIX
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def manifests_published(s3: S3Server, count: int) -> bool:
    root = s3.data / BUCKET / PREFIX / "meta" / "snapshots"
    return root.is_dir() and len([p for p in root.iterdir() if not p.name.startswith(".")]) == count


def refused(action: Callable[[], object]) -> int:
    """The errno an action fails with (0: it did not fail)."""
    try:
        action()
    except OSError as exc:
        return exc.errno or -1
    return 0


def shares_a_quarter(a: Path, out: Path, block: int) -> Path:
    """A copy of `a` with three blocks of four replaced: deleting `a` then leaves its packs
    mostly dead, so the primary repacks the shared blocks and deletes the old packs."""
    data = bytearray(a.read_bytes())
    for n in range(len(data) // block):
        if n % 4:
            data[n * block : (n + 1) * block] = os.urandom(block)
    out.write_bytes(bytes(data))
    return out


def test_a_read_only_region_reads_refuses_changes_and_follows_the_primary(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    primary = SnapfsMount(tmp_path / "primary", tmp_path / "primary-mnt")
    # Dead packs stay a while, as in production: a snapshot the DR host has open when the
    # primary deletes it reads on from them.
    primary.mount(env={"SNAPFS_PACK_GRACE": "600"})
    dr = SnapfsMount(tmp_path / "dr", tmp_path / "dr-mnt")
    try:
        remote = create_s3_region(primary, s3, REGION, PREFIX)
        block = primary.status()["block_size"]
        a = random_image(tmp_path / "a.img", 12, block)
        b = random_image(tmp_path / "b.img", 12, block)
        run("cp", a, remote / "a.img")
        run("cp", b, remote / "b.img")
        assert wait_for(lambda: manifests_published(s3, 2), 15), primary.log()
        # The primary's key, for the encrypted snapshot it writes later (key export/import).
        key_id = make_key(primary, REGION)
        monkeypatch.setenv("SNAPFS_EXPORT_PASSPHRASE", "move-the-key")
        exported = tmp_path / "key.json"
        primary.cli("key", "export", key_id, "--out", exported, "--store", primary.store)
        run(*SNAPFS, "key", "import", exported, "--store", dr.store)
        dr.mount()
        out = attach_read_only(dr.store, s3, "--refresh", "1")  # through the mounted store
        assert "read-only: 2 snapshots" in out, out
        region = dr.path / REGION
        assert sorted(os.listdir(region)) == ["a.img", "b.img"]
        assert sha256(region / "a.img") == sha256(a)
        assert sha256(region / "b.img") == sha256(b)
        assert attr(region, "read_only") == "true"
        assert "user.snapfs.read_only" not in os.listxattr(region)  # computed: not listed
        local = dr.path / "us-east-1"
        local.mkdir()
        assert attr(local, "read_only") == "false"
        assert dr.region_status(REGION)["read_only"] is True
        assert dr.region_status("us-east-1")["read_only"] is False
        with contextlib.closing(sqlite3.connect(dr.store / "store.db")) as db:
            rows = dict(db.execute("SELECT name, read_only FROM regions").fetchall())
        assert rows == {REGION: 1, "us-east-1": 0}

        # Every change is EROFS, and the bucket stays as it was, byte for byte.
        before = bucket_state(s3)
        run("cp", a, local / "x.img")
        failed = run("cp", a, region / "c.img", check=False)
        assert failed.returncode != 0 and "Read-only file system" in failed.stderr
        snap = region / "a.img"
        assert refused(lambda: os.unlink(snap)) == errno.EROFS
        assert refused(lambda: os.rename(snap, region / "z.img")) == errno.EROFS
        assert refused(lambda: os.rename(snap, local / "a.img")) == errno.EROFS  # mv out
        assert refused(lambda: os.rename(local / "x.img", region / "x.img")) == errno.EROFS
        assert refused(lambda: os.truncate(snap, 0)) == errno.EROFS
        assert refused(lambda: os.close(os.open(snap, os.O_RDWR))) == errno.EROFS
        assert refused(lambda: os.utime(snap, (1, 1))) == errno.EROFS
        assert refused(lambda: os.mkdir(region / "sub")) == errno.EROFS
        assert refused(lambda: os.rmdir(region)) == errno.EROFS
        assert refused(lambda: os.setxattr(snap, "user.snapfs.description", b"x")) == errno.EROFS
        assert refused(lambda: os.setxattr(snap, "user.tag.env", b"dr")) == errno.EROFS
        assert refused(lambda: os.setxattr(region, "user.snapfs.compression", b"lz4")) == (
            errno.EROFS
        )
        copy_in = dr.cli("copy", local / "x.img", region, check=False)
        assert copy_in.returncode != 0
        assert "OperationNotPermitted.ReadOnlyRegion" in copy_in.stderr, copy_in.stderr
        assert "OperationNotPermitted.ReadOnlyRegion" in dr.log()
        assert sorted(os.listdir(region)) == ["a.img", "b.img"]
        assert bucket_state(s3) == before

        # Copies out of it work: cp, and snapfs copy.
        run("cp", region / "b.img", local / "b.img")
        assert sha256(local / "b.img") == sha256(b)
        dr.cli("copy", region / "a.img", local / "acopy", "--wait")
        assert attr(local / "acopy", "status") == "available"
        assert sha256(local / "acopy") == sha256(a)

        # The primary goes on: a new snapshot (encrypted) appears, a deleted one goes; one
        # open on the DR host when it is deleted reads on until closed.
        os.setxattr(remote, "user.snapfs.default_kms_key_id", key_id.encode())
        os.setxattr(remote, "user.snapfs.encrypt_by_default", b"true")
        with open(region / "a.img", "rb") as reader:
            first = reader.read(block)
            c = random_image(tmp_path / "c.img", 6, block)
            run("cp", c, remote / "c.img")
            os.unlink(remote / "a.img")
            listed = wait_for(lambda: sorted(os.listdir(region)) == ["b.img", "c.img"], 15)
            assert listed, dr.log()
            assert sha256(region / "c.img") == sha256(c)
            assert attr(region / "c.img", "kms_key_id") == key_id
            rest = reader.read()
        assert hashlib.sha256(first + rest).hexdigest() == sha256(a)
        assert attr(region / "c.img", "id") == attr(remote / "c.img", "id")

        # A rename and a description on the primary reach the DR host too.
        os.rename(remote / "c.img", remote / "c2.img")
        os.setxattr(remote / "b.img", "user.snapfs.description", b"kept")
        assert wait_for(lambda: sorted(os.listdir(region)) == ["b.img", "c2.img"], 15), dr.log()
        assert wait_for(lambda: attr(region / "b.img", "description") == "kept", 15)

        # Unmounted and mounted again, it is still read-only.
        dr.remount()
        assert attr(region, "read_only") == "true"
        assert refused(lambda: os.unlink(region / "b.img")) == errno.EROFS
        assert sha256(region / "c2.img") == sha256(c)
        primary.umount()  # the bucket is still from here on
        assert wait_for(lambda: manifests_published(s3, 2), 15)
        before = bucket_state(s3)
        code, report = dr.check()
        assert code == 0 and report["ok"], json.dumps(report["regions"])
        ro = next(r for r in report["regions"] if r["name"] == REGION)
        assert ro["read_only"] and ro["orphans"] == 0
        assert bucket_state(s3) == before
        assert "Traceback" not in dr.log()
    finally:
        dr.teardown()
        primary.teardown()


def test_an_unmounted_read_only_attach_survives_a_repack_on_the_primary(
    s3: S3Server, tmp_path: Path
) -> None:
    primary = SnapfsMount(tmp_path / "primary", tmp_path / "primary-mnt")
    primary.mount()  # SNAPFS_PACK_GRACE=0 (the s3 fixture): old packs go at the repack
    dr = SnapfsMount(tmp_path / "dr", tmp_path / "dr-mnt")
    try:
        remote = create_s3_region(primary, s3, REGION, PREFIX)
        block = primary.status()["block_size"]
        a = random_image(tmp_path / "a.img", 40, block)  # 20 MiB: two packs
        b = shares_a_quarter(a, tmp_path / "b.img", block)
        run("cp", a, remote / "a.img")
        packs_of_a = {p.name for p in s3.packs(BUCKET, PREFIX)}
        run("cp", b, remote / "b.img")
        assert wait_for(lambda: manifests_published(s3, 2), 15), primary.log()
        # Unmounted; a refresh once an hour, so reads after the repack must find the moved
        # blocks themselves (in the new packs' trailers).
        out = attach_read_only(dr.store, s3, "--refresh", "3600")
        assert "read-only: 2 snapshots" in out, out
        assert dr.status()["regions"][0]["read_only"] is True
        bad = attach_read_only(dr.store, s3, "--refresh", "0", check=False)
        assert "InvalidParameter" in bad
        dr.mount()
        region = dr.path / REGION
        assert sorted(os.listdir(region)) == ["a.img", "b.img"]
        os.unlink(remote / "a.img")
        # Repacked, and a's packs deleted (at the primary's next upkeep, within a minute).
        gone = wait_for(lambda: not packs_of_a & {p.name for p in s3.packs(BUCKET, PREFIX)}, 90)
        assert gone and "repacked 10 objects" in primary.log(), primary.log()
        assert sha256(region / "b.img") == sha256(b)
        assert "the primary wrote since" in dr.log(), dr.log()
        dr.remount()  # the refresh at mount sees that a.img is gone
        assert wait_for(lambda: sorted(os.listdir(region)) == ["b.img"], 15), dr.log()
        assert wait_for(lambda: "deleted snapshot a.img" in dr.log(), 15), dr.log()  # purged
        before = bucket_state(s3)
        dr.umount()
        code, report = dr.check("--repair")
        assert code == 0 and report["ok"], json.dumps(report["regions"])
        assert bucket_state(s3) == before
        dr.mount()
        assert attr(region, "read_only") == "true"
        assert sha256(region / "b.img") == sha256(b)
        # After an unclean stop a mount collects orphans: never in a read-only region, whose
        # bucket holds the primary's objects.
        dr.kill9()
        dr.teardown()
        dr.mount()
        assert "not closed cleanly" in dr.log()
        assert sha256(region / "b.img") == sha256(b)
        assert bucket_state(s3) == before
    finally:
        dr.teardown()
        primary.teardown()


def test_an_old_catalogue_migrates_and_a_bad_request_is_refused(tmp_path: Path) -> None:
    from snapfs.errors import InvalidParameter
    from snapfs.meta import catalogue
    from snapfs.meta import db as dbutil
    from snapfs.service import regionadmin

    store = tmp_path / "store"
    store.mkdir()
    old = dbutil.connect(store / "store.db")
    dbutil.migrate(old, catalogue.MIGRATIONS[:3], "old store")  # schema 3, before read_only
    old["regions"].insert({"name": "r1", "created_at": 1.0, "backend": "local"})
    old.close()
    db = catalogue.open_catalogue(store)
    rows = list(db["regions"].rows)
    db.close()
    assert [(r["name"], r["read_only"], r["refresh"]) for r in rows] == [("r1", 0, None)]
    raw = json.dumps({"name": "r", "backend": "s3://b-1/p", "read_only": "yes"}).encode()
    with pytest.raises(InvalidParameter):
        regionadmin.attach_options(raw)
    for bad in (0, -1, "x", float("inf"), True):
        with pytest.raises(InvalidParameter):
            regionadmin.check_refresh(bad)
    assert regionadmin.check_refresh("2.5") == 2.5
