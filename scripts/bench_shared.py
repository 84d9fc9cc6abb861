"""snapfs benchmark: a region shared by several hosts (issue 19), side by side.

On one `rclone serve s3` on loopback (scripts/bench_s3.py's server) and a private
PostgreSQL (the tests' `start_pg_server`), with --hosts snapfs daemons (four by default),
each on a store of its own:

  1. every host copies the same disk-like template (--size, 512 MiB) into the region at
     the same moment: the bytes and PUTs the bucket received, and the time until the last
     `cp` returned; against one bucket prefix per host (an ordinary bucket region each, the
     only way before shared regions), and restic with as many hosts (`--host`) backing the
     template up into one repository on the same server, one after another (restic's lock
     lets one backup at a time write the index);
  2. visibility: a host seals a snapshot (`cp`, then `getfattr -n user.snapfs.status`),
     another lists the region until it shows; --rounds times, the median and the worst;
  3. a new host's cold start: with --cold-start snapshots in the region, one more store
     attaches it (`snapfs region attach --index`, mounted): the time until all are listed,
     and a cold `cat` of one of them.

    scripts/bench shared [--size 512M] [--hosts 4] [--rounds 20] [--cold-start 100]
"""

from __future__ import annotations

import argparse
import json
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
sys.path.insert(0, str(ROOT / "scripts"))

from bench_packs import bucket_objects, count_files, timed, wait_available  # noqa: E402
from bench_s3 import Server, _env  # noqa: E402

from snapfs.cli import diskimage  # noqa: E402
from tests.conftest import start_pg_server  # noqa: E402

MiB = 1 << 20
BUCKET = "snapfs-shared-bench"
SNAPFS = [sys.executable, "-m", "snapfs"]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].isalpha() else int(text)


class Fleet:
    """Hosts on one machine: a store and a mountpoint each, one daemon each."""

    def __init__(self, work: Path, count: int, env: dict[str, str]):
        self.env = env
        self.mounts = [work / f"mnt-{n}" for n in range(count)]
        self.stores = [work / f"store-{n}" for n in range(count)]

    def mount(self, n: int) -> None:
        self.mounts[n].mkdir(exist_ok=True)
        timed(*SNAPFS, "mount", self.mounts[n], "--store", self.stores[n], env=self.env)

    def region(self, n: int, verb: str, name: str, prefix: str, endpoint: str, *extra: str):
        timed(*SNAPFS, "region", verb, name, "--backend", f"s3://{BUCKET}/{prefix}",
              "--endpoint", endpoint, "--store", self.stores[n], *extra, env=self.env)  # fmt: skip

    def unmount_all(self) -> None:
        for mnt in self.mounts:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def all_at_once(commands: list[list[str]]) -> float:
    start = time.perf_counter()
    procs = [subprocess.Popen(c) for c in commands]
    if any(p.wait() for p in procs):
        raise RuntimeError("a copy failed")
    return time.perf_counter() - start


def copies(work: Path, template: Path, hosts: int, shared: bool) -> dict[str, float | int]:
    """Every host copies the template in at once: into one shared region, or each into a
    bucket region of its own (one prefix per host)."""
    label = "shared" if shared else "per-host"
    here = work / label
    here.mkdir()
    server = Server(here)
    pg = None
    if shared:
        (here / "pg").mkdir()
        pg = start_pg_server(here / "pg")
    env = dict(_env(), SNAPFS_PACK_GRACE="60")
    fleet = Fleet(here, hosts, env)
    try:
        dsn = ""
        if pg is not None:
            import psycopg

            with psycopg.connect(pg.url(), autocommit=True) as conn:
                conn.execute("CREATE DATABASE bench")
            dsn = pg.url("bench")
        for n in range(hosts):
            fleet.mount(n)
            if shared:
                verb = "create" if n == 0 else "attach"
                fleet.region(n, verb, "shared-1", "shared", server.endpoint, "--index", dsn)
            else:
                fleet.region(n, "create", "shared-1", f"host-{n}", server.endpoint)
        print(f"  {label}: {hosts} hosts copy the template at once ...", flush=True)
        seconds = all_at_once([
            ["cp", str(template), str(fleet.mounts[n] / "shared-1" / f"vm-{n}.img")]
            for n in range(hosts)
        ])  # fmt: skip
        for n in range(hosts):
            wait_available(fleet.mounts[n] / "shared-1" / f"vm-{n}.img")
        objects = size = 0
        for prefix in ["shared"] if shared else [f"host-{n}" for n in range(hosts)]:
            o, s = bucket_objects(server.data / BUCKET / prefix)
            objects, size = objects + o, size + s
        result: dict[str, float | int] = {"seconds": seconds, "puts": objects, "bytes": size}
        if shared:
            result.update(visibility(fleet, ROUNDS))
            result.update(cold_start(fleet, here, server.endpoint, dsn, template, COLD_START))
        return result
    finally:
        fleet.unmount_all()
        server.stop()
        if pg is not None:
            pg.stop()


