"""snapfs benchmark: packed objects on S3 against one object per block, and restic.

On one `rclone serve s3` on loopback (scripts/bench_s3.py's server), for the working tree
("current") and, with --baseline REV, a revision exported with `git archive` (run from that
tree on PYTHONPATH; before 9f9d5d7 a bucket region stored one object per block):

  1. `cp` of a disk-like image straight into a bucket region (day 1);
  2. `cp` of day 2 into it: day 1 with scattered 4 KiB pages changed (--pages, 0.5%) plus
     a few 1 MiB extents (--extents), as disks change;
  3. after a remount (no cache in the daemon, none in the kernel), a cold `cat` of day 1:
     ranged GETs of packs against one GET per block object;
  4. `rm` of day 1 and the bucket's bytes once garbage collection (and, packed, the pack
     upkeep with no grace: SNAPFS_PACK_GRACE=0) is done;
  5. (current tree) a new host's cold start: a region of --cold-start snapshots is attached
     into a fresh store from the bucket alone, mounted, listed and read.

Counted from the bucket itself (objects written = PUTs of data: nothing is overwritten in
it but the manifests, which are counted apart), for every step: objects, PUTs per GiB of
image, bytes, seconds. restic (`backup` of day 1, then day 2, to an s3 repository on the same
server) is the reference: its data/ objects are its packs.

    scripts/bench packs [--size 1G] [--baseline REV] [--no-restic]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_compare import export_revision  # noqa: E402
from bench_s3 import Server, _env  # noqa: E402

from snapfs.cli import diskimage  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
BUCKET, PREFIX = "snapfs-bench", "eu"


@dataclass(frozen=True)
class Tree:
    name: str
    path: Path

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return dict(base, PYTHONPATH=str(self.path), SNAPFS_PACK_GRACE="0")


def bucket_objects(root: Path) -> tuple[int, int]:
    """(objects, bytes) of block data under a region's prefix: packs/ and blocks/."""
    count = size = 0
    for sub in ("packs", "blocks"):
        for path in (root / sub).rglob("*") if (root / sub).exists() else []:
            if path.is_file() and not path.name.startswith("."):
                count += 1
                size += path.stat().st_size
    return count, size


def wait_available(path: Path, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = os.getxattr(path, "user.snapfs.status")
        if status == b"available":
            return
        if status == b"failed":
            raise RuntimeError(f"{path} failed")
        time.sleep(0.02)
    raise TimeoutError(path)


def timed(*cmd: str | os.PathLike, env: dict[str, str], cwd: Path | None = None) -> float:
    start = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, env=env, cwd=cwd, capture_output=True)
    return time.perf_counter() - start


def drop_pages(*paths: Path) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_tree(tree: Tree, work: Path, day1: Path, day2: Path) -> dict[str, float | int]:
    base = _env()
    env = tree.env(base)
    snapfs = [sys.executable, "-m", "snapfs"]
    here = work / tree.name
    here.mkdir()
    mnt, store = here / "mnt", here / "store"
    mnt.mkdir()
    server = Server(here)
    r: dict[str, float | int] = {}
    try:
        timed(*snapfs, "mount", mnt, "--store", store, env=env, cwd=tree.path)
        timed(*snapfs, "region", "create", "eu-west-1", "--backend", f"s3://{BUCKET}/{PREFIX}",
              "--endpoint", server.endpoint, "--store", store, env=env, cwd=tree.path)  # fmt: skip
        remote = mnt / "eu-west-1"
        root = server.data / BUCKET / PREFIX
        print(f"  {tree.name}: cp day 1 into the bucket region ...", flush=True)
        start = time.perf_counter()
        subprocess.run(["cp", str(day1), str(remote / "day1.img")], check=True)
        wait_available(remote / "day1.img")
        r["day1_s"] = time.perf_counter() - start
        r["day1_objects"], r["day1_bytes"] = bucket_objects(root)
        print(f"  {tree.name}: cp day 2 (scattered pages) ...", flush=True)
        start = time.perf_counter()
        subprocess.run(["cp", str(day2), str(remote / "day2.img")], check=True)
        wait_available(remote / "day2.img")
        r["day2_s"] = time.perf_counter() - start
        objects, size = bucket_objects(root)
        r["day2_objects"], r["day2_bytes"] = objects - r["day1_objects"], size - r["day1_bytes"]
        timed(*snapfs, "umount", mnt, env=env, cwd=tree.path)
        timed(*snapfs, "mount", mnt, "--store", store, env=env, cwd=tree.path)
        print(f"  {tree.name}: cold read of day 1 ...", flush=True)
        start = time.perf_counter()
        subprocess.run(f"cat {remote / 'day1.img'} > /dev/null", shell=True, check=True)
        r["read_s"] = time.perf_counter() - start
        os.unlink(remote / "day1.img")
        deadline = time.monotonic() + 120
        last = bucket_objects(root)
        while time.monotonic() < deadline:  # until the bucket stops shrinking for 3 s
            time.sleep(3)
            now = bucket_objects(root)
            if now == last:
                break
            last = now
        r["after_rm_objects"], r["after_rm_bytes"] = last
        timed(*snapfs, "umount", mnt, env=env, cwd=tree.path)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        server.stop()
    return r


