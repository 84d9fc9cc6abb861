"""A shared region's ledger (meta/ledger.py) on a real PostgreSQL: sessions and fencing,
names, commits that restore blocks the collector dropped, the reaper, the collector, and
hosts committing and collecting at once from threads."""

from __future__ import annotations

import random
import threading
import time

import psycopg
import pytest

from snapfs.errors import AlreadyExists, NotFound
from snapfs.meta.ledger import BlockLost, Ledger, SessionExpired, SharedBlock
from snapfs.meta.pg import PgRegionIndex

pytestmark = pytest.mark.pg

BS = 4096


def bid(n: int) -> bytes:
    return n.to_bytes(32, "big")


def block(n: int, pack: str, offset: int = 0, length: int = 100) -> SharedBlock:
    return SharedBlock(bid(n), BS, length, 1, None, None, pack, offset, length, 1000)


def row(snapshot_id: str, name: str, status: str = "creating", size: int = 0) -> dict:
    return {
        "id": snapshot_id, "name": name, "status": status, "size": size, "mode": 0o100644,
        "uid": 0, "gid": 0, "atime_ns": 0, "mtime_ns": 0, "ctime_ns": 0, "created_at": 1.0,
    }  # fmt: skip


@pytest.fixture
def region(pg_dsn: str) -> tuple[str, str]:
    index = PgRegionIndex.create(pg_dsn, "shared-1", created_at=1.0)
    index.set_setting("block_size", str(BS))
    index.close()
    return pg_dsn, "shared-1"


@pytest.fixture
def hosts(region: tuple[str, str]):
    made: list[Ledger] = []

    def host() -> Ledger:
        ledger = Ledger.attach(*region)
        made.append(ledger)
        return ledger

    yield host
    for ledger in made:
        ledger.close()


def reaped_after(ledger: Ledger, ttl: float):
    """A reaper's rounds until a session silent for `ttl` is expired: it is suspected at
    one, expired at one a ttl later."""
    time.sleep(ttl * 1.5)
    first = ledger.reap()
    if first.sessions:
        return first
    time.sleep(ttl * 1.2)
    return ledger.reap()


def written(ledger: Ledger, session: str, snapshot_id: str, name: str, blocks, size=None):
    """A snapshot written by `session`: reserved, its packs registered, its map committed."""
    ledger.reserve(session, row(snapshot_id, name))
    packs = {b.pack: b.pack_size for b in blocks}
    for pack in packs:
        if pack not in ledger.packs():
            ledger.register_pack(session, pack)
    mapping = [(no, b.block_id) for no, b in enumerate(blocks)]
    fields = {"size": size if size is not None else len(blocks) * BS}
    return ledger.commit(session, snapshot_id, packs, blocks, mapping, fields)


def test_sessions_beat_and_a_silent_one_is_reaped(hosts) -> None:
    a, b = hosts(), hosts()
    one = a.open_session("host-a", 1, ttl=0.3)
    two = b.open_session("host-b", 2, ttl=30)
    assert a.heartbeat(one) and b.heartbeat(two)
    time.sleep(0.45)
    assert b.reap().sessions == []  # suspected only
    assert a.heartbeat(one)  # and cleared: it beat again
    reaped = reaped_after(b, 0.3)
    assert reaped.sessions == [one]
    assert not a.heartbeat(one)  # fenced: it beats no more
    assert b.heartbeat(two)
    states = {s["id"]: s["state"] for s in b.sessions()}
    assert states == {one: "expired", two: "active"}
    with pytest.raises(SessionExpired):
        a.reserve(one, row("s-1", "late.img"))
    b.declare_dead(two)  # a store that restarted: its old session goes at the next reap
    assert b.reap().sessions == [two]


def test_names_belong_to_the_region(hosts) -> None:
    a, b = hosts(), hosts()
    sa, sb = a.open_session("a", 1, 30), b.open_session("b", 2, 30)
    a.reserve(sa, row("s-1", "disk.img"))
    with pytest.raises(AlreadyExists):
        b.reserve(sb, row("s-2", "disk.img"))
    b.reserve(sb, row("s-2", "other.img"))
    with pytest.raises(AlreadyExists):
        b.rename(sb, "s-2", "disk.img")
    b.exchange_names(sb, "s-1", "s-2", "disk.img", "other.img")
    assert a.snapshot("s-1")["name"] == "other.img" and a.snapshot("s-2")["name"] == "disk.img"
    a.delete(sa, "s-2")
    b.reserve(sb, row("s-3", "disk.img"))  # a deleted snapshot's name is free at once
    with pytest.raises(NotFound):
        a.rename(sa, "s-2", "gone.img")
    b.rename(sb, "s-3", "disk-2.img", "s-1")  # over another: that one is deleted
    assert [r["name"] for r in a.live_snapshots()] == ["disk-2.img"]


