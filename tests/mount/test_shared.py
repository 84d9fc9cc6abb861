"""A region shared by several hosts (issue 19): three snapfs daemons with separate stores on
one machine, one PostgreSQL ledger and one bucket (rclone serve s3); each host writes, every
host reads everything, copies dedup across hosts, deletes and renames reach every host, and
the region's collector and reaper run while they do."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ..conftest import SNAPFS, PgServer, S3Server, SnapfsMount, run, sha256, wait_for

pytestmark = pytest.mark.pg

REGION = "shared-1"
BUCKET = "shared"
MiB = 1 << 20
TTL = "3"  # seconds: a stopped host is reaped quickly here (twice this, at the least)
GRACE = "20"  # seconds a dead pack is kept (a reader or a slow committer may name it)


class Host(SnapfsMount):
    """One host of the shared region: a store, a mountpoint, a daemon."""

    @property
    def region(self) -> Path:
        return self.path / REGION

    def names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.region))
        except OSError:
            return []


@pytest.fixture
def hosts(
    request: pytest.FixtureRequest, s3: S3Server, pg_dsn: str, tmp_path: Path
) -> Iterator[tuple[list[Host], S3Server, str]]:
    """Three hosts (`@pytest.mark.hosts(N, grace=SECONDS)` for another number, or another
    grace for dead packs) on one bucket and one database, mounted; the region is the
    test's to create (join_all)."""
    marker = request.node.get_closest_marker("hosts")
    count = marker.args[0] if marker else 3
    grace = marker.kwargs.get("grace", GRACE) if marker else GRACE
    env = {"SNAPFS_SESSION_TTL": TTL, "SNAPFS_PACK_GRACE": grace, "SNAPFS_STRAY_AGE": "4"}
    made = [Host(tmp_path / f"store-{n}", tmp_path / f"mnt-{n}", env=env) for n in "abcd"[:count]]
    try:
        for host in made:
            host.mount()
        yield made, s3, pg_dsn
    finally:
        for host in made:
            host.teardown()


def region_cmd(host: Host, verb: str, s3: S3Server, dsn: str, *extra: str, check: bool = True):
    return run(
        *SNAPFS, "region", verb, REGION, "--backend", f"s3://{BUCKET}/r", "--endpoint",
        s3.endpoint, "--index", dsn, "--store", host.store, *extra, check=check,
    )  # fmt: skip


def join_all(made: list[Host], s3: S3Server, dsn: str) -> None:
    out = region_cmd(made[0], "create", s3, dsn).stdout
    assert "shared through" in out and "created region" in out, out
    for host in made[1:]:
        region_cmd(host, "attach", s3, dsn)
    for host in made:
        assert host.region.is_dir()


