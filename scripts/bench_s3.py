"""snapfs benchmark, S3 part: copies into a region on an S3 server, against rclone and restic.

One `rclone serve s3` of a temp directory on loopback serves all three:
  - snapfs: day 1 and day 2 (5% of 1 MiB blocks changed) are written into a local region,
    then moved with `mv` into a region on the server: the full copy (day 1) and the
    incremental copy (day 2) are timed until `available`;
  - `rclone copyto` of the day 1 image to the same server, then of the day 2 image over it
    (what a user without snapfs would do to keep a disk image in a bucket);
  - restic with an s3 repository on the same server: `backup` of day 1, then of day 2.
Targets (issue 8): the full copy within 1.5x of rclone's time, the incremental one at least
5x faster than rclone's. Run as `scripts/bench --s3` (with the other scenarios) or alone:
`python scripts/bench_s3.py --size 2G`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snapfs.cli import diskimage  # noqa: E402
from snapfs.fuse import mounts  # noqa: E402

MiB = 1 << 20
ACCESS, SECRET = "snapfs-bench-access", "snapfs-bench-secret-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rclone() -> str:
    return shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")


class Server:
    def __init__(self, work: Path):
        self.data = work / "s3data"
        self.data.mkdir()
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(work / "rclone-serve.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [_rclone(), "serve", "s3", "--auth-key", f"{ACCESS},{SECRET}",
             "--addr", f"127.0.0.1:{self.port}", str(self.data)],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("rclone serve s3 did not start")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.log.close()


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "RESTIC_PASSWORD": "bench",
    }


def _run(*cmd: str | os.PathLike, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def _wait_available(path: Path) -> None:
    while (status := os.getxattr(path, "user.snapfs.status")) != b"available":
        if status == b"failed":
            raise RuntimeError(f"copy of {path} failed")
        time.sleep(0.01)


def _mv(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["mv", str(src), str(dst)], check=True)
    _wait_available(dst)
    return time.perf_counter() - start


def run(size: int, workdir: Path | None = None) -> dict[str, float | int]:
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench-s3.", dir=workdir))
    env = _env()
    snapfs = [sys.executable, "-m", "snapfs"]
    mnt, store = work / "mnt", work / "store"
    mnt.mkdir()
    day1, day2 = work / "day1.img", work / "day2.img"
    r: dict[str, float | int] = {"image_bytes": size}
    server = None
    try:
        print(f"S3: generating a {size / MiB:.0f} MiB image in {work} ...", flush=True)
        diskimage.create(day1, size, seed=1)
        shutil.copy(day1, day2)
        r["changed_bytes"] = diskimage.mutate(day2, 0.05, block_size=MiB, seed=2)
        subprocess.run(f"cat {day1} {day2} > /dev/null", shell=True, check=True)
        server = Server(work)
        _run(*snapfs, "mount", mnt, "--store", store, env=env)
        _run(*snapfs, "region", "create", "eu-west-1", "--backend", "s3://snapfs-bench/eu",
             "--endpoint", server.endpoint, "--store", store, env=env)  # fmt: skip
        local, remote = mnt / "cn-hangzhou", mnt / "eu-west-1"
        local.mkdir()
        print("S3: snapfs mv copies ...", flush=True)
        subprocess.run(["cp", str(day1), str(local / "day1.img")], check=True)
        subprocess.run(["cp", str(day2), str(local / "day2.img")], check=True)
        r["snapfs_mv_full_s"] = _mv(local / "day1.img", remote / "day1.img")
        r["snapfs_mv_full_transferred"] = int(os.getxattr(remote / "day1.img",
                                                          "user.snapfs.transferred_bytes"))
        r["snapfs_mv_incremental_s"] = _mv(local / "day2.img", remote / "day2.img")
        r["snapfs_mv_incremental_transferred"] = int(
            os.getxattr(remote / "day2.img", "user.snapfs.transferred_bytes")
        )
        _run(*snapfs, "umount", mnt, env=env)

        print("S3: rclone copy ...", flush=True)
        remote_spec = (f":s3,provider=Other,endpoint='{server.endpoint}',"
                       f"access_key_id={ACCESS},secret_access_key={SECRET}:rclone-ref")
        _run(_rclone(), "mkdir", remote_spec, env=env)
        r["rclone_copy_full_s"] = _run(_rclone(), "copyto", day1, f"{remote_spec}/disk.img",
                                       env=env)
        r["rclone_copy_incremental_s"] = _run(_rclone(), "copyto", day2,
                                              f"{remote_spec}/disk.img", env=env)
        if shutil.which("restic"):
            print("S3: restic backup ...", flush=True)
            repo = f"s3:{server.endpoint}/restic-ref"
            _run("restic", "-q", "-r", repo, "init", env=env)
            r["restic_backup_full_s"] = _run("restic", "-q", "-r", repo, "backup", day1, env=env)
            r["restic_backup_incremental_s"] = _run("restic", "-q", "-r", repo, "backup", day2,
                                                    env=env)
    finally:
        if mounts.mount_fstype(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return r


def report(r: dict) -> None:
    size, changed = r["image_bytes"], r["changed_bytes"]
    print(f"\nS3 region on rclone serve s3 (loopback), {size / MiB:.0f} MiB image, "
          f"{changed / MiB:.0f} MiB changed")
    rows = [
        ("snapfs mv copy, full", r["snapfs_mv_full_s"]),
        ("snapfs mv copy, incremental", r["snapfs_mv_incremental_s"]),
        ("rclone copy, full", r["rclone_copy_full_s"]),
        ("rclone copy, day 2 over day 1", r["rclone_copy_incremental_s"]),
    ]
    if "restic_backup_full_s" in r:
        rows += [("restic backup to s3, full", r["restic_backup_full_s"]),
                 ("restic backup to s3, day 2", r["restic_backup_incremental_s"])]
    for name, seconds in rows:
        print(f"  {name:32} {seconds:8.2f} s  {size / seconds / 1e6:8.0f} MB/s of image")
    full = r["snapfs_mv_full_s"] / r["rclone_copy_full_s"]
    incr = r["rclone_copy_incremental_s"] / r["snapfs_mv_incremental_s"]
    print(f"  full copy / rclone copy          {full:6.2f}x the time  (target <= 1.5x)")
    print(f"  incremental copy vs rclone       {incr:6.2f}x faster    (target >= 5x)")
    if "restic_backup_full_s" in r:
        print(f"  full copy vs restic backup       "
              f"{r['restic_backup_full_s'] / r['snapfs_mv_full_s']:6.2f}x faster")
        print(f"  incremental copy vs restic       "
              f"{r['restic_backup_incremental_s'] / r['snapfs_mv_incremental_s']:6.2f}x faster")
    print(f"  transferred / changed bytes      "
          f"{r['snapfs_mv_incremental_transferred'] / changed:6.3f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2G", help="image size (default 2G)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "bench-s3.json")
    args = parser.parse_args()
    results = run(diskimage.parse_size(args.size), args.workdir)
    report(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
