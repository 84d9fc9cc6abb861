"""`snapfs check`: verify every stored block of every snapshot, and the index around them.

For each region it checks, from the region's index and its block store alone:

- every block a snapshot references has its object, and the object decodes: plain blocks
  hash back to their id (BLAKE3), encrypted ones pass AES-GCM authentication (tag, id,
  region and key bound in); a damaged or missing block is reported with every snapshot and
  offset that uses it;
- a block stored as a delta (formats/delta.py) is verified over its base: both objects
  decode and the result hashes to the block's id; a damaged base is reported with the
  deltas it breaks (`bad_bases`) and every snapshot and offset that uses them;
- every block's reference count equals the block-map rows naming it and the deltas stored
  over it, and every snapshot's
  allocated-block count its map rows (the triggers keep them; a hand-edited or damaged index
  might not);
- objects no index row names (orphans, e.g. left by a crash between write and commit).

It runs on an unmounted store (taking the store's lock, so no mount starts meanwhile) or,
read-only, beside a running daemon. `--repair` needs the store unmounted: it deletes orphans
and unreferenced blocks and recomputes the counts. It never deletes a block a snapshot
references, damaged or not: reading such a snapshot keeps failing with EIO at that offset
rather than returning wrong bytes, and the damage stays visible to the next check.

Blocks are verified in worker threads (hashing, decompression and AES-GCM release the GIL).

Why one module of ~500 lines: each check is a short function; they share one report and
one worker pool, and `snapfs check` runs them in this order.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import sqlite_utils

from snapfs.errors import (
    BlockCorrupt,
    IndexDamaged,
    KeyDisabled,
    KeyNotFound,
    SnapfsError,
    StoreBusy,
    StoreNotFound,
)
from snapfs.formats import codec, delta
from snapfs.meta import catalogue
from snapfs.meta import db as dbutil
from snapfs.meta.index import RegionIndex
from snapfs.meta.keys import MASTER_FILE, MASTER_KEY_BYTES, KeyRing, unlock_master
from snapfs.objects.local import LocalBackend
from snapfs.objects.protocol import ObjectStore
from snapfs.objects.s3packs import PackedS3Backend
from snapfs.objects.stores import open_block_store

log = logging.getLogger(__name__)

BATCH = 64  # blocks verified per round of worker threads


@dataclass
class DamagedSnapshot:
    name: str | None  # the `snapshots.name` column is nullable
    id: str
    offsets: list[int] = field(default_factory=list)
    map_unreadable: bool = False  # its block map is on a damaged index page


@dataclass
class RegionReport:
    name: str
    blocks_checked: int = 0
    bytes_checked: int = 0
    missing: list[str] = field(default_factory=list)  # hex ids of absent objects
    corrupt: list[str] = field(default_factory=list)  # hex ids that fail verification
    unverified: list[str] = field(default_factory=list)  # under a disabled key
    wrong_refcounts: list[dict[str, Any]] = field(default_factory=list)
    wrong_allocated: list[dict[str, Any]] = field(default_factory=list)
    orphans: int = 0  # never counted in a read-only region: its bucket's owner writes there
    read_only: bool = False  # attached read-only: nothing in its bucket is repaired or deleted
    unreferenced: int = 0  # rows with no references left (normally collected at once)
    index_problems: list[str] = field(default_factory=list)  # SQLite's integrity check
    # Files a mount needs that are missing, empty or short (a layout marker, packs): what a
    # power loss leaves on a disk that did not keep what was not fsync'ed.
    file_problems: list[str] = field(default_factory=list)
    damaged_snapshots: list[DamagedSnapshot] = field(default_factory=list)
    # Deltas that do not read because their base is missing or damaged: block, base, problem.
    bad_bases: list[dict[str, str]] = field(default_factory=list)
    # Maps relative to a parent whose chain is damaged (a parent missing, a loop, a depth
    # that does not match): snapshot, name, problem. Their content cannot be resolved.
    broken_chains: list[dict[str, str | None]] = field(default_factory=list)
    repaired: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def damaged(self) -> bool:
        return bool(
            self.missing
            or self.corrupt
            or self.error
            or self.index_problems
            or self.broken_chains
            or any(
                not ("layout" in self.repaired and problem.startswith(LocalBackend.LAYOUT_FILE))
                for problem in self.file_problems
            )
            or (self.wrong_refcounts and "refcounts" not in self.repaired)
            or (self.wrong_allocated and "allocated_blocks" not in self.repaired)
        )


@dataclass
class CheckReport:
    store: str
    repair: bool
    regions: list[RegionReport]
    problems: list[str] = field(default_factory=list)  # store-wide: the mount would fail

    @property
    def ok(self) -> bool:
        return not self.problems and not any(r.damaged for r in self.regions)

    def as_dict(self) -> dict[str, Any]:
        regions = [{**asdict(r), "damaged": r.damaged} for r in self.regions]
        return {
            "store": self.store,
            "repair": self.repair,
            "ok": self.ok,
            "problems": self.problems,
            "regions": regions,
        }


@contextlib.contextmanager
def _store_lock(store: Path, repair: bool) -> Iterator[bool]:
    """Yields whether this check holds the store (unmounted); a mounted store is read-only."""
    with catalogue.held_if_free(store) as held:
        if repair and not held:
            raise StoreBusy(f"store {store} is mounted: unmount it before check --repair")
        yield held


def _backend_of(directory: Path, row: dict[str, Any], *, readonly: bool) -> ObjectStore:
    """The region's objects as check sees them: local packs, or a bucket (objects/s3.py);
    the bucket of a region attached read-only through a backend that refuses any change."""
    return open_block_store(
        directory,
        row.get("backend"),
        row.get("endpoint"),
        readonly=readonly,
        max_wait=60.0,
        bucket_readonly=bool(row.get("read_only")),
    )


@dataclass(frozen=True)
class Verdict:
    outcome: str  # 'ok' | 'missing' | 'corrupt' | 'unverified' | 'nokey'
    size: int = 0  # plaintext bytes verified
    # A delta whose own object is sound but whose base is not: the base, and how it fails.
    base: bytes | None = None
    base_outcome: str = ""


def _verify(
    backend: ObjectStore, region: str, block_id: bytes, keys_for: codec.KeyLookup
) -> Verdict:
    """A block's object verified; a delta (formats/delta.py) through its base, whose id
    it must hash to once laid over it. Worker thread."""
    try:
        data = backend.get(block_id.hex())
    except FileNotFoundError:
        return Verdict("missing")
    try:
        if not delta.is_delta(data):
            return Verdict("ok", len(codec.decode(data, block_id, keys_for, region)))
        opened = delta.open(data, block_id, keys_for, region)
        try:
            base = (
                bytes(opened.plain_size)
                if opened.base_id == delta.ZERO_BASE
                else codec.decode(
                    backend.get(opened.base_id.hex()), opened.base_id, keys_for, region
                )
            )
        except FileNotFoundError:
            return Verdict("corrupt", base=opened.base_id, base_outcome="missing")
        except BlockCorrupt:
            return Verdict("corrupt", base=opened.base_id, base_outcome="corrupt")
        plain = delta.apply(base, opened)
        id_key = keys_for(opened.key_id).id_key if opened.encrypted else None
        if codec.content_id(plain, id_key) != block_id:
            return Verdict("corrupt", base=opened.base_id, base_outcome="corrupt")
        return Verdict("ok", len(plain))
    except KeyDisabled:
        return Verdict("unverified")
    except KeyNotFound:
        return Verdict("nokey")
    except BlockCorrupt:
        return Verdict("corrupt")


class _Progress:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total: int):
        import sys

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.bar = Progress(
            "checking blocks",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not sys.stderr.isatty(),
            transient=True,
        )
        self.task = self.bar.add_task("check", total=total)

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.bar.__exit__(exc_type, exc, tb)

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)


def _count_checks(index: RegionIndex, report: RegionReport) -> None:
    for block_id, recorded, actual in index.block_refcounts():
        if recorded != actual:
            report.wrong_refcounts.append(
                {"block": block_id.hex(), "recorded": recorded, "actual": actual}
            )
        if actual == 0:
            report.unreferenced += 1
    report.broken_chains = [
        {"snapshot": sid, "name": name, "problem": why} for sid, name, why in index.broken_chains()
    ]
    broken = {str(b["snapshot"]) for b in report.broken_chains}
    try:
        allocations = list(index.snapshot_allocations(skip=broken))
    except sqlite3.DatabaseError as exc:  # a chain broken in a way broken_chains missed
        report.broken_chains.append({"snapshot": None, "name": None, "problem": str(exc)})
        allocations = []
    for snapshot_id, recorded, actual in allocations:
        if recorded != actual:
            report.wrong_allocated.append(
                {"snapshot": snapshot_id, "recorded": recorded, "actual": actual}
            )


INDEX_PROBLEMS_SHOWN = 20


def _index_problems(index: RegionIndex) -> list[str]:
    """SQLite's own check of every page of the index (quick_check: b-trees, not the
    UNIQUE constraints), and which tables cannot be read through; empty when it is sound."""
    try:
        lines = index.quick_check(INDEX_PROBLEMS_SHOWN)
    except sqlite3.DatabaseError as exc:  # damage bad enough to stop the check itself
        lines = [str(exc)]
    if lines == ["ok"]:
        return []
    try:
        schema = index.schema_trees()
    except sqlite3.DatabaseError:
        return lines
    lines = [_name_tree(line, {root: name for root, name, _ in schema if root}) for line in lines]
    for name in (name for root, name, kind in schema if kind == "table" and root):
        try:
            index.read_through(name)
        except sqlite3.DatabaseError as exc:
            lines.append(f"{name} cannot be read through: {exc}")
    return lines


def _name_tree(line: str, roots: dict[int, str]) -> str:
    """'Tree 7 page 12 ...' -> 'Tree 7 (snapshot_blocks) page 12 ...'."""
    words = line.split(" ", 2)
    if len(words) > 2 and words[0] == "Tree" and words[1].isdigit() and int(words[1]) in roots:
        return f"Tree {words[1]} ({roots[int(words[1])]}) {words[2]}"
    return line


def _salvage_references(index: RegionIndex) -> tuple[list[bytes], list[DamagedSnapshot]]:
    """A damaged index: read each snapshot's block map on its own, so that the snapshots
    on damaged pages are named and the blocks of all the others are still verified."""
    referenced: set[bytes] = set()
    unreadable: list[DamagedSnapshot] = []
    for snapshot_id, name in index.snapshot_ids_and_names():
        try:
            blocks = index.referenced_by(snapshot_id)
        except sqlite3.DatabaseError:
            unreadable.append(DamagedSnapshot(name, snapshot_id, map_unreadable=True))
            continue
        referenced.update(blocks)
    return sorted(referenced), unreadable


def _verify_blocks(
    backend: ObjectStore,
    report: RegionReport,
    ids: list[bytes],
    keys_for: codec.KeyLookup,
    pool: concurrent.futures.Executor,
    progress: _Progress,
) -> list[bytes]:
    """Verify `ids`; returns the ids whose data is lost (missing, corrupt or keyless)."""
    lost: list[bytes] = []
    for start in range(0, len(ids), BATCH):
        batch = ids[start : start + BATCH]
        results = pool.map(lambda b: _verify(backend, report.name, b, keys_for), batch)
        for block_id, verdict in zip(batch, results, strict=True):
            if verdict.outcome == "ok":
                report.blocks_checked += 1
                report.bytes_checked += verdict.size
            elif verdict.outcome == "unverified":
                report.unverified.append(block_id.hex())
            elif verdict.base is not None:
                # Name both: the delta that cannot be read, and the base that is why.
                report.bad_bases.append(
                    {
                        "block": block_id.hex(),
                        "base": verdict.base.hex(),
                        "problem": verdict.base_outcome,
                    }
                )
                bad = report.missing if verdict.base_outcome == "missing" else report.corrupt
                if verdict.base.hex() not in bad:
                    bad.append(verdict.base.hex())
                lost.append(block_id)
            else:
                bad = report.missing if verdict.outcome == "missing" else report.corrupt
                bad.append(block_id.hex())
                lost.append(block_id)
        progress.advance(len(batch))
    return lost


def _damaged_snapshots(
    index: RegionIndex, lost: list[bytes], block_size: int
) -> list[DamagedSnapshot]:
    found: dict[str, DamagedSnapshot] = {}
    for block_id in lost:
        for name, snapshot_id, block_no in index.block_users(block_id):
            entry = found.setdefault(snapshot_id, DamagedSnapshot(name, snapshot_id))
            entry.offsets.append(block_no * block_size)
    for entry in found.values():
        entry.offsets.sort()
    return sorted(found.values(), key=lambda d: d.name or "")


def _repair(
    index: RegionIndex, backend: ObjectStore, report: RegionReport, orphans: list[str]
) -> None:
    """Counts recomputed, unreferenced rows dropped (rows first), then their objects and
    the orphans deleted. Referenced blocks are never touched."""
    dropped = index.recount()
    backend.delete_many([*(b.hex() for b in dropped), *orphans])
    backend.reclaim_unmapped()
    report.repaired |= {
        "refcounts": len(report.wrong_refcounts),
        "allocated_blocks": len(report.wrong_allocated),
        "unreferenced_dropped": len(dropped),
        "orphans_deleted": len(orphans),
    }


def _check_region(
    store: Path,
    row: dict[str, Any],
    block_size: int,
    keys_for: codec.KeyLookup,
    *,
    repair: bool,
    pool: concurrent.futures.Executor,
) -> RegionReport:
    name = row["name"]
    report = RegionReport(name, read_only=bool(row.get("read_only")))
    directory = store / "regions" / name
    if not (directory / "index.db").exists():
        report.error = f"RegionIndex.NotFound: {directory / 'index.db'} is missing"
        return report
    try:
        index = RegionIndex(directory / "index.db", readonly=not repair)
    except (sqlite3.DatabaseError, SnapfsError) as exc:
        report.error = f"{IndexDamaged.code}: {directory / 'index.db'} cannot be opened: {exc}"
        return report
    local = (row.get("backend") or "local") == "local"
    backend = _backend_of(directory, row, readonly=local or not repair)
    if isinstance(backend, LocalBackend):
        layout = backend.layout_problem()
        report.file_problems = [f"{layout} (the next mount rebuilds it)"] if layout else []
        report.file_problems += backend.pack_problems()
        if repair:
            backend.close()
            backend = _backend_of(directory, row, readonly=False)  # rewrites the marker
            if layout:
                report.repaired["layout"] = 1
    elif isinstance(backend, PackedS3Backend):
        report.file_problems = backend.pack_problems()
    try:
        report.index_problems = _index_problems(index)
        if report.index_problems:
            _check_damaged_index(index, backend, report, block_size, keys_for, pool)
            return report  # never repaired automatically: what is lost must stay visible
        _count_checks(index, report)
        known = {block_id.hex() for block_id in index.all_block_ids()}
        # In a read-only region, objects no row names here are the owner's, not strays.
        stored = iter(()) if report.read_only else backend.keys()
        orphans = [key for key in stored if key.removesuffix(".tmp") not in known]
        report.orphans = len(orphans)
        referenced = index.referenced_block_ids()
        with _Progress(len(referenced)) as progress:
            lost = _verify_blocks(backend, report, referenced, keys_for, pool, progress)
        if lost and not repair:
            # Beside a running daemon a block can be collected after we listed it: only
            # what is still referenced now is damage.
            still = set(index.referenced_block_ids())
            report.bad_bases = [d for d in report.bad_bases if bytes.fromhex(d["block"]) in still]
            still |= {bytes.fromhex(d["base"]) for d in report.bad_bases}
            lost = [b for b in lost if b in still]
            report.missing = [h for h in report.missing if bytes.fromhex(h) in still]
            report.corrupt = [h for h in report.corrupt if bytes.fromhex(h) in still]
        report.damaged_snapshots = _damaged_snapshots(index, lost, block_size)
        if repair:
            _repair(index, backend, report, orphans)
    except sqlite3.DatabaseError as exc:  # a page quick_check could not see, read now
        report.error = f"{IndexDamaged.code}: {directory / 'index.db'}: {exc}"
    finally:
        index.close()
        backend.close()
    return report


def _check_damaged_index(
    index: RegionIndex,
    backend: ObjectStore,
    report: RegionReport,
    block_size: int,
    keys_for: codec.KeyLookup,
    pool: concurrent.futures.Executor,
) -> None:
    """What can still be checked in an index with damaged pages: the snapshots whose maps
    are unreadable are named; the blocks of the others are verified. Counts and orphans are
    not judged (the rows they are computed from may be on the damaged pages)."""
    try:
        referenced, unreadable = _salvage_references(index)
    except sqlite3.DatabaseError as exc:  # the snapshots table itself is damaged
        report.error = f"{IndexDamaged.code}: the snapshot list is unreadable: {exc}"
        return
    with _Progress(len(referenced)) as progress:
        lost = _verify_blocks(backend, report, referenced, keys_for, pool, progress)
    try:
        damaged = _damaged_snapshots(index, lost, block_size)
    except sqlite3.DatabaseError:
        damaged = []
    report.damaged_snapshots = sorted(damaged + unreadable, key=lambda d: d.name or "")


def _key_lookup(store: Path, catalogue: sqlite_utils.Database) -> codec.KeyLookup:
    """Header key id -> block keys; a store whose keys cannot be unlocked verifies plain
    blocks only (encrypted ones then report as lost, with the reason logged)."""
    try:
        ring = KeyRing(store, catalogue, unlock_master(store, catalogue, create=False))
        ring.prime()
    except SnapfsError as exc:
        log.warning("keys unavailable (%s): encrypted blocks cannot be verified", exc.message)

        def no_keys(key_id: bytes) -> NoReturn:
            raise KeyNotFound(f"the key {uuid.UUID(bytes=key_id)} cannot be unlocked")

        return no_keys
    return lambda key_id: ring.loaded(str(uuid.UUID(bytes=key_id)))


def check(store: Path, *, repair: bool = False) -> CheckReport:
    store = store.resolve()
    if not (store / "store.db").exists():
        raise StoreNotFound(f"no snapfs store at {store}")
    with _store_lock(store, repair):
        catalogue = dbutil.connect(store / "store.db", readonly=True)
        try:
            block_size = int(dbutil.get_meta(catalogue, "block_size", "0") or 0)
            rows = list(catalogue["regions"].rows_where(order_by="id"))
            problems = _store_problems(store, catalogue)
            keys_for = _key_lookup(store, catalogue)
            workers = max(2, os.cpu_count() or 2)
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                regions = [
                    _check_region_or_say_why(
                        store, row, block_size, keys_for, repair=repair, pool=pool
                    )
                    for row in rows
                ]
        finally:
            catalogue.close()
    return CheckReport(str(store), repair, regions, problems)


def _check_region_or_say_why(
    store: Path, row: dict[str, Any], *args: Any, **kw: Any
) -> RegionReport:
    """A region whose files cannot even be opened is reported as such, like the mount
    leaves it out, and the check goes on with the others."""
    try:
        return _check_region(store, row, *args, **kw)
    except (OSError, ValueError) as exc:
        report = RegionReport(row["name"])
        report.error = f"Region.Unreadable: {type(exc).__name__}: {exc}"
        return report


def _store_problems(store: Path, catalogue: sqlite_utils.Database) -> list[str]:
    """What would stop the whole store from mounting, beyond any one region."""
    problems = []
    if dbutil.get_meta(catalogue, "key_protection") == "keyfile":
        path = store / MASTER_FILE
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"the master key file {path} is missing: the store cannot mount")
        else:
            if size != MASTER_KEY_BYTES:
                problems.append(
                    f"the master key file {path} is {size} bytes, not {MASTER_KEY_BYTES}: "
                    "the store's keys cannot be unlocked"
                )
    return problems


def render(report: CheckReport) -> None:
    for r in report.regions:
        state = "DAMAGED" if r.damaged else "ok"
        print(
            f"region {r.name}: {state}: {r.blocks_checked} blocks verified "
            f"({r.bytes_checked} bytes), {len(r.missing)} missing, {len(r.corrupt)} corrupt, "
            f"{len(r.wrong_refcounts)} wrong reference counts, {r.orphans} orphaned objects"
        )
        if r.error:
            print(f"  {r.error}")
        for problem in r.file_problems:
            print(f"  {problem}")
        for problem in r.index_problems:
            print(f"  index damaged: {problem}")
        if r.unverified:
            print(f"  {len(r.unverified)} blocks not verified: their key is disabled")
        for bad in r.bad_bases[:20]:
            print(
                f"  block {bad['block']} (a delta) does not read: its base {bad['base']} is "
                f"{bad['problem']}"
            )
        for chain in r.broken_chains:
            print(
                f"  snapshot {chain['name']} ({chain['snapshot']}) is damaged: its map is "
                f"relative to a parent, and {chain['problem']}"
            )
        for d in r.damaged_snapshots:
            if d.map_unreadable:
                print(f"  snapshot {d.name} ({d.id}) is damaged: its block map is unreadable")
                continue
            offsets = ", ".join(str(o) for o in d.offsets[:20])
            more = f" and {len(d.offsets) - 20} more" if len(d.offsets) > 20 else ""
            print(f"  snapshot {d.name} ({d.id}) is damaged at offset {offsets}{more}")
        if r.repaired:
            print("  repaired: " + ", ".join(f"{k} {v}" for k, v in r.repaired.items()))
    for problem in report.problems:
        print(f"store: {problem}")
    print("store ok" if report.ok else "store DAMAGED: see above")
