"""Name rules: region ids, snapshot file names, and the stricter cloud snapshot name."""

from __future__ import annotations

import re
import secrets

from snapfs.errors import InvalidName, InvalidRegionName

REGION_NAME = re.compile(r"[a-z][a-z0-9-]{1,62}")
CLOUD_SNAPSHOT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9:_-]{1,127}")
NAME_MAX = 255


def check_region_name(name: str) -> str:
    """A region id like a cloud's: 2-63 chars of a-z, 0-9 and '-', starting with a letter."""
    if not REGION_NAME.fullmatch(name):
        raise InvalidRegionName(
            f"region name {name!r} must be 2-63 characters of a-z, 0-9 and '-', "
            "starting with a letter"
        )
    return name


def check_snapshot_filename(name: str) -> str:
    """Any valid POSIX file name that is UTF-8 text, so that tools writing temp files and
    renaming them work. Names are text in the index, in `snapfs status --json` and in the
    cloud APIs, so bytes that are not UTF-8 (decoded with surrogateescape) are refused."""
    raw = name.encode("utf-8", "surrogateescape")
    if not raw or name in (".", "..") or b"/" in raw or b"\0" in raw:
        raise InvalidName(f"snapshot name {name!r} is not a valid file name")
    if len(raw) > NAME_MAX:
        raise InvalidName(f"snapshot name is {len(raw)} bytes, the limit is {NAME_MAX}")
    if not is_text(name):
        raise InvalidName(f"snapshot name {name!r} is not UTF-8 text")
    return name


def is_text(value: str) -> bool:
    """True unless `value` holds bytes that were not UTF-8 (os.fsdecode's surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_cloud_snapshot_name(name: str) -> str:
    """DestinationSnapshotName of CopySnapshot: 2-128 chars, starts with a letter, no URLs."""
    if name.startswith(("http://", "https://")) or not CLOUD_SNAPSHOT_NAME.fullmatch(name):
        raise InvalidName(
            f"snapshot name {name!r} must be 2-128 characters of letters, digits, ':', '_' "
            "and '-', start with a letter and not start with http:// or https://"
        )
    return name


def new_snapshot_id() -> str:
    """`s-` and 16 hex digits, like the clouds' snapshot ids."""
    return "s-" + secrets.token_hex(8)


SNAPSHOT_INO_BASE = 1 << 62


def snapshot_ino(snapshot_id: str) -> int:
    """A snapshot's inode number follows from its id, so it is stable across mounts.

    Region inodes are small integers; snapshot inodes live above 2**62, so the two never meet.
    """
    return SNAPSHOT_INO_BASE | (int(snapshot_id[2:], 16) & (SNAPSHOT_INO_BASE - 1))
