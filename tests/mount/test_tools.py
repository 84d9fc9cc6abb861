"""Real disk-image and backup tools on a real mount (issue 12).

qemu-img, qemu-io, fio, mkfs.ext4 and loop mounts, rsync, cp, tar, restic and plain shell
idioms create, close and reopen their files, fail over from fallocate, mmap, and copy extended
attributes. Each test judges by bytes (sha256 or `qemu-img compare` against the source), exit
status and stderr, and reads status and lineage with `getfattr`. A missing tool fails the
test (scripts/bootstrap.sh installs them all); it is never skipped.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapfs.cli import diskimage
from snapfs.fuse import mounts

from ..conftest import SnapfsMount, _mounted, run, sha256, wait_for

MiB = 1 << 20
SETTLE = 0.5  # the --settle of the mounts that watch a snapshot seal by itself

COMPUTED = (
    "id", "status", "progress", "error", "source_snapshot_id", "source_region",
    "transferred_bytes", "encrypted", "kms_key_id", "expires_at",
)  # fmt: skip

PACKAGES = {
    "qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "fio": "fio", "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs", "restic": "restic", "rsync": "rsync", "getfattr": "attr",
    "setfattr": "attr", "losetup": "mount", "mount": "mount", "umount": "mount",
    "fallocate": "util-linux", "tar": "tar",
}  # fmt: skip


def tool(*args: str | os.PathLike, **kw) -> subprocess.CompletedProcess:
    """`conftest.run` of a tool that must be installed: a missing one fails the test, naming
    the package to install."""
    name = str(args[0])
    if shutil.which(name) is None:
        pytest.fail(
            f"{name} is not installed (apt-get install {PACKAGES.get(name, name)}; "
            "scripts/bootstrap.sh installs it)"
        )
    return run(*args, **kw)


def quiet(*args: str | os.PathLike, **kw) -> subprocess.CompletedProcess:
    """A tool that must succeed without a word on stderr (no warnings)."""
    done = tool(*args, **kw)
    assert done.stderr == "", f"{' '.join(map(str, args))} warned: {done.stderr.strip()}"
    return done


def getfattr(path: Path, name: str) -> str:
    """One attribute by name, through the getfattr tool (a computed one seals at once)."""
    return quiet("getfattr", "--absolute-names", "--only-values", "-n", name, path).stdout


def status(path: Path) -> str:
    return getfattr(path, "user.snapfs.status")


def snap_id(path: Path) -> str:
    value = getfattr(path, "user.snapfs.id")
    assert value.startswith("s-") and len(value) == 18, value
    return value


def listed(path: Path) -> set[str]:
    return set(os.listxattr(path))


def assert_lists_no_computed(path: Path) -> None:
    names = listed(path)
    computed = {f"user.snapfs.{n}" for n in COMPUTED} & names
    assert not computed, f"listxattr of {path} offers computed attributes {sorted(computed)}"


def assert_sealed(path: Path) -> None:
    """Opening for writing is EPERM, whatever the mode (a sealed snapshot never changes)."""
    for mode in ("r+b", "ab"):
        with pytest.raises(PermissionError) as exc, open(path, mode):
            pass
        assert exc.value.errno == errno.EPERM


def assert_copy_of(copy: Path, source: Path, source_id: str | None = None) -> None:
    assert getfattr(copy, "user.snapfs.source_snapshot_id") == (source_id or snap_id(source))
    assert getfattr(copy, "user.snapfs.source_region") == source.parent.name
    assert snap_id(copy) != (source_id or snap_id(source))


def settled(path: Path, timeout: float = 60) -> str:
    """Wait for a copy (mv, snapfs copy) to finish; its final status."""
    return wait_for(lambda: status(path) in ("available", "failed") and status(path), timeout)


def make_image(path: Path, size: int = 32 * MiB, seed: int = 12) -> Path:
    """A disk-like image: random and text extents between zero runs (holes)."""
    diskimage.create(path, size, seed=seed)
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img")


@pytest.fixture
def other(mnt: SnapfsMount, region: Path) -> Path:
    """A second region beside `region`."""
    path = mnt.path / "eu-west-1"
    path.mkdir()
    return path


@pytest.fixture
def settle_mnt(tmp_path: Path) -> Iterator[SnapfsMount]:
    """A mount that seals a snapshot SETTLE seconds after its last writer closed."""
    yield from _mounted(tmp_path, "--settle", str(SETTLE))


# --- loop mounts -----------------------------------------------------------------------------


def loop_released(image: Path) -> bool:
    return tool("losetup", "-j", image).stdout.strip() == ""


@contextlib.contextmanager
def loop_mounted(image: Path, mountpoint: Path, *options: str) -> Iterator[Path]:
    """`mount -o loop[,OPTIONS]`; always unmounted, and the loop device gone, afterwards."""
    mountpoint.mkdir(exist_ok=True)
    tool("mount", "-o", ",".join(("loop", *options)), image, mountpoint)
    try:
        yield mountpoint
    finally:
        tool("umount", mountpoint)
        # mount -o loop sets autoclear: the device lets go of the file once unmounted.
        assert wait_for(lambda: loop_released(image), 20), tool("losetup", "-j", image).stdout


def seal_when_released(m: SnapfsMount, path: Path, timeout: float = 20) -> None:
    """`snapfs seal`, once the kernel has released the loop device's handle (it does so from
    a worker, so the last release can reach the daemon just after umount returned)."""
    done = wait_for(lambda: m.cli("seal", path, check=False).returncode == 0, timeout)
    assert done, m.cli("seal", path, check=False).stderr


# --- qemu-img and qemu-io -----------------------------------------------------------------------


def test_qemu_img_convert_raw_into_a_region(image: Path, region: Path) -> None:
    dst = region / "disk.raw"
    quiet("qemu-img", "convert", "-f", "raw", "-O", "raw", image, dst)
    assert status(dst) == "available"
    quiet("qemu-img", "compare", "-f", "raw", "-F", "raw", image, dst)
    assert sha256(dst) == sha256(image)
    assert dst.stat().st_size == image.stat().st_size


def test_qemu_img_convert_qcow2_into_a_region(tmp_path: Path, image: Path, region: Path) -> None:
    dst = region / "disk.qcow2"
    quiet("qemu-img", "convert", "-f", "raw", "-O", "qcow2", image, dst)
    assert status(dst) == "available"
    check = quiet("qemu-img", "check", "-f", "qcow2", dst)
    assert "No errors were found" in check.stdout
    quiet("qemu-img", "compare", "-f", "raw", "-F", "qcow2", image, dst)
    back = tmp_path / "back.raw"  # and out again, read-only
    quiet("qemu-img", "convert", "-f", "qcow2", "-O", "raw", dst, back)
    assert sha256(back) == sha256(image)


def test_qemu_img_dd_into_a_region(image: Path, region: Path) -> None:
    dst = region / "dd.raw"
    quiet("qemu-img", "dd", "-f", "raw", "-O", "raw", "bs=1M", f"if={image}", f"of={dst}")
    assert status(dst) == "available"
    assert sha256(dst) == sha256(image)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_qemu_img_create_then_qemu_io_writes(tmp_path: Path, region: Path, fmt: str) -> None:
    """qemu-img creates and closes the image; qemu-io opens it again and writes into it."""
    writes = ["write -P 0xab 0 1M", "write -P 0xcd 5M 512k", "write -P 0x11 15872k 512k"]
    ref, dst = tmp_path / f"ref.{fmt}", region / f"new.{fmt}"
    for target in (ref, dst):
        quiet("qemu-img", "create", "-q", "-f", fmt, target, "16M")
        args = [a for w in writes for a in ("-c", w)]
        out = quiet("qemu-io", "-f", fmt, *args, target).stdout
        assert out.count("wrote ") == len(writes), out
    assert status(dst) == "available"
    if fmt == "qcow2":
        quiet("qemu-img", "check", "-f", "qcow2", dst)
    quiet("qemu-img", "compare", "-f", fmt, "-F", fmt, ref, dst)
    out = quiet("qemu-io", "-r", "-f", fmt, "-c", "read -P 0xab 0 1M", "-c", "read -P 0 1M 4M", dst)
    assert "Pattern verification failed" not in out.stdout, out.stdout
    if fmt == "raw":
        assert sha256(dst) == sha256(ref)
        assert dst.stat().st_size == 16 * MiB


# --- shell idioms: create, close, open again ---------------------------------------------------


def test_truncate_then_dd_notrunc(tmp_path: Path, region: Path) -> None:
    chunk, ref, dst = tmp_path / "chunk", tmp_path / "ref.img", region / "t.img"
    chunk.write_bytes(os.urandom(3 * MiB + 333))
    for target in (ref, dst):
        tool("truncate", "-s", "16M", target)
        tool("dd", f"if={chunk}", f"of={target}", "bs=1M", "seek=5", "conv=notrunc", "status=none")
    assert status(dst) == "available"
    assert dst.stat().st_size == 16 * MiB
    assert sha256(dst) == sha256(ref)


def test_touch_then_cat_append(image: Path, region: Path) -> None:
    dst = region / "appended.img"
    tool("touch", dst)
    tool("sh", "-c", 'cat "$1" >> "$2"', "sh", image, dst)
    assert status(dst) == "available"
    assert sha256(dst) == sha256(image)


def test_dd_in_two_invocations(image: Path, region: Path) -> None:
    dst = region / "two.img"
    half = image.stat().st_size // MiB // 2
    tool("dd", f"if={image}", f"of={dst}", "bs=1M", f"count={half}", "status=none")
    tool(
        "dd", f"if={image}", f"of={dst}", "bs=1M", f"skip={half}", f"seek={half}",
        "conv=notrunc", "status=none",
    )  # fmt: skip
    assert status(dst) == "available"
    assert sha256(dst) == sha256(image)


def test_python_append_twice(image: Path, region: Path) -> None:
    data = image.read_bytes()
    dst = region / "ab.img"
    cut = 13 * MiB + 4321
    with open(dst, "ab") as f:
        f.write(data[:cut])
    with open(dst, "ab") as f:
        f.write(data[cut:])
    assert status(dst) == "available"
    assert sha256(dst) == sha256(image)


def test_a_writer_that_reopens_before_the_settle_period_continues(region: Path) -> None:
    """Closed, read back (reading does not seal it, in any process), opened again: the
    writer just goes on."""
    first, second = os.urandom(MiB + 17), os.urandom(2 * MiB)
    dst = region / "reopened.img"
    dst.write_bytes(first)
    assert dst.read_bytes() == first
    assert tool("sha256sum", dst).stdout.split()[0] == hashlib.sha256(first).hexdigest()
    with open(dst, "r+b") as f:  # no EPERM: still creating
        f.seek(0, os.SEEK_END)
        f.write(second)
    with open(dst, "r+b") as f:
        f.write(b"X")
    assert status(dst) == "available"
    assert dst.read_bytes() == b"X" + first[1:] + second
    assert_sealed(dst)


# --- fallocate ---------------------------------------------------------------------------------


def test_fallocate_fails_and_the_fallbacks_give_the_image(tmp_path: Path, region: Path) -> None:
    chunk, ref, dst = tmp_path / "chunk", tmp_path / "ref.img", region / "fa.img"
    chunk.write_bytes(os.urandom(2 * MiB + 99))
    failed = tool("fallocate", "-l", "16M", dst, check=False)
    assert failed.returncode != 0
    assert "Operation not supported" in failed.stderr, failed.stderr
    assert dst.exists() and dst.stat().st_size == 0
    # Still creating: dd writes into it (no EPERM) and its result is exact.
    for target in (ref, dst):
        tool("dd", f"if={chunk}", f"of={target}", "bs=1M", "seek=3", "conv=notrunc", "status=none")
    assert status(dst) == "available"
    assert sha256(dst) == sha256(ref)

    # posix_fallocate: glibc falls back to writing a byte per block on EOPNOTSUPP.
    emulated = region / "posix.img"
    data = os.urandom(MiB)
    fd = os.open(emulated, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 8 * MiB)
        os.pwrite(fd, data, 3 * MiB)
    finally:
        os.close(fd)
    assert status(emulated) == "available"
    assert emulated.read_bytes() == bytes(3 * MiB) + data + bytes(4 * MiB)


# --- ext4 images and loop mounts --------------------------------------------------------------


def payload() -> dict[str, bytes]:
    return {
        "random.bin": os.urandom(3 * MiB + 5),
        "text.txt": b"snapfs loop mount\n" * 20_000,
        "empty": b"",
    }


def test_mkfs_ext4_loop_mount_rw_then_ro(mnt: SnapfsMount, tmp_path: Path, region: Path) -> None:
    img = region / "fs.img"
    tool("truncate", "-s", "64M", img)
    tool("mkfs.ext4", "-q", "-F", img)
    files = payload()
    with loop_mounted(img, tmp_path / "rw") as mp:
        (mp / "dir").mkdir()
        for name, data in files.items():
            (mp / "dir" / name).write_bytes(data)
    seal_when_released(mnt, img)
    assert status(img) == "available"
    assert_sealed(img)
    tool("e2fsck", "-f", "-n", img)
    with loop_mounted(img, tmp_path / "ro", "ro") as mp:
        for name, data in files.items():
            assert (mp / "dir" / name).read_bytes() == data, name


def test_local_ext4_image_copied_in_and_loop_mounted_ro(tmp_path: Path, region: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    files = payload()
    for name, data in files.items():
        (tree / name).write_bytes(data)
    local = tmp_path / "local-fs.img"
    tool("truncate", "-s", "32M", local)
    tool("mkfs.ext4", "-q", "-F", "-d", tree, local)
    tool("cp", local, region)
    img = region / local.name
    assert status(img) == "available"
    assert sha256(img) == sha256(local)
    with loop_mounted(img, tmp_path / "ro", "ro") as mp:
        for name, data in files.items():
            assert (mp / name).read_bytes() == data, name
    assert sha256(img) == sha256(local)


# --- rsync, cp, tar, shutil: extended attributes and lineage ----------------------------------


def tagged_copy(src: Path, dst: Path) -> Path:
    """A file with a tag and a description (the writable, copyable attributes)."""
    shutil.copyfile(src, dst)
    os.setxattr(dst, "user.tag.env", b"prod")
    os.setxattr(dst, "user.snapfs.description", b"nightly db-1")
    return dst


def assert_attrs_copied(path: Path) -> None:
    assert os.getxattr(path, "user.tag.env") == b"prod"
    assert os.getxattr(path, "user.snapfs.description") == b"nightly db-1"


def test_rsync_into_and_out_of_a_region(tmp_path: Path, image: Path, region: Path) -> None:
    src = tagged_copy(image, tmp_path / "tagged.img")
    quiet("rsync", "-aX", src, region)
    dst = region / src.name
    assert status(dst) == "available"
    assert sha256(dst) == sha256(image)
    assert_attrs_copied(dst)
    assert_lists_no_computed(dst)
    assert dst.stat().st_mtime_ns // 1_000_000_000 == src.stat().st_mtime_ns // 1_000_000_000
    out = tmp_path / "out"
    out.mkdir()
    quiet("rsync", "-aX", dst, out)
    assert sha256(out / src.name) == sha256(image)
    assert_attrs_copied(out / src.name)
    assert not {n for n in listed(out / src.name) if n.split(".")[-1] in COMPUTED}


def test_rsync_between_regions_records_lineage(image: Path, region: Path, other: Path) -> None:
    src = tagged_copy(image, region / "db.img")
    src_id = snap_id(src)  # sealed now
    quiet("rsync", "-aX", src, other)  # sender and receiver processes, temp file + rename
    dst = other / src.name
    assert status(dst) == "available"
    assert sha256(dst) == sha256(image)
    assert_copy_of(dst, src, src_id)
    assert_attrs_copied(dst)
    assert snap_id(src) == src_id and sha256(src) == sha256(image)  # the source is unchanged


def test_rsync_whole_regions(tmp_path: Path, region: Path, other: Path) -> None:
    """`rsync -aX DIR/ REGION/` and `rsync -aX REGION/ REGION/`: the region directories
    themselves take part (their times and mode; they list no attributes)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    make_image(tree / "a.img", 8 * MiB, seed=1)
    tagged_copy(make_image(tmp_path / "b.img", 16 * MiB, seed=2), tree / "b.img")
    os.utime(tree, (1_600_000_000, 1_600_000_000))  # unlike the region's: rsync sets it
    quiet("rsync", "-aX", f"{tree}/", f"{region}/")
    assert listed(region) == set()
    ids = {}
    for name in ("a.img", "b.img"):
        assert sha256(region / name) == sha256(tree / name)
        ids[name] = snap_id(region / name)
    quiet("rsync", "-aX", f"{region}/", f"{other}/")
    for name in ("a.img", "b.img"):
        assert sha256(other / name) == sha256(tree / name)
        assert_copy_of(other / name, region / name, ids[name])
    assert_attrs_copied(other / "b.img")


