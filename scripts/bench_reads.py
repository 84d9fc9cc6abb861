#!/usr/bin/env python3
"""Reads of a sealed snapshot (issue 15: through the page cache; the daemon's read path), one
revision beside another and beside a local file, in one run.

Per tree, the current one and, with --baseline, a revision exported with `git archive` whose
daemon runs with that tree on PYTHONPATH, on a fresh store and mount, with a generated
disk-like image (`snapfs.cli.diskimage`, seed 1, default 1 GiB):

  - ingest: `cp` into a region until the snapshot is available (reading user.snapfs.status
    seals it at once); reference: `cp` to a local file + `sync`, in the same round;
  - cold sequential read: `dd bs=1M` just after the snapshot's pages were dropped
    (POSIX_FADV_DONTNEED). The store's own files stay in the page cache, as after an ingest,
    so this is the daemon's read path; the local reference reads its file from the disk;
  - warm re-read: the same `dd` again (from the page cache);
  - mmap: SHA-256 of the snapshot read through mmap(MAP_SHARED) against the image's;
  - fio random 4 KiB reads, cold (pages dropped just before; the run warms the cache as it
    goes, so the share of the file cached after it is printed) and warm (after a full read),
    at QD1 (psync) and QD16 (libaio, buffered; io_uring if libaio cannot run): IOPS, p50 and
    p99 completion latency; the same runs on the local file;
  - the daemon's peak RSS (VmHWM of its process), and the CPU it used for each `dd`.
Trees alternate their order round by round. The table has medians over the rounds, the raw
per-round values in brackets, and current/baseline ratios.

This VM hands freed memory back to the host, so page-cache fills of fresh memory are slow:
by default a helper process holds memory in use for the whole run, killed at the end
(MemAvailable minus 3 x the image minus 2 GiB, at most --hold-max; --no-hold-memory: none).
Absolute figures drift on a shared 2-core machine: use an even number of rounds and read
the ratios.

Runs as root (FUSE mounts, apt). Needs fio: `scripts/bench` installs it, and this script
runs `apt-get install -y fio` when it is missing; the cached shares come from util-linux's
`fincore`.

    scripts/bench_reads.py [--baseline REV] [--size 1G] [--rounds 2] [--fio-seconds 5]
                           [--workdir DIR] [--json FILE] [--no-hold-memory] [--hold-max 16G]
                           [--qd16-engine libaio|io_uring]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
if (VENV / "bin" / "python").exists() and Path(sys.prefix).resolve() != VENV.resolve():
    os.execv(VENV / "bin" / "python", [str(VENV / "bin" / "python"), *sys.argv])
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench import peak_rss, settle, wait_available  # noqa: E402
from bench_compare import drop_pages, export_revision  # noqa: E402

from snapfs.cli import diskimage  # noqa: E402
from snapfs.fuse import mounts  # noqa: E402

MB = 1_000_000
MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
REGION, NAME = "us-east-1", "disk.img"

Figures = dict[str, float | str]


# --- rows of the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    label: str
    key: str
    unit: str
    digits: int = 0


def fio_rows(temp: str) -> list[Row]:
    rows: list[Row] = []
    if temp == "warm":
        rows.append(Row("fio warm: file cached before", "fio_warm_cached_pct", "%", 1))
    for qd in (1, 16):
        key = f"fio_{temp}_qd{qd}"
        rows += [
            Row(f"fio rand 4 KiB {temp} QD{qd}", f"{key}_iops", "IOPS"),
            Row(f"  {temp} QD{qd} p50 latency", f"{key}_p50_us", "µs", 1),
            Row(f"  {temp} QD{qd} p99 latency", f"{key}_p99_us", "µs", 1),
        ]
        if temp == "cold":
            rows.append(Row(f"  {temp} QD{qd} file cached after", f"{key}_cached_pct", "%", 1))
    return rows


ROWS = [
    Row("ingest (cp, until sealed)", "ingest_s", "s", 2),
    Row("cold sequential read (dd 1M)", "cold_read_mb_s", "MB/s"),
    Row("  daemon CPU for it (user+sys)", "cold_read_daemon_cpu_s", "s", 2),
    Row("warm re-read (dd 1M)", "warm_read_mb_s", "MB/s"),
    Row("  daemon CPU for it (user+sys)", "warm_read_daemon_cpu_s", "s", 2),
    Row("  file cached before it", "warm_read_cached_pct", "%", 1),
    Row("mmap(MAP_SHARED) SHA-256", "mmap", ""),
    *fio_rows("cold"),
    *fio_rows("warm"),
    Row("daemon peak RSS (VmHWM)", "daemon_peak_rss_mib", "MiB"),
]


# --- small helpers ----------------------------------------------------------------------------


def run(*cmd: str | os.PathLike, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, **kwargs)


def timed(*cmd: str | os.PathLike) -> float:
    start = time.perf_counter()
    run(*cmd)
    return time.perf_counter() - start


def cached_share(path: Path) -> float | None:
    """Share of the file's bytes in the page cache (fincore), or None without fincore."""
    if not shutil.which("fincore"):
        return None
    out = run("fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", path)
    resident, size = map(int, out.stdout.split())
    return resident / size if size else 0.0


