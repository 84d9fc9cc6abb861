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

Setting `user.snapfs.copy` on a region directory is the CopySnapshot API that `snapfs copy`
uses: the value is JSON {"source": "REGION/NAME", "name": N, "description": D,
"retention_days": R, "tags": {K: V}}; the new snapshot appears in the region as `copying`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from snapfs.errors import AttributeNotSupported, InvalidParameter, NoSuchAttribute, NotPermitted
from snapfs.model import params
from snapfs.model.clock import expires_at, iso8601
from snapfs.model.names import is_text
from snapfs.model.states import SnapshotStatus
from snapfs.service.region import Region
from snapfs.service.snapshots import Snapshot
from snapfs.service.store import Store

PREFIX = "user.snapfs."
TAG_PREFIX = "user.tag."


def _expiry(snap: Snapshot) -> str | None:
    due = expires_at(snap.created_at, snap.retention_days)
    return None if due is None else iso8601(due)


_SNAPSHOT_READERS: dict[str, Callable[[Snapshot], str | None]] = {
    "id": lambda s: s.id,
    "status": lambda s: s.status,
    "progress": lambda s: f"{s.progress:.2f}".rstrip("0").rstrip("."),
    "error": lambda s: s.error if s.status == SnapshotStatus.FAILED else None,
    "source_snapshot_id": lambda s: s.source_snapshot_id,
    "source_region": lambda s: s.source_region,
    "transferred_bytes": lambda s: str(s.transferred_bytes),
    "encrypted": lambda s: "true" if s.encrypted else "false",
    "kms_key_id": lambda s: s.kms_key_id or "",
    "description": lambda s: s.description,
    "retention_days": lambda s: None if s.retention_days is None else str(s.retention_days),
    "expires_at": _expiry,
}


_REGION_READERS: dict[str, Callable[[Store, Region], str | None]] = {
    "encrypt_by_default": lambda st, r: "true" if r.encrypt_by_default else "false",
    "default_kms_key_id": lambda st, r: r.default_kms_key_id or "",
    "max_parallel_copies": lambda st, r: str(r.max_parallel_copies),
    "snapshot_quota": lambda st, r: None if r.snapshot_quota is None else str(r.snapshot_quota),
    "compression": lambda st, r: r.compression,
    "copies_running": lambda st, r: str(st.copies.running(r)),
    "copies_queued": lambda st, r: str(st.copies.queued(r)),
}


# Stored metadata a copying tool may carry over; everything else is computed (not listed).
_LISTED = ("description", "retention_days")
SEAL_ATTR = PREFIX + "seal"


def names(store: Store, node: Region | Snapshot | None) -> list[str]:
    """What listxattr offers: a snapshot's stored, writable metadata only."""
    if isinstance(node, Snapshot):
        found = [PREFIX + k for k in _LISTED if _SNAPSHOT_READERS[k](node) is not None]
        return found + [TAG_PREFIX + key for key in node.region.index.tags(node.id)]
    return []


def computed(name: str) -> bool:
    """A snapshot attribute computed by snapfs (not listed; reading it seals)."""
    return (
        name.startswith(PREFIX)
        and name[len(PREFIX) :] in _SNAPSHOT_READERS
        and (name[len(PREFIX) :] not in _LISTED)
    )


async def get(store: Store, node: Region | Snapshot | None, name: str) -> bytes:
    value: str | None = None
    if isinstance(node, Snapshot):
        if computed(name):
            await store.seal_settling(node, quiet=True)  # a full disk: it says `creating`
        if name.startswith(PREFIX) and (read := _SNAPSHOT_READERS.get(name[len(PREFIX) :])):
            value = read(node)
        elif name.startswith(TAG_PREFIX):
            value = node.region.index.tags(node.id).get(name[len(TAG_PREFIX) :])
    elif isinstance(node, Region) and name.startswith(PREFIX):
        read_region = _REGION_READERS.get(name[len(PREFIX) :])
        value = read_region(store, node) if read_region else None
    if value is None:
        raise NoSuchAttribute(f"no attribute {name}")
    return value.encode()


async def set(store: Store, node: Region | Snapshot | None, name: str, raw: bytes) -> None:  # noqa: A001
    value = _text(raw)
    if isinstance(node, Snapshot) and name == SEAL_ATTR:
        await store.seal(node)
    elif isinstance(node, Snapshot):
        _set_snapshot(node, name, value)
    elif isinstance(node, Region) and name == PREFIX + "copy":
        await _copy_request(store, node, value)
    elif isinstance(node, Region):
        _set_region(store, node, name, value)
    else:
        raise AttributeNotSupported(f"snapfs does not store the attribute {name}")


async def remove(store: Store, node: Region | Snapshot | None, name: str) -> None:
    if isinstance(node, Snapshot):
        if name.startswith(TAG_PREFIX):
            key = name[len(TAG_PREFIX) :]
            if key not in node.region.index.tags(node.id):
                raise NoSuchAttribute(f"no attribute {name}")
            node.region.index.set_tag(node.id, key, None)
            return
        if name in (PREFIX + "description", PREFIX + "retention_days"):
            field = name[len(PREFIX) :]
            node.region.index.update_snapshot(node.id, **{field: None})
            setattr(node, field, None)
            return
    if isinstance(node, Region) and name in (
        PREFIX + "snapshot_quota",
        PREFIX + "default_kms_key_id",
    ):
        node.index.set_setting(name[len(PREFIX) :], "")
        return
    await set(store, node, name, b"")


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidParameter("attribute values must be UTF-8 text") from None


