"""SealedMap: a sealed snapshot's map in memory answers exactly what the index would."""

from __future__ import annotations

import os

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from snapfs.blocks.blockmap import SealedMap


def rows_source(rows: dict[int, bytes], calls: list[int]):  # type: ignore[no-untyped-def]
    ordered = sorted(rows.items())

    def rows_from(first: int, limit: int) -> list[tuple[int, bytes]]:
        calls.append(limit)
        return [(n, i) for n, i in ordered if n >= first][:limit]

    return rows_from


@given(
    numbers=st.sets(st.integers(min_value=0, max_value=50_000), max_size=3000),
    first=st.integers(min_value=0, max_value=50_000),
    span=st.integers(min_value=0, max_value=5000),
)
def test_lookups_match_the_rows(numbers: set[int], first: int, span: int) -> None:
    rows = {n: n.to_bytes(4, "big") * 8 for n in numbers}
    sealed = trio.run(SealedMap.load, rows_source(rows, []))
    assert len(sealed) == len(rows) and sealed.nbytes == 40 * len(rows)
    last = first + span
    assert sealed.between(first, last) == {n: i for n, i in rows.items() if first <= n <= last}
    assert sealed.get(first) == rows.get(first)


def test_a_big_map_loads_in_chunks() -> None:
    rows = {n * 3: os.urandom(32) for n in range(20_000)}
    calls: list[int] = []
    sealed = trio.run(SealedMap.load, rows_source(rows, calls))
    assert len(calls) > 1 and sealed.between(0, 60_000) == rows


def test_an_id_of_another_length_is_refused() -> None:
    with pytest.raises(ValueError, match="16-byte id"):
        trio.run(SealedMap.load, rows_source({1: b"x" * 16}, []))
