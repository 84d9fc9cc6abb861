"""Extended attributes: the metadata, progress and control interface of snapshots and regions.

Computed attributes (id, status, progress, lineage, encryption, ...) and every region
setting are virtual: readable and (where writable) settable by name, but not offered by
listxattr, the kernel convention for virtual attributes (CephFS), so that copying tools
(`rsync -X`, `cp -a`, `tar --xattrs`, restic) never try to restore them. What listxattr
offers (description, retention_days, tags) is stored metadata those tools can copy.
Reading a computed attribute of a snapshot that waits out its settle period seals it first:
whoever asks its status is told the final one. Read-only attributes refuse writes with
EPERM; invalid values are refused with EINVAL and change nothing; names snapfs does not know
are ENOTSUP to set and ENODATA to read (so the kernel's `security.capability` probe before
every write gets a cheap answer).

Setting `user.snapfs.seal` on a snapshot (any value) is `snapfs seal`.

In a region attached read-only (`user.snapfs.read_only` is `true`) every set and remove,
of the region's settings and of its snapshots' metadata, is refused with EROFS.

Setting `user.snapfs.copy` on a region directory is the CopySnapshot API that `snapfs copy`
uses: the value is JSON {"source": "REGION/NAME", "name": N, "description": D,
"retention_days": R, "tags": {K: V}}; the new snapshot appears in the region as `copying`.

This module is a table from attribute name to a service call (service/metadata.py and the
Store); it holds no storage logic and never touches the index.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from snapfs.errors import AttributeNotSupported, InvalidParameter, NoSuchAttribute, NotPermitted
from snapfs.model.clock import expires_at, iso8601
from snapfs.model.states import SnapshotStatus
from snapfs.service import metadata, regionadmin
from snapfs.service.region import Region
from snapfs.service.snapshots import Snapshot
from snapfs.service.store import Store

PREFIX = "user.snapfs."
TAG_PREFIX = "user.tag."
SEAL_ATTR = PREFIX + "seal"
PARENT_ATTR = PREFIX + "parent"  # `snapfs clone`: a new, empty snapshot takes a parent's content
COPY_ATTR = PREFIX + "copy"


@dataclass(frozen=True)
class SnapshotAttribute:
    read: Callable[[Snapshot], str | None]
    write: Callable[[Snapshot, str], None] | None = None  # None: read-only (EPERM)
    clear: Callable[[Snapshot], None] | None = None  # removexattr
    listed: bool = False  # stored metadata a copying tool may carry over


@dataclass(frozen=True)
class RegionAttribute:
    read: Callable[[Store, Region], str | None]
    write: Callable[[Store, Region, str, str], None] | None = None  # (..., value, name)
    clear: Callable[[Region], None] | None = None


def _expiry(snap: Snapshot) -> str | None:
    due = expires_at(snap.created_at, snap.retention_days)
    return None if due is None else iso8601(due)


def _clear(field: str) -> Callable[[Snapshot], None]:
    return lambda snap: metadata.clear_field(snap, field)


SNAPSHOT_ATTRIBUTES: dict[str, SnapshotAttribute] = {
    "id": SnapshotAttribute(lambda s: s.id),
    "status": SnapshotAttribute(lambda s: s.status),
    "progress": SnapshotAttribute(lambda s: f"{s.progress:.2f}".rstrip("0").rstrip(".")),
    "error": SnapshotAttribute(lambda s: s.error if s.status == SnapshotStatus.FAILED else None),
    "source_snapshot_id": SnapshotAttribute(lambda s: s.source_snapshot_id),
    "source_region": SnapshotAttribute(lambda s: s.source_region),
    "transferred_bytes": SnapshotAttribute(lambda s: str(s.transferred_bytes)),
    "encrypted": SnapshotAttribute(lambda s: "true" if s.encrypted else "false"),
    "kms_key_id": SnapshotAttribute(lambda s: s.kms_key_id or ""),
    "description": SnapshotAttribute(
        lambda s: s.description, metadata.set_description, _clear("description"), listed=True
    ),
    "retention_days": SnapshotAttribute(
        lambda s: None if s.retention_days is None else str(s.retention_days),
        metadata.set_retention_days,
        _clear("retention_days"),
        listed=True,
    ),
    "expires_at": SnapshotAttribute(_expiry),
}


def _setting(key: str) -> Callable[[Store, Region, str, str], None]:
    return lambda store, region, value, name: metadata.set_region_setting(
        store, region, key, value, name
    )


def _clear_setting(key: str) -> Callable[[Region], None]:
    return lambda region: metadata.clear_region_setting(region, key)


REGION_ATTRIBUTES: dict[str, RegionAttribute] = {
    "encrypt_by_default": RegionAttribute(
        lambda st, r: "true" if r.encrypt_by_default else "false", _setting("encrypt_by_default")
    ),
    "default_kms_key_id": RegionAttribute(
        lambda st, r: r.default_kms_key_id or "",
        _setting("default_kms_key_id"),
        _clear_setting("default_kms_key_id"),
    ),
    "max_parallel_copies": RegionAttribute(
        lambda st, r: str(r.max_parallel_copies), _setting("max_parallel_copies")
    ),
    "snapshot_quota": RegionAttribute(
        lambda st, r: None if r.snapshot_quota is None else str(r.snapshot_quota),
        _setting("snapshot_quota"),
        _clear_setting("snapshot_quota"),
    ),
    "compression": RegionAttribute(lambda st, r: r.compression, _setting("compression")),
    "deltas": RegionAttribute(lambda st, r: "on" if r.deltas else "off", _setting("deltas")),
    "copies_running": RegionAttribute(lambda st, r: str(st.copies.running(r))),
    "copies_queued": RegionAttribute(lambda st, r: str(st.copies.queued(r))),
    "read_only": RegionAttribute(lambda st, r: "true" if r.read_only else "false"),
}

# Writes that are commands rather than stored values.
SNAPSHOT_COMMANDS: dict[str, Callable[[Store, Snapshot, str], Awaitable[None]]] = {
    SEAL_ATTR: lambda store, snap, value: store.seal(snap),
    PARENT_ATTR: lambda store, snap, value: store.clone_from(snap, value),
}
REGION_COMMANDS: dict[str, Callable[[Store, Region, str], Awaitable[None]]] = {
    COPY_ATTR: metadata.copy_request,
}
# On the mount's root: `snapfs region create/attach` while mounted.
ROOT_COMMANDS: dict[str, Callable[[Store, bytes], Awaitable[None]]] = {
    regionadmin.CREATE_ATTR: metadata.create_region_request,
    regionadmin.ATTACH_ATTR: metadata.attach_region_request,
}


def _snapshot_attribute(name: str) -> SnapshotAttribute | None:
    return SNAPSHOT_ATTRIBUTES.get(name[len(PREFIX) :]) if name.startswith(PREFIX) else None


def _region_attribute(name: str) -> RegionAttribute | None:
    return REGION_ATTRIBUTES.get(name[len(PREFIX) :]) if name.startswith(PREFIX) else None


def names(store: Store, node: Region | Snapshot | None) -> list[str]:
    """What listxattr offers: a snapshot's stored, writable metadata only."""
    if isinstance(node, Snapshot):
        found = [
            PREFIX + key
            for key, attr in SNAPSHOT_ATTRIBUTES.items()
            if attr.listed and attr.read(node) is not None
        ]
        return found + [TAG_PREFIX + key for key in metadata.tags(node)]
    return []


