"""Maps relative to a parent (meta/index.py, schema 5), without the kernel: every map
operation, and every single step of a fold on delete, leaves each snapshot's resolved
content, its allocated-block count and every block's refcount exactly right. Each test runs
on both engines (`new_region_index`: SQLite, and PostgreSQL marked `pg`)."""

from __future__ import annotations

import random

import hypothesis.strategies as st
from hypothesis import given, settings

from snapfs.meta.index import MAX_CHAIN_DEPTH, NewBlock, RegionIndex

BLOCKS = 24
IDS = [bytes([i]) * 32 for i in range(1, 9)]


def _row(snapshot_id: str, created: float) -> dict:
    return {
        "id": snapshot_id, "name": snapshot_id, "status": "available", "size": BLOCKS * 10,
        "mode": 0o644, "uid": 0, "gid": 0, "atime_ns": 0, "mtime_ns": 0, "ctime_ns": 0,
        "created_at": created, "sealed_at": created,
    }  # fmt: skip


class Model:
    """The index beside what each snapshot must read."""

    def __init__(self, index: RegionIndex):
        self.index = index
        self.index.commit_blocks("blocks", [NewBlock(i, 10, 5, 1) for i in IDS], [], {})
        self.expected: dict[str, dict[int, bytes]] = {}
        self.clock = 0.0

    def new(self, name: str, content: dict[int, bytes], parent: str | None = None) -> None:
        self.clock += 1
        self.index.insert_snapshot(_row(name, self.clock))
        if parent is not None:
            self.index.clone_map(name, parent, {})
            base = dict(self.expected[parent])
        else:
            base = {}
        self.expected[name] = base
        self.write(name, content)

    def write(self, name: str, changes: dict[int, bytes | None]) -> None:
        self.index.commit_blocks(name, [], sorted(changes.items()), {})
        for no, bid in changes.items():
            if bid is None:
                self.expected[name].pop(no, None)
            else:
                self.expected[name][no] = bid

    def delete(self, name: str, step_check: bool = True) -> None:
        self.index.update_snapshot(name, deleted=1)
        while self.index.fold_step(name, 3):
            if step_check:
                self.check(skip=name)
        self.index.delete_snapshot(name)
        del self.expected[name]

    def rebase(self, name: str, parent: str) -> None:
        """What service/chains.py does, checked after each step."""
        for first in range(0, BLOCKS, 7):
            self.index.put_tombstones(name, parent, first, first + 6)
            self.check()
        if self.index.set_parent(name, parent):
            self.check()
            for first in range(0, BLOCKS, 7):
                self.index.drop_redundant(name, first, first + 6)
                self.check()

    def check(self, skip: str | None = None) -> None:
        index = self.index
        for name, content in self.expected.items():
            if name == skip:
                continue
            assert index.block_map(name, 0, BLOCKS) == content, name
            assert dict(index.block_map_from(name, 0, 1000)) == content, name
            small = []
            first = 0
            while rows := index.block_map_from(name, first, 2):
                small += rows
                first = rows[-1][0] + 1
            assert dict(small) == content, name
            for no in range(BLOCKS):
                assert index.block_id(name, no) == content.get(no), (name, no)
            assert index.allocated_blocks(name) == len(content), name
        for block_id, recorded, actual in index.block_refcounts():
            assert recorded == actual, block_id.hex()
        assert index.broken_chains() == []


def _content(rng: random.Random, share: float) -> dict[int, bytes]:
    return {no: rng.choice(IDS) for no in range(BLOCKS) if rng.random() < share}


def test_a_clone_costs_the_rows_it_changes_and_reads_through_its_parent(new_region_index) -> None:
    m = Model(new_region_index())
    rng = random.Random(1)
    m.new("day1", _content(rng, 0.9))
    m.new("day2", {3: IDS[7], 4: None}, parent="day1")
    m.check()
    assert m.index.own_row_count("day2") == 2  # a block and a tombstone
    m.write("day2", {3: m.expected["day1"].get(3)})  # back to the parent's: no row
    m.check()
    assert m.index.own_row_count("day2") == 1


def test_deleting_the_root_hands_its_map_to_its_only_child(new_region_index) -> None:
    m = Model(new_region_index())
    rng = random.Random(2)
    m.new("day1", _content(rng, 1.0))
    m.new("day2", {1: IDS[0], 2: None}, parent="day1")
    m.new("day3", {5: IDS[1]}, parent="day2")
    rows_before = m.index.own_row_count("day1")
    m.delete("day1")
    m.check()
    # day2 took day1's map over; its two changes were merged into it, nothing copied.
    assert m.index.own_row_count("day2") == rows_before - 1  # block 2 is a hole now
    assert m.index.parent_of("day2") is None and m.index.depth("day3") == 1
    m.delete("day3")
    m.check()


def test_deleting_a_parent_of_several_folds_into_each(new_region_index) -> None:
    m = Model(new_region_index())
    rng = random.Random(3)
    m.new("base", _content(rng, 0.8))
    m.new("mid", _content(rng, 0.2), parent="base")
    for kid in ("a", "b", "c"):
        m.new(kid, _content(rng, 0.2), parent="mid")
    m.delete("mid")
    m.check()
    assert {m.index.parent_of(k) for k in "abc"} == {"base"}


def test_a_chain_too_deep_starts_a_full_map(new_region_index) -> None:
    m = Model(new_region_index())
    m.new("s0", {0: IDS[0], 1: IDS[1]})
    for n in range(1, MAX_CHAIN_DEPTH + 2):
        m.new(f"s{n}", {n % BLOCKS: IDS[n % len(IDS)]}, parent=f"s{n - 1}")
    m.check()
    assert m.index.depth(f"s{MAX_CHAIN_DEPTH}") == MAX_CHAIN_DEPTH
    assert m.index.depth(f"s{MAX_CHAIN_DEPTH + 1}") == 0