def test_commits_record_blocks_where_they_are_and_report_others_copies(hosts) -> None:
    a, b = hosts(), hosts()
    sa, sb = a.open_session("a", 1, 30), b.open_session("b", 2, 30)
    assert written(a, sa, "s-1", "a.img", [block(1, "p-a", 0), block(2, "p-a", 100)]) == {}
    packs = a.packs()
    assert packs["p-a"]["state"] == "sealed" and packs["p-a"]["live_bytes"] == 200
    assert set(b.lookup([bid(1), bid(2), bid(3)])) == {bid(1), bid(2)}
    # Host b stored block 2 itself meanwhile (it had not seen a's): the ledger keeps a's.
    moved = written(b, sb, "s-2", "b.img", [block(2, "p-b", 0), block(3, "p-b", 100)])
    assert set(moved) == {bid(2)}
    assert (moved[bid(2)].pack, moved[bid(2)].offset) == ("p-a", 100)
    assert b.packs()["p-b"]["live_bytes"] == 100  # only block 3 lives in b's pack
    # A commit naming a pack another session registered and never sealed is refused.
    a.register_pack(sa, "p-open")
    b.reserve(sb, row("s-3", "c.img"))
    with pytest.raises(BlockLost):
        b.commit(sb, "s-3", {"p-open": 10}, [block(4, "p-open")], [(0, bid(4))], {})
    # And a snapshot that is not the session's to write.
    with pytest.raises(SessionExpired):
        b.commit(sb, "s-1", {}, [block(1, "p-a")], [(5, bid(1))], {})


def test_a_commit_restores_a_block_the_collector_dropped_unless_its_pack_went(hosts) -> None:
    a, b = hosts(), hosts()
    sa, sb = a.open_session("a", 1, 30), b.open_session("b", 2, 30)
    written(a, sa, "s-1", "a.img", [block(1, "p-a", 0)])
    a.update(sa, "s-1", {"status": "available"})
    a.delete(sa, "s-1")
    while a.purge_step():
        pass
    assert a.drop_unreferenced() == 1 and a.packs()["p-a"]["dead_since"] is not None
    # b deduplicated against block 1 before it went: its commit brings the row back.
    b.reserve(sb, row("s-2", "b.img"))
    b.commit(sb, "s-2", {}, [block(1, "p-a", 0)], [(0, bid(1))], {})
    packs = b.packs()
    assert packs["p-a"]["live_bytes"] == 100 and packs["p-a"]["dead_since"] is None
    assert b.doomed_packs(grace=0) == []
    # Once a dead pack is being deleted, nothing brings its blocks back.
    b.delete(sb, "s-2")
    while b.purge_step():
        pass
    b.drop_unreferenced()
    assert b.doomed_packs(grace=0) == ["p-a"]
    a.reserve(sa, row("s-3", "c.img"))
    with pytest.raises(BlockLost):
        a.commit(sa, "s-3", {}, [block(1, "p-a", 0)], [(0, bid(1))], {})
    a.forget_packs(["p-a"])
    assert "p-a" not in a.packs()


def test_the_reaper_seals_what_was_closed_and_deletes_what_was_not(hosts) -> None:
    a, b = hosts(), hosts()
    sa = a.open_session("a", 1, 0.3)
    b.open_session("b", 2, 30)
    written(a, sa, "s-closed", "closed.img", [block(1, "p-1", 0), block(2, "p-1", 100)],
            size=BS + 10)  # fmt: skip
    a.update(sa, "s-closed", {"closed": 1, "size": BS})  # shrunk to one block, then closed
    written(a, sa, "s-open", "open.img", [block(3, "p-2", 0)])
    a.register_pack(sa, "p-3")  # uploaded, never committed
    reaped = reaped_after(b, 0.3)
    assert reaped.sessions == [sa]
    assert reaped.sealed == ["s-closed"] and reaped.deleted == ["s-open"]
    assert reaped.packs == ["p-3"]
    sealed = b.snapshot("s-closed")
    assert sealed["status"] == "available" and sealed["owner"] is None
    assert b.map_from("s-closed", 0) == [(0, bid(1))]  # its map ends at its size
    assert b.snapshot("s-open")["deleted"] == 1
    assert b.reap().sessions == []


