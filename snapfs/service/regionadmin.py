"""`snapfs region create` and `snapfs region attach`: regions on object storage.

Both work on a mounted store (the CLI sets a control attribute on the mount's root, and the
daemon does the work, so `ls MNT` shows the region at once) or on an unmounted one (the CLI
opens the store itself, holding its lock like a mount would).

- create: the bucket is made if missing; the prefix must not hold a region yet (its
  `meta/region.json` is the claim), else that region is refused here and should be attached.
- attach: `meta/region.json` names the region (its name is bound into every encrypted
  object's and manifest's authentication, so the name must be the same) and its block size
  (the store's must match; a fresh store takes it). Every manifest is read and opened (keys
  of encrypted snapshots must have been imported with `snapfs key import`), the bucket's
  block objects are listed, and the index is rebuilt from the manifests whose blocks are all
  there. The bucket is then this store's: one store owns a region's prefix at a time.
- attach `--read-only`: the same rebuild, but the bucket stays its owner's (a disaster-
  recovery host beside a primary that goes on writing, or a replica of its bucket): the
  region refuses every change, never deletes, uploads or publishes anything there, and
  follows what the owner publishes every `--refresh` seconds (refresh.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from snapfs.blocks.packkeys import TrailerKeys
from snapfs.errors import (
    InvalidBlockSize,
    InvalidParameter,
    RegionAlreadyExists,
    RegionIdMismatch,
    RegionMetadataMalformed,
    RegionNotFound,
)
from snapfs.meta.index import RegionIndex
from snapfs.objects.s3 import S3Backend, S3Location
from snapfs.objects.s3mirror import ReadOnlyS3Backend
from snapfs.objects.s3packs import (
    PACKS_PREFIX,
    PackedS3Backend,
    PackLocation,
    TrailerSealer,
    read_trailer,
)
from snapfs.objects.stores import BLOCKS_PREFIX, PACKED_STATE
from snapfs.service import manifests

if TYPE_CHECKING:
    from snapfs.meta.keys import KeyRing

log = logging.getLogger(__name__)

ADMIN_WAIT = 20.0  # seconds an interactive command retries a server that does not answer
FETCH_THREADS = 16
CREATE_ATTR = "user.snapfs.create_region"
ATTACH_ATTR = "user.snapfs.attach_region"


MAX_REFRESH = 86_400.0  # seconds: a read-only region re-reads its manifests at least daily


def _meta(location: S3Location) -> S3Backend:
    return S3Backend(location, "meta/", max_wait=ADMIN_WAIT)


def _bucket(location: S3Location, read_only: bool) -> S3Backend:
    """The region's prefix; one that refuses every change for a read-only attach."""
    if read_only:
        return ReadOnlyS3Backend(location, max_wait=ADMIN_WAIT)
    return S3Backend(location, max_wait=ADMIN_WAIT)


def check_refresh(value: object) -> float:
    """A read-only region's refresh interval: seconds, more than 0, at most a day."""
    seconds = -1.0
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            seconds = float(value)
    if not 0 < seconds <= MAX_REFRESH:
        raise InvalidParameter(
            f"--refresh is seconds, more than 0 and at most {MAX_REFRESH:.0f}, got {value!r}"
        )
    return seconds


def read_region_document(meta: S3Backend) -> dict[str, Any] | None:
    try:
        doc = json.loads(meta.get(manifests.REGION_KEY))
    except FileNotFoundError:
        return None
    if doc.get("format") != manifests.REGION_FORMAT:
        raise RegionMetadataMalformed(
            f"s3://{meta.bucket}/{meta.prefix}{manifests.REGION_KEY} is not snapfs region metadata"
        )
    return doc


def claim_location(
    location: S3Location, name: str, block_size: int, *, shared: bool = False
) -> None:
    """Make the bucket if needed and write the new region's metadata at its prefix
    (`shared`: several stores write it, through a ledger in PostgreSQL)."""
    meta = _meta(location)
    meta.ensure_bucket()
    existing = read_region_document(meta)
    if existing is not None:
        raise RegionAlreadyExists(
            f"{location} already holds region {existing.get('name')!r}: use "
            "`snapfs region attach` to bring it into this store"
        )
    doc = {
        "format": manifests.REGION_FORMAT,
        "version": manifests.VERSION,
        "name": name,
        "block_size": block_size,
        "settings": {},
    }
    if shared:
        doc["shared"] = True
    meta.put(manifests.REGION_KEY, json.dumps(doc, indent=1).encode())


