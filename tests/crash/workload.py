"""The crash workload: every kind of work the daemon does, driven with real tools, and the
verification that nothing was lost after the daemon died somewhere in the middle of it.

Shared by `tests/crash/test_crash_matrix.py` (one named fault point per case) and
`scripts/soak.py crash` (random fault points). The daemon runs with `SNAPFS_FAULT` set and
dies at that point (`snapfs/faults.py`); `run_steps` notices and stops; the store is mounted
again without the fault and `verify` checks, whatever step the daemon died in:

- every snapshot sealed before the crash reads back identical (sha256 of its source image);
- a snapshot that was being written is either gone or complete and identical;
- a moved snapshot exists exactly once, in its old or its new region, complete;
- every copy job resumes and finishes, and its result is identical to its source;
- no snapshot is left `creating`/`copying`, and `snapfs check` finds nothing wrong (no
  missing or corrupt block, no wrong count, no orphaned object, no unreferenced row);
- the daemon logged no traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from snapfs.cli import diskimage
from snapfs.fuse import mounts

from ..conftest import (
    SNAPFS,
    SnapfsMount,
    gc_settled,
    make_key,
    region_report,
    run,
    sha256,
    wait_for,
)

KiB, MiB = 1 << 10, 1 << 20
BLOCK_SIZE = 16 * KiB  # many blocks in small images: several copy batches, a mid-file commit

# name -> (size, seed, zeros): the images the workload writes, copies and deletes.
IMAGES = {
    "base": (3 * MiB, 11, 0.2),
    "mover": (3 * MiB + 5000, 12, 0.3),
    "keep": (2 * MiB, 13, 0.2),
    "doomed": (2 * MiB, 14, 0.0),
    "expiring": (1 * MiB, 15, 0.2),
    "new": (5 * MiB + 123, 16, 0.1),  # > 256 blocks: the writer commits once mid-file
}
# Images made from another by rewriting one 4 KiB page in every VARIANT_EVERY-th block:
# stored as deltas over the original's blocks (formats/delta.py).
VARIANTS = {"variant": "doomed"}
VARIANT_EVERY = 8
# A clone of keep.img (`snapfs clone`) with this 4 KiB page rewritten in place (dd).
CLONE_PATCH_AT = 40 * 4 * KiB
SRC, DST, VAULT = "src", "dst", "vault"
STEP_TIMEOUT = 60.0


@dataclass
class Images:
    """Source images on local disk and their digests."""

    directory: Path
    digests: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.img"

    @classmethod
    def create(cls, directory: Path) -> Images:
        directory.mkdir(parents=True, exist_ok=True)
        images = cls(directory)
        for name, (size, seed, zeros) in IMAGES.items():
            diskimage.create(images.path(name), size, seed=seed, zeros=zeros)
            images.digests[name] = sha256(images.path(name))
        data = bytearray(images.path("keep").read_bytes())
        data[CLONE_PATCH_AT : CLONE_PATCH_AT + 4 * KiB] = b"\x5a" * 4 * KiB
        images.path("cloned").write_bytes(data)
        images.digests["cloned"] = sha256(images.path("cloned"))
        (directory / "patch").write_bytes(b"\x5a" * 4 * KiB)
        for name, original in VARIANTS.items():
            data = bytearray(images.path(original).read_bytes())
            for offset in range(0, len(data) - 4 * KiB, VARIANT_EVERY * BLOCK_SIZE):
                data[offset + 4 * KiB : offset + 8 * KiB] = os.urandom(4 * KiB)
            images.path(name).write_bytes(data)
            images.digests[name] = sha256(images.path(name))
        return images


def build_template(store: Path, mountpoint: Path, images: Images) -> None:
    """A store holding what the workload starts from: src has base, mover, keep, doomed,
    expiring and expiring2; dst has old (base with a changed tail: the cp copy into dst is
    incremental); vault encrypts by default."""
    m = SnapfsMount(store, mountpoint, block_size=BLOCK_SIZE)
    m.mount()
    try:
        for region in (SRC, DST, VAULT):
            (m.path / region).mkdir()
        key = make_key(m, VAULT)
        os.setxattr(m.path / VAULT, "user.snapfs.default_kms_key_id", key.encode())
        os.setxattr(m.path / VAULT, "user.snapfs.encrypt_by_default", b"true")
        for name in ("base", "mover", "keep", "doomed", "expiring"):
            run("cp", images.path(name), m.path / SRC / f"{name}.img")
        run("cp", images.path("expiring"), m.path / SRC / "expiring2.img")
        old = images.directory / "old.img"
        shutil.copyfile(images.path("base"), old)
        with open(old, "r+b") as f:
            f.seek(2 * MiB)
            f.write(os.urandom(256 * KiB))
        images.digests["old"] = sha256(old)
        run("cp", old, m.path / DST / "old.img")
    finally:
        m.teardown()


def clock_env(clock_file: Path) -> dict[str, str]:
    """Retention reads "now" from this file (and sweeps 10 times a second)."""
    if not clock_file.exists():
        clock_file.write_text(str(time.time()))
    return {"SNAPFS_CLOCK_FILE": str(clock_file)}


class DaemonDied(Exception):
    """The daemon is gone: the workload stops where it was."""


class Workload:
    """Runs the steps against a mount whose daemon may die at any moment."""

    def __init__(self, m: SnapfsMount, images: Images, clock_file: Path):
        self.m = m
        self.images = images
        self.clock_file = clock_file
        self.pid = m.pid
        self.died_in: str | None = None

    def dead(self) -> bool:
        return self.pid is None or not mounts.pid_alive(self.pid)

    def _until(self, predicate, what: str) -> None:
        """Wait for `predicate` (which may fail once the mount is gone) or the daemon's death."""

        def done() -> bool:
            if self.dead():
                raise DaemonDied(what)
            try:
                return bool(predicate())
            except OSError:
                if self.dead() or wait_for(self.dead, 5):
                    raise DaemonDied(what) from None
                raise

        assert wait_for(done, STEP_TIMEOUT), f"{what} did not finish"

    def _tool(self, *args: str | os.PathLike) -> None:
        result = run(*args, check=False)
        if result.returncode != 0:
            if wait_for(self.dead, 5):
                raise DaemonDied(" ".join(map(str, args)))
            raise AssertionError(f"{args} failed while the daemon runs: {result.stderr}")

    def _status(self, path: Path) -> str:
        return os.getxattr(path, "user.snapfs.status").decode()

    # --- the steps, in order --------------------------------------------------------------

    def ingest(self) -> None:
        self._tool("cp", self.images.path("new"), self.m.path / SRC / "new.img")
        # Asking the status seals it at once (as `cp && getfattr` does in a script).
        self._until(lambda: self._status(self.m.path / SRC / "new.img") == "available", "seal")

    def cp_copy(self) -> None:
        self._tool("cp", self.m.path / SRC / "base.img", self.m.path / DST / "base.img")
        self._until(lambda: self._status(self.m.path / DST / "base.img") == "available", "seal")

    def move(self) -> None:
        self._tool("mv", self.m.path / SRC / "mover.img", self.m.path / DST / "mover.img")
        self._until(lambda: self._status(self.m.path / DST / "mover.img") == "available", "mv")
        self._until(lambda: gc_settled(self.m.store, SRC), "collection after mv")

    def api_copy(self) -> None:
        request = json.dumps({"source": f"{SRC}/keep.img"}).encode()
        try:
            os.setxattr(self.m.path / VAULT, "user.snapfs.copy", request)
        except OSError:
            if wait_for(self.dead, 5):
                raise DaemonDied("snapfs copy") from None
            raise
        self._until(lambda: self._status(self.m.path / VAULT / "keep.img") == "available", "copy")

    def variant(self) -> None:
        """A variant of doomed.img written while doomed.img is open for reading (as rsync
        reads the file it replaces): stored as deltas over doomed's blocks."""
        try:
            original = os.open(self.m.path / SRC / "doomed.img", os.O_RDONLY)
        except OSError:
            if wait_for(self.dead, 5):
                raise DaemonDied("variant") from None
            raise
        try:
            self._tool("cp", self.images.path("variant"), self.m.path / SRC / "variant.img")
        finally:
            with contextlib.suppress(OSError):  # a dead daemon's mount refuses the close
                os.close(original)
        self._until(lambda: self._status(self.m.path / SRC / "variant.img") == "available", "seal")

    def clone(self) -> None:
        """`snapfs clone` keep.img, one page rewritten in place, sealed."""
        target = self.m.path / SRC / "clone.img"
        self._tool(*SNAPFS, "clone", self.m.path / SRC / "keep.img", target)
        self._tool("dd", f"if={self.images.directory / 'patch'}", f"of={target}", "bs=4096",
                   f"seek={CLONE_PATCH_AT // 4096}", "conv=notrunc", "status=none")  # fmt: skip
        self._until(lambda: self._status(target) == "available", "seal")

    def relay(self) -> None:
        """`snapfs copy` keep.img into dst, then its clone: the clone's copy starts relative
        to keep's copy there and brings only the rows the clone changed."""
        for name in ("keep", "clone"):
            self._tool(*SNAPFS, "copy", self.m.path / SRC / f"{name}.img",
                       self.m.path / DST / name)  # fmt: skip
            self._until(
                lambda n=name: self._status(self.m.path / DST / n) == "available", "copy"
            )

    def delete(self) -> None:
        """rm doomed.img: the blocks variant.img's deltas are over stay as their bases."""
        self._tool("rm", self.m.path / SRC / "doomed.img")
        self._until(lambda: gc_settled(self.m.store, SRC), "collection after rm")

    def drop_variant(self) -> None:
        """rm variant.img: its deltas go, then the bases they kept."""
        self._tool("rm", self.m.path / SRC / "variant.img")
        self._until(lambda: gc_settled(self.m.store, SRC), "collection of the bases")

    def retention(self) -> None:
        for name in ("expiring.img", "expiring2.img"):
            self._tool("setfattr", "-n", "user.snapfs.retention_days", "-v", "1",
                       self.m.path / SRC / name)  # fmt: skip
        self.clock_file.write_text(str(time.time() + 2 * 86400))
        gone = ("expiring.img", "expiring2.img")
        self._until(lambda: not set(gone) & set(os.listdir(self.m.path / SRC)), "retention")
        self._until(lambda: gc_settled(self.m.store, SRC), "collection after retention")

    STEPS = (
        "ingest", "cp_copy", "move", "api_copy", "variant", "clone", "relay", "delete",
        "retention", "drop_variant",
    )  # fmt: skip

    def run_steps(self) -> str | None:
        """Run every step; the name of the step the daemon died in, or None if it lived."""
        for step in self.STEPS:
            try:
                getattr(self, step)()
            except DaemonDied:
                self.died_in = step
                return step
            if self.dead():
                self.died_in = step
                return step
        return None