def test_claims_make_hosts_wait_for_an_upload_and_pins_keep_published_blocks(hosts) -> None:
    a, b = hosts(), hosts()
    sa, sb = a.open_session("a", 1, 30), b.open_session("b", 2, 30)
    x, y = block(1, "p-a", 0), block(2, "p-a", 100)
    assert a.lookup_or_claim(sa, [x.block_id, y.block_id]) == ({}, {x.block_id, y.block_id}, set())
    assert b.lookup_or_claim(sb, [x.block_id]) == ({}, set(), {x.block_id})  # a writes it
    a.register_pack(sa, "p-a")
    a.publish(sa, "p-a", 1000, [x, y])  # uploaded: reusable before a commits
    found, mine, theirs = b.lookup_or_claim(sb, [x.block_id])
    assert set(found) == {x.block_id} and not mine and not theirs
    assert a.drop_unreferenced() == 0  # pinned by a, though nothing names them yet
    b.reserve(sb, row("s-b", "b.img"))
    assert b.commit(sb, "s-b", {}, [found[x.block_id]], [(0, x.block_id)], {}) == {}
    a.reserve(sa, row("s-a", "a.img"))
    a.commit(sa, "s-a", {"p-a": 1000}, [x], [(0, x.block_id)], {})  # y never committed
    assert a.packs()["p-a"]["state"] == "sealed"
    a.end_session(sa)  # its pin on y goes: y is unreferenced now
    assert a.drop_unreferenced() == 1 and set(a.blocks([x.block_id, y.block_id])) == {x.block_id}
    assert a.forget_claims(0) == 0  # published and committed claims went with them


def test_the_collector_purges_drops_and_deletes_dead_packs_after_the_grace(hosts) -> None:
    a = hosts()
    sa = a.open_session("a", 1, 30)
    written(a, sa, "s-1", "a.img", [block(1, "p-1", 0), block(2, "p-2", 0)])
    written(a, sa, "s-2", "b.img", [block(2, "p-2", 0)])
    before = a.last_change()
    a.delete(sa, "s-1")
    assert [r["id"] for r in a.changes(before)] == ["s-1"]
    while a.purge_step(limit=1):
        pass
    assert a.snapshot("s-1")["purged"] == 1
    assert a.drop_unreferenced() == 1  # block 1; block 2 is b.img's still
    assert a.doomed_packs(grace=60) == []  # dead, within its grace
    assert a.doomed_packs(grace=0) == ["p-1"]
    assert a.deleting_packs() == ["p-1"]
    a.forget_packs(["p-1"])
    assert set(a.packs()) == {"p-2"}
    assert a.counts()["unreferenced"] == 0


def test_one_collector_holds_the_lease_until_it_lapses(hosts) -> None:
    a, b = hosts(), hosts()
    sa, sb = a.open_session("a", 1, 30), b.open_session("b", 2, 30)
    assert a.collect_lease(sa, 0.3) and a.collect_lease(sa, 0.3)  # kept by its holder
    assert not b.collect_lease(sb, 0.3)
    time.sleep(0.4)  # a holder that stopped (SIGSTOP, a crash) holds it no longer
    assert b.collect_lease(sb, 0.3) and not a.collect_lease(sa, 0.3)


