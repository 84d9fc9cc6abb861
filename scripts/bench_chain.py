#!/usr/bin/env python3
"""Cost grows with change, not with disk size (issue 17): chains of daily snapshots, copies,
diffs and deletes of a large disk with a small change, one revision beside another.

A daily snapshot of a big disk changes little of it. What such a chain costs (index bytes,
the time of an incremental copy, of a diff, of a delete, of making the next snapshot) should
follow the blocks that changed, not the blocks the disk has. This script measures that for
the working tree ("current") and, with --baseline REV, for a revision exported with
`git archive` whose CLI and daemon run from that tree on PYTHONPATH, each on a fresh store and
mount per section (512 KiB blocks, the default), and prints the two side by side with the
ratio current / baseline.

Images are "dense but cheap": every 4 KiB page holds its page number and a seed in its first
16 bytes and zeros after it, so no 512 KiB block is zero or equal to another one (nothing is
a hole, nothing dedups within the image), yet blocks compress to almost nothing and ingest
is fast. A day's change is a share of the image's pages, rewritten with random bytes in
clustered runs (1-16 consecutive pages at random places, seeded: scripts/bench_delta.py's
pick_pages), applied in place to the image kept in --workdir (default /var/tmp).

Sections (--skip index,growth,clone leaves some out):

  index   a chain of --days D daily snapshots (default 30) of a --size S image (default
          4 GiB), --daily-change P of its pages a day (default 0.5%). Day 1 is `cp` of the
          image into the region. Each later day, per --ingest way (default both, each in its
          own region): "clone" = `snapfs clone` of the previous day, then only the changed
          pages written into the clone with os.pwrite (O_WRONLY, no O_TRUNC: like
          `dd conv=notrunc`), then sealed (reading user.snapfs.status seals it); "cp" = `cp`
          of the whole day's image until sealed. After each day, the region's index size:
          the bytes of the SQLite pages in use (dbstat, else page_count - freelist_count
          pages) read through a read-only connection, which sees what is still in the WAL,
          until two reads 0.2 s apart agree. Figures: index bytes per snapshot (growth per
          day, median of days 2..D, and (size after day D - empty index) / D), changed
          512 KiB blocks per day (from the pages changed), index bytes per changed block,
          and seconds per day of the clone + write + seal and of the whole-image `cp`.
  growth  images of --sizes (default 512M,4G,16G) with a fixed --growth-change (default 16 MiB) of
          clustered 4 KiB pages, the same pages at every size (placed within the smallest image;
          --growth-placement spread: over each whole image, where the runs fall into more distinct
          blocks on a bigger disk): day 1 `cp` into region src and sealed, `mv` to region dst (until
          available); day 2 (day 1 with the change) `cp` into src, sealed; then timed: (a) `mv
          src/day2 dst/` until available (incremental: dst holds day 1), (b) `python -m snapfs diff
          dst/day1 dst/day2 --json` (the CLI's wall time; its changed bytes are checked against the
          blocks the change touched), (c) `rm dst/day1` until its row is gone from dst's index
          (SELECT count(*) FROM snapshots WHERE id=?, read-only, every 10 ms; the id is
          user.snapfs.id). Printed: each time and each time's growth from the smallest to the
          largest size; target for the current tree <= 1.3x. Day 1 has left src when day 2 arrives,
          so day 2's touched blocks have no base there and are stored (and then transferred) whole:
          the "transferred" row is the touched blocks x 512 KiB, which still follows the change, not
          the size.
  clone   the --size image (default 4 GiB) as day 1 in a region, then --clone-change
          (default 1%) of its pages changed: (a) `snapfs clone day1 day2` + the changed
          pages written into day2 + sealed, end to end; (b) `cp` of the whole changed image
          into the region until sealed; (c) `cp` of it to local disk + fsync (the
          reference); (a2) the same share rewritten in whole aligned 1 MiB extents instead
          (a clone of day 1 again), where no block is read back for a partial write.
          Target: (b) / (a) >= 20x (and (b) / (a2)).

Every snapshot whose content is the end of a chain or a copy is checked against the image's
SHA-256 (the last day of each index chain, both days in dst, both day 2s of the clone
section); --no-verify skips it. A section that fails in one tree (a mount that does not come
up, a snapshot that fails) is reported with the error and the tail of the daemon log, and the
other sections and trees still run; --no-current runs the baseline alone (for when the
working tree is broken mid-change). The daemon log's WARNING and ERROR lines are listed.
Seconds drift on a shared 2-core machine; byte counts do not. A quick trial:

    scripts/bench_chain.py --days 3 --size 256M --sizes 64M,128M

    scripts/bench_chain.py [--baseline REV] [--no-current] [--days 30] [--size 4G]
                           [--daily-change 0.5%] [--ingest clone,cp] [--sizes 512M,4G,16G]
                           [--growth-change 16M] [--clone-change 1%]
                           [--skip index,growth,clone] [--no-verify] [--workdir /var/tmp]
                           [--timeout SECONDS] [--json bench-results/bench_chain.json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
if (VENV / "bin" / "python").exists() and Path(sys.prefix).resolve() != VENV.resolve():
    os.execv(VENV / "bin" / "python", [str(VENV / "bin" / "python"), *sys.argv])
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench import settle, sha256_of  # noqa: E402
from bench_compare import export_revision  # noqa: E402
from bench_delta import Mount, SnapfsFailure, indent, pick_pages, runs  # noqa: E402

from snapfs.cli import diskimage  # noqa: E402
from snapfs.fuse import mounts  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
DEFAULT_BLOCK = 512 << 10
CHUNK = 8 * MiB  # image generation and restoring, per write
SECTIONS = ("index", "growth", "clone")
WAYS = ("clone", "cp")
GROWTH_TARGET = 1.3  # largest / smallest size, each time, current tree: at most
CLONE_TARGET = 20.0  # cp of the image / clone + rewrite: at least
SEED_CHAIN, SEED_GROWTH = 1, 2  # image seeds
SEED_DAY, SEED_GROWTH_CHANGE, SEED_CLONE_CHANGE = 1000, 7, 99  # change seeds
SPACE_MARGIN = 2 * GiB  # left free on --workdir's disk beside the images

Result = dict[str, Any]


# --- dense but cheap images -------------------------------------------------------------------


def page_header(page: int, seed: int) -> bytes:
    return struct.pack("<QQ", page, seed)


def fill_pages(buf: bytearray, first: int, count: int, seed: int) -> memoryview:
    """`count` pages of the image from page `first` on: header, then zeros."""
    view = memoryview(buf)[: count * PAGE]
    view[:] = bytes(len(view))
    for i in range(count):
        struct.pack_into("<QQ", buf, i * PAGE, first + i, seed)
    return view


def create_image(path: Path, size: int, seed: int) -> str:
    """Write the image; returns its SHA-256 (hashed as written)."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    with open(path, "wb") as f:
        for offset in range(0, size, CHUNK):
            view = fill_pages(buf, offset // PAGE, min(CHUNK, size - offset) // PAGE, seed)
            f.write(view)
            digest.update(view)
    return digest.hexdigest()


def restore_pages(path: Path, pages: set[int], seed: int) -> None:
    """Write back day 1's content of these pages (undoing every change made to them)."""
    buf = bytearray(CHUNK)
    per_chunk = CHUNK // PAGE
    with open(path, "r+b") as f:
        for first, length in runs(sorted(pages)):
            for start in range(first, first + length, per_chunk):
                count = min(per_chunk, first + length - start)
                os.pwrite(f.fileno(), fill_pages(buf, start, count, seed), start * PAGE)


@dataclass
class Change:
    """A day's change: clustered runs of pages and the random bytes written there."""

    runs: list[tuple[int, int]]  # (first page, pages), ascending
    data: list[bytes]
    pages: set[int] = field(default_factory=set)

    @classmethod
    def make(cls, total_pages: int, share: float, seed: int) -> Change:
        pages = pick_pages(total_pages, share, "clustered", seed)
        spans = list(runs(pages))
        rng = random.Random(seed * 2 + 1)
        return cls(spans, [rng.randbytes(n * PAGE) for _, n in spans], set(pages))

    @classmethod
    def extents(cls, total_pages: int, share: float, seed: int, run_pages: int = 256) -> Change:
        """`share` of the pages in whole aligned runs of `run_pages` (1 MiB): a change as a
        file system or a database writes it in extents, beside the scattered pages."""
        rng = random.Random(seed)
        slots = total_pages // run_pages
        chosen = sorted(rng.sample(range(slots), max(1, int(slots * share))))
        spans = [(slot * run_pages, run_pages) for slot in chosen]
        pages = {first + k for first, n in spans for k in range(n)}
        return cls(spans, [rng.randbytes(n * PAGE) for _, n in spans], pages)

    @property
    def bytes(self) -> int:
        return len(self.pages) * PAGE

    def blocks(self, block_size: int) -> set[int]:
        return {p * PAGE // block_size for p in self.pages}

    def write(self, path: Path) -> None:
        """pwrite every run into the file, opened O_WRONLY without O_TRUNC (as dd
        conv=notrunc): used for the local image and for a clone on the mount alike."""
        fd = os.open(path, os.O_WRONLY)
        try:
            for (first, _), data in zip(self.runs, self.data, strict=True):
                view, offset = memoryview(data), first * PAGE
                while view:  # a short write continues where it stopped
                    done = os.pwrite(fd, view, offset)
                    view, offset = view[done:], offset + done
        finally:
            os.close(fd)


def check_space(where: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(where).free
    if free < needed + SPACE_MARGIN:
        raise RuntimeError(f"{what}: {needed / GiB:.1f} GiB needed on {where}, "
                           f"{free / GiB:.1f} GiB free (keeping {SPACE_MARGIN / GiB:.0f} GiB)")


# --- trees and mounts -------------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    name: str  # "current" or "baseline"
    path: Path

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(self.path))

    def cli_startup(self, rounds: int = 3) -> float:
        """Median seconds of `python -m snapfs --help` from this tree: the floor under every
        CLI time (`snapfs clone`, `snapfs diff`)."""
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "snapfs", "--help"], env=self.env,
                           cwd=self.path, capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def check_import(self) -> None:
        found = subprocess.run([sys.executable, "-c", "import snapfs; print(snapfs.__file__)"],
                               env=self.env, cwd=self.path, capture_output=True, text=True,
                               check=True).stdout
        if not found.startswith(str(self.path)):
            raise RuntimeError(f"{self.name} tree {self.path} imports snapfs from {found}")


class TreeMount(Mount):
    """bench_delta's Mount, its CLI run from the tree measured (`python -m` puts the working
    directory first on sys.path, so the cwd must be the tree too)."""

    def __init__(self, work: Path, tree: Tree, timeout: float):
        work.mkdir(parents=True, exist_ok=True)
        super().__init__(work, tree.env, timeout)
        self.tree = tree

    def cli(self, *args: str | os.PathLike) -> str:
        cmd = [sys.executable, "-m", "snapfs", *map(str, args)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env,
                              cwd=self.tree.path)
        if done.returncode != 0:
            raise SnapfsFailure(f"snapfs {' '.join(map(str, args))}: exit {done.returncode}: "
                                f"{done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def mkregion(self, name: str) -> Path:
        path = self.mnt / name
        path.mkdir()
        return path

    def index_db(self, region: Path) -> Path:
        return self.store / "regions" / region.name / "index.db"

    def block_size(self) -> int:
        with contextlib.suppress(Exception):
            return int(self.status()["block_size"]) or DEFAULT_BLOCK
        return DEFAULT_BLOCK

    def cp_in(self, image: Path, dst: Path) -> float:
        """`cp` into a region until sealed (reading the status seals at once)."""
        start = time.perf_counter()
        subprocess.run(["cp", str(image), str(dst)], check=True)
        self.wait(dst)
        return time.perf_counter() - start

    def clone_write(self, parent: Path, new: Path, change: Change) -> tuple[float, float]:
        """`snapfs clone PARENT NEW`, the change written into NEW, sealed: (seconds of the
        whole, seconds of the clone command alone)."""
        start = time.perf_counter()
        self.cli("clone", parent, new)
        cloned = time.perf_counter() - start
        change.write(new)
        self.wait(new)
        return time.perf_counter() - start, cloned


class Recorded(Exception):
    """A failure already recorded (with the daemon log's tail) by mounted()."""


def record_failure(r: Result, where: str, exc: BaseException, m: Mount | None) -> None:
    tail = m.log_tail() if m is not None else ""
    r.setdefault("errors", []).append({"where": where, "error": f"{type(exc).__name__}: {exc}",
                                       "log_tail": tail})
    print(f"    {where} FAILED: {type(exc).__name__}: {exc}"
          + (f"\n{indent(tail)}" if tail else ""), flush=True)


@contextlib.contextmanager
def mounted(tree: Tree, work: Path, timeout: float, r: Result,
            where: str) -> Iterator[TreeMount]:
    """A fresh store and mount for one section of one tree; always unmounted and deleted.
    A failure inside is recorded in r with the daemon log's tail (read before the store
    goes) and raised again as Recorded; the daemon log's problems go to r["log_problems"]."""
    m = TreeMount(work, tree, timeout)
    try:
        m.mount()
        yield m
    except Exception as exc:
        record_failure(r, where, exc, m)
        raise Recorded(where) from exc
    finally:
        try:
            m.unmount()
        finally:
            r["log_problems"] = m.log_problems()
            if not mounts.mount_fstype(m.mnt):
                shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def guarded(r: Result, where: str, m: Mount | None = None) -> Iterator[None]:
    """Any failure recorded in r (with m's daemon log tail) instead of raised: the other
    parts, sections and trees still run."""
    try:
        yield
    except Recorded:
        pass
    except Exception as exc:  # recorded and reported; the run goes on
        record_failure(r, where, exc, m)


# --- the index: read-only looks ---------------------------------------------------------------


def connect_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)


def index_size(path: Path) -> Result:
    """Bytes of the index's pages in use (what a read-only connection sees, WAL included),
    per table or index when dbstat is there; and the files' sizes (db + -wal)."""
    files = sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal"))
                if p.exists())
    db = connect_ro(path)
    try:
        try:
            rows = db.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall()
            tables = {name: int(n) for name, n in rows}
            return {"bytes": sum(tables.values()), "by": "dbstat", "tables": tables,
                    "file_bytes": files}
        except sqlite3.OperationalError:  # built without SQLITE_ENABLE_DBSTAT_VTAB
            page_count, page_size, free = (db.execute(f"PRAGMA {p}").fetchone()[0] for p in
                                           ("page_count", "page_size", "freelist_count"))
            return {"bytes": (page_count - free) * page_size, "by": "page_count",
                    "file_bytes": files}
    finally:
        db.close()


