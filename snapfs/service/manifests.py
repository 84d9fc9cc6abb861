"""What a region on an object store keeps in its own bucket to be rebuilt from it alone.

The region index (`index.db`) stays on local disk: it is the fast, transactional cache the
daemon works from. For disaster recovery the region also writes, beside its block objects:

    PREFIX/meta/region.json            region metadata (format, name, block size, settings)
    PREFIX/meta/snapshots/<id>         one manifest per `available` snapshot

A manifest (format version 1) is a 36-byte header and a payload::

    offset size field
    0      4    magic "SNFM"
    4      1    format version (1)
    5      1    flags: bit 0 = payload encrypted (AES-256-GCM, 16-byte tag at its end)
    6      2    reserved (0)
    8      16   key id (CMK UUID bytes) when encrypted, else zeros
    24     12   nonce when encrypted, else zeros
    36     ...  payload: zstd(JSON)

The JSON holds the snapshot's metadata (name, size, mode, owner, times, lineage, description,
retention, encryption, transferred bytes), its tags, and its block map as rows
`[block_no, hex id, plain_size, stored_size, codec]` (enough to rebuild the `blocks` rows
without reading an object); since document version 2 a delta block's row has a sixth column,
its base's id, and `bases` lists the rows of those bases (formats/delta.py).
An encrypted snapshot's manifest is sealed under a key derived
from its CMK (HKDF info "snapfs manifest aead v1"), with the header, the region name and the
snapshot id as associated data: block ids, sizes and names stay unreadable without the key,
and a manifest moved to another id or region does not open.

Manifests are (re)published by `ManifestPublisher`, a task of the mount, shortly after a
snapshot becomes available or its metadata changes, and deleted when it is deleted; after an
unclean stop every manifest is republished and stale ones removed. `rebuild` turns manifests
back into an index (`snapfs region attach`).
"""

from __future__ import annotations

import json
import logging
import secrets
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
import zstandard
from cryptography.exceptions import InvalidTag

from snapfs import workers
from snapfs.errors import BlockCorrupt, KeyNotFound, SnapfsError
from snapfs.meta.index import RegionIndex, RestoredSnapshot
from snapfs.model.states import SnapshotStatus
from snapfs.objects.s3packs import PackedS3Backend

if TYPE_CHECKING:
    from snapfs.meta.keys import BlockKeys, KeyRing
    from snapfs.objects.protocol import ObjectStore
    from snapfs.objects.s3packs import PackLocation
    from snapfs.service.region import Region

log = logging.getLogger(__name__)

MAGIC = b"SNFM"
VERSION = 1
# The JSON inside: version 2 (issue 16) adds a sixth column to a delta block's row, its
# base's id, and "bases", the rows of those bases; version 3 (issue 19) adds "locations",
# {block id: [pack, offset, length]} for every block stored in a pack. Older documents read
# as before (their blocks are objects of their own).
DOCUMENT_VERSION = 3
FLAG_ENCRYPTED = 1
HEADER = struct.Struct("<4sBBH16s12s")
REGION_KEY = "region.json"
REGION_FORMAT = "snapfs-region"
SNAPSHOTS = "snapshots/"
DEBOUNCE = 0.2  # seconds: a burst of changes to one snapshot becomes one upload
# Snapshot fields a manifest carries (status is always available, allocated_blocks is
# recounted by the index's triggers).
FIELDS = (
    "id", "name", "size", "mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns",
    "created_at", "sealed_at", "source_snapshot_id", "source_region", "description",
    "retention_days", "encrypted", "kms_key_id", "transferred_bytes",
)  # fmt: skip


Locate = Callable[[str], "PackLocation | None"]


def manifest_key(snapshot_id: str) -> str:
    return SNAPSHOTS + snapshot_id


# --- the format ----------------------------------------------------------------------------


