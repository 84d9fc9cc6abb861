#!/usr/bin/env python3
"""What FUSE itself allows on this machine, beside snapfs and a local file, in one run.

A target stated against the page cache or against `cp` to local disk can lie above what any
pyfuse3 filesystem reaches here. This script mounts a filesystem that does no work (the
ceiling) next to a real snapfs mount and runs the same commands on both and on a local file:

  - ingest: `cp IMAGE` into the mount. The ceiling's files discard what is written to them
    (direct_io, as snapfs opens a snapshot being written); snapfs is timed until the snapshot
    is available; the reference is `cp` to a local file plus `sync`;
  - cold sequential read: `dd bs=1M` just after the file's pages were dropped. The ceiling
    answers each request with a slice of the image mapped from the page cache (keep_cache,
    the mount's read-ahead raised as snapfs raises it), so a request costs one copy;
  - fio random 4 KiB reads, cold, at QD1 (psync) and QD16 (libaio, buffered).

The ceiling runs in this same script (`--serve MOUNTPOINT IMAGE`) as its own process, with
the venv's pyfuse3 and trio, as the snapfs daemon does. Memory is held in use as in
scripts/bench_reads.py, because page-cache fills of fresh memory are slow on this VM.

    scripts/bench_ceiling.py [--size 1G] [--rounds 2] [--fio-seconds 5] [--no-hold-memory]
                             [--json FILE]
"""

from __future__ import annotations

import argparse
import errno
import json
import mmap
import os
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
if (VENV / "bin" / "python").exists() and Path(sys.prefix).resolve() != VENV.resolve():
    os.execv(VENV / "bin" / "python", [str(VENV / "bin" / "python"), *sys.argv])
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

MB = 1_000_000
MiB = 1 << 20
GiB = 1 << 30
IMAGE_NAME = "image.img"


# --- the filesystem that does no work ---------------------------------------------------------


def serve(mountpoint: Path, image: Path) -> None:
    """Mount the ceiling filesystem on `mountpoint` until SIGTERM."""
    import signal

    import pyfuse3
    import trio

    from snapfs.daemon import tune_read_ahead

    fd = os.open(image, os.O_RDONLY)
    size = os.fstat(fd).st_size
    view = memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))
    image_inode, first_sink = pyfuse3.ROOT_INODE + 1, pyfuse3.ROOT_INODE + 2

    class Ceiling(pyfuse3.Operations):
        """One read-only file (the image) and any number of write-only sinks."""

        def __init__(self) -> None:
            super().__init__()
            self.names: dict[bytes, int] = {IMAGE_NAME.encode(): image_inode}
            self.sizes: dict[int, int] = {image_inode: size}
            self.next_inode = first_sink

        def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = inode
            a.st_nlink = 1 if inode != pyfuse3.ROOT_INODE else 2
            a.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (
                stat.S_IFREG | 0o644)
            a.st_size = self.sizes.get(inode, 0)
            a.st_blksize = 512 * 1024
            a.st_blocks = (a.st_size + 511) // 512
            a.attr_timeout = a.entry_timeout = 300
            return a

        async def lookup(self, parent, name, ctx=None):
            if name not in self.names:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(self.names[name])

        async def getattr(self, inode, ctx=None):
            return self._attr(inode)

        async def setattr(self, inode, attr, fields, fh, ctx):
            if fields.update_size and inode != image_inode:
                self.sizes[inode] = attr.st_size
            return self._attr(inode)

        async def create(self, parent, name, mode, flags, ctx):
            inode = self.next_inode
            self.next_inode += 1
            self.names[name], self.sizes[inode] = inode, 0
            return pyfuse3.FileInfo(fh=inode, direct_io=True), self._attr(inode)

        async def open(self, inode, flags, ctx):
            if inode == image_inode:
                return pyfuse3.FileInfo(fh=inode, keep_cache=True)
            return pyfuse3.FileInfo(fh=inode, direct_io=True)

        async def read(self, fh, off, length):
            return view[off : off + length] if fh == image_inode else b""

        async def write(self, fh, off, buf):
            self.sizes[fh] = max(self.sizes[fh], off + len(buf))
            return len(buf)

        async def getxattr(self, inode, name, ctx):
            raise pyfuse3.FUSEError(errno.ENODATA)

        async def opendir(self, inode, ctx):
            return inode

        async def readdir(self, fh, start_id, token):
            entries = sorted(self.names.items())
            for index, (name, inode) in enumerate(entries[start_id:], start_id + 1):
                if not pyfuse3.readdir_reply(token, name, self._attr(inode), index):
                    break

        async def statfs(self, ctx):
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = 4096
            s.f_blocks = s.f_bfree = s.f_bavail = 1 << 30
            s.f_namemax = 255
            return s

    async def main() -> None:
        operations = Ceiling()
        options = set(pyfuse3.default_options) | {"fsname=ceiling", "subtype=ceiling"}
        operations.init = lambda: tune_read_ahead(mountpoint)  # after INIT, as snapfs does
        pyfuse3.init(operations, str(mountpoint), options)
        try:
            async with trio.open_nursery() as nursery:
                async def stop() -> None:
                    with trio.open_signal_receiver(signal.SIGTERM) as signals:
                        async for _ in signals:
                            pyfuse3.terminate()
                            return

                nursery.start_soon(stop)
                Path(f"{mountpoint}.ready").touch()
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)

    trio.run(main)


# --- the measurements -------------------------------------------------------------------------


def run(*cmd: str | os.PathLike) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True)


def timed(*cmd: str | os.PathLike) -> float:
    start = time.perf_counter()
    run(*cmd)
    return time.perf_counter() - start


