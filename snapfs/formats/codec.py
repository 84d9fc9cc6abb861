"""The block codec: content ids, compression, and the versioned header of every stored block.

A stored block object is a fixed 44-byte header followed by the payload:

    offset size field
    0      4    magic  b"SNFB"
    4      1    format version (1)
    5      1    codec: 0 raw, 1 zstd, 2 lz4 (block format)
    6      1    flags: bit 0 = payload is AES-256-GCM encrypted (ciphertext + 16-byte tag)
    7      1    reserved, 0
    8      4    plaintext length, little endian
    12     4    payload length, little endian
    16     16   key id (UUID bytes of the CMK), zero when not encrypted
    32     12   nonce, zero when not encrypted

The header makes every object self-describing: a reader needs nothing from the index to
decode it, and `snapfs check` can verify objects on their own. The block id is not in the
header; the object is stored under its id and verified against it on every read, so a block
that was swapped, truncated or bit-flipped is never returned as data.

Functions here are pure and thread-safe; they are called from worker threads.
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
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sBBBxII16s12s")
assert HEADER.size == 44

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
    """A block ready to be stored: its id, the object bytes and what the index records."""

    block_id: bytes
    data: bytes
    plain_size: int
    codec: int
    key_id: str | None = None

    @property
    def stored_size(self) -> int:
        return len(self.data)


def _aad(header: bytes, block_id: bytes, region: str) -> bytes:
    """Associated data: the header (codec, sizes, key, nonce), the block id and the region,
    so an object moved to another id or region, or with an edited header, fails to open."""
    return header + block_id + region.encode()


def _compress(plain: bytes | bytearray, codec: int) -> bytes:
    if codec == CODEC_LZ4:
        return lz4.block.compress(plain, store_size=False)
    return _compressor().compress(plain)


def encode(
    plain: bytes | bytearray,
    block_id: bytes | None = None,
    keys: CipherKeys | None = None,
    region: str = "",
    compression: str = DEFAULT_COMPRESSION,
) -> EncodedBlock:
    """Compress `plain` (unless it does not pay), encrypt it if `keys`, frame it."""
    if block_id is None:
        block_id = content_id(plain, keys.id_key if keys else None)
    codec = CODECS_BY_NAME[compression]
    payload: bytes | bytearray = _compress(plain, codec)
    if len(payload) > len(plain) * (1 - MIN_SAVING):
        payload, codec = plain, CODEC_RAW
    if keys is None:
        header = HEADER.pack(
            MAGIC, FORMAT_VERSION, codec, 0, len(plain), len(payload), _NO_KEY, _NO_NONCE
        )
        return EncodedBlock(block_id, header + payload, len(plain), codec)
    nonce = secrets.token_bytes(12)  # random 96-bit nonce per object; keys never wear out here
    header = HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        codec,
        FLAG_ENCRYPTED,
        len(plain),
        len(payload) + TAG_SIZE,
        keys.key_id_bytes,
        nonce,
    )
    sealed = keys.aead.encrypt(nonce, bytes(payload), _aad(header, block_id, region))
    return EncodedBlock(block_id, header + sealed, len(plain), codec, keys.key_id)


@dataclass(frozen=True, slots=True)
class BlockHeader:
    version: int
    codec: int
    flags: int
    plain_size: int
    payload_size: int
    key_id: bytes
    nonce: bytes


def parse_header(data: bytes) -> BlockHeader:
    if len(data) < HEADER.size:
        raise BlockCorrupt(f"block object is {len(data)} bytes, shorter than its header")
    magic, version, codec, flags, plain, payload, key_id, nonce = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BlockCorrupt("block object has no snapfs header (bad magic)")
    if version != FORMAT_VERSION:
        raise BlockCorrupt(f"block format version {version} is not supported")
    if codec not in CODEC_NAMES:
        raise BlockCorrupt(f"unknown block codec {codec}")
    if len(data) != HEADER.size + payload:
        raise BlockCorrupt(
            f"block object is {len(data)} bytes, its header says {HEADER.size + payload}"
        )
    return BlockHeader(version, codec, flags, plain, payload, key_id, nonce)


def decode(
    data: bytes, block_id: bytes, keys_for: KeyLookup | None = None, region: str = ""
) -> bytes:
    """Return the plaintext of a stored object, or raise BlockCorrupt; never wrong bytes.

    An encrypted object is authenticated (AES-GCM over payload, header, id and region); a
    plain one is checked against its content id. `keys_for` maps a header's key id to the
    CMK's keys (raising when the key is unknown or disabled).
    """
    header, payload = _open_payload(data, block_id, keys_for, region)
    return _plaintext(header, payload, block_id)


def _open_payload(
    data: bytes, block_id: bytes, keys_for: KeyLookup | None, region: str
) -> tuple[BlockHeader, bytes | memoryview]:
    """The header and the (still compressed) payload, authenticated if encrypted."""
    header = parse_header(data)
    payload: bytes | memoryview = memoryview(data)[HEADER.size :]
    if header.flags & FLAG_ENCRYPTED:
        if keys_for is None:
            raise BlockCorrupt("block is encrypted but no key was given")
        keys = keys_for(header.key_id)
        try:
            payload = keys.aead.decrypt(
                header.nonce, bytes(payload), _aad(data[: HEADER.size], block_id, region)
            )
        except InvalidTag:
            raise BlockCorrupt("block fails authentication (tampered, moved or swapped)") from None
    return header, payload


def _plaintext(header: BlockHeader, payload: bytes | memoryview, block_id: bytes) -> bytes:
    if header.codec == CODEC_ZSTD:
        try:
            plain = _decompressor().decompress(payload, max_output_size=header.plain_size)
        except zstandard.ZstdError as exc:
            raise BlockCorrupt(f"block does not decompress: {exc}") from None
    elif header.codec == CODEC_LZ4:
        try:
            plain = lz4.block.decompress(payload, uncompressed_size=header.plain_size)
        except (lz4.block.LZ4BlockError, ValueError) as exc:
            raise BlockCorrupt(f"block does not decompress: {exc}") from None
    else:
        plain = bytes(payload)
    if len(plain) != header.plain_size:
        raise BlockCorrupt(
            f"block decodes to {len(plain)} bytes, its header says {header.plain_size}"
        )
    if not header.flags & FLAG_ENCRYPTED and content_id(plain) != block_id:
        raise BlockCorrupt("block content does not match its id")
    return plain


@dataclass(frozen=True, slots=True)
class OpenedBlock:
    """A stored object opened for re-encryption: its compressed payload and plaintext size."""

    codec: int
    payload: bytes
    plain_size: int


def open_for_copy(
    data: bytes, block_id: bytes, keys_for: KeyLookup | None, region: str, new_id_key: bytes | None
) -> tuple[bytes, OpenedBlock]:
    """Authenticate and open an object, and compute the block's id under another id key.

    Returns the new id and the still-compressed payload, so that `reseal` can move the block
    to another key or region without compressing it again (the costly step).
    """
    header, payload = _open_payload(data, block_id, keys_for, region)
    plain = _plaintext(header, payload, block_id)  # verified: never wrong bytes
    return content_id(plain, new_id_key), OpenedBlock(header.codec, bytes(payload), len(plain))


def reseal(
    block: OpenedBlock, block_id: bytes, keys: CipherKeys | None, region: str
) -> EncodedBlock:
    """Frame an opened payload for its new home (plain, or encrypted under `keys`)."""
    if keys is None:
        header = HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            block.codec,
            0,
            block.plain_size,
            len(block.payload),
            _NO_KEY,
            _NO_NONCE,
        )
        return EncodedBlock(block_id, header + block.payload, block.plain_size, block.codec)
    nonce = secrets.token_bytes(12)
    header = HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        block.codec,
        FLAG_ENCRYPTED,
        block.plain_size,
        len(block.payload) + TAG_SIZE,
        keys.key_id_bytes,
        nonce,
    )
    sealed = keys.aead.encrypt(nonce, block.payload, _aad(header, block_id, region))
    return EncodedBlock(block_id, header + sealed, block.plain_size, block.codec, keys.key_id)
