"""The block codec: content ids, compression, and the versioned header of every stored block.

A stored block object is a fixed 44-byte header followed by the payload:

    offset size field
    0      4    magic  b"SNFB"
    4      1    format version (1, 2, or 3: a delta object, formats/delta.py)
    5      1    codec: 0 raw, 1 zstd, 2 lz4 (block format); in version 2 the region's codec,
                while each frame says its own (a frame that does not compress is raw)
    6      1    flags: bit 0 = payload is AES-256-GCM encrypted
    7      1    version 1: reserved, 0; version 2: log2 of the frame size (16: 64 KiB)
    8      4    plaintext length, little endian
    12     4    payload length, little endian
    16     16   key id (UUID bytes of the CMK), zero when not encrypted
    32     12   nonce, zero when not encrypted

Version 1 (written until issue 15, still read): the payload is the whole block compressed in
one piece (then ciphertext + 16-byte tag when encrypted).

Version 2 (written since issue 15): the block is cut into frames of 2**shift bytes (64 KiB;
the last may be shorter), each compressed on its own, so that a random 4 KiB read decodes
one frame instead of the whole block. The payload is

    frame table   one entry per frame: stored length (u32), codec (u8), 3 zero bytes,
                  16-byte digest (BLAKE3 of the frame as stored, truncated; zero when
                  encrypted)
    table check   16 bytes: BLAKE3 of header + table, truncated
    frames        the stored frames, in order; encrypted: each frame's ciphertext + tag

How a read is verified:
- a whole block (sequential reads, copies, `snapfs check`): every frame decoded and the
  plaintext checked against the block id (plain), or every frame authenticated (encrypted),
  as in version 1;
- some frames of a block (random reads): the table check, then each frame against its
  digest before it is decompressed (plain), or its AES-GCM tag (encrypted). An encrypted
  frame's associated data is the header, the table, the block id, the region and the
  frame's number, and its nonce is the block's nonce with the frame number folded in, so a
  frame cannot be moved to another place, block, region or key. A plain frame's digest
  protects against damage, not against someone who can rewrite the store: a plain block has
  no secret to authenticate it with, and the whole-block id check (every sequential read and
  `snapfs check`) still runs.

The header makes every object self-describing: a reader needs nothing from the index to
decode it, and `snapfs check` can verify objects on their own. The block id is not in the
header; the object is stored under its id and verified against it, so a block that was
swapped, truncated or bit-flipped is never returned as data.

Functions here are pure and thread-safe; they are called from worker threads.

Why one module of ~550 lines: it is the block object format, both versions, reading and
writing, with encryption inside it; what binds a frame, a header and an id together is one
set of rules that must be read, and changed, in one place.
"""

from __future__ import annotations

import secrets
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import blake3
import lz4.block
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from snapfs.errors import BlockCorrupt

MAGIC = b"SNFB"
FORMAT_VERSION = 2  # what encode writes; version 1 objects are still read
READ_VERSIONS = (1, 2, 3)  # 3: delta objects (formats/delta.py)
HEADER = struct.Struct("<4sBBBBII16s12s")
assert HEADER.size == 44
FRAME_SHIFT = 16  # 64 KiB frames: LZ4's own window, so framing costs it almost no ratio
FRAME_ENTRY = struct.Struct("<IB3x16s")
DIGEST_SIZE = 16
TABLE_CHECK_SIZE = 16

CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_LZ4 = 2  # LZ4 block format, no size prefix (the header has the plaintext length)
CODEC_NAMES = {CODEC_RAW: "raw", CODEC_ZSTD: "zstd", CODEC_LZ4: "lz4"}
CODECS_BY_NAME = {"zstd": CODEC_ZSTD, "lz4": CODEC_LZ4}

FLAG_ENCRYPTED = 0x01
TAG_SIZE = 16  # AES-GCM tag, after the ciphertext

# LZ4 by default, by measurement (docs/PERFORMANCE.md): on the 2 GiB bench image's non-zero
# blocks LZ4 compresses at 683 MB/s per core to 0.70 of the size, zstd-1 at 511 MB/s to 0.60;
# an ingest spent 42% of its CPU in zstd, and switching cut its CPU by 20%. zstd stays for
# regions that prefer space (`user.snapfs.compression`); its level 1 beats higher levels.
DEFAULT_COMPRESSION = "lz4"
ZSTD_LEVEL = 1
# A payload must save at least this share to be worth decompressing on every read.
MIN_SAVING = 0.03