def test_dd_between_regions_records_lineage(image: Path, region: Path, other: Path) -> None:
    src = region / "dd-src.img"
    tool("cp", image, src)
    src_id = snap_id(src)
    tool("dd", f"if={src}", f"of={other / 'dd-dst.img'}", "bs=1M", "status=none")
    dst = other / "dd-dst.img"
    assert status(dst) == "available"
    assert sha256(dst) == sha256(image)
    assert_copy_of(dst, src, src_id)


def test_an_image_of_the_same_size_read_meanwhile_is_not_sealed_by_lineage(
    region: Path, other: Path
) -> None:
    """Lineage by content looks at what was read while a snapshot was written; an unrelated
    image of the same size that is still settling (its tool is about to reopen it) must not
    be sealed by that look."""
    blank = region / "blank.img"
    tool("qemu-img", "create", "-q", "-f", "raw", blank, "8M")
    with open(blank, "rb") as probe:  # e.g. blkid or qemu-img info
        probe.read(4096)
        tool("dd", "if=/dev/urandom", f"of={other / 'busy.img'}", "bs=1M", "count=8",
             "status=none")  # fmt: skip
    assert status(other / "busy.img") == "available"
    # The blank image's tool carries on: it is not sealed.
    tool("dd", "if=/dev/zero", f"of={blank}", "bs=4k", "count=1", "conv=notrunc", "status=none")
    assert status(blank) == "available"