def visibility(fleet: Fleet, rounds: int) -> dict[str, float]:
    """Host 0 seals a small snapshot; host 1 lists until it is there."""
    src = fleet.mounts[0].parent / "small.img"
    diskimage.create(src, 2 * MiB, seed=5)
    writer, reader = fleet.mounts[0] / "shared-1", fleet.mounts[1] / "shared-1"
    delays = []
    print(f"  visibility: {rounds} snapshots sealed on one host, listed on another ...",
          flush=True)  # fmt: skip
    for n in range(rounds):
        name = f"seen-{n}.img"
        subprocess.run(["cp", str(src), str(writer / name)], check=True)
        os.getxattr(writer / name, "user.snapfs.status")  # seals it now
        sealed = time.perf_counter()
        while name not in os.listdir(reader):
            time.sleep(0.005)
        delays.append(time.perf_counter() - sealed)
    return {
        "visible_median_s": statistics.median(delays),
        "visible_worst_s": max(delays),
    }


def cold_start(
    fleet: Fleet, here: Path, endpoint: str, dsn: str, template: Path, count: int
) -> dict[str, float | int]:
    """`count` snapshots in the region, then one more store attaches it (mounted)."""
    base = here / "base.img"
    diskimage.create(base, 16 * MiB, seed=9)
    region = fleet.mounts[0] / "shared-1"
    print(f"  cold start: {count} snapshots, then a new host attaches ...", flush=True)
    for n in range(count):
        variant = here / "variant.img"
        shutil.copy(base, variant)
        diskimage.mutate(variant, 0.001, block_size=4096, seed=100 + n)
        subprocess.run(["cp", str(variant), str(region / f"day{n:03}.img")], check=True)
    wait_available(region / f"day{count - 1:03}.img")
    total = len(os.listdir(region))
    fleet.mounts.append(here / "mnt-new")
    fleet.stores.append(here / "store-new")
    new = len(fleet.mounts) - 1
    fleet.mount(new)
    start = time.perf_counter()
    fleet.region(new, "attach", "shared-1", "shared", endpoint, "--index", dsn)
    listed = fleet.mounts[new] / "shared-1"
    while len(os.listdir(listed)) < total:
        time.sleep(0.01)
    attached = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(f"cat {listed / 'day050.img'} > /dev/null", shell=True, check=True)
    return {
        "cold_start_snapshots": total,
        "cold_start_attach_and_list_s": attached,
        "cold_start_first_read_s": time.perf_counter() - start,
    }


def restic_hosts(work: Path, template: Path, hosts: int) -> dict[str, float | int]:
    here = work / "restic"
    here.mkdir()
    server = Server(here)
    env = _env()
    repo = f"s3:{server.endpoint}/restic-ref"
    try:
        timed("restic", "-q", "-r", repo, "init", env=env)
        print(f"  restic: {hosts} hosts back the template up into one repository ...",
              flush=True)  # fmt: skip
        seconds = 0.0
        for n in range(hosts):
            seconds += timed("restic", "-q", "-r", repo, "backup", "--host", f"host-{n}",
                             template, env=env)  # fmt: skip
        objects, size = count_files(server.data / "restic-ref" / "data")
    finally:
        server.stop()
    return {"seconds": seconds, "puts": objects, "bytes": size}


ROUNDS = 20
COLD_START = 100


def main() -> int:
    global ROUNDS, COLD_START
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512M")
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cold-start", type=int, default=100)
    parser.add_argument("--no-restic", action="store_true")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "bench-shared.json")
    args = parser.parse_args()
    ROUNDS, COLD_START = args.rounds, max(args.cold_start, 51)
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench-shared.", dir="/var/tmp"))
    results: dict[str, dict[str, float | int]] = {}
    try:
        template = work / "template.img"
        diskimage.create(template, size, seed=1)
        results["shared"] = copies(work, template, args.hosts, shared=True)
        results["per-host"] = copies(work, template, args.hosts, shared=False)
        if not args.no_restic and shutil.which("restic"):
            results["restic"] = restic_hosts(work, template, args.hosts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(size, args.hosts, results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    return 0


def report(size: int, hosts: int, results: dict[str, dict[str, float | int]]) -> None:
    shared, per_host = results["shared"], results["per-host"]
    one_template = per_host["bytes"] / hosts
    print(f"\n{hosts} hosts copy one {size / MiB:.0f} MiB template at once")
    print(f"  {'':28}{'uploaded MiB':>14}{'PUTs':>8}{'seconds':>10}")
    for label, r in results.items():
        print(f"  {label:28}{r['bytes'] / MiB:14.1f}{r['puts']:8d}{r['seconds']:10.2f}")
    print(f"  shared / per-host uploaded bytes: {shared['bytes'] / per_host['bytes']:.2f}x; "
          f"shared / one template's stored bytes: {shared['bytes'] / one_template:.2f}x")
    if "restic" in results:
        restic = results["restic"]["bytes"]
        print(f"  shared / restic uploaded bytes: {shared['bytes'] / restic:.2f}x")
    median, worst = shared["visible_median_s"] * 1000, shared["visible_worst_s"] * 1000
    print(f"\nA snapshot sealed on one host is listed on another after {median:.0f} ms "
          f"(median), {worst:.0f} ms (worst) of {ROUNDS}")
    print(f"A new host attaches the region of {shared['cold_start_snapshots']} snapshots and "
          f"lists them all in {shared['cold_start_attach_and_list_s']:.2f} s; a first cold read "
          f"of one (16 MiB) {shared['cold_start_first_read_s']:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
