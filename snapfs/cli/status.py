"""`snapfs status`: what a store holds, read straight from its indexes.

It opens the databases read-only (WAL lets it read while the daemon writes), so it works
whether or not the store is mounted. The JSON form is a stable interface for scripts:

    {"store": PATH, "block_size": N, "regions": [
        {"name": R, "backend": "local" | "s3://BUCKET/PREFIX[ at ENDPOINT]",
         "read_only": true | false (attached with --read-only),
         "shared_index": null | "postgresql://..." (a region shared with other stores
                         through that database, without its password), "snapshots": [
            {"name", "id", "status", "progress", "size", "allocated_bytes", "stored_bytes",
             "encrypted", "kms_key_id", "source_snapshot_id", "source_region",
             "transferred_bytes", "description", "tags": {K: V}, "retention_days",
             "expires_at", "error", "created_at", "sealed_at"}, ...],
         "totals": {"snapshots", "logical_bytes", "allocated_bytes", "unique_bytes",
                    "stored_bytes", "dedup_ratio", "compression_ratio"},
         "packs": null | {"count", "bytes", "live_bytes"} (a bucket region's pack objects:
                  bytes - live_bytes waits for a repack or for its pack's grace)}]}

Times are seconds since the epoch (`expires_at` is null without a retention); `progress` is
0-100 like `user.snapfs.progress`; keys are only ever added, never renamed or removed.

`allocated_bytes` counts non-hole blocks as written (what `du` shows); `unique_bytes` is the
plaintext of the distinct blocks kept; `dedup_ratio` = allocated / unique and
`compression_ratio` = unique / stored. A snapshot's `stored_bytes` counts every block it
references, including blocks it shares with others.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

from snapfs.errors import IndexDamaged, NotFound, RegionNotFound, StoreNotFound
from snapfs.meta import db as dbutil
from snapfs.meta.index import RegionIndex
from snapfs.model.clock import expires_at, iso8601
from snapfs.model.states import SnapshotStatus


def _ratio(num: int, den: int) -> float:
    return round(num / den, 3) if den else 1.0


def _backend(row: dict[str, Any]) -> str:
    """`local`, or where an S3 region lives (`s3://BUCKET/PREFIX at ENDPOINT`)."""
    backend = row.get("backend") or "local"
    endpoint = row.get("endpoint")
    return f"{backend} at {endpoint}" if endpoint else backend


def collect(
    store_path: Path, region: str | None = None, snapshot: str | None = None
) -> dict[str, Any]:
    store_db = store_path / "store.db"
    if not store_db.exists():
        raise StoreNotFound(f"no snapfs store at {store_path}")
    catalogue = dbutil.connect(store_db, readonly=True)
    try:
        block_size = int(dbutil.get_meta(catalogue, "block_size", "0") or 0)
        rows = list(catalogue["regions"].rows_where(order_by="id"))
    finally:
        catalogue.close()
    names = [r["name"] for r in rows]
    backends = {r["name"]: _backend(r) for r in rows}
    read_only = {r["name"]: bool(r.get("read_only")) for r in rows}
    shared = {r["name"]: r.get("index_url") for r in rows}
    if region is not None:
        if region not in names:
            raise RegionNotFound(f"region {region!r} does not exist")
        names = [region]
    regions = []
    for name in names:
        regions.append(_region(store_path / "regions" / name, name, block_size, snapshot))
        regions[-1]["backend"] = backends[name]
        regions[-1]["read_only"] = read_only[name]
        regions[-1]["shared_index"] = shared[name]
        regions[-1]["packs"] = _packs(store_path / "regions" / name)
    if snapshot is not None and not regions[0]["snapshots"]:
        raise NotFound(f"snapshot {snapshot!r} does not exist in region {region}")
    from snapfs import __version__

    return {
        "version": __version__,
        "store": str(store_path),
        "block_size": block_size,
        "regions": regions,
    }


def _progress(row: dict[str, Any], job: dict[str, Any] | None) -> float:
    """Like user.snapfs.progress; a `cp` copy in progress reports 0 here."""
    if row["status"] == SnapshotStatus.AVAILABLE:
        return 100.0
    if job is not None and job["total_blocks"]:
        return round(100.0 * job["done_blocks"] / job["total_blocks"], 2)
    return 0.0


def _region(directory: Path, name: str, block_size: int, only: str | None) -> dict[str, Any]:
    try:
        index = RegionIndex(directory / "index.db", readonly=True)
    except sqlite3.Error as exc:
        raise IndexDamaged(f"region {name}: index unreadable: {exc}") from None
    try:
        with index.db.snapshot():  # every figure from one committed state of the index
            return _region_figures(index, name, block_size, only)
    finally:
        index.close()


def _region_figures(
    index: RegionIndex, name: str, block_size: int, only: str | None
) -> dict[str, Any]:
    stored = index.snapshot_stored_bytes()
    jobs = {job["dst_snapshot_id"]: job for job in index.copy_jobs()}
    stats = index.stats()
    snapshots = []
    for row in index.snapshots():
        if only is not None and row["name"] != only:
            continue
        allocated = min(row["allocated_blocks"] * block_size, row["size"])
        snapshots.append(
            {
                "name": row["name"],
                "id": row["id"],
                "status": row["status"],
                "progress": _progress(row, jobs.get(row["id"])),
                "size": row["size"],
                "allocated_bytes": allocated,
                "stored_bytes": stored.get(row["id"], 0),
                "encrypted": bool(row["encrypted"]),
                "kms_key_id": row["kms_key_id"],
                "source_snapshot_id": row["source_snapshot_id"],
                "source_region": row["source_region"],
                "transferred_bytes": row["transferred_bytes"],
                "description": row["description"],
                "tags": index.tags(row["id"]),
                "retention_days": row["retention_days"],
                "expires_at": expires_at(row["created_at"], row["retention_days"]),
                "error": row["error"] if row["status"] == SnapshotStatus.FAILED else None,
                "created_at": row["created_at"],
                # while `creating`, sealed_at is the close mark (see SnapshotWriter.flush)
                "sealed_at": row["sealed_at"]
                if row["status"] == SnapshotStatus.AVAILABLE
                else None,
            }
        )
    all_rows = index.snapshots()
    totals = {
        "snapshots": len(all_rows),
        "logical_bytes": sum(r["size"] for r in all_rows),
        "allocated_bytes": stats.referenced_plain_bytes,
        "unique_bytes": stats.plain_bytes,
        "stored_bytes": stats.stored_bytes,
        "dedup_ratio": _ratio(stats.referenced_plain_bytes, stats.plain_bytes),
        "compression_ratio": _ratio(stats.plain_bytes, stats.stored_bytes),
    }
    return {"name": name, "snapshots": snapshots, "totals": totals}


def _packs(directory: Path) -> dict[str, int] | None:
    """A bucket region's pack objects: how many, their bytes, the live share of them."""
    from snapfs.objects.s3packs import pack_summary
    from snapfs.objects.stores import PACKED_STATE

    try:
        summary = pack_summary(directory / PACKED_STATE)
    except sqlite3.Error:
        return None
    if summary is None:
        return None
    return {"count": summary.packs, "bytes": summary.bytes, "live_bytes": summary.live_bytes}


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


