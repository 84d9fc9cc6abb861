"""The packed store of a region shared by several hosts (issue 19, service/shared.py).

Every host of a shared region writes packs into the one bucket prefix, and the region's
ledger in PostgreSQL (meta/ledger.py) decides what lives there: a block's row names its
pack, a pack's live bytes are counted by the ledger's triggers, and the region's collector
(one host at a time) deletes dead packs after their grace. This host's `packs.db` is only a
cache of where the blocks it has seen are.

So `SharedPackedS3Backend` writes and reads as `PackedS3Backend` does, but never deletes an
object in the bucket on its own: deleting objects (the local collector, once no local row
names a block) only forgets their locations here; upkeep (repacks, dead packs) is the
ledger's collector's, which uses `copy_pack` to write a repack's new pack; and reclaiming
after a crash clears this host's spool, never a pack in the bucket (another host's packs
are unknown here by nature). A read whose pack is gone asks the ledger where its object
moved (`relocated`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from snapfs.objects.s3packs import PackedS3Backend, PackLocation, encode_trailer, live_ranges

if TYPE_CHECKING:
    from snapfs.objects.protocol import ObjectStore

log = logging.getLogger(__name__)


class SharedPackedS3Backend(PackedS3Backend):
    """A shared region's packs: written and read here, deleted only by the region."""

    # Where the region's ledger says an object is now (its location and its pack's size),
    # for a read whose pack was repacked away; set by the region's link.
    relocated: Callable[[str], tuple[PackLocation, int] | None] | None = None

    def delete_many(self, keys: Sequence[str], each: Callable[[], None] | None = None) -> None:
        """Forget where the objects are (their bytes are the region's to delete)."""
        self._forget(keys, each)

    def copy_pack(
        self, old: str, new: str, objects: Sequence[tuple[str, int, int]]
    ) -> tuple[dict[str, PackLocation], int]:
        """A repack of a shared region (worker thread): the objects (key, offset, length)
        of pack `old`, its live ranges only, copied byte for byte into pack `new` with its
        trailer and uploaded; their places there and the new pack's size. The region's
        ledger switches the locations (service/shared.py); nothing is recorded here."""
        entries: list[tuple[str, int, int, bytes]] = []
        parts: list[bytes] = []
        size = 0
        for start, end, members in live_ranges(sorted(objects, key=lambda o: o[1])):
            data = self.packs.get_range(old, start, end - start) if end > start else b""
            for key, offset, length in members:
                piece = data[offset - start : offset - start + length]
                entries.append((key, size, length, self._group_of([piece])))
                parts.append(piece)
                size += length
        parts.append(encode_trailer(new, entries, self.sealer))
        body = b"".join(parts)
        self.packs.put(new, body)
        return {key: PackLocation(new, off, length) for key, off, length, _ in entries}, len(body)

    def get(self, key: str) -> bytes:
        """As a packed store reads, and for an object whose pack is gone (another host's
        repack moved it, and the old pack's grace passed), where the region says it is now."""
        try:
            return super().get(key)
        except FileNotFoundError:
            found = self.relocated(key) if self.relocated is not None else None
            if found is None:
                raise
            self.adopt({key: found[0]}, {found[0].pack: found[1]})
            return super().get(key)

    def maintain(self, *, now: float | None = None) -> int:
        return 0  # the region's collector (service/shared.py) keeps the packs

    def reclaim_unmapped(self) -> int:
        """Only this host's spool: what an earlier process put and never uploaded."""
        with self._lock:
            known = set(self._closed)
            if self._open is not None:
                known.add(self._open.id)
        cleared = 0
        for leftover in self.spool.iterdir():
            if leftover.name not in known:
                cleared += leftover.stat().st_size
                leftover.unlink()
        return cleared

    def pack_ages(self) -> dict[str, float]:
        """Every pack in the bucket with its age in seconds (by its LastModified)."""
        now = time.time()
        return {
            item["Key"][len(self.packs.prefix) :]: now - item["LastModified"].timestamp()
            for item in self.packs.listing()
            if not item["Key"][len(self.packs.prefix) :].startswith(".")
        }

    def pack_problems(self) -> list[str]:
        return []  # which packs should be there is the ledger's to say

    def destroy(self) -> None:
        """This host leaves the region: its local state goes, the bucket stays the region's."""
        self.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.state_dir)


if TYPE_CHECKING:
    _conforms: type[ObjectStore] = SharedPackedS3Backend
