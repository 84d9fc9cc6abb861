"""The load workload: many copies into one region at once, with readers and writers beside
them, and a probe of how long `ls` takes meanwhile. Shared by `tests/mount/test_load.py` (one
round) and `scripts/soak.py load` (rounds for a bounded time).

One round, against regions `src` (the source snapshots) and `dst`:
- `copies` copies into dst at once: a tenth by `mv` (of same-region copies made for it), a
  tenth by `cp` processes, the rest by the CopySnapshot API (`user.snapfs.copy`);
- writer threads write new snapshots into dst and read them back;
- reader threads read sources and still-copying destinations (served from the source on
  demand) and compare every byte;
- a probe lists dst and reads an attribute every 50 ms, recording the worst latency.
Then every copy must become available and read back identical to its source.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..conftest import SnapfsMount, sha256, wait_for

SRC, DST = "src", "dst"
SOURCES = 10
SOURCE_SIZE = 2 << 20
WRITE_SIZE = 2 << 20


@dataclass
class Round:
    copies_started: int = 0
    copies_verified: int = 0
    writes_verified: int = 0
    reads_verified: int = 0
    worst_ls: float = 0.0
    probes: int = 0
    most_running: int = 0  # the most copy jobs seen running in dst at once
    problems: list[str] = field(default_factory=list)


def create_sources(m: SnapfsMount, images: Path) -> dict[str, str]:
    """SOURCES distinct images in src (sharing a common first half, so copies dedup across
    sources too); name -> sha256."""
    images.mkdir(parents=True, exist_ok=True)
    (m.path / SRC).mkdir(exist_ok=True)
    (m.path / DST).mkdir(exist_ok=True)
    common = random.Random(7).randbytes(SOURCE_SIZE // 2)
    digests = {}
    for i in range(SOURCES):
        path = images / f"s{i}.img"
        path.write_bytes(common + random.Random(i).randbytes(SOURCE_SIZE // 2))
        subprocess.run(["cp", str(path), str(m.path / SRC / path.name)], check=True)
        digests[path.name] = sha256(path)
    return digests


def _digest(path: Path) -> str:
    return sha256(path)


def _status(path: Path) -> bytes:
    return os.getxattr(path, "user.snapfs.status")


def run_round(
    m: SnapfsMount,
    digests: dict[str, str],
    tag: str,
    *,
    copies: int = 100,
    writers: int = 4,
    readers: int = 4,
    timeout: float = 300.0,
) -> Round:
    """One round of load; `tag` keeps its names apart from other rounds'."""
    result = Round()
    src, dst = m.path / SRC, m.path / DST
    sources = sorted(digests)
    moves, cps = copies // 10, copies // 10
    api = copies - moves - cps
    expected: dict[str, str] = {}  # name in dst -> digest

    # Same-region copies to move: instant (every block is there already).
    for j in range(moves):
        name = f"m{tag}-{j}"
        request = {"source": f"{SRC}/{sources[j % SOURCES]}", "name": name}
        os.setxattr(src, "user.snapfs.copy", json.dumps(request).encode())
    for j in range(moves):
        path = src / f"m{tag}-{j}"
        assert wait_for(lambda p=path: _status(p) == b"available", timeout)

    done = threading.Event()
    lock = threading.Lock()

    def probe() -> None:
        while not done.is_set():
            started = time.monotonic()
            names = os.listdir(dst)
            running = int(os.getxattr(dst, "user.snapfs.copies_running"))
            if names:
                # renamed or deleted between the listing and the look: fine
                with contextlib.suppress(FileNotFoundError):
                    _status(dst / random.choice(names))
            with lock:
                result.worst_ls = max(result.worst_ls, time.monotonic() - started)
                result.probes += 1
                result.most_running = max(result.most_running, running)
            time.sleep(0.05)

    def write(k: int) -> None:
        data = os.urandom(WRITE_SIZE)
        path = dst / f"w{tag}-{k}.img"
        with open(path, "wb") as f:
            for off in range(0, WRITE_SIZE, 256 << 10):
                f.write(data[off : off + (256 << 10)])
        expected_digest = hashlib.sha256(data).hexdigest()
        if _digest(path) != expected_digest:
            result.problems.append(f"{path.name} reads back different bytes")
            return
        with lock:
            result.writes_verified += 1
        os.unlink(path)

    def read(seed: int) -> None:
        rng = random.Random(seed)
        while not done.is_set():
            # Job copies read complete while copying; a `cp` copy is only complete at close.
            names = [n for n in os.listdir(dst) if n in expected and not n.startswith("c")]
            pick = rng.choice(names) if names and rng.random() < 0.7 else None
            path, want = (dst / pick, expected[pick]) if pick else (src, None)
            if want is None:
                name = rng.choice(sources)
                path, want = src / name, digests[name]
            try:
                got = _digest(path)
            except FileNotFoundError:
                continue
            if got != want:
                result.problems.append(f"reading {path.name} gave different bytes")
            with lock:
                result.reads_verified += 1

    with concurrent.futures.ThreadPoolExecutor(readers + writers + 2) as pool:
        background = [pool.submit(probe)] + [pool.submit(read, i) for i in range(readers)]
        cp_procs = []
        for j in range(cps):
            name = f"c{tag}-{j}"
            source = sources[(j + 3) % SOURCES]
            expected[name] = digests[source]
            cp_procs.append(subprocess.Popen(["cp", str(src / source), str(dst / name)]))
        for j in range(moves):
            name = f"m{tag}-{j}"
            expected[name] = digests[sources[j % SOURCES]]
            subprocess.run(["mv", str(src / name), str(dst / name)], check=True)
        for i in range(api):
            name = f"a{tag}-{i}"
            source = sources[i % SOURCES]
            request = {"source": f"{SRC}/{source}", "name": name}
            os.setxattr(dst, "user.snapfs.copy", json.dumps(request).encode())
            expected[name] = digests[source]
        result.copies_started = len(expected)
        writes = [pool.submit(write, k) for k in range(writers)]
        for proc in cp_procs:
            if proc.wait() != 0:
                result.problems.append(f"cp exited {proc.returncode}")
        for name in expected:
            path = dst / name
            if not wait_for(lambda p=path: _status(p) != b"copying", timeout):
                result.problems.append(f"{name} still copying after {timeout} s")
        for future in writes:
            future.result()
        done.set()
        for future in background:
            future.result()

    for name, want in expected.items():
        path = dst / name
        status = _status(path)
        if status != b"available":
            result.problems.append(f"{name} is {status.decode()}")
        elif _digest(path) != want:
            result.problems.append(f"{name} reads back different bytes")
        else:
            result.copies_verified += 1
    return result


def clear_round(m: SnapfsMount, tag: str) -> None:
    """Delete a round's copies (their blocks are shared with the sources: only rows go)."""
    for name in os.listdir(m.path / DST):
        if name[1:].startswith(f"{tag}-"):
            os.unlink(m.path / DST / name)