def cold_start(work: Path, count: int, block: int = 512 << 10) -> dict[str, float | int]:
    """A bucket region with `count` snapshots (16 MiB each, a few pages apart), then a new
    host: `snapfs region attach` into a fresh store (its index rebuilt from manifests and
    pack locations), its mount, a listing, and a cold read of one snapshot."""
    env = dict(_env(), SNAPFS_PACK_GRACE="0")
    snapfs = [sys.executable, "-m", "snapfs"]
    here = work / "cold-start"
    here.mkdir()
    server = Server(here)
    first, second = here / "mnt1", here / "mnt2"
    first.mkdir()
    second.mkdir()
    r: dict[str, float | int] = {"snapshots": count}
    try:
        timed(*snapfs, "mount", first, "--store", here / "store1", env=env)
        timed(*snapfs, "region", "create", "eu-west-1", "--backend", f"s3://{BUCKET}/cold",
              "--endpoint", server.endpoint, "--store", here / "store1", env=env)  # fmt: skip
        base = here / "base.img"
        diskimage.create(base, 16 * MiB, seed=9)
        print(f"  cold start: writing {count} snapshots ...", flush=True)
        for n in range(count):
            variant = here / "variant.img"
            shutil.copy(base, variant)
            diskimage.mutate(variant, 0.001, block_size=4096, seed=100 + n)
            subprocess.run(["cp", str(variant), str(first / "eu-west-1" / f"day{n:03}.img")],
                           check=True)  # fmt: skip
        wait_available(first / "eu-west-1" / f"day{count - 1:03}.img")
        timed(*snapfs, "umount", first, env=env)  # publishes the last manifests
        print("  cold start: a new host attaches the region ...", flush=True)
        r["attach_s"] = timed(*snapfs, "region", "attach", "eu-west-1", "--backend",
                              f"s3://{BUCKET}/cold", "--endpoint", server.endpoint, "--store",
                              here / "store2", env=env)  # fmt: skip
        start = time.perf_counter()
        subprocess.run([*snapfs, "mount", str(second), "--store", str(here / "store2")],
                       check=True, env=env, capture_output=True)  # fmt: skip
        listed = os.listdir(second / "eu-west-1")
        r["mount_and_list_s"] = time.perf_counter() - start
        r["listed"] = len(listed)
        start = time.perf_counter()
        subprocess.run(f"cat {second / 'eu-west-1' / 'day050.img'} > /dev/null", shell=True,
                       check=True)  # fmt: skip
        r["first_read_s"] = time.perf_counter() - start
        timed(*snapfs, "umount", second, env=env)
    finally:
        for mnt in (first, second):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        server.stop()
    print(f"\nA new host's cold start on a bucket region of {count} snapshots of 16 MiB: "
          f"attach {r['attach_s']:.2f} s, mount and list {r['mount_and_list_s']:.2f} s "
          f"({r['listed']} listed), a first cold read of one {r['first_read_s']:.2f} s")
    return r


def run_restic(work: Path, day1: Path, day2: Path) -> dict[str, float | int]:
    here = work / "restic"
    here.mkdir()
    server = Server(here)
    env = _env()
    repo = f"s3:{server.endpoint}/restic-ref"
    data = server.data / "restic-ref" / "data"
    r: dict[str, float | int] = {}
    try:
        print("  restic: backup of day 1, then day 2 ...", flush=True)
        timed("restic", "-q", "-r", repo, "init", env=env)
        r["day1_s"] = timed("restic", "-q", "-r", repo, "backup", day1, env=env)
        r["day1_objects"], r["day1_bytes"] = count_files(data)
        r["day2_s"] = timed("restic", "-q", "-r", repo, "backup", day2, env=env)
        objects, size = count_files(data)
        r["day2_objects"], r["day2_bytes"] = objects - r["day1_objects"], size - r["day1_bytes"]
        drop_pages(day1)
        restore = here / "restore"
        r["read_s"] = timed("restic", "-q", "-r", repo, "restore", "latest", "--target",
                            restore, "--include", str(day2), env=env)  # fmt: skip
    finally:
        server.stop()
    return r