def stable_index_size(path: Path, tries: int = 20) -> Result:
    """index_size until two reads 0.2 s apart agree (the daemon done with the day)."""
    last = index_size(path)
    for _ in range(tries):
        time.sleep(0.2)
        now = index_size(path)
        if now["bytes"] == last["bytes"]:
            return now
        last = now
    last["unstable"] = True
    return last


def wait_row_gone(db_path: Path, snapshot_id: str, start: float, timeout: float) -> float:
    """Seconds from `start` until the snapshot's row is gone from the index (polled
    read-only every 10 ms)."""
    db = connect_ro(db_path)
    try:
        deadline = time.monotonic() + timeout
        while db.execute("SELECT count(*) FROM snapshots WHERE id=?",
                         (snapshot_id,)).fetchone()[0]:
            if time.monotonic() > deadline:
                raise SnapfsFailure(f"snapshot {snapshot_id} still in {db_path} after "
                                    f"{timeout:.0f} s")
            time.sleep(0.01)
        return time.perf_counter() - start
    finally:
        db.close()


def row_count(db_path: Path, snapshot_id: str) -> int:
    db = connect_ro(db_path)
    try:
        return db.execute("SELECT count(*) FROM snapshots WHERE id=?",
                          (snapshot_id,)).fetchone()[0]
    finally:
        db.close()


