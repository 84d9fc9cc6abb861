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
    assert enc.stored_size == len(noise) + codec.HEADER.size
    assert codec.decode(enc.data, enc.block_id) == noise


def test_codec_header_is_versioned() -> None:
    enc = codec.encode(b"abc" * 1000)
    header = codec.parse_header(enc.data)
    assert header.version == codec.FORMAT_VERSION == 1
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
