"""snapfs benchmark: the region index on SQLite against PostgreSQL, per writer batch.

What a writer does with the index for every batch of 256 blocks (service/snapshots.py): a
dedup lookup of each new block id, then one commit of the batch (block rows, map rows,
snapshot fields). Timed here straight on `RegionIndex` for both engines, with the index
already holding --blocks blocks:

  - lookups one by one (`has_block`, what the writer does today, ~15 us on SQLite);
  - one batched lookup (`SELECT ... WHERE block_id IN (...)` of the 256 ids), what a shared
    index needs so that a round trip is paid per batch and not per block;
  - `commit_blocks` of 256 new blocks and their map rows.

PostgreSQL is a private server started like the tests' (initdb + pg_ctl on a Unix socket in
a temp dir, fsync on; tests/conftest.py `start_pg_server`), so the round trip is a local
socket's; over a network each round trip adds its RTT, which is what batching saves.

    python scripts/bench_index.py [--batches 40] [--blocks 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snapfs.meta.index import NewBlock, RegionIndex  # noqa: E402
from snapfs.meta.pg import PgRegionIndex  # noqa: E402
from tests.conftest import start_pg_server  # noqa: E402

BATCH = 256


def row(snapshot_id: str) -> dict:
    return {
        "id": snapshot_id, "name": snapshot_id, "status": "creating", "size": 0,
        "mode": 0o644, "uid": 0, "gid": 0, "atime_ns": 0, "mtime_ns": 0, "ctime_ns": 0,
        "created_at": time.time(), "sealed_at": None,
    }  # fmt: skip


def new_blocks(count: int) -> list[NewBlock]:
    return [NewBlock(os.urandom(32), 512 << 10, 300 << 10, 2) for _ in range(count)]


def fill(index: RegionIndex, blocks: int) -> None:
    index.insert_snapshot(row("s-fill"))
    for start in range(0, blocks, 4096):
        made = new_blocks(min(4096, blocks - start))
        index.commit_blocks("s-fill", made, [(start + n, b.block_id) for n, b in enumerate(made)],
                            {})  # fmt: skip


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(index: RegionIndex, batches: int) -> dict[str, float]:
    index.insert_snapshot(row("s-bench"))
    one_by_one, batched, commits = [], [], []
    for n in range(batches):
        made = new_blocks(BATCH)
        ids = [b.block_id for b in made]
        one_by_one.append(timed(lambda ids=ids: [index.has_block(i) for i in ids]))
        marks = ",".join("?" * len(ids))
        sql = f"SELECT id FROM blocks WHERE id IN ({marks})"
        batched.append(timed(lambda sql=sql, ids=ids: index.db.execute(sql, ids).fetchall()))
        mapping = [(n * BATCH + k, b.block_id) for k, b in enumerate(made)]
        fields = {"size": (n + 1) * BATCH * (512 << 10)}
        commits.append(timed(lambda made=made, mapping=mapping, fields=fields:
                             index.commit_blocks("s-bench", made, mapping, fields)))
    return {
        "lookup_one_by_one_ms": median_ms(one_by_one),
        "lookup_batched_ms": median_ms(batched),
        "commit_ms": median_ms(commits),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--blocks", type=int, default=100_000,
                        help="blocks already in the index (default 100000, ~50 GiB)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "bench-index.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="snapfs-bench-index.", dir="/var/tmp"))
    results: dict[str, dict[str, float]] = {}
    sqlite = RegionIndex(work / "index.db")
    try:
        fill(sqlite, args.blocks)
        results["sqlite"] = measure(sqlite, args.batches)
    finally:
        sqlite.close()
    (work / "pg").mkdir()
    server = start_pg_server(work / "pg")
    try:
        import psycopg

        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench")
        pg = PgRegionIndex.create(server.url("bench"), "bench", created_at=time.time())
        try:
            fill(pg, args.blocks)
            results["postgresql"] = measure(pg, args.batches)
        finally:
            pg.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nRegion index per writer batch of {BATCH} blocks, {args.blocks} blocks indexed, "
          f"median of {args.batches} batches (ms)")
    print(f"  {'':34}{'SQLite':>12}{'PostgreSQL':>12}{'ratio':>9}")
    for field, label in (("lookup_one_by_one_ms", "dedup lookups, one per block"),
                         ("lookup_batched_ms", "dedup lookup, one per batch"),
                         ("commit_ms", "commit of the batch")):
        a, b = results["sqlite"][field], results["postgresql"][field]
        print(f"  {label:34}{a:12.2f}{b:12.2f}{b / a:8.1f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