def region_block_size(location: S3Location, name: str) -> int:
    """The block size of the region at `location`, after checking it is region `name`."""
    doc = read_region_document(_meta(location))
    if doc is None:
        raise RegionNotFound(f"{location} holds no snapfs region")
    if doc.get("name") != name:
        raise RegionIdMismatch(
            f"{location} holds region {doc.get('name')!r}, not {name!r} (a region keeps its "
            "name: it is bound into the authentication of its encrypted data)"
        )
    return int(doc["block_size"])


def rebuild_from_bucket(
    location: S3Location,
    name: str,
    block_size: int,
    index_path: Path,
    ring: KeyRing | None,
    read_only: bool = False,
) -> manifests.RebuildReport:
    """Build a new region index at `index_path` from the bucket (worker thread); only
    reads the bucket (`read_only`: through a backend that refuses any change)."""
    meta = _bucket(location, read_only).sibling("meta/")
    doc = read_region_document(meta)
    if region_block_size(location, name) != block_size:
        raise InvalidBlockSize(
            f"region {name} uses {doc['block_size'] if doc else '?'}-byte blocks, this store "
            f"{block_size}: attach it to a new store"
        )
    assert doc is not None
    keys = [k for k in meta.keys() if k.startswith(manifests.SNAPSHOTS)]  # noqa: SIM118
    with concurrent.futures.ThreadPoolExecutor(FETCH_THREADS) as pool:
        blobs = dict(zip(keys, pool.map(meta.get, keys), strict=True))
    found = {k[len(manifests.SNAPSHOTS) :]: data for k, data in blobs.items()}
    keys_for = manifests.key_lookup(ring)
    docs, report = manifests.decode_all(name, found, keys_for)
    region_store = _bucket(location, read_only)
    legacy = set(region_store.sibling(BLOCKS_PREFIX).keys())
    sizes = dict(region_store.sibling(PACKS_PREFIX).sized_keys())
    located = locate_blocks(region_store, docs, legacy, sizes, TrailerKeys(keys_for))
    settings = {str(k): str(v) for k, v in doc.get("settings", {}).items()}
    # Locations first, then the index rows naming them (the region's write order).
    packed = PackedS3Backend(region_store, index_path.parent / PACKED_STATE)
    try:
        packed.adopt(located, sizes)
    finally:
        packed.close()
    index = RegionIndex(index_path)
    try:
        return manifests.rebuild(index, settings, docs, report, legacy | set(located))
    finally:
        index.close()


def locate_blocks(
    region_store: S3Backend,
    docs: list[dict[str, Any]],
    legacy: set[str],
    sizes: dict[str, int],
    sealer: TrailerSealer,
) -> dict[str, PackLocation]:
    """Where the manifests' packed blocks are: the location a manifest records where that
    pack is in the bucket, else (a pack repacked since the manifest was written) what the
    trailers of the bucket's packs say. Blocks found nowhere are left out."""
    located: dict[str, PackLocation] = {}
    for doc in docs:
        for key, (pack, offset, length) in doc.get("locations", {}).items():
            if offset + length <= sizes.get(pack, -1):
                located[key] = PackLocation(pack, offset, length)
    wanted = {key for doc in docs for key in manifests.needed_blocks(doc)}
    missing = wanted - legacy - set(located)
    if not missing:
        return located
    packs = region_store.sibling(PACKS_PREFIX)
    named = {where.pack for where in located.values()}
    # Packs no manifest names first (a repack's new ones), then the others, until found.
    order = sorted(set(sizes) - named) + sorted(named & set(sizes))
    read = 0
    with concurrent.futures.ThreadPoolExecutor(FETCH_THREADS) as pool:
        for start in range(0, len(order), FETCH_THREADS * 4):
            batch = order[start : start + FETCH_THREADS * 4]
            for trailer in pool.map(lambda pack: read_trailer(packs, pack, sealer), batch):
                for key, offset, length in trailer.entries:
                    if key in missing:
                        located[key] = PackLocation(trailer.pack, offset, length)
                        missing.discard(key)
                for note in trailer.unreadable:
                    log.warning("pack %s: %s", trailer.pack, note)
            read += len(batch)
            if not missing:
                break
    log.info("rebuild: blocks looked up in the trailers of %d packs, %d not found",
             read, len(missing))  # fmt: skip
    return located


