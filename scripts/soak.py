"""snapfs soak runs: crashes at random points, and sustained load.

crash: the crash workload of tests/crash/workload.py (ingest, cp copy, mv, CopySnapshot into an
    encrypted region, rm, retention) is run --runs times on copies of one prepared store.
    A first run with SNAPFS_FAULT_TRACE=1 learns how often the workload reaches each fault
    point; then each run makes the daemon die either at a random (point, N) among those
    (SNAPFS_FAULT, snapfs/faults.py) or, for --timed-share of the runs, by kill -9 after a
    random delay. After each death the store is mounted again and verified (every sealed
    snapshot identical, every copy resumed and identical, snapfs check clean, no traceback).
    Prints one line per run and "survived X/N".

powerloss: the same workload and verification, with the store on powercutfs (a test disk
    that drops every write, truncate and directory entry not fsync'ed; tests/crash/powercutfs.py):
    each run the daemon dies (a random fault point or moment, as above) and then the power
    is cut, before the store is mounted again and verified.

load: rounds of tests/mount/loadwork.py (100 copies into one region at once by mv, cp and the
    CopySnapshot API, with reader and writer threads; each copy limited by --copy-bwlimit
    so that they run side by side) until --duration seconds have passed;
    each round's copies are verified and deleted. Prints per round and in total: copies
    completed and verified, writes and reads verified, the worst `ls` latency seen.

Exit status 0 only if nothing was lost or wrong.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snapfs import faults  # noqa: E402
from snapfs.fuse import mounts  # noqa: E402
from tests.conftest import SnapfsMount, wait_for  # noqa: E402
from tests.crash import workload  # noqa: E402
from tests.crash.powercutfs import PowerCutFS  # noqa: E402
from tests.mount import loadwork  # noqa: E402


def learn_fault_points(
    template: Path, images: workload.Images, work: Path
) -> tuple[dict[str, int], float]:
    """How many times the whole workload reaches each fault point (a run that never dies),
    and how long the workload takes."""
    case = work / "trace"
    workload.copy_store(template, case / "store")
    m = SnapfsMount(case / "store", case / "mnt", env=workload.clock_env(case / "clock"))
    try:
        m.mount(env={faults.TRACE_ENV: "1"})
        steps = workload.Workload(m, images, case / "clock")
        started = time.monotonic()
        assert steps.run_steps() is None, "the daemon died without a fault"
        duration = time.monotonic() - started
        hits = workload.trace_hits(m.log())
    finally:
        m.teardown()
        shutil.rmtree(case, ignore_errors=True)
    return hits, duration


def crash_once(
    run: int, template: Path, images: workload.Images, work: Path, how: str, rng: random.Random,
    hits: dict[str, int], duration: float, power_cut: bool = False,
) -> tuple[str, str]:
    """One run: ('survived' | 'not reached' | 'FAILED', what happened). With `power_cut`
    the store is on powercutfs, and the power is cut once the daemon is dead."""
    case = work / f"run{run}"
    disk = None
    if power_cut:
        workload.copy_store(template, case / "backing" / "store")
        disk = PowerCutFS(case / "backing", case / "disk")
        disk.start()
        store = case / "disk" / "store"
    else:
        workload.copy_store(template, case / "store")
        store = case / "store"
    m = SnapfsMount(store, case / "mnt", env=workload.clock_env(case / "clock"))
    try:
        steps = workload.Workload(m, images, case / "clock")
        if how == "timed":
            delay = rng.uniform(0.0, duration)
            label = f"kill -9 after {delay:.2f} s"
            m.mount()
            steps.pid = m.pid
            killer = threading.Timer(delay, lambda: _kill(steps.pid))
            killer.start()
            died_in = steps.run_steps()
            killer.join()
            if died_in is None:
                died_in = "after the workload"
                wait_for(steps.dead, 10)
        else:
            point = rng.choice(sorted(hits))
            hit = rng.randint(1, hits[point])
            label = f"{point}:{hit}"
            m.mount(env=workload.fault_env(point, hit))
            steps.pid = m.pid
            died_in = steps.run_steps()
            if died_in is None:
                return "not reached", label
        if disk is not None:
            dropped = disk.stats()
            disk.cut()
            label += (f", power cut ({dropped['dirty_inodes']} files and "
                      f"{dropped['journal']} entries not durable dropped)")
        m.mount()
        counts = workload.verify(m, images)
        return "survived", f"{label}, died in {died_in}, {counts['snapshots']} snapshots verified"
    except Exception as exc:  # noqa: BLE001 - a soak reports every failure and goes on
        detail = "".join(traceback.format_exception_only(exc)).strip()
        keep = work / f"failed-run{run}"
        shutil.copytree(store, keep / "store", dirs_exist_ok=True)
        return "FAILED", f"{detail[:400]} (store kept in {keep})"
    finally:
        m.teardown()
        if disk is not None:
            disk.stop()
        shutil.rmtree(case, ignore_errors=True)


def _kill(pid: int | None) -> None:
    if pid is not None and mounts.pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def soak_crash(args: argparse.Namespace, work: Path) -> int:
    rng = random.Random(args.seed)
    images = workload.Images.create(work / "images")
    template = work / "template"
    workload.build_template(template / "store", template / "mnt", images)
    hits, duration = learn_fault_points(template / "store", images, work)
    print("fault points reached by the workload: "
          + ", ".join(f"{p} x{n}" for p, n in sorted(hits.items())), flush=True)  # fmt: skip
    tally = {"survived": 0, "not reached": 0, "FAILED": 0}
    for run in range(1, args.runs + 1):
        how = "timed" if rng.random() < args.timed_share else "fault"
        outcome, detail = crash_once(
            run, template / "store", images, work, how, rng, hits, duration,
            power_cut=args.mode == "powerloss",
        )
        tally[outcome] += 1
        print(f"run {run}/{args.runs}: {outcome}: {detail}", flush=True)
    tried = args.runs - tally["not reached"]
    what = "power losses" if args.mode == "powerloss" else "crashes"
    print(f"survived {tally['survived']}/{tried} {what} ({tally['not reached']} fault points "
          f"not reached, {tally['FAILED']} failed)")  # fmt: skip
    return 0 if tally["FAILED"] == 0 else 1


def soak_load(args: argparse.Namespace, work: Path) -> int:
    limit = ("--copy-bwlimit", args.copy_bwlimit) if args.copy_bwlimit else ()
    m = SnapfsMount(work / "store", work / "mnt", block_size=64 << 10, extra_args=limit)
    m.mount()
    totals = loadwork.Round()
    rounds = 0
    try:
        digests = loadwork.create_sources(m, work / "images")
        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline:
            rounds += 1
            r = loadwork.run_round(m, digests, str(rounds), copies=args.copies,
                                   writers=args.writers, readers=args.readers)  # fmt: skip
            loadwork.clear_round(m, str(rounds))
            print(f"round {rounds}: {r.copies_verified}/{r.copies_started} copies verified, "
                  f"{r.writes_verified} writes, {r.reads_verified} reads verified, "
                  f"{r.most_running} copy jobs running at once, worst ls {r.worst_ls:.3f} s"
                  + (f", PROBLEMS: {r.problems}" if r.problems else ""), flush=True)  # fmt: skip
            totals.copies_started += r.copies_started
            totals.copies_verified += r.copies_verified
            totals.writes_verified += r.writes_verified
            totals.reads_verified += r.reads_verified
            totals.worst_ls = max(totals.worst_ls, r.worst_ls)
            totals.most_running = max(totals.most_running, r.most_running)
            totals.problems += r.problems
        alive = m.alive()
        traceback_logged = "Traceback" in m.log()
        m.umount()
        code, report = m.check()
    finally:
        m.teardown()
    print(f"load: {rounds} rounds in {args.duration} s: {totals.copies_verified}/"
          f"{totals.copies_started} copies completed and verified, {totals.writes_verified} "
          f"writes and {totals.reads_verified} reads verified, up to {totals.most_running} "
          f"copy jobs at once, worst ls latency {totals.worst_ls:.3f} s; daemon alive: {alive}, "
          f"traceback logged: {traceback_logged}, check: {'clean' if code == 0 else 'DAMAGED'}")
    ok = not totals.problems and alive and not traceback_logged and code == 0 and report["ok"]
    return 0 if ok and totals.copies_verified == totals.copies_started else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode, help_text in (("crash", "random kill points, then verify"),
                            ("powerloss", "random kill points, then a power cut, then verify")):
        p = sub.add_parser(mode, help=help_text)
        p.add_argument("--runs", type=int, default=30)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--timed-share", type=float, default=0.25,
                       help="share of runs killed at a random moment instead of a fault point")
    p = sub.add_parser("load", help="100 concurrent copies + readers + writers, repeatedly")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of rounds")
    p.add_argument("--copies", type=int, default=100)
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--readers", type=int, default=4)
    p.add_argument("--copy-bwlimit", default="2M",
                   help="per-copy limit, so that the copies overlap ('' for none)")
    for p in sub.choices.values():
        p.add_argument("--workdir", type=Path, help="where stores and images go (a temp dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix=f"snapfs-soak-{args.mode}-", dir=args.workdir))
    try:
        return soak_load(args, work) if args.mode == "load" else soak_crash(args, work)
    finally:
        kept = [p for p in work.iterdir() if p.name.startswith("failed-")]
        if not kept:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
