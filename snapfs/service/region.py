"""A region: its block repository, and the snapshot names and settings it holds."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import trio

from snapfs.blocks.cache import BlockCache
from snapfs.blocks.repository import BlockRepository, PendingFrees
from snapfs.errors import AlreadyExists, NotFound, NotPermitted, QuotaExceeded, ReadOnlyRegion
from snapfs.meta.keys import KeyNotFound
from snapfs.model.names import check_snapshot_filename

if TYPE_CHECKING:
    from snapfs.meta.index import NewBlock
    from snapfs.meta.keys import KeyRing
    from snapfs.objects.protocol import ObjectStore
    from snapfs.service.manifests import ManifestPublisher
    from snapfs.service.refresh import RegionRefresher
    from snapfs.service.shared import SharedLink
    from snapfs.service.snapshots import Snapshot

DEFAULT_PARALLEL_COPIES = 100  # Azure's per-region limit; more are queued, not refused
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class NoLink:
    """The link of a region only this store writes: nothing to tell anyone.

    A shared region's link (service/shared.py, `SharedLink`) has the same methods; the
    service calls them at the points where a shared region's ledger must hear first (a new
    name, a rename, map rows) or be waited for (a close). These return at once without a
    checkpoint: an `await` of them lets no other task in, so every "no await between a
    check and its change" invariant of an unshared region (docs/DEVELOPING.md, section 2)
    holds as it did before shared regions."""

    shared = False

    async def reserve(
        self,
        row: dict[str, Any],
        tags: dict[str, str] | None = None,
        displaced_id: str | None = None,
        parent_id: str | None = None,
    ) -> None:
        return None

    async def commit(
        self,
        snapshot_id: str,
        new_blocks: Sequence[NewBlock],
        mapping: Sequence[tuple[int, bytes | None]],
        fields: dict[str, Any],
    ) -> None:
        return None

    async def rename(self, snap: Snapshot, new: str, displaced_id: str | None) -> None:
        return None

    async def exchange(self, a: Snapshot, b: Snapshot) -> None:
        return None

    async def clone(self, snap: Snapshot, parent: Snapshot, fields: dict[str, Any]) -> None:
        return None

    async def trim(self, snap: Snapshot, first_dropped: int) -> None:
        return None

    async def pushed(self, snapshot_id: str | None = None) -> None:
        return None

    def deleted_here(self, snapshot_id: str) -> None:
        return None


class Region(BlockRepository):
    """A region directory of the mount: the blocks (BlockRepository) plus the namespace."""

    def __init__(
        self,
        name: str,
        ino: int,
        directory: Path,
        block_size: int,
        limiter: trio.CapacityLimiter,
        cache: BlockCache,
        keys: KeyRing | None = None,
        backend: ObjectStore | None = None,
        io_limiter: trio.CapacityLimiter | None = None,
        frees: PendingFrees | None = None,
    ):
        super().__init__(
            name, directory, block_size, limiter, cache, keys, backend, io_limiter, frees
        )
        self.ino = ino
        # Set by the store for a region on an object store: publishes what disaster recovery
        # needs (manifests.py) into the region's own backend.
        self.publisher: ManifestPublisher | None = None
        # A region attached read-only (disaster recovery from a bucket another store owns):
        # every change through the mount is refused, and its refresher (refresh.py) follows
        # what the bucket's owner publishes.
        self.read_only = False
        self.refresher: RegionRefresher | None = None
        # A region shared with other stores through a ledger in PostgreSQL sets its
        # SharedLink here (service/shared.py); every other region has nothing to tell.
        self.link: NoLink | SharedLink = NoLink()
        self.snapshots: dict[str, Snapshot] = {}
        self.created_ns = time.time_ns()
        # Held by each structural change of the region's chains of maps (a fold on delete,
        # a rebase after a seal: service/chains.py), which are several transactions with
        # awaits between them: one at a time, so none sees another half done.
        self.chain_lock = trio.Lock()

    def settings_changed(self) -> None:
        """Settings changed under us (a shared region's other hosts): read them again."""
        self._compression = None
        self._deltas = None

    def check_writable(self, what: str) -> None:
        """Refuse `what` (a change) in a region attached read-only: EROFS."""
        if self.read_only:
            raise ReadOnlyRegion(
                f"region {self.name} is attached read-only (its bucket belongs to another "
                f"store): {what} is refused"
            )

    # --- settings (region xattrs) ----------------------------------------------------------

    @property
    def max_parallel_copies(self) -> int:
        # With a default, get_setting returns a str (the `value` column is NOT NULL).
        value = cast(
            str, self.index.get_setting("max_parallel_copies", str(DEFAULT_PARALLEL_COPIES))
        )
        return int(value)

    @property
    def snapshot_quota(self) -> int | None:
        value = self.index.get_setting("snapshot_quota")
        return int(value) if value else None

    @property
    def encrypt_by_default(self) -> bool:
        return self.index.get_setting("encrypt_by_default") == "true"

    @property
    def default_kms_key_id(self) -> str | None:
        return self.index.get_setting("default_kms_key_id") or None

    def default_key(self) -> str | None:
        """The key a snapshot created or copied here is encrypted with (None: plain); checked
        now, so a disabled or missing default key refuses the new snapshot."""
        if not self.encrypt_by_default:
            return None
        key_id = self.default_kms_key_id
        if key_id is None or self.keys is None:
            raise KeyNotFound(f"region {self.name} encrypts by default but has no default key")
        return self.keys.usable(key_id, self.name).id

    def check_quota(self) -> None:
        quota = self.snapshot_quota
        if quota is not None and len(self.snapshots) >= quota:
            raise QuotaExceeded(
                f"region {self.name} holds {len(self.snapshots)} snapshots, its quota is {quota}"
            )

    # --- snapshot names --------------------------------------------------------------------

    def lookup(self, name: str) -> Snapshot:
        try:
            return self.snapshots[name]
        except KeyError:
            raise NotFound(f"snapshot {name!r} does not exist in region {self.name}") from None

    def check_new_name(self, name: str) -> None:
        check_snapshot_filename(name)
        if name in self.snapshots:
            raise AlreadyExists(f"snapshot {name!r} already exists in region {self.name}")

    def rename(self, old: str, new: str, flags: int) -> Snapshot | None:
        """Rename within the region; returns a snapshot displaced from `new`, if any.

        One index transaction per case, so a crash leaves the old or the new names, never a
        mix. The displaced snapshot is the caller's to delete (now or at its last close).
        """
        snap = self.lookup(old)
        check_snapshot_filename(new)
        target = self.snapshots.get(new)
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise NotFound(f"snapshot {new!r} does not exist in region {self.name}")
            self.index.exchange_names(snap.id, target.id, old, new)
            snap.name, target.name = new, old
            self.snapshots[new], self.snapshots[old] = snap, target
            snap.touch_ctime()
            target.touch_ctime()
            return None
        if target is snap:
            return None
        if target is not None and flags & RENAME_NOREPLACE:
            raise AlreadyExists(f"snapshot {new!r} already exists in region {self.name}")
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise NotPermitted(f"rename flags {flags:#x} are not supported")
        self.index.rename_snapshot(snap.id, new, displaced_id=target.id if target else None)
        del self.snapshots[old]
        if target is not None:
            target.deleted = True
        snap.name = new
        self.snapshots[new] = snap
        snap.touch_ctime()
        return target