# --- regions shared by several stores (issue 19) ---------------------------------------------


def create_shared(location: S3Location, name: str, block_size: int, url: str) -> None:
    """Worker thread: a shared region's ledger in the database at `url` (RegionAlreadyExists
    if it has one of that name) and its bucket prefix claimed; the ledger's row goes again
    if the bucket refuses, so a retry can succeed."""
    from snapfs.meta.pg import PgRegionIndex

    index = PgRegionIndex.create(url, name, created_at=time.time())
    try:
        index.set_setting("block_size", str(block_size))
        claim_location(location, name, block_size, shared=True)
    except BaseException:
        index.drop_region()
        raise
    finally:
        index.close()


def check_shared(location: S3Location, name: str, block_size: int, url: str) -> None:
    """Worker thread: the shared region `name` is in the database at `url` and its bucket,
    with this store's block size (a store's regions all dedup with each other)."""
    from snapfs.meta.pg import PgRegionIndex

    index = PgRegionIndex.attach(url, name)
    try:
        theirs = int(index.get_setting("block_size") or 0)
    finally:
        index.close()
    if region_block_size(location, name) != theirs:
        raise RegionMetadataMalformed(
            f"{location} and the shared index disagree on region {name}'s block size"
        )
    if theirs != block_size:
        raise InvalidParameter(
            f"shared region {name} uses {theirs}-byte blocks and this store {block_size}: "
            "attach it from a store of the same block size (a new store takes the region's)"
        )


def is_shared(location: S3Location, name: str) -> bool:
    """Whether the bucket prefix holds shared region `name` (made with --index)."""
    doc = read_region_document(_meta(location))
    return doc is not None and doc.get("name") == name and bool(doc.get("shared"))


def rebuild_ledger(
    location: S3Location,
    name: str,
    block_size: int,
    url: str,
    work: Path,
    keys: KeyRing | None,
) -> manifests.RebuildReport:
    """Worker thread: a shared region whose database was lost, made again in the (empty)
    database at `url` from its bucket alone: the manifests (and pack trailers) rebuild an
    index in `work` as a disaster-recovery attach does, then the ledger is filled from it in
    one transaction (meta/ledger.py, `restore`). The region's row goes again if that fails."""
    from snapfs.meta.ledger import Ledger, SharedBlock
    from snapfs.meta.pg import PgRegionIndex

    report = rebuild_from_bucket(location, name, block_size, work / "index.db", keys, False)
    local = RegionIndex(work / "index.db")
    packed = PackedS3Backend(S3Backend(location, max_wait=ADMIN_WAIT), work / PACKED_STATE,
                             readonly=True)  # fmt: skip
    index = PgRegionIndex.create(url, name, created_at=time.time())
    try:
        snapshots = []
        named: set[bytes] = set()
        for row in local.snapshots():
            rows = local.block_map_from(row["id"], 0, 1 << 40)
            named.update(bid for _, bid in rows)
            snapshots.append((row, local.tags(row["id"]), rows))
        known = local.block_rows(sorted(named))
        bases = {b.base_id for b in known.values() if b.base_id is not None} - known.keys()
        known.update(local.block_rows(sorted(bases)))
        located, sizes = packed.locations([bid.hex() for bid in known])
        blocks = []
        for bid, block in known.items():
            where = located.get(bid.hex())
            if where is None:  # one-object-per-block layouts predate shared regions
                raise RegionMetadataMalformed(f"block {bid.hex()} of {name} is in no pack")
            blocks.append(SharedBlock(
                bid, block.plain_size, block.stored_size, block.codec, block.key_id,
                block.base_id,
                where.pack, where.offset, where.length, sizes[where.pack],
            ))  # fmt: skip
        settings = {**local.settings(), "block_size": str(block_size)}
        Ledger(index).restore(settings, sizes, blocks, snapshots)
        log.info("rebuilt the shared index of region %s in %s from its bucket: %d snapshots, "
                 "%d blocks in %d packs", name, url.split("@")[-1], len(snapshots),
                 len(blocks), len(sizes))  # fmt: skip
    except BaseException:
        index.drop_region()
        raise
    finally:
        index.close()
        local.close()
        packed.close()
    return report


