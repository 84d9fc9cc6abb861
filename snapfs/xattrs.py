"""Extended attributes: the metadata and progress interface of snapshots and regions.

`getfattr -d -m - FILE` lists what `names()` returns. Read-only attributes refuse writes
with EPERM; names snapfs does not know are ENOTSUP to set and ENODATA to read (so tools
probing `security.capability` before every write get a cheap answer).
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import AttributeNotSupported, NoSuchAttribute, NotPermitted
from .region import Region
from .snapshots import FAILED, Snapshot
from .store import Store

PREFIX = "user.snapfs."


def _fmt_progress(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


_SNAPSHOT_READERS: dict[str, Callable[[Snapshot], str | None]] = {
    "id": lambda s: s.id,
    "status": lambda s: s.status,
    "progress": lambda s: _fmt_progress(s.progress),
    "error": lambda s: s.error if s.status == FAILED else None,
    "source_snapshot_id": lambda s: s.source_snapshot_id,
    "source_region": lambda s: s.source_region,
    "transferred_bytes": lambda s: str(s.transferred_bytes),
    "encrypted": lambda s: "true" if s.encrypted else "false",
    "kms_key_id": lambda s: s.kms_key_id or "",
    "description": lambda s: s.description,
    "retention_days": lambda s: None if s.retention_days is None else str(s.retention_days),
}


def names(node: Region | Snapshot | None) -> list[str]:
    if not isinstance(node, Snapshot):
        return []
    return [PREFIX + key for key, read in _SNAPSHOT_READERS.items() if read(node) is not None]


def get(node: Region | Snapshot | None, name: str) -> bytes:
    if isinstance(node, Snapshot) and name.startswith(PREFIX):
        read = _SNAPSHOT_READERS.get(name[len(PREFIX) :])
        value = read(node) if read else None
        if value is not None:
            return value.encode()
    raise NoSuchAttribute(f"no attribute {name}")


def set(store: Store, node: Region | Snapshot | None, name: str, value: bytes) -> None:  # noqa: A001
    if isinstance(node, Snapshot) and name[len(PREFIX) :] in _SNAPSHOT_READERS:
        raise NotPermitted(f"{name} is read-only")
    raise AttributeNotSupported(f"snapfs does not store the attribute {name}")


def remove(store: Store, node: Region | Snapshot | None, name: str) -> None:
    set(store, node, name, b"")
