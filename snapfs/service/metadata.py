"""Stored metadata of snapshots and regions, changed by name: the service behind the xattr
table (fuse/xattrs.py), so that the FUSE layer never touches the index.

Every change commits to the index first and then changes memory: a refusal or a failed
commit (a full disk) changes nothing.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from snapfs.errors import InvalidParameter, InvalidTagCount, KeyIdNotFound, NoSuchAttribute
from snapfs.model import params
from snapfs.service import regionadmin

if TYPE_CHECKING:
    from snapfs.service.region import Region
    from snapfs.service.snapshots import Snapshot
    from snapfs.service.store import Store

# Snapshot fields a user may set and clear (others are computed).
SNAPSHOT_FIELDS = ("description", "retention_days")
# Region settings, with what clearing one means.
REGION_SETTINGS = (
    "max_parallel_copies",
    "snapshot_quota",
    "compression",
    "deltas",
    "default_kms_key_id",
    "encrypt_by_default",
)
CLEARABLE_SETTINGS = ("snapshot_quota", "default_kms_key_id")


def tags(snap: Snapshot) -> dict[str, str]:
    return snap.region.index.tags(snap.id)


def set_description(snap: Snapshot, value: str) -> None:
    description = params.check_description(value)
    snap.region.index.update_snapshot(snap.id, description=description)
    snap.description = description


def set_retention_days(snap: Snapshot, value: str) -> None:
    days = params.check_retention_days(value)
    snap.region.index.update_snapshot(snap.id, retention_days=days)
    snap.retention_days = days


def clear_field(snap: Snapshot, field: str) -> None:
    assert field in SNAPSHOT_FIELDS, field
    snap.region.index.update_snapshot(snap.id, **{field: None})
    setattr(snap, field, None)


def set_tag(snap: Snapshot, key: str, value: str) -> None:
    key = params.check_tag_key(key)
    params.check_tag_value(value)
    current = tags(snap)
    if key not in current and len(current) >= params.MAX_TAGS:
        raise InvalidTagCount(f"a snapshot has at most {params.MAX_TAGS} tags")
    snap.region.index.set_tag(snap.id, key, value)


def remove_tag(snap: Snapshot, key: str, attribute: str) -> None:
    if key not in tags(snap):
        raise NoSuchAttribute(f"no attribute {attribute}")
    snap.region.index.set_tag(snap.id, key, None)


def _positive(value: str, name: str, limit: int) -> int:
    # ASCII digits only, and few of them: str.isdigit() accepts "²", which int() refuses,
    # and int() refuses more than 4300 digits.
    if not re.fullmatch(r"[0-9]{1,20}", value) or not 1 <= int(value) <= limit:
        raise InvalidParameter(f"{name} must be a whole number from 1 to {limit}, got {value!r}")
    return int(value)


def set_region_setting(store: Store, region: Region, key: str, value: str, name: str) -> None:
    """Set region setting `key` (one of REGION_SETTINGS); `name` is how the user called it."""
    if key == "max_parallel_copies":
        region.index.set_setting(key, str(_positive(value, name, 100_000)))
        store.copies.reschedule(region)
    elif key == "snapshot_quota":
        region.index.set_setting(key, str(_positive(value, name, 1 << 40)))
    elif key == "compression":
        region.set_compression(value)
    elif key == "deltas":
        region.set_deltas(value)
    elif key == "default_kms_key_id":
        region.index.set_setting(key, store.keys.usable(value.strip(), region.name).id)
    elif key == "encrypt_by_default":
        if value not in ("true", "false"):
            raise InvalidParameter(f"{name} is true or false, got {value!r}")
        if value == "true" and region.default_kms_key_id is None:
            raise KeyIdNotFound(f"region {region.name} has no default_kms_key_id: set it first")
        region.index.set_setting(key, value)
    else:
        raise AssertionError(key)


def clear_region_setting(region: Region, key: str) -> None:
    assert key in CLEARABLE_SETTINGS, key
    region.index.set_setting(key, "")


async def create_region_request(store: Store, raw: bytes) -> None:
    """`snapfs region create --backend s3://...` on a mounted store (network work)."""
    name, location = regionadmin.parse_request(raw)
    index = regionadmin.index_option(raw)
    if index is None:
        await store.create_remote_region(name, location)
    else:
        await store.create_shared_region(name, location, index)


async def attach_region_request(store: Store, raw: bytes) -> None:
    """`snapfs region attach` on a mounted store: the region rebuilt from its bucket."""
    name, location = regionadmin.parse_request(raw)
    read_only, refresh = regionadmin.attach_options(raw)
    index = regionadmin.index_option(raw)
    if index is None:
        await store.attach_region(name, location, read_only=read_only, refresh=refresh)
    elif read_only:
        raise InvalidParameter(
            "--read-only attaches a bucket without its shared index (disaster recovery); "
            "with --index the region is joined to write"
        )
    else:
        await store.attach_shared_region(name, location, index, wait=True)


async def copy_request(store: Store, dst_region: Region, value: str) -> None:
    """A CopySnapshot request written to a region (`user.snapfs.copy`, JSON)."""
    request = params.parse_copy_request(value)
    src_region_name, _, src_name = request["source"].partition("/")
    name = request.get("name") or src_name
    description = request.get("description")
    retention = request.get("retention_days")
    tag_list = params.check_tags(list((request.get("tags") or {}).items()))
    if request.get("name"):
        params.check_cloud_snapshot_name(name)
    await store.copy_snapshot(
        store.region(src_region_name), src_name, dst_region, name,
        description=None if description is None else params.check_description(description),
        retention_days=None if retention is None else params.check_retention_days(retention),
        tags=tag_list, encrypted=request.get("encrypted"),
        kms_key_id=request.get("kms_key_id") or None,
    )  # fmt: skip