@pytest.mark.parametrize("preserve", ["-a", "--preserve=all"])
def test_cp_preserving_between_regions_and_out(
    tmp_path: Path, image: Path, region: Path, other: Path, preserve: str
) -> None:
    src = tagged_copy(image, region / "cp.img")
    src_id = snap_id(src)
    quiet("cp", preserve, src, other / "cp.img")
    dst = other / "cp.img"
    assert status(dst) == "available"
    assert sha256(dst) == sha256(image)
    assert_copy_of(dst, src, src_id)
    assert_attrs_copied(dst)
    assert int(dst.stat().st_mtime) == int(src.stat().st_mtime)
    out = tmp_path / "out.img"
    quiet("cp", preserve, dst, out)
    assert sha256(out) == sha256(image)
    assert_attrs_copied(out)
    into = region / "back.img"
    quiet("cp", preserve, out, into)
    assert sha256(into) == sha256(image)
    assert_attrs_copied(into)


def test_rsync_sparse_into_a_region(image: Path, region: Path) -> None:
    quiet("rsync", "--sparse", image, region)
    dst = region / image.name
    assert status(dst) == "available"
    assert sha256(dst) == sha256(image)
    assert dst.stat().st_size == image.stat().st_size
    assert dst.stat().st_blocks * 512 < dst.stat().st_size  # its zero runs are holes