def encode(doc: dict[str, Any], region: str, keys: BlockKeys | None) -> bytes:
    payload = zstandard.ZstdCompressor(level=3).compress(json.dumps(doc).encode())
    if keys is None:
        return HEADER.pack(MAGIC, VERSION, 0, 0, bytes(16), bytes(12)) + payload
    nonce = secrets.token_bytes(12)
    header = HEADER.pack(MAGIC, VERSION, FLAG_ENCRYPTED, 0, keys.key_id_bytes, nonce)
    sealed = keys.manifest_aead.encrypt(nonce, payload, _aad(header, region, doc["id"]))
    return header + sealed


def decode(
    data: bytes, region: str, snapshot_id: str, keys_for: Callable[[bytes], BlockKeys]
) -> dict[str, Any]:
    """A manifest's JSON; BlockCorrupt if damaged or not this snapshot's, KeyNotFound etc.
    from `keys_for` if its key is not here."""
    if len(data) < HEADER.size:
        raise BlockCorrupt(f"manifest {snapshot_id} is truncated")
    magic, version, flags, _, key_id, nonce = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise BlockCorrupt(f"manifest {snapshot_id}: not a snapfs manifest v{VERSION}")
    payload = data[HEADER.size :]
    if flags & FLAG_ENCRYPTED:
        keys = keys_for(key_id)
        try:
            payload = keys.manifest_aead.decrypt(
                nonce, payload, _aad(data[: HEADER.size], region, snapshot_id)
            )
        except InvalidTag:
            raise BlockCorrupt(f"manifest {snapshot_id} fails authentication") from None
    doc = json.loads(zstandard.ZstdDecompressor().decompress(payload))
    if doc.get("id") != snapshot_id or doc.get("region") != region:
        raise BlockCorrupt(f"manifest {snapshot_id} describes another snapshot or region")
    return doc


def _aad(header: bytes, region: str, snapshot_id: str) -> bytes:
    return header + region.encode() + b"\0" + snapshot_id.encode()


def snapshot_document(
    index: RegionIndex, snapshot_id: str, region: str, locate: Locate | None = None
) -> dict | None:
    """The manifest JSON of an available snapshot, from the index (any thread with its own
    connection); None if the snapshot is not (or no longer) available. `locate` gives a
    packed block's pack location (objects/s3packs.py)."""
    row = index.snapshot_row(snapshot_id)
    if row is None or row["deleted"] or row["status"] != SnapshotStatus.AVAILABLE:
        return None
    blocks = index.block_map_with_sizes(snapshot_id)
    bases = index.bases_of(snapshot_id)
    locations: dict[str, list[Any]] = {}
    if locate is not None:
        for hexid in {b[1].lower() for b in blocks} | {b[0].lower() for b in bases}:
            where = locate(hexid)
            if where is not None:
                locations[hexid] = [where.pack, where.offset, where.length]
    return {
        "format": "snapfs-manifest",
        "version": DOCUMENT_VERSION,
        "region": region,
        **{field: row[field] for field in FIELDS},
        "tags": index.tags(snapshot_id),
        "blocks": [
            [no, hexid.lower(), plain, stored, codec, *([base.lower()] if base else [])]
            for no, hexid, plain, stored, codec, base in blocks
        ],
        "bases": [[hexid.lower(), *sizes] for hexid, *sizes in bases],
        "locations": locations,
    }


def region_document(
    index: RegionIndex, name: str, block_size: int, *, shared: bool = False
) -> dict[str, Any]:
    """`region.json`: the region's name, block size and settings (`shared`: several stores
    write it through a ledger in PostgreSQL, which can be rebuilt from this bucket)."""
    doc: dict[str, Any] = {
        "format": REGION_FORMAT,
        "version": VERSION,
        "name": name,
        "block_size": block_size,
        "updated_at": time.time(),
        "settings": index.settings(),
    }
    if shared:
        doc["shared"] = True
    return doc


# --- publishing ----------------------------------------------------------------------------


