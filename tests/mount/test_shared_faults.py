"""Faults in a shared region (issue 19): a host killed with -9 mid-write, a host stopped
(SIGSTOP) past its session's ttl, connections the server ends (pg_terminate_backend), and
the server itself down. What was acknowledged survives, what was unfinished is reaped, a
late commit is refused, and the region's bucket keeps no pack its ledger does not name."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from ..conftest import PgServer, S3Server, run, sha256, wait_for
from .test_shared import (
    BUCKET,
    Host,
    MiB,
    attr,
    hosts,  # noqa: F401 - the fixture
    image,
    join_all,
    ledger_rows,
    seen_everywhere,
)

pytestmark = pytest.mark.pg


def bucket_packs(s3: S3Server) -> set[str]:
    return {p.name for p in s3.packs(BUCKET, "r")}


def ledger_packs(dsn: str, state: str | None = None) -> set[str]:
    where = "" if state is None else " WHERE state = %s"
    return {r[0] for r in ledger_rows(dsn, f"SELECT id FROM snapfs.packs{where}",
                                      [] if state is None else [state])}  # fmt: skip


def sessions(dsn: str) -> dict[str, str]:
    return dict(ledger_rows(dsn, "SELECT id, state FROM snapfs.sessions"))


def no_strays(s3: S3Server, dsn: str) -> bool:
    """Every pack in the bucket is one the ledger names (sealed, or open by a live host)."""
    return bucket_packs(s3) <= ledger_packs(dsn)


def test_a_killed_host_is_reaped_and_what_it_closed_is_sealed(hosts, tmp_path: Path) -> None:  # noqa: F811
    made, s3, dsn = hosts
    a, b, c = made
    join_all(made, s3, dsn)
    c.umount()
    c.mount("--settle", "60")  # what c closes stays unsealed (settling) until it dies
    closed = image(tmp_path / "closed.img", 4 * MiB, seed=1)
    run("cp", closed, c.region / "closed.img")  # closed, settling: not asked (that seals)
    big = image(tmp_path / "big.img", 48 * MiB, seed=2)
    writer = subprocess.Popen(
        ["dd", f"if={big}", f"of={c.region / 'big.img'}", "bs=1M", "status=none"],
        stderr=subprocess.DEVNULL,
    )
    try:
        # Some of big.img's packs are uploaded (registered open, never committed).
        assert wait_for(lambda: ledger_packs(dsn, "open"), 60), c.log()
        c.kill9()
    finally:
        writer.kill()
        writer.wait()
    # Its heartbeats stop: after its ttl another host reaps it. The snapshot cp saw closed
    # is sealed and shown everywhere; the unfinished one is gone, with its packs.
    assert seen_everywhere([a, b], ["closed.img"], 60), a.log()
    assert attr(a.region / "closed.img", "status") == "available"
    assert sha256(b.region / "closed.img") == sha256(closed)
    assert "big.img" not in a.names()
    assert "reaped 1 sessions" in a.log() + b.log()
    assert wait_for(lambda: no_strays(s3, dsn) and not ledger_packs(dsn, "open"), 60)
    # It comes back: it finds its region as the others left it, and writes again.
    c.teardown()
    c.mount()
    assert wait_for(lambda: c.names() == ["closed.img"], 15), c.log()
    again = image(tmp_path / "again.img", 3 * MiB, seed=3)
    run("cp", again, c.region / "again.img")
    assert seen_everywhere(made, ["again.img"])
    assert sha256(a.region / "again.img") == sha256(again)
    for host in (a, b):
        assert "Traceback" not in host.log(), host.log()


def test_a_host_restarted_before_it_is_reaped_keeps_what_it_closed(
    hosts,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Killed after cp returned and restarted at once: its recovery seals the snapshot and
    its new session takes the old one's over; nothing cp saw succeed is deleted."""
    made, s3, dsn = hosts
    a, b, c = made
    join_all(made, s3, dsn)
    c.umount()
    c.mount("--settle", "60")
    src = image(tmp_path / "closed.img", 3 * MiB, seed=11)
    run("cp", src, c.region / "closed.img")
    c.kill9()
    c.teardown()
    c.mount()  # within its old session's ttl: nobody has reaped it
    assert seen_everywhere(made, ["closed.img"], 20), c.log()
    time.sleep(8)  # past the old session's ttl and a reaper round or two
    for host in made:
        assert host.names() == ["closed.img"], (host.path.name, host.log())
        assert sha256(host.region / "closed.img") == sha256(src)
    assert attr(a.region / "closed.img", "status") == "available"