def _set_snapshot(snap: Snapshot, name: str, value: str) -> None:
    # The index first, then memory: a refusal or a failed commit (disk full) changes nothing.
    if name == PREFIX + "description":
        description = params.check_description(value)
        snap.region.index.update_snapshot(snap.id, description=description)
        snap.description = description
    elif name == PREFIX + "retention_days":
        days = params.check_retention_days(value)
        snap.region.index.update_snapshot(snap.id, retention_days=days)
        snap.retention_days = days
    elif name.startswith(TAG_PREFIX):
        key = params.check_tag_key(name[len(TAG_PREFIX) :])
        params.check_tag_value(value)
        tags = snap.region.index.tags(snap.id)
        if key not in tags and len(tags) >= params.MAX_TAGS:
            raise InvalidParameter(
                f"a snapshot has at most {params.MAX_TAGS} tags", code="InvalidTagCount"
            )
        snap.region.index.set_tag(snap.id, key, value)
    elif name.startswith(PREFIX) and name[len(PREFIX) :] in _SNAPSHOT_READERS:
        raise NotPermitted(f"{name} is read-only")
    else:
        raise AttributeNotSupported(f"snapfs does not store the attribute {name}")


def _positive(value: str, name: str, limit: int) -> int:
    # ASCII digits only, and few of them: str.isdigit() accepts "²", which int() refuses,
    # and int() refuses more than 4300 digits.
    if not re.fullmatch(r"[0-9]{1,20}", value) or not 1 <= int(value) <= limit:
        raise InvalidParameter(f"{name} must be a whole number from 1 to {limit}, got {value!r}")
    return int(value)


def _set_region(store: Store, region: Region, name: str, value: str) -> None:
    key = name[len(PREFIX) :] if name.startswith(PREFIX) else None
    if key == "max_parallel_copies":
        region.index.set_setting(key, str(_positive(value, name, 100_000)))
        store.copies.reschedule(region)
    elif key == "snapshot_quota":
        region.index.set_setting(key, str(_positive(value, name, 1 << 40)))
    elif key == "compression":
        region.set_compression(value)
    elif key == "default_kms_key_id":
        region.index.set_setting(key, store.keys.usable(value.strip(), region.name).id)
    elif key == "encrypt_by_default":
        if value not in ("true", "false"):
            raise InvalidParameter(f"{name} is true or false, got {value!r}")
        if value == "true" and region.default_kms_key_id is None:
            raise InvalidParameter(
                f"region {region.name} has no default_kms_key_id: set it first",
                code="InvalidParameter.KMSKeyId.NotFound",
            )
        region.index.set_setting(key, value)
    elif key in _REGION_READERS:
        raise NotPermitted(f"{name} is read-only")
    else:
        raise AttributeNotSupported(f"snapfs does not store the attribute {name}")


async def _copy_request(store: Store, dst_region: Region, value: str) -> None:
    request = _parse_copy_request(value)
    src_region_name, _, src_name = request["source"].partition("/")
    name = request.get("name") or src_name
    description = request.get("description")
    retention = request.get("retention_days")
    tags = params.check_tags(list((request.get("tags") or {}).items()))
    if request.get("name"):
        params.check_cloud_snapshot_name(name)
    await store.copy_snapshot(
        store.region(src_region_name), src_name, dst_region, name,
        description=None if description is None else params.check_description(description),
        retention_days=None if retention is None else params.check_retention_days(retention),
        tags=tags, encrypted=request.get("encrypted"),
        kms_key_id=request.get("kms_key_id") or None,
    )  # fmt: skip


# The JSON types each field of a copy request may have (None: absent or null).
_COPY_FIELDS: dict[str, tuple[type, ...]] = {
    "source": (str,),
    "name": (str,),
    "description": (str,),
    "retention_days": (int, str),
    "tags": (dict,),
    "encrypted": (bool,),
    "kms_key_id": (str,),
}


def _parse_copy_request(value: str) -> dict:
    """The request as a dict whose fields have the types the CopySnapshot rules expect; any
    other JSON (a list, a number for a name, a boolean for a retention...) is EINVAL."""
    try:
        request = json.loads(value)
    except ValueError:
        request = None
    if not isinstance(request, dict) or not isinstance(request.get("source"), str):
        raise InvalidParameter('a copy request is JSON {"source": "REGION/NAME", ...}')
    for key, item in request.items():
        types = _COPY_FIELDS.get(key)
        if types is None:
            raise InvalidParameter(f"a copy request has no field {key!r}")
        # bool is an int to Python, never a retention to a user
        if item is not None and (
            not isinstance(item, types) or (bool not in types and isinstance(item, bool))
        ):
            raise InvalidParameter(f"the copy request's {key} has the wrong type")
    tags = request.get("tags") or {}
    if not all(isinstance(v, str) for v in tags.values()):
        raise InvalidParameter("tag values in a copy request are strings")
    texts = [v for v in request.values() if isinstance(v, str)] + [*tags, *tags.values()]
    if not all(is_text(t) for t in texts):  # JSON can carry lone surrogates ("\ud800")
        raise InvalidParameter("a copy request's strings must be Unicode text")
    return request