class ManifestPublisher:
    """Keeps a region's bucket able to rebuild it: a task of the mount, fed by the index's
    change hook (`RegionIndex.on_change`)."""

    def __init__(self, region: Region, meta: ObjectStore, block_size: int):
        self.region = region
        self.meta = meta  # the region's backend for PREFIX/meta/
        self.block_size = block_size
        self._dirty: set[str | None] = set()
        self._sweep = False
        # A shared region's hosts each publish what they change (service/shared.py): a
        # host never sweeps, since a manifest it does not know may be a snapshot another
        # host sealed a moment ago.
        self.shared = False
        self._wanted = trio.Event()
        self._idle = trio.Event()
        self._idle.set()

    def changed(self, snapshot_id: str | None) -> None:
        """A snapshot (or, for None, the region's settings) changed: republish soon."""
        self._dirty.add(snapshot_id)
        self._poke()

    def republish_all(self) -> None:
        """Publish every snapshot and the region metadata, and remove manifests of
        snapshots that are gone (after a stop that may have skipped some)."""
        self._dirty.add(None)
        self._dirty.update(row["id"] for row in self.region.index.snapshots())
        self._sweep = not self.shared
        self._poke()

    def _poke(self) -> None:
        if self._idle.is_set():
            self._idle = trio.Event()
        self._wanted.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until everything changed so far is published; False on timeout, or at once
        if the store's retries were interrupted (its server did not answer at unmount)."""
        if self.meta.interrupted and self.pending:
            return False
        with trio.move_on_after(timeout):
            await self._idle.wait()
            return True
        return False

    @property
    def pending(self) -> bool:
        return not self._idle.is_set()

    async def run(self) -> None:
        while not self.region.closed:
            await self._wanted.wait()
            self._wanted = trio.Event()
            await trio.sleep(DEBOUNCE)
            batch, self._dirty = self._dirty, set()
            sweep, self._sweep = self._sweep, False
            try:
                await self._publish_batch(batch, sweep)
            except Exception as exc:  # noqa: BLE001 - retried; the mount goes on
                log.warning("region %s: publishing manifests failed (%s); will retry",
                            self.region.name, exc)  # fmt: skip
                self._dirty |= batch
                self._sweep |= sweep
                self._wanted.set()
                await trio.sleep(5)
                continue
            if not self._dirty:
                self._idle.set()

    async def _publish_batch(self, batch: set[str | None], sweep: bool) -> None:
        region = self.region
        if region.keys is not None:
            region.keys.prime()
        for snapshot_id in batch:
            if snapshot_id is None:
                await self._run(self._put_region)
                continue
            row = region.index.snapshot_row(snapshot_id)
            keys = None
            if row is not None and region.keys is not None:
                keys = region.keys.for_snapshot(bool(row["encrypted"]), row["kms_key_id"])
            await self._run(self._put_snapshot, snapshot_id, keys)
        if sweep:
            await self._run(self._sweep_stale)

    async def _run(self, fn: Callable[..., None], *args: Any) -> None:
        await workers.run_sync(fn, *args, limiter=self.region.io_limiter)

    def _reader(self) -> RegionIndex:
        return RegionIndex(self.region.index.path, readonly=True)

    def _put_region(self) -> None:
        index = self._reader()
        try:
            doc = region_document(index, self.region.name, self.block_size, shared=self.shared)
        finally:
            index.close()
        self.meta.put(REGION_KEY, json.dumps(doc, indent=1).encode())

    def _put_snapshot(self, snapshot_id: str, keys: BlockKeys | None) -> None:
        index = self._reader()
        backend = self.region.backend
        locate = backend.locate if isinstance(backend, PackedS3Backend) else None
        try:
            doc = snapshot_document(index, snapshot_id, self.region.name, locate)
            gone = doc is None and _gone(index, snapshot_id)
        finally:
            index.close()
        if doc is not None:
            self.meta.put(manifest_key(snapshot_id), encode(doc, self.region.name, keys))
            log.debug("region %s: published manifest of %s", self.region.name, snapshot_id)
        elif gone:
            self.meta.delete(manifest_key(snapshot_id))

    def _sweep_stale(self) -> None:
        index = self._reader()
        try:
            live = {
                row["id"]
                for row in index.snapshots()
                if row["status"] == SnapshotStatus.AVAILABLE and not row["deleted"]
            }
        finally:
            index.close()
        stale = [
            key
            for key in self.meta.keys()  # noqa: SIM118 - a backend, not a dict
            if key.startswith(SNAPSHOTS) and key[len(SNAPSHOTS) :] not in live
        ]
        if stale:
            self.meta.delete_many(stale)
            log.info("region %s: removed %d stale manifests", self.region.name, len(stale))