def test_tar_sparse_with_xattrs_from_a_region_into_another(
    tmp_path: Path, image: Path, region: Path, other: Path
) -> None:
    tagged_copy(image, region / "x.img")
    make_image(region / "y.img", 8 * MiB, seed=3)
    archive = tmp_path / "r.tar"
    quiet("tar", "-S", "--xattrs", "-cf", archive, "-C", region, "x.img", "y.img")
    quiet("tar", "-S", "--xattrs", "-xf", archive, "-C", other)
    for name in ("x.img", "y.img"):
        assert status(other / name) == "available"
        assert sha256(other / name) == sha256(region / name)
    assert sha256(other / "x.img") == sha256(image)
    assert_attrs_copied(other / "x.img")
    assert_lists_no_computed(other / "x.img")
    local = tmp_path / "extracted"
    local.mkdir()
    quiet("tar", "--xattrs", "-xf", archive, "-C", local)
    assert sha256(local / "x.img") == sha256(image)
    assert_attrs_copied(local / "x.img")


def test_shutil_copy2_into_between_and_out(
    tmp_path: Path, image: Path, region: Path, other: Path
) -> None:
    src = tagged_copy(image, tmp_path / "src.img")
    into = Path(shutil.copy2(src, region / "c2.img"))
    assert status(into) == "available"
    assert sha256(into) == sha256(image)
    assert_attrs_copied(into)
    between = Path(shutil.copy2(into, other / "c2.img"))
    assert sha256(between) == sha256(image)
    assert_copy_of(between, into)
    assert_attrs_copied(between)
    out = Path(shutil.copy2(between, tmp_path / "out.img"))
    assert sha256(out) == sha256(image)
    assert_attrs_copied(out)
    assert not {n for n in listed(out) if n.split(".")[-1] in COMPUTED}


