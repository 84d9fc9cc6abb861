"""snapfs benchmark: one run, side by side with the references, printed as ratios.

Scenarios, on a generated disk-like image (default 2 GiB, 60% zero extents, the rest random
and text-like; "day 1") and the same image with 5% of its 1 MiB blocks changed ("day 2"):
  - references: `cp` to local disk and `cat` of the local file (the physical ceiling);
  - snapfs: ingest (`cp` into a region), sequential read (`cat`), random 4 KiB reads (fio,
    else a Python reader), full and incremental copies to other regions with `mv` and `cp`,
    the same ingest, read and copies between two encrypting regions (different keys), a 1 TiB
    sparse image (create, read, copy), and how fast `ls` and `getfattr` answer on the mount
    while a large copy runs;
  - restic (backup, copy to a second repository, restore, read through `restic mount`) and
    borg (create, extract), from Debian's packages, on the same images.
Figures: seconds, MB/s of the image's logical size, ratios to the references, the daemon's
peak RSS, stored / unique bytes, transferred / changed bytes. Absolute times drift on a shared
2-core machine; the ratios within one run hold.

    scripts/bench [--size 2G] [--json FILE] [--chart FILE.png] [--no-restic] [--no-borg]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from snapfs.cli import diskimage  # noqa: E402
from snapfs.fuse import mounts  # noqa: E402

MB = 1_000_000
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
SPARSE_SIZE = TiB
SPARSE_READ_SAMPLE = 16 * GiB  # read this much of the 1 TiB image and extrapolate


@dataclass
class Row:
    group: str  # "reference", "snapfs", "snapfs encrypted", "restic", "borg", ...
    name: str
    seconds: float
    nbytes: int  # logical bytes the scenario moves (for MB/s)
    note: str = ""

    @property
    def mb_s(self) -> float:
        return self.nbytes / self.seconds / MB if self.seconds > 0 else float("inf")


@dataclass
class Bench:
    size: int
    rows: list[Row] = field(default_factory=list)
    figures: dict[str, float | int | str] = field(default_factory=dict)

    def add(self, group: str, name: str, seconds: float, nbytes: int | None = None,
            note: str = "") -> float:
        self.rows.append(Row(group, name, seconds, self.size if nbytes is None else nbytes, note))
        print(f"  {group:17} {name:42} {seconds:8.2f} s", flush=True)
        return seconds

    def seconds(self, name: str) -> float | None:
        return next((r.seconds for r in self.rows if r.name == name), None)


# --- helpers ----------------------------------------------------------------------------------


def timed(*cmd: str | os.PathLike, shell: bool = False, env: dict | None = None,
          cwd: Path | None = None) -> float:
    start = time.perf_counter()
    if shell:
        subprocess.run(str(cmd[0]), shell=True, check=True, env=env, cwd=cwd)
    else:
        subprocess.run([str(c) for c in cmd], check=True, env=env, cwd=cwd,
                       stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def ingest(image: Path, dst: Path) -> float:
    """`cp` into a region, until the snapshot is sealed: reading its status seals it at once
    (a script's `getfattr -n user.snapfs.status`), so the reads after it go through the page
    cache as a sealed snapshot's do, instead of direct_io during the settle period."""
    start = time.perf_counter()
    subprocess.run(["cp", str(image), str(dst)], check=True)
    wait_available(dst)
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
    while (status := os.getxattr(path, "user.snapfs.status")) != b"available":
        if status == b"failed" or time.monotonic() > deadline:
            raise RuntimeError(f"copy of {path} did not complete")
        time.sleep(0.01)


def transferred(path: Path) -> int:
    return int(os.getxattr(path, "user.snapfs.transferred_bytes"))


def du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], check=True, capture_output=True,
                              text=True).stdout.split()[0])


def mv_copy(source: Path, region: Path) -> tuple[float, float]:
    """(seconds until `mv` returned, seconds until the copy was available)."""
    start = time.perf_counter()
    subprocess.run(["mv", str(source), str(region)], check=True)
    returned = time.perf_counter() - start
    wait_available(region / source.name)
    return returned, time.perf_counter() - start