def test_a_repack_switches_only_the_blocks_still_in_the_old_pack(hosts) -> None:
    a = hosts()
    sa = a.open_session("a", 1, 30)
    blocks = [block(n, "p-old", n * 100) for n in range(4)]
    written(a, sa, "s-1", "keep.img", blocks[:2])
    written(a, sa, "s-2", "gone.img", blocks[2:])
    a.update(sa, "s-1", {"status": "available"})
    a.update(sa, "s-2", {"status": "available"})
    a.packs()  # p-old: 400 of 1000 bytes live
    assert a.repack_candidates(0.5) == [("p-old", 1000, 400)]
    a.delete(sa, "s-2")
    while a.purge_step():
        pass
    a.drop_unreferenced()
    rows = a.blocks_in_pack("p-old")
    assert [r[0] for r in rows] == [bid(0), bid(1)]
    a.register_pack(sa, "p-new")
    # Block 1 is deleted between the copy and the switch: it stays deleted.
    a.delete(sa, "s-1")
    a.reserve(sa, row("s-3", "one.img"))
    a.commit(sa, "s-3", {}, [blocks[0]], [(0, bid(0))], {})
    while a.purge_step():
        pass
    a.drop_unreferenced()
    moved = a.relocate(sa, "p-new", 300, [(bid(0), "p-old", 0, 100), (bid(1), "p-old", 100, 100)])
    assert moved == 1 and a.blocks([bid(0)])[bid(0)].pack == "p-new"
    assert bid(1) not in a.blocks([bid(1)])
    packs = a.packs()
    assert packs["p-new"]["state"] == "sealed" and packs["p-new"]["live_bytes"] == 100
    assert packs["p-old"]["live_bytes"] == 0 and packs["p-old"]["dead_since"] is not None
    b = hosts()
    sb = b.open_session("b", 2, 30)
    with pytest.raises(BlockLost):  # another session's pack is not its to seal
        b.relocate(sb, "p-new", 300, [])


def test_unknown_packs_are_strays_only_when_old(hosts) -> None:
    a = hosts()
    sa = a.open_session("a", 1, 30)
    a.register_pack(sa, "p-known")
    doomed = a.doom_strays({"p-known": 1e9, "p-new": 10.0, "p-old": 1e9})
    assert doomed == ["p-old"]
    # A commit naming the doomed pack finds it going.
    a.reserve(sa, row("s-1", "a.img"))
    with pytest.raises(BlockLost):
        a.commit(sa, "s-1", {"p-old": 5}, [block(1, "p-old")], [(0, bid(1))], {})


def test_writers_and_the_collector_at_once_never_lose_a_referenced_block(hosts) -> None:
    """Hosts commit references to shared blocks, delete snapshots and collect, in threads;
    every block a live snapshot's map names keeps its row, in a pack not being deleted."""
    ledgers = [hosts() for _ in range(4)]
    sessions = [led.open_session(f"h{i}", i, 30) for i, led in enumerate(ledgers)]
    errors: list[BaseException] = []
    stop = threading.Event()
    pool = [block(n, f"p-{n % 5}", (n // 5) * 100) for n in range(20)]
    ledgers[0].reserve(sessions[0], row("s-seed", "seed.img"))
    for pack in {b.pack for b in pool}:
        ledgers[0].register_pack(sessions[0], pack)
    ledgers[0].commit(sessions[0], "s-seed", {b.pack: 1000 for b in pool}, pool,
                      [(n, b.block_id) for n, b in enumerate(pool)], {})  # fmt: skip
    ledgers[0].delete(sessions[0], "s-seed")

    def writer(i: int) -> None:
        rng = random.Random(i)
        led, session = ledgers[i], sessions[i]
        n = 0
        try:
            while not stop.is_set():
                n += 1
                sid = f"s-{i}-{n}"
                led.reserve(session, row(sid, f"{sid}.img"))
                chosen = rng.sample(pool, 4)
                try:
                    led.commit(session, sid, {}, chosen,
                               [(k, b.block_id) for k, b in enumerate(chosen)], {})  # fmt: skip
                except BlockLost:
                    led.delete(session, sid)  # its pack went: the snapshot fails
                    continue
                if rng.random() < 0.5:
                    led.delete(session, sid)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    def collector() -> None:
        led, session = ledgers[3], sessions[3]
        try:
            while not stop.is_set():
                if led.collect_lease(session, 5):
                    while led.purge_step(limit=3):
                        pass
                    led.drop_unreferenced(limit=2)
                    doomed = led.doomed_packs(grace=0)
                    if doomed:
                        led.forget_packs(doomed)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=collector))
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    check = ledgers[0]
    live = [r["id"] for r in check.live_snapshots()]
    assert live, "the writers kept some snapshots"
    packs = check.packs()
    for sid in live:
        named = {b for _, b in check.map_from(sid, 0)}
        found = check.blocks(named)
        assert set(found) == named, sid
        assert all(packs[b.pack]["state"] == "sealed" for b in found.values()), sid
    with pytest.raises(psycopg.IntegrityError):  # and the trigger refuses a dangling row
        check.db.execute(
            "INSERT INTO snapshot_blocks (snapshot_id, block_no, block_id) VALUES (?, ?, ?)",
            [live[0], 999, bid(999)],
        )