def _gone(index: RegionIndex, snapshot_id: str) -> bool:
    row = index.snapshot_row(snapshot_id)
    return row is None or bool(row["deleted"])


# --- rebuilding ------------------------------------------------------------------------------


@dataclass
class RebuildReport:
    restored: list[str]
    skipped: list[str]  # "name (id): reason"


def decode_all(
    region: str, manifests: dict[str, bytes], keys_for: Callable[[bytes], BlockKeys]
) -> tuple[list[dict[str, Any]], RebuildReport]:
    """Every manifest that opens; those that do not are reported as skipped."""
    report = RebuildReport([], [])
    docs = []
    for snapshot_id, data in sorted(manifests.items()):
        try:
            docs.append(decode(data, region, snapshot_id, keys_for))
        except SnapfsError as exc:
            report.skipped.append(f"{snapshot_id}: {exc}")
    return docs, report


def needed_blocks(doc: dict[str, Any]) -> list[str]:
    """The object keys a snapshot's manifest needs: its blocks and their delta bases."""
    return [b[1] for b in doc["blocks"]] + [b[0] for b in doc.get("bases", [])]


def rebuild(
    index: RegionIndex,
    settings: dict[str, str],
    decoded: list[dict[str, Any]],
    report: RebuildReport,
    present: set[str],
) -> RebuildReport:
    """Fill an empty index from a bucket's opened manifests (`decode_all`); a snapshot
    whose blocks are not all in the bucket (`present`) is skipped and reported."""
    docs = []
    for doc in decoded:
        needed = needed_blocks(doc)
        missing = sum(1 for key in needed if key not in present)
        if missing:
            report.skipped.append(
                f"{doc['name']} ({doc['id']}): {missing} of its blocks are not in the bucket"
            )
            continue
        docs.append(doc)
    docs.sort(key=lambda d: d["created_at"])
    index.restore(settings, [restored_snapshot(doc) for doc in docs])
    report.restored.extend(doc["name"] for doc in docs)
    return report


def restored_snapshot(doc: dict[str, Any]) -> RestoredSnapshot:
    """The index rows of an opened manifest (a rebuild, a read-only region's refresh)."""
    row = {field: doc[field] for field in FIELDS}
    row.update(status=SnapshotStatus.AVAILABLE, deleted=0)
    blocks = [
        (no, bytes.fromhex(h), plain, stored, codec, bytes.fromhex(rest[0]) if rest else None)
        for no, h, plain, stored, codec, *rest in doc["blocks"]
    ]
    return RestoredSnapshot(
        row=row,
        blocks=blocks,
        tags=doc["tags"],
        key_id=doc["kms_key_id"] if doc["encrypted"] else None,
        bases=[(bytes.fromhex(h), *sizes) for h, *sizes in doc.get("bases", [])],
    )


def key_lookup(ring: KeyRing | None) -> Callable[[bytes], BlockKeys]:
    """Header key id -> block keys, from a primed KeyRing (or none)."""

    def lookup(key_id: bytes) -> BlockKeys:
        if ring is None:
            raise KeyNotFound(
                f"the key {uuid.UUID(bytes=key_id)} is not in this store: import it first"
            )
        return ring.loaded(str(uuid.UUID(bytes=key_id)))

    return lookup
