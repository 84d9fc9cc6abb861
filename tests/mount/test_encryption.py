"""Encrypted regions, snapshots and copies, through the mount."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from snapfs.cli import diskimage

from ..conftest import SNAPFS, SnapfsMount, encrypt_region, make_key, run, sha256, wait_for

MiB = 1 << 20
MARKER = b"SNAPFS-SECRET-MARKER-7f3a9c"


def attr(path: Path, name: str) -> str:
    return os.getxattr(path, f"user.snapfs.{name}").decode()


def marker_image(path: Path, size: int = 8 * MiB) -> Path:
    # Every 4 KiB carries the marker, in compressible and incompressible neighbourhoods.
    chunk = (MARKER + os.urandom(4096 - len(MARKER))) * (size // 4096 // 2)
    chunk += (MARKER + b"." * (4096 - len(MARKER))) * (size // 4096 // 2)
    path.write_bytes(chunk)
    return path


def copy_done(path: Path) -> str:
    return wait_for(
        lambda: attr(path, "status") in ("available", "failed") and attr(path, "status"), 60
    )


def test_encrypting_region_leaves_no_plaintext_in_the_store(
    tmp_path: Path, mnt: SnapfsMount
) -> None:
    region = mnt.path / "us-east-1"
    region.mkdir()
    key_id = encrypt_region(mnt, region)
    assert attr(region, "encrypt_by_default") == "true"
    assert attr(region, "default_kms_key_id") == key_id
    image = marker_image(tmp_path / "secret.img")
    run("cp", image, region / "secret.img")
    run("dd", f"if={image}", f"of={region / 'dd.img'}", "bs=1M", "seek=3")
    snap = region / "secret.img"
    assert attr(snap, "encrypted") == "true" and attr(snap, "kms_key_id") == key_id
    assert sha256(snap) == sha256(image)
    mnt.remount()
    assert sha256(snap) == sha256(image)
    mnt.umount()
    for path in mnt.store.rglob("*"):
        if path.is_file():
            assert MARKER not in path.read_bytes(), f"plaintext found in {path}"
    mnt.mount()


def test_tampered_block_is_eio_and_logged(tmp_path: Path, mnt: SnapfsMount) -> None:
    region = mnt.path / "us-east-1"
    region.mkdir()
    encrypt_region(mnt, region)
    image = marker_image(tmp_path / "secret.img")
    run("cp", image, region / "secret.img")
    mnt.umount()
    victim = sorted(mnt.objects("us-east-1"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    mnt.mount()
    # Whichever block was damaged, everything before it reads back right and the damaged
    # block itself is refused: never wrong bytes.
    expected = image.read_bytes()
    got = bytearray()
    with open(region / "secret.img", "rb", buffering=0) as f, pytest.raises(OSError) as exc:
        while chunk := f.read(64 * 1024):
            got += chunk
    assert exc.value.errno == errno.EIO
    assert len(got) < len(expected) and bytes(got) == expected[: len(got)]
    result = subprocess.run(["cat", region / "secret.img"], capture_output=True)
    assert result.returncode != 0 and b"Input/output error" in result.stderr
    log = mnt.log()
    assert "fails authentication" in log and "secret.img" in log and "at offset" in log


def test_swapped_blocks_fail_authentication(tmp_path: Path, mnt: SnapfsMount) -> None:
    region = mnt.path / "us-east-1"
    region.mkdir()
    encrypt_region(mnt, region)
    image = marker_image(tmp_path / "secret.img")
    run("cp", image, region / "secret.img")
    mnt.umount()
    a, b = sorted(mnt.objects("us-east-1"))[:2]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    mnt.mount()
    with pytest.raises(OSError) as exc:
        (region / "secret.img").read_bytes()
    assert exc.value.errno == errno.EIO


def test_key_disable_and_enable(tmp_path: Path, mnt: SnapfsMount) -> None:
    region = mnt.path / "us-east-1"
    region.mkdir()
    key_id = encrypt_region(mnt, region)
    image = marker_image(tmp_path / "secret.img")
    run("cp", image, region / "secret.img")
    run(*SNAPFS, "key", "disable", key_id, "--store", mnt.store)
    with pytest.raises(OSError) as exc:
        (region / "secret.img").read_bytes()
    assert exc.value.errno == errno.EKEYREVOKED
    with pytest.raises(OSError) as exc:
        (region / "new.img").write_bytes(b"x")
    assert exc.value.errno == errno.EKEYREVOKED
    assert "CMKNotEnabled" in mnt.log()
    run(*SNAPFS, "key", "enable", key_id, "--store", mnt.store)
    assert sha256(region / "secret.img") == sha256(image)
    (region / "new.img").write_bytes(b"works again")
    assert (region / "new.img").read_bytes() == b"works again"


def test_region_key_settings_are_validated(mnt: SnapfsMount) -> None:
    region = mnt.path / "us-east-1"
    region.mkdir()
    other = make_key(mnt, "eu-west-1")
    cases = [
        ("user.snapfs.default_kms_key_id", str(uuid.uuid4()).encode(), errno.ENOKEY),
        ("user.snapfs.default_kms_key_id", b"not-a-key", errno.ENOKEY),
        ("user.snapfs.default_kms_key_id", other.encode(), errno.ENOKEY),  # another region's
        ("user.snapfs.encrypt_by_default", b"true", errno.EINVAL),  # no default key yet
        ("user.snapfs.encrypt_by_default", b"yes", errno.EINVAL),
    ]
    for name, value, expected in cases:
        with pytest.raises(OSError) as exc:
            os.setxattr(region, name, value)
        assert exc.value.errno == expected, (name, value)
    key_id = make_key(mnt, "us-east-1")
    run(*SNAPFS, "key", "disable", key_id, "--store", mnt.store)
    with pytest.raises(OSError) as exc:
        os.setxattr(region, "user.snapfs.default_kms_key_id", key_id.encode())
    assert exc.value.errno == errno.EKEYREVOKED
    assert attr(region, "encrypt_by_default") == "false"
    assert attr(region, "default_kms_key_id") == ""


def plain_and_two_keyed_regions(m: SnapfsMount) -> tuple[Path, Path, Path, str, str]:
    """Regions plain-1 (no key), enc-a and enc-b (each encrypting under its own key)."""
    plain, enc_a, enc_b = (m.path / n for n in ("plain-1", "enc-a", "enc-b"))
    for r in (plain, enc_a, enc_b):
        r.mkdir()
    return plain, enc_a, enc_b, encrypt_region(m, enc_a), encrypt_region(m, enc_b)


def test_copies_between_keys(tmp_path: Path, mnt: SnapfsMount) -> None:
    plain, enc_a, enc_b, key_a, key_b = plain_and_two_keyed_regions(mnt)
    image = tmp_path / "disk.img"
    diskimage.create(image, 16 * MiB, seed=41, zeros=0.0)
    digest = sha256(image)
    run("cp", image, plain / "disk.img")
    source_id = attr(plain / "disk.img", "id")

    # plain -> encrypted with cp: an encrypted copy, lineage kept.
    run("cp", plain / "disk.img", enc_a)
    copy = enc_a / "disk.img"
    assert attr(copy, "encrypted") == "true" and attr(copy, "kms_key_id") == key_a
    assert attr(copy, "source_snapshot_id") == source_id
    assert int(attr(copy, "transferred_bytes")) == 16 * MiB
    assert sha256(copy) == digest

    # encrypted -> encrypted under another key with mv: re-encrypted by the job.
    run("mv", copy, enc_b)
    moved = enc_b / "disk.img"
    assert copy_done(moved) == "available"
    assert attr(moved, "kms_key_id") == key_b and sha256(moved) == digest

    # encrypted -> plain only when asked; a plain region without a key refuses mv.
    with pytest.raises(OSError) as exc:
        os.rename(moved, plain / "back.img")
    assert exc.value.errno == errno.ENOKEY
    refused = mnt.cli("copy", moved, plain, "--name", "clear", check=False)
    assert refused.stderr.startswith("InvalidParameter.KMSKeyId.NotFound")
    mnt.cli("copy", moved, plain, "--name", "clear", "--decrypt", "--wait")
    assert attr(plain / "clear", "encrypted") == "false" and sha256(plain / "clear") == digest

    # snapfs copy --encrypted --kms-key-id encrypts whatever the region default.
    key_p = make_key(mnt, "plain-1")
    mnt.cli(
        "copy",
        plain / "disk.img",
        plain,
        "--name",
        "sealed-copy",
        "--encrypted",
        "--kms-key-id",
        key_p,
        "--wait",
    )
    assert attr(plain / "sealed-copy", "kms_key_id") == key_p
    assert sha256(plain / "sealed-copy") == digest
    bad = mnt.cli(
        "copy",
        plain / "disk.img",
        plain,
        "--name",
        "x2",
        "--kms-key-id",
        str(uuid.uuid4()),
        check=False,
    )
    assert bad.stderr.startswith("InvalidParameter.KMSKeyId.NotFound")


def test_incremental_copy_between_the_same_keys(tmp_path: Path, mnt: SnapfsMount) -> None:
    enc_a, enc_b = mnt.path / "enc-a", mnt.path / "enc-b"
    for r in (enc_a, enc_b):
        r.mkdir()
    encrypt_region(mnt, enc_a)
    encrypt_region(mnt, enc_b)
    day1 = tmp_path / "day1.img"
    diskimage.create(day1, 16 * MiB, seed=42, zeros=0.0)
    day2 = tmp_path / "day2.img"
    shutil.copy(day1, day2)
    changed = diskimage.mutate(day2, 0.1, block_size=mnt.status()["block_size"], seed=43)
    run("cp", day1, enc_a / "day1.img")
    run("cp", day2, enc_a / "day2.img")
    mnt.cli("copy", enc_a / "day1.img", enc_b, "--wait")
    mnt.cli("copy", enc_a / "day2.img", enc_b, "--wait")
    assert int(attr(enc_b / "day1.img", "transferred_bytes")) == 16 * MiB
    assert int(attr(enc_b / "day2.img", "transferred_bytes")) == changed
    assert sha256(enc_b / "day2.img") == sha256(day2)


def test_cp_out_of_an_encrypted_snapshot_into_a_plain_region_is_no_copy(
    tmp_path: Path, mnt: SnapfsMount
) -> None:
    enc, plain = mnt.path / "enc-a", mnt.path / "plain-1"
    enc.mkdir()
    plain.mkdir()
    encrypt_region(mnt, enc)
    image = marker_image(tmp_path / "secret.img")
    run("cp", image, enc / "secret.img")
    run("cp", enc / "secret.img", plain / "clear.img")
    clear = plain / "clear.img"
    assert sha256(clear) == sha256(image) and attr(clear, "encrypted") == "false"
    with pytest.raises(OSError) as exc:  # decrypting copies happen only when asked
        attr(clear, "source_snapshot_id")
    assert exc.value.errno == errno.ENODATA


def test_a_disabled_key_refuses_copies(tmp_path: Path, mnt: SnapfsMount) -> None:
    src, dst = mnt.path / "enc-a", mnt.path / "enc-b"
    src.mkdir()
    dst.mkdir()
    key_a, key_b = encrypt_region(mnt, src), encrypt_region(mnt, dst)
    image = marker_image(tmp_path / "secret.img")
    run("cp", image, src / "secret.img")
    run(*SNAPFS, "key", "disable", key_b, "--store", mnt.store)
    with pytest.raises(OSError) as exc:  # the destination's default key is disabled
        os.rename(src / "secret.img", dst / "secret.img")
    assert exc.value.errno == errno.EKEYREVOKED
    refused = mnt.cli("copy", src / "secret.img", dst, check=False)
    assert refused.returncode != 0
    assert refused.stderr.startswith("InvalidParameter.KMSKeyId.CMKNotEnabled")
    run(*SNAPFS, "key", "enable", key_b, "--store", mnt.store)
    run(*SNAPFS, "key", "disable", key_a, "--store", mnt.store)
    with pytest.raises(OSError) as exc:  # the source's key is disabled: it cannot be read
        shutil.copyfile(src / "secret.img", dst / "copy.img")
    assert exc.value.errno == errno.EKEYREVOKED
    assert os.listdir(src) == ["secret.img"]
    run(*SNAPFS, "key", "enable", key_a, "--store", mnt.store)
    mnt.cli("copy", src / "secret.img", dst, "--name", "works", "--wait")
    assert sha256(dst / "works") == sha256(image)


def test_every_way_in_encrypts_under_the_destination_key(tmp_path: Path, mnt: SnapfsMount) -> None:
    plain, enc_a, enc_b, key_a, key_b = plain_and_two_keyed_regions(mnt)
    image = tmp_path / "disk.img"
    diskimage.create(image, 8 * MiB, seed=44, zeros=0.25)
    digest = sha256(image)
    for name in ("by-mv.img", "by-api.img"):
        run("cp", image, plain / name)
    run("mv", plain / "by-mv.img", enc_a)  # plain -> encrypted, by mv
    mnt.cli("copy", plain / "by-api.img", enc_a, "--wait")  # plain -> encrypted, by the API
    assert copy_done(enc_a / "by-mv.img") == "available"
    for name in ("by-mv.img", "by-api.img"):
        snap = enc_a / name
        assert attr(snap, "encrypted") == "true" and attr(snap, "kms_key_id") == key_a
        assert attr(snap, "source_region") == "plain-1" and sha256(snap) == digest
    run("cp", enc_a / "by-api.img", enc_b / "by-cp.img")  # encrypted -> another key, by cp
    copy = enc_b / "by-cp.img"
    assert attr(copy, "kms_key_id") == key_b and attr(copy, "source_region") == "enc-a"
    assert attr(copy, "status") == "available" and sha256(copy) == digest


def test_incremental_copy_between_keys_opens_only_new_blocks(
    tmp_path: Path, mnt: SnapfsMount
) -> None:
    """A block a re-encrypting copy has seen before is found again without reading it: here
    an unchanged block's source object is even gone, and the incremental copy still works."""
    import sqlite3

    enc_a, enc_b = mnt.path / "enc-a", mnt.path / "enc-b"
    for r in (enc_a, enc_b):
        r.mkdir()
    encrypt_region(mnt, enc_a)
    encrypt_region(mnt, enc_b)
    day1, day2 = tmp_path / "day1.img", tmp_path / "day2.img"
    diskimage.create(day1, 16 * MiB, seed=45, zeros=0.0)
    shutil.copy(day1, day2)
    changed = diskimage.mutate(day2, 0.1, block_size=mnt.status()["block_size"], seed=46)
    run("cp", day1, enc_a / "day1.img")
    run("cp", day2, enc_a / "day2.img")
    mnt.cli("copy", enc_a / "day1.img", enc_b, "--wait")
    db = sqlite3.connect(mnt.store / "regions" / "enc-a" / "index.db")
    (shared,) = db.execute("SELECT id FROM blocks WHERE refcount = 2 LIMIT 1").fetchone()
    db.close()
    victim = next(p for p in mnt.objects("enc-a") if p.name == shared.hex())
    victim.unlink()  # only a copy that opens every source block would notice
    mnt.cli("copy", enc_a / "day2.img", enc_b, "--wait")
    assert int(attr(enc_b / "day2.img", "transferred_bytes")) == changed
    assert sha256(enc_b / "day2.img") == sha256(day2)
