"""Security: the mount is private unless --allow-other; the store and key files are its
owner's alone; other users cannot change snapshots or regions that are not theirs, and a
snapshot's metadata never changes another's; names with `..` or `/` are refused."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapfs.fuse import mounts

from ..conftest import SNAPFS, SnapfsMount, encrypt_region, run

NOBODY = 65534
# The venv's interpreter may sit where nobody cannot reach it; the script needs only `os`.
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="snapfs-shared-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


def as_nobody(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run Python `code` as user nobody; it prints the outcome of each attempt."""
    return subprocess.run(
        [SYSTEM_PYTHON, "-c", code, *args], capture_output=True, text=True,
        user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", check=False,
    )  # fmt: skip


def super_options(path: Path) -> set[str]:
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == target:
                return set(right.split()[2].split(","))
    raise AssertionError(f"{path} is not mounted")


TRY_EACH = """
import os, sys, errno
def attempt(what, fn):
    try:
        fn()
        print(what, "ok")
    except OSError as exc:
        print(what, errno.errorcode[exc.errno])
mnt = sys.argv[1]
region, snap = mnt + "/us-east-1", mnt + "/us-east-1/disk.img"
attempt("list", lambda: os.listdir(region))
attempt("read", lambda: open(snap, "rb").read(10))
attempt("read-private", lambda: open(region + "/private.img", "rb").read(10))
attempt("tag", lambda: os.setxattr(snap, "user.tag.owner", b"nobody"))
attempt("describe", lambda: os.setxattr(snap, "user.snapfs.description", b"mine now"))
attempt("untag", lambda: os.removexattr(snap, "user.tag.env"))
attempt("retention", lambda: os.setxattr(snap, "user.snapfs.retention_days", b"1"))
attempt("region-copy", lambda: os.setxattr(region, "user.snapfs.copy",
        b'{"source": "us-east-1/disk.img", "name": "stolen"}'))
attempt("region-setting", lambda: os.setxattr(region, "user.snapfs.max_parallel_copies", b"1"))
attempt("create", lambda: open(region + "/new.img", "wb").close())
attempt("delete", lambda: os.unlink(snap))
attempt("rename", lambda: os.rename(snap, region + "/renamed.img"))
attempt("mkdir", lambda: os.mkdir(mnt + "/eu-west-1"))
"""