# What each name may hold after the crash: (region, name) -> image.
EXPECTED = {
    (SRC, "base.img"): "base",
    (SRC, "keep.img"): "keep",
    (SRC, "new.img"): "new",
    (SRC, "doomed.img"): "doomed",
    (SRC, "variant.img"): "variant",
    (SRC, "clone.img"): "cloned",
    (SRC, "expiring.img"): "expiring",
    (SRC, "expiring2.img"): "expiring",
    (SRC, "mover.img"): "mover",
    (DST, "old.img"): "old",
    (DST, "base.img"): "base",
    (DST, "mover.img"): "mover",
    (DST, "keep"): "keep",
    (DST, "clone"): "cloned",
    (VAULT, "keep.img"): "keep",
}
ALWAYS = {(SRC, "base.img"), (SRC, "keep.img"), (DST, "old.img")}


def verify(
    m: SnapfsMount, images: Images, must_exist: set[tuple[str, str]] = frozenset()
) -> dict[str, int]:
    """After a remount without the fault: the promises of the module docstring, and
    `must_exist` (snapshots whose writing the workload saw complete). Returns counts for
    the report (snapshots verified, bytes compared)."""
    present: dict[tuple[str, str], Path] = {}
    for region in (SRC, DST, VAULT):
        for name in os.listdir(m.path / region):
            assert (region, name) in EXPECTED, f"unexpected snapshot {region}/{name}"
            present[(region, name)] = m.path / region / name
    missing = (ALWAYS | must_exist) - present.keys()
    assert not missing, f"sealed snapshots lost: {sorted(missing)}"
    movers = [key for key in present if key[1] == "mover.img"]
    assert len(movers) == 1, f"the moved snapshot exists {len(movers)} times: {movers}"
    for key, path in present.items():
        status = os.getxattr(path, "user.snapfs.status").decode()
        if status == "copying":
            assert wait_for(
                lambda p=path: os.getxattr(p, "user.snapfs.status") != b"copying", STEP_TIMEOUT
            ), f"the copy into {key} did not resume"
            status = os.getxattr(path, "user.snapfs.status").decode()
        assert status == "available", f"{key} is {status} after recovery"
    verified = 0
    for key, path in present.items():
        expected = images.digests[EXPECTED[key]]
        assert sha256(path) == expected, f"{key} reads back different bytes"
        verified += path.stat().st_size
    if (VAULT, "keep.img") in present:
        assert os.getxattr(present[(VAULT, "keep.img")], "user.snapfs.encrypted") == b"true"
    assert wait_for(lambda: all(gc_settled(m.store, r) for r in (SRC, DST, VAULT)), 30)
    m.umount()
    code, report = m.check()
    for region in (SRC, DST, VAULT):
        r = region_report(report, region)
        assert r["orphans"] == 0 and r["unreferenced"] == 0, r
    assert code == 0 and report["ok"], report
    assert "Traceback" not in m.log(), m.log()
    return {"snapshots": len(present), "bytes": verified}


# Snapshots whose `cp` had returned when the daemon died at these points: they must survive.
COMPLETED_BEFORE = {
    ("seal", 1): {(SRC, "new.img")},  # ingest's cp closed; the release was sealing
    ("seal", 2): {(SRC, "new.img"), (DST, "base.img")},  # the cp copy's likewise
}


def fault_env(point: str, hit: int) -> dict[str, str]:
    return {"SNAPFS_FAULT": f"{point}:{hit}"}


def trace_hits(log_text: str) -> dict[str, int]:
    """Highest hit count per fault point in a log written with SNAPFS_FAULT_TRACE=1."""
    hits: dict[str, int] = {}
    marker = "fault point "
    for line in log_text.splitlines():
        at = line.find(marker)
        if at < 0 or "reached (hit " not in line:
            continue
        name, _, rest = line[at + len(marker) :].partition(" reached (hit ")
        hits[name] = max(hits.get(name, 0), int(rest.rstrip(")")))
    return hits


def copy_store(template: Path, store: Path) -> None:
    store.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", str(template), str(store)], check=True)
