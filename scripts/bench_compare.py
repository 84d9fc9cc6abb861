"""One snapfs revision beside another: ingest, reads and copies, side by side in one run.

It runs the same scenarios on the current tree and on a baseline revision, alternating their
order round by round, on the same images and the same disk, and prints the times side by
side with their ratio, beside `cp` + `sync` to local disk. Used for issue 13 (what durability
costs: fdatasync per pack instead of one syncfs per batch; baseline ab59861) and issue 14
(the restructure must not slow anything; baseline 7def49c).

Scenarios on a disk-like image (default 1 GiB) and a day-2 image that differs from it in
scattered 4 KiB pages (`--changed` of the pages, default 0.3%): ingest (`cp` into a region,
until sealed), a sequential read (`cat`, cold: the snapshot's pages dropped first), day-2
ingest, a full `mv` copy into an empty region (until available) and an incremental `cp`
copy of day 2.

    scripts/bench_compare.py [--baseline REV] [--size 1G] [--rounds 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snapfs.cli import diskimage  # noqa: E402

MB = 1_000_000
DEFAULT_BASELINE = "ab59861"  # the tree before issue 13: syncfs per batch
SCENARIOS = [
    "ingest day 1",
    "sequential read (cat)",
    "ingest day 2",
    "mv copy, full",
    "cp copy of day 2, incremental",
]


def run(*cmd: str | os.PathLike, env: dict | None = None, cwd: Path | None = None) -> None:
    subprocess.run([str(c) for c in cmd], check=True, env=env, cwd=cwd,
                   stdout=subprocess.DEVNULL)


def timed(*cmd: str | os.PathLike, env: dict | None = None) -> float:
    start = time.perf_counter()
    run(*cmd, env=env)
    return time.perf_counter() - start


def export_revision(rev: str, dest: Path) -> None:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def wait_status(path: Path, wanted: str = "available", timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = os.getxattr(path, "user.snapfs.status").decode()  # reading it seals
        if status == wanted:
            return
        if status == "failed":
            raise RuntimeError(f"{path} failed")
        time.sleep(0.05)
    raise TimeoutError(f"{path} not {wanted}")


def drop_pages(path: Path) -> None:
    """Drop the file's clean pages from the page cache (dirty ones need a sync first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_read(path: Path) -> float:
    """`cat` of a sealed snapshot whose pages were just dropped from the page cache."""
    drop_pages(path)
    start = time.perf_counter()
    subprocess.run(f"cat {path} > /dev/null", shell=True, check=True)
    return time.perf_counter() - start


def one_run(tree: Path, work: Path, day1: Path, day2: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    check = subprocess.run([sys.executable, "-c", "import snapfs; print(snapfs.__file__)"],
                           env=env, cwd=tree, capture_output=True, text=True, check=True)
    assert check.stdout.startswith(str(tree)), f"{tree}: imports {check.stdout}"
    snapfs = [sys.executable, "-m", "snapfs"]
    store, mnt = work / "store", work / "mnt"
    mnt.mkdir()
    # `python -m` puts the working directory first on sys.path: run in the tree measured.
    run(*snapfs, "mount", mnt, "--store", store, env=env, cwd=tree)
    times: dict[str, float] = {}
    try:
        a, b = mnt / "cn-hangzhou", mnt / "us-east-1"
        a.mkdir()
        b.mkdir()
        for name, image in (("ingest day 1", day1), ("ingest day 2", day2)):
            start = time.perf_counter()
            run("cp", image, a / image.name)
            wait_status(a / image.name)
            times[name] = time.perf_counter() - start
            if image is day1:
                times["sequential read (cat)"] = cold_read(a / image.name)
        start = time.perf_counter()
        run("mv", a / day1.name, b)
        wait_status(b / day1.name)
        times["mv copy, full"] = time.perf_counter() - start
        start = time.perf_counter()
        run("cp", a / day2.name, b)
        wait_status(b / day2.name)
        times["cp copy of day 2, incremental"] = time.perf_counter() - start
    finally:
        run(*snapfs, "umount", mnt, env=env, cwd=tree)
        shutil.rmtree(store, ignore_errors=True)
        mnt.rmdir()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--changed", type=float, default=0.003,
                        help="share of 4 KiB pages changed on day 2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    size = diskimage.parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench-durability.", dir=args.workdir))
    try:
        baseline = work / "baseline"
        export_revision(args.baseline, baseline)
        day1, day2 = work / "day1.img", work / "day2.img"
        diskimage.create(day1, size, seed=1)
        shutil.copy(day1, day2)
        changed = diskimage.mutate(day2, args.changed, block_size=4096, seed=2)
        print(f"{size / MB:.0f} MB image, day 2 differs in {changed // 4096} scattered 4 KiB "
              f"pages; baseline {args.baseline}, {args.rounds} rounds", flush=True)
        subprocess.run(f"cat {day1} {day2} > /dev/null", shell=True, check=True)
        reference: list[float] = []
        results: dict[str, list[dict[str, float]]] = {"baseline": [], "current": []}
        trees = {"baseline": baseline, "current": ROOT}
        for round_no in range(args.rounds):
            local = work / "local.img"
            run("sync")
            reference.append(timed("cp", day1, local) + timed("sync"))
            local.unlink()
            order = ["baseline", "current"] if round_no % 2 == 0 else ["current", "baseline"]
            for which in order:
                run("sync")
                times = one_run(trees[which], work, day1, day2)
                results[which].append(times)
                print(f"  round {round_no + 1} {which:8} "
                      + "  ".join(f"{k}: {v:.2f} s" for k, v in times.items()), flush=True)
        print(f"\n{'scenario':34} {'baseline':>16} {'current':>16} {'current/baseline':>17}")
        ref = statistics.median(reference)
        print(f"{'reference: cp + sync to local disk':34} {ref:8.2f} s {size / ref / MB:5.0f} MB/s")
        for name in SCENARIOS:
            old = statistics.median(r[name] for r in results["baseline"])
            new = statistics.median(r[name] for r in results["current"])
            print(f"{name:34} {old:8.2f} s {size / old / MB:5.0f} MB/s "
                  f"{new:8.2f} s {size / new / MB:5.0f} MB/s {new / old:16.2f}x")
    finally:
        for mnt in work.glob("mnt"):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