def count_files(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    return len(files), sum(p.stat().st_size for p in files)


def report(size: int, changed: int, results: dict[str, dict[str, float | int]]) -> None:
    gib = size / GiB
    print(f"\nBucket region on rclone serve s3 (loopback): {size / MiB:.0f} MiB disk-like "
          f"image, day 2 = {changed / MiB:.1f} MiB changed in scattered 4 KiB pages and "
          "1 MiB extents")
    names = list(results)
    print(f"  {'':34}" + "".join(f"{n:>16}" for n in names))
    rows = [
        ("day 1: PUTs of data", "day1_objects", "{:.0f}"),
        ("day 1: PUTs per GiB of image", None, "{:.0f}"),
        ("day 1: bytes in the bucket (MiB)", "day1_bytes", "MiB"),
        ("day 1: seconds", "day1_s", "{:.2f}"),
        ("day 2: PUTs of data", "day2_objects", "{:.0f}"),
        ("day 2: bytes uploaded (MiB)", "day2_bytes", "MiB"),
        ("day 2: seconds", "day2_s", "{:.2f}"),
        ("cold read of day 1: seconds", "read_s", "{:.2f}"),
        ("after rm day 1: objects", "after_rm_objects", "{:.0f}"),
        ("after rm day 1: bytes (MiB)", "after_rm_bytes", "MiB"),
    ]
    for label, field, fmt in rows:
        cells = []
        for name in names:
            r = results[name]
            if field is None:
                value = r["day1_objects"] / gib
            elif field not in r:
                cells.append(f"{'-':>16}")
                continue
            else:
                value = r[field]
            text = f"{value / MiB:.1f}" if fmt == "MiB" else fmt.format(value)
            cells.append(f"{text:>16}")
        print(f"  {label:34}" + "".join(cells))
    if "baseline" in results and "current" in results:
        cur, old = results["current"], results["baseline"]
        ratio(f"PUTs of day 1, current / baseline ({old['day1_objects'] / cur['day1_objects']:.0f}x"
              " fewer)", cur["day1_objects"], old["day1_objects"])
        ratio("PUTs of day 2, current / baseline", cur["day2_objects"], old["day2_objects"])
        ratio("cold read time, current / baseline", cur["read_s"], old["read_s"])
    if "restic" in results and "current" in results:
        cur, ref = results["current"], results["restic"]
        ratio("PUTs of day 1, current / restic", cur["day1_objects"], ref["day1_objects"])
        ratio("day 1 time, current / restic", cur["day1_s"], ref["day1_s"])


def ratio(label: str, a: float, b: float) -> None:
    print(f"  {label:60} {a / b if b else float('inf'):8.3f}x")

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G", help="image size (default 1G)")
    parser.add_argument("--pages", type=float, default=0.005,
                        help="share of 4 KiB pages changed on day 2 (default 0.005)")
    parser.add_argument("--extents", type=int, default=4,
                        help="1 MiB extents rewritten on day 2 (default 4)")
    parser.add_argument("--baseline", help="a git revision to compare with")
    parser.add_argument("--no-restic", action="store_true")
    parser.add_argument("--cold-start", type=int, default=100, metavar="N",
                        help="snapshots of the cold-start section (0: skip it; default 100)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "bench-packs.json")
    args = parser.parse_args()
    size = diskimage.parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench-packs.", dir=args.workdir))
    results: dict[str, dict[str, float | int]] = {}
    try:
        day1, day2 = work / "day1.img", work / "day2.img"
        print(f"generating a {size / MiB:.0f} MiB image in {work} ...", flush=True)
        diskimage.create(day1, size, seed=1)
        shutil.copy(day1, day2)
        changed = diskimage.mutate(day2, args.pages, block_size=4096, seed=2)
        if args.extents:
            changed += diskimage.mutate(day2, args.extents * MiB / size, block_size=MiB, seed=3)
        trees = [Tree("current", ROOT)]
        if args.baseline:
            export_revision(args.baseline, work / "baseline-tree")
            trees.append(Tree("baseline", work / "baseline-tree"))
        for tree in trees:
            results[tree.name] = run_tree(tree, work, day1, day2)
        if not args.no_restic and shutil.which("restic"):
            results["restic"] = run_restic(work, day1, day2)
        cold = cold_start(work, args.cold_start) if args.cold_start else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(size, changed, results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"size": size, "results": results, "cold_start": cold},
                                    indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