def image(path: Path, size: int, seed: int) -> Path:
    """Disk-like bytes: random blocks with runs of zeros (holes) between them."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        written = 0
        while written < size:
            chunk = min(size - written, 256 << 10)
            f.write(rng.randbytes(chunk) if rng.random() < 0.7 else bytes(chunk))
            written += chunk
    return path


def bucket_bytes(s3: S3Server) -> int:
    return sum(p.stat().st_size for p in s3.packs(BUCKET, "r"))


def seen_everywhere(made: list[Host], names: list[str], timeout: float = 15) -> bool:
    return bool(wait_for(lambda: all(set(names) <= set(h.names()) for h in made), timeout))


def attr(path: Path, name: str) -> str | None:
    """A snapfs attribute; None while it is not there (yet)."""
    try:
        return os.getxattr(path, f"user.snapfs.{name}").decode()
    except OSError:
        return None


def ledger_rows(dsn: str, sql: str, params: list | None = None) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params or []).fetchall()


def test_hosts_write_read_copy_delete_and_rename_in_one_region(
    hosts: tuple[list[Host], S3Server, str], tmp_path: Path
) -> None:
    made, s3, dsn = hosts
    a, b, c = made
    join_all(made, s3, dsn)
    # A second region of the name in the same database is refused, clearly.
    again = region_cmd(a, "create", s3, dsn, check=False)
    assert again.returncode != 0 and "InvalidRegionId.Duplicate" in again.stderr, again.stderr

    # Each host writes a snapshot; every host reads all three, byte for byte.
    digests = {}
    for n, host in enumerate(made):
        src = image(tmp_path / f"own-{n}.img", 6 * MiB, seed=n)
        run("cp", src, host.region / src.name)
        assert attr(host.region / src.name, "status") == "available"
        digests[src.name] = sha256(src)
    assert seen_everywhere(made, list(digests)), [h.names() for h in made] + [a.log()]
    for host in made:
        for name, digest in digests.items():
            assert sha256(host.region / name) == digest, (host.path, name)

    # The same template copied in by every host at once is stored about once: a host
    # waits for a block another is uploading (its claim) instead of uploading it too.
    template = image(tmp_path / "template.img", 32 * MiB, seed=99)
    before = bucket_bytes(s3)
    copies = [
        subprocess.Popen(["cp", str(template), str(host.region / f"vm-{n}.img")])
        for n, host in enumerate(made)
    ]
    assert [cp.wait(120) for cp in copies] == [0, 0, 0]
    grew = bucket_bytes(s3) - before
    assert grew < 1.3 * 32 * MiB, f"the bucket grew {grew} bytes for a 32 MiB template x3"
    assert seen_everywhere(made, ["vm-0.img", "vm-1.img", "vm-2.img"])
    assert sha256(c.region / "vm-0.img") == sha256(template)

    # A name is the region's: another host cannot take it.
    with pytest.raises(FileExistsError):
        fd = os.open(b.region / "own-0.img", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)

    # Rename on one host, delete on another: every host follows.
    os.rename(c.region / "own-1.img", c.region / "renamed.img")
    assert wait_for(lambda: "renamed.img" in a.names() and "own-1.img" not in a.names(), 10)
    os.unlink(b.region / "own-0.img")
    assert wait_for(lambda: all("own-0.img" not in h.names() for h in made), 10)
    assert sha256(a.region / "renamed.img") == digests["own-1.img"]

    # Metadata set on one host is read on another.
    os.setxattr(a.region / "renamed.img", "user.snapfs.description", b"moved around")
    assert wait_for(lambda: attr(b.region / "renamed.img", "description") == "moved around", 10)

    # Copies into and out of the shared region work as between any two regions.
    local = a.path / "us-east-1"
    local.mkdir()
    shutil.copyfile(b.region / "vm-1.img", local / "from-shared.img")
    assert sha256(local / "from-shared.img") == sha256(template)
    run("mv", local / "from-shared.img", a.region / "back.img")
    assert wait_for(lambda: attr(a.region / "back.img", "status") == "available", 30)
    assert seen_everywhere(made, ["back.img"])
    assert sha256(c.region / "back.img") == sha256(template)

    # Deleting everything frees the bucket (after the packs' grace, by one host's collector).
    for name in b.names():
        os.unlink(b.region / name)
    assert wait_for(lambda: all(not h.names() for h in made), 15)
    assert wait_for(
        lambda: ledger_rows(dsn, "SELECT count(*) FROM snapfs.blocks")[0][0] == 0, 30
    ), a.log()
    for host in made:
        assert "Traceback" not in host.log(), host.log()


def test_bad_shared_region_requests_are_refused_clearly(
    s3: S3Server, pg_server: PgServer, pg_dsn: str, tmp_path: Path
) -> None:
    """A bad URL, wrong credentials, no bucket, a read-only join, a region the database
    lacks: each a cloud-style error naming what is wrong (never a password), nothing made."""
    from ..conftest import PG_PASSWORD, PG_PASSWORD_ROLE

    host = Host(tmp_path / "store", tmp_path / "mnt")
    host.mount()
    try:
        endpoint = ["--endpoint", s3.endpoint]
        backend = ["--backend", f"s3://{BUCKET}/r"]

        def refused(*args: str) -> str:
            done = run(*SNAPFS, "region", *args, "--store", host.store, check=False)
            assert done.returncode != 0, done.stdout
            assert "Traceback" not in done.stderr, done.stderr
            return done.stderr

        assert "InvalidParameter.IndexUrl" in refused(
            "create", REGION, *backend, *endpoint, "--index", "mysql://db/x"
        )
        assert "needs --backend" in refused("create", REGION, "--index", pg_dsn)
        assert "--read-only" in refused(
            "attach", REGION, *backend, *endpoint, "--index", pg_dsn, "--read-only"
        )
        wrong = pg_server.url(psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"],
                              PG_PASSWORD_ROLE, "not-" + PG_PASSWORD)  # fmt: skip
        message = refused("create", REGION, *backend, *endpoint, "--index", wrong)
        assert "Forbidden" in message and "not-" + PG_PASSWORD not in message, message
        # A password given on the command line is used, never stored.
        good = pg_server.url(psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"],
                             PG_PASSWORD_ROLE, PG_PASSWORD)  # fmt: skip
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'GRANT CREATE ON DATABASE "{conn.info.dbname}" TO {PG_PASSWORD_ROLE}')
        region_cmd(host, "create", s3, good)
        status = host.region_status(REGION)
        kept = b"".join(p.read_bytes() for p in host.store.glob("store.db*"))
        assert status["shared_index"].startswith("postgresql://")
        assert PG_PASSWORD not in status["shared_index"] and PG_PASSWORD.encode() not in kept
        # A region the database does not have cannot be joined.
        message = refused("attach", "other-1", "--backend", f"s3://{BUCKET}/other", *endpoint,
                          "--index", good)  # fmt: skip
        assert "InvalidRegionId.NotFound" in message, message
        assert sorted(os.listdir(host.path)) == [REGION]
    finally:
        host.teardown()


@pytest.mark.hosts(2)
def test_the_bucket_alone_serves_a_dr_host_and_rebuilds_a_lost_ledger(
    hosts: tuple[list[Host], S3Server, str], pg_server: PgServer, tmp_path: Path
) -> None:
    """Each host publishes the manifests of what it writes: a disaster-recovery host reads
    the region from the bucket alone (--read-only, no database), and when the database is
    lost, attaching the bucket to an empty one rebuilds the ledger from it."""
    made, s3, dsn = hosts
    a, b = made
    join_all(made, s3, dsn)
    digests = {}
    for n, host in enumerate((a, b)):
        src = image(tmp_path / f"host-{n}.img", 3 * MiB, seed=20 + n)
        run("cp", src, host.region / src.name)
        digests[src.name] = sha256(src)
    assert seen_everywhere(made, list(digests))
    os.setxattr(a.region / "host-1.img", "user.snapfs.description", b"written on b")
    manifests = s3.data / BUCKET / "r" / "meta" / "snapshots"
    assert wait_for(lambda: manifests.exists() and len(os.listdir(manifests)) == 2, 15)

    dr = Host(tmp_path / "dr-store", tmp_path / "dr-mnt")
    dr.mount()
    try:
        run(*SNAPFS, "region", "attach", REGION, "--backend", f"s3://{BUCKET}/r", "--endpoint",
            s3.endpoint, "--read-only", "--store", dr.store)  # fmt: skip
        assert dr.names() == sorted(digests)
        for name, digest in digests.items():
            assert sha256(dr.region / name) == digest
    finally:
        dr.teardown()

    # The database is lost: the hosts stop, a new (empty) one is attached to the bucket.
    for host in made:
        host.umount()
    lost_to = pg_server.url(f"rebuilt_{os.getpid()}")
    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE rebuilt_{os.getpid()}")
    try:
        fresh = [Host(tmp_path / f"new-{n}", tmp_path / f"new-mnt-{n}") for n in range(2)]
        for host in fresh:
            host.mount()
        try:
            out = region_cmd(fresh[0], "attach", s3, lost_to).stdout
            assert "2 snapshots" in out, out
            assert "rebuilt the shared index" in fresh[0].log(), fresh[0].log()
            region_cmd(fresh[1], "attach", s3, lost_to)
            for host in fresh:
                assert wait_for(lambda h=host: h.names() == sorted(digests), 15), host.log()
                for name, digest in digests.items():
                    assert sha256(host.region / name) == digest
            assert ledger_rows(lost_to, "SELECT description FROM snapfs.snapshots "
                               "WHERE name = 'host-1.img'") == [("written on b",)]  # fmt: skip
            # and it is an ordinary shared region again: a write on one shows on the other
            src = image(tmp_path / "after.img", 2 * MiB, seed=30)
            run("cp", src, fresh[1].region / "after.img")
            assert seen_everywhere(fresh, ["after.img"])
        finally:
            for host in fresh:
                host.teardown()
    finally:
        with psycopg.connect(pg_server.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS rebuilt_{os.getpid()} WITH (FORCE)")


@pytest.mark.hosts(2)
def test_an_encrypting_shared_region_needs_the_key_on_every_host(
    hosts: tuple[list[Host], S3Server, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A region that encrypts by default: the setting reaches every host; a host without
    the key refuses to create (ENOKEY) and cannot read; once the key is imported there, it
    reads the others' encrypted snapshots and writes its own, and identical content under
    one key is still stored once."""
    from ..conftest import make_key

    made, s3, dsn = hosts
    a, b = made
    join_all(made, s3, dsn)
    key_id = make_key(a, REGION)
    os.setxattr(a.region, "user.snapfs.default_kms_key_id", key_id.encode())
    os.setxattr(a.region, "user.snapfs.encrypt_by_default", b"true")
    src = image(tmp_path / "secret.img", 4 * MiB, seed=40)
    run("cp", src, a.region / "secret.img")
    assert attr(a.region / "secret.img", "encrypted") == "true"
    assert seen_everywhere([a, b], ["secret.img"])

    def setting() -> str | None:
        try:
            return os.getxattr(b.region, "user.snapfs.encrypt_by_default").decode()
        except OSError:
            return None

    assert wait_for(lambda: setting() == "true", 10)
    with pytest.raises(OSError) as refused:
        (b.region / "mine.img").write_bytes(b"x")
    assert refused.value.errno == errno.ENOKEY
    with pytest.raises(OSError) as unreadable:
        sha256(b.region / "secret.img")
    assert unreadable.value.errno == errno.ENOKEY

    monkeypatch.setenv("SNAPFS_EXPORT_PASSPHRASE", "move-the-key")
    exported = tmp_path / "key.json"
    run(*SNAPFS, "key", "export", key_id, "--out", exported, "--store", a.store)
    run(*SNAPFS, "key", "import", exported, "--store", b.store)
    assert sha256(b.region / "secret.img") == sha256(src)
    before = bucket_bytes(s3)
    run("cp", src, b.region / "again.img")  # the same content under the same key
    assert attr(b.region / "again.img", "encrypted") == "true"
    assert bucket_bytes(s3) - before < MiB  # its blocks were found, not uploaded again
    assert seen_everywhere([a, b], ["again.img"])
    assert sha256(a.region / "again.img") == sha256(src)