class LatencyProbe:
    """Times `ls REGION` and `getfattr -n user.snapfs.progress FILE` (as system calls, in a
    thread) every 20 ms while a copy runs: the FUSE loop must keep answering."""

    def __init__(self, region: Path, file: Path):
        self.region, self.file = region, file
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            os.listdir(self.region)
            with contextlib.suppress(FileNotFoundError):  # not created yet
                os.getxattr(self.file, "user.snapfs.progress")
            self.samples.append(time.perf_counter() - start)
            self._stop.wait(0.02)

    def __enter__(self) -> LatencyProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        ms = sorted(s * 1000 for s in self.samples) or [0.0]
        return {"samples": len(ms), "median_ms": statistics.median(ms),
                "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))], "max_ms": ms[-1]}


def random_reads(path: Path, seconds: float = 5.0) -> dict[str, float]:
    """Random 4 KiB reads for `seconds`: fio if installed (psync, one job), else Python."""
    if shutil.which("fio"):
        out = subprocess.run(
            ["fio", "--name=rand4k", f"--filename={path}", "--rw=randread", "--bs=4k",
             "--ioengine=psync", "--readonly", "--time_based", f"--runtime={seconds}",
             "--output-format=json"],
            check=True, capture_output=True, text=True).stdout
        job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
        return {"tool": "fio", "iops": job["iops"], "mb_s": job["bw_bytes"] / MB,
                "p99_us": job["clat_ns"]["percentile"].get("99.000000", 0) / 1000}
    size = path.stat().st_size
    rng = random.Random(3)
    count, deadline = 0, time.monotonic() + seconds
    fd = os.open(path, os.O_RDONLY)
    try:
        while time.monotonic() < deadline:
            os.pread(fd, 4096, rng.randrange(0, size // 4096) * 4096)
            count += 1
    finally:
        os.close(fd)
    return {"tool": "python", "iops": count / seconds, "mb_s": count * 4096 / seconds / MB}


# --- scenarios --------------------------------------------------------------------------------


def settle() -> None:
    """Each tool starts from the same state: dirty pages written back, and a moment for the
    disk (ext4 with `discard` trims freed blocks in the background)."""
    subprocess.run(["sync"], check=True)
    time.sleep(2)


def reference_runs(b: Bench, work: Path, day1: Path) -> None:
    local = work / "local-copy.img"  # kept to the end: deleting 2 GiB slows the next tool
    b.add("reference", "cp to local disk", timed("cp", day1, local), note="page cache")
    b.figures["ref_sync_s"] = timed("sync")
    b.add("reference", "cat local image", timed(f"cat {day1} > /dev/null", shell=True),
          note="page cache")
    b.figures["ref_sha256"] = sha256_of(day1)
    ceiling_runs(b, work, day1)
    b.figures["ref_random_4k"] = random_reads(day1)
    sparse = work / "local-sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(SPARSE_SIZE)
    b.figures["ref_sparse_read_whole_extrapolated_s"] = sparse_read(
        b, sparse, "reference", "local 1 TiB sparse file")
    sparse.unlink()


def ceiling_runs(b: Bench, work: Path, day1: Path) -> None:
    """`cp` into a pyfuse3 filesystem that does no work (scripts/bench_ceiling.py): what
    FUSE itself allows here, for the ingest target that is stated against local disk. (Its
    cold reads need memory held in use to mean anything on this VM: bench_ceiling.py.)"""
    import bench_ceiling

    mnt = work / "ceiling"
    mnt.mkdir()
    settle()
    proc = bench_ceiling.mount_ceiling(mnt, day1)
    try:
        b.add("reference", "cp into a no-op pyfuse3 fs", timed("cp", day1, mnt / "sink.img"),
              note="the FUSE ceiling for ingest")
    finally:
        bench_ceiling.unmount_ceiling(proc, mnt)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sparse_read(b: Bench, path: Path, group: str, what: str) -> float:
    """Read the first SPARSE_READ_SAMPLE bytes of a 1 TiB sparse file; returns the time the
    whole file would take at that rate."""
    read = timed(f"dd if={path} of=/dev/null bs=1M count={SPARSE_READ_SAMPLE // MiB} "
                 "status=none", shell=True)
    whole = read * SPARSE_SIZE / SPARSE_READ_SAMPLE
    b.add(group, f"{what}, first {SPARSE_READ_SAMPLE // GiB} GiB", read, SPARSE_READ_SAMPLE,
          note=f"whole file extrapolated: {whole:.0f} s")
    return whole


def snapfs_plain_runs(b: Bench, mnt: Path, store: Path, day1: Path, day2: Path) -> None:
    a, bb, c = mnt / "cn-hangzhou", mnt / "us-east-1", mnt / "eu-west-1"
    for region in (a, bb, c):
        region.mkdir()
    b.add("snapfs", "ingest (cp into a region)", ingest(day1, a / "day1.img"))
    b.add("snapfs", "sequential read (cat)", timed(f"cat {a / 'day1.img'} > /dev/null", shell=True))
    b.add("snapfs", "sequential read again", timed(f"cat {a / 'day1.img'} > /dev/null", shell=True))
    from bench_reads import mmap_check

    b.figures["mmap_sha256"] = mmap_check(a / "day1.img", str(b.figures["ref_sha256"]))
    b.figures["snapfs_random_4k"] = random_reads(a / "day1.img")
    status = json.loads(snapfs("status", "--store", store, "--json").stdout)
    totals = next(r for r in status["regions"] if r["name"] == a.name)["totals"]
    b.figures.update(block_size=status["block_size"], unique_bytes=totals["unique_bytes"],
                     stored_bytes=totals["stored_bytes"],
                     nonzero_block_bytes=nonzero_bytes(day1, status["block_size"]))

    with LatencyProbe(c, c / "day1.img") as probe:
        b.add("snapfs", "cp copy to another region, full", timed("cp", a / "day1.img", c))
    b.figures["latency_during_cp_copy"] = probe.summary()
    with LatencyProbe(bb, bb / "day1.img") as probe:
        returned, done = mv_copy(a / "day1.img", bb)
    b.figures["latency_during_mv_copy"] = probe.summary()
    b.add("snapfs", "mv copy to another region, full", done,
          note=f"mv returned after {returned * 1000:.0f} ms")
    b.figures["mv_returned_s"] = returned
    b.figures["mv_copy_full_transferred"] = transferred(bb / "day1.img")

    b.add("snapfs", "ingest of day 2", ingest(day2, a / "day2.img"))
    b.add("snapfs", "cp copy of day 2, incremental", timed("cp", a / "day2.img", c))
    b.figures["cp_copy_incremental_transferred"] = transferred(c / "day2.img")
    _, done = mv_copy(a / "day2.img", bb)
    b.add("snapfs", "mv copy of day 2, incremental", done)
    b.figures["mv_copy_incremental_transferred"] = transferred(bb / "day2.img")


def snapfs_encrypted_runs(b: Bench, mnt: Path, store: Path, day1: Path, day2: Path) -> None:
    """The same ingest and copies between two encrypting regions (different keys, so every
    transferred block is re-encrypted)."""
    src, dst = mnt / "enc-src", mnt / "enc-dst"
    for region in (src, dst):
        region.mkdir()
        key = snapfs("key", "create", "--region", region.name, "--store", store).stdout.split()[-1]
        os.setxattr(region, "user.snapfs.default_kms_key_id", key.encode())
        os.setxattr(region, "user.snapfs.encrypt_by_default", b"true")
    g = "snapfs encrypted"
    b.add(g, "ingest (cp into a region)", ingest(day1, src / "day1.img"))
    b.add(g, "sequential read (cat)", timed(f"cat {src / 'day1.img'} > /dev/null", shell=True))
    b.add(g, "mv copy to another region, full", mv_copy(src / "day1.img", dst)[1])
    b.add(g, "ingest of day 2", ingest(day2, src / "day2.img"))
    b.add(g, "mv copy of day 2, incremental", mv_copy(src / "day2.img", dst)[1])
    b.figures["enc_mv_copy_incremental_transferred"] = transferred(dst / "day2.img")


def sparse_runs(b: Bench, mnt: Path) -> None:
    """A 1 TiB image that is mostly holes: 64 MiB of data in 64 scattered 1 MiB pieces."""
    src, dst = mnt / "sparse-a", mnt / "sparse-b"
    src.mkdir()
    dst.mkdir()
    image = src / "huge.img"
    rng = random.Random(9)
    start = time.perf_counter()
    with open(image, "wb") as f:
        f.truncate(SPARSE_SIZE)
        for _ in range(64):
            f.seek(rng.randrange(0, SPARSE_SIZE // MiB) * MiB)
            f.write(rng.randbytes(MiB))
    create = time.perf_counter() - start
    b.add("snapfs 1 TiB sparse", "create (truncate + 64 MiB of writes)", create, SPARSE_SIZE)
    b.figures["sparse_read_whole_extrapolated_s"] = sparse_read(
        b, image, "snapfs 1 TiB sparse", "read")
    b.add("snapfs 1 TiB sparse", "mv copy to another region", mv_copy(image, dst)[1], SPARSE_SIZE)


DENSE_SIZE = GiB


def dense_random_runs(b: Bench, work: Path, fio_seconds: float, hold_max: int) -> None:
    """fio random 4 KiB reads, cold and warm, QD1 (psync) and QD16 (libaio), of a dense
    1 GiB image: a local file, then a snapshot of it on a fresh mount. Memory is held in use
    meanwhile (scripts/bench_reads.py: page-cache fills of fresh memory are slow here)."""
    import bench_reads

    if not shutil.which("fio"):
        print("fio is missing: no dense random reads", flush=True)
        return
    image = work / "dense.img"
    diskimage.create(image, DENSE_SIZE, seed=3, zeros=0.0)
    setup = bench_reads.Setup(image, DENSE_SIZE, "", fio_seconds,
                              bench_reads.qd16_engine(work, "libaio"))
    holder, held = bench_reads.hold_memory(DENSE_SIZE, hold_max)
    try:
        local = work / "dense-local.img"
        shutil.copy(image, local)
        settle()
        b.figures["dense_local"] = bench_reads.random_reads(local, setup)
        local.unlink()
        mnt, store = work / "dense-mnt", work / "dense-store"
        mnt.mkdir()
        snapfs("mount", mnt, "--store", store)
        try:
            (mnt / "dense").mkdir()
            snap = mnt / "dense" / "dense.img"
            timed("cp", image, snap)
            wait_available(snap)
            settle()
            b.figures["dense_snapfs"] = bench_reads.random_reads(snap, setup)
        finally:
            snapfs("umount", mnt)
    finally:
        bench_reads.release_memory(holder)
        image.unlink()
    b.figures["dense_held_memory_bytes"] = held


def restic_runs(b: Bench, work: Path, day1: Path, day2: Path) -> None:
    """restic: backup, `restic copy` to a second repository initialised with
    --copy-chunker-params (full, then after the 5% change), restore, and `restic mount`."""
    env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_FROM_PASSWORD="bench")
    repo1, repo2 = work / "restic1", work / "restic2"

    def restic(*args: str | os.PathLike) -> float:
        return timed("restic", "-q", *args, env=env)

    restic("-r", repo1, "init")
    b.add("restic", "backup", restic("-r", repo1, "backup", day1))
    restic("-r", repo2, "init", "--from-repo", repo1, "--copy-chunker-params")
    b.add("restic", "copy, full", restic("-r", repo2, "copy", "--from-repo", repo1))
    before = du_bytes(repo2)
    b.add("restic", "backup of day 2", restic("-r", repo1, "backup", day2))
    b.add("restic", "copy, incremental", restic("-r", repo2, "copy", "--from-repo", repo1))
    b.figures["restic_copy_incremental_added_bytes"] = du_bytes(repo2) - before
    target = work / "restic-restore"
    b.add("restic", "restore", restic("-r", repo1, "restore", "latest", "--path", day1,
                                      "--target", target))
    shutil.rmtree(target)
    b.add("restic", "read through restic mount (cat)", restic_mount_read(repo1, env, work, day1))


def restic_mount_read(repo: Path, env: dict, work: Path, image: Path) -> float:
    mountpoint = work / "restic-mnt"
    mountpoint.mkdir()
    proc = subprocess.Popen(["restic", "-q", "-r", str(repo), "mount", str(mountpoint)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        relative = str(image).lstrip("/")
        deadline = time.monotonic() + 60
        while not (found := list((mountpoint / "ids").glob(f"*/{relative}"))):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("restic mount did not come up")
            time.sleep(0.2)
        path = found[0]
        return timed(f"cat {path} > /dev/null", shell=True)
    finally:
        proc.terminate()
        proc.wait(30)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def borg_runs(b: Bench, work: Path, day1: Path, day2: Path) -> None:
    """borg with its defaults (repokey encryption, lz4): create day 1, day 2, extract."""
    env = dict(os.environ, BORG_PASSPHRASE="bench", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
               BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")
    repo = work / "borg"
    timed("borg", "init", "-e", "repokey", repo, env=env)
    b.add("borg", "create", timed("borg", "create", f"{repo}::day1", day1, env=env))
    before = du_bytes(repo)
    b.add("borg", "create of day 2", timed("borg", "create", f"{repo}::day2", day2, env=env))
    b.figures["borg_incremental_added_bytes"] = du_bytes(repo) - before
    target = work / "borg-extract"
    target.mkdir()
    b.add("borg", "extract", timed("borg", "extract", f"{repo}::day1", env=env, cwd=target))
    shutil.rmtree(target)


# --- the report -------------------------------------------------------------------------------


def report(b: Bench) -> list[str]:
    """The table and the targets; returns the targets not met."""
    f = b.figures
    ref_cp = b.seconds("cp to local disk")
    print(f"\nimage {b.size / MiB:.0f} MiB ({f['changed_bytes'] / MiB:.0f} MiB changed for day 2),"
          f" block size {f['block_size'] // 1024} KiB; MB/s are of the image's logical size\n")
    print(f"{'group':19} {'scenario':42} {'seconds':>8} {'MB/s':>8} {'vs cp':>6}  note")
    for r in b.rows:
        ratio = ref_cp / r.seconds * r.nbytes / b.size if ref_cp and r.seconds else 0
        print(f"{r.group:19} {r.name:42} {r.seconds:8.2f} {r.mb_s:8.0f} {ratio:5.2f}x  {r.note}")

    def row(name: str, group: str = "snapfs") -> float | None:
        return next((r.seconds for r in b.rows if r.name == name and r.group == group), None)

    changed = max(int(f["changed_bytes"]), 1)
    print()
    for key in ("ref_random_4k", "snapfs_random_4k"):
        rr = f[key]
        print(f"random 4 KiB reads, {key.split('_')[0]:7}  {rr['iops']:9.0f} IOPS  "
              f"{rr['mb_s']:6.1f} MB/s  ({rr['tool']})")
    for key in ("dense_local", "dense_snapfs"):
        if key in f:
            d = f[key]
            print(f"dense 1 GiB, {key.split('_')[1]:7}  fio 4 KiB cold QD1 "
                  f"{d['fio_cold_qd1_iops']:8.0f}, QD16 {d.get('fio_cold_qd16_iops', 0):8.0f};"
                  f" warm QD1 {d['fio_warm_qd1_iops']:8.0f}, QD16 "
                  f"{d.get('fio_warm_qd16_iops', 0):8.0f} IOPS (cold QD1 p50 "
                  f"{d['fio_cold_qd1_p50_us']:.0f} µs; file cached after the cold QD1 run: "
                  f"{d.get('fio_cold_qd1_cached_pct', float('nan')):.0f}%)")
    print(f"mmap(MAP_SHARED) SHA-256 of the snapshot: {f.get('mmap_sha256', 'not run')}")
    for key in ("latency_during_cp_copy", "latency_during_mv_copy"):
        lat = f[key]
        print(f"ls + getfattr {key.removeprefix('latency_'):17} median {lat['median_ms']:5.1f} ms,"
              f" p99 {lat['p99_ms']:5.1f} ms, max {lat['max_ms']:5.1f} ms "
              f"({lat['samples']} samples)")
    print(f"daemon peak RSS                  {f['daemon_peak_rss_bytes'] / MiB:8.1f} MiB")
    print(f"non-zero blocks of the image     {f['nonzero_block_bytes'] / MiB:8.1f} MiB")
    print(f"unique bytes kept                {f['unique_bytes'] / MiB:8.1f} MiB  "
          f"({f['unique_bytes'] / max(f['nonzero_block_bytes'], 1):.3f}x of non-zero blocks)")
    print(f"stored bytes (compressed)        {f['stored_bytes'] / MiB:8.1f} MiB  "
          f"({f['stored_bytes'] / max(f['unique_bytes'], 1):.3f}x of unique)")
    print("transferred / changed bytes:")
    for label, key in (("incremental mv copy", "mv_copy_incremental_transferred"),
                       ("incremental cp copy", "cp_copy_incremental_transferred"),
                       ("encrypted incremental mv copy", "enc_mv_copy_incremental_transferred"),
                       ("restic incremental copy (repo growth)",
                        "restic_copy_incremental_added_bytes"),
                       ("borg create of day 2 (repo growth)", "borg_incremental_added_bytes")):
        if key in f:
            print(f"  {label:38} {int(f[key]) / changed:7.3f}x")

    targets: list[tuple[str, bool | None, str]] = []

    def target(name: str, ok: bool | None, detail: str) -> None:
        targets.append((name, ok, detail))

    ingest, read = row("ingest (cp into a region)"), row("sequential read (cat)")
    restic_backup, restic_mount = row("backup", "restic"), row(
        "read through restic mount (cat)", "restic")
    ceiling = row("cp into a no-op pyfuse3 fs", "reference")
    target("ingest >= 1.0x cp to local disk", ref_cp / ingest >= 1,
           f"{ref_cp / ingest:.2f}x" + (f" (a no-op pyfuse3 fs: {ref_cp / ceiling:.2f}x)"
                                        if ceiling else ""))
    if restic_backup:
        target("ingest >= 2.5x restic backup", restic_backup / ingest >= 2.5,
               f"{restic_backup / ingest:.2f}x")
    target("first sequential read >= 1.5 GB/s", b.size / read >= 1.5e9,
           f"{b.size / read / MB:.0f} MB/s")
    again, local_cat = row("sequential read again"), row("cat local image", "reference")
    target("warm re-read >= 60% of cat of a local file", local_cat / again >= 0.6,
           f"{local_cat / again:.0%}")
    target("mmap SHA-256 equal to cat's", f.get("mmap_sha256") == "ok",
           str(f.get("mmap_sha256")))
    if "dense_snapfs" in f:
        ours, local = f["dense_snapfs"], f["dense_local"]
        target("cold random 4 KiB >= 5k IOPS at QD1", ours["fio_cold_qd1_iops"] >= 5000,
               f"{ours['fio_cold_qd1_iops']:.0f}")
        if "fio_cold_qd16_iops" in ours:
            target("cold random 4 KiB >= 15k IOPS at QD16", ours["fio_cold_qd16_iops"] >= 15000,
                   f"{ours['fio_cold_qd16_iops']:.0f}")
        warm = min(ours[k] / local[k] for k in ("fio_warm_qd1_iops", "fio_warm_qd16_iops")
                   if k in ours)
        target("warm random 4 KiB >= 50% of a local file", warm >= 0.5, f"{warm:.0%} (lower QD)")
    if restic_mount:
        target("sequential read >= 3x restic mount", restic_mount / read >= 3,
               f"{restic_mount / read:.2f}x")
    for name, ours, theirs, want in (
        ("full copy >= 3x faster than restic copy", "mv copy to another region, full",
         "copy, full", 3),
        ("incremental copy >= 2x faster than restic", "mv copy of day 2, incremental",
         "copy, incremental", 2),
    ):
        if row(theirs, "restic"):
            target(name, row(theirs, "restic") / row(ours) >= want,
                   f"{row(theirs, 'restic') / row(ours):.2f}x (mv); "
                   f"cp: {row(theirs, 'restic') / row(ours.replace('mv', 'cp')):.2f}x")
    worst = max(int(f["mv_copy_incremental_transferred"]),
                int(f["cp_copy_incremental_transferred"])) / changed
    target("transferred / changed <= 1.1", worst <= 1.1, f"{worst:.3f}x")
    target("daemon peak RSS < 300 MiB", f["daemon_peak_rss_bytes"] < 300 * MiB,
           f"{f['daemon_peak_rss_bytes'] / MiB:.0f} MiB")
    if "sparse_read_whole_extrapolated_s" in f:
        create = row("create (truncate + 64 MiB of writes)", "snapfs 1 TiB sparse")
        copy = row("mv copy to another region", "snapfs 1 TiB sparse")
        whole = float(f["sparse_read_whole_extrapolated_s"])
        local = float(f["ref_sparse_read_whole_extrapolated_s"])
        target("1 TiB sparse: create, read and copy, each < 60 s",
               create < 60 and copy < 60 and whole < 60,
               f"create {create:.1f} s, copy {copy:.1f} s, read {whole:.0f} s (extrapolated;"
               f" a local sparse file: {local:.0f} s)")
    lat = max(f["latency_during_cp_copy"]["max_ms"], f["latency_during_mv_copy"]["max_ms"])
    target("ls + getfattr during a copy < 50 ms", lat < 50, f"max {lat:.1f} ms")
    print("\ntargets:")
    for name, ok, detail in targets:
        print(f"  {'met ' if ok else 'MISS'}  {name:45} {detail}")
    return [name for name, ok, _ in targets if not ok]


def chart(b: Bench, path: Path) -> None:
    """MB/s per scenario as horizontal bars, one colour per tool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in b.rows if r.group != "snapfs 1 TiB sparse"]
    colours = {"reference": "#888888", "snapfs": "#1f77b4", "snapfs encrypted": "#17becf",
               "restic": "#d62728", "borg": "#ff7f0e"}
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.2))
    labels = [f"{r.group}: {r.name}" for r in rows]
    ax.barh(labels, [r.mb_s for r in rows], color=[colours.get(r.group, "#2ca02c") for r in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(f"MB/s of a {b.size / GiB:.0f} GiB disk image (log scale; higher is better)")
    ax.set_title("snapfs side by side with cp, restic and borg (one run, same machine)")
    for y, r in enumerate(rows):
        ax.text(r.mb_s, y, f" {r.mb_s:.0f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart written to {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2G", help="image size (default 2G)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="block size of the benchmark store (default: snapfs default)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where images and the store go (default: a temp dir in /tmp)")
    parser.add_argument("--no-restic", action="store_true", help="skip the restic runs")
    parser.add_argument("--no-borg", action="store_true", help="skip the borg runs")
    parser.add_argument("--no-sparse", action="store_true", help="skip the 1 TiB sparse image")
    parser.add_argument("--no-dense", action="store_true",
                        help="skip the fio runs on a dense 1 GiB image")
    parser.add_argument("--fio-seconds", type=float, default=5,
                        help="seconds per fio run on the dense image (default 5)")
    parser.add_argument("--hold-max", default="16G",
                        help="most memory held in use during the dense runs (default 16G)")
    parser.add_argument("--s3", action="store_true", help="also copies into an S3 region "
                        "against rclone and restic (scripts/bench_s3.py)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "bench.json",
                        help="where to write the machine-readable results")
    parser.add_argument("--chart", type=Path, default=None,
                        help="also render the table as a PNG bar chart (needs matplotlib)")
    args = parser.parse_args()

    size = diskimage.parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench.", dir=args.workdir))
    mnt, store = work / "mnt", work / "store"
    mnt.mkdir()
    day1, day2 = work / "day1.img", work / "day2.img"
    b = Bench(size)
    b.figures["image_bytes"] = size
    try:
        print(f"generating a {size / MiB:.0f} MiB disk-like image in {work} ...", flush=True)
        diskimage.create(day1, size, seed=1)
        shutil.copy(day1, day2)
        b.figures["changed_bytes"] = diskimage.mutate(day2, 0.05, block_size=MiB, seed=2)
        timed(f"cat {day1} {day2} > /dev/null", shell=True)  # every reader starts from cache
        reference_runs(b, work, day1)

        mount_args = ["mount", mnt, "--store", store]
        if args.block_size:
            mount_args += ["--block-size", str(args.block_size)]
        settle()
        snapfs(*mount_args)
        pid = mounts.lookup(mnt).pid
        snapfs_plain_runs(b, mnt, store, day1, day2)
        snapfs_encrypted_runs(b, mnt, store, day1, day2)
        if not args.no_sparse:
            sparse_runs(b, mnt)
        b.figures["daemon_peak_rss_bytes"] = peak_rss(pid)
        snapfs("umount", mnt)
        if not args.no_restic and shutil.which("restic"):
            settle()
            restic_runs(b, work, day1, day2)
        if not args.no_borg and shutil.which("borg"):
            settle()
            borg_runs(b, work, day1, day2)
        if not args.no_dense:
            dense_random_runs(b, work, args.fio_seconds, diskimage.parse_size(args.hold_max))
    finally:
        if mounts.mount_fstype(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        shutil.rmtree(work, ignore_errors=True)

    missed = report(b)
    if args.s3:  # the S3 scenario lives in its own module (scripts/bench_s3.py)
        import bench_s3

        b.figures["s3"] = bench_s3.run(size, args.workdir)
        bench_s3.report(b.figures["s3"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": [asdict(r) | {"mb_s": r.mb_s} for r in b.rows],
                                     "figures": b.figures, "targets_missed": missed}, indent=2))
    print(f"\nresults written to {args.json}")
    if args.chart:
        chart(b, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
