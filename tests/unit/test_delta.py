"""Delta objects (formats/delta.py): a block as its base plus the pages that changed,
verified over the base, encrypted bound to block, base and region, never wrong bytes."""

from __future__ import annotations

import os
import uuid

import pytest

from snapfs.errors import BlockCorrupt
from snapfs.formats import codec, delta

KiB = 1024
BLOCK = 512 * KiB


def _block_keys(seed: int):
    from snapfs.meta.keys import BlockKeys

    return BlockKeys(str(uuid.UUID(int=seed)), bytes([seed]) * 32)


def _variant(base: bytes, pages: list[int]) -> bytes:
    out = bytearray(base)
    for page in pages:
        out[page * delta.PAGE : page * delta.PAGE + 100] = os.urandom(100)
    return bytes(out)


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_delta_stores_the_changed_pages_and_reads_back_over_its_base(encrypted: bool) -> None:
    keys = _block_keys(7) if encrypted else None
    lookup = {keys.key_id_bytes: keys}.__getitem__ if keys else None
    id_key = keys.id_key if keys else None
    base = os.urandom(BLOCK)
    plain = _variant(base, [0, 5, 6, 127])
    base_id, block_id = codec.content_id(base, id_key), codec.content_id(plain, id_key)
    pages = delta.changed_pages(plain, base)
    assert pages == [0, 5, 6, 127]
    enc = delta.encode(plain, block_id, base_id, pages, keys, "us-east-1")
    assert enc.base_id == base_id
    assert enc.stored_size < 5 * delta.PAGE  # four random pages and a small head
    assert delta.is_delta(enc.data) and delta.base_of(enc.data) == base_id
    opened = delta.open(enc.data, block_id, lookup, "us-east-1")
    assert delta.apply(base, opened) == plain
    assert delta.apply_range(base[20_000:30_000], 20_000, opened) == plain[20_000:30_000]
    with pytest.raises(BlockCorrupt):  # whole-block decoders refuse it: never wrong bytes
        codec.decode(enc.data, block_id, lookup, "us-east-1")


def test_a_block_that_changed_much_or_changed_size_is_not_a_delta() -> None:
    base = os.urandom(BLOCK)
    assert delta.changed_pages(_variant(base, list(range(0, 128, 2))), base) == list(
        range(0, 128, 2)
    )  # half the pages: still pays
    assert delta.changed_pages(_variant(base, list(range(0, 80))), base) is None
    assert delta.changed_pages(base[:-1], base) is None


def test_a_short_last_page_round_trips() -> None:
    base = os.urandom(3 * delta.PAGE + 123)
    plain = base[: 3 * delta.PAGE] + os.urandom(123)
    pages = delta.changed_pages(plain, base)
    assert pages == [3]
    block_id = codec.content_id(plain)
    enc = delta.encode(plain, block_id, codec.content_id(base), pages, None, "r")
    assert delta.apply(base, delta.open(enc.data, block_id)) == plain


@pytest.mark.parametrize("where", ["page list", "pages", "base id", "header"])
def test_a_damaged_delta_is_refused(where: str) -> None:
    base = os.urandom(BLOCK)
    plain = _variant(base, [3, 9])
    block_id = codec.content_id(plain)
    data = bytearray(
        delta.encode(plain, block_id, codec.content_id(base), [3, 9], None, "r").data
    )
    offset = {"page list": 76 + 4, "pages": len(data) - 10, "base id": 50, "header": 9}[where]
    data[offset] ^= 0x40
    with pytest.raises(BlockCorrupt):
        delta.open(bytes(data), block_id)


def test_an_encrypted_delta_is_bound_to_its_block_and_region() -> None:
    keys = _block_keys(9)
    lookup = {keys.key_id_bytes: keys}.__getitem__
    base = os.urandom(BLOCK)
    plain = _variant(base, [1])
    block_id = codec.content_id(plain, keys.id_key)
    enc = delta.encode(plain, block_id, codec.content_id(base, keys.id_key), [1], keys, "a")
    with pytest.raises(BlockCorrupt):
        delta.open(enc.data, block_id, lookup, "b")
    with pytest.raises(BlockCorrupt):
        delta.open(enc.data, bytes(32), lookup, "a")


def test_a_delta_over_the_wrong_base_fails_the_id_check_not_silently() -> None:
    base, other = os.urandom(BLOCK), os.urandom(BLOCK)
    plain = _variant(base, [2])
    block_id = codec.content_id(plain)
    enc = delta.encode(plain, block_id, codec.content_id(base), [2], None, "r")
    laid = delta.apply(other, delta.open(enc.data, block_id))
    assert codec.content_id(laid) != block_id  # what the repository checks before use


def test_resealing_keeps_the_pages_for_another_region() -> None:
    keys = _block_keys(5)
    lookup = {keys.key_id_bytes: keys}.__getitem__
    base = os.urandom(BLOCK)
    plain = _variant(base, [8, 9])
    block_id = codec.content_id(plain, keys.id_key)
    base_id = codec.content_id(base, keys.id_key)
    enc = delta.encode(plain, block_id, base_id, [8, 9], keys, "a")
    moved = delta.reseal(delta.open(enc.data, block_id, lookup, "a"), block_id, base_id, keys, "b")
    assert delta.apply(base, delta.open(moved.data, block_id, lookup, "b")) == plain