def test_computed_attributes_are_read_by_name_not_listed(
    image: Path, region: Path, other: Path
) -> None:
    src = region / "attrs.img"
    tool("cp", image, src)
    assert status(src) == "available"
    for name in ("id", "progress", "transferred_bytes", "encrypted", "kms_key_id"):
        getfattr(src, f"user.snapfs.{name}")  # present on every snapshot
    assert listed(src) == set()
    quiet("setfattr", "-n", "user.snapfs.retention_days", "-v", "30", src)
    assert getfattr(src, "user.snapfs.expires_at")
    tool("cp", src, other)
    copy = other / src.name
    assert_copy_of(copy, src)  # source_snapshot_id and source_region, read by name
    assert listed(src) == {"user.snapfs.retention_days"}
    for path in (src, copy):
        assert_lists_no_computed(path)
        dump = quiet("getfattr", "--absolute-names", "-d", "-m", "-", path).stdout
        assert "user.snapfs.status" not in dump and "user.snapfs.id" not in dump, dump
    assert listed(region) == set() and listed(other) == set()
    assert getfattr(region, "user.snapfs.max_parallel_copies") == "100"


# --- mmap --------------------------------------------------------------------------------------


def test_mmap_shared_of_a_sealed_snapshot(image: Path, region: Path) -> None:
    dst = region / "mapped.img"
    tool("cp", image, dst)
    assert status(dst) == "available"
    data = image.read_bytes()
    with (
        open(dst, "rb") as f,
        mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m,
    ):
        assert len(m) == len(data)
        assert m[5 * MiB + 3 : 6 * MiB + 77] == data[5 * MiB + 3 : 6 * MiB + 77]
        assert m[:] == data


