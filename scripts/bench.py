"""snapfs benchmark: one run, side by side with the references, printed as ratios.

Scenarios (issue 2): a generated disk-like image (default 2 GiB, 60% zero extents, the rest
random and text-like) is
  - copied with `cp` to local disk (the physical reference) and into a region (ingest),
  - read back with `cat` to /dev/null (sequential read),
  - changed in 5% of its 1 MiB blocks and copied in again (incremental ingest),
and the daemon's peak RSS and the stored bytes against the unique bytes are reported.

Absolute times drift on a shared 2-core machine; the ratios within one run hold.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snapfs import diskimage, mounts  # noqa: E402

MB = 1_000_000
MiB = 1 << 20


def timed(*cmd: str | os.PathLike, shell: bool = False) -> float:
    start = time.perf_counter()
    if shell:
        subprocess.run(cmd[0], shell=True, check=True)
    else:
        subprocess.run([str(c) for c in cmd], check=True)
    return time.perf_counter() - start


def snapfs(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snapfs", *map(str, args)], check=True,
                          capture_output=True, text=True)


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def nonzero_bytes(path: Path, block: int) -> int:
    """Bytes in blocks that are not entirely zero (what any block store must keep)."""
    total = 0
    zero = bytes(block)
    with open(path, "rb") as f:
        while chunk := f.read(block):
            if chunk != zero[: len(chunk)]:
                total += len(chunk)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2G", help="image size (default 2G)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="block size of the benchmark store (default: snapfs default)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where images and the store go (default: a temp dir in /tmp)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "bench.json",
                        help="where to write the machine-readable results")
    args = parser.parse_args()

    size = diskimage.parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench.", dir=args.workdir))
    mnt, store = work / "mnt", work / "store"
    mnt.mkdir()
    image, local = work / "disk.img", work / "local-copy.img"
    results: dict[str, float | int | str] = {"image_bytes": size}
    try:
        print(f"generating a {size / MiB:.0f} MiB disk-like image in {work} ...", flush=True)
        diskimage.create(image, size, seed=1)
        timed(f"cat {image} > /dev/null", shell=True)  # both sides read it from page cache

        t = timed("cp", image, local)
        results["ref_cp_local_s"] = t
        t_sync = timed("sync")
        results["ref_cp_local_sync_s"] = t_sync
        local.unlink()

        mount_args = ["mount", mnt, "--store", store]
        if args.block_size:
            mount_args += ["--block-size", str(args.block_size)]
        snapfs(*mount_args)
        pid = mounts.lookup(mnt).pid
        (mnt / "us-east-1").mkdir()
        snap = mnt / "us-east-1" / "disk.img"
        results["ingest_s"] = timed("cp", image, snap)
        results["read_s"] = timed(f"cat {snap} > /dev/null", shell=True)
        results["read_again_s"] = timed(f"cat {snap} > /dev/null", shell=True)

        status = json.loads(snapfs("status", "--store", store, "--json").stdout)
        totals = status["regions"][0]["totals"]
        block = status["block_size"]
        results["block_size"] = block
        results["unique_bytes"] = totals["unique_bytes"]
        results["stored_bytes"] = totals["stored_bytes"]
        results["nonzero_block_bytes"] = nonzero_bytes(image, block)

        changed = diskimage.mutate(image, 0.05, block_size=MiB, seed=2)
        results["changed_bytes"] = changed
        timed(f"cat {image} > /dev/null", shell=True)
        results["ingest_incremental_s"] = timed("cp", image, mnt / "us-east-1" / "day2.img")
        status = json.loads(snapfs("status", "--store", store, "--json").stdout)
        totals2 = status["regions"][0]["totals"]
        results["incremental_added_unique_bytes"] = totals2["unique_bytes"] - totals["unique_bytes"]
        results["daemon_peak_rss_bytes"] = peak_rss(pid)
        snapfs("umount", mnt)
    finally:
        if mounts.mount_fstype(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        shutil.rmtree(work, ignore_errors=True)

    report(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nresults written to {args.json}")
    return 0


def report(r: dict) -> None:
    size = r["image_bytes"]

    def rate(seconds: float) -> float:
        return size / seconds / MB

    ref = rate(r["ref_cp_local_s"])
    rows = [
        ("cp to local disk (reference)", f"{rate(r['ref_cp_local_s']):8.0f} MB/s", "1.00x",
         "page cache; sync afterwards took %.2f s" % r["ref_cp_local_sync_s"]),
        ("cp into a region (ingest)", f"{rate(r['ingest_s']):8.0f} MB/s",
         f"{rate(r['ingest_s']) / ref:.2f}x", "target >= 300 MB/s, durable at close"),
        ("cat snapshot > /dev/null", f"{rate(r['read_s']):8.0f} MB/s",
         f"{rate(r['read_s']) / ref:.2f}x", "target >= 600 MB/s"),
        ("cat snapshot again", f"{rate(r['read_again_s']):8.0f} MB/s",
         f"{rate(r['read_again_s']) / ref:.2f}x", ""),
        ("cp of 5%-changed image", f"{rate(r['ingest_incremental_s']):8.0f} MB/s",
         f"{rate(r['ingest_incremental_s']) / ref:.2f}x", ""),
    ]
    print(f"\nimage {size / MiB:.0f} MiB, block size {r['block_size'] // 1024} KiB\n")
    print(f"{'scenario':34} {'throughput':>14} {'vs cp':>7}  note")
    for name, value, ratio, note in rows:
        print(f"{name:34} {value:>14} {ratio:>7}  {note}")
    print()
    print(f"daemon peak RSS            {r['daemon_peak_rss_bytes'] / MiB:8.1f} MiB   "
          "(target < 300 MiB)")
    print(f"non-zero blocks of image   {r['nonzero_block_bytes'] / MiB:8.1f} MiB")
    print(f"unique bytes kept          {r['unique_bytes'] / MiB:8.1f} MiB   "
          f"({r['unique_bytes'] / max(r['nonzero_block_bytes'], 1):.3f}x of non-zero blocks)")
    print(f"stored bytes (compressed)  {r['stored_bytes'] / MiB:8.1f} MiB   "
          f"({r['stored_bytes'] / max(r['unique_bytes'], 1):.3f}x of unique)")
    print(f"changed bytes (5%)         {r['changed_bytes'] / MiB:8.1f} MiB")
    print(f"added by 2nd snapshot      {r['incremental_added_unique_bytes'] / MiB:8.1f} MiB   "
          f"({r['incremental_added_unique_bytes'] / max(r['changed_bytes'], 1):.3f}x of changed)")


if __name__ == "__main__":
    sys.exit(main())