def mount_ceiling(mnt: Path, image: Path) -> subprocess.Popen:
    ready = Path(f"{mnt}.ready")
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(mnt), str(image)])
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the ceiling filesystem did not mount")
        time.sleep(0.05)
    return proc


def unmount_ceiling(proc: subprocess.Popen, mnt: Path) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        proc.kill()


def reads(path: Path, size: int, seconds: float, qd16: str | None) -> dict[str, float]:
    from bench_reads import dd_mb_s, drop_and_check, fio

    figures: dict[str, float] = {}
    drop_and_check(path)
    figures["cold_read_mb_s"] = dd_mb_s(path, size)
    for depth, engine in [(1, "psync")] + ([(16, qd16)] if qd16 else []):
        drop_and_check(path)
        result = fio(path, seconds, engine, depth)
        figures[f"cold_qd{depth}_iops"] = result["iops"]
        figures[f"cold_qd{depth}_p50_us"] = result["p50_us"]
    return figures


def one_round(work: Path, image: Path, size: int, args: argparse.Namespace,
              qd16: str | None) -> dict[str, dict[str, float]]:
    from bench import settle, wait_available

    out: dict[str, dict[str, float]] = {}
    local = work / "local.img"
    settle()
    out["local file"] = {"ingest_s": timed("cp", image, local) + timed("sync")}
    out["local file"] |= reads(local, size, args.fio_seconds, qd16)
    local.unlink()

    mnt = work / "ceiling"
    mnt.mkdir(exist_ok=True)
    settle()
    proc = mount_ceiling(mnt, image)
    try:
        out["no-op pyfuse3"] = {"ingest_s": timed("cp", image, mnt / "sink.img")}
        out["no-op pyfuse3"] |= reads(mnt / IMAGE_NAME, size, args.fio_seconds, qd16)
    finally:
        unmount_ceiling(proc, mnt)

    mnt, store = work / "snapfs", work / "store"
    mnt.mkdir(exist_ok=True)
    settle()
    run(sys.executable, "-m", "snapfs", "mount", mnt, "--store", store)
    try:
        region = mnt / "us-east-1"
        region.mkdir()
        start = time.perf_counter()
        run("cp", image, region / "disk.img")
        wait_available(region / "disk.img")
        out["snapfs"] = {"ingest_s": time.perf_counter() - start}
        out["snapfs"] |= reads(region / "disk.img", size, args.fio_seconds, qd16)
    finally:
        run(sys.executable, "-m", "snapfs", "umount", mnt)
        subprocess.run(["rm", "-rf", str(store)])
    return out


ROWS = [("ingest (cp)", "ingest_s", "s", 2), ("cold sequential read", "cold_read_mb_s", "MB/s", 0),
        ("cold random 4 KiB QD1", "cold_qd1_iops", "IOPS", 0),
        ("  QD1 p50 latency", "cold_qd1_p50_us", "µs", 1),
        ("cold random 4 KiB QD16", "cold_qd16_iops", "IOPS", 0),
        ("  QD16 p50 latency", "cold_qd16_p50_us", "µs", 1)]


def report(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    kinds = ["local file", "no-op pyfuse3", "snapfs"]
    medians = {k: {key: statistics.median(r[k][key] for r in rounds if key in r[k])
                   for _, key, _, _ in ROWS if any(key in r[k] for r in rounds)} for k in kinds}
    print(f"\n{'':26}" + "".join(f"{k:>16}" for k in kinds) + f"{'snapfs/no-op':>14}")
    for label, key, unit, digits in ROWS:
        if key not in medians["snapfs"]:
            continue
        cells = "".join(f"{medians[k][key]:>11.{digits}f} {unit:<4}" for k in kinds)
        share = medians["snapfs"][key] / medians["no-op pyfuse3"][key]
        print(f"{label:26}{cells}{share:>13.2f}x")
    ingest = {k: medians[k]["ingest_s"] for k in kinds}
    print(f"\ningest against cp to local disk: no-op pyfuse3 "
          f"{ingest['local file'] / ingest['no-op pyfuse3']:.2f}x, snapfs "
          f"{ingest['local file'] / ingest['snapfs']:.2f}x (times: medians of {len(rounds)} "
          "rounds; for ingest, higher is better)")
    return medians


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), Path(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fio-seconds", type=float, default=5)
    parser.add_argument("--zeros", type=float, default=0.6,
                        help="share of zero extents in the image (0: dense)")
    parser.add_argument("--no-hold-memory", action="store_true")
    parser.add_argument("--hold-max", default="16G")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "ceiling.json")
    args = parser.parse_args()

    from bench_reads import ensure_fio, hold_memory, qd16_engine, release_memory

    from snapfs.cli import diskimage

    ensure_fio()
    size = diskimage.parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="snapfs-ceiling.", dir="/var/tmp"))
    holder = None
    try:
        image = work / "day1.img"
        print(f"generating a {size / MiB:.0f} MiB disk-like image in {work} ...", flush=True)
        diskimage.create(image, size, seed=1, zeros=args.zeros)
        run("dd", f"if={image}", "of=/dev/null", "bs=1M", "status=none")  # from the page cache
        qd16 = qd16_engine(work, "libaio")
        if not args.no_hold_memory:
            holder, held = hold_memory(size, diskimage.parse_size(args.hold_max))
            print(f"holding {held / GiB:.1f} GiB of memory in use", flush=True)
        rounds = []
        for number in range(args.rounds):
            print(f"round {number + 1} of {args.rounds}", flush=True)
            rounds.append(one_round(work, image, size, args, qd16))
    finally:
        if holder is not None:
            release_memory(holder)
        subprocess.run(["rm", "-rf", str(work)])
    medians = report(rounds)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rounds": rounds, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
