"""Which object store a region's catalogue row names: local packs, or a bucket prefix."""

from __future__ import annotations

from pathlib import Path

from snapfs.objects.local import LocalBackend
from snapfs.objects.protocol import ObjectStore

LOCAL = "local"
BLOCKS_PREFIX = "blocks/"  # where a bucket region kept one object per block (before packs)
PACKED_STATE = "s3packs"  # a bucket region's pack locations and upload spool, on local disk


def open_block_store(
    region_directory: Path,
    backend_url: str | None,
    endpoint: str | None,
    *,
    readonly: bool = False,
    max_wait: float | None = None,
    bucket_readonly: bool = False,
    shared: bool = False,
) -> ObjectStore:
    """The block objects of the region whose catalogue row says `backend_url` ('local' or
    None: packs under `region_directory/blocks`; s3://BUCKET/PREFIX: that bucket, at
    `endpoint`). `max_wait` bounds an object store's retries (None: its default).
    `readonly`: the local state is only read (a check beside the daemon);
    `bucket_readonly`: a region attached read-only, whose bucket is never changed
    (objects/s3mirror.py); `shared`: a region several hosts write, whose objects only its
    ledger's collector deletes (objects/s3shared.py)."""
    if (backend_url or LOCAL) == LOCAL:
        return LocalBackend(region_directory / "blocks", readonly=readonly)
    from snapfs.objects.s3 import S3Backend, S3Location  # boto3 only when a bucket is used
    from snapfs.objects.s3packs import PackedS3Backend

    location = S3Location.parse(backend_url or "", endpoint)
    if bucket_readonly:
        from snapfs.objects.s3mirror import open_mirror

        return open_mirror(
            location, region_directory / PACKED_STATE, readonly=readonly, max_wait=max_wait
        )
    region = S3Backend(location) if max_wait is None else S3Backend(location, max_wait=max_wait)
    if shared:
        from snapfs.objects.s3shared import SharedPackedS3Backend

        return SharedPackedS3Backend(region, region_directory / PACKED_STATE, readonly=readonly)
    # New writes pack (issue 19); objects of the one-object-per-block layout under
    # BLOCKS_PREFIX are still read, listed and deleted there.
    return PackedS3Backend(region, region_directory / PACKED_STATE, readonly=readonly)