def warm_share(path: Path) -> float | None:
    """Share of the file cached before a warm run, with a warning when it is not all
    (memory short: something else on the machine took the page cache)."""
    share = cached_share(path)
    if share is not None and share < 0.99:
        print(f"    warning: only {share:.1%} of {path} cached before a warm run", flush=True)
    return share


def drop_and_check(path: Path) -> None:
    drop_pages(path)
    share = cached_share(path)
    if share is not None and share > 0.01:
        print(f"    warning: {share:.1%} of {path} still cached after dropping", flush=True)


def dd_mb_s(path: Path, size: int) -> float:
    return size / timed("dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none") / MB


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


MMAP_HASH = """
import hashlib, mmap, sys
with open(sys.argv[1], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    print(hashlib.sha256(m).hexdigest())
"""


def mmap_check(path: Path, expected: str) -> str:
    """'ok' if the file read through mmap(MAP_SHARED) hashes like the image. In a child
    process: a SIGBUS there must not take the benchmark (and its unmounts) with it."""
    proc = subprocess.run(
        [sys.executable, "-c", MMAP_HASH, str(path)], capture_output=True, text=True
    )
    if proc.returncode < 0:
        return f"FAILED: {signal.Signals(-proc.returncode).name}"
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return f"FAILED: {lines[-1]}"
    got = proc.stdout.strip()
    return "ok" if got == expected else f"FAILED: sha256 {got[:12]} != {expected[:12]}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# --- memory held in use -----------------------------------------------------------------------

HOLDER = """
import sys
with open("/proc/self/oom_score_adj", "w") as f:
    f.write("1000")  # if memory runs short, this process goes first
chunks, left = [], int(sys.argv[1])
while left > 0:
    chunk = bytearray(min(left, 1 << 30))
    chunk[::4096] = b"\\1" * len(range(0, len(chunk), 4096))  # touch every page
    chunks.append(chunk)
    left -= len(chunk)
print("held", flush=True)
sys.stdin.read()  # until the benchmark closes the pipe or exits
"""


def hold_memory(size: int, cap: int) -> tuple[subprocess.Popen | None, int]:
    """A child that keeps MemAvailable - 3 x image - 2 GiB (at most `cap`) in use."""
    want = min(cap, mem_available() - 3 * size - 2 * GiB)
    if want < GiB:
        print(f"holding no memory: only {mem_available() / GiB:.1f} GiB available", flush=True)
        return None, 0
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(want)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "held":
        raise RuntimeError("the memory holder did not start")
    print(
        f"holding {want / GiB:.1f} GiB in use (pid {proc.pid}); MemAvailable now "
        f"{mem_available() / GiB:.1f} GiB",
        flush=True,
    )
    return proc, want


def release_memory(proc: subprocess.Popen | None) -> str:
    if proc is None:
        return ""
    died = proc.poll()
    proc.kill()
    proc.wait()
    return "" if died is None else f"the memory holder had died (exit {died}) during the run"


