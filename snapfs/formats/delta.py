"""Delta objects (block format version 3): a block stored as "base block + changed pages".

Disks change in 4 KiB pages, not in whole blocks. A block whose content differs from a
block the region already holds (its *base*) in a few pages is stored as those pages only.
The block's id is still the hash of its whole plaintext, so dedup, maps, diffs, lineage and
`snapfs check` see the same ids as before; only the object that encodes the block differs.

    offset size field
    0      44   the header of codec.py, version 3; byte 7 is log2 of the page size (12)
                and the codec is that of the page payload (raw, lz4 or zstd)
    44     32   base block id
    76     4    page count, little endian
    80     4n   the changed page numbers, ascending, u32 each
    ..     16   check: BLAKE3 of everything before it and the stored pages (truncated);
                zero when encrypted
    ..          the changed pages, concatenated and compressed as one piece; encrypted:
                AES-256-GCM ciphertext + tag, whose associated data is everything before
                the check plus the block id and the region

Reading one: the base block's plaintext (usually in the cache) with the pages laid over it,
then the whole plaintext checked against the block id, as for any block. A range of it (a
random read) needs only the check (or the tag) and the base's frames for that range, which
verify themselves. A base is always a full object (version 1 or 2), never a delta: chains
have depth one, so a read costs at most two objects. The base may also be the all-zero
block (`ZERO_BASE`), which costs no object at all.

The last page of a short block may be short. A delta and its base have the same plaintext
length; the writer stores a block whole when more than `MAX_SHARE` of it changed, since
then the delta saves little and costs a second object on every read.

Functions here are pure and thread-safe, as in codec.py.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag

from snapfs.errors import BlockCorrupt
from snapfs.formats import codec

VERSION = 3
# The base id of a delta over the all-zero block: a block that was a hole in the snapshot
# it resembles (free space a filesystem then wrote a few pages into). No object holds it and
# no reference counts it; no BLAKE3 id is all zeros.
ZERO_BASE = bytes(32)
PAGE_SHIFT = 12
PAGE = 1 << PAGE_SHIFT
MAX_SHARE = 0.5  # more changed than this: store the block whole
COUNT = struct.Struct("<I")
CHECK_SIZE = 16


@dataclass(frozen=True, slots=True)
class Delta:
    """An opened delta object: what to lay over which base."""

    base_id: bytes
    pages: tuple[int, ...]
    data: bytes  # the changed pages' plaintext, concatenated in page order
    plain_size: int
    key_id: bytes = bytes(16)  # the CMK's, when encrypted
    encrypted: bool = False

    @property
    def payload_size(self) -> int:
        return len(self.data)


def changed_pages(
    plain: bytes | bytearray, base: bytes | bytearray, max_share: float = MAX_SHARE
) -> list[int] | None:
    """The numbers of the pages where `plain` differs from `base`, or None when a delta
    does not pay (different lengths, or more than `max_share` of the pages changed)."""
    if len(plain) != len(base) or not plain:
        return None
    count = -(-len(plain) // PAGE)
    limit = int(count * max_share)
    changed = []
    # Slices of bytes compare with memcmp; memoryview slices compare item by item (10x
    # slower, measured), so the views are copied page by page.
    for page in range(count):
        start = page * PAGE
        if plain[start : start + PAGE] != base[start : start + PAGE]:
            changed.append(page)
            if len(changed) > limit:
                return None
    return changed


def _head(header: bytes, base_id: bytes, pages: list[int] | tuple[int, ...]) -> bytes:
    return (
        header
        + base_id
        + COUNT.pack(len(pages))
        + struct.pack(f"<{len(pages)}I", *pages)
    )


def encode(
    plain: bytes | bytearray,
    block_id: bytes,
    base_id: bytes,
    pages: list[int] | tuple[int, ...],
    keys: codec.CipherKeys | None,
    region: str,
    compression: str = codec.DEFAULT_COMPRESSION,
) -> codec.EncodedBlock:
    """A delta object for `plain` over `base_id`, holding `pages` of `plain`."""
    view = memoryview(plain)
    page_data = b"".join(view[p * PAGE : (p + 1) * PAGE] for p in pages)
    return _seal(page_data, len(plain), block_id, base_id, tuple(pages), keys, region, compression)


def _seal(
    page_data: bytes,
    plain_size: int,
    block_id: bytes,
    base_id: bytes,
    pages: tuple[int, ...],
    keys: codec.CipherKeys | None,
    region: str,
    compression: str,
) -> codec.EncodedBlock:
    kind = codec.CODECS_BY_NAME[compression]
    payload: bytes = codec.compress(page_data, kind)
    if len(payload) > len(page_data) * (1 - codec.MIN_SAVING):
        payload, kind = page_data, codec.CODEC_RAW
    tag = codec.TAG_SIZE if keys is not None else 0
    body = len(base_id) + COUNT.size + 4 * len(pages) + CHECK_SIZE + len(payload) + tag
    nonce = secrets.token_bytes(12) if keys is not None else bytes(12)
    header = codec.HEADER.pack(
        codec.MAGIC,
        VERSION,
        kind,
        codec.FLAG_ENCRYPTED if keys is not None else 0,
        PAGE_SHIFT,
        plain_size,
        body,
        keys.key_id_bytes if keys is not None else bytes(16),
        nonce,
    )
    head = _head(header, base_id, pages)
    if keys is None:
        check = blake3.blake3(head + payload).digest(length=CHECK_SIZE)
        parts: tuple[bytes, ...] = (head, check, payload)
        return codec.EncodedBlock(block_id, parts, plain_size, kind, None, base_id)
    sealed = keys.aead.encrypt(nonce, payload, head + block_id + region.encode())
    parts = (head, bytes(CHECK_SIZE), sealed)
    return codec.EncodedBlock(block_id, parts, plain_size, kind, keys.key_id, base_id)


def is_delta(data: bytes | memoryview) -> bool:
    return len(data) > 5 and data[:4] == codec.MAGIC and data[4] == VERSION


def base_of(data: bytes | memoryview) -> bytes:
    """The base id a delta object names (not yet verified: `open` verifies)."""
    start = codec.HEADER.size
    return bytes(data[start : start + 32])


def open(  # noqa: A001 - the module is the namespace: delta.open
    data: bytes | memoryview,
    block_id: bytes,
    keys_for: codec.KeyLookup | None = None,
    region: str = "",
) -> Delta:
    """The verified content of a delta object; BlockCorrupt otherwise."""
    header = codec.parse_header(data)
    if header.version != VERSION or header.frame_shift != PAGE_SHIFT:
        raise BlockCorrupt(f"block object version {header.version} is not a delta")
    start = codec.HEADER.size
    if len(data) < start + 32 + COUNT.size:
        raise BlockCorrupt("delta object is shorter than its page list")
    base_id = bytes(data[start : start + 32])
    (count,) = COUNT.unpack_from(data, start + 32)
    pages_at = start + 32 + COUNT.size
    check_at = pages_at + 4 * count
    if count > -(-header.plain_size // PAGE) or check_at + CHECK_SIZE > len(data):
        raise BlockCorrupt("delta object's page list is damaged")
    pages = struct.unpack_from(f"<{count}I", data, pages_at)
    if any(b <= a for a, b in zip(pages, pages[1:], strict=False)) or (
        pages and pages[-1] * PAGE >= header.plain_size
    ):
        raise BlockCorrupt("delta object's page list is damaged")
    head = bytes(data[:check_at])
    payload = bytes(data[check_at + CHECK_SIZE :])
    keys = codec.keys_of(header, keys_for)
    if keys is None:
        check = bytes(data[check_at : check_at + CHECK_SIZE])
        if blake3.blake3(head + payload).digest(length=CHECK_SIZE) != check:
            raise BlockCorrupt("delta object does not match its check")
    else:
        try:
            payload = keys.aead.decrypt(header.nonce, payload, head + block_id + region.encode())
        except InvalidTag:
            raise BlockCorrupt("block fails authentication (tampered, moved or swapped)") from None
    size = sum(min(PAGE, header.plain_size - p * PAGE) for p in pages)
    page_data = codec.decompress(header.codec, payload, size)
    return Delta(
        base_id, pages, page_data, header.plain_size, header.key_id, header.encrypted
    )


def apply(base: bytes | bytearray | memoryview, delta: Delta) -> bytearray:
    """The block's plaintext: `base` with the delta's pages laid over it."""
    if len(base) != delta.plain_size:
        raise BlockCorrupt(
            f"delta base is {len(base)} bytes, the delta is of a {delta.plain_size}-byte block"
        )
    out = bytearray(base)
    _lay_over(out, 0, delta)
    return out


def _lay_over(out: bytearray, offset: int, delta: Delta) -> None:
    """Write the delta's pages that fall in [offset, offset + len(out)) into `out`."""
    at = 0
    end = offset + len(out)
    for page in delta.pages:
        start = page * PAGE
        length = min(PAGE, delta.plain_size - start)
        if start < end and start + length > offset:
            lo, hi = max(start, offset), min(start + length, end)
            out[lo - offset : hi - offset] = delta.data[at + lo - start : at + hi - start]
        at += length


def apply_range(base_range: bytes | bytearray | memoryview, start: int, delta: Delta) -> bytes:
    """Bytes [start, start + len(base_range)) of the block, from that range of its base."""
    out = bytearray(base_range)
    _lay_over(out, start, delta)
    return bytes(out)


def reseal(
    delta: Delta,
    block_id: bytes,
    base_id: bytes,
    keys: codec.CipherKeys | None,
    region: str,
    compression: str = codec.DEFAULT_COMPRESSION,
) -> codec.EncodedBlock:
    """The same delta for another region or key (over `base_id`, the base's id there)."""
    return _seal(
        delta.data, delta.plain_size, block_id, base_id, delta.pages, keys, region, compression
    )