# --- sections ---------------------------------------------------------------------------------


@dataclass
class Setup:
    args: argparse.Namespace
    work: Path
    timeout: float
    chain_image: Path | None = None
    chain_sha: str = ""


def drop_cache(*paths: Path) -> None:
    """Evict the files' pages (POSIX_FADV_DONTNEED): what a SHA-256 check read in would
    otherwise be timed as the kernel's eviction at an `rm` (0.4 s for 4 GiB, in any file
    system) and squeeze the CLI's own files out of memory before a timed `snapfs diff`."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def verify(r: Result, what: str, path: Path, sha: str | None) -> None:
    """SHA-256 of the snapshot against the image's (None: --no-verify); its pages are
    dropped after, so nothing later pays for them."""
    if sha is None:
        return
    ok = sha256_of(path) == sha
    drop_cache(path)
    r.setdefault("verified", {})[what] = ok
    if not ok:
        print(f"    {what}: content DIFFERS from the image (SHA-256)", flush=True)


def day_name(day: int) -> str:
    return f"day{day:02d}.img"


def index_section(tree: Tree, s: Setup) -> Result:
    """Section 1: a chain of daily snapshots per ingest way; the index size after each day."""
    a = s.args
    image, size = s.chain_image, a.size
    assert image is not None
    r: Result = {"ways": {w: {"days": []} for w in a.ingest}}
    changed_pages: set[int] = set()
    print(f"  {tree.name}: index chain, {a.days} days ...", flush=True)
    try:
        with guarded(r, "index"), mounted(tree, s.work / f"{tree.name}-index", s.timeout, r,
                                           "index") as m:
            block = r["block_size"] = m.block_size()
            regions = {w: m.mkregion(f"chain-{w}") for w in a.ingest}
            for w, region in regions.items():
                r["ways"][w]["empty_index"] = stable_index_size(m.index_db(region))
            settle()
            for w, region in regions.items():
                seconds = m.cp_in(image, region / day_name(1))
                r["ways"][w]["days"].append({"day": 1, "seconds": seconds,
                                             "index": stable_index_size(m.index_db(region))})
            r["changed_blocks"], r["changed_pages"] = [], []
            for day in range(2, a.days + 1):
                change = Change.make(size // PAGE, a.daily_change, SEED_DAY + day)
                changed_pages |= change.pages  # before the write: restored even if it fails
                change.write(image)
                r["changed_blocks"].append(len(change.blocks(block)))
                r["changed_pages"].append(len(change.pages))
                subprocess.run(["sync"], check=True)
                for w, region in list(regions.items()):
                    done = False
                    with guarded(r, f"index {w}, day {day}", m):
                        new = region / day_name(day)
                        entry: Result = {"day": day}
                        if w == "clone":
                            entry["seconds"], entry["clone_cli_s"] = m.clone_write(
                                region / day_name(day - 1), new, change)
                        else:
                            entry["seconds"] = m.cp_in(image, new)
                        entry["index"] = stable_index_size(m.index_db(region))
                        r["ways"][w]["days"].append(entry)
                        done = True
                    if not done:  # this way's chain stops; the other goes on
                        del regions[w]
                        r["ways"][w]["stopped_at_day"] = day
                line = ", ".join(
                    f"{w} {r['ways'][w]['days'][-1]['seconds']:.2f} s, index "
                    f"+{growth(r['ways'][w]['days'])[-1]:,} B" for w in regions)
                print(f"    day {day}: {len(change.pages)} pages in "
                      f"{r['changed_blocks'][-1]} blocks; {line or 'no way left'}", flush=True)
                if not regions:
                    break
            if not a.no_verify and regions:
                sha = sha256_of(image)
                for w, region in regions.items():
                    verify(r, f"index {w}: {day_name(a.days)}", region / day_name(a.days), sha)
    finally:
        restore_pages(image, changed_pages, SEED_CHAIN)
    return r


def growth(days: list[Result]) -> list[int]:
    """Index bytes added by each day after the first."""
    sizes = [d["index"]["bytes"] for d in days]
    return [b - a for a, b in zip(sizes, sizes[1:], strict=False)]


def growth_run(tree: Tree, s: Setup, size: int, image: Path, shas: tuple[str, str] | None,
               change: Change) -> Result:
    """Section 2 for one size and one tree."""
    r: Result = {"image_bytes": size, "changed_bytes": change.bytes}
    label = f"growth {size // MiB} MiB"
    mutated = False
    try:
        work = s.work / f"{tree.name}-growth-{size}"
        with guarded(r, label), mounted(tree, work, s.timeout, r, label) as m:
            block = r["block_size"] = m.block_size()
            touched = change.blocks(block)
            r["changed_blocks"] = len(touched)
            r["expected_diff_bytes"] = sum(min(block, size - b * block) for b in touched)
            src, dst = m.mkregion("src"), m.mkregion("dst")
            settle()
            r["day1_cp_s"] = m.cp_in(image, src / "day1.img")
            r["day1_mv_s"] = m.mv(src / "day1.img", dst)[1]
            verify(r, f"{label}: dst/day1", dst / "day1.img", shas and shas[0])
            mutated = True  # before the write: restored even if it fails
            change.write(image)
            subprocess.run(["sync"], check=True)
            r["day2_cp_s"] = m.cp_in(image, src / "day2.img")
            settle()
            r["mv_returned_s"], r["mv_s"] = m.mv(src / "day2.img", dst)
            with contextlib.suppress(OSError, ValueError):
                r["mv_transferred_bytes"] = int(os.getxattr(dst / "day2.img",
                                                            "user.snapfs.transferred_bytes"))
            drop_cache(image, src / "day2.img", dst / "day1.img", dst / "day2.img")
            settle()
            start = time.perf_counter()
            out = m.cli("diff", "--json", dst / "day1.img", dst / "day2.img")
            r["diff_s"] = time.perf_counter() - start
            with contextlib.suppress(ValueError, KeyError, TypeError):
                answer = json.loads(out)
                r["diff_bytes"] = answer["changed_bytes"]
                r["diff_ranges"] = len(answer["ranges"])
            verify(r, f"{label}: dst/day2", dst / "day2.img", shas and shas[1])
            snapshot_id = os.getxattr(dst / "day1.img", "user.snapfs.id").decode()
            db_path = m.index_db(dst)
            if row_count(db_path, snapshot_id) != 1:
                raise SnapfsFailure(f"no row of {snapshot_id} (user.snapfs.id of dst/day1.img) "
                                    f"in {db_path}: cannot time its purge")
            drop_cache(dst / "day1.img", dst / "day2.img")
            settle()
            start = time.perf_counter()
            subprocess.run(["rm", str(dst / "day1.img")], check=True)
            r["rm_returned_s"] = time.perf_counter() - start
            r["rm_s"] = wait_row_gone(db_path, snapshot_id, start, s.timeout)
            print(f"    {tree.name} {size // MiB} MiB: mv {r['mv_s']:.2f} s, diff "
                  f"{r['diff_s']:.2f} s, rm {r['rm_s']:.2f} s", flush=True)
    finally:
        if mutated:
            restore_pages(image, change.pages, SEED_GROWTH)
    return r


def growth_section(trees: list[Tree], s: Setup) -> dict[str, dict[str, Result]]:
    """Section 2: per size, one image for both trees (changed and restored in place)."""
    a = s.args
    out: dict[str, dict[str, Result]] = {t.name: {} for t in trees}
    for size in a.sizes:
        key = str(size)
        image = s.work / f"growth-{size // MiB}M.img"
        try:
            check_space(s.work, size, f"growth image of {size // MiB} MiB")
            print(f"  growth: generating a {size // MiB} MiB image ...", flush=True)
            sha1 = create_image(image, size, SEED_GROWTH)
            # "same": the very same pages at every size (within the smallest image), so
            # the change is fixed in blocks too and only the disk's size grows; "spread":
            # the same share of each image, whose clustered runs then fall into more
            # distinct blocks on a bigger disk.
            span = min(a.sizes) if a.growth_placement == "same" else size
            change = Change.make(span // PAGE, min(1.0, a.growth_change / span),
                                 SEED_GROWTH_CHANGE)
            shas = None
            if not a.no_verify:
                change.write(image)
                shas = (sha1, sha256_of(image))
                restore_pages(image, change.pages, SEED_GROWTH)
            for tree in trees:
                out[tree.name][key] = growth_run(tree, s, size, image, shas, change)
        except Exception as exc:  # this size is reported failed; the others go on
            for tree in trees:
                r = out[tree.name].setdefault(key, {"image_bytes": size})
                if "errors" not in r:
                    record_failure(r, f"growth {size // MiB} MiB", exc, None)
        finally:
            image.unlink(missing_ok=True)
    return out


def clone_section(tree: Tree, s: Setup) -> Result:
    """Section 3: clone + a share rewritten, against `cp` of the image, against local disk."""
    a = s.args
    image = s.chain_image
    assert image is not None
    r: Result = {}
    change = Change.make(a.size // PAGE, a.clone_change, SEED_CLONE_CHANGE)
    r["changed_bytes"] = change.bytes
    mutated = False
    print(f"  {tree.name}: clone + {a.clone_change:.1%} rewrite ...", flush=True)
    try:
        work = s.work / f"{tree.name}-clone"
        with guarded(r, "clone"), mounted(tree, work, s.timeout, r, "clone") as m:
            r["changed_blocks"] = len(change.blocks(m.block_size()))
            region = m.mkregion("clone")
            settle()
            r["day1_cp_s"] = m.cp_in(image, region / "day1.img")
            mutated = True  # before the write: restored even if it fails
            change.write(image)
            settle()
            with guarded(r, "clone (a)", m):
                r["clone_s"], r["clone_cli_s"] = m.clone_write(
                    region / "day1.img", region / "day2.img", change)
            settle()
            r["cp_s"] = m.cp_in(image, region / "day2-cp.img")
            check_space(s.work, a.size, "local copy of the image")
            local = s.work / "local-copy.img"
            settle()
            start = time.perf_counter()
            subprocess.run(["cp", str(image), str(local)], check=True)
            fd = os.open(local, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            r["local_cp_s"] = time.perf_counter() - start
            local.unlink()
            if not a.no_verify:
                sha = sha256_of(image)
                if "clone_s" in r:
                    verify(r, "clone: day2 (clone)", region / "day2.img", sha)
                verify(r, "clone: day2-cp (cp)", region / "day2-cp.img", sha)
            if "clone_s" in r:
                r["cp_over_clone"] = r["cp_s"] / r["clone_s"]
            # (a2) the same share in whole 1 MiB extents: no block is read back for a
            # partial write, so this is the cost of the bytes alone.
            restore_pages(image, change.pages, SEED_CHAIN)
            extents = Change.extents(a.size // PAGE, a.clone_change, SEED_CLONE_CHANGE + 1)
            r["extent_changed_blocks"] = len(extents.blocks(m.block_size()))
            extents.write(image)
            change = Change(change.runs, change.data, change.pages | extents.pages)
            settle()
            with guarded(r, "clone (a2)", m):
                r["clone_extents_s"], _ = m.clone_write(
                    region / "day1.img", region / "day3.img", extents)
                if not a.no_verify:
                    verify(r, "clone: day3 (clone, extents)", region / "day3.img",
                           sha256_of(image))
                r["cp_over_clone_extents"] = r["cp_s"] / r["clone_extents_s"]
            print(f"    clone + write {r.get('clone_s', float('nan')):.2f} s, cp "
                  f"{r['cp_s']:.2f} s, local cp {r['local_cp_s']:.2f} s: cp / clone "
                  f"{r.get('cp_over_clone', float('nan')):.1f}x", flush=True)
    finally:
        (s.work / "local-copy.img").unlink(missing_ok=True)
        if mutated:
            restore_pages(image, change.pages, SEED_CHAIN)
    return r


# --- the report -------------------------------------------------------------------------------


@dataclass
class Line:
    label: str
    values: dict[str, float | None]  # tree name -> value
    unit: str = "s"
    digits: int = 2
    target: tuple[str, float] | None = None  # (">=" or "<=", threshold), for the current tree
    heading: bool = False


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def index_lines(results: dict[str, Result], ways: list[str],
                startup: dict[str, float]) -> list[Line]:
    def per(fn: Callable[[Result], float | None]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, r in results.items():
            try:
                out[name] = fn(r)
            except (KeyError, IndexError, TypeError, ZeroDivisionError):
                out[name] = None
        return out

    def way(r: Result, w: str) -> list[Result]:
        """The way's days; none (a KeyError: "-") if its chain stopped before day D."""
        if "stopped_at_day" in r["ways"][w]:
            raise KeyError(w)
        return r["ways"][w]["days"]

    lines = [
        Line("changed pages a day (median)", per(lambda r: median(r["changed_pages"])), "", 0),
        Line("changed blocks a day (median)", per(lambda r: median(r["changed_blocks"])), "", 0),
    ]
    for w in ways:
        label = "clone + write" if w == "clone" else "cp of the image"

        def total(r: Result, w: str = w) -> float:
            days = way(r, w)
            return (days[-1]["index"]["bytes"] - r["ways"][w]["empty_index"]["bytes"]) / len(days)

        lines += [
            Line(f"{w}: index bytes per snapshot, median days 2..D",
                 per(lambda r, w=w: median(growth(way(r, w)))), "B", 0),
            Line(f"{w}: index bytes per snapshot, total / D", per(total), "B", 0),
            Line(f"{w}: index bytes per changed block",
                 per(lambda r, w=w: median(growth(way(r, w))) / median(r["changed_blocks"])),
                 "B", 1),
            Line(f"{w}: index size after day D",
                 per(lambda r, w=w: way(r, w)[-1]["index"]["bytes"]), "B", 0),
            Line(f"{w}: {label} until sealed, s a day (median 2..D)",
                 per(lambda r, w=w: median([d["seconds"] for d in way(r, w)[1:]]))),
        ]
        if w == "clone":
            lines.append(Line("clone: `snapfs clone` command alone (median)",
                              per(lambda r: median([d["clone_cli_s"]
                                                    for d in way(r, "clone")[1:]]))))
            lines.append(Line("clone: CLI start-up (`python -m snapfs --help`)",
                              dict(startup)))
        lines.append(Line(f"{w}: day 1 cp until sealed",
                          per(lambda r, w=w: r["ways"][w]["days"][0]["seconds"])))
    return lines