def test_a_shrink_over_a_parent_leaves_tombstones(new_region_index) -> None:
    m = Model(new_region_index())
    m.new("p", {no: IDS[no % 8] for no in range(BLOCKS)})
    m.new("c", {}, parent="p")
    while not m.index.truncate_map_step("c", 10, 4, 100, 10):
        pass
    for no in range(10, BLOCKS):
        m.expected["c"].pop(no)
    m.check()


def test_rows_changed_since_an_ancestor(new_region_index) -> None:
    m = Model(new_region_index())
    rng = random.Random(4)
    m.new("a", _content(rng, 1.0))
    m.new("b", {2: IDS[3], 9: None}, parent="a")
    m.new("c", {2: IDS[4], 15: IDS[5]}, parent="b")
    assert m.index.changed_since("c", "a", 0, 100) == [(2, IDS[4]), (9, None), (15, IDS[5])]
    assert m.index.changed_since("c", "a", 3, 1) == [(9, None)]
    assert m.index.changed_count("c", "a") == 3
    assert m.index.changed_since("c", "b", 0, 100) == [(2, IDS[4]), (15, IDS[5])]
    assert m.index.changed_since("a", "c", 0, 100) is None


def test_a_rebase_keeps_only_the_rows_that_differ(new_region_index) -> None:
    m = Model(new_region_index())
    m.new("day1", {no: IDS[no % 8] for no in range(BLOCKS)})
    day2 = dict(m.expected["day1"])
    day2[4] = IDS[7]
    del day2[6]
    m.new("day2", day2)
    m.rebase("day2", "day1")
    assert m.index.parent_of("day2") == "day1"
    assert m.index.own_row_count("day2") == 2


def test_an_ancestor_folded_away_is_no_base_any_more(new_region_index) -> None:
    """Its heir took its map over, so the map id it left names the heir's rows now: a copy
    walking "the rows since" it must not mistake those for no change."""
    m = Model(new_region_index())
    m.new("a", {0: IDS[0], 1: IDS[1]})
    m.new("b", {1: IDS[2]}, parent="a")
    assert m.index.changed_since("b", "a", 0, 10) == [(1, IDS[2])]
    m.delete("a")
    assert m.index.changed_since("b", "a", 0, 10) is None
    assert m.index.changed_count("b", "a") is None


def test_a_broken_chain_is_named(new_region_index) -> None:
    m = Model(new_region_index())
    m.new("a", {0: IDS[0]})
    m.new("b", {1: IDS[1]}, parent="a")
    m.index.db.execute("UPDATE snapshots SET parent_id = 'gone' WHERE id = 'b'")
    broken = m.index.broken_chains()
    assert [(sid, why) for sid, _, why in broken] == [("b", "its parent gone is missing")]


def test_random_chains_stay_right_through_every_step(new_region_index) -> None:
    # PostgreSQL answers each of check()'s thousands of lookups over its socket (~0.2 ms
    # each): fewer examples there keep the fast suite fast; SQLite runs all 40.
    examples = 40 if new_region_index.engine == "sqlite" else 10

    @settings(max_examples=examples, deadline=None)
    @given(seed=st.integers(0, 10_000), steps=st.integers(4, 14))
    def run(seed: int, steps: int) -> None:
        m = Model(new_region_index())  # a new index (file or region) for every example
        rng = random.Random(seed)
        m.new("s0", _content(rng, 0.7))
        for n in range(1, steps):
            live = list(m.expected)
            action = rng.random()
            if action < 0.55 or len(live) < 2:
                m.new(f"s{n}", _content(rng, 0.15), parent=rng.choice(live))
            elif action < 0.65:
                m.new(f"s{n}", _content(rng, 0.7))
            elif action < 0.75:
                flat = [s for s in live if m.index.parent_of(s) is None]
                m.rebase(rng.choice(flat), rng.choice(live))
            else:
                m.delete(rng.choice(live))
            m.check()
        m.index.close()

    run()


def test_a_reader_beside_a_rebase_counts_every_snapshot_once(tmp_path) -> None:
    """`snapfs status` reads the index beside the daemon: a rebase committing while it adds
    up the full maps and the chained ones must not count a snapshot twice (stats() reads
    one snapshot of the index; a CI run once saw dedup 3.0 for two identical files)."""
    writer = RegionIndex(tmp_path / "index.db")
    writer.commit_blocks("blocks", [NewBlock(i, 10, 5, 1) for i in IDS], [], {})
    full = [(n, IDS[n % len(IDS)]) for n in range(BLOCKS)]
    for name in ("a", "b"):
        writer.insert_snapshot(_row(name, 1.0))
        writer.commit_blocks(name, [], full, {})
    reader = RegionIndex(tmp_path / "index.db", readonly=True)
    try:
        before = reader.stats()
        assert before.referenced_plain_bytes == 2 * BLOCKS * 10
        with reader.db.snapshot():
            inside = reader.stats()
            writer.put_tombstones("b", "a", 0, BLOCKS - 1)
            writer.set_parent("b", "a")  # committed between two statements of a stats()
            writer.insert_snapshot(_row("c", 2.0))
            writer.commit_blocks("c", [], full, {})
            assert reader.stats() == inside  # the reader still sees its snapshot
        writer.drop_redundant("b", 0, BLOCKS - 1)
        after = reader.stats()
        assert after.referenced_plain_bytes == 3 * BLOCKS * 10 and writer.parent_of("b") == "a"
    finally:
        reader.close()
        writer.close()