# --- fio --------------------------------------------------------------------------------------


def ensure_fio() -> None:
    if shutil.which("fio"):
        return
    print("fio is missing: apt-get install -y fio", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "fio"]
    if subprocess.run(install, env=env, capture_output=True).returncode:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True)
    if not shutil.which("fio"):
        sys.exit("fio could not be installed")


def fio_args(path: Path, engine: str, depth: int) -> list[str]:
    return [
        "fio",
        "--name=rand4k",
        f"--filename={path}",
        "--rw=randread",
        "--bs=4k",
        f"--ioengine={engine}",
        f"--iodepth={depth}",
        "--direct=0",
        "--readonly",
        "--invalidate=0",  # fio's default drops the file's pages first: no warm run otherwise
        "--randrepeat=1",
        "--norandommap",
        "--output-format=json",
    ]


def qd16_engine(work: Path, preferred: str) -> str | None:
    """`preferred` if fio can run it here, else the other of libaio and io_uring, else None
    (QD16 skipped)."""
    probe = work / "fio-probe"
    probe.write_bytes(bytes(MiB))
    try:
        for engine in dict.fromkeys((preferred, "libaio", "io_uring")):
            cmd = [*fio_args(probe, engine, 16), "--size=1m"]
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return engine
            print(f"fio: the {engine} engine does not run here", flush=True)
        return None
    finally:
        probe.unlink()


def fio(path: Path, seconds: float, engine: str, depth: int) -> dict[str, float]:
    cmd = [*fio_args(path, engine, depth), "--time_based", f"--runtime={seconds}"]
    out = run(*cmd, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]["read"]
    percentile = job["clat_ns"]["percentile"]
    return {
        "iops": job["iops"],
        "p50_us": percentile["50.000000"] / 1000,
        "p99_us": percentile["99.000000"] / 1000,
    }


# --- scenarios --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    image: Path
    size: int
    sha256: str
    fio_seconds: float
    qd16: str | None  # the fio engine for QD16, None: skipped


def sequential_reads(path: Path, s: Setup, pid: int | None = None) -> Figures:
    """`dd` cold, then again warm; with the daemon's `pid`, the CPU it used for each."""
    drop_and_check(path)
    figures: Figures = {}
    for temp in ("cold", "warm"):
        if temp == "warm" and (share := warm_share(path)) is not None:
            figures["warm_read_cached_pct"] = 100 * share
        before = cpu_seconds(pid) if pid else 0.0
        figures[f"{temp}_read_mb_s"] = dd_mb_s(path, s.size)
        if pid:
            figures[f"{temp}_read_daemon_cpu_s"] = cpu_seconds(pid) - before
    return figures


def random_reads(path: Path, s: Setup) -> Figures:
    """fio cold (pages dropped just before each run) and warm (after a full read)."""
    figures: Figures = {}
    runs = [(1, "psync")] + ([(16, s.qd16)] if s.qd16 else [])
    for temp in ("cold", "warm"):
        if temp == "warm":
            run("dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none")
            if (share := warm_share(path)) is not None:
                figures["fio_warm_cached_pct"] = 100 * share
        for depth, engine in runs:
            if temp == "cold":
                drop_and_check(path)
            key = f"fio_{temp}_qd{depth}"
            for name, value in fio(path, s.fio_seconds, engine, depth).items():
                figures[f"{key}_{name}"] = value
            if temp == "cold" and (share := cached_share(path)) is not None:
                figures[f"{key}_cached_pct"] = 100 * share
    return figures


def reference_run(work: Path, s: Setup) -> Figures:
    """The same scenarios on a local copy of the image."""
    local = work / "local.img"
    settle()
    figures: Figures = {"ingest_s": timed("cp", s.image, local) + timed("sync")}
    figures |= sequential_reads(local, s)
    figures |= random_reads(local, s)
    local.unlink()
    return figures