def test_a_host_stopped_past_its_ttl_is_fenced(hosts, tmp_path: Path) -> None:  # noqa: F811
    made, s3, dsn = hosts
    a, b, c = made
    join_all(made, s3, dsn)
    big = image(tmp_path / "big.img", 64 * MiB, seed=4)
    writer = subprocess.Popen(
        ["dd", f"if={big}", f"of={c.region / 'late.img'}", "bs=1M", "status=none"],
        stderr=subprocess.PIPE,
    )
    pid = c.pid
    assert pid is not None
    try:
        assert wait_for(lambda: ledger_packs(dsn, "open"), 60), c.log()
        os.kill(pid, signal.SIGSTOP)
        # Past its ttl another host reaps it (its session expires, its writes are undone).
        assert wait_for(lambda: "expired" in sessions(dsn).values(), 60), a.log()
        assert wait_for(lambda: not ledger_packs(dsn, "open"), 60)
    finally:
        os.kill(pid, signal.SIGCONT)
    # The late writer's commits are refused: the copy fails, nothing of it appears.
    assert writer.wait(60) != 0
    assert wait_for(lambda: "fenced" in c.log(), 15), c.log()
    assert "late.img" not in a.names()
    assert wait_for(lambda: "joined the shared index again" in c.log(), 60), c.log()
    ok = image(tmp_path / "ok.img", 2 * MiB, seed=5)
    run("cp", ok, c.region / "ok.img")
    assert seen_everywhere(made, ["ok.img"])
    assert sha256(b.region / "ok.img") == sha256(ok)
    assert wait_for(lambda: no_strays(s3, dsn), 30)


@pytest.mark.hosts(2)
def test_connections_the_server_ends_are_opened_again(hosts, tmp_path: Path) -> None:  # noqa: F811
    made, s3, dsn = hosts
    a, b = made
    join_all(made, s3, dsn)
    src = image(tmp_path / "busy.img", 48 * MiB, seed=6)
    writer = subprocess.Popen(["cp", str(src), str(a.region / "busy.img")])
    database = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    killed = 0
    deadline = time.monotonic() + 4
    with psycopg.connect(dsn, autocommit=True) as admin:
        while writer.poll() is None and time.monotonic() < deadline:
            killed += admin.execute(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()) t",
                [database],
            ).fetchone()[0]
            time.sleep(0.3)
    assert writer.wait(60) == 0
    assert killed > 0
    assert seen_everywhere(made, ["busy.img"], 20), b.log()
    assert sha256(b.region / "busy.img") == sha256(src)
    assert "does not answer" in a.log()


def test_a_server_outage_waits_writes_and_spares_reads_other_regions_and_unmount(
    hosts,  # noqa: F811
    pg_server: PgServer,
    tmp_path: Path,
) -> None:
    made, s3, dsn = hosts
    a, b, c = made
    join_all(made, s3, dsn)
    first = image(tmp_path / "first.img", 8 * MiB, seed=7)
    run("cp", first, a.region / "first.img")
    assert seen_everywhere(made, ["first.img"])
    local = b.path / "eu-west-1"
    local.mkdir()
    pg_server.stop()
    try:
        # Reads of what is here go on; another region is not affected.
        assert sha256(b.region / "first.img") == sha256(first)
        run("cp", first, local / "local.img")
        assert sha256(local / "local.img") == sha256(first)
        # A write into the shared region waits for the server (and says so in the log).
        second = image(tmp_path / "second.img", 4 * MiB, seed=8)
        writer = subprocess.Popen(["cp", str(second), str(a.region / "second.img")])
        time.sleep(3)
        assert writer.poll() is None, "the write should wait for the shared index"
        assert "does not answer" in a.log()
        # Unmounting does not hang on the server.
        started = time.monotonic()
        c.umount()
        assert time.monotonic() - started < 30
    finally:
        pg_server.start()
    assert writer.wait(60) == 0
    assert seen_everywhere([a, b], ["second.img"], 20)
    assert sha256(b.region / "second.img") == sha256(second)
    # The outage was longer than the sessions' ttl: nobody was fenced for it.
    assert "fenced" not in a.log() + b.log()
    c.mount()
    assert wait_for(lambda: set(c.names()) == {"first.img", "second.img"}, 20), c.log()