@pytest.mark.hosts(2)
def test_clones_and_shrinks_reach_every_host(
    hosts: tuple[list[Host], S3Server, str], tmp_path: Path
) -> None:
    """A clone's map is copied in the ledger and its writes go on top; a shrink cuts the
    ledger's map too: another host reads both exactly."""
    made, s3, dsn = hosts
    a, b = made
    join_all(made, s3, dsn)
    base = image(tmp_path / "base.img", 6 * MiB, seed=50)
    run("cp", base, a.region / "base.img")
    run(*SNAPFS, "clone", a.region / "base.img", a.region / "clone.img")
    expected = bytearray(base.read_bytes())
    with open(a.region / "clone.img", "r+b") as f:  # a few pages changed, as disks change
        for offset in (4096, 3 * MiB + 8192, 5 * MiB):
            f.seek(offset)
            f.write(b"\xab" * 4096)
            expected[offset : offset + 4096] = b"\xab" * 4096
    with open(a.region / "cut.img", "wb") as f:
        f.write(base.read_bytes())
        f.flush()
        f.truncate(2 * MiB + 100)  # written whole, then cut: the ledger's rows past go
        f.seek(3 * MiB)
        f.write(b"tail")  # and grown again: what lay between reads as zeros
    cut = bytearray(base.read_bytes()[: 2 * MiB + 100]) + bytes(3 * MiB - 2 * MiB - 100) + b"tail"
    run(*SNAPFS, "seal", a.region / "clone.img")
    run(*SNAPFS, "seal", a.region / "cut.img")
    assert seen_everywhere(made, ["base.img", "clone.img", "cut.img"])
    assert (b.region / "clone.img").read_bytes() == bytes(expected)
    assert (b.region / "cut.img").read_bytes() == bytes(cut)