ID_SIZE = 32
_NO_KEY = bytes(16)
_NO_NONCE = bytes(12)

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    comp = getattr(_local, "comp", None)
    if comp is None:
        comp = _local.comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "dec", None)
    if dec is None:
        dec = _local.dec = zstandard.ZstdDecompressor()
    return dec


class CipherKeys(Protocol):
    """What encoding needs of a CMK (keys.BlockKeys): a block-id key and an AEAD."""

    key_id: str
    key_id_bytes: bytes
    id_key: bytes
    aead: AESGCM


KeyLookup = Callable[[bytes], CipherKeys]


def content_id(plain: bytes | bytearray | memoryview, id_key: bytes | None = None) -> bytes:
    """A block's id: BLAKE3-256 of the plaintext; keyed BLAKE3 in an encrypted snapshot, so
    that the index never holds a plain hash an attacker could test guesses against."""
    if id_key is None:
        return blake3.blake3(plain).digest()
    return blake3.blake3(plain, key=id_key).digest()


@dataclass(frozen=True, slots=True)
class EncodedBlock:
    """A block ready to be stored: its id, the object's bytes in pieces (header, table,
    frames: a local store writes them with one pwritev instead of joining 512 KiB first),
    and what the index records."""

    block_id: bytes
    parts: tuple[bytes | memoryview, ...]
    plain_size: int
    codec: int
    key_id: str | None = None
    base_id: bytes | None = None  # a delta object (formats/delta.py): the block it is over

    @property
    def data(self) -> bytes:
        """The object as one bytes (a copy; stores that can, take `parts`)."""
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)  # type: ignore[return-value]

    @property
    def stored_size(self) -> int:
        return sum(len(part) for part in self.parts)


def _aad(header: bytes, block_id: bytes, region: str) -> bytes:
    """Associated data: the header (codec, sizes, key, nonce), the block id and the region,
    so an object moved to another id or region, or with an edited header, fails to open."""
    return header + block_id + region.encode()


def _frame_aad(header_and_table: bytes, block_id: bytes, region: str, index: int) -> bytes:
    return header_and_table + block_id + region.encode() + index.to_bytes(4, "little")


def _frame_nonce(nonce: bytes, index: int) -> bytes:
    """The block's random nonce with the frame number folded into its last 32 bits: unique
    per frame, since the block's nonce is unique per object."""
    tail = int.from_bytes(nonce[8:], "little") ^ index
    return nonce[:8] + tail.to_bytes(4, "little")