def outcomes(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


def test_mount_is_private_unless_allow_other(shared_dir: Path) -> None:
    m = SnapfsMount(shared_dir / "store", shared_dir / "mnt")
    m.mount()
    try:
        (m.path / "us-east-1").mkdir()
        (m.path / "us-east-1" / "disk.img").write_bytes(b"x" * 5000)
        assert "allow_other" not in super_options(m.path)
        seen = outcomes(as_nobody(TRY_EACH, str(m.path)))
        assert seen["list"] == "EACCES" and seen["read"] == "EACCES", seen
        m.umount()

        m.mount("--allow-other")
        assert "allow_other" in super_options(m.path)
        region = m.path / "us-east-1"
        os.setxattr(region / "disk.img", "user.tag.env", b"prod")
        private = region / "private.img"
        private.write_bytes(b"secret")
        private.chmod(0o600)
        before = {n: dict(m.status()["regions"][0]["snapshots"][i])
                  for i, n in enumerate(sorted(os.listdir(region)))}  # fmt: skip
        seen = outcomes(as_nobody(TRY_EACH, str(m.path)))
        # Reading what is world-readable is allowed; nothing else is.
        assert seen.pop("list") == "ok" and seen.pop("read") == "ok"
        assert set(seen.values()) <= {"EACCES", "EPERM"}, seen
        after = {n: dict(m.status()["regions"][0]["snapshots"][i])
                 for i, n in enumerate(sorted(os.listdir(region)))}  # fmt: skip
        assert after == before
        assert os.listdir(m.path) == ["us-east-1"]
        assert os.getxattr(region / "disk.img", "user.tag.env") == b"prod"
        assert "Traceback" not in m.log()
    finally:
        m.teardown()


def test_store_and_key_files_are_private(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir(mode=0o777)
    store.chmod(0o777)  # as a tmpfs root or a careless mkdir would leave it
    old_umask = os.umask(0)  # the daemon must not depend on its caller's umask
    try:
        m = SnapfsMount(store, tmp_path / "mnt")
        m.mount()
    finally:
        os.umask(old_umask)
    try:
        region = m.path / "us-east-1"
        region.mkdir()
        encrypt_region(m, region)
        (region / "disk.img").write_bytes(os.urandom(300_000))
        env = {**os.environ, "SNAPFS_EXPORT_PASSPHRASE": "correct horse"}
        key_id = json.loads(m.cli("key", "list", "--json", "--store", store).stdout)[0]["id"]
        export = tmp_path / "key.json"
        subprocess.run([*SNAPFS, "key", "export", key_id, "--out", str(export), "--store",
                        str(store)], check=True, env=env, capture_output=True)  # fmt: skip
        assert stat.S_IMODE(export.stat().st_mode) == 0o600
        m.umount()
        m.mount()
        exposed = [
            f"{p.relative_to(store)} {stat.filemode(p.stat().st_mode)}"
            for p in [store, *store.rglob("*")]
            if stat.S_IMODE(p.stat().st_mode) & 0o077
        ]
        assert not exposed, exposed
        assert (store / "master.key").exists() and (store / "regions").is_dir()
        assert "was accessible to other users" in m.log()
    finally:
        m.teardown()


def test_metadata_of_one_snapshot_never_changes_another(mnt: SnapfsMount) -> None:
    a, b = mnt.path / "us-east-1", mnt.path / "eu-west-1"
    a.mkdir()
    b.mkdir()
    content = os.urandom(200_000)
    (a / "one.img").write_bytes(content)
    (a / "two.img").write_bytes(content)  # the same blocks, deduplicated
    run("cp", a / "one.img", b / "one.img")  # a copy, lineage to one.img
    for path in (a / "two.img", b / "one.img"):
        os.setxattr(path, "user.tag.env", b"prod")
        os.setxattr(path, "user.snapfs.description", b"only this one")
        os.setxattr(path, "user.snapfs.retention_days", b"7")
    assert os.listxattr(a / "one.img") == os.listxattr(mnt.path / "us-east-1" / "one.img")
    names = set(os.listxattr(a / "one.img"))
    assert not {"user.tag.env", "user.snapfs.description", "user.snapfs.retention_days"} & names
    os.removexattr(b / "one.img", "user.tag.env")
    assert os.getxattr(a / "two.img", "user.tag.env") == b"prod"
    assert (a / "one.img").read_bytes() == (b / "one.img").read_bytes() == content


@pytest.mark.parametrize(
    "request_json",
    [
        {"source": "us-east-1/disk.img", "name": "../escape"},
        {"source": "us-east-1/disk.img", "name": "a/b"},
        {"source": "us-east-1/disk.img", "name": ".."},
        {"source": "us-east-1/../us-east-1/disk.img"},
        {"source": "../us-east-1/disk.img"},
        {"source": "us-east-1/disk.img/.."},
        {"source": "us-east-1/disk.img", "name": "ok-name", "kms_key_id": "../../master.key"},
    ],
)
def test_copy_requests_with_paths_in_names_are_refused(
    request_json: dict, region: Path, mnt: SnapfsMount
) -> None:
    (region / "disk.img").write_bytes(b"d" * 10_000)
    store_before = sorted(p.relative_to(mnt.store) for p in mnt.store.rglob("*"))
    with pytest.raises(OSError) as refused:
        os.setxattr(region, "user.snapfs.copy", json.dumps(request_json).encode())
    assert refused.value.errno in (22, 2, 126)  # EINVAL, ENOENT, ENOKEY
    assert os.listdir(region) == ["disk.img"]
    after = sorted(p.relative_to(mnt.store) for p in mnt.store.rglob("*"))
    assert [p for p in after if p not in store_before and "blocks" not in p.parts] == []
    assert "Traceback" not in mnt.log()


def test_cli_refuses_paths_in_names(region: Path, mnt: SnapfsMount) -> None:
    (region / "disk.img").write_bytes(b"d" * 10_000)
    for args, code in [
        (("copy", region / "disk.img", region, "--name", "../escape"), "InvalidSnapshotName"),
        (("copy", region / "disk.img", region / "a..b/"), "InvalidSnapshotName"),
        (("key", "create", "--region", "../escape", "--store", mnt.store), "InvalidRegionId"),
        (("key", "create", "--region", "a/b", "--store", mnt.store), "InvalidRegionId"),
    ]:
        result = mnt.cli(*args, check=False)
        assert result.returncode != 0 and result.stderr.startswith(code), (args, result.stderr)
        assert "Traceback" not in result.stderr
    with pytest.raises(OSError) as refused:
        (mnt.path / "..hidden").mkdir()
    assert refused.value.errno == 22
    assert os.listdir(region) == ["disk.img"] and os.listdir(mnt.path) == ["us-east-1"]
    assert mounts.mount_fstype(mnt.path) == mounts.FSTYPE
