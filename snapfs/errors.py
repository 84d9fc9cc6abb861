"""Errors that carry a cloud-style code, a one-line message and the errno for the caller.

Every refusal snapfs makes is a `SnapfsError`: the FUSE layer turns it into the errno, the
command line prints `code: message`, and both log it. Anything else that escapes is a bug and
surfaces as `EIO`.

Each cloud code has its class here, with its errno (named from the `errno` module): the rest
of snapfs raises the class and never spells a code or an errno number itself. A bad
parameter subclasses `InvalidParameter`, a damaged block `BlockCorrupt`, so a handler of the
general refusal still catches the particular one.
"""

from __future__ import annotations

import errno as errno_mod
import sqlite3
from collections.abc import Iterator


class SnapfsError(Exception):
    """A refusal with a cloud error code, a message for people and an errno for syscalls."""

    code: str = "InternalError"
    errno: int = errno_mod.EIO

    def __init__(self, message: str, *, code: str | None = None, errno: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if errno is not None:
            self.errno = errno

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidTransition(SnapfsError):
    """A bug, not bad input: the code tried a change the snapshot lifecycle does not have."""

    code = "InternalError.InvalidTransition"


class NotFound(SnapfsError):
    code = "InvalidSnapshotId.NotFound"
    errno = errno_mod.ENOENT


class RegionNotFound(SnapfsError):
    code = "InvalidRegionId.NotFound"
    errno = errno_mod.ENOENT


class RegionAlreadyExists(SnapfsError):
    """A region of that name exists, or the bucket prefix already holds one."""

    code = "InvalidRegionId.Duplicate"
    errno = errno_mod.EEXIST


class RegionMetadataMalformed(SnapfsError):
    """A bucket prefix's `meta/region.json` is not snapfs region metadata."""

    code = "InvalidRegion.Malformed"
    errno = errno_mod.EINVAL


class AlreadyExists(SnapfsError):
    code = "InvalidSnapshotName.Duplicate"
    errno = errno_mod.EEXIST


class InvalidName(SnapfsError):
    code = "InvalidSnapshotName.Malformed"
    errno = errno_mod.EINVAL


class InvalidRegionName(SnapfsError):
    code = "InvalidRegionId.Malformed"
    errno = errno_mod.EINVAL


class InvalidParameter(SnapfsError):
    code = "InvalidParameter"
    errno = errno_mod.EINVAL


class InvalidTagCount(InvalidParameter):
    code = "InvalidTagCount"


class KeyIdNotFound(InvalidParameter):
    """A setting or request names no usable default key."""

    code = "InvalidParameter.KMSKeyId.NotFound"


class KeyIdDuplicate(InvalidParameter):
    """An imported key is already in the store."""

    code = "InvalidParameter.KMSKeyId.Duplicate"
    errno = errno_mod.EEXIST


class InvalidBlockSize(InvalidParameter):
    """A region's block size is not the store's."""

    code = "InvalidParameter.BlockSize"


class RegionIdMismatch(InvalidParameter):
    """The region at a bucket prefix has another name than the one asked for."""

    code = "InvalidRegionId.Mismatch"


class InvalidDescription(InvalidParameter):
    code = "InvalidDescription.Malformed"


class InvalidRetentionDays(InvalidParameter):
    code = "InvalidRetentionDays.Malformed"


class InvalidTagKey(InvalidParameter):
    code = "InvalidTagKey.Malformed"


class InvalidTagValue(InvalidParameter):
    code = "InvalidTagValue.Malformed"


class DuplicateTagKey(InvalidParameter):
    code = "Duplicate.TagKey"


# --- keys (meta/keys.py) ------------------------------------------------------------------------


class KeyNotFound(SnapfsError):
    """A customer master key that is unknown, of another region, or not loaded."""

    code = "InvalidParameter.KMSKeyId.NotFound"
    errno = errno_mod.ENOKEY


class KeyDisabled(SnapfsError):
    code = "InvalidParameter.KMSKeyId.CMKNotEnabled"
    errno = errno_mod.EKEYREVOKED


class WrongPassphrase(SnapfsError):
    code = "InvalidPassphrase"
    errno = errno_mod.EACCES


class MasterKeyNotFound(SnapfsError):
    """The store's master key file is missing."""

    code = "MasterKey.NotFound"
    errno = errno_mod.ENOKEY


class NotReady(SnapfsError):
    code = "InvalidSnapshotId.NotReady"
    errno = errno_mod.EBUSY


class QuotaExceeded(SnapfsError):
    code = "QuotaExceed.SnapshotQuota"
    errno = errno_mod.EDQUOT


class SnapshotFailed(SnapfsError):
    """A snapshot in the `failed` state (a copy that did not finish, a seal that failed)."""

    code = "InvalidSnapshot.Failed"
    errno = errno_mod.EIO


class Sealed(SnapfsError):
    code = "InvalidSnapshot.Sealed"
    errno = errno_mod.EPERM


class NotPermitted(SnapfsError):
    code = "OperationDenied"
    errno = errno_mod.EPERM


class ReadOnlyRegion(SnapfsError):
    """A change to a region attached read-only (`snapfs region attach --read-only`: a
    disaster-recovery view of a bucket another store owns): nothing in it changes here."""

    code = "OperationNotPermitted.ReadOnlyRegion"
    errno = errno_mod.EROFS


class RegionNotEmpty(SnapfsError):
    code = "InvalidRegion.NotEmpty"
    errno = errno_mod.ENOTEMPTY


class StoreFull(SnapfsError):
    code = "StoreFull"
    errno = errno_mod.ENOSPC


class BlockCorrupt(SnapfsError):
    code = "BlockCorrupt"
    errno = errno_mod.EIO


class ObjectMissing(BlockCorrupt):
    """A block object that the index names is not in the backend at all."""


class SnapshotDamaged(BlockCorrupt):
    """A block of a snapshot being copied is damaged and cannot be copied from elsewhere."""

    code = "InvalidSnapshot.Damaged"


class StoreBusy(SnapfsError):
    code = "StoreBusy"
    errno = errno_mod.EBUSY


class StoreFormat(SnapfsError):
    code = "StoreFormat.Unsupported"
    errno = errno_mod.EINVAL


class StoreNotFound(SnapfsError):
    """No snapfs store (no `store.db`) at the path given."""

    code = "StoreNotFound"
    errno = errno_mod.ENOENT


class StoreIOError(SnapfsError):
    """The disk failed a read or write; the errno is the OSError's when there is one."""

    code = "StoreIOError"
    errno = errno_mod.EIO


class MountPointInUse(SnapfsError):
    code = "MountPoint.InUse"
    errno = errno_mod.EBUSY


class MountPointNotFound(SnapfsError):
    """The mountpoint is missing or not a directory."""

    code = "MountPoint.NotFound"
    errno = errno_mod.ENOENT


class NoSuchAttribute(SnapfsError):
    code = "InvalidAttribute.NotFound"
    errno = errno_mod.ENODATA


class AttributeNotSupported(SnapfsError):
    code = "InvalidAttribute.NotSupported"
    errno = errno_mod.ENOTSUP


class IndexDamaged(SnapfsError):
    """A region's SQLite index (or the catalogue) is unreadable: a damaged page."""

    code = "RegionIndex.Damaged"
    errno = errno_mod.EIO


# --- a region index on PostgreSQL (meta/pg.py) ------------------------------------------------


class IndexUnavailable(SnapfsError):
    """The PostgreSQL server of a region's index cannot be reached (down, wrong host or
    socket, timed out), or the connection to it was lost."""

    code = "ServiceUnavailable.RegionIndex"
    errno = errno_mod.EIO


class IndexDenied(SnapfsError):
    """The PostgreSQL server refused the credentials or the rights a region index needs."""

    code = "Forbidden.RegionIndex"
    errno = errno_mod.EACCES


class InvalidIndexUrl(InvalidParameter):
    """`--index` is not a usable postgresql:// URL (malformed, or its database is missing)."""

    code = "InvalidParameter.IndexUrl"


# --- object stores (objects/s3.py) --------------------------------------------------------------


class BackendUnavailable(SnapfsError):
    """The object store did not answer in time (or the mount is stopping)."""

    code = "ServiceUnavailable.ObjectStore"
    errno = errno_mod.EIO


class BackendDenied(SnapfsError):
    code = "Forbidden.ObjectStore"
    errno = errno_mod.EACCES


class NoSuchBucket(SnapfsError):
    code = "NoSuchBucket"
    errno = errno_mod.ENOENT


class ObjectStoreError(SnapfsError):
    """The object store refused a request for a reason that retrying does not mend."""

    code = "ObjectStoreError"
    errno = errno_mod.EIO


# SQLite's primary result codes (the low byte of an extended code) that are faults of the
# store's disk or files, not of snapfs: they become clean refusals, never tracebacks.
_SQLITE_FAULTS: dict[int, type[SnapfsError] | tuple[str, int]] = {
    sqlite3.SQLITE_FULL: StoreFull,  # the disk (or the WAL's room on it) is full
    sqlite3.SQLITE_CORRUPT: IndexDamaged,  # a damaged page
    sqlite3.SQLITE_NOTADB: IndexDamaged,  # the file is not a database (any more)
    sqlite3.SQLITE_IOERR: ("StoreIOError", errno_mod.EIO),  # the disk failed a read or write
    sqlite3.SQLITE_CANTOPEN: ("StoreIOError", errno_mod.EIO),
    sqlite3.SQLITE_READONLY: ("StoreReadOnly", errno_mod.EROFS),
    sqlite3.SQLITE_BUSY: ("StoreBusy", errno_mod.EBUSY),  # another process holds the index
}


def from_sqlite(exc: sqlite3.Error) -> SnapfsError | None:
    """The SnapfsError for an SQLite failure caused by the store's disk or files (full,
    damaged, unreadable); None for anything else, which is a bug in snapfs."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return None
    fault = _SQLITE_FAULTS.get(code & 0xFF)
    if fault is None:
        return None
    message = f"the store's index: {exc}"
    if isinstance(fault, tuple):
        return SnapfsError(message, code=fault[0], errno=fault[1])
    return fault(message)


def as_snapfs_error(exc: BaseException) -> SnapfsError:
    """Any failure as a SnapfsError, keeping the errno of an OSError (ENOSPC stays ENOSPC)."""
    if isinstance(exc, BaseExceptionGroup):  # a nursery wraps its failed children
        leaves = list(_leaves(exc))
        exc = next((e for e in leaves if isinstance(e, SnapfsError)), leaves[0])
    if isinstance(exc, SnapfsError):
        return exc
    if isinstance(exc, sqlite3.Error) and (known := from_sqlite(exc)) is not None:
        return known
    if isinstance(exc, OSError) and exc.errno:
        if exc.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT):
            return StoreFull(f"no space left for new blocks: {exc}")
        return StoreIOError(str(exc), errno=exc.errno)
    return SnapfsError(f"{type(exc).__name__}: {exc}")  # the base class's code: InternalError


def restated(error: SnapfsError, message: str) -> SnapfsError:
    """The same refusal (class, code and errno) with another message, e.g. with context."""
    return type(error)(message, code=error.code, errno=error.errno)


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