def _digest(plain: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(plain).digest(length=DIGEST_SIZE)


def _compress(plain: bytes | bytearray | memoryview, codec: int) -> bytes:
    if codec == CODEC_LZ4:
        return lz4.block.compress(plain, store_size=False)
    return _compressor().compress(plain)


def _decompress(codec: int, payload: bytes | memoryview, plain_size: int) -> bytes:
    if codec == CODEC_ZSTD:
        try:
            plain = _decompressor().decompress(payload, max_output_size=plain_size)
        except zstandard.ZstdError as exc:
            raise BlockCorrupt(f"block does not decompress: {exc}") from None
    elif codec == CODEC_LZ4:
        try:
            plain = lz4.block.decompress(payload, uncompressed_size=plain_size)
        except (lz4.block.LZ4BlockError, ValueError) as exc:
            raise BlockCorrupt(f"block does not decompress: {exc}") from None
    elif codec == CODEC_RAW:
        plain = bytes(payload)
    else:
        raise BlockCorrupt(f"unknown block codec {codec}")
    if len(plain) != plain_size:
        raise BlockCorrupt(f"block decodes to {len(plain)} bytes, its header says {plain_size}")
    return plain


def frame_count(plain_size: int, shift: int = FRAME_SHIFT) -> int:
    return max(1, -(-plain_size // (1 << shift)))


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame as stored before encryption: its codec, compressed bytes and their digest."""

    codec: int
    payload: bytes | memoryview  # a raw frame is a view of the block: no copy until framed
    digest: bytes


def _frames_of(plain: bytes | bytearray, codec: int) -> list[Frame]:
    view = memoryview(plain)
    size = 1 << FRAME_SHIFT
    frames = []
    for start in range(0, max(len(view), 1), size):
        piece = view[start : start + size]
        payload = _compress(piece, codec)
        if len(payload) > len(piece) * (1 - MIN_SAVING):
            stored: bytes | memoryview = piece
            frame_codec = CODEC_RAW
        else:
            stored, frame_codec = payload, codec
        # The digest is of the stored bytes: a compressed frame hashes faster than its
        # plaintext, and a damaged one is refused before it reaches the decompressor.
        frames.append(Frame(frame_codec, stored, _digest(stored)))
    return frames


def _frame(
    frames: list[Frame],
    block_id: bytes,
    plain_size: int,
    codec: int,
    keys: CipherKeys | None,
    region: str,
) -> EncodedBlock:
    """A version 2 object of these frames: plain, or each frame sealed under `keys`."""
    tag = TAG_SIZE if keys is not None else 0
    stored = [len(f.payload) + tag for f in frames]
    payload_size = len(frames) * FRAME_ENTRY.size + TABLE_CHECK_SIZE + sum(stored)
    nonce = secrets.token_bytes(12) if keys is not None else _NO_NONCE
    header = HEADER.pack(
        MAGIC,
        2,
        codec,
        FLAG_ENCRYPTED if keys is not None else 0,
        FRAME_SHIFT,
        plain_size,
        payload_size,
        keys.key_id_bytes if keys is not None else _NO_KEY,
        nonce,
    )
    table = b"".join(
        FRAME_ENTRY.pack(n, f.codec, f.digest if keys is None else bytes(DIGEST_SIZE))
        for n, f in zip(stored, frames, strict=True)
    )
    head = header + table
    parts: list[bytes | memoryview] = [head, blake3.blake3(head).digest(length=TABLE_CHECK_SIZE)]
    if keys is None:
        parts += [f.payload for f in frames]
        return EncodedBlock(block_id, tuple(parts), plain_size, codec)
    for index, f in enumerate(frames):
        aad = _frame_aad(head, block_id, region, index)
        parts.append(keys.aead.encrypt(_frame_nonce(nonce, index), f.payload, aad))
    return EncodedBlock(block_id, tuple(parts), plain_size, codec, keys.key_id)


def encode(
    plain: bytes | bytearray,
    block_id: bytes | None = None,
    keys: CipherKeys | None = None,
    region: str = "",
    compression: str = DEFAULT_COMPRESSION,
    *,
    version: int = FORMAT_VERSION,
) -> EncodedBlock:
    """Frame `plain` (version 2), compress each frame unless it does not pay, encrypt each
    if `keys`. `version=1` writes the format of before issue 15, for the tests that show
    such objects keep reading."""
    if block_id is None:
        block_id = content_id(plain, keys.id_key if keys else None)
    codec = CODECS_BY_NAME[compression]
    if version == 1:
        payload: bytes | bytearray = _compress(plain, codec)
        if len(payload) > len(plain) * (1 - MIN_SAVING):
            payload, codec = plain, CODEC_RAW
        return _seal_v1(bytes(payload), codec, len(plain), block_id, keys, region)
    frames = _frames_of(plain, codec)
    if all(f.codec == CODEC_RAW for f in frames):
        codec = CODEC_RAW
    return _frame(frames, block_id, len(plain), codec, keys, region)


def _seal_v1(
    payload: bytes,
    codec: int,
    plain_size: int,
    block_id: bytes,
    keys: CipherKeys | None,
    region: str,
) -> EncodedBlock:
    if keys is None:
        header = HEADER.pack(MAGIC, 1, codec, 0, 0, plain_size, len(payload), _NO_KEY, _NO_NONCE)
        return EncodedBlock(block_id, (header, payload), plain_size, codec)
    nonce = secrets.token_bytes(12)  # random 96-bit nonce per object; keys never wear out here
    header = HEADER.pack(
        MAGIC,
        1,
        codec,
        FLAG_ENCRYPTED,
        0,
        plain_size,
        len(payload) + TAG_SIZE,
        keys.key_id_bytes,
        nonce,
    )
    sealed = keys.aead.encrypt(nonce, payload, _aad(header, block_id, region))
    return EncodedBlock(block_id, (header, sealed), plain_size, codec, keys.key_id)


@dataclass(frozen=True, slots=True)
class BlockHeader:
    version: int
    codec: int
    flags: int
    plain_size: int
    payload_size: int
    key_id: bytes
    nonce: bytes
    frame_shift: int = 0  # version 2 only

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)


def key_id_of(head: bytes) -> bytes | None:
    """The CMK id an object is encrypted under, from its first `HEADER.size` bytes or more;
    None for a plain object or bytes that are not a block object (a packed store asks)."""
    if len(head) < HEADER.size or head[:4] != MAGIC:
        return None
    fields = HEADER.unpack_from(head)
    return fields[7] if fields[3] & FLAG_ENCRYPTED else None


def parse_header(data: bytes | memoryview) -> BlockHeader:
    if len(data) < HEADER.size:
        raise BlockCorrupt(f"block object is {len(data)} bytes, shorter than its header")
    magic, version, codec, flags, shift, plain, payload, key_id, nonce = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BlockCorrupt("block object has no snapfs header (bad magic)")
    if version not in READ_VERSIONS:
        raise BlockCorrupt(f"block format version {version} is not supported")
    if codec not in CODEC_NAMES:
        raise BlockCorrupt(f"unknown block codec {codec}")
    if len(data) != HEADER.size + payload:
        raise BlockCorrupt(
            f"block object is {len(data)} bytes, its header says {HEADER.size + payload}"
        )
    if version == 2 and not 9 <= shift <= 24:
        raise BlockCorrupt(f"block frame size 2**{shift} is not supported")
    return BlockHeader(version, codec, flags, plain, payload, key_id, nonce, shift)


@dataclass(frozen=True, slots=True)
class _Table:
    """A version 2 object's frame table, checked: where each frame is and what it holds."""

    head: bytes  # header + table: what the table check and frame AADs cover
    entries: list[tuple[int, int, int, bytes]]  # (offset in data, stored length, codec, digest)


def _table(data: bytes | memoryview, header: BlockHeader) -> _Table:
    count = frame_count(header.plain_size, header.frame_shift)
    table_end = HEADER.size + count * FRAME_ENTRY.size
    if table_end + TABLE_CHECK_SIZE > len(data):
        raise BlockCorrupt("block object is shorter than its frame table")
    head = bytes(data[:table_end])
    check = bytes(data[table_end : table_end + TABLE_CHECK_SIZE])
    if blake3.blake3(head).digest(length=TABLE_CHECK_SIZE) != check:
        raise BlockCorrupt("block frame table is damaged")
    entries = []
    offset = table_end + TABLE_CHECK_SIZE
    for index in range(count):
        length, codec, digest = FRAME_ENTRY.unpack_from(
            data, HEADER.size + index * FRAME_ENTRY.size
        )
        entries.append((offset, length, codec, digest))
        offset += length
    if offset != len(data):
        raise BlockCorrupt("block frames do not fill the object")
    return _Table(head, entries)


def _frame_plain_size(header: BlockHeader, index: int) -> int:
    size = 1 << header.frame_shift
    return min(size, header.plain_size - index * size) if header.plain_size else 0


def _open_frame(
    data: bytes | memoryview,
    header: BlockHeader,
    table: _Table,
    index: int,
    block_id: bytes,
    keys: CipherKeys | None,
    region: str,
) -> tuple[int, bytes | memoryview]:
    """A frame's codec and compressed bytes, authenticated if encrypted."""
    offset, length, codec, _ = table.entries[index]
    stored = memoryview(data)[offset : offset + length]
    if keys is None:
        return codec, stored
    try:
        payload = keys.aead.decrypt(
            _frame_nonce(header.nonce, index),
            bytes(stored),
            _frame_aad(table.head, block_id, region, index),
        )
    except InvalidTag:
        raise BlockCorrupt("block fails authentication (tampered, moved or swapped)") from None
    return codec, payload


def _keys(header: BlockHeader, keys_for: KeyLookup | None) -> CipherKeys | None:
    if not header.encrypted:
        return None
    if keys_for is None:
        raise BlockCorrupt("block is encrypted but no key was given")
    return keys_for(header.key_id)


# For formats/delta.py, the other object format of this package.
compress = _compress
decompress = _decompress
keys_of = _keys


def _not_a_delta(header: BlockHeader) -> None:
    if header.version == 3:
        # The repository opens deltas over their base (formats/delta.py); reaching here
        # means a caller skipped that, which must not turn into wrong bytes.
        raise BlockCorrupt("block object is a delta: it decodes only over its base")


def decode(
    data: bytes, block_id: bytes, keys_for: KeyLookup | None = None, region: str = ""
) -> bytes:
    """Return the plaintext of a stored object, or raise BlockCorrupt; never wrong bytes.

    An encrypted object is authenticated (AES-GCM over payload, header, id and region); a
    plain one is checked against its content id. `keys_for` maps a header's key id to the
    CMK's keys (raising when the key is unknown or disabled).
    """
    header = parse_header(data)
    _not_a_delta(header)
    if header.version == 1:
        payload = _open_payload_v1(data, header, block_id, keys_for, region)
        plain = _decompress(header.codec, payload, header.plain_size)
    else:
        keys = _keys(header, keys_for)
        table = _table(data, header)
        pieces: list[bytes | memoryview] = []
        for index in range(len(table.entries)):
            codec, payload = _open_frame(data, header, table, index, block_id, keys, region)
            size = _frame_plain_size(header, index)
            if codec == CODEC_RAW and len(payload) == size:
                pieces.append(payload)  # joined below: one copy, not two
            else:
                pieces.append(_decompress(codec, payload, size))
        plain = b"".join(pieces)
    if not header.encrypted and content_id(plain) != block_id:
        raise BlockCorrupt("block content does not match its id")
    return plain


def decode_frames(
    data: bytes,
    block_id: bytes,
    first: int,
    last: int,
    keys_for: KeyLookup | None = None,
    region: str = "",
) -> tuple[int, list[bytes]] | None:
    """Frames first..last of a version 2 object, each verified on its own (see the module
    doc): (frame size, their plaintexts). None for a version 1 object: decode it whole."""
    header = parse_header(data)
    _not_a_delta(header)
    if header.version == 1:
        return None
    keys = _keys(header, keys_for)
    table = _table(data, header)
    last = min(last, len(table.entries) - 1)
    pieces = []
    for index in range(first, last + 1):
        codec, payload = _open_frame(data, header, table, index, block_id, keys, region)
        if keys is None and _digest(payload) != table.entries[index][3]:
            raise BlockCorrupt(f"block frame {index} does not match its digest")
        pieces.append(_decompress(codec, payload, _frame_plain_size(header, index)))
    return 1 << header.frame_shift, pieces


def _open_payload_v1(
    data: bytes, header: BlockHeader, block_id: bytes, keys_for: KeyLookup | None, region: str
) -> bytes | memoryview:
    """A version 1 object's (still compressed) payload, authenticated if encrypted."""
    payload: bytes | memoryview = memoryview(data)[HEADER.size :]
    keys = _keys(header, keys_for)
    if keys is None:
        return payload
    try:
        return keys.aead.decrypt(
            header.nonce, bytes(payload), _aad(data[: HEADER.size], block_id, region)
        )
    except InvalidTag:
        raise BlockCorrupt("block fails authentication (tampered, moved or swapped)") from None


@dataclass(frozen=True, slots=True)
class OpenedBlock:
    """A stored object opened for re-encryption: its compressed frames (one, for a version 1
    object) and plaintext size, so that it moves without being compressed again."""

    version: int
    codec: int
    frames: list[Frame]
    plain_size: int


def open_for_copy(
    data: bytes, block_id: bytes, keys_for: KeyLookup | None, region: str, new_id_key: bytes | None
) -> tuple[bytes, OpenedBlock]:
    """Authenticate and open an object, and compute the block's id under another id key.

    Returns the new id and the still-compressed frames, so that `reseal` can move the block
    to another key or region without compressing it again (the costly step).
    """
    header = parse_header(data)
    _not_a_delta(header)
    if header.version == 1:
        payload = bytes(_open_payload_v1(data, header, block_id, keys_for, region))
        plain = _decompress(header.codec, payload, header.plain_size)
        frames = [Frame(header.codec, payload, b"")]
    else:
        keys = _keys(header, keys_for)
        table = _table(data, header)
        frames, pieces = [], []
        for index in range(len(table.entries)):
            codec, stored = _open_frame(data, header, table, index, block_id, keys, region)
            pieces.append(_decompress(codec, stored, _frame_plain_size(header, index)))
            frames.append(Frame(codec, bytes(stored), _digest(stored)))
        plain = b"".join(pieces)
    if not header.encrypted and content_id(plain) != block_id:
        raise BlockCorrupt("block content does not match its id")  # never wrong bytes
    opened = OpenedBlock(header.version, header.codec, frames, len(plain))
    return content_id(plain, new_id_key), opened


def reseal(
    block: OpenedBlock, block_id: bytes, keys: CipherKeys | None, region: str
) -> EncodedBlock:
    """Frame an opened block for its new home (plain, or encrypted under `keys`), in the
    format version it came in."""
    if block.version == 1:
        (frame,) = block.frames
        payload = bytes(frame.payload)
        return _seal_v1(payload, block.codec, block.plain_size, block_id, keys, region)
    return _frame(block.frames, block_id, block.plain_size, block.codec, keys, region)