@dataclass(frozen=True)
class Tree:
    name: str
    path: Path

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(self.path))

    def snapfs(self, *args: str | os.PathLike) -> subprocess.CompletedProcess:
        # `python -m` puts the working directory first on sys.path: run in the tree measured.
        return run(sys.executable, "-m", "snapfs", *args, env=self.env, cwd=self.path)

    def check_import(self) -> None:
        code = "import snapfs; print(snapfs.__file__)"
        found = run(sys.executable, "-c", code, env=self.env, cwd=self.path, text=True).stdout
        assert found.startswith(str(self.path)), f"{self.path}: imports {found}"


def daemon_pid(mnt: Path) -> int:
    """From the mount registry (as bench.py does), else the daemon's command line."""
    record = mounts.lookup(mnt)
    if record is not None and record.alive:
        return record.pid
    target = os.path.abspath(mnt).encode()
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--foreground" in argv and target in argv:
            return int(proc.name)
    raise RuntimeError(f"no daemon found for {mnt}")


def unmount(tree: Tree, mnt: Path) -> None:
    try:
        tree.snapfs("umount", mnt)
    finally:
        if mounts.mount_fstype(mnt):
            mounts.fusermount_unmount(mnt, lazy=True)


def tree_run(tree: Tree, work: Path, s: Setup) -> Figures:
    store, mnt = work / f"{tree.name}-store", work / f"{tree.name}-mnt"
    mnt.mkdir()
    try:
        tree.snapfs("mount", mnt, "--store", store)
        try:
            pid = daemon_pid(mnt)
            (mnt / REGION).mkdir()
            snapshot = mnt / REGION / NAME
            settle()
            start = time.perf_counter()
            run("cp", s.image, snapshot)
            wait_available(snapshot)
            figures: Figures = {"ingest_s": time.perf_counter() - start}
            settle()  # the reads start from a quiet machine, as the local reference's do
            figures |= sequential_reads(snapshot, s, pid)
            figures["mmap"] = mmap_check(snapshot, s.sha256)
            figures |= random_reads(snapshot, s)
            figures["daemon_peak_rss_mib"] = peak_rss(pid) / MiB
        finally:
            unmount(tree, mnt)
    finally:
        shutil.rmtree(store, ignore_errors=True)
        if not mounts.mount_fstype(mnt):
            mnt.rmdir()
    return figures


# --- the report -------------------------------------------------------------------------------


def cell(row: Row, values: list[float | str]) -> str:
    if not values:
        return "-"
    if row.key == "mmap":
        failed = [str(v) for v in values if v != "ok"]
        return failed[0] if failed else f"ok [{' '.join(map(str, values))}]"
    numbers = [float(v) for v in values]
    raw = " ".join(f"{v:.{row.digits}f}" for v in numbers)
    return f"{statistics.median(numbers):.{row.digits}f} {row.unit} [{raw}]"


def ratio(row: Row, new: list[float | str], old: list[float | str]) -> str:
    if row.key == "mmap" or not new or not old:
        return "-"
    base, now = (statistics.median(float(v) for v in side) for side in (old, new))
    if round(base, row.digits) == 0 or round(now, row.digits) == 0:
        return "-"  # below what the table shows: no meaningful ratio
    return f"{now / base:.2f}x"


