"""A shared region on this host: its local index kept in step with the region's ledger.

A region created or attached with `--index postgresql://...` is shared by several snapfs
stores (hosts). Each host keeps working as with any bucket region: its local `index.db`
answers every lookup and read on the trio thread, its packs go to the region's bucket.
The ledger (meta/ledger.py, in PostgreSQL) is what they share, and `SharedLink` keeps this
host's local index in step with it:

- **Ledger first** for what other hosts must not contradict: a new snapshot's name
  (`reserve`, at create and at the start of a copy into the region), a rename, a clone's
  map, a shrink, and every batch of map rows (`commit`, after the objects are in the
  bucket and before the local `commit_blocks`: the references that keep the blocks from
  the collector, and the blocks other hosts may reuse from then on). A refusal (a name
  another host took, an expired session, a block the region deleted) reaches the caller
  with nothing changed here.
- **Right after the local commit** for the rest of a snapshot's state (its close mark and
  seal, size, times, description, retention, tags, a failure, a delete) and the region's
  settings: the local index's change hook marks the snapshot, and the pusher task sends
  the fields that differ from what the ledger was last told (a change another host made
  is not undone), within milliseconds. A close (FUSE flush) and an `rm` wait for it, so
  what `cp` saw succeed is in the ledger: a host that dies then has its closed snapshots
  sealed by the others' reaper, never removed.
- **Pulled**: the puller asks every `PULL_EVERY` seconds for the newest change number
  (one indexed query) and applies the other hosts' changes since the last one seen: a
  snapshot sealed elsewhere appears (its map and block rows and its blocks' locations
  copied into the local index in batches sized by the loop budget; its blocks are fetched
  from the bucket when read, ranged GETs through the bounded block cache), a renamed or
  changed one changes, a deleted one vanishes (one open here reads on: its packs stay for
  their grace). What a pull applies is not pushed back.
- **Dedup across hosts**: a block this host does not know is looked up in the ledger
  before it is uploaded (`lookup`: the lookups of every writer and copy waiting at one
  moment go in one query); a block another host stored is adopted (its location recorded
  here) instead of uploaded again.
- **Sessions and fencing**: the link holds a session with a heartbeat every ttl/3. A host
  whose heartbeat (or commit) finds its session expired was fenced: its unfinished
  snapshots fail here, and it joins again with a new session. A store that restarts takes
  over its previous session (`Ledger.take_over`): what its recovery kept (copies to resume,
  closed snapshots it sealed) stays its own, the rest is deleted.
- **Collection**: every host runs the reaper and collector rounds, one host at a time per
  region (a lease that lapses if its holder stops): expired sessions reaped, deleted
  snapshots' maps purged,
  unreferenced block rows dropped, packs more than half dead repacked (their blocks'
  locations switched in the ledger; a host whose read finds the old pack gone asks the
  ledger where the block went), dead packs deleted after the grace. This host's own
  garbage collector only forgets what no local row names (objects/s3shared.py never
  deletes in the bucket).

The safety argument (which transaction keeps which invariant) is meta/ledger.py's module
docstring. Local order: object in the bucket, then the ledger, then the local index; so
neither index ever names data that is not in the bucket.

Joining (a session, the take-over, the reconciliation) runs in the background: a server
that does not answer at mount delays this region's writes, not the mount, its reads or the
other regions. Every ledger call runs in a worker thread on a connection of its purpose
(pushes, reads, heartbeats, the collector, pack registration from upload threads), each
used by one thread at a time; a server that does not answer is retried with backoff, each
retry logged, until it answers or the mount stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from snapfs import durable, workers
from snapfs.errors import IndexUnavailable, SnapfsError
from snapfs.meta.index import NewBlock
from snapfs.meta.ledger import SHARED_COLUMNS, STRAY_AGE, Ledger, SessionExpired, SharedBlock
from snapfs.meta.pg import redacted
from snapfs.model.states import SnapshotStatus
from snapfs.objects.s3packs import PackedS3Backend, PackLocation, new_pack_id
from snapfs.objects.s3shared import SharedPackedS3Backend
from snapfs.service.snapshots import Snapshot
from snapfs.stalls import BatchSizer

if TYPE_CHECKING:
    from snapfs.service.region import Region
    from snapfs.service.storebase import StoreParts

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TTL = 30.0  # seconds without a heartbeat after which a host is reaped
PULL_EVERY = 0.25  # seconds between looks at the ledger's newest change
COLLECT_EVERY = 5.0  # seconds between collector rounds (each host tries; one runs)
CLAIM_WAIT = 10.0  # seconds a writer waits for a block another host claimed, at most
CLAIM_POLL = 0.1  # seconds between its looks
CLAIM_AGE = 60.0  # a claim older than this is forgotten (its claimer stored it, or not)
REPACK_DEAD_SHARE = 0.5  # a pack more dead than this is repacked (as a single-host region's)
REPACK_BYTES = 256 << 20  # live bytes a collector round copies at most
RETRY_FIRST, RETRY_MAX = 0.25, 5.0  # backoff of a call to a server that does not answer
STOP_GRACE = 5.0  # seconds unmount waits for pushes and the session's end

INSERT_BATCH = 2048  # first batch of map rows a pulled snapshot's insert commits
MAP_PAGE = 8192  # map rows read from the ledger per query
TOMBSTONE_AGE = 7 * 86400.0  # purged deleted rows kept this long for hosts to pull
SESSION_FILE = "shared-session"  # in the region's directory: this store's last session
# A snapshot's fields the pusher sends after a local commit ("closed" and "tags" too).
PUSHED_FIELDS = tuple(c for c in SHARED_COLUMNS if c not in ("id", "name", "created_at"))
LOCAL_SETTINGS = frozenset({"block_size"})  # fixed at the region's creation
# `deleted` of another host's snapshot while its rows are copied in: hidden as a deleted
# one is, but a stop meanwhile is not a delete the ledger must hear of (recovery.py).
PULLING = 2


def stray_age_from_env() -> float:
    """How old an unregistered pack must be to be deleted (`SNAPFS_STRAY_AGE` seconds)."""
    try:
        return max(1.0, float(os.environ.get("SNAPFS_STRAY_AGE", STRAY_AGE)))
    except ValueError:
        return STRAY_AGE


def ttl_from_env() -> float:
    """The session ttl (`SNAPFS_SESSION_TTL` seconds in the daemon's environment)."""
    try:
        return max(1.0, float(os.environ.get("SNAPFS_SESSION_TTL", DEFAULT_TTL)))
    except ValueError:
        return DEFAULT_TTL


class _Connection:
    """One purpose's connection to the ledger, opened again after the server dropped it;
    used by one thread at a time (its limiter)."""

    def __init__(self, url: str, region: str):
        self.url, self.region = url, region
        self.limiter = trio.CapacityLimiter(1)
        self.ledger: Ledger | None = None

    def get(self) -> Ledger:
        if self.ledger is None:
            self.ledger = Ledger.attach(self.url, self.region)
        return self.ledger

    def drop(self) -> None:
        ledger, self.ledger = self.ledger, None
        if ledger is not None:
            with contextlib.suppress(Exception):
                ledger.close()


class SharedLink:
    """This host's tie to a shared region's ledger (see the module docstring)."""

    shared = True

    def __init__(self, store: StoreParts, region: Region, url: str, *, ttl: float | None = None):
        self.store = store
        self.region = region
        self.url = url
        self.ttl = ttl_from_env() if ttl is None else ttl
        self.session = ""
        self.joined = trio.Event()
        self.stopping = False
        self._fencing = False
        self._conns = {
            purpose: _Connection(url, region.name)
            for purpose in ("push", "read", "beat", "collect")
        }
        # Pack registration runs in upload threads (objects/s3packs.py), not on the loop.
        self._pack_conn = _Connection(url, region.name)
        self._pack_lock = threading.Lock()
        self._my_packs: set[str] = set()  # registered by this process: sealed by its commits
        # What the ledger was last told (or told us) of each snapshot: the pusher sends
        # only the fields that differ, so a change another host made is not undone.
        self._told: dict[str, dict[str, Any]] = {}
        self._dirty: set[str] = set()
        self._settings_dirty = False
        self._settings_told: dict[str, str] = {}
        self._wake_pusher = trio.Event()
        self._rounds = 0
        self._round_done = trio.Event()
        self._pushing = False
        self._quiet: set[str | None] = set()  # being applied from the ledger: not pushed
        self._deleted_at_mount: set[str] = set()
        self._seen = 0  # the newest change number applied here
        self._settings_digest = ""  # of the settings applied here
        self._pending_lookups: dict[bytes, trio.Event] = {}
        self._looked_up: dict[bytes, tuple[str, SharedBlock | None]] = {}
        self._lookup_wanted = trio.Event()
        # Blocks about to be uploaded (key -> row), read by the upload thread that
        # publishes their pack; plain dict operations, atomic under the GIL.
        self._unpublished: dict[str, NewBlock] = {}
        self._retry: set[str] = set()  # changes that wait (a name still taken here)
        self._next_sweep = 0.0  # trio clock: when the collector next lists strays
        self.stray_age = stray_age_from_env()

    @classmethod
    def attach_to(cls, store: StoreParts, region: Region, url: str) -> SharedLink:
        """The link of a shared region, wired in: the index's change hook (it tells the
        manifest publisher too), the packed store's upload and relocation hooks, and the
        repository's lookups before uploads."""
        link = cls(store, region, url)
        backend = region.backend
        assert isinstance(backend, SharedPackedS3Backend)
        backend.on_upload = link.register_pack
        backend.on_uploaded = link.uploaded
        backend.relocated = link.relocated
        region.index.on_change = link.changed
        region.shared_lookup = link.lookup
        region.shared_encoded = link.encoded
        if region.publisher is not None:
            region.publisher.shared = True
        return link

    def use_url(self, url: str) -> None:
        """Connect with `url` (the one given to create or attach, perhaps with its
        password) rather than the one the catalogue keeps, for the life of this process."""
        self.url = url
        for conn in [*self._conns.values(), self._pack_conn]:
            conn.url = url
            conn.drop()

    @property
    def session_file(self) -> Path:
        return self.region.directory / SESSION_FILE

    # --- calls to the ledger ----------------------------------------------------------------

    async def call(self, purpose: str, fn: Callable[..., T], *args: Any, retry: bool = True) -> T:
        """`fn(ledger, *args)` in a worker thread on `purpose`'s connection; a server that
        does not answer is retried with backoff (logged) until it does or the mount stops."""
        conn = self._conns[purpose]
        delay = RETRY_FIRST
        while True:
            try:
                return await workers.run_sync(_run, conn, fn, args, limiter=conn.limiter)
            except IndexUnavailable as exc:
                if not retry or self.stopping:
                    raise
                log.warning("region %s: the shared index does not answer (%s); retrying in "
                            "%.2f s", self.region.name, exc, delay)  # fmt: skip
                await trio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """A change on behalf of this host's session, once it has joined."""
        await self.joined.wait()
        try:
            return await self.call("push", fn, self.session, *args)
        except SessionExpired as exc:
            self._fence_soon(exc)
            raise

    def register_pack(self, pack_id: str) -> None:
        """Worker thread (an upload): the pack's row before its PUT (see Ledger)."""
        self._on_pack_connection(f"registering pack {pack_id}", Ledger.register_pack, pack_id)
        self._my_packs.add(pack_id)

    def encoded(self, block: NewBlock) -> None:
        """The repository is about to upload `block` (BlockRepository.shared_encoded)."""
        self._unpublished[block.block_id.hex()] = block

    def uploaded(self, pack_id: str, size: int, entries: list[tuple[str, int, int]]) -> None:
        """Worker thread, after a pack's PUT: its blocks' rows into the ledger, pinned by
        this session until it commits references to them, so that other hosts writing the
        same content (waiting on this host's claims) reuse them at once."""
        blocks = []
        for key, offset, length in entries:
            row = self._unpublished.pop(key, None)
            if row is not None:
                blocks.append(SharedBlock(
                    row.block_id, row.plain_size, row.stored_size, row.codec, row.key_id,
                    row.base_id, pack_id, offset, length, size,
                ))  # fmt: skip
        self._on_pack_connection(f"publishing pack {pack_id}", Ledger.publish, pack_id, size,
                                 blocks)  # fmt: skip

    def _on_pack_connection(self, what: str, fn: Callable[..., object], *args: Any) -> None:
        """Worker thread (an upload): `fn(ledger, session, *args)` on the upload threads'
        connection, one at a time, retried while the server does not answer (an upload
        waits for the ledger as a write does)."""
        delay = RETRY_FIRST
        with self._pack_lock:
            while True:
                try:
                    fn(self._pack_conn.get(), self.session, *args)
                    return
                except IndexUnavailable as exc:
                    self._pack_conn.drop()
                    if self.stopping:
                        raise
                    log.warning("region %s: %s failed (%s); retrying", self.region.name, what,
                                exc)  # fmt: skip
                    time.sleep(delay)
                    delay = min(RETRY_MAX, delay * 2)

    # --- joining, and leaving -----------------------------------------------------------------

    def run(self, nursery: trio.Nursery) -> None:
        """The link's tasks, for the life of the mount."""
        name = self.region.name
        nursery.start_soon(self._join, name=f"join {name}")
        nursery.start_soon(self._pusher_loop, name=f"push {name}")
        nursery.start_soon(self._lookup_loop, name=f"lookup {name}")

    async def _join(self) -> None:
        """A session (taking over the one this store had before), the local index brought
        in step with the ledger, then the loops that keep it so. A server that refuses or
        does not answer is tried again until it does or the mount stops."""
        delay = RETRY_FIRST
        while not self.joined.is_set():
            try:
                await self._open_session()
                await self.reconcile()
                self.joined.set()
            except SnapfsError as exc:
                if self.stopping or self.region.closed:
                    return
                log.warning("region %s: joining the shared index failed (%s); again in "
                            "%.1f s", self.region.name, exc, delay)  # fmt: skip
                await trio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
        log.info("region %s: joined the shared index %s as session %s (ttl %.0f s)",
                 self.region.name, redacted(self.url), self.session[:8], self.ttl)  # fmt: skip
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._forever, "heartbeat", self._beat, self.ttl / 3)
            nursery.start_soon(self._forever, "pull", self.pull, PULL_EVERY)
            # The reaper looks at least once a ttl (a host is reaped after two looks).
            every = min(COLLECT_EVERY, self.ttl)
            nursery.start_soon(self._forever, "collection", self.collect, every)

    async def _open_session(self) -> None:
        previous = _read_session(self.session_file)
        # Everything the store still has stays its own: copies to resume, and snapshots its
        # recovery sealed at mount (closed before the stop: `cp` saw them succeed). What the
        # previous session owned and the store no longer has is deleted in the ledger.
        keep = [snap.id for snap in self.region.snapshots.values()]
        self.session = await self.call("push", _open_session, self.ttl, previous, keep)
        await workers.run_sync(
            durable.write_file, self.session_file, self.session.encode(),
            limiter=self.region.limiter,
        )  # fmt: skip

    async def stop(self) -> None:
        """Unmount: what is marked is pushed (a while), the session ends, connections close."""
        if self.joined.is_set():
            with trio.move_on_after(STOP_GRACE):
                await self.pushed()
        self.stopping = True
        self._wake_pusher.set()
        self._lookup_wanted.set()
        if self.joined.is_set():
            with trio.move_on_after(STOP_GRACE), contextlib.suppress(SnapfsError):
                await self.call("beat", Ledger.end_session, self.session, retry=False)
        for conn in [*self._conns.values(), self._pack_conn]:
            conn.drop()

    async def _forever(self, what: str, step: Callable[[], Awaitable[None]], every: float) -> None:
        while not self.stopping and not self.region.closed:
            try:
                await step()
            except SessionExpired as exc:
                self._fence_soon(exc)
            except SnapfsError as exc:
                log.warning("region %s: %s failed (%s); again in %.1f s",
                            self.region.name, what, exc, every)  # fmt: skip
            except Exception:
                log.exception("region %s: %s failed; again in %.1f s", self.region.name, what,
                              every)  # fmt: skip
            await trio.sleep(every)

    # --- heartbeats and fencing -------------------------------------------------------------

    async def _beat(self) -> None:
        alive = await self.call("beat", Ledger.heartbeat, self.session, retry=False)
        if not alive:
            raise SessionExpired(
                f"region {self.region.name}: session {self.session[:8]} expired in the shared "
                "index (no heartbeat for longer than its ttl)"
            )

    def _fence_soon(self, exc: SnapfsError) -> None:
        nursery = self.store.nursery
        if not self._fencing and nursery is not None and not self.stopping:
            self._fencing = True
            nursery.start_soon(self._fenced, exc, name=f"fenced {self.region.name}")

    async def _fenced(self, exc: SnapfsError) -> None:
        """Our session expired: the other hosts reaped what we had not finished. It fails
        here too, and we join again with a new session."""
        try:
            log.error("region %s: fenced: %s", self.region.name, exc)
            self.joined = trio.Event()
            for snap in list(self.region.snapshots.values()):
                if snap.status in (SnapshotStatus.CREATING, SnapshotStatus.COPYING):
                    await self.store.fail_fenced(snap, exc)
            self._told.clear()
            delay = RETRY_FIRST
            while not self.joined.is_set() and not self.stopping:
                try:
                    await self._open_session()
                    await self.reconcile()
                    self.joined.set()
                except SnapfsError as again:
                    log.warning("region %s: joining the shared index again failed (%s); "
                                "again in %.1f s", self.region.name, again, delay)  # fmt: skip
                    await trio.sleep(delay)
                    delay = min(RETRY_MAX, delay * 2)
            if self.joined.is_set():
                log.warning("region %s: joined the shared index again as session %s",
                            self.region.name, self.session[:8])  # fmt: skip
        finally:
            self._fencing = False

    # --- the ledger first -------------------------------------------------------------------

    async def reserve(
        self,
        row: dict[str, Any],
        tags: dict[str, str] | None = None,
        displaced_id: str | None = None,
        parent_id: str | None = None,
    ) -> None:
        """A new snapshot's name and row in the ledger, before the local index's (with
        `parent_id`, it starts with that snapshot's map: a copy based on one here)."""
        await self._write(_reserve, row, tags, displaced_id, parent_id)
        self._told[row["id"]] = {k: row.get(k) for k in PUSHED_FIELDS} | {
            "closed": 0, "tags": dict(tags or {}),
        }  # fmt: skip

    async def rename(self, snap: Snapshot, new: str, displaced_id: str | None) -> None:
        await self._write(Ledger.rename, snap.id, new, displaced_id)

    async def exchange(self, a: Snapshot, b: Snapshot) -> None:
        await self._write(Ledger.exchange_names, a.id, b.id, a.name, b.name)

    async def clone(self, snap: Snapshot, parent: Snapshot, fields: dict[str, Any]) -> None:
        await self._write(Ledger.clone, snap.id, parent.id, fields)
        self._told.setdefault(snap.id, {}).update(
            {k: v for k, v in fields.items() if k in PUSHED_FIELDS}
        )

    async def trim(self, snap: Snapshot, first_dropped: int) -> None:
        await self._write(Ledger.trim, snap.id, first_dropped)

    async def commit(
        self,
        snapshot_id: str,
        new_blocks: Sequence[NewBlock],
        mapping: Sequence[tuple[int, bytes | None]],
        fields: dict[str, Any],
    ) -> None:
        """A batch of map rows (and the blocks it names) into the ledger, after the objects
        were synced and before the local commit; blocks the ledger has elsewhere (another
        host stored the same content first) are recorded here at its location."""
        region = self.region
        backend = region.backend
        assert isinstance(backend, PackedS3Backend)
        pushed = {k: v for k, v in fields.items() if k in PUSHED_FIELDS}
        named = {bid for _, bid in mapping if bid is not None}
        if not named and not pushed:
            return
        new = {b.block_id: b for b in new_blocks}
        rows = dict(region.index.block_rows(list(named - new.keys())))
        rows.update(new)
        bases = {b.base_id for b in rows.values() if b.base_id is not None} - rows.keys()
        rows.update(region.index.block_rows(list(bases)))
        located, sizes = await workers.run_sync(
            backend.locations, [k.hex() for k in rows], limiter=region.io_limiter
        )
        blocks = []
        packs: dict[str, int] = {}
        for bid, row in rows.items():
            where = located.get(bid.hex())
            if where is None:
                raise SnapfsError(f"region {region.name}: block {bid.hex()} has no location")
            blocks.append(SharedBlock(
                bid, row.plain_size, row.stored_size, row.codec, row.key_id, row.base_id,
                where.pack, where.offset, where.length, sizes[where.pack],
            ))  # fmt: skip
            if bid in new and where.pack in self._my_packs:  # not one adopted from another host
                packs[where.pack] = sizes[where.pack]
        moved = await self._write(Ledger.commit, snapshot_id, packs, blocks, mapping, pushed)
        if moved:
            await self._adopt(list(moved.values()))
        self._told.setdefault(snapshot_id, {}).update(pushed)

    async def _adopt(self, blocks: Sequence[SharedBlock]) -> None:
        """Record here where blocks are, as the ledger says."""
        backend = self.region.backend
        assert isinstance(backend, PackedS3Backend)
        locations = {b.block_id.hex(): PackLocation(b.pack, b.offset, b.length) for b in blocks}
        sizes = {b.pack: b.pack_size for b in blocks}
        if locations:
            await workers.run_sync(backend.adopt, locations, sizes, limiter=self.region.io_limiter)

    # --- pushed after the local commit -------------------------------------------------------

    def changed(self, snapshot_id: str | None) -> None:
        """The local index's change hook: a snapshot's row (or the settings: None) changed.
        What this host changed is pushed, and published in the bucket's manifests."""
        if snapshot_id in self._quiet:
            return
        if self.region.publisher is not None:
            self.region.publisher.changed(snapshot_id)
        if snapshot_id is None:
            self._settings_dirty = True
        else:
            self._dirty.add(snapshot_id)
        self._wake_pusher.set()

    def deleted_here(self, snapshot_id: str) -> None:
        """The store's recovery removed a snapshot the ledger may still have: deleted there
        once joined."""
        self._deleted_at_mount.add(snapshot_id)

    async def pushed(self, snapshot_id: str | None = None) -> None:
        """Wait until what is marked now (of `snapshot_id`, or everything) is in the ledger."""
        if snapshot_id is not None and snapshot_id not in self._dirty and not self._pushing:
            return
        if snapshot_id is None and not self._dirty and not self._settings_dirty:
            return
        target = self._rounds + (2 if self._pushing else 1)  # a round under way may miss it
        self._wake_pusher.set()
        while self._rounds < target and not self.stopping:
            await self._round_done.wait()

    async def _pusher_loop(self) -> None:
        await self.joined.wait()
        while not self.stopping and not self.region.closed:
            await self._wake_pusher.wait()
            self._wake_pusher = trio.Event()
            self._pushing = True
            try:
                await self._push_round()
            except SessionExpired as exc:
                self._fence_soon(exc)
                await self.joined.wait()
            except SnapfsError as exc:
                log.warning("region %s: pushing to the shared index failed (%s); retrying",
                            self.region.name, exc)  # fmt: skip
                self._wake_pusher.set()
                await trio.sleep(RETRY_MAX)
            except Exception:
                log.exception("region %s: pushing to the shared index failed", self.region.name)
                self._wake_pusher.set()
                await trio.sleep(RETRY_MAX)
            finally:
                self._pushing = False
                self._rounds += 1
                done, self._round_done = self._round_done, trio.Event()
                done.set()

    async def _push_round(self) -> None:
        dirty, self._dirty = self._dirty, set()
        try:
            for snapshot_id in sorted(dirty):
                await self._push_snapshot(snapshot_id)
                dirty.discard(snapshot_id)
            if self._settings_dirty:
                self._settings_dirty = False
                await self._push_settings()
        except BaseException:
            self._dirty |= dirty  # again next round
            raise

    async def _push_snapshot(self, snapshot_id: str) -> None:
        index = self.region.index
        row = index.snapshot_row(snapshot_id)
        if row is None or row["deleted"]:
            await self.call("push", Ledger.delete, self.session, snapshot_id)
            self._told.pop(snapshot_id, None)
            return
        state = {k: row.get(k) for k in PUSHED_FIELDS}
        state["closed"] = int(
            row["status"] in (SnapshotStatus.CREATING, SnapshotStatus.COPYING)
            and row["sealed_at"] is not None
        )
        state["tags"] = index.tags(snapshot_id)
        told = self._told.get(snapshot_id, {})
        diff = {k: v for k, v in state.items() if told.get(k, _UNSET) != v}
        if not diff:
            return
        tags = diff.pop("tags", None)
        trim = None
        if row["status"] == SnapshotStatus.AVAILABLE:
            diff["owner"] = None
            trim = -(-row["size"] // self.region.block_size)  # a sealed map ends at its size
        if await self.call("push", Ledger.update, self.session, snapshot_id, diff, tags, trim):
            self._told[snapshot_id] = state

    async def _push_settings(self) -> None:
        current = {k: v for k, v in self.region.index.settings().items() if k not in LOCAL_SETTINGS}
        told = self._settings_told
        diff: dict[str, str | None] = {k: v for k, v in current.items() if told.get(k) != v}
        diff.update({k: None for k in told if k not in current})
        if diff:
            await self.call("push", Ledger.set_settings, self.session, diff)
        self._settings_told = current

    @contextlib.contextmanager
    def _applying(self, snapshot_id: str | None) -> Iterator[None]:
        """Changes made here from the ledger's rows are not pushed back."""
        self._quiet.add(snapshot_id)
        try:
            yield
        finally:
            self._quiet.discard(snapshot_id)

    # --- dedup lookups ----------------------------------------------------------------------

    async def lookup(self, block_id: bytes) -> NewBlock | None:
        """Before uploading a block this host does not know: one another host stored is
        recorded here (its location adopted) as a block to commit, not uploaded again;
        one another host is uploading right now (its claim) is waited for, a while; else
        None, and this host claims it and uploads it."""
        if not self.joined.is_set() or self.stopping:
            return None
        deadline = trio.current_time() + CLAIM_WAIT
        flushed = False
        while True:
            outcome, found = await self._ask(block_id)
            if found is not None:
                await self._adopt([found])
                return _new_block(found)
            if outcome != "theirs" or trio.current_time() > deadline:
                return None
            if not flushed:  # our own claimed blocks first: nobody waits on a spool
                backend = self.region.backend
                assert isinstance(backend, PackedS3Backend)
                await workers.run_sync(backend.flush_open, limiter=self.region.io_limiter)
                flushed = True
            await trio.sleep(CLAIM_POLL)

    async def _ask(self, block_id: bytes) -> tuple[str, SharedBlock | None]:
        """One block's lookup-or-claim, batched with every other waiting at this moment."""
        event = self._pending_lookups.get(block_id)
        if event is None:
            event = self._pending_lookups[block_id] = trio.Event()
            self._lookup_wanted.set()
        await event.wait()
        return self._looked_up.pop(block_id, ("mine", None))

    async def _lookup_loop(self) -> None:
        while not self.stopping and not self.region.closed:
            await self._lookup_wanted.wait()
            self._lookup_wanted = trio.Event()
            batch = dict(self._pending_lookups)
            if not batch:
                continue
            answers: dict[bytes, tuple[str, SharedBlock | None]] = {}
            if not self.stopping:
                try:
                    found, _, theirs = await self.call(
                        "read", Ledger.lookup_or_claim, self.session, list(batch), retry=False
                    )
                    answers = {b: ("found", found[b]) for b in found}
                    answers.update((b, ("theirs", None)) for b in theirs)
                except SessionExpired as exc:
                    self._fence_soon(exc)
                except SnapfsError as exc:  # the writers upload their own copies
                    log.warning("region %s: dedup lookup failed (%s)", self.region.name, exc)
            for block_id, event in batch.items():
                self._looked_up[block_id] = answers.get(block_id, ("mine", None))
                self._pending_lookups.pop(block_id, None)
                event.set()

    # --- pulled from the ledger -------------------------------------------------------------

    async def pull(self) -> None:
        """Apply the other hosts' changes made since the last one seen here, and the
        region's settings when they changed."""
        newest, settings = await self.call("read", Ledger.last_changes, retry=False)
        if settings != self._settings_digest:
            await self._apply_settings(await self.call("read", Ledger.settings, retry=False))
            self._settings_digest = settings
        while newest > self._seen:
            rows = await self.call("read", Ledger.changes, self._seen, retry=False)
            if not rows:
                break
            for row in rows:
                await self._apply(row)
                self._seen = max(self._seen, int(row["seq"]))
        if self._retry:
            retry, self._retry = self._retry, set()
            for snapshot_id in sorted(retry):
                found = await self.call("read", _row_of, snapshot_id, retry=False)
                if found:
                    await self._apply(found[0])

    async def reconcile(self) -> None:
        """Bring the local index in step with the whole ledger (at join): deletions made
        here at mount go there; what it deleted leaves here, what it has arrives or changes."""
        for snapshot_id in sorted(self._deleted_at_mount):
            await self.call("push", Ledger.delete, self.session, snapshot_id)
        self._deleted_at_mount.clear()
        self._seen, self._settings_digest = await self.call("read", Ledger.last_changes)
        rows = await self.call("read", Ledger.live_snapshots)
        live = {r["id"] for r in rows}
        for snap in list(self.region.snapshots.values()):
            if snap.id not in live:
                log.info("region %s: %s (%s) is not in the shared index any more (deleted on "
                         "another host)", self.region.name, snap.name, snap.id)  # fmt: skip
                await self.store.vanished(snap)
        for row in rows:
            await self._apply(row, rejoining=True)
        settings = await self.call("read", Ledger.settings)
        await self._apply_settings(settings)
        # Anything changed here and not yet told (a seal at mount): the pusher sends it.
        self._dirty.update(s.id for s in self.region.snapshots.values())
        self._wake_pusher.set()

    async def _apply(self, row: dict[str, Any], *, rejoining: bool = False) -> None:
        """One ledger row here."""
        region = self.region
        snap = self.store.by_id.get(row["id"])
        if snap is not None and snap.region is not region:
            return
        if row["deleted"]:
            self._told.pop(row["id"], None)
            if snap is not None and not snap.deleted:
                log.info("region %s: snapshot %s (%s) was deleted on another host",
                         region.name, snap.name, snap.id)  # fmt: skip
                with self._applying(row["id"]):
                    await self.store.vanished(snap)
            return
        if snap is not None and row["changed_by"] == self.session and not rejoining:
            return  # our own change, made here first
        if snap is None:
            if row["status"] == SnapshotStatus.AVAILABLE:  # others' unfinished ones wait
                with self._applying(row["id"]):
                    await self._insert(row)
            return
        if not snap.deleted:
            with self._applying(row["id"]):
                await self._update(snap, row)

    async def _insert(self, row: dict[str, Any]) -> None:
        """Another host's sealed snapshot, copied into the local index (hidden until its
        whole map is in), then shown."""
        region = self.region
        if row["name"] in region.snapshots:
            self._retry.add(row["id"])  # the name is still another's here (a swap of names)
            return
        rows: list[tuple[int, bytes]] = []
        while True:
            page = await self.call("read", Ledger.map_from, row["id"],
                                   rows[-1][0] + 1 if rows else 0, MAP_PAGE)  # fmt: skip
            rows += page
            if len(page) < MAP_PAGE:
                break
        blocks = await self.call("read", Ledger.blocks, list({bid for _, bid in rows}))
        bases = {b.base_id for b in blocks.values() if b.base_id is not None} - blocks.keys()
        if bases:
            blocks.update(await self.call("read", Ledger.blocks, list(bases)))
        missing = {bid for _, bid in rows} - blocks.keys()
        if missing:  # dropped meanwhile: the snapshot was deleted, the next pull says so
            log.info("region %s: %s (%s) names %d blocks the shared index no longer has",
                     region.name, row["name"], row["id"], len(missing))  # fmt: skip
            return
        tags = await self.call("read", Ledger.tags, row["id"])
        await self._adopt(list(blocks.values()))
        if region.closed or self.store.by_id.get(row["id"]) is not None:
            return
        if row["name"] in region.snapshots:
            self._retry.add(row["id"])
            return
        if region.index.snapshot_row(row["id"]) is None:  # else left hidden by a stop
            region.index.insert_snapshot(
                {k: row[k] for k in SHARED_COLUMNS} | {"deleted": PULLING}, tags=tags
            )
        # Block rows go in with the map rows naming them (a row nothing names yet is the
        # local collector's to drop); bases first, pinned, as their rows count only their
        # deltas' references.
        held = [b for b in bases if region.hold_base(b)]
        try:
            sizer = BatchSizer(INSERT_BATCH)
            at = 0
            while at < len(rows):
                chunk = rows[at : at + sizer.start()]
                named = [blocks[bid] for bid in dict.fromkeys(bid for _, bid in chunk)]
                under = [blocks[b.base_id] for b in named if b.base_id in blocks]
                ordered = sorted([*under, *named], key=lambda b: b.base_id is not None)
                region.index.commit_blocks(row["id"], [_new_block(b) for b in ordered], chunk, {})
                sizer.done()
                at += len(chunk)
                await trio.sleep(0)
            if region.closed:
                return
            if row["name"] in region.snapshots:  # taken while we inserted: later
                self._retry.add(row["id"])
                return
            region.index.update_snapshot(row["id"], deleted=0)
        finally:
            for base_id in held:
                region.release_base(base_id)
        local = region.index.snapshot_row(row["id"])
        assert local is not None
        snap = Snapshot.from_row(local, region)
        self._told[snap.id] = {k: row.get(k) for k in PUSHED_FIELDS} | {"closed": 0, "tags": tags}
        self.store.appeared(snap)
        log.info("region %s: snapshot %s (%s) appeared from another host",
                 region.name, snap.name, snap.id)  # fmt: skip

    async def _update(self, snap: Snapshot, row: dict[str, Any]) -> None:
        """What another host changed of a snapshot here: name, metadata, tags, status."""
        region = self.region
        if not self.store.renamed_elsewhere(snap, row["name"]):
            self._retry.add(row["id"])
            return
        fields = {
            name: row[name]
            for name in ("description", "retention_days", "mode", "uid", "gid", "mtime_ns",
                         "atime_ns")
            if row[name] != getattr(snap, name)
        }  # fmt: skip
        if fields:
            region.index.update_snapshot(snap.id, **fields)
            for name, value in fields.items():
                setattr(snap, name, value)
        tags = await self.call("read", Ledger.tags, snap.id)
        region.index.replace_tags(snap.id, tags)
        told = self._told.setdefault(snap.id, {})
        told.update({k: row.get(k) for k in PUSHED_FIELDS})
        told["closed"] = row["closed"]
        told["tags"] = tags

    async def _apply_settings(self, settings: dict[str, str]) -> None:
        current = self.region.index.settings()
        with self._applying(None):
            for key, value in settings.items():
                if key not in LOCAL_SETTINGS and current.get(key) != value:
                    self.region.index.set_setting(key, value)
        self._settings_told = {k: v for k, v in settings.items() if k not in LOCAL_SETTINGS}
        self.region.settings_changed()

    # --- the reaper and the collector --------------------------------------------------------

    async def collect(self) -> None:
        """One round of the region's reaper and collector, unless another host has the
        lease; now and then a sweep of packs nobody registered."""
        lease = min(COLLECT_EVERY, self.ttl) * 3
        if not await self.call("collect", Ledger.collect_lease, self.session, lease, retry=False):
            return
        reaped = await self.call("collect", Ledger.reap, retry=False)
        if reaped.sessions:
            log.warning("region %s: reaped %d sessions whose heartbeats stopped: %d of "
                        "their snapshots sealed (closed by their writer), %d deleted "
                        "(unfinished)", self.region.name, len(reaped.sessions),
                        len(reaped.sealed), len(reaped.deleted))  # fmt: skip
        while await self.call("collect", Ledger.purge_step, retry=False):
            await trio.sleep(0)
        freed = 0
        while dropped := await self.call("collect", Ledger.drop_unreferenced, retry=False):
            freed += dropped
        backend = self.region.backend
        grace = backend.grace if isinstance(backend, PackedS3Backend) else 0.0
        doomed = set(await self.call("collect", Ledger.doomed_packs, grace, retry=False))
        doomed |= set(await self.call("collect", Ledger.deleting_packs, retry=False))
        if doomed:
            await self._delete_packs(sorted(doomed))
        await self.call("collect", Ledger.forget_tombstones, TOMBSTONE_AGE, retry=False)
        await self.call("collect", Ledger.forget_claims, CLAIM_AGE, retry=False)
        if freed or doomed:
            log.info("region %s: shared collection dropped %d blocks and deleted %d packs",
                     self.region.name, freed, len(doomed))  # fmt: skip
        moved = await self.repack()
        if trio.current_time() >= self._next_sweep:
            self._next_sweep = trio.current_time() + self.stray_age / 2
            await self.sweep_strays()
        if moved and self.region.on_relocated is not None:
            self.region.on_relocated()  # manifests name the old packs: publish them again

    async def repack(self) -> int:
        """Packs more than half dead: their live blocks copied into new packs (the live
        ranges only, byte for byte: an encrypted block's AEAD names its id and region, not
        its place), then switched in the ledger in one transaction each; the old packs die
        and go after the grace, while hosts that still hold their locations read on. At
        most REPACK_BYTES of live data a round. How many blocks moved."""
        backend = self.region.backend
        assert isinstance(backend, SharedPackedS3Backend)
        candidates = await self.call(
            "collect", Ledger.repack_candidates, REPACK_DEAD_SHARE, retry=False
        )
        moved = budget = 0
        for pack, _size, live in candidates:
            if budget >= REPACK_BYTES or self.stopping:
                break
            rows = await self.call("collect", Ledger.blocks_in_pack, pack, retry=False)
            if not rows:
                continue
            new = new_pack_id()
            await self.call("collect", Ledger.register_pack, self.session, new, retry=False)
            located, size = await workers.run_sync(
                backend.copy_pack, pack, new, [(bid.hex(), off, n) for bid, off, n in rows],
                limiter=self.region.io_limiter,
            )  # fmt: skip
            moves = [(bytes.fromhex(k), pack, w.offset, w.length) for k, w in located.items()]
            moved += await self.call(
                "collect", Ledger.relocate, self.session, new, size, moves, retry=False
            )
            budget += live
            # Where this host's cache knew those blocks, it learns their new places.
            known, _ = await workers.run_sync(
                backend.locations, list(located), limiter=self.region.io_limiter
            )
            if known:
                await workers.run_sync(
                    backend.adopt, {k: located[k] for k in known}, {new: size},
                    limiter=self.region.io_limiter,
                )  # fmt: skip
        if moved:
            log.info("region %s: repacked %d blocks out of %d packs", self.region.name, moved,
                     len(candidates))  # fmt: skip
        return moved

    def relocated(self, key: str) -> tuple[PackLocation, int] | None:
        """Worker thread (a read whose pack is gone): where the ledger has the block now."""
        found: dict[bytes, SharedBlock] = {}

        def ask(ledger: Ledger, session: str) -> None:
            found.update(ledger.blocks([bytes.fromhex(key)]))

        self._on_pack_connection(f"looking up block {key}", ask)
        block = found.get(bytes.fromhex(key))
        if block is None:
            return None
        return PackLocation(block.pack, block.offset, block.length), block.pack_size

    async def _delete_packs(self, packs: list[str]) -> None:
        backend = self.region.backend
        assert isinstance(backend, PackedS3Backend)
        await workers.run_sync(backend.packs.delete_many, packs, limiter=self.region.io_limiter)
        await self.call("collect", Ledger.forget_packs, packs, retry=False)

    async def sweep_strays(self) -> None:
        """Packs in the bucket the ledger never heard of (a crash between a pack's PUT and
        its registration cannot leave one, the registration comes first; an interrupted
        delete or a stray of another kind can), deleted once older than STRAY_AGE."""
        backend = self.region.backend
        assert isinstance(backend, SharedPackedS3Backend)
        ages = await workers.run_sync(backend.pack_ages, limiter=self.region.io_limiter)
        known = await self.call("collect", Ledger.packs, retry=False)
        unknown = {pack: age for pack, age in ages.items() if pack not in known}
        doomed = await self.call(
            "collect", Ledger.doom_strays, unknown, self.stray_age, retry=False
        )
        if doomed:
            log.warning("region %s: deleting %d packs no host registered", self.region.name,
                        len(doomed))  # fmt: skip
            await self._delete_packs(doomed)


_UNSET = object()


def _run(conn: _Connection, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    """Worker thread: one ledger call on `conn`."""
    try:
        return fn(conn.get(), *args)
    except IndexUnavailable:
        conn.drop()  # a connection the server ended: the next call connects again
        raise


def _read_session(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _open_session(ledger: Ledger, ttl: float, previous: str | None, keep: list[str]) -> str:
    session = ledger.open_session(socket.gethostname(), os.getpid(), ttl)
    if previous:
        ledger.take_over(previous, session, keep)
    return session


def _reserve(
    ledger: Ledger,
    session: str,
    row: dict[str, Any],
    tags: dict[str, str] | None,
    displaced_id: str | None,
    parent_id: str | None,
) -> None:
    ledger.reserve(session, row, tags, displaced_id=displaced_id)
    if parent_id is not None:
        ledger.clone(session, row["id"], parent_id, {})


def _row_of(ledger: Ledger, snapshot_id: str) -> list[dict[str, Any]]:
    row = ledger.snapshot(snapshot_id)
    return [] if row is None else [row]


def _new_block(b: SharedBlock) -> NewBlock:
    return NewBlock(b.block_id, b.plain_size, b.stored_size, b.codec, b.key_id, b.base_id)