def test_the_page_cache_never_serves_an_older_version(region: Path) -> None:
    """A snapshot read while it is written, then changed and sealed, reads its final content
    through the page cache (cat and mmap); a name replaced by another snapshot (rsync's
    rename over it) reads the new one, though the old one's pages were cached."""
    dst = region / "changing.img"
    first = os.urandom(3 * MiB)
    with open(dst, "wb") as f:
        f.write(first)
        f.flush()
        with open(dst, "rb") as reader:  # direct_io while it can change
            assert reader.read() == first
        f.seek(MiB)
        f.write(b"\xab" * MiB)
    final = first[:MiB] + b"\xab" * MiB + first[2 * MiB :]
    assert status(dst) == "available"
    assert dst.read_bytes() == final
    with (
        open(dst, "rb") as f,
        mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m,
    ):
        assert m[:] == final
    other = region / ".incoming"
    replacement = os.urandom(3 * MiB)
    other.write_bytes(replacement)
    assert status(other) == "available"
    os.rename(other, dst)  # the cached pages belong to the old inode
    assert dst.read_bytes() == replacement


def cached_bytes(path: Path) -> int:
    """Bytes of the file in the page cache (fincore: util-linux, essential on Debian)."""
    out = run("fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", path)
    return int(out.stdout.split()[0])


