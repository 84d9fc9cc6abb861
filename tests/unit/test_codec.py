"""The block codec: compression, the versioned header, damage detection, and encryption
(block ids bound to the key and the region; re-encryption for a copy)."""

from __future__ import annotations

import os

import pytest

from snapfs.errors import BlockCorrupt
from snapfs.formats import codec

MiB = 1 << 20


# --- codec -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_codec_compresses_text_and_keeps_random_raw(compression: str) -> None:
    text = b"snapshot block log line 42\n" * 40_000
    enc = codec.encode(text, compression=compression)
    assert enc.codec == codec.CODECS_BY_NAME[compression]
    assert enc.stored_size < len(text) / 10
    assert codec.decode(enc.data, enc.block_id) == text
    noise = os.urandom(MiB)
    enc = codec.encode(noise, compression=compression)
    assert enc.codec == codec.CODEC_RAW
    overhead = codec.HEADER.size + 16 * codec.FRAME_ENTRY.size + codec.TABLE_CHECK_SIZE
    assert enc.stored_size == len(noise) + overhead  # 16 raw frames of 64 KiB and a table
    assert codec.decode(enc.data, enc.block_id) == noise


def test_codec_header_is_versioned() -> None:
    enc = codec.encode(b"abc" * 1000)
    header = codec.parse_header(enc.data)
    assert header.version == codec.FORMAT_VERSION == 2
    assert header.frame_shift == codec.FRAME_SHIFT
    assert enc.data[:4] == b"SNFB"
    assert header.key_id == bytes(16) and header.nonce == bytes(12)
    assert header.plain_size == 3000


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "version", "wrong-id"])
def test_codec_never_returns_damaged_data(damage: str, compression: str) -> None:
    plain = os.urandom(1000) + b"x" * 5000
    enc = codec.encode(plain, compression=compression)
    data, block_id = bytearray(enc.data), enc.block_id
    if damage == "flip":
        data[-10] ^= 0x01
    elif damage == "truncate":
        del data[-1]
    elif damage == "magic":
        data[0:4] = b"XXXX"
    elif damage == "version":
        data[4] = 99
    else:
        block_id = codec.content_id(b"other")
    with pytest.raises(BlockCorrupt):
        codec.decode(bytes(data), block_id)


# --- encryption in the codec -------------------------------------------------------------------


def _block_keys(seed: int):
    from snapfs.meta.keys import BlockKeys

    return BlockKeys(str(__import__("uuid").UUID(int=seed)), bytes([seed]) * 32)


@pytest.mark.parametrize("data", [b"text block " * 40_000, os.urandom(300_000)])
def test_encrypted_blocks_roundtrip_and_bind_id_region_and_key(data: bytes) -> None:
    ka, kb = _block_keys(1), _block_keys(2)
    lookup = {ka.key_id_bytes: ka, kb.key_id_bytes: kb}.__getitem__
    enc = codec.encode(data, None, ka, "us-east-1")
    assert enc.block_id == codec.content_id(data, ka.id_key) != codec.content_id(data)
    assert data[:64] not in enc.data
    assert codec.decode(enc.data, enc.block_id, lookup, "us-east-1") == data
    with pytest.raises(BlockCorrupt):
        codec.decode(enc.data, enc.block_id, lookup, "eu-west-1")  # moved to another region
    with pytest.raises(BlockCorrupt):
        codec.decode(enc.data, codec.content_id(b"x", ka.id_key), lookup, "us-east-1")  # swap
    tampered = bytearray(enc.data)
    tampered[-1] ^= 1
    with pytest.raises(BlockCorrupt):
        codec.decode(bytes(tampered), enc.block_id, lookup, "us-east-1")
    # Re-encryption for a copy keeps the compressed payload and gives the new key's id.
    new_id, opened = codec.open_for_copy(enc.data, enc.block_id, lookup, "us-east-1", kb.id_key)
    assert new_id == codec.content_id(data, kb.id_key)
    moved = codec.reseal(opened, new_id, kb, "eu-west-1")
    assert moved.codec == enc.codec and moved.key_id == kb.key_id
    assert codec.decode(moved.data, new_id, lookup, "eu-west-1") == data
    plain_id, opened = codec.open_for_copy(enc.data, enc.block_id, lookup, "us-east-1", None)
    clear = codec.reseal(opened, plain_id, None, "eu-west-1")
    assert codec.decode(clear.data, plain_id) == data


