#!/usr/bin/env python3
"""Scattered 4 KiB writes cost what they changed (issue 16): deltas beside whole blocks, in one
run, with restic and borg.

snapfs stores a block that differs from a block of an earlier snapshot in a few 4 KiB pages
as a delta object (formats/delta.py); the region setting `user.snapfs.deltas` (`on` by
default, `off`: every block whole, the encoding before issue 16) turns it off. This script
measures both encodings side by side on the same mount, the same images and the same
changes, and prints every figure as a ratio to the bytes that changed.

Workloads: a day 1 image (`snapfs.cli.diskimage`, seed 1, default 1 GiB), "dense" (no zero
extents) or "disk-like" (60% zero extents), and a day 2 image that is day 1 with N scattered
4 KiB pages rewritten with random bytes (`scatter`), N being a share of the image's pages
(default 0.2% and 2%), placed "uniform" (N distinct random pages) or "clustered" (runs of
1-16 consecutive pages at random places until N pages). Changed bytes = N x 4096. By default
all 2 x 2 x 2 = 8 combinations run (--images, --shares, --patterns choose fewer); the pages
are drawn with a seed derived from the workload's name, so a workload is the same whichever
others run with it.

Per workload, on one fresh store and mount, for each encoding (regions REGION-deltas with
`user.snapfs.deltas=on`, REGION-whole with `off`, set right after mkdir; the order of the
two alternates from workload to workload):
  - src: `cp` day 1, then day 2, into the region, each until sealed (reading
    user.snapfs.status seals it); the region's stored bytes (`snapfs status --json`,
    totals.stored_bytes) before and after day 2: "stored added"; the ingest seconds of both
    days, and a cold sequential read (`cat`, the snapshot's pages dropped first with
    POSIX_FADV_DONTNEED) of day 1 and of day 2: what deltas cost on the write and read paths;
  - mv: `mv src/day1.img mv/`, then the incremental `mv src/day2.img mv/` (day 2 went in
    before day 1 left src), timed until available; user.snapfs.transferred_bytes of day 2 and
    the destination's stored added;
  - cp: `cp mv/day1.img cp/`, then the incremental `cp mv/day2.img cp/`;
  - copy: `snapfs copy mv/day1.img copy`, then `snapfs copy mv/day2.img copy` (the
    CopySnapshot API), each until available;
  - the copies of day 2 are checked against the image's SHA-256 (--no-verify: not);
  - S3 (--s3): an S3 region on a loopback `rclone serve s3` (scripts/bench_s3.py's server),
    created with `snapfs region create s3-ENC --backend s3://... --endpoint ...` and the same
    deltas setting; `mv mv/day1.img`, then `mv mv/day2.img` into it: transferred bytes, and
    the bytes uploaded, counted as the growth of the server's data directory (objects and
    manifests) during the day 2 copy;
  - encrypted: regions enc-src-ENC and enc-dst-ENC that encrypt by default. A CMK belongs to
    one region (setting enc-src's key on enc-dst is refused, and then enc-dst gets a key of
    its own, so the copy re-encrypts; the report says which happened); day 1 and day 2 into
    enc-src (stored added), then `mv` of day 1 and day 2 into enc-dst (transferred).
  - restic (`backup` of day 1, then day 2, into a fresh local repository) and borg (`create`
    of day 1, then day 2; repokey encryption, lz4), when installed (--no-restic, --no-borg):
    the repository's growth over day 2 (`du -sb`), beside snapfs's stored added.
--check runs `snapfs check` on each workload's store after its unmount; the daemon log's
WARNING and ERROR lines are listed after each workload.

The table, per workload: one row per scenario, the columns deltas, whole blocks, restic and
borg (repository growth, beside "stored added" only), each cell the ratio to the changed
bytes and the absolute MiB. Targets, for the deltas column: transferred / changed <= 2 and
stored added / changed <= 2 ("met" / "MISS"). A scenario that fails is reported with its
error and the tail of the daemon log (STORE/snapfs.log); the other scenarios still run.
Seconds drift on a shared 2-core machine; the byte counts do not.

What "transferred" counts: user.snapfs.transferred_bytes adds a block stored whole at its
plaintext size (as the clouds count a copied block) and a delta at its object's size
(meta/index.py, NewBlock.transferred_size). A page written into a block that was all zero on
day 1 (a hole) is a delta over the zero block (formats/delta.py, ZERO_BASE); the header line
says how many touched blocks were zero on day 1, and the S3 "uploaded" row (--s3) shows the
bytes that actually moved.

    scripts/bench_delta.py [--size 1G] [--images dense,disklike] [--shares 0.002,0.02]
                           [--patterns uniform,clustered] [--s3] [--no-restic] [--no-borg]
                           [--no-verify] [--check] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
if (VENV / "bin" / "python").exists() and Path(sys.prefix).resolve() != VENV.resolve():
    os.execv(VENV / "bin" / "python", [str(VENV / "bin" / "python"), *sys.argv])
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench import du_bytes, settle, sha256_of, timed  # noqa: E402
from bench_compare import cold_read  # noqa: E402

from snapfs.cli import diskimage  # noqa: E402
from snapfs.fuse import mounts  # noqa: E402

MiB = 1 << 20
PAGE = 4096
MAX_RUN = 16  # pages in a clustered run, at most
TARGET = 2.0  # transferred / changed and stored added / changed, for deltas
ENCODINGS = {"deltas": b"on", "whole": b"off"}  # user.snapfs.deltas of the regions
LABELS = {"deltas": "deltas", "whole": "whole blocks", "restic": "restic", "borg": "borg"}
IMAGES = {"dense": 0.0, "disklike": 0.6}  # zero share of diskimage.create
PATTERNS = ("uniform", "clustered")
BUCKET = "snapfs-bench"
PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")

Result = dict[str, Any]


# --- workloads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    image: str  # a key of IMAGES
    share: float  # of the image's pages
    pattern: str  # one of PATTERNS

    @property
    def name(self) -> str:
        return f"{self.image}, {self.share * 100:g}% of pages, {self.pattern}"

    @property
    def tag(self) -> str:  # for bucket prefixes: a-z, 0-9 and '-'
        return f"{self.image}-{self.share:g}-{self.pattern}".replace(".", "p")


def pick_pages(pages: int, share: float, pattern: str, seed: int) -> list[int]:
    """The page numbers `scatter` rewrites, ascending: round(pages x share) of them (at least
    one), "uniform" (distinct random pages) or "clustered" (runs of 1-16 consecutive pages at
    random places; runs may meet or overlap, and the last one stops at the count)."""
    rng = random.Random(seed)
    count = min(pages, max(1, round(pages * share)))
    if pattern == "uniform":
        return sorted(rng.sample(range(pages), count))
    if pattern != "clustered":
        raise ValueError(f"unknown pattern {pattern!r}")
    chosen: set[int] = set()
    while len(chosen) < count:
        first = rng.randrange(pages)
        for page in range(first, min(first + rng.randint(1, MAX_RUN), pages)):
            if len(chosen) == count:
                break
            chosen.add(page)
    return sorted(chosen)


def runs(pages: list[int]) -> Iterator[tuple[int, int]]:
    """(first page, length) of each run of consecutive page numbers in ascending `pages`."""
    start = prev = None
    for page in pages:
        if prev is not None and page == prev + 1:
            prev = page
            continue
        if start is not None:
            yield start, prev - start + 1
        start = prev = page
    if start is not None:
        yield start, prev - start + 1


def scatter(path: Path, share: float, pattern: str, seed: int) -> int:
    """Rewrite `share` of the image's 4 KiB pages in place with random bytes, placed by
    `pattern` ("uniform" or "clustered", see pick_pages); returns the bytes changed."""
    pages = pick_pages(path.stat().st_size // PAGE, share, pattern, seed)
    data = random.Random(seed * 2 + 1)
    with open(path, "r+b") as f:
        for first, length in runs(pages):
            f.seek(first * PAGE)
            f.write(data.randbytes(length * PAGE))
    return len(pages) * PAGE


def zero_blocks(image: Path, block_nos: list[int], block_size: int) -> int:
    """How many of these blocks of the image are all zero (holes: no base for a delta)."""
    count = 0
    with open(image, "rb") as f:
        for n in block_nos:
            data = os.pread(f.fileno(), block_size, n * block_size)
            count += data == bytes(len(data))
    return count


def workloads(args: argparse.Namespace) -> list[Workload]:
    return [Workload(image, share, pattern) for image in args.images for share in args.shares
            for pattern in args.patterns]


# --- the mount --------------------------------------------------------------------------------


class SnapfsFailure(RuntimeError):
    """A snapshot that failed or did not become available: snapfs's doing, not the script's."""


class Mount:
    """One store and its mount for one workload."""

    def __init__(self, work: Path, env: dict[str, str], timeout: float):
        self.store, self.mnt = work / "store", work / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.env, self.timeout = env, timeout

    def cli(self, *args: str | os.PathLike) -> str:
        """`python -m snapfs ARGS`; its stdout. A failure raises with the command's stderr."""
        cmd = [sys.executable, "-m", "snapfs", *map(str, args)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
        if done.returncode != 0:
            raise SnapfsFailure(f"snapfs {' '.join(map(str, args))}: exit {done.returncode}: "
                                f"{done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def mount(self) -> None:
        self.cli("mount", self.mnt, "--store", self.store)

    def unmount(self) -> None:
        try:
            if mounts.mount_fstype(self.mnt):
                self.cli("umount", self.mnt)
        finally:
            if mounts.mount_fstype(self.mnt):
                mounts.fusermount_unmount(self.mnt, lazy=True)

    def status(self) -> Result:
        return json.loads(self.cli("status", "--store", self.store, "--json"))

    def totals(self, region: Path) -> Result:
        return next(r for r in self.status()["regions"] if r["name"] == region.name)["totals"]

    def stored(self, region: Path) -> int:
        """The region's stored bytes, read until two reads 0.2 s apart agree."""
        last = self.totals(region)["stored_bytes"]
        for _ in range(20):
            time.sleep(0.2)
            now = self.totals(region)["stored_bytes"]
            if now == last:
                break
            last = now
        return last

    def delta_objects(self, region: Path) -> int | None:
        """Block rows of the region stored as deltas (read-only look at its index)."""
        db_path = self.store / "regions" / region.name / "index.db"
        with contextlib.suppress(sqlite3.Error):
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
            try:
                return db.execute(
                    "SELECT count(*) FROM blocks WHERE base_id IS NOT NULL").fetchone()[0]
            finally:
                db.close()
        return None

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for name in ("snapfs.log", "daemon.err"):
            with contextlib.suppress(OSError):
                text = (self.store / name).read_text(errors="replace").splitlines()
                if text:
                    out += [f"--- {self.store / name} (last {min(lines, len(text))} lines)"]
                    out += text[-lines:]
        return "\n".join(out)

    def log_problems(self) -> list[str]:
        """The daemon log's WARNING, ERROR and CRITICAL lines and tracebacks."""
        found = []
        for path in sorted(self.store.glob("snapfs.log*"), reverse=True) + [
                self.store / "daemon.err"]:
            with contextlib.suppress(OSError):
                found += [line for line in path.read_text(errors="replace").splitlines()
                          if PROBLEM.search(line)]
        return found

    def wait(self, path: Path) -> None:
        """Until the snapshot is available (reading its status seals it at once)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                status = os.getxattr(path, "user.snapfs.status")
            except FileNotFoundError:  # a copy's file not there yet
                status = b"missing"
            if status == b"available":
                return
            if status == b"failed":
                error = b""
                with contextlib.suppress(OSError):
                    error = os.getxattr(path, "user.snapfs.error")
                raise SnapfsFailure(f"{path}: status failed: {error.decode(errors='replace')}")
            if time.monotonic() > deadline:
                raise SnapfsFailure(f"{path}: still {status.decode()} after {self.timeout:.0f} s")
            time.sleep(0.01)

    def region(self, name: str, setting: bytes) -> Path:
        path = self.mnt / name
        path.mkdir()
        os.setxattr(path, "user.snapfs.deltas", setting)
        return path

    def ingest(self, image: Path, dst: Path) -> float:
        start = time.perf_counter()
        subprocess.run(["cp", str(image), str(dst)], check=True)
        self.wait(dst)
        return time.perf_counter() - start

    def mv(self, src: Path, region: Path) -> tuple[float, float]:
        """(seconds until `mv` returned, seconds until the copy was available)."""
        start = time.perf_counter()
        subprocess.run(["mv", str(src), str(region)], check=True)
        returned = time.perf_counter() - start
        self.wait(region / src.name)
        return returned, time.perf_counter() - start

    def cp(self, src: Path, region: Path) -> float:
        start = time.perf_counter()
        subprocess.run(["cp", str(src), str(region)], check=True)
        self.wait(region / src.name)
        return time.perf_counter() - start

    def copy(self, src: Path, region: Path) -> float:
        """`snapfs copy SRC REGION` (returns at once), until the copy is available."""
        start = time.perf_counter()
        self.cli("copy", src, region)
        self.wait(region / src.name)
        return time.perf_counter() - start


def transferred(path: Path) -> int:
    return int(os.getxattr(path, "user.snapfs.transferred_bytes"))


class Stages:
    """Each stage of an encoding's run in its own try: a failure is recorded with the daemon
    log's tail and printed, and the stages that need it are skipped."""

    def __init__(self, m: Mount, r: Result, enc: str):
        self.m, self.r, self.enc = m, r, enc
        r.setdefault("errors", {})

    @contextlib.contextmanager
    def stage(self, name: str, *needs: str) -> Iterator[bool]:
        missing = [n for n in needs if n in self.r["errors"] or n in self.r.get("skipped", [])]
        if missing:
            self.r.setdefault("skipped", []).append(name)
            yield False
            return
        try:
            yield True
        except Exception as exc:  # recorded, reported; the other stages go on
            tail = self.m.log_tail()
            self.r["errors"][name] = {"error": f"{type(exc).__name__}: {exc}", "log_tail": tail}
            print(f"    {LABELS[self.enc]}: stage {name} FAILED: {type(exc).__name__}: {exc}"
                  f"\n{indent(tail)}", flush=True)

    def verify(self, what: str, path: Path, sha: str | None) -> None:
        if sha is None:
            return
        ok = sha256_of(path) == sha
        self.r.setdefault("verified", {})[what] = ok
        if not ok:
            raise SnapfsFailure(f"{path}: content differs from the image (SHA-256)")


def indent(text: str, prefix: str = "      ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def encoding_run(m: Mount, enc: str, w: Workload, day1: Path, day2: Path, sha2: str | None,
                 server: Any) -> Result:
    r: Result = {}
    s = Stages(m, r, enc)
    setting = ENCODINGS[enc]
    print(f"  {LABELS[enc]} ...", flush=True)
    with s.stage("src") as go:
        if go:
            a = m.region(f"src-{enc}", setting)
            settle()
            r["ingest_day1_s"] = m.ingest(day1, a / day1.name)
            before = m.stored(a)
            settle()
            r["ingest_day2_s"] = m.ingest(day2, a / day2.name)
            r["stored_added"] = m.stored(a) - before
            r["delta_objects_src"] = m.delta_objects(a)
            settle()
            r["read_day1_s"] = cold_read(a / day1.name)
            r["read_day2_s"] = cold_read(a / day2.name)
            s.verify("src", a / day2.name, sha2)
    with s.stage("mv", "src") as go:
        if go:
            b = m.region(f"mv-{enc}", setting)
            r["mv_day1_s"] = m.mv(a / day1.name, b)[1]
            before = m.stored(b)
            r["mv_day2_returned_s"], r["mv_day2_s"] = m.mv(a / day2.name, b)
            r["mv_transferred"] = transferred(b / day2.name)
            r["mv_stored_added"] = m.stored(b) - before
            r["delta_objects_mv"] = m.delta_objects(b)
            s.verify("mv", b / day2.name, sha2)
    for name, method in (("cp", m.cp), ("copy", m.copy)):
        with s.stage(name, "mv") as go:
            if go:
                dst = m.region(f"{name}-{enc}", setting)
                r[f"{name}_day1_s"] = method(b / day1.name, dst)
                before = m.stored(dst)
                r[f"{name}_day2_s"] = method(b / day2.name, dst)
                r[f"{name}_transferred"] = transferred(dst / day2.name)
                r[f"{name}_stored_added"] = m.stored(dst) - before
                r[f"delta_objects_{name}"] = m.delta_objects(dst)
                s.verify(name, dst / day2.name, sha2)
    if server is not None:
        with s.stage("s3", "mv") as go:
            if go:
                s3_run(m, r, s, enc, w, b, day1, day2, sha2, server)
    with s.stage("encrypted") as go:
        if go:
            encrypted_run(m, r, s, enc, day1, day2, sha2)
    return r


def s3_run(m: Mount, r: Result, s: Stages, enc: str, w: Workload, local: Path, day1: Path,
           day2: Path, sha2: str | None, server: Any) -> None:
    """`mv` of day 1, then day 2, from a local region into an S3 region with the same deltas
    setting; uploaded bytes = growth of the server's data directory."""
    name = f"s3-{enc}"
    m.cli("region", "create", name, "--backend", f"s3://{BUCKET}/{w.tag}-{enc}",
          "--endpoint", server.endpoint, "--store", m.store)
    region = m.mnt / name
    deadline = time.monotonic() + 30
    while not region.is_dir():
        if time.monotonic() > deadline:
            raise SnapfsFailure(f"region {name} created but not in the mount after 30 s")
        time.sleep(0.1)
    os.setxattr(region, "user.snapfs.deltas", ENCODINGS[enc])
    prefix = server.data / BUCKET / f"{w.tag}-{enc}"
    start = du_bytes(server.data)
    r["s3_mv_day1_s"] = m.mv(local / day1.name, region)[1]
    wait_manifest(prefix, region / day1.name, m.timeout)
    middle = du_bytes(server.data)
    r["s3_mv_day2_s"] = m.mv(local / day2.name, region)[1]
    r["s3_transferred"] = transferred(region / day2.name)
    r["s3_manifest_bytes"] = wait_manifest(prefix, region / day2.name, m.timeout)
    r["s3_uploaded_day1"] = middle - start
    r["s3_uploaded"] = du_bytes(server.data) - middle
    r["delta_objects_s3"] = m.delta_objects(region)
    s.verify("s3", region / day2.name, sha2)


def wait_manifest(prefix: Path, snapshot: Path, timeout: float) -> int:
    """Until the snapshot's manifest is in the bucket (published shortly after the snapshot
    became available: manifests.py), so that the upload counted includes it; its size."""
    snapshot_id = os.getxattr(snapshot, "user.snapfs.id").decode()
    deadline = time.monotonic() + min(timeout, 60)
    while not (found := list(prefix.glob(f"meta/snapshots/{snapshot_id}*"))):
        if time.monotonic() > deadline:
            raise SnapfsFailure(f"no manifest of {snapshot} ({snapshot_id}) under {prefix}")
        time.sleep(0.1)
    time.sleep(0.5)  # written in place by the server: let it finish
    return sum(f.stat().st_size for f in found)


def encrypted_run(m: Mount, r: Result, s: Stages, enc: str, day1: Path, day2: Path,
                  sha2: str | None) -> None:
    setting = ENCODINGS[enc]
    src, dst = m.region(f"enc-src-{enc}", setting), m.region(f"enc-dst-{enc}", setting)
    key = m.cli("key", "create", "--region", src.name, "--store", m.store).split()[-1]
    os.setxattr(src, "user.snapfs.default_kms_key_id", key.encode())
    os.setxattr(src, "user.snapfs.encrypt_by_default", b"true")
    try:  # the same key, if the destination accepts it
        os.setxattr(dst, "user.snapfs.default_kms_key_id", key.encode())
        r["enc_keys"] = "same key"
    except OSError as exc:  # a CMK belongs to one region: the copy re-encrypts
        own = m.cli("key", "create", "--region", dst.name, "--store", m.store).split()[-1]
        os.setxattr(dst, "user.snapfs.default_kms_key_id", own.encode())
        r["enc_keys"] = f"a key per region (the source's refused: {exc.strerror})"
    os.setxattr(dst, "user.snapfs.encrypt_by_default", b"true")
    settle()
    r["enc_ingest_day1_s"] = m.ingest(day1, src / day1.name)
    before = m.stored(src)
    r["enc_ingest_day2_s"] = m.ingest(day2, src / day2.name)
    r["enc_stored_added"] = m.stored(src) - before
    r["delta_objects_enc_src"] = m.delta_objects(src)
    r["enc_mv_day1_s"] = m.mv(src / day1.name, dst)[1]
    before = m.stored(dst)
    r["enc_mv_day2_s"] = m.mv(src / day2.name, dst)[1]
    r["enc_transferred"] = transferred(dst / day2.name)
    r["enc_mv_stored_added"] = m.stored(dst) - before
    r["delta_objects_enc_dst"] = m.delta_objects(dst)
    s.verify("encrypted", dst / day2.name, sha2)


def snapfs_run(work: Path, w: Workload, index: int, day1: Path, day2: Path, sha2: str | None,
               args: argparse.Namespace, server: Any) -> Result:
    """Both encodings on one fresh store and mount (the order alternates by workload)."""
    import bench_s3

    env = bench_s3._env() if server is not None else dict(os.environ)
    m = Mount(work, env, args.timeout)
    out: Result = {}
    try:
        try:
            m.mount()
        except SnapfsFailure as exc:
            out["error"] = {"error": str(exc), "log_tail": m.log_tail()}
            print(f"  mount FAILED: {exc}\n{indent(out['error']['log_tail'])}", flush=True)
            return out
        for enc in list(ENCODINGS)[:: 1 if index % 2 == 0 else -1]:
            out[enc] = encoding_run(m, enc, w, day1, day2, sha2, server)
        out["block_size"] = m.status()["block_size"]
    finally:
        try:
            m.unmount()
        finally:
            out["log_problems"] = m.log_problems()
            if args.check and not mounts.mount_fstype(m.mnt) and m.store.exists():
                out["check"] = store_check(m)
            shutil.rmtree(m.store, ignore_errors=True)
    return out


def store_check(m: Mount) -> Result:
    done = subprocess.run([sys.executable, "-m", "snapfs", "check", "--store", str(m.store),
                           "--json"], capture_output=True, text=True, env=m.env)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        report = {"stdout": done.stdout[-2000:]}
    result = {"exit": done.returncode, "report": report, "stderr": done.stderr[-2000:]}
    if done.returncode != 0:
        print(f"  snapfs check: exit {done.returncode}\n{indent(json.dumps(report)[:3000])}"
              f"\n{indent(done.stderr[-2000:])}", flush=True)
    return result


# --- restic and borg --------------------------------------------------------------------------


def restic_run(work: Path, day1: Path, day2: Path) -> Result:
    """`restic backup` of day 1, then of day 2, into a fresh repository: its growth."""
    env = dict(os.environ, RESTIC_PASSWORD="bench")
    repo = work / "restic"
    try:
        timed("restic", "-q", "-r", repo, "init", env=env)
        day1_s = timed("restic", "-q", "-r", repo, "backup", day1, env=env)
        before = du_bytes(repo)
        day2_s = timed("restic", "-q", "-r", repo, "backup", day2, env=env)
        return {"growth": du_bytes(repo) - before, "day1_s": day1_s, "day2_s": day2_s}
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def borg_run(work: Path, day1: Path, day2: Path) -> Result:
    """`borg create` of day 1, then of day 2 (repokey, lz4: its defaults): the growth."""
    env = dict(os.environ, BORG_PASSPHRASE="bench", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
               BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")
    repo = work / "borg"
    try:
        subprocess.run(["borg", "init", "-e", "repokey", str(repo)], env=env, check=True,
                       capture_output=True)  # not its advice to write down the passphrase
        day1_s = timed("borg", "create", f"{repo}::day1", day1, env=env)
        before = du_bytes(repo)
        day2_s = timed("borg", "create", f"{repo}::day2", day2, env=env)
        return {"growth": du_bytes(repo) - before, "day1_s": day1_s, "day2_s": day2_s}
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def tool_run(name: str, fn: Any, work: Path, day1: Path, day2: Path) -> Result:
    settle()
    print(f"  {name} ...", flush=True)
    try:
        return fn(work, day1, day2)
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"    {name} failed: {exc}", flush=True)
        return {"error": str(exc)}


# --- the report -------------------------------------------------------------------------------

# (label, key, kind): kind "stored" or "transferred" (both have the target), "growth" (the
# row that also has restic's and borg's repository growth)
ROWS = (
    ("stored added, ingest of day 2", "stored_added", "growth"),
    ("mv copy of day 2: transferred", "mv_transferred", "transferred"),
    ("mv copy of day 2: stored added", "mv_stored_added", "stored"),
    ("cp copy of day 2: transferred", "cp_transferred", "transferred"),
    ("cp copy of day 2: stored added", "cp_stored_added", "stored"),
    ("snapfs copy of day 2: transferred", "copy_transferred", "transferred"),
    ("snapfs copy of day 2: stored added", "copy_stored_added", "stored"),
    ("S3 mv copy of day 2: transferred", "s3_transferred", "transferred"),
    ("S3 mv copy of day 2: uploaded", "s3_uploaded", "transferred"),
    ("encrypted: stored added, day 2", "enc_stored_added", "stored"),
    ("encrypted mv copy: transferred", "enc_transferred", "transferred"),
    ("encrypted mv copy: stored added", "enc_mv_stored_added", "stored"),
)
SECONDS = (
    ("ingest of day 1 (cp, until sealed)", "ingest_day1_s"),
    ("ingest of day 2", "ingest_day2_s"),
    ("cold read of day 1 (cat)", "read_day1_s"),
    ("cold read of day 2 (cat)", "read_day2_s"),
    ("mv copy of day 2, until available", "mv_day2_s"),
    ("cp copy of day 2", "cp_day2_s"),
    ("snapfs copy of day 2, until available", "copy_day2_s"),
    ("S3 mv copy of day 2", "s3_mv_day2_s"),
    ("encrypted ingest of day 2", "enc_ingest_day2_s"),
    ("encrypted mv copy of day 2", "enc_mv_day2_s"),
)
CELL = 20  # len(cell(...))
LABEL = 38  # width of the first column


def cell(value: int | None, changed: int) -> str:
    if value is None:
        return f"{'-':>{CELL}}"
    return f"{value / changed:7.2f}x {value / MiB:7.2f} MiB"


def targets(result: Result) -> list[tuple[str, float, bool]]:
    """(row label, ratio, met) of the deltas column's rows that have a value."""
    deltas = result["snapfs"].get("deltas", {})
    changed = result["changed_bytes"]
    out = []
    for label, key, _ in ROWS:
        if deltas.get(key) is not None:
            ratio = deltas[key] / changed
            out.append((label, ratio, ratio <= TARGET))
    return out


def report(result: Result) -> None:
    changed, snap = result["changed_bytes"], result["snapfs"]
    block = snap.get("block_size") or 0
    print(f"\n== {result['workload']}: {result['pages']} pages = {changed / MiB:.2f} MiB changed"
          f" of a {result['image_bytes'] / MiB:.0f} MiB image;\n   the pages lie in "
          f"{result['blocks_touched']} of its {result['blocks']} {block // 1024} KiB blocks, "
          f"{result['blocks_touched_zero_on_day1']} of those all zero on day 1 (deltas over "
          "the zero block)")
    cols = ["deltas", "whole"] + [t for t in ("restic", "borg") if t in result]
    print(f"{'scenario (ratio to changed bytes)':{LABEL}}"
          + "".join(f"{LABELS[c]:>{CELL + 2}}" for c in cols) + "  target (deltas <= 2)")
    met = {label: ok for label, _, ok in targets(result)}
    for label, key, kind in ROWS:
        values = [snap.get(c, {}).get(key) for c in ("deltas", "whole")]
        if all(v is None for v in values):
            continue
        line = f"{label:{LABEL}}" + "".join(f"  {cell(v, changed)}" for v in values)
        for tool in cols[2:]:
            growth = result[tool].get("growth") if kind == "growth" else None
            line += f"  {cell(growth, changed)}"
        if label in met:
            line += f"  {'met' if met[label] else 'MISS'}"
        print(line)
    print(f"{'seconds':{LABEL}}" + "".join(f"{LABELS[c]:>{CELL + 2}}" for c in ("deltas", "whole")))
    for label, key in SECONDS:
        values = [snap.get(c, {}).get(key) for c in ("deltas", "whole")]
        if all(v is None for v in values):
            continue
        print(f"{label:{LABEL}}" + "".join(f"{'-' if v is None else f'{v:.2f} s':>{CELL + 2}}"
                                      for v in values))
    for tool in cols[2:]:
        t = result[tool]
        if "day2_s" in t:
            print(f"{LABELS[tool] + ' of day 2 (s)':{LABEL}}{t['day2_s']:>{CELL}.2f} s"
                  f"   (day 1: {t['day1_s']:.2f} s)")
    for enc in ("deltas", "whole"):
        r = snap.get(enc, {})
        objects = {k.removeprefix("delta_objects_"): v for k, v in r.items()
                   if k.startswith("delta_objects_")}
        if objects:
            print(f"{'delta objects, ' + LABELS[enc]:{LABEL}}"
                  + ", ".join(f"{k} {v}" for k, v in objects.items()))
        if "enc_keys" in r:
            print(f"{'encrypted regions, ' + LABELS[enc]:{LABEL}}{r['enc_keys']}")
        bad = [k for k, ok in r.get("verified", {}).items() if not ok]
        if r.get("verified"):
            print(f"{'SHA-256 of day 2, ' + LABELS[enc]:{LABEL}}"
                  + ("all equal to the image's" if not bad else f"DIFFERS in {', '.join(bad)}")
                  + f" ({', '.join(r['verified'])})")
        for stage, err in r.get("errors", {}).items():
            print(f"FAILED ({LABELS[enc]}, {stage}): {err['error']}")
        if r.get("skipped"):
            print(f"skipped ({LABELS[enc]}): {', '.join(r['skipped'])}")
    for tool in cols[2:]:
        if "error" in result[tool]:
            print(f"{tool} failed: {result[tool]['error']}")
    if "check" in snap:
        print(f"snapfs check: exit {snap['check']['exit']}")
    problems = snap.get("log_problems", [])
    print(f"daemon log: {len(problems)} WARNING/ERROR lines" + (":" if problems else ""))
    for line in problems[:10]:
        print(f"  {line[:200]}")
    if len(problems) > 10:
        print(f"  ... and {len(problems) - 10} more (all in the JSON)")


def summary(results: list[Result]) -> list[str]:
    print("\n== targets, deltas (transferred / changed <= 2, stored added / changed <= 2)")
    missed = []
    for result in results:
        t = targets(result)
        misses = [f"{label} {ratio:.2f}x" for label, ratio, ok in t if not ok]
        errors = sum(len(result["snapfs"].get(e, {}).get("errors", {})) for e in ENCODINGS)
        print(f"  {result['workload']:38} {len(t) - len(misses)}/{len(t)} met"
              + (f"; MISS: {'; '.join(misses)}" if misses else "")
              + (f"; {errors} stage(s) FAILED" if errors else ""))
        missed += [f"{result['workload']}: {m}" for m in misses]
    return missed


# --- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    def names(allowed: tuple[str, ...]) -> Any:
        def parse(text: str) -> list[str]:
            items = [t.strip().replace("-", "") for t in text.split(",") if t.strip()]
            for item in items:
                if item not in allowed:
                    raise argparse.ArgumentTypeError(f"{item!r}: one of {', '.join(allowed)}")
            return items
        return parse

    def shares(text: str) -> list[float]:
        values = [float(t) for t in text.split(",") if t.strip()]
        if not all(0 < v <= 1 for v in values):
            raise argparse.ArgumentTypeError("shares are in (0, 1]")
        return values

    parser.add_argument("--size", default="1G", help="image size (default 1G)")
    parser.add_argument("--images", type=names(tuple(IMAGES)), default=list(IMAGES),
                        help="dense,disklike (default both)")
    parser.add_argument("--shares", type=shares, default=[0.002, 0.02],
                        help="shares of the 4 KiB pages changed (default 0.002,0.02)")
    parser.add_argument("--patterns", type=names(PATTERNS), default=list(PATTERNS),
                        help="uniform,clustered (default both)")
    parser.add_argument("--s3", action="store_true",
                        help="also mv copies into an S3 region (rclone serve s3, loopback)")
    parser.add_argument("--no-restic", action="store_true", help="skip restic")
    parser.add_argument("--no-borg", action="store_true", help="skip borg")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check the copies of day 2 against the image's SHA-256")
    parser.add_argument("--check", action="store_true",
                        help="run `snapfs check` on each workload's store after unmounting")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a snapshot may take to become available (default: "
                        "120 + 1 s per 2 MiB of image)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where images and stores go (default: a temp dir in /tmp)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "bench_delta.json",
                        help="where to write the results (default bench-results/bench_delta.json)")
    return parser.parse_args()


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM unmounts like a Ctrl-C


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, interrupt)
    size = diskimage.parse_size(args.size)
    if args.timeout is None:
        args.timeout = 120 + size / (2 * MiB)
    tools = {name: fn for name, fn, skip in (("restic", restic_run, args.no_restic),
                                             ("borg", borg_run, args.no_borg))
             if not skip and shutil.which(name)}
    for name in ("restic", "borg"):
        if name not in tools and not getattr(args, f"no_{name}"):
            print(f"{name} is not installed: no {name} column", flush=True)
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench-delta.", dir=args.workdir))
    results: list[Result] = []
    server = None
    try:
        if args.s3:
            import bench_s3

            server = bench_s3.Server(work)
        day1s: dict[str, Path] = {}
        for index, w in enumerate(workloads(args)):
            if w.image not in day1s:
                for old in day1s.values():
                    old.unlink()
                day1s.clear()
                print(f"generating a {size / MiB:.0f} MiB {w.image} image in {work} ...",
                      flush=True)
                day1s[w.image] = work / w.image / "day1.img"
                day1s[w.image].parent.mkdir()
                diskimage.create(day1s[w.image], size, seed=1, zeros=IMAGES[w.image])
            day1 = day1s[w.image]
            day2 = day1.parent / "day2.img"
            shutil.copyfile(day1, day2)
            seed = zlib.crc32(w.tag.encode())  # the same pages whatever else runs
            changed = scatter(day2, w.share, w.pattern, seed)
            sha2 = None if args.no_verify else sha256_of(day2)
            subprocess.run(f"cat {day1} {day2} > /dev/null", shell=True, check=True)
            print(f"\n[{index + 1}] {w.name}: {changed // PAGE} pages, "
                  f"{changed / MiB:.2f} MiB changed", flush=True)
            result: Result = {"workload": w.name, "image": w.image, "share": w.share,
                              "pattern": w.pattern, "seed": seed, "image_bytes": size,
                              "changed_bytes": changed, "pages": changed // PAGE}
            result["snapfs"] = snapfs_run(work, w, index, day1, day2, sha2, args, server)
            block = result["snapfs"].get("block_size") or 512 << 10
            pages = pick_pages(size // PAGE, w.share, w.pattern, seed)
            result["blocks"] = -(-size // block)
            touched = sorted({p * PAGE // block for p in pages})
            result["blocks_touched"] = len(touched)
            result["blocks_touched_zero_on_day1"] = zero_blocks(day1, touched, block)
            for name, fn in tools.items():
                result[name] = tool_run(name, fn, work, day1, day2)
            day2.unlink()
            results.append(result)
            report(result)
    finally:
        for mnt in work.glob("mnt"):
            if mounts.mount_fstype(mnt):
                mounts.fusermount_unmount(mnt, lazy=True)
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    missed = summary(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "image_bytes": size, "target": TARGET, "s3": args.s3, "workloads": results,
        "targets_missed": missed}, indent=2))
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted: mounts unmounted, work directory removed")