def growth_lines(results: dict[str, dict[str, Result]], sizes: list[int],
                 startup: dict[str, float]) -> list[Line]:
    lines = [Line("CLI start-up (`python -m snapfs --help`)", dict(startup))]
    ops = (("mv_s", "mv", "mv of day 2 until available"),
           ("diff_s", "diff", "snapfs diff (CLI wall)"),
           ("rm_s", "rm", "rm of day 1 until its row is gone"))
    for size in sizes:
        key = str(size)
        lines.append(Line(f"{size // MiB} MiB image", {}, heading=True))
        for op, _, label in ops:
            lines.append(Line(f"  {label}", {t: r.get(key, {}).get(op)
                                             for t, r in results.items()}))
        lines.append(Line("  mv of day 2: transferred", {
            t: (r.get(key, {}).get("mv_transferred_bytes") or 0) / MiB or None
            for t, r in results.items()}, "MiB", 2))
    if len(sizes) > 1:
        lo, hi = str(min(sizes)), str(max(sizes))
        name = f"{max(sizes) // MiB} MiB / {min(sizes) // MiB} MiB"
        lines.append(Line(f"growth {name} (target <= {GROWTH_TARGET}x)", {}, heading=True))
        for op, short, _ in ops:
            values: dict[str, float | None] = {}
            for t, r in results.items():
                a, b = r.get(lo, {}).get(op), r.get(hi, {}).get(op)
                values[t] = b / a if a and b is not None else None
            lines.append(Line(f"  {short}", values, "x", 2,
                              ("<=", GROWTH_TARGET)))
    return lines