def test_hosts_writing_reading_and_deleting_at_once_through_a_crash(
    hosts,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Every host writes, reads and deletes at once while the collector runs; one is killed
    mid-way and comes back. Every snapshot whose cp returned and that nobody deleted reads
    back identical on every host, and the bucket keeps only packs the ledger names."""
    import random
    import threading

    made, s3, dsn = hosts
    join_all(made, s3, dsn)
    images = [image(tmp_path / f"src-{n}.img", (2 + n % 3) * MiB, seed=100 + n) for n in range(6)]
    digests = {p.name: sha256(p) for p in images}
    kept: dict[str, str] = {}  # name -> digest of what its cp wrote, for cps that returned
    digest_of: dict[str, str] = {}  # every name a cp was started for
    deleted: set[str] = set()  # names an rm removed
    uncertain: set[str] = set()  # names an rm was sent for, whose answer a crash lost
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []

    def read(path: Path) -> str | None:
        try:
            return sha256(path)
        except OSError:  # deleted meanwhile, or the host is down
            return None

    def work(host: Host, seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        while not stop.is_set():
            n += 1
            name = f"{host.path.name}-{n}.img"
            src = rng.choice(images)
            with lock:
                digest_of[name] = digests[src.name]
            done = subprocess.run(["cp", str(src), str(host.region / name)], capture_output=True)
            if done.returncode == 0:
                with lock:
                    kept[name] = digests[src.name]
            with lock:
                victims = [k for k in kept if rng.random() < 0.15]
                for victim in victims:
                    kept.pop(victim)
            for victim in victims:
                outcome = "unseen"
                for other in made:  # whoever sees it deletes it
                    try:
                        os.unlink(other.region / victim)
                        outcome = "deleted"
                        break
                    except FileNotFoundError:
                        continue
                    except OSError:  # its host going down: the rm may have been done
                        outcome = "uncertain"
                with lock:
                    if outcome == "deleted":
                        deleted.add(victim)
                    elif outcome == "unseen":  # not pulled anywhere yet: still a complete
                        kept[victim] = digest_of[victim]  # snapshot, to read at the end
                    else:
                        uncertain.add(victim)
            with lock:
                readable = list(kept.items())
            for name, digest in rng.sample(readable, min(2, len(readable))):
                got = read(host.region / name)
                with lock:
                    still = name in kept
                if got is not None and got != digest and still:
                    errors.append(f"{host.path.name} read {name} wrong")

    workers = [threading.Thread(target=work, args=(h, n)) for n, h in enumerate(made)]
    for t in workers:
        t.start()
    try:
        time.sleep(4)
        made[2].kill9()  # dies in whatever it was doing; its worker's requests fail
        time.sleep(2)
        made[2].teardown()
        made[2].mount()
        time.sleep(3)
    finally:
        stop.set()
        for t in workers:
            t.join(120)
    assert not errors, errors
    assert kept, "the workers kept some snapshots"

    def settled() -> bool:
        """Every kept snapshot everywhere, every deleted one nowhere, the same everywhere.
        A snapshot whose cp saw an error may be there too: the daemon died after its close
        mark reached the ledger but before cp heard back, and the reaper sealed it; one
        whose rm saw an error may be there or not."""
        views = [set(h.names()) for h in made]
        return (
            all(v == views[0] for v in views) and set(kept) <= views[0] and not (views[0] & deleted)
        )

    def differences() -> str:
        views = {h.path.name: set(h.names()) for h in made}
        return "; ".join(
            f"{name}: missing {sorted(set(kept) - view)}, deleted but there "
            f"{sorted(view & deleted)}, extra {sorted(view - set(kept) - uncertain)}"
            for name, view in views.items()
        )

    assert wait_for(settled, 45), differences()
    for host in made:
        for name in host.names():
            assert sha256(host.region / name) == digest_of[name], (host.path.name, name)
    assert wait_for(lambda: no_strays(s3, dsn), 30)
    for host in made:
        assert "Traceback" not in host.log(), host.log()