# --- frames (format version 2) and version 1 objects -------------------------------------------

FRAME = 1 << codec.FRAME_SHIFT


def _mixed_block() -> bytes:
    """512 KiB: text frames that compress, random ones that do not, a short tail."""
    return (
        b"".join(
            (b"log line %d\n" % n * 8000)[:FRAME] if n % 2 else os.urandom(FRAME) for n in range(7)
        )
        + b"tail" * 1000
    )


@pytest.mark.parametrize("encrypted", [False, True])
def test_some_frames_of_a_block_decode_alone_and_match_the_whole(encrypted: bool) -> None:
    plain = _mixed_block()
    keys = _block_keys(3) if encrypted else None
    lookup = {keys.key_id_bytes: keys}.__getitem__ if keys else None
    enc = codec.encode(plain, None, keys, "us-east-1")
    assert codec.decode(enc.data, enc.block_id, lookup, "us-east-1") == plain
    for first, last in [(0, 0), (3, 4), (7, 7), (5, 99)]:
        got = codec.decode_frames(enc.data, enc.block_id, first, last, lookup, "us-east-1")
        assert got is not None
        size, frames = got
        assert size == FRAME
        assert b"".join(frames) == plain[first * FRAME : (last + 1) * FRAME]


def test_a_damaged_frame_fails_alone_and_the_whole_block_fails() -> None:
    plain = _mixed_block()
    enc = codec.encode(plain)
    header = codec.parse_header(enc.data)
    table_end = codec.HEADER.size + 8 * codec.FRAME_ENTRY.size + codec.TABLE_CHECK_SIZE
    lengths = [
        codec.FRAME_ENTRY.unpack_from(enc.data, codec.HEADER.size + i * codec.FRAME_ENTRY.size)[0]
        for i in range(8)
    ]
    frame_2_at = table_end + sum(lengths[:2])
    damaged = bytearray(enc.data)
    damaged[frame_2_at + 100] ^= 0x40
    with pytest.raises(BlockCorrupt):
        codec.decode_frames(bytes(damaged), enc.block_id, 2, 2)
    assert codec.decode_frames(bytes(damaged), enc.block_id, 3, 3) == (
        FRAME,
        [plain[3 * FRAME : 4 * FRAME]],
    )
    with pytest.raises(BlockCorrupt):
        codec.decode(bytes(damaged), enc.block_id)
    table = bytearray(enc.data)
    table[codec.HEADER.size + 5] ^= 1  # the table itself: every frame read is refused
    with pytest.raises(BlockCorrupt, match="frame table"):
        codec.decode_frames(bytes(table), enc.block_id, 0, 0)
    assert header.plain_size == len(plain)


def test_encrypted_frames_cannot_be_swapped_within_a_block() -> None:
    keys = _block_keys(4)
    lookup = {keys.key_id_bytes: keys}.__getitem__
    plain = os.urandom(2 * FRAME)
    enc = codec.encode(plain, None, keys, "us-east-1")
    table_end = codec.HEADER.size + 2 * codec.FRAME_ENTRY.size + codec.TABLE_CHECK_SIZE
    stored = FRAME + codec.TAG_SIZE
    swapped = (
        enc.data[:table_end]
        + enc.data[table_end + stored :]
        + enc.data[table_end : table_end + stored]
    )
    for first in (0, 1):
        with pytest.raises(BlockCorrupt):
            codec.decode_frames(swapped, enc.block_id, first, first, lookup, "us-east-1")


@pytest.mark.parametrize("encrypted", [False, True])
def test_version_1_objects_keep_reading_and_copy_as_version_1(encrypted: bool) -> None:
    plain = _mixed_block()
    keys = _block_keys(5) if encrypted else None
    lookup = {keys.key_id_bytes: keys}.__getitem__ if keys else None
    old = codec.encode(plain, None, keys, "us-east-1", version=1)
    assert codec.parse_header(old.data).version == 1
    assert codec.decode(old.data, old.block_id, lookup, "us-east-1") == plain
    assert codec.decode_frames(old.data, old.block_id, 0, 0, lookup, "us-east-1") is None
    new_id, opened = codec.open_for_copy(old.data, old.block_id, lookup, "us-east-1", None)
    moved = codec.reseal(opened, new_id, None, "eu-west-1")
    assert codec.parse_header(moved.data).version == 1
    assert codec.decode(moved.data, new_id) == plain