def clone_lines(results: dict[str, Result], share: float,
                startup: dict[str, float]) -> list[Line]:
    def per(key: str) -> dict[str, float | None]:
        return {t: r.get(key) for t, r in results.items()}

    return [
        Line("changed blocks", per("changed_blocks"), "", 0),
        Line(f"(a) clone + {share:.1%} rewrite until sealed", per("clone_s")),
        Line("    of it: `snapfs clone` command", per("clone_cli_s")),
        Line("    CLI start-up (`python -m snapfs --help`)", dict(startup)),
        Line("(b) cp of the changed image until sealed", per("cp_s")),
        Line("(c) cp to local disk + fsync (reference)", per("local_cp_s")),
        Line(f"(b) / (a) (target >= {CLONE_TARGET:g}x)", per("cp_over_clone"), "x", 1,
             (">=", CLONE_TARGET)),
        Line("changed blocks, in 1 MiB extents", per("extent_changed_blocks"), "", 0),
        Line(f"(a2) clone + {share:.1%} in 1 MiB extents until sealed",
             per("clone_extents_s")),
        Line(f"(b) / (a2) (target >= {CLONE_TARGET:g}x)", per("cp_over_clone_extents"), "x",
             1, (">=", CLONE_TARGET)),
        Line("(c) / (a)", {t: (r["local_cp_s"] / r["clone_s"]
                               if "local_cp_s" in r and "clone_s" in r else None)
                           for t, r in results.items()}, "x", 1),
    ]