def report(results: dict[str, list[Figures]]) -> None:
    def values(which: str, row: Row) -> list[float | str]:
        return [r[row.key] for r in results.get(which, []) if row.key in r]

    columns = ["current", "baseline", "ratio"] if "baseline" in results else ["current"]
    header = ["scenario", *columns, "local reference"]
    lines = []
    for row in ROWS:
        cur, old = values("current", row), values("baseline", row)
        cells = {"current": cell(row, cur), "baseline": cell(row, old)}
        cells["ratio"] = ratio(row, cur, old)
        lines.append([row.label, *(cells[c] for c in columns), cell(row, values("ref", row))])
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    print()
    for line in [header, *lines]:
        print(" | ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)))


def notes(s: Setup, rounds: int, held: int, baseline: str | None) -> None:
    pages = s.size // PAGE
    print(
        f"\n{s.size / MiB:.0f} MiB disk-like image ({pages} pages of 4 KiB); rounds: {rounds}, "
        f"medians [raw per round]; memory held in use: {held / GiB:.1f} GiB"
    )
    if baseline:
        print(
            f"ratio = current / baseline ({baseline}): above 1 is better for MB/s and IOPS, "
            "worse for s, µs and MiB"
        )
    print(
        "cold = the file's pages dropped just before (POSIX_FADV_DONTNEED); for the snapshot "
        "the store's files stay cached (the daemon's path), the local file is read from disk.\n"
        f"fio's cold runs warm the cache as they go: 'file cached after' is the share of the "
        f"file in the page cache when a {s.fio_seconds:g} s run ends.\n"
        f"QD1: psync; QD16: {s.qd16 or 'skipped (neither libaio nor io_uring runs)'}, buffered "
        "(--direct=0); both --invalidate=0, --randrepeat=1, --norandommap."
        + (
            "\nbuffered libaio reads complete inside io_submit: QD16 is then 16 synchronous "
            "reads per submission, and its latency that of the batch."
            if s.qd16 == "libaio"
            else ""
        )
    )


# --- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", help="a git revision to compare with (default: none)")
    parser.add_argument("--size", default="1G", help="image size (default 1G)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fio-seconds", type=float, default=5.0)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument(
        "--qd16-engine",
        choices=("libaio", "io_uring"),
        default="libaio",
        help="fio engine for QD16 (default libaio; buffered libaio submits synchronously)",
    )
    parser.add_argument("--json", type=Path, help="write every raw figure here")
    parser.add_argument("--no-hold-memory", action="store_true", help="hold no memory in use")
    parser.add_argument("--hold-max", default="16G", help="hold at most this much (16G)")
    return parser.parse_args()


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM unmounts like a Ctrl-C


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, interrupt)
    ensure_fio()
    size = diskimage.parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench-reads.", dir=args.workdir))
    trees = [Tree("current", ROOT)]
    holder, held, problem = None, 0, ""
    results: dict[str, list[Figures]] = {"ref": [], "current": []}
    try:
        if args.baseline:
            export_revision(args.baseline, work / "baseline")
            trees.append(Tree("baseline", work / "baseline"))
            results["baseline"] = []
        for tree in trees:
            tree.check_import()
        image = work / "image.img"
        print(f"generating a {size / MiB:.0f} MiB disk-like image in {work} ...", flush=True)
        diskimage.create(image, size, seed=1)
        s = Setup(
            image, size, sha256_of(image), args.fio_seconds, qd16_engine(work, args.qd16_engine)
        )
        if not args.no_hold_memory:
            holder, held = hold_memory(size, diskimage.parse_size(args.hold_max))
        for round_no in range(args.rounds):
            results["ref"].append(reference_run(work, s))
            print(f"  round {round_no + 1} local reference done", flush=True)
            for tree in trees if round_no % 2 == 0 else trees[::-1]:
                figures = tree_run(tree, work, s)
                results[tree.name].append(figures)
                print(
                    f"  round {round_no + 1} {tree.name:8} ingest {figures['ingest_s']:.2f} s, "
                    f"cold {figures['cold_read_mb_s']:.0f} MB/s, "
                    f"warm {figures['warm_read_mb_s']:.0f} MB/s, mmap {figures['mmap']}",
                    flush=True,
                )
    finally:
        problem = release_memory(holder)
        for mnt in work.glob("*-mnt"):
            if mounts.mount_fstype(mnt):
                mounts.fusermount_unmount(mnt, lazy=True)
        shutil.rmtree(work, ignore_errors=True)
    report(results)
    notes(s, args.rounds, held, args.baseline)
    if problem:
        print(f"warning: {problem}")
    if args.json:
        raw = {
            "image_bytes": size,
            "held_bytes": held,
            "baseline": args.baseline,
            "qd16_engine": s.qd16,
            "fio_seconds": s.fio_seconds,
            "rounds": results,
        }
        args.json.write_text(json.dumps(raw, indent=2))
        print(f"raw figures written to {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted: mounts unmounted, work directory removed")
