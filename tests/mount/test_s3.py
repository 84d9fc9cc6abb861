"""Regions on S3-compatible object storage, against a real `rclone serve s3` on loopback."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from snapfs.cli import diskimage

from ..conftest import SNAPFS, S3Server, SnapfsMount, make_key, run, sha256, wait_for

MiB = 1 << 20
BUCKET = "snapfs-test"


def attr(path: Path, name: str) -> str:
    return os.getxattr(path, f"user.snapfs.{name}").decode()


def copy_done(path: Path, timeout: float = 60) -> str:
    return wait_for(
        lambda: attr(path, "status") in ("available", "failed") and attr(path, "status"), timeout
    )


def attr_free_log(m: SnapfsMount) -> str:
    """The log without the retry warnings (whose reasons say "failed")."""
    return "\n".join(line for line in m.log().splitlines() if "retry" not in line)


def create_s3_region(m: SnapfsMount, s3: S3Server, name: str, prefix: str) -> Path:
    result = run(
        *SNAPFS, "region", "create", name, "--backend", f"s3://{BUCKET}/{prefix}",
        "--endpoint", s3.endpoint, "--store", m.store, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + m.log()
    return m.path / name


def image(path: Path, size: int, seed: int) -> Path:
    diskimage.create(path, size, seed=seed, zeros=0.0)  # every block holds data
    return path



def test_region_create_unmounted_and_mounted(s3: S3Server, tmp_path: Path) -> None:
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt")
    result = run(
        *SNAPFS, "region", "create", "eu-west-1", "--backend", f"s3://{BUCKET}/eu",
        "--endpoint", s3.endpoint, "--store", m.store,
    )  # fmt: skip
    assert "created region eu-west-1" in result.stdout
    assert (s3.data / BUCKET / "eu" / "meta" / "region.json").is_file()
    run(*SNAPFS, "region", "create", "us-west-1", "--store", m.store)  # local by default
    m.mount()
    try:
        assert sorted(os.listdir(m.path)) == ["eu-west-1", "us-west-1"]
        os.rmdir(m.path / "us-west-1")
        create_s3_region(m, s3, "ap-south-1", "ap")  # through the daemon: visible at once
        assert sorted(os.listdir(m.path)) == ["ap-south-1", "eu-west-1"]
        (m.path / "us-east-1").mkdir()  # mkdir stays a local region
        assert (m.store / "regions" / "us-east-1" / "blocks").is_dir()
        assert not (m.store / "regions" / "ap-south-1" / "blocks").exists()
        # A prefix that holds a region is not taken twice; credentials are not stored.
        again = run(
            *SNAPFS, "region", "create", "eu-central-1", "--backend", f"s3://{BUCKET}/eu",
            "--endpoint", s3.endpoint, "--store", m.store, check=False,
        )  # fmt: skip
        assert again.returncode != 0 and "InvalidRegionId.Duplicate" in again.stderr
        db = sqlite3.connect(m.store / "store.db")
        rows = db.execute("SELECT name, backend, endpoint FROM regions ORDER BY id").fetchall()
        db.close()
        assert rows[1] == ("ap-south-1", f"s3://{BUCKET}/ap", s3.endpoint)
        assert rows[2] == ("us-east-1", "local", None)
        backends = {r["name"]: r["backend"] for r in m.status()["regions"]}
        assert backends["ap-south-1"] == f"s3://{BUCKET}/ap at {s3.endpoint}"
        secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
        assert not any(secret in p.read_bytes() for p in m.store.rglob("*") if p.is_file())
        m.remount()
        assert sorted(os.listdir(m.path)) == ["ap-south-1", "eu-west-1", "us-east-1"]
        # rmdir of an empty S3 region also clears its prefix in the bucket.
        os.rmdir(m.path / "ap-south-1")
        assert wait_for(lambda: not list((s3.data / BUCKET / "ap").rglob("*.json")), 10)
    finally:
        m.teardown()


def test_snapshots_and_copies_to_and_from_s3(
    s3: S3Server, s3mnt: SnapfsMount, tmp_path: Path
) -> None:
    remote = create_s3_region(s3mnt, s3, "eu-west-1", "eu")
    local = s3mnt.path / "us-east-1"
    local.mkdir()
    block = s3mnt.status()["block_size"]
    day1 = image(tmp_path / "day1.img", 8 * MiB, seed=41)
    # Written straight into the S3 region, read back.
    run("cp", day1, remote / "day1.img")
    assert attr(remote / "day1.img", "status") == "available"
    assert sha256(remote / "day1.img") == sha256(day1)
    assert len(s3.objects(BUCKET, "eu")) == 8 * MiB // block
    # cp S3 -> local: a copy with lineage, all blocks transferred.
    run("cp", remote / "day1.img", local / "day1.img")
    assert attr(local / "day1.img", "source_region") == "eu-west-1"
    assert int(attr(local / "day1.img", "transferred_bytes")) == 8 * MiB
    # A changed image: mv local -> S3 transfers only the changed blocks.
    day2 = tmp_path / "day2.img"
    shutil.copy(day1, day2)
    changed = diskimage.mutate(day2, 0.25, block_size=block, seed=42)
    run("cp", day2, local / "day2.img")
    run("mv", local / "day2.img", remote / "day2.img")
    assert copy_done(remote / "day2.img") == "available"
    assert int(attr(remote / "day2.img", "transferred_bytes")) == changed
    assert len(s3.objects(BUCKET, "eu")) == (8 * MiB + changed) // block
    assert sha256(remote / "day2.img") == sha256(day2)
    # mv S3 -> local, of a snapshot written into S3: the local region has day1's blocks,
    # so only the blocks changed since move.
    day3 = tmp_path / "day3.img"
    shutil.copy(day1, day3)
    changed3 = diskimage.mutate(day3, 0.25, block_size=block, seed=43)
    run("cp", day3, remote / "day3.img")
    run("mv", remote / "day3.img", local / "day3.img")
    assert copy_done(local / "day3.img") == "available"
    assert int(attr(local / "day3.img", "transferred_bytes")) == changed3
    assert sha256(local / "day3.img") == sha256(day3)
    assert sorted(os.listdir(remote)) == ["day1.img", "day2.img"]
    # The moved-away snapshot's unshared blocks leave the bucket.
    assert wait_for(lambda: len(s3.objects(BUCKET, "eu")) == (8 * MiB + changed) // block, 10)
    # After a remount everything reads back the same (the index is a local cache).
    s3mnt.remount()
    assert sha256(remote / "day1.img") == sha256(day1)
    report = json.loads(s3mnt.cli("check", "--store", s3mnt.store, "--json").stdout)
    assert report["ok"], report


def test_encrypted_s3_region_with_diff_check_and_retention(
    s3: S3Server, s3mnt: SnapfsMount, tmp_path: Path
) -> None:
    remote = create_s3_region(s3mnt, s3, "eu-west-1", "eu")
    key_id = make_key(s3mnt, "eu-west-1")
    os.setxattr(remote, "user.snapfs.default_kms_key_id", key_id.encode())
    os.setxattr(remote, "user.snapfs.encrypt_by_default", b"true")
    marker = b"SNAPFS-PLAINTEXT-MARKER-" * 100
    a = tmp_path / "a.img"
    a.write_bytes((marker + os.urandom(4096)) * 400)
    b = tmp_path / "b.img"
    data = bytearray(a.read_bytes())
    data[600_000:600_010] = b"0123456789"
    b.write_bytes(bytes(data))
    run("cp", a, remote / "a.img")
    run("cp", b, remote / "b.img")
    assert attr(remote / "a.img", "encrypted") == "true"
    assert attr(remote / "a.img", "kms_key_id") == key_id
    assert sha256(remote / "b.img") == sha256(b)
    for path in s3.data.rglob("*"):
        if path.is_file():
            assert marker[:24] not in path.read_bytes(), f"plaintext in {path}"
    diff = json.loads(s3mnt.cli("diff", remote / "a.img", remote / "b.img", "--json").stdout)
    block = s3mnt.status()["block_size"]
    assert diff["ranges"] == [{"offset": block, "length": block}]
    report = json.loads(s3mnt.cli("check", "--store", s3mnt.store, "--json").stdout)
    assert report["ok"] and sum(r["blocks_checked"] for r in report["regions"]) > 0
    # Retention and deletion work as anywhere: rm frees the blocks in the bucket.
    os.setxattr(remote / "b.img", "user.snapfs.retention_days", b"7")
    assert attr(remote / "b.img", "retention_days") == "7"
    before = len(s3.objects(BUCKET, "eu"))
    os.unlink(remote / "b.img")
    assert wait_for(lambda: len(s3.objects(BUCKET, "eu")) == before - 1, 10)


def test_copy_into_s3_waits_out_an_outage(s3: S3Server, tmp_path: Path) -> None:
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt", extra_args=("--copy-bwlimit", "4M"))
    m.mount()
    try:
        remote = create_s3_region(m, s3, "eu-west-1", "eu")
        local = m.path / "us-east-1"
        local.mkdir()
        source = image(tmp_path / "disk.img", 24 * MiB, seed=51)
        run("cp", source, local / "disk.img")
        run("mv", local / "disk.img", remote / "disk.img")
        moved = remote / "disk.img"
        assert wait_for(lambda: float(attr(moved, "progress")) >= 10, 30)
        s3.stop()
        time.sleep(1.5)  # a batch in flight when the server died fails its PUTs
        stalled = attr(moved, "progress")
        assert attr(moved, "status") == "copying"
        time.sleep(3)
        assert attr(moved, "progress") == stalled, "progress moved while the server was down"
        assert float(stalled) < 100
        assert wait_for(lambda: "retry" in m.log(), 10), m.log()
        s3.start()  # the same port and directory
        assert copy_done(moved, 120) == "available", m.log()
        assert int(attr(moved, "transferred_bytes")) == 24 * MiB
        assert sha256(moved) == sha256(source)
        report = json.loads(m.cli("check", "--store", m.store, "--json").stdout)
        assert report["ok"], report
    finally:
        m.teardown()


def test_unmount_while_the_server_is_down_stops_the_copy_to_resume_later(
    s3: S3Server, tmp_path: Path
) -> None:
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt", extra_args=("--copy-bwlimit", "4M"))
    m.mount()
    try:
        remote = create_s3_region(m, s3, "eu-west-1", "eu")
        (m.path / "us-east-1").mkdir()
        source = image(tmp_path / "disk.img", 16 * MiB, seed=81)
        run("cp", source, m.path / "us-east-1" / "disk.img")
        run("mv", m.path / "us-east-1" / "disk.img", remote / "disk.img")
        assert wait_for(lambda: float(attr(remote / "disk.img", "progress")) >= 10, 30)
        s3.stop()
        assert wait_for(lambda: "retry" in m.log(), 10)
        m.umount()  # does not wait for the server: the retries are interrupted
        assert "stopped" in m.log() and "failed" not in attr_free_log(m)
        s3.start()
        m.mount()
        moved = remote / "disk.img"
        assert copy_done(moved, 120) == "available", m.log()
        assert sha256(moved) == sha256(source)
        assert "resuming at block" in m.log()
    finally:
        m.teardown()


def test_disaster_recovery_into_a_new_store(
    s3: S3Server, s3mnt: SnapfsMount, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = create_s3_region(s3mnt, s3, "eu-west-1", "eu")
    key_id = make_key(s3mnt, "eu-west-1")
    plain = image(tmp_path / "plain.img", 4 * MiB, seed=61)
    secret = image(tmp_path / "secret.img", 4 * MiB, seed=62)
    run("cp", plain, remote / "plain.img")
    os.setxattr(remote / "plain.img", "user.snapfs.description", b"the plain one")
    os.setxattr(remote / "plain.img", "user.tag.env", b"prod")
    os.setxattr(remote, "user.snapfs.default_kms_key_id", key_id.encode())
    os.setxattr(remote, "user.snapfs.encrypt_by_default", b"true")
    run("cp", secret, remote / "secret.img")
    ids = {n: attr(remote / n, "id") for n in ("plain.img", "secret.img")}
    monkeypatch.setenv("SNAPFS_EXPORT_PASSPHRASE", "move-the-key")
    exported = tmp_path / "key.json"
    s3mnt.cli("key", "export", key_id, "--out", exported, "--store", s3mnt.store)
    s3mnt.umount()  # publishes what is pending; then the machine is "lost"
    shutil.rmtree(s3mnt.store)

    # A new machine: a fresh store, the key imported, the region attached from its bucket.
    new = SnapfsMount(tmp_path / "new-store", tmp_path / "new-mnt")
    run(*SNAPFS, "key", "import", exported, "--store", new.store)
    result = run(
        *SNAPFS, "region", "attach", "eu-west-1", "--backend", f"s3://{BUCKET}/eu",
        "--endpoint", s3.endpoint, "--store", new.store,
    )  # fmt: skip
    assert "2 snapshots" in result.stdout, result.stdout + result.stderr
    new.mount()
    try:
        region = new.path / "eu-west-1"
        assert sorted(os.listdir(region)) == ["plain.img", "secret.img"]
        assert sha256(region / "plain.img") == sha256(plain)
        assert sha256(region / "secret.img") == sha256(secret)
        assert {n: attr(region / n, "id") for n in ids} == ids
        assert attr(region / "secret.img", "kms_key_id") == key_id
        assert attr(region / "plain.img", "description") == "the plain one"
        assert os.getxattr(region / "plain.img", "user.tag.env") == b"prod"
        assert attr(region, "encrypt_by_default") == "true"
        # The region works on: a new snapshot is stored encrypted and deduplicated.
        run("cp", region / "plain.img", region / "again.img")
        assert sha256(region / "again.img") == sha256(plain)
        report = json.loads(new.cli("check", "--store", new.store, "--json").stdout)
        assert report["ok"], report
    finally:
        new.teardown()


def test_attach_through_a_mounted_store(s3: S3Server, tmp_path: Path) -> None:
    old = SnapfsMount(tmp_path / "old-store", tmp_path / "old-mnt")
    old.mount()
    try:
        remote = create_s3_region(old, s3, "eu-west-1", "eu")
        source = image(tmp_path / "disk.img", 2 * MiB, seed=71)
        run("cp", source, remote / "disk.img")
    finally:
        old.teardown()
    new = SnapfsMount(tmp_path / "new-store", tmp_path / "new-mnt")
    new.mount()
    try:
        result = run(
            *SNAPFS, "region", "attach", "eu-west-1", "--backend", f"s3://{BUCKET}/eu",
            "--endpoint", s3.endpoint, "--store", new.store,
        )  # fmt: skip
        assert "1 snapshots" in result.stdout
        assert os.listdir(new.path) == ["eu-west-1"]  # at once, through the daemon
        assert sha256(new.path / "eu-west-1" / "disk.img") == sha256(source)
        wrong = run(
            *SNAPFS, "region", "attach", "us-west-2", "--backend", f"s3://{BUCKET}/eu",
            "--endpoint", s3.endpoint, "--store", new.store, check=False,
        )  # fmt: skip
        assert wrong.returncode != 0 and "us-west-2" not in os.listdir(new.path)
    finally:
        new.teardown()


# --- units: the backend's retry policy and the manifest format --------------------------------


def test_backend_retries_then_gives_up_and_can_be_interrupted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from snapfs.objects import s3 as s3backend
    from snapfs.objects.s3 import BackendUnavailable, S3Backend, S3Location

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setattr(s3backend, "BACKOFF_FIRST", 0.05)
    dead = S3Location.parse("s3://no-server/p", f"http://127.0.0.1:{_closed_port()}")
    backend = S3Backend(dead, "blocks/", max_wait=0.5)
    with caplog.at_level("WARNING"), pytest.raises(BackendUnavailable):
        backend.put("ab" * 32, b"data")
    assert "retry 1" in caplog.text and "PUT s3://no-server/p/blocks/" in caplog.text
    patient = S3Backend(dead, "blocks/")  # the daemon's: retries until answered
    threading.Timer(0.5, patient.interrupt).start()
    with pytest.raises(BackendUnavailable, match="interrupted"):
        patient.get("ab" * 32)


def test_backend_locations_are_validated() -> None:
    from snapfs.errors import InvalidParameter
    from snapfs.objects.s3 import S3Location

    loc = S3Location.parse("s3://bucket-1/a/b/", "http://127.0.0.1:9000")
    assert (loc.bucket, loc.prefix, loc.url) == ("bucket-1", "a/b/", "s3://bucket-1/a/b")
    assert S3Location.parse("s3://bucket-1").prefix == ""
    for bad in ("bucket", "s3://", "s3://ab", "s3://Bad_Bucket/x"):
        with pytest.raises(InvalidParameter):
            S3Location.parse(bad)
    with pytest.raises(InvalidParameter):
        S3Location.parse("s3://bucket-1", "ftp://host")


def test_manifest_format_roundtrip_and_authentication() -> None:
    import uuid

    from snapfs.errors import BlockCorrupt
    from snapfs.meta.keys import BlockKeys
    from snapfs.service import manifests

    keys = BlockKeys(str(uuid.uuid4()), os.urandom(32))
    doc = {"id": "s-0123456789abcdef", "region": "eu-west-1", "name": "disk", "blocks": []}
    plain = manifests.encode(doc, "eu-west-1", None)
    assert manifests.decode(plain, "eu-west-1", doc["id"], lambda k: keys) == doc
    sealed = manifests.encode(doc, "eu-west-1", keys)
    assert b"disk" not in sealed
    assert manifests.decode(sealed, "eu-west-1", doc["id"], lambda k: keys) == doc
    with pytest.raises(BlockCorrupt):  # another snapshot's key, or another region
        manifests.decode(sealed, "eu-west-1", "s-ffffffffffffffff", lambda k: keys)
    with pytest.raises(BlockCorrupt):
        manifests.decode(sealed, "us-east-1", doc["id"], lambda k: keys)
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(BlockCorrupt):
        manifests.decode(bytes(tampered), "eu-west-1", doc["id"], lambda k: keys)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_transient_errors_are_retried_and_logged_permanent_ones_not(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import ClientError

    from snapfs.objects import s3 as s3backend
    from snapfs.objects.s3 import BackendDenied, S3Backend, S3Location

    monkeypatch.setattr(s3backend, "BACKOFF_FIRST", 0.01)

    def error(code: str, status: int) -> ClientError:
        response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(response, "PutObject")  # type: ignore[arg-type]

    class FlakyClient:
        def __init__(self, failures: list[Exception]):
            self.failures = failures
            self.stored: dict[str, bytes] = {}

        def put_object(self, Bucket: str, Key: str, Body: bytes) -> None:  # noqa: N803
            if self.failures:
                raise self.failures.pop(0)
            self.stored[Key] = Body

    flaky = FlakyClient([error("SlowDown", 503), error("InternalError", 500)])
    backend = S3Backend(S3Location.parse("s3://bucket-1/p"), "blocks/", client=flaky)
    with caplog.at_level("WARNING"):
        backend.put("k1", b"data")
    assert flaky.stored == {"p/blocks/k1": b"data"}
    assert "retry 1" in caplog.text and "retry 2" in caplog.text
    denied = FlakyClient([error("AccessDenied", 403)])
    backend = S3Backend(S3Location.parse("s3://bucket-1/p"), "blocks/", client=denied)
    with pytest.raises(BackendDenied):
        backend.put("k1", b"data")
    assert denied.stored == {}


def test_deltas_move_into_s3_and_rebuild_with_their_bases(
    s3: S3Server, s3mnt: SnapfsMount, tmp_path: Path
) -> None:
    """Scattered page changes (issue 16) move into an S3 region as deltas; after day 1 is
    deleted there its blocks stay as bases, and a store rebuilt from the bucket's manifests
    keeps them (the manifests list them), so day 2 reads back on the new machine."""
    from .test_deltas import day_images, transferred

    day1, day2, changed = day_images(tmp_path)
    local = s3mnt.path / "us-east-1"
    local.mkdir()
    remote = create_s3_region(s3mnt, s3, "eu-west-1", "deltas")
    for name, path in (("day1.img", day1), ("day2.img", day2)):
        shutil.copyfile(path, local / name)
        assert attr(local / name, "status") == "available"
    for name in ("day1.img", "day2.img"):
        os.rename(local / name, remote / name)
        assert copy_done(remote / name) == "available"
    assert transferred(remote / "day2.img") <= 2 * changed
    (remote / "day1.img").unlink()
    assert sha256(remote / "day2.img") == sha256(day2)
    s3mnt.umount()
    shutil.rmtree(s3mnt.store)

    new = SnapfsMount(tmp_path / "new-store", tmp_path / "new-mnt")
    result = run(
        *SNAPFS, "region", "attach", "eu-west-1", "--backend", f"s3://{BUCKET}/deltas",
        "--endpoint", s3.endpoint, "--store", new.store,
    )  # fmt: skip
    assert "1 snapshot" in result.stdout, result.stdout + result.stderr
    db = sqlite3.connect(new.store / "regions" / "eu-west-1" / "index.db")
    bases = db.execute(
        "SELECT count(DISTINCT d.base_id), count(DISTINCT b.id), min(b.refcount) FROM blocks d "
        "LEFT JOIN blocks b ON b.id = d.base_id WHERE d.base_id IS NOT NULL"
    ).fetchone()
    db.close()
    assert bases[0] > 0 and bases[0] == bases[1] and bases[2] >= 1, bases  # rows, counted
    new.mount()
    try:
        region = new.path / "eu-west-1"
        assert sha256(region / "day2.img") == sha256(day2)
        report = json.loads(new.cli("check", "--store", new.store, "--json").stdout)
        assert report["ok"], report
    finally:
        new.teardown()