def fmt(value: float | None, line: Line) -> str:
    if value is None:
        return "-"
    text = f"{value:,.{line.digits}f}"
    return text + line.unit if line.unit == "x" else f"{text} {line.unit}".rstrip()


def met(value: float | None, target: tuple[str, float]) -> bool | None:
    if value is None:
        return None
    op, threshold = target
    return value <= threshold if op == "<=" else value >= threshold


def table(title: str, lines: list[Line], trees: list[str], missed: list[str],
          unmeasured: list[str]) -> None:
    columns = [*trees, "ratio"] if len(trees) == 2 else list(trees)
    header = [title, *columns, "target"]
    rows = []
    for line in lines:
        if line.heading:
            rows.append([line.label] + [""] * (len(header) - 1))
            continue
        cells = [fmt(line.values.get(t), line) for t in trees]
        if len(trees) == 2:
            cur, old = (line.values.get(t) for t in trees)
            cells.append(f"{cur / old:.2f}x" if cur is not None and old else "-")
        mark = ""
        if line.target:
            judged = trees[0]  # the current tree, or the baseline alone with --no-current
            ok = met(line.values.get(judged), line.target)
            mark = {True: "met", False: "MISS", None: "-"}[ok]
            if len(trees) == 2:
                other = met(line.values.get(trees[1]), line.target)
                mark += f" (baseline {({True: 'met', False: 'MISS', None: '-'}[other])})"
            if ok is None:
                unmeasured.append(f"{title}: {line.label.strip()} ({judged})")
            if ok is False:
                missed.append(f"{title}: {line.label.strip()} "
                              f"{fmt(line.values.get(judged), line)} ({judged})")
        rows.append([line.label, *cells, mark])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print()
    for i, row in enumerate([header, *rows]):
        print("  ".join(text.ljust(w) if c == 0 else text.rjust(w)
                        for c, (text, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def problems(section: str, per_tree: dict[str, Result]) -> None:
    for tree, r in per_tree.items():
        for err in r.get("errors", []):
            print(f"FAILED ({tree}, {err['where']}): {err['error']}")
        bad = [k for k, ok in r.get("verified", {}).items() if not ok]
        if r.get("verified"):
            print(f"SHA-256 ({tree}, {section}): "
                  + (f"DIFFERS in {', '.join(bad)}" if bad else
                     f"{len(r['verified'])} snapshot(s) equal to the image's"))
        found = r.get("log_problems", [])
        if found:
            print(f"daemon log ({tree}, {section}): {len(found)} WARNING/ERROR lines:")
            for line in found[:5]:
                print(f"  {line[:200]}")
        if "diff_bytes" in r and r["diff_bytes"] != r.get("expected_diff_bytes"):
            print(f"diff ({tree}, {section}): {r['diff_bytes']:,} bytes differ, expected "
                  f"{r.get('expected_diff_bytes', 0):,} (the blocks the change touched)")
        if any(d["index"].get("unstable") for w in r.get("ways", {}).values()
               for d in w["days"]):
            print(f"index ({tree}, {section}): size still changing when read on some days")


def report(results: Result, a: argparse.Namespace, trees: list[str]) -> Result:
    """Print the tables; returns the targets missed and those that could not be judged."""
    out: Result = {"missed": [], "not_measured": []}
    startup = results.get("cli_startup_s", {})

    def show(title: str, lines: list[Line]) -> None:
        table(title, lines, trees, out["missed"], out["not_measured"])

    ratio = " (ratio = current / baseline)" if len(trees) == 2 else ""
    print(f"\n== issue 17: cost grows with change, not with disk size{ratio}")
    if "index" in results:
        print(f"\n[index] {a.size // MiB} MiB dense image, {a.days} days, "
              f"{a.daily_change:.2%} of its pages a day in clustered runs; "
              f"ingest: {', '.join(a.ingest)}")
        show("index chain", index_lines(results["index"], a.ingest, startup))
        problems("index", results["index"])
    if "growth" in results:
        print(f"\n[growth] {a.growth_change / MiB:g} MiB changed in clustered 4 KiB runs, "
              f"images of {', '.join(f'{s // MiB} MiB' for s in a.sizes)}")
        show("growth", growth_lines(results["growth"], a.sizes, startup))
        for size in a.sizes:
            problems(f"growth {size // MiB} MiB",
                     {t: r[str(size)] for t, r in results["growth"].items() if str(size) in r})
    if "clone" in results:
        print(f"\n[clone] {a.size // MiB} MiB dense image, {a.clone_change:.1%} of its pages "
              "rewritten in clustered runs")
        show("clone vs cp", clone_lines(results["clone"], a.clone_change, startup))
        problems("clone", results["clone"])
    print("\n== targets: " + ("MISS: " + "; ".join(out["missed"]) if out["missed"]
                              else "none missed")
          + (f"; not measured: {'; '.join(out['not_measured'])}" if out["not_measured"] else ""))
    return out


# --- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    def share(text: str) -> float:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"{text}: a share in (0, 1] or a percentage")
        return value

    def size(text: str) -> int:
        value = diskimage.parse_size(text)
        if value <= 0 or value % PAGE:
            raise argparse.ArgumentTypeError(f"{text}: a positive multiple of 4 KiB")
        return value

    def names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
        def parse(text: str) -> list[str]:
            items = [t.strip() for t in text.split(",") if t.strip()]
            for item in items:
                if item not in allowed:
                    raise argparse.ArgumentTypeError(f"{item!r}: one of {', '.join(allowed)}")
            return items
        return parse

    def sizes(text: str) -> list[int]:
        return sorted({size(t) for t in text.split(",") if t.strip()})

    parser.add_argument("--baseline", help="a git revision to compare with (default: none)")
    parser.add_argument("--no-current", action="store_true",
                        help="do not run the working tree (the baseline alone)")
    parser.add_argument("--days", type=int, default=30, help="days in the chain (default 30)")
    parser.add_argument("--size", type=size, default=size("4G"),
                        help="image of the index and clone sections (default 4G)")
    parser.add_argument("--daily-change", type=share, default=0.005,
                        help="share of pages changed a day (default 0.5%%)")
    parser.add_argument("--ingest", type=names(WAYS), default=list(WAYS),
                        help="ways of making days 2..D: clone,cp (default both)")
    parser.add_argument("--sizes", type=sizes, default=sizes("512M,4G,16G"),
                        help="images of the growth section (default 512M,4G,16G)")
    parser.add_argument("--growth-change", type=size, default=size("16M"),
                        help="bytes changed on day 2 of the growth section (default 16M)")
    parser.add_argument("--growth-placement", choices=("same", "spread"), default="same",
                        help="growth: the same pages at every size (default), or the same "
                        "share spread over each image")
    parser.add_argument("--clone-change", type=share, default=0.01,
                        help="share of pages the clone section rewrites (default 1%%)")
    parser.add_argument("--skip", type=names(SECTIONS), default=[],
                        help="sections to leave out: index,growth,clone")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check snapshots against the image's SHA-256")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="where images and stores go (default /var/tmp)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a snapshot may take to seal, copy or purge (default: "
                        "120 + 1 s per 4 MiB of the largest image)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "bench_chain.json",
                        help="where to write the results (default bench-results/bench_chain.json)")
    args = parser.parse_args()
    if args.days < 1:
        parser.error("--days must be at least 1")
    if args.no_current and not args.baseline:
        parser.error("--no-current needs --baseline REV")
    if not args.ingest:
        parser.error("--ingest needs clone, cp or both")
    return args


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM unmounts like a Ctrl-C


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, interrupt)
    sections = [x for x in SECTIONS if x not in args.skip]
    largest = max([args.size] + (args.sizes if "growth" in sections else []))
    timeout = args.timeout if args.timeout is not None else 120 + largest / (4 * MiB)
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench-chain.", dir=args.workdir))
    s = Setup(args, work, timeout)
    trees = [] if args.no_current else [Tree("current", ROOT)]
    results: Result = {}
    started = time.time()
    try:
        if args.baseline:
            export_revision(args.baseline, work / "baseline-tree")
            trees.append(Tree("baseline", work / "baseline-tree"))
        for tree in trees:
            tree.check_import()
        results["cli_startup_s"] = {t.name: t.cli_startup() for t in trees}
        print(f"trees: {', '.join(f'{t.name} ({t.path})' for t in trees)}; work dir {work}; "
              f"sections: {', '.join(sections)}", flush=True)
        if "index" in sections or "clone" in sections:
            check_space(work, args.size * (2 if "clone" in sections else 1), "the image")
            print(f"generating a {args.size // MiB} MiB dense image ...", flush=True)
            s.chain_image = work / "chain.img"
            s.chain_sha = create_image(s.chain_image, args.size, SEED_CHAIN)
        if "index" in sections:
            results["index"] = {t.name: index_section(t, s) for t in trees}
        if "growth" in sections:
            results["growth"] = growth_section(trees, s)
        if "clone" in sections:
            results["clone"] = {t.name: clone_section(t, s) for t in trees}
        if s.chain_image is not None and not args.no_verify and sha256_of(
                s.chain_image) != s.chain_sha:
            print("warning: the image was not restored to day 1 between runs", flush=True)
    finally:
        for mnt in work.glob("*/mnt"):
            if mounts.mount_fstype(mnt):
                mounts.fusermount_unmount(mnt, lazy=True)
        shutil.rmtree(work, ignore_errors=True)
    names = [t.name for t in trees]
    targets = report(results, args, names)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "trees": {t.name: str(t.path) for t in trees}, "started": started,
        "seconds": time.time() - started, "targets": {"growth_max": GROWTH_TARGET,
                                                      "clone_min": CLONE_TARGET},
        "targets_missed": targets["missed"], "targets_not_measured": targets["not_measured"],
        "results": results}, indent=2))
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted: mounts unmounted, work directory removed")