# Every attribute of a snapshot, in the order `snapfs status FILE` shows them: the computed
# ones are not listed by listxattr (see xattrs.py), so they are read by name.
SNAPSHOT_ATTRIBUTES = (
    "id", "status", "progress", "error", "source_snapshot_id", "source_region",
    "transferred_bytes", "encrypted", "kms_key_id", "description", "retention_days",
    "expires_at",
)  # fmt: skip


def render_attributes(path: Path, data: dict[str, Any]) -> None:
    """One snapshot: its sizes, then every attribute as `getfattr -n NAME` would show it."""
    snap = data["regions"][0]["snapshots"][0]
    print(f"# {path}")
    print(f"size={snap['size']} allocated={snap['allocated_bytes']} stored={snap['stored_bytes']}")
    for name in SNAPSHOT_ATTRIBUTES:
        try:
            value = os.getxattr(path, "user.snapfs." + name).decode()
        except OSError:  # not set (a description), or not meaningful (error while fine)
            continue
        print(f'user.snapfs.{name}="{value}"')
    for key, value in snap["tags"].items():
        print(f'user.tag.{key}="{value}"')


def render(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(f"store {data['store']} (block size {human(data['block_size'])})")
    if not data["regions"]:
        console.print("no regions yet: mkdir MOUNTPOINT/<region> creates one")
    for region in data["regions"]:
        where = "" if region["backend"] == "local" else f" on {region['backend']}"
        if region.get("read_only"):
            where += " (read-only)"
        if region.get("shared_index"):
            where += f", shared through {region['shared_index']}"
        table = Table(title=f"region {region['name']}{where}", title_justify="left")
        for column in (
            "snapshot",
            "id",
            "status",
            "progress",
            "size",
            "allocated",
            "stored",
            "encrypted",
            "expires",
            "tags",
        ):
            table.add_column(
                column,
                justify="right"
                if column in ("progress", "size", "allocated", "stored")
                else "left",
            )
        for snap in region["snapshots"]:
            table.add_row(
                snap["name"],
                snap["id"],
                snap["status"],
                f"{snap['progress']:g}%",
                human(snap["size"]),
                human(snap["allocated_bytes"]),
                human(snap["stored_bytes"]),
                "yes" if snap["encrypted"] else "no",
                iso8601(snap["expires_at"]) if snap["expires_at"] else "",
                " ".join(f"{k}={v}" for k, v in snap["tags"].items()),
            )
        console.print(table)
        t = region["totals"]
        console.print(
            f"  {t['snapshots']} snapshots, {human(t['logical_bytes'])} logical, "
            f"{human(t['allocated_bytes'])} allocated, {human(t['unique_bytes'])} unique, "
            f"{human(t['stored_bytes'])} stored; dedup {t['dedup_ratio']:g}x, "
            f"compression {t['compression_ratio']:g}x"
        )
        packs = region.get("packs")
        if packs:
            live = 100.0 * packs["live_bytes"] / packs["bytes"] if packs["bytes"] else 100.0
            console.print(
                f"  {packs['count']} pack objects in the bucket, {human(packs['bytes'])} "
                f"({live:.0f}% live)"
            )
        console.print()


# --- monitoring: `snapfs status --metrics` and `--watch` (issue 18) ----------------------


def _region_xattr(mountpoint: Path | None, region: str, name: str) -> int | None:
    """A region's live counter from the mount (copies_running, copies_queued), or None."""
    if mountpoint is None:
        return None
    try:
        return int(os.getxattr(mountpoint / region, f"user.snapfs.{name}"))
    except (OSError, ValueError):
        return None


def metrics(data: dict[str, Any], mountpoint: Path | None) -> str:
    """The store in the Prometheus text format (version 0.0.4), for node_exporter's
    textfile collector or any scraper that runs a command: no port to open in the
    daemon, and the numbers are the ones `snapfs status --json` shows."""
    lines = [
        "# HELP snapfs_info The snapfs version serving this store.",
        "# TYPE snapfs_info gauge",
        f'snapfs_info{{version="{data["version"]}",store="{data["store"]}"}} 1',
        "# HELP snapfs_up 1 if the store is mounted.",
        "# TYPE snapfs_up gauge",
        f"snapfs_up {int(mountpoint is not None)}",
    ]
    try:
        disk = os.statvfs(data["store"])
        lines += [
            "# HELP snapfs_store_free_bytes Free bytes on the store's file system.",
            "# TYPE snapfs_store_free_bytes gauge",
            f"snapfs_store_free_bytes {disk.f_bavail * disk.f_frsize}",
        ]
    except OSError:
        pass
    series: dict[str, list[str]] = {}

    def add(name: str, kind: str, help_text: str, labels: str, value: float) -> None:
        if name not in series:
            series[name] = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        shown = str(int(value)) if float(value).is_integer() else repr(float(value))
        series[name].append(f"{name}{{{labels}}} {shown}")

    for region in data["regions"]:
        r = f'region="{region["name"]}"'
        by_status: dict[str, int] = {}
        copying = 0
        for snap in region["snapshots"]:
            by_status[snap["status"]] = by_status.get(snap["status"], 0) + 1
            copying += snap["status"] == SnapshotStatus.COPYING
        for status in ("creating", "copying", "available", "failed"):
            add("snapfs_snapshots", "gauge", "Snapshots by status.",
                f'{r},status="{status}"', by_status.get(status, 0))  # fmt: skip
        running = _region_xattr(mountpoint, region["name"], "copies_running")
        queued = _region_xattr(mountpoint, region["name"], "copies_queued")
        add("snapfs_copies_running", "gauge", "Copy jobs running into the region.", r,
            copying if running is None else running)  # fmt: skip
        add("snapfs_copies_queued", "gauge", "Copy jobs waiting for a slot.", r, queued or 0)
        add("snapfs_transferred_bytes", "gauge",
            "Bytes the region's snapshots' copies transferred into it.", r,
            sum(s["transferred_bytes"] for s in region["snapshots"]))  # fmt: skip
        totals = region["totals"]
        for key in ("logical_bytes", "allocated_bytes", "unique_bytes", "stored_bytes"):
            add(f"snapfs_{key}", "gauge", f"The region's {key.replace('_', ' ')}.", r,
                totals[key])  # fmt: skip
        packs = region.get("packs")
        if packs:
            add("snapfs_pack_objects", "gauge", "Pack objects of the region in its bucket.", r,
                packs["count"])  # fmt: skip
            add("snapfs_pack_bytes", "gauge", "Bytes of the region's pack objects.", r,
                packs["bytes"])  # fmt: skip
            add("snapfs_pack_live_bytes", "gauge",
                "Bytes of blocks the region's packs still hold for it.", r,
                packs["live_bytes"])  # fmt: skip
    for block in series.values():
        lines += block
    return "\n".join(lines) + "\n"


def copies_table(data: dict[str, Any]):  # -> rich Table
    """The copies running, queued or just ended, one row each."""
    from rich.table import Table

    table = Table(title="copies", title_justify="left")
    for column in ("region", "snapshot", "source", "status", "progress", "transferred"):
        table.add_column(column, justify="right" if column in ("progress", "transferred")
                         else "left")  # fmt: skip
    for region in data["regions"]:
        for snap in region["snapshots"]:
            if snap["status"] != SnapshotStatus.COPYING:
                continue
            table.add_row(
                region["name"], snap["name"],
                f"{snap['source_region']}/{snap['source_snapshot_id']}",
                snap["status"], f"{snap['progress']:.1f}%", human(snap["transferred_bytes"]),
            )  # fmt: skip
    return table


def copies_left(data: dict[str, Any]) -> int:
    return sum(
        s["status"] == SnapshotStatus.COPYING for r in data["regions"] for s in r["snapshots"]
    )
