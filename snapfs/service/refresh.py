"""Refresh of a read-only region (disaster recovery, issue 19): what the primary publishes
in the bucket after the attach shows up here, what it deletes goes.

A region attached `--read-only` (`snapfs region attach ... --read-only`) is a view of a
bucket another store owns (service/regionadmin.py, objects/s3mirror.py). `RegionRefresher`,
a task of the mount, re-lists `meta/snapshots/` every `refresh` seconds (the catalogue
row's; 30 by default):

- a snapshot whose manifest is gone was deleted on the primary: it leaves the namespace
  (`Store.vanished`); one open for reading, or read by a copy out of the region, is only
  hidden and keeps reading until closed, from the packs its blocks were in (the primary
  keeps a dead pack for its grace period, 15 minutes, and a block it repacked is found in
  the new pack's trailer: objects/s3mirror.py);
- a new manifest (its ETag not seen yet) is fetched and opened; its blocks are located
  (the locations it records, else the packs' trailers: regionadmin.locate_blocks) and must
  all be in the bucket, else it waits for the next refresh (a replica may bring a manifest
  before its packs); then its locations are recorded (`PackedS3Backend.adopt`), its row
  (hidden), block rows and map committed to the local index in batches sized by the loop
  budget (stalls.BatchSizer), it is unhidden, and it appears;
- a changed manifest of a snapshot here (renamed, new description, retention or tags, its
  blocks repacked elsewhere) updates that snapshot's metadata and its blocks' locations.

Listing, fetching, opening and locating run in worker threads under the region's I/O
limiter; the index and the namespace change on the trio thread, in batches with a
checkpoint between them.
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from snapfs import workers
from snapfs.errors import SnapfsError
from snapfs.meta.index import NewBlock, RestoredSnapshot
from snapfs.objects.s3mirror import ReadOnlyS3Backend
from snapfs.objects.s3packs import PACKS_PREFIX, PackedS3Backend, PackLocation, TrailerSealer
from snapfs.objects.stores import BLOCKS_PREFIX
from snapfs.service import manifests, regionadmin
from snapfs.service.snapshots import Snapshot
from snapfs.stalls import BatchSizer

if TYPE_CHECKING:
    from snapfs.meta.keys import KeyRing
    from snapfs.service.region import Region
    from snapfs.service.store import Store

log = logging.getLogger(__name__)

DEFAULT_REFRESH = 30.0  # seconds between re-listings of a read-only region's manifests
FETCH_THREADS = 16
INSERT_BATCH = 2048  # first batch of map rows a new snapshot's insert commits at once


@dataclass
class Fetched:
    """Manifests opened and located in a worker thread, for the trio thread to apply."""

    docs: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> manifest JSON
    waiting: list[str] = field(default_factory=list)  # "id: why", retried next time
    located: dict[str, PackLocation] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


class RegionRefresher:
    """Keeps a read-only region's snapshots the ones its bucket's manifests describe."""

    def __init__(self, store: Store, region: Region, every: float, ring: KeyRing):
        self.store = store
        self.region = region
        self.every = every
        self.ring = ring
        backend = region.backend
        assert isinstance(backend, PackedS3Backend) and isinstance(backend.packs, ReadOnlyS3Backend)
        # The region's prefix, sharing the backend's client and its interrupt (unmount).
        self.root = backend.packs.sibling("")
        self.manifests = self.root.sibling("meta/" + manifests.SNAPSHOTS)
        self.seen: dict[str, str] = {}  # snapshot id -> the tag of its manifest applied here
        self._told: set[str] = set()  # why manifests wait, each logged once (refresh: 1 s)

    async def run(self) -> None:
        while not self.region.closed:
            try:
                await self.refresh()
            except SnapfsError as exc:  # the bucket did not answer, a key is missing, ...
                log.warning("region %s: refresh from the bucket failed (%s); again in %.0f s",
                            self.region.name, exc, self.every)  # fmt: skip
            except Exception:
                log.exception("region %s: refresh failed; again in %.0f s",
                              self.region.name, self.every)  # fmt: skip
            await trio.sleep(self.every)

    async def _io(self, fn: Any, *args: Any) -> Any:
        return await workers.run_sync(fn, *args, limiter=self.region.io_limiter)

    async def refresh(self) -> None:
        """One round: deletions, then changes and new snapshots."""
        listed: dict[str, str] = await self._io(self._list)
        if self.region.closed:
            return
        for snap in [s for s in self.region.snapshots.values() if s.id not in listed]:
            log.info("region %s: snapshot %s (%s) was deleted on the primary",
                     self.region.name, snap.name, snap.id)  # fmt: skip
            await self.store.vanished(snap)
        self.seen = {k: v for k, v in self.seen.items() if k in listed}
        wanted = {k: v for k, v in listed.items() if self.seen.get(k) != v}
        if not wanted:
            return
        self.ring.prime()  # encrypted manifests and trailers are opened in worker threads
        backend = self.region.backend
        sealer = backend.sealer if isinstance(backend, PackedS3Backend) else None
        fetched: Fetched = await self._io(self._fetch, sorted(wanted), sealer)
        for reason in set(fetched.waiting) - self._told:
            log.info("region %s: not shown yet: %s", self.region.name, reason)
        self._told = set(fetched.waiting)
        added = changed = 0
        for snapshot_id, doc in fetched.docs.items():
            if self.region.closed:
                return
            done = await self._apply(doc, fetched)
            if done:
                self.seen[snapshot_id] = wanted[snapshot_id]
                added += done == "added"
                changed += done == "changed"
            await trio.sleep(0)  # requests in between snapshots
        if added or changed:
            log.info("region %s: refreshed from the bucket: %d snapshots new, %d changed",
                     self.region.name, added, changed)  # fmt: skip

    # --- worker threads ----------------------------------------------------------------------

    def _list(self) -> dict[str, str]:
        return dict(self.manifests.tagged_keys())

    def _fetch(self, ids: list[str], sealer: TrailerSealer | None) -> Fetched:
        fetched = Fetched()

        def get(snapshot_id: str) -> bytes | None:
            try:
                return self.manifests.get(snapshot_id)
            except FileNotFoundError:  # deleted since the listing: the next one says so
                return None

        with concurrent.futures.ThreadPoolExecutor(FETCH_THREADS) as pool:
            blobs = dict(zip(ids, pool.map(get, ids), strict=True))
        found = {k: v for k, v in blobs.items() if v is not None}
        docs, report = manifests.decode_all(
            self.region.name, found, manifests.key_lookup(self.ring)
        )
        fetched.waiting += report.skipped
        if not docs:
            return fetched
        legacy = set(self.root.sibling(BLOCKS_PREFIX).keys())
        fetched.sizes = dict(self.root.sibling(PACKS_PREFIX).sized_keys())
        assert sealer is not None
        located = regionadmin.locate_blocks(self.root, docs, legacy, fetched.sizes, sealer)
        for doc in docs:
            needed = manifests.needed_blocks(doc)
            missing = sum(1 for key in needed if key not in legacy and key not in located)
            if missing:
                fetched.waiting.append(
                    f"{doc['name']} ({doc['id']}): {missing} of its blocks are not in the bucket"
                )
                continue
            fetched.docs[doc["id"]] = doc
            fetched.located.update((k, located[k]) for k in needed if k in located)
        return fetched

    # --- the trio thread ---------------------------------------------------------------------

    async def _apply(self, doc: dict[str, Any], fetched: Fetched) -> str | None:
        """A fetched manifest into the index and the namespace: "added", "changed", "same"
        (its locations recorded again), "hidden" (deleted here, still read), or None when it
        has to wait (its name is taken here, for now)."""
        region = self.region
        backend = region.backend
        assert isinstance(backend, PackedS3Backend)  # a read-only region is a bucket's
        locations = {
            key: fetched.located[key]
            for key in manifests.needed_blocks(doc)
            if key in fetched.located
        }
        snap = self.store.by_id.get(doc["id"])
        if snap is not None and snap.region is region:
            if snap.deleted:
                return "hidden"  # gone here while still read: it is not shown again
            await self._io(backend.adopt, locations, fetched.sizes)
            updated = self._update(snap, doc)
            return None if updated is None else "changed" if updated else "same"
        # Its locations first, then its rows (hidden until complete), then its name: a stop
        # after the locations leaves only locations no row names, which a later refresh
        # records again.
        await self._io(backend.adopt, locations, fetched.sizes)
        if doc["name"] in region.snapshots:
            log.info("region %s: %s (%s) waits: the name is still %s's here", region.name,
                     doc["name"], doc["id"], region.snapshots[doc["name"]].id)  # fmt: skip
            return None
        await self._insert(doc)
        row = region.index.snapshot_row(doc["id"])
        assert row is not None
        new = Snapshot.from_row(row, region)
        self.store.appeared(new)
        log.info("region %s: snapshot %s (%s) appeared in the bucket", region.name, new.name,
                 new.id)  # fmt: skip
        return "added"

    async def _insert(self, doc: dict[str, Any]) -> None:
        """A new snapshot's rows, its map in batches sized by the loop budget (a snapshot of
        100 000 blocks is seconds of inserts): hidden (`deleted = 1`) until its whole map is
        in, so that a stop meanwhile leaves what the next mount's recovery removes, and a
        failure here what the next refresh completes (the map rows are upserts)."""
        region = self.region
        restored = manifests.restored_snapshot(doc)
        if region.index.snapshot_row(doc["id"]) is None:
            hidden = RestoredSnapshot(
                row={**restored.row, "deleted": 1},
                blocks=[],
                tags=restored.tags,
                key_id=restored.key_id,
                bases=restored.bases,
            )
            region.index.restore({}, [hidden])
        # The bases' rows are referenced only once their deltas' rows are in: pinned, so that
        # the collector does not take them meanwhile.
        held = [base[0] for base in restored.bases if region.hold_base(base[0])]
        try:
            sizer = BatchSizer(INSERT_BATCH)
            rows = restored.blocks
            at = 0
            while at < len(rows):
                chunk = rows[at : at + sizer.start()]
                region.index.commit_blocks(
                    doc["id"],
                    [NewBlock(bid, plain, stored, codec, restored.key_id, base)
                     for _, bid, plain, stored, codec, base in chunk],
                    [(no, bid) for no, bid, *_ in chunk],
                    {},
                )  # fmt: skip
                sizer.done()
                at += len(chunk)
                await trio.sleep(0)
            region.index.update_snapshot(doc["id"], deleted=0)
        finally:
            for base_id in held:
                region.release_base(base_id)

    def _update(self, snap: Snapshot, doc: dict[str, Any]) -> bool | None:
        """The metadata a primary may change of a sealed snapshot: name, description,
        retention, tags. Whether any changed; None if the new name is taken here for now
        (retried)."""
        region = self.region
        changed = doc["name"] != snap.name
        if not self.store.renamed_elsewhere(snap, doc["name"]):
            return None
        fields = {
            name: doc[name]
            for name in ("description", "retention_days")
            if doc[name] != getattr(snap, name)
        }
        if fields:
            changed = True
            region.index.update_snapshot(snap.id, **fields)
            for name, value in fields.items():
                setattr(snap, name, value)
        return region.index.replace_tags(snap.id, doc["tags"]) or changed