# --- without a mount ---------------------------------------------------------------------------


def create_offline(
    store_path: Path, name: str, location: S3Location, index: str | None = None
) -> None:
    from snapfs.service.store import Store

    async def run() -> None:
        store = Store(store_path)
        try:
            if index is None:
                await store.create_remote_region(name, location)
            else:
                await store.create_shared_region(name, location, index)
        finally:
            store.close()

    trio.run(run)


def attach_shared_offline(store_path: Path, name: str, location: S3Location, index: str) -> int:
    """Join a shared region without a mount: its snapshots arrive at the next mount (their
    count is returned, from the ledger)."""
    from snapfs.meta.ledger import Ledger
    from snapfs.service.store import Store

    block_size = region_block_size(location, name)

    async def run() -> None:
        store = Store(store_path, block_size=block_size)
        try:
            await store.attach_shared_region(name, location, index)
        finally:
            store.close()

    trio.run(run)
    ledger = Ledger.attach(index, name)
    try:
        return len(ledger.live_snapshots())
    finally:
        ledger.close()


def attach_offline(
    store_path: Path,
    name: str,
    location: S3Location,
    *,
    read_only: bool = False,
    refresh: float | None = None,
) -> manifests.RebuildReport:
    from snapfs.service.store import Store

    block_size = region_block_size(location, name)

    async def run() -> manifests.RebuildReport:
        store = Store(store_path, block_size=block_size)
        try:
            return await store.attach_region(
                name, location, read_only=read_only, refresh=refresh
            )
        finally:
            store.close()

    return trio.run(run)


def request(
    name: str,
    location: S3Location,
    *,
    read_only: bool = False,
    refresh: float | None = None,
    index: str | None = None,
) -> bytes:
    """The control attribute's value for the daemon."""
    data: dict[str, Any] = {"name": name, "backend": location.url, "endpoint": location.endpoint}
    if read_only:
        data |= {"read_only": True, "refresh": refresh}
    if index is not None:
        data["index"] = index
    return json.dumps(data).encode()


def index_option(raw: bytes) -> str | None:
    """A region request's shared index URL (None: the region is this store's alone)."""
    try:
        index = json.loads(raw).get("index")
    except (ValueError, AttributeError):
        raise InvalidParameter("a region request is JSON") from None
    if index is not None and not isinstance(index, str):
        raise InvalidParameter(f"index is a postgresql:// URL, got {index!r}")
    return index


def attach_options(raw: bytes) -> tuple[bool, float | None]:
    """An attach request's read-only flag and refresh interval (None: the default)."""
    try:
        data = json.loads(raw)
        read_only = data.get("read_only", False)
        refresh = data.get("refresh")
    except (ValueError, AttributeError):
        raise InvalidParameter("a region request is JSON") from None
    if not isinstance(read_only, bool):
        raise InvalidParameter(f"read_only is true or false, got {read_only!r}")
    if not read_only or refresh is None:
        return read_only, None  # a refresh only means something to a read-only region
    return read_only, check_refresh(refresh)


def parse_request(raw: bytes) -> tuple[str, S3Location]:
    try:
        data = json.loads(raw)
        return str(data["name"]), S3Location.parse(str(data["backend"]), data.get("endpoint"))
    except (ValueError, KeyError, TypeError):
        raise InvalidParameter(
            'a region request is JSON {"name": N, "backend": "s3://...", "endpoint": URL}'
        ) from None
