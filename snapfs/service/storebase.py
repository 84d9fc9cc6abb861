"""What the parts of `Store` share, declared for the type checker.

`Store` (store.py) is composed of four parts, one module each: recovery.py, lifecycle.py,
removal.py and copies.py. Each part uses state that `Store.__init__` creates and methods that
another part defines. `StoreParts`, the base of every part, declares both, so that each part
type-checks on its own:

- the shared attributes, as annotations only (no values: `Store.__init__` sets them);
- the methods one part calls on another, with bodies that raise `NotImplementedError`. The
  parts come before `StoreParts` in `Store`'s method resolution order, so the real method
  always wins; the type checker checks that its signature matches the one declared here.

Nothing here holds logic; a new cross-part call or shared attribute is declared here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import trio

    from snapfs.blocks.repository import PendingFrees
    from snapfs.errors import SnapfsError
    from snapfs.meta.keys import KeyRing
    from snapfs.service.copyjobs import CopyEngine
    from snapfs.service.lifecycle import OpenFile
    from snapfs.service.region import Region
    from snapfs.service.snapshots import Snapshot


class NameCache(Protocol):
    """What the service tells the layer above when a name changes without a request
    through it (a copy ends, retention expires a snapshot): the FUSE layer implements it to
    drop the kernel's cached entry. Registered with `Store.attach_name_cache`; the service
    never imports the layer that implements it."""

    def forget_entry(self, parent_ino: int, name: str) -> None: ...


class NoNameCache:
    """Until a FUSE layer attaches (tests, `snapfs check`): nothing is cached to forget."""

    def forget_entry(self, parent_ino: int, name: str) -> None:
        pass


class StoreParts:
    """The state and cross-part methods the parts of `Store` use (see the module doc)."""

    # --- state, set by Store.__init__ ------------------------------------------------------

    settle: float
    frees: PendingFrees
    keys: KeyRing
    regions: dict[str, Region]
    by_ino: dict[int, Region | Snapshot]
    by_id: dict[str, Snapshot]
    copies: CopyEngine
    _readers: dict[int, list[OpenFile]]
    _writers: set[Snapshot]
    names: NameCache
    nursery: trio.Nursery | None
    was_clean: bool

    # --- defined by lifecycle.py (SnapshotLifecycle) ---------------------------------------

    def _add(self, snap: Snapshot) -> None:
        raise NotImplementedError

    async def seal_settling(
        self, snap: Snapshot, *, wait: bool = True, quiet: bool = False
    ) -> None:
        raise NotImplementedError

    def _end_cp_copy(self, snap: Snapshot, *, keep_lineage: bool) -> None:
        raise NotImplementedError

    def _end_copy_read(self, source: Snapshot) -> None:
        raise NotImplementedError

    # --- defined by removal.py (SnapshotRemoval) -------------------------------------------

    def _hide(self, snap: Snapshot) -> None:
        raise NotImplementedError

    async def _destroy(self, snap: Snapshot) -> None:
        raise NotImplementedError

    def _drop(self, snap: Snapshot) -> None:
        raise NotImplementedError

    async def _displaced(self, snap: Snapshot) -> None:
        raise NotImplementedError

    async def vanished(self, snap: Snapshot) -> None:
        raise NotImplementedError

    def renamed_elsewhere(self, snap: Snapshot, name: str) -> bool:
        raise NotImplementedError

    # --- defined by store.py (Store), for a shared region's link (shared.py) ----------------

    def appeared(self, snap: Snapshot) -> None:
        raise NotImplementedError

    async def fail_fenced(self, snap: Snapshot, error: SnapfsError) -> None:
        raise NotImplementedError

    # --- defined by copies.py (SnapshotCopies) ---------------------------------------------

    async def move_snapshot(
        self, src_region: Region, name: str, dst_region: Region, new_name: str, flags: int
    ) -> Snapshot:
        raise NotImplementedError

    async def _cancel_copy(self, snap: Snapshot, why: str) -> None:
        raise NotImplementedError