@pytest.mark.hosts(2, grace="1")
def test_a_repack_moves_blocks_and_every_host_reads_them_from_their_new_pack(
    hosts: tuple[list[Host], S3Server, str], tmp_path: Path
) -> None:
    """A pack left mostly dead is repacked by the region's collector (its live blocks
    copied into a new pack, their locations switched in the ledger); once the old pack is
    gone, a host whose cache still names it asks the ledger and reads on."""
    made, s3, dsn = hosts
    a, b = made
    join_all(made, s3, dsn)
    big = tmp_path / "big.img"
    big.write_bytes(os.urandom(20 * MiB))  # two packs: 16 MiB and 4 MiB
    part = tmp_path / "part.img"
    part.write_bytes(big.read_bytes()[: 5 * MiB] + os.urandom(3 * MiB))  # shares 10 blocks
    run("cp", big, a.region / "big.img")
    run("cp", part, b.region / "part.img")
    assert seen_everywhere(made, ["big.img", "part.img"])
    assert sha256(a.region / "part.img") == sha256(part)  # a's cache knows its blocks now
    first = {p.name for p in s3.packs(BUCKET, "r")}
    os.unlink(a.region / "big.img")
    assert wait_for(lambda: "repacked" in a.log() + b.log(), 30), a.log() + b.log()

    # The old packs go after their grace (a collector round or two); only packs the ledger
    # names stay in the bucket.
    def bucket() -> set[str]:
        return {p.name for p in s3.packs(BUCKET, "r")}

    assert wait_for(lambda: len(first - bucket()) == 2, 30), (first, bucket())
    assert bucket() <= {r[0] for r in ledger_rows(dsn, "SELECT id FROM snapfs.packs")}
    for host in made:
        host.remount()  # no block in any cache: every read goes to the bucket
        assert sha256(host.region / "part.img") == sha256(part), host.log()
    live = [
        int(v) for v in ledger_rows(dsn, "SELECT sum(live_bytes), sum(size) FROM snapfs.packs")[0]
    ]
    assert live[0] > 0.5 * live[1], live  # what is left is mostly live
