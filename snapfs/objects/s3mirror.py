"""A bucket region this store only reads: disaster recovery from a bucket another store owns.

A disaster-recovery host attaches a region `--read-only` from the primary's bucket (or a
replica of it) while the primary goes on writing there. Everything the primary does in the
bucket (new packs, repacks, dead packs deleted after their grace, manifests) must stay the
primary's alone: this store never PUTs or DELETEs an object there, so that it cannot collect
the primary's new objects as orphans or delete a pack a manifest still needs.

- `ReadOnlyS3Backend` is the hard guarantee: the bucket's prefixes as an `S3Backend` whose
  put, delete, delete_many, destroy and ensure_bucket refuse (`ReadOnlyRegion`, EROFS);
  its siblings are read-only too.
- `MirroredPackedS3Backend` is the region's object store over it: reads as a packed region
  reads; a put refuses; deleting does nothing (the local collector drops the index rows a
  vanished snapshot left, and the objects stay the owner's); upkeep and reclaiming do
  nothing. A read that finds its pack gone (the primary repacked the block and deleted the
  old pack after its grace) looks for the block in the trailers of the packs it does not
  know yet, records where it moved, and reads it from there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from snapfs.errors import ReadOnlyRegion
from snapfs.objects.protocol import Buffers
from snapfs.objects.s3 import S3Backend, S3Location
from snapfs.objects.s3packs import PackedS3Backend, PackLocation, read_trailer

if TYPE_CHECKING:
    from snapfs.objects.protocol import ObjectStore

log = logging.getLogger(__name__)


class ReadOnlyS3Backend(S3Backend):
    """A bucket prefix that is only read: every request that would change it refuses."""

    def sibling(self, subdir: str) -> ReadOnlyS3Backend:
        return ReadOnlyS3Backend(
            self.location,
            subdir,
            client=self.client,
            max_wait=self.max_wait,
            interrupted=self._interrupted,
        )

    def _refuse(self, what: str) -> NoReturn:
        raise ReadOnlyRegion(
            f"{what} s3://{self.bucket}/{self.prefix}: the region is attached read-only "
            "here (its bucket belongs to another store)"
        )

    def put(self, key: str, data: Buffers) -> None:
        self._refuse(f"PUT {key} into")

    def delete(self, key: str) -> None:
        self._refuse(f"DELETE {key} from")

    def delete_many(self, keys: Sequence[str], each: Callable[[], None] | None = None) -> None:
        if keys:
            self._refuse(f"DELETE of {len(keys)} objects from")

    def destroy(self) -> None:
        self._refuse("removing every object of")

    def ensure_bucket(self) -> None:
        self._refuse("creating the bucket of")

    def tagged_keys(self) -> Iterator[tuple[str, str]]:
        """Every key under the prefix with a tag that changes when its object does (ETag,
        size, time), page by page: how a refresh tells which manifests changed without
        fetching them."""
        for item in self.listing():
            tag = f"{item.get('ETag', '')}/{item['Size']}/{item.get('LastModified', '')}"
            yield item["Key"][len(self.prefix) :], tag


class MirroredPackedS3Backend(PackedS3Backend):
    """A read-only region's objects: the owner's packs, read and never changed."""

    def __init__(
        self, location_backend: ReadOnlyS3Backend, state_dir: Path, *, readonly: bool = False
    ):
        super().__init__(location_backend, state_dir, readonly=readonly)
        self._searching = threading.Lock()  # one trailer search at a time
        # Where blocks moved, found by a search of a store whose packs.db is read-only
        # (`snapfs check` beside the daemon); a writable one records them in packs.db.
        self._moved: dict[str, PackLocation] = {}

    def put(self, key: str, data: Buffers) -> None:
        raise ReadOnlyRegion(f"block {key}: the region is attached read-only here")

    def sync(self) -> None:
        """Nothing was put: nothing to upload."""

    def delete_many(self, keys: Sequence[str], each: Callable[[], None] | None = None) -> None:
        """Nothing is deleted: the objects are the owner's. Their locations stay in packs.db
        too, so that a block a refresh brings back (a new snapshot sharing it) is found at
        once, and no collection here can race a refresh recording the same block."""
        if each is not None:
            for _ in keys:
                each()

    def maintain(self, *, now: float | None = None) -> int:
        """No pack upkeep: the owner repacks and deletes its dead packs."""
        return 0

    def reclaim_unmapped(self) -> int:
        """Packs no local row names are the owner's (new ones), never strays to delete."""
        return 0

    def destroy(self) -> None:
        raise ReadOnlyRegion("a region attached read-only is not removed from its bucket")

    def pack_problems(self) -> list[str]:
        """Only a pack the bucket holds at another size than recorded. Locations of packs
        the owner has deleted since (repacked, or a deleted snapshot's) stay in packs.db
        and are no problem: check verifies that every block the index names reads."""
        with self._lock:
            rows = self._db.execute("SELECT id, size FROM packs").fetchall()
        present = dict(self.packs.sized_keys())
        return [
            f"pack {pack_id} is {present[pack_id]} bytes in the bucket, {size} recorded"
            for pack_id, size in rows
            if pack_id in present and present[pack_id] != size
        ]

    def locate(self, key: str) -> PackLocation | None:
        moved = self._moved.get(key)
        return moved if moved is not None else super().locate(key)

    def get(self, key: str) -> bytes:
        try:
            return super().get(key)
        except FileNotFoundError:
            if not self._relocate(key):
                raise
        return super().get(key)

    def _relocate(self, key: str) -> bool:
        """Find a block whose pack is gone in the trailers of packs not known here yet (a
        repack's new packs), and record where every block of ours in them is now."""
        before = self.locate(key)
        with self._searching:
            if self.locate(key) != before:
                return True  # another reader's search moved it meanwhile
            sizes = dict(self.packs.sized_keys())
            with self._lock:
                known = {str(p) for (p,) in self._db.execute("SELECT id FROM packs")}
                ours = {
                    bytes(k).hex(): str(p)
                    for k, p in self._db.execute("SELECT key, pack FROM objects")
                }
            known |= {where.pack for where in self._moved.values()}
            moved: dict[str, PackLocation] = {}
            new = sorted(set(sizes) - known)
            for pack in new:
                trailer = read_trailer(self.packs, pack, self.sealer)
                for found, offset, length in trailer.entries:
                    if found in ours and ours[found] not in sizes:
                        moved[found] = PackLocation(pack, offset, length)
            if self.readonly:
                self._moved.update(moved)
            else:
                self.adopt(moved, sizes)
                self._note_packs(new, sizes)
        if moved:
            log.info("found %d blocks in %d packs the primary wrote since",
                     len(moved), len({w.pack for w in moved.values()}))  # fmt: skip
        return key in moved

    def _note_packs(self, packs: list[str], sizes: dict[str, int]) -> None:
        """Packs whose trailers were read: not read again by the next search."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT OR IGNORE INTO packs(id, size, live, created_at) VALUES (?, ?, 0, 0)",
                [(pack, sizes[pack]) for pack in packs],
            )
            self._db.execute("COMMIT")


def open_mirror(
    location: S3Location, state_dir: Path, *, readonly: bool = False, max_wait: float | None = None
) -> MirroredPackedS3Backend:
    """A read-only region's object store (objects/stores.py)."""
    region = ReadOnlyS3Backend(location, max_wait=max_wait)
    return MirroredPackedS3Backend(region, state_dir, readonly=readonly)


if TYPE_CHECKING:
    _conforms: type[ObjectStore] = MirroredPackedS3Backend  # mypy: it is an ObjectStore
