"""snapfs benchmark: one run, side by side with the references, printed as ratios.

Scenarios: a generated disk-like image (default 2 GiB, 60% zero extents, the rest random and
text-like; "day 1") and the same image with 5% of its 1 MiB blocks changed ("day 2") are
  - copied with `cp` to local disk (the physical reference) and into a region (ingest),
  - read back with `cat` to /dev/null (sequential read),
  - copied to other regions with `cp` and `mv`, full (day 1) and incremental (day 2),
  - backed up and copied between two repositories with restic (if installed),
and the daemon's peak RSS, stored against unique bytes and transferred against changed bytes
are reported.

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


def wait_available(path: Path, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while os.getxattr(path, "user.snapfs.status") != b"available":
        if os.getxattr(path, "user.snapfs.status") == b"failed" or time.monotonic() > deadline:
            raise RuntimeError(f"copy of {path} did not complete")
        time.sleep(0.01)


def transferred(path: Path) -> int:
    return int(os.getxattr(path, "user.snapfs.transferred_bytes"))


def du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], check=True, capture_output=True,
                              text=True).stdout.split()[0])


def restic_runs(work: Path, day1: Path, day2: Path, results: dict) -> None:
    """The same workload with restic: backup, then `restic copy` to a second repository
    initialised with --copy-chunker-params, full and after the 5% change."""
    if shutil.which("restic") is None:
        print("restic is not installed: skipping the restic comparison")
        return
    env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_FROM_PASSWORD="bench")
    repo1, repo2 = work / "restic1", work / "restic2"

    def restic(*args: str | os.PathLike) -> float:
        start = time.perf_counter()
        subprocess.run(["restic", "-q", *map(str, args)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - start

    restic("-r", repo1, "init")
    results["restic_backup_s"] = restic("-r", repo1, "backup", day1)
    restic("-r", repo2, "init", "--from-repo", repo1, "--copy-chunker-params")
    results["restic_copy_full_s"] = restic("-r", repo2, "copy", "--from-repo", repo1)
    before = du_bytes(repo2)
    results["restic_backup_incremental_s"] = restic("-r", repo1, "backup", day2)
    results["restic_copy_incremental_s"] = restic("-r", repo2, "copy", "--from-repo", repo1)
    results["restic_copy_incremental_added_bytes"] = du_bytes(repo2) - before


def encrypted_runs(mnt: Path, store: Path, day1: Path, day2: Path, results: dict) -> None:
    """The same ingest and copies between two encrypting regions (different keys, so every
    transferred block is re-encrypted)."""
    src, dst = mnt / "enc-src", mnt / "enc-dst"
    for region in (src, dst):
        region.mkdir()
        key = snapfs("key", "create", "--region", region.name, "--store", store).stdout.split()[-1]
        os.setxattr(region, "user.snapfs.default_kms_key_id", key.encode())
        os.setxattr(region, "user.snapfs.encrypt_by_default", b"true")
    results["enc_ingest_s"] = timed("cp", day1, src / "day1.img")
    results["enc_read_s"] = timed(f"cat {src / 'day1.img'} > /dev/null", shell=True)
    start = time.perf_counter()
    subprocess.run(["mv", str(src / "day1.img"), str(dst)], check=True)
    wait_available(dst / "day1.img")
    results["enc_mv_copy_full_s"] = time.perf_counter() - start
    results["enc_ingest_incremental_s"] = timed("cp", day2, src / "day2.img")
    start = time.perf_counter()
    subprocess.run(["mv", str(src / "day2.img"), str(dst)], check=True)
    wait_available(dst / "day2.img")
    results["enc_mv_copy_incremental_s"] = time.perf_counter() - start
    results["enc_mv_copy_incremental_transferred"] = transferred(dst / "day2.img")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2G", help="image size (default 2G)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="block size of the benchmark store (default: snapfs default)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where images and the store go (default: a temp dir in /tmp)")
    parser.add_argument("--no-restic", action="store_true", help="skip the restic runs")
    parser.add_argument("--s3", action="store_true", help="also copies into an S3 region "
                        "against rclone and restic (scripts/bench_s3.py)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "bench.json",
                        help="where to write the machine-readable results")
    args = parser.parse_args()

    size = diskimage.parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench.", dir=args.workdir))
    mnt, store = work / "mnt", work / "store"
    mnt.mkdir()
    day1, day2, local = work / "day1.img", work / "day2.img", work / "local-copy.img"
    results: dict[str, float | int | str] = {"image_bytes": size}
    try:
        print(f"generating a {size / MiB:.0f} MiB disk-like image in {work} ...", flush=True)
        diskimage.create(day1, size, seed=1)
        shutil.copy(day1, day2)
        results["changed_bytes"] = diskimage.mutate(day2, 0.05, block_size=MiB, seed=2)
        timed(f"cat {day1} {day2} > /dev/null", shell=True)  # every reader starts from cache

        results["ref_cp_local_s"] = timed("cp", day1, local)
        results["ref_cp_local_sync_s"] = timed("sync")
        local.unlink()

        mount_args = ["mount", mnt, "--store", store]
        if args.block_size:
            mount_args += ["--block-size", str(args.block_size)]
        print("snapfs runs ...", flush=True)
        snapfs(*mount_args)
        pid = mounts.lookup(mnt).pid
        a, b, c = mnt / "cn-hangzhou", mnt / "us-east-1", mnt / "eu-west-1"
        for region in (a, b, c):
            region.mkdir()
        results["ingest_s"] = timed("cp", day1, a / "day1.img")
        results["read_s"] = timed(f"cat {a / 'day1.img'} > /dev/null", shell=True)
        results["read_again_s"] = timed(f"cat {a / 'day1.img'} > /dev/null", shell=True)
        status = json.loads(snapfs("status", "--store", store, "--json").stdout)
        totals = status["regions"][0]["totals"]
        block = status["block_size"]
        results["block_size"] = block
        results["unique_bytes"] = totals["unique_bytes"]
        results["stored_bytes"] = totals["stored_bytes"]
        results["nonzero_block_bytes"] = nonzero_bytes(day1, block)

        results["cp_copy_full_s"] = timed("cp", a / "day1.img", c)
        start = time.perf_counter()
        subprocess.run(["mv", str(a / "day1.img"), str(b)], check=True)
        results["mv_returned_s"] = time.perf_counter() - start
        wait_available(b / "day1.img")
        results["mv_copy_full_s"] = time.perf_counter() - start
        results["mv_copy_full_transferred"] = transferred(b / "day1.img")

        results["ingest_incremental_s"] = timed("cp", day2, a / "day2.img")
        results["cp_copy_incremental_s"] = timed("cp", a / "day2.img", c)
        results["cp_copy_incremental_transferred"] = transferred(c / "day2.img")
        start = time.perf_counter()
        subprocess.run(["mv", str(a / "day2.img"), str(b)], check=True)
        wait_available(b / "day2.img")
        results["mv_copy_incremental_s"] = time.perf_counter() - start
        results["mv_copy_incremental_transferred"] = transferred(b / "day2.img")
        encrypted_runs(mnt, store, day1, day2, results)
        results["daemon_peak_rss_bytes"] = peak_rss(pid)
        snapfs("umount", mnt)
        if not args.no_restic:
            print("restic runs ...", flush=True)
            restic_runs(work, day1, day2, results)
    finally:
        if mounts.mount_fstype(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        shutil.rmtree(work, ignore_errors=True)

    report(results)
    if args.s3:  # the S3 scenario lives in its own module (scripts/bench_s3.py)
        import bench_s3
        bench_s3.report(bench_s3.run(size, args.workdir))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nresults written to {args.json}")
    return 0


def report(r: dict) -> None:
    size = r["image_bytes"]

    def rate(seconds: float) -> float:
        return size / seconds / MB

    ref = rate(r["ref_cp_local_s"])
    print(f"\nimage {size / MiB:.0f} MiB ({r['changed_bytes'] / MiB:.0f} MiB changed for day 2), "
          f"block size {r['block_size'] // 1024} KiB\n")
    print(f"{'scenario':36} {'seconds':>8} {'MB/s':>7} {'vs cp':>6}  note")

    def row(name: str, seconds: float, note: str = "") -> None:
        print(f"{name:36} {seconds:8.2f} {rate(seconds):7.0f} {rate(seconds) / ref:5.2f}x  {note}")

    row("cp to local disk (reference)", r["ref_cp_local_s"],
        f"page cache; sync afterwards {r['ref_cp_local_sync_s']:.2f} s")
    row("cp into a region (ingest)", r["ingest_s"], "target >= 300 MB/s; durable at close")
    row("cat snapshot > /dev/null", r["read_s"], "target >= 600 MB/s")
    row("cat snapshot again", r["read_again_s"])
    row("cp of day 2 into the region", r["ingest_incremental_s"])
    row("cp copy to another region, full", r["cp_copy_full_s"])
    row("mv copy to another region, full", r["mv_copy_full_s"],
        f"mv returned after {r['mv_returned_s']:.3f} s")
    row("cp copy of day 2, incremental", r["cp_copy_incremental_s"])
    row("mv copy of day 2, incremental", r["mv_copy_incremental_s"])
    if "restic_backup_s" in r:
        row("restic backup", r["restic_backup_s"])
        row("restic copy, full", r["restic_copy_full_s"])
        row("restic backup of day 2", r["restic_backup_incremental_s"])
        row("restic copy, incremental", r["restic_copy_incremental_s"])
        print()
        print(f"full mv copy vs restic copy        {r['restic_copy_full_s'] / r['mv_copy_full_s']:6.2f}x "
              "faster  (target >= 3x)")
        print(f"incremental mv copy vs restic      "
              f"{r['restic_copy_incremental_s'] / r['mv_copy_incremental_s']:6.2f}x faster  "
              "(target >= 2x)")
        print(f"incremental cp copy vs restic      "
              f"{r['restic_copy_incremental_s'] / r['cp_copy_incremental_s']:6.2f}x faster")
    if "enc_ingest_s" in r:
        print("\nencrypted (AES-256-GCM, keyed ids; copies re-encrypt under another key):")
        for name, key, plain_key in (
            ("encrypted ingest", "enc_ingest_s", "ingest_s"),
            ("encrypted cat", "enc_read_s", "read_s"),
            ("encrypted mv copy, full", "enc_mv_copy_full_s", "mv_copy_full_s"),
            ("encrypted mv copy, incremental", "enc_mv_copy_incremental_s",
             "mv_copy_incremental_s"),
        ):
            row(name, r[key], f"{r[plain_key] / r[key]:.2f}x of the plain speed "
                "(target >= 0.75)")
    changed = max(r["changed_bytes"], 1)
    print()
    print(f"daemon peak RSS                  {r['daemon_peak_rss_bytes'] / MiB:8.1f} MiB  "
          "(target < 300 MiB)")
    print(f"non-zero blocks of the image     {r['nonzero_block_bytes'] / MiB:8.1f} MiB")
    print(f"unique bytes kept                {r['unique_bytes'] / MiB:8.1f} MiB  "
          f"({r['unique_bytes'] / max(r['nonzero_block_bytes'], 1):.3f}x of non-zero blocks)")
    print(f"stored bytes (compressed)        {r['stored_bytes'] / MiB:8.1f} MiB  "
          f"({r['stored_bytes'] / max(r['unique_bytes'], 1):.3f}x of unique)")
    print(f"full mv copy transferred         {r['mv_copy_full_transferred'] / MiB:8.1f} MiB")
    print("transferred / changed bytes (target <= 1.1):")
    print(f"  incremental mv copy            {r['mv_copy_incremental_transferred'] / changed:8.3f}x")
    print(f"  incremental cp copy            {r['cp_copy_incremental_transferred'] / changed:8.3f}x")
    if "enc_mv_copy_incremental_transferred" in r:
        print(f"  encrypted incremental mv copy  "
              f"{r['enc_mv_copy_incremental_transferred'] / changed:8.3f}x")
    if "restic_copy_incremental_added_bytes" in r:
        print(f"  restic incremental copy        "
              f"{r['restic_copy_incremental_added_bytes'] / changed:8.3f}x (repository growth)")


if __name__ == "__main__":
    sys.exit(main())