def computed(name: str) -> bool:
    """A snapshot attribute computed by snapfs (not listed; reading it seals)."""
    attr = _snapshot_attribute(name)
    return attr is not None and not attr.listed


async def get(store: Store, node: Region | Snapshot | None, name: str) -> bytes:
    value: str | None = None
    if isinstance(node, Snapshot):
        if computed(name):
            await store.seal_settling(node, quiet=True)  # a full disk: it says `creating`
        if (attr := _snapshot_attribute(name)) is not None:
            value = attr.read(node)
        elif name.startswith(TAG_PREFIX):
            value = metadata.tags(node).get(name[len(TAG_PREFIX) :])
    elif isinstance(node, Region) and (region_attr := _region_attribute(name)) is not None:
        value = region_attr.read(store, node)
    if value is None:
        raise NoSuchAttribute(f"no attribute {name}")
    return value.encode()


async def set(store: Store, node: Region | Snapshot | None, name: str, raw: bytes) -> None:  # noqa: A001
    if node is None and (root_command := ROOT_COMMANDS.get(name)) is not None:
        await root_command(store, raw)
        return
    _check_writable(node, name)
    value = _text(raw)
    if isinstance(node, Snapshot):
        if (command := SNAPSHOT_COMMANDS.get(name)) is not None:
            await command(store, node, value)
        elif name.startswith(TAG_PREFIX):
            metadata.set_tag(node, name[len(TAG_PREFIX) :], value)
        else:
            attr = _snapshot_attribute(name)
            _refuse_unless_writable(name, attr is not None, attr is not None and attr.write)
            assert attr is not None and attr.write is not None
            attr.write(node, value)
    elif isinstance(node, Region):
        if (region_command := REGION_COMMANDS.get(name)) is not None:
            await region_command(store, node, value)
        else:
            region_attr = _region_attribute(name)
            known = region_attr is not None
            writable = region_attr is not None and region_attr.write is not None
            _refuse_unless_writable(name, known, writable)
            assert region_attr is not None and region_attr.write is not None
            region_attr.write(store, node, value, name)
    else:
        raise AttributeNotSupported(f"snapfs does not store the attribute {name}")


def _refuse_unless_writable(name: str, known: bool, writable: object) -> None:
    """ENOTSUP for a name snapfs does not store, EPERM for a read-only one."""
    if not known:
        raise AttributeNotSupported(f"snapfs does not store the attribute {name}")
    if not writable:
        raise NotPermitted(f"{name} is read-only")


def _check_writable(node: Region | Snapshot | None, name: str) -> None:
    """EROFS for any attribute change in a region attached read-only."""
    region = node.region if isinstance(node, Snapshot) else node
    if region is not None:
        region.check_writable(f"setting {name}")


async def remove(store: Store, node: Region | Snapshot | None, name: str) -> None:
    _check_writable(node, name)
    if isinstance(node, Snapshot):
        if name.startswith(TAG_PREFIX):
            metadata.remove_tag(node, name[len(TAG_PREFIX) :], name)
            return
        if (attr := _snapshot_attribute(name)) is not None and attr.clear is not None:
            attr.clear(node)
            return
    if isinstance(node, Region):
        region_attr = _region_attribute(name)
        if region_attr is not None and region_attr.clear is not None:
            region_attr.clear(node)
            return
    await set(store, node, name, b"")


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidParameter("attribute values must be UTF-8 text") from None