def test_a_random_read_caches_its_whole_frame(region: Path) -> None:
    """A 4 KiB read of a sealed snapshot decodes its 64 KiB frame, and the daemon stores the
    rest of that frame in the page cache (read-around): the neighbouring pages are cached
    and right, also in the file's last, short frame, whose size does not change."""
    size = 4 * MiB + 12345
    data = os.urandom(size)
    snap = region / "around.img"
    snap.write_bytes(data)
    assert status(snap) == "available"
    with open(snap, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert cached_bytes(snap) == 0
        asked = MiB + 5 * 4096  # inside the frame at 1 MiB
        assert os.pread(f.fileno(), 4096, asked) == data[asked : asked + 4096]
        assert wait_for(lambda: cached_bytes(snap) >= 64 * 1024, timeout=5)
        frame = data[MiB : MiB + 64 * 1024]
        assert os.pread(f.fileno(), 64 * 1024, MiB) == frame
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        tail = (size - 1) // 4096 * 4096  # the last, partial page
        assert os.pread(f.fileno(), 4096, tail) == data[tail:]
        assert wait_for(lambda: cached_bytes(snap) > 4096, timeout=5)
        last_frame = size // (64 * 1024) * 64 * 1024
        assert os.pread(f.fileno(), 1 << 20, last_frame) == data[last_frame:]
    assert snap.stat().st_size == size
    assert sha256(snap) == hashlib.sha256(data).hexdigest()


# --- fio ---------------------------------------------------------------------------------------


def fio(tmp_path: Path, *args: str) -> dict:
    done = tool(
        "fio", "--name=snapfs", "--size=16M", "--bs=64k", "--ioengine=psync",
        "--verify=crc32c", "--output-format=json", *args, cwd=tmp_path,
    )  # fmt: skip
    report = json.loads(done.stdout[done.stdout.index("{") :])
    job = report["jobs"][0]
    assert job["error"] == 0, job
    return job


def test_the_mount_reads_ahead_four_mib(mnt: SnapfsMount) -> None:
    """Sealed snapshots are read through the page cache; the kernel's 128 KiB read-ahead
    halves a cold read, so the daemon raises the mount's to 4 MiB (after INIT)."""
    major, minor = mounts.mount_device(mnt.path)
    path = Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb")
    assert wait_for(lambda: path.read_text().strip() == "4096", 5), path.read_text()
    assert wait_for(lambda: "read-ahead of the mount set to 4096 KiB" in mnt.log(), 5)


def test_fio_randwrite_verify_then_verify_the_sealed_file(tmp_path: Path, region: Path) -> None:
    """fio lays the file out, closes it, opens it again for the random writes, and reads it
    back to verify; then a read-only fio verifies every block of the sealed snapshot."""
    target = region / "fio.dat"
    job = fio(tmp_path, f"--filename={target}", "--rw=randwrite", "--randseed=7")
    assert job["write"]["io_bytes"] == 16 * MiB
    assert status(target) == "available"
    assert target.stat().st_size == 16 * MiB
    # verify_only with rw=randwrite opens O_RDWR (EPERM on a sealed snapshot, as it should be);
    # a read job with verify= checks each block's header and checksum, opening it read-only.
    job = fio(tmp_path, f"--filename={target}", "--rw=read", "--readonly")
    assert job["read"]["io_bytes"] == 16 * MiB
    assert_sealed(target)


# --- restic ------------------------------------------------------------------------------------


def test_restic_backup_restore_and_dump(
    tmp_path: Path, image: Path, region: Path, other: Path
) -> None:
    env = {
        **os.environ,
        "RESTIC_PASSWORD": "snapfs-test",
        "RESTIC_REPOSITORY": str(tmp_path / "repo"),
        "RESTIC_CACHE_DIR": str(tmp_path / "restic-cache"),
    }
    tagged_copy(image, region / "x.img")
    make_image(region / "y.img", 8 * MiB, seed=4)
    quiet("restic", "init", env=env)
    quiet("restic", "backup", ".", env=env, cwd=region)  # the region's snapshots at the top
    quiet("restic", "restore", "latest", "--target", other, env=env)
    for name in ("x.img", "y.img"):
        assert status(other / name) == "available"
        assert sha256(other / name) == sha256(region / name)
    assert_attrs_copied(other / "x.img")
    assert_lists_no_computed(other / "x.img")
    dumped = other / "dumped.img"
    with open(dumped, "wb") as out:
        done = subprocess.run(
            ["restic", "dump", "latest", "/x.img"], stdout=out, stderr=subprocess.PIPE,
            env=env, text=True, check=False,
        )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert status(dumped) == "available"
    assert sha256(dumped) == sha256(image)


# --- writers in parallel ---------------------------------------------------------------------


def test_two_processes_write_two_snapshots_at_once(tmp_path: Path, region: Path) -> None:
    sources = [make_image(tmp_path / f"p{i}.img", 24 * MiB, seed=30 + i) for i in range(2)]
    procs = [
        subprocess.Popen(
            ["dd", f"if={s}", f"of={region / s.name}", "bs=64k", "status=none"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in sources
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    for s in sources:
        assert status(region / s.name) == "available"
        assert sha256(region / s.name) == sha256(s)


def test_two_processes_write_one_snapshot_at_once(tmp_path: Path, region: Path) -> None:
    halves = [tmp_path / "h0", tmp_path / "h1"]
    for h in halves:
        h.write_bytes(os.urandom(8 * MiB))
    ref, dst = tmp_path / "ref.img", region / "shared.img"
    ref.write_bytes(halves[0].read_bytes() + halves[1].read_bytes())
    tool("truncate", "-s", "16M", dst)
    procs = [
        subprocess.Popen(
            ["dd", f"if={h}", f"of={dst}", "bs=64k", f"seek={i * 128}", "conv=notrunc"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, h in enumerate(halves)
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert status(dst) == "available"
    assert sha256(dst) == sha256(ref)


def test_two_handles_of_one_snapshot(region: Path) -> None:
    blocks = [os.urandom(256 << 10) for _ in range(16)]
    dst = region / "handles.img"
    with open(dst, "wb") as h1, open(dst, "r+b") as h2:
        for i, block in enumerate(blocks[:12]):
            h = h1 if i % 2 else h2
            h.seek(i * len(block))
            h.write(block)
            h.flush()
        h1.close()  # one handle closed, the other still writes
        for i, block in enumerate(blocks[12:], 12):
            h2.seek(i * len(block))
            h2.write(block)
    assert status(dst) == "available"
    assert dst.read_bytes() == b"".join(blocks)


# --- sealing at once, without sleeps -----------------------------------------------------------


def test_cp_then_getfattr_status_is_available(image: Path, region: Path) -> None:
    dst = region / "x"
    out = quiet(
        "sh", "-c", 'cp "$1" "$2" && getfattr --absolute-names -n user.snapfs.status "$2"',
        "sh", image, dst,
    ).stdout  # fmt: skip
    assert 'user.snapfs.status="available"' in out, out
    assert_sealed(dst)


def test_cp_then_mv_to_another_region(image: Path, region: Path, other: Path) -> None:
    quiet("sh", "-c", 'cp "$1" "$2/x" && mv "$2/x" "$3/"', "sh", image, region, other)
    dst = other / "x"
    assert not (region / "x").exists()
    assert settled(dst) == "available"
    assert sha256(dst) == sha256(image)
    assert getfattr(dst, "user.snapfs.source_region") == region.name
    assert getfattr(dst, "user.snapfs.source_snapshot_id").startswith("s-")


def test_cp_then_cp_to_another_region(image: Path, region: Path, other: Path) -> None:
    quiet("sh", "-c", 'cp "$1" "$2/x" && cp "$2/x" "$3/"', "sh", image, region, other)
    assert status(other / "x") == "available"
    assert sha256(other / "x") == sha256(image)
    assert_copy_of(other / "x", region / "x")
    assert_sealed(region / "x")


def test_snapfs_status_of_a_file_shows_every_attribute(
    mnt: SnapfsMount, image: Path, region: Path, other: Path
) -> None:
    """listxattr hides the computed attributes; `snapfs status FILE` shows them all."""
    tool("cp", image, region / "a.img")
    tool("cp", region / "a.img", other / "a.img")
    tool("setfattr", "-n", "user.tag.env", "-v", "prod", other / "a.img")
    shown = mnt.cli("status", other / "a.img").stdout
    for name in ("id", "status", "progress", "source_snapshot_id", "source_region",
                 "transferred_bytes", "encrypted", "kms_key_id"):  # fmt: skip
        value = getfattr(other / "a.img", f"user.snapfs.{name}")
        assert f'user.snapfs.{name}="{value}"' in shown, shown
    assert 'user.snapfs.status="available"' in shown
    assert 'user.tag.env="prod"' in shown


@pytest.mark.parametrize("command", ["seal", "status", "diff", "copy", "getfattr", "umount"])
def test_commands_that_seal_at_once(
    mnt: SnapfsMount, region: Path, other: Path, command: str
) -> None:
    """Each of these seals a closed `creating` snapshot at once (well inside the 5 s settle)."""
    snap, peer = region / "s.img", region / "peer.img"
    data = os.urandom(MiB + 5)
    snap.write_bytes(data)
    peer.write_bytes(os.urandom(MiB))
    if command == "seal":
        mnt.cli("seal", snap)
    elif command == "status":
        report = json.loads(mnt.cli("status", snap, "--json").stdout)
        entries = [s for r in report["regions"] for s in r["snapshots"] if s["name"] == snap.name]
        assert [s["status"] for s in entries] == ["available"], report
    elif command == "diff":
        mnt.cli("diff", snap, peer)
        assert_sealed(peer)
    elif command == "copy":
        mnt.cli("copy", snap, other, "--name", "s-copy", "--wait")
        assert sha256(other / "s-copy") == sha256(snap)
    elif command == "getfattr":
        assert status(snap) == "available"
    else:
        mnt.remount()
    assert_sealed(snap)
    assert snap.read_bytes() == data


def test_snapfs_seal_waits_for_no_writer(mnt: SnapfsMount, region: Path) -> None:
    """`snapfs seal` refuses a snapshot that is open for writing; the writer goes on."""
    dst = region / "open.img"
    first, second = os.urandom(MiB), os.urandom(MiB + 3)
    with open(dst, "wb") as f:
        f.write(first)
        f.flush()
        refused = mnt.cli("seal", dst, check=False)
        assert refused.returncode != 0 and refused.stderr.strip(), refused
        f.write(second)
    mnt.cli("seal", dst)
    assert_sealed(dst)
    assert status(dst) == "available"
    assert dst.read_bytes() == first + second


def test_a_sealed_snapshot_refuses_writers(image: Path, region: Path) -> None:
    dst = region / "sealed.img"
    tool("cp", image, dst)
    assert status(dst) == "available"
    assert_sealed(dst)
    failed = tool(
        "dd", "if=/dev/zero", f"of={dst}", "bs=4k", "count=1", "conv=notrunc", check=False
    )
    assert failed.returncode != 0 and "not permitted" in failed.stderr, failed.stderr
    failed = tool("qemu-io", "-f", "raw", "-c", "write -P 0 0 4k", dst, check=False)
    assert failed.returncode != 0 and "not permitted" in failed.stderr, failed.stderr
    assert sha256(dst) == sha256(image)


# --- a writer that dies ------------------------------------------------------------------------

WRITER = """
import os, sys, time
data = open(sys.argv[1], "rb").read()
with open(sys.argv[2], "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
    print("written", flush=True)
    time.sleep(300)
"""


def test_a_killed_writer_leaves_a_snapshot_that_seals_after_settling(
    settle_mnt: SnapfsMount, tmp_path: Path
) -> None:
    region = settle_mnt.path / "us-east-1"
    region.mkdir()
    neighbour = region / "neighbour.img"
    tool("cp", make_image(tmp_path / "n.img", 16 * MiB, seed=5), neighbour)
    neighbour_id, neighbour_sum = snap_id(neighbour), sha256(neighbour)

    written = tmp_path / "partial"
    written.write_bytes(os.urandom(5 * MiB // 2 + 777))  # some blocks and a partial one
    victim = region / "victim.img"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(written), str(victim)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.strip() == "written", proc.stderr.read() if proc.poll() is not None else line
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # Nobody touches it: it seals by itself once its (dead) writer's handle is gone.
    time.sleep(SETTLE * 5)
    assert_sealed(victim)
    assert status(victim) == "available"
    assert victim.stat().st_size == written.stat().st_size
    assert sha256(victim) == sha256(written)
    tool("rm", victim)
    assert not victim.exists()
    assert sorted(p.name for p in region.iterdir()) == ["neighbour.img"]
    assert snap_id(neighbour) == neighbour_id and sha256(neighbour) == neighbour_sum
    assert status(neighbour) == "available"
