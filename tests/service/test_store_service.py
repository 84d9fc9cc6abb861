"""A Store served in-process: the FUSE handlers of `Operations` called directly, as the
kernel would call them, without mounting (as S3QL's t3_fs_api drives its Operations).

`served()` does what the daemon's `serve()` does (snapfs/daemon.py), less `pyfuse3.init`
and `pyfuse3.main`: open the store, recover, start its background work in a nursery, build
`Operations` on it; at the end shut the store down and close it cleanly, so that a test can
open the same store again and see what persisted.

What the kernel would pass is built here: `Ctx` stands for `pyfuse3.RequestContext` and
`Fields` for `pyfuse3.SetattrFields` (pyfuse3 makes their fields read-only, and Operations
reads only these). `readdir` answers through `pyfuse3.readdir_reply` into the kernel's
buffer, so that test replaces it with a list. Everything else runs as in a mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import pytest
import trio

from snapfs.fuse.operations import Operations
from snapfs.service.region import RENAME_EXCHANGE, RENAME_NOREPLACE
from snapfs.service.store import ROOT_INO, Store

KiB = 1 << 10
BLOCK = 64 * KiB  # small blocks: a few hundred KiB spans several of them
PIECE = 128 * KiB  # what one WRITE request carries at most here
SETTLE = 600.0  # nothing seals on its own during a test unless the test asks for it
WAIT = 20.0  # bound on anything a test waits for in the background

STATUS = b"user.snapfs.status"


@dataclass(frozen=True)
class Ctx:
    """The fields of pyfuse3.RequestContext that Operations reads."""

    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    pid: int = 4242
    umask: int = 0o022


@dataclass(frozen=True)
class Fields:
    """pyfuse3.SetattrFields: which attributes a SETATTR changes."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


CTX = Ctx()


def image(size: int, seed: int) -> bytes:
    """`size` bytes: distinct random blocks with one all-zero block (a hole) in them."""
    data = bytearray(os.urandom(size))
    if size > 2 * BLOCK:
        data[BLOCK : 2 * BLOCK] = bytes(BLOCK)
    data[:8] = seed.to_bytes(8, "big")
    return bytes(data)


async def fuse_errno(call: Awaitable[object]) -> int:
    """The errno a handler answers with (it must refuse)."""
    with pytest.raises(pyfuse3.FUSEError) as refused:
        await call
    return refused.value.errno


@dataclass
class Served:
    store: Store
    ops: Operations
    nursery: trio.Nursery

    async def mkdir(self, name: str) -> int:
        attr = await self.ops.mkdir(ROOT_INO, name.encode(), 0o755, CTX)
        assert stat.S_ISDIR(attr.st_mode)
        return attr.st_ino

    async def write_file(
        self, region: int, name: str, data: bytes, ctx: Ctx = CTX, *, close: bool = True
    ) -> tuple[int, int | None]:
        """create(2), write(2) in pieces, close(2): (inode, handle if still open)."""
        info, attr = await self.ops.create(
            region, name.encode(), stat.S_IFREG | 0o640, os.O_WRONLY | os.O_CREAT, ctx
        )
        assert info.direct_io  # content that can change bypasses the page cache
        for off in range(0, len(data), PIECE):
            assert await self.ops.write(info.fh, off, data[off : off + PIECE]) == len(
                data[off : off + PIECE]
            )
        if not close:
            return attr.st_ino, info.fh
        await self.ops.flush(info.fh)
        await self.ops.release(info.fh)
        return attr.st_ino, None

    async def read_file(self, ino: int, ctx: Ctx = CTX) -> bytes:
        info = await self.ops.open(ino, os.O_RDONLY, ctx)
        try:
            return await self.read_all(info.fh)
        finally:
            await self.ops.release(info.fh)

    async def read_all(self, fh: int) -> bytes:
        chunks = []
        off = 0
        while chunk := await self.ops.read(fh, off, PIECE):
            chunks.append(chunk)
            off += len(chunk)
        return b"".join(chunks)

    async def status(self, ino: int) -> bytes:
        """What `getfattr -n user.snapfs.status` says (reading it seals a settling one)."""
        return await self.ops.getxattr(ino, STATUS, CTX)

    async def lookup(self, parent: int, name: str) -> pyfuse3.EntryAttributes:
        return await self.ops.lookup(parent, name.encode(), CTX)


@contextlib.asynccontextmanager
async def served(path: Path, *, settle: float = SETTLE) -> AsyncIterator[Served]:
    store = Store(path, block_size=BLOCK, settle=settle)
    clean = False
    try:
        await store.recover()
        async with trio.open_nursery() as nursery:
            store.start(nursery)
            yield Served(store, Operations(store, nursery), nursery)
            await store.shutdown()
            nursery.cancel_scope.cancel()
        clean = True
    finally:
        store.close(clean=clean)


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for background work: the settle timer, the purge, the collector."""
    with trio.move_on_after(WAIT):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"not within {WAIT} s: {what}")


# --- writing, sealing, reading ---------------------------------------------------------------


async def test_a_snapshot_written_through_the_handlers_is_sealed_and_reads_back(
    tmp_path: Path,
) -> None:
    data = image(4 * BLOCK + 1000, seed=1)  # blocks 0, 2, 3 and a partial 4; 1 is a hole
    async with served(tmp_path / "store") as fs:
        region = await fs.mkdir("us-east-1")
        assert (await fs.lookup(ROOT_INO, "us-east-1")).st_ino == region
        assert (await fs.ops.getattr(ROOT_INO, CTX)).st_nlink == 3  # ., .. and the region
        ino, _ = await fs.write_file(region, "disk.img", data)

        attr = await fs.ops.getattr(ino, CTX)
        assert stat.S_ISREG(attr.st_mode) and stat.S_IMODE(attr.st_mode) == 0o640
        assert (attr.st_size, attr.st_uid, attr.st_gid) == (len(data), CTX.uid, CTX.gid)
        assert fs.store.by_ino[ino].status == "creating"  # closed, settling
        assert await fs.status(ino) == b"available"  # asking seals it
        assert (await fs.ops.getattr(ino, CTX)).st_blocks * 512 == 4 * BLOCK  # not the hole
        assert len(list(fs.store.region("us-east-1").backend.keys())) == 4

        info = await fs.ops.open(ino, os.O_RDONLY, CTX)
        assert not info.direct_io  # sealed: reads may come from the page cache
        assert await fs.read_all(info.fh) == data
        assert await fs.ops.read(info.fh, len(data) - 10, PIECE) == data[-10:]  # clipped
        assert await fs.ops.read(info.fh, len(data) + BLOCK, PIECE) == b""  # past the end
        assert await fs.ops.read(info.fh, BLOCK + 5, 100) == bytes(100)  # the hole
        await fs.ops.release(info.fh)
        assert (
            await fs.ops.getxattr(ino, b"user.snapfs.id", CTX) == fs.store.by_ino[ino].id.encode()
        )


async def test_a_sealed_snapshot_refuses_every_change_of_its_content(tmp_path: Path) -> None:
    async with served(tmp_path / "store") as fs:
        region = await fs.mkdir("us-east-1")
        ino, _ = await fs.write_file(region, "disk.img", image(3 * BLOCK, seed=2))
        await fs.ops.setxattr(ino, b"user.snapfs.seal", b"1", CTX)  # `snapfs seal`
        assert await fs.status(ino) == b"available"
        for flags in (os.O_WRONLY, os.O_RDWR):
            assert await fuse_errno(fs.ops.open(ino, flags, CTX)) == errno.EPERM
        truncate = pyfuse3.EntryAttributes()
        truncate.st_size = BLOCK
        assert (
            await fuse_errno(fs.ops.setattr(ino, truncate, Fields(update_size=True), None, CTX))
            == errno.EPERM
        )
        assert (await fs.ops.getattr(ino, CTX)).st_size == 3 * BLOCK
        # Its metadata still changes: mode and the stored attributes.
        chmod = pyfuse3.EntryAttributes()
        chmod.st_mode = stat.S_IFREG | 0o600
        attr = await fs.ops.setattr(ino, chmod, Fields(update_mode=True), None, CTX)
        assert stat.S_IMODE(attr.st_mode) == 0o600
        await fs.ops.setxattr(ino, b"user.snapfs.description", b"nightly", CTX)
        assert await fs.ops.getxattr(ino, b"user.snapfs.description", CTX) == b"nightly"
        assert b"user.snapfs.description" in await fs.ops.listxattr(ino, CTX)
        assert STATUS not in await fs.ops.listxattr(ino, CTX)  # computed: not listed
        # Read-only, unknown to set, unknown to read.
        assert await fuse_errno(fs.ops.setxattr(ino, STATUS, b"failed", CTX)) == errno.EPERM
        assert (
            await fuse_errno(fs.ops.setxattr(ino, b"user.snapfs.bogus", b"1", CTX)) == errno.ENOTSUP
        )
        assert await fuse_errno(fs.ops.getxattr(ino, b"security.capability", CTX)) == errno.ENODATA
        assert (
            await fuse_errno(fs.ops.setxattr(ino, b"user.snapfs.retention_days", b"x", CTX))
            == errno.EINVAL
        )


async def test_seal_waits_for_the_last_writer_and_settling_seals_on_its_own(
    tmp_path: Path,
) -> None:
    data = image(2 * BLOCK + 7, seed=3)
    async with served(tmp_path / "store", settle=0.2) as fs:
        region = await fs.mkdir("us-east-1")
        ino, fh = await fs.write_file(region, "open.img", data, close=False)
        assert fh is not None
        assert await fuse_errno(fs.ops.setxattr(ino, b"user.snapfs.seal", b"", CTX)) == (
            errno.EBUSY
        )
        assert await fs.status(ino) == b"creating"  # a writer has it open: not sealed
        # truncate(2) while open: the size follows, the cut-off bytes are gone.
        truncate = pyfuse3.EntryAttributes()
        truncate.st_size = BLOCK + 3
        attr = await fs.ops.setattr(ino, truncate, Fields(update_size=True), fh, CTX)
        assert attr.st_size == BLOCK + 3
        await fs.ops.flush(fh)
        await fs.ops.release(fh)
        snap = fs.store.by_ino[ino]
        await until(lambda: snap.status == "available", "sealed after the settle period")
        assert snap.sealed
        assert await fs.read_file(ino) == data[: BLOCK + 3]


# --- the namespace ---------------------------------------------------------------------------


async def test_the_namespace_refuses_what_a_store_cannot_hold(tmp_path: Path) -> None:
    async with served(tmp_path / "store") as fs:
        region = await fs.mkdir("us-east-1")
        ino, _ = await fs.write_file(region, "a.img", image(BLOCK, seed=4))
        mode = stat.S_IFREG | 0o644
        flags = os.O_WRONLY | os.O_CREAT
        refusals = {  # what is refused: (the request, its errno)
            "create at the root": (
                lambda: fs.ops.create(ROOT_INO, b"x.img", mode, flags, CTX),
                errno.EPERM,
            ),
            "a directory in a region": (
                lambda: fs.ops.mkdir(region, b"sub", 0o755, CTX),
                errno.EPERM,
            ),
            "a bad region name": (
                lambda: fs.ops.mkdir(ROOT_INO, b"Bad_Name", 0o755, CTX),
                errno.EINVAL,
            ),
            "a region twice": (
                lambda: fs.ops.mkdir(ROOT_INO, b"us-east-1", 0o755, CTX),
                errno.EEXIST,
            ),
            "a name twice": (
                lambda: fs.ops.create(region, b"a.img", mode, flags, CTX),
                errno.EEXIST,
            ),
            "a non-UTF-8 name": (
                lambda: fs.ops.create(region, b"\xff.img", mode, flags, CTX),
                errno.EINVAL,
            ),
            "a missing name": (lambda: fs.ops.lookup(region, b"nope.img", CTX), errno.ENOENT),
            "a missing region": (lambda: fs.ops.lookup(ROOT_INO, b"eu-west-1", CTX), errno.ENOENT),
            "an unknown inode": (lambda: fs.ops.getattr(999_999, CTX), errno.ENOENT),
            "a FIFO": (
                lambda: fs.ops.mknod(region, b"fifo", stat.S_IFIFO | 0o644, 0, CTX),
                errno.EPERM,
            ),
            "a hard link": (lambda: fs.ops.link(ino, region, b"b.img", CTX), errno.EPERM),
            "a symlink": (lambda: fs.ops.symlink(region, b"l", b"a.img", CTX), errno.EPERM),
            "a region renamed": (
                lambda: fs.ops.rename(ROOT_INO, b"us-east-1", ROOT_INO, b"eu-west-1", 0, CTX),
                errno.EPERM,
            ),
            "unlink at the root": (
                lambda: fs.ops.unlink(ROOT_INO, b"us-east-1", CTX),
                errno.EISDIR,
            ),
            "rmdir in a region": (lambda: fs.ops.rmdir(region, b"a.img", CTX), errno.ENOTDIR),
            "rmdir of a full region": (
                lambda: fs.ops.rmdir(ROOT_INO, b"us-east-1", CTX),
                errno.ENOTEMPTY,
            ),
        }
        answered = {what: await fuse_errno(request()) for what, (request, _) in refusals.items()}
        assert answered == {what: expected for what, (_, expected) in refusals.items()}
        assert list(fs.store.regions) == ["us-east-1"]
        assert list(fs.store.region("us-east-1").snapshots) == ["a.img"]  # nothing changed

        # mknod(2) of a regular file: an empty snapshot, complete at once.
        empty = await fs.ops.mknod(region, b"empty.img", stat.S_IFREG | 0o644, 0, CTX)
        assert empty.st_size == 0 and await fs.status(empty.st_ino) == b"available"
        # rm REGION/*; rmdir REGION: the region goes.
        for name in (b"a.img", b"empty.img"):
            await fs.ops.unlink(region, name, CTX)
        await fs.ops.rmdir(ROOT_INO, b"us-east-1", CTX)
        assert await fuse_errno(fs.ops.getattr(region, CTX)) == errno.ENOENT
        assert not (tmp_path / "store" / "regions" / "us-east-1").exists()


async def test_readdir_lists_regions_and_snapshots_and_resumes_at_an_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reply goes into the kernel's buffer through pyfuse3.readdir_reply: here a list,
    with room for `room` entries (a full buffer answers False, and readdir stops)."""

    @dataclass
    class Token:
        room: int
        entries: list[tuple[bytes, int, int]] = field(default_factory=list)

    def readdir_reply(token: Token, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int):
        if len(token.entries) == token.room:
            return False
        token.entries.append((name, attr.st_ino, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", readdir_reply)

    async def listing(ino: int, start: int = 0, room: int = 100) -> list[tuple[bytes, int, int]]:
        fh = await fs.ops.opendir(ino, CTX)
        token = Token(room)
        await fs.ops.readdir(fh, start, token)  # type: ignore[arg-type]
        await fs.ops.releasedir(fh)
        return token.entries

    async with served(tmp_path / "store") as fs:
        regions = [await fs.mkdir(name) for name in ("us-east-1", "eu-west-1")]
        assert [(n, i) for n, i, _ in await listing(ROOT_INO)] == [
            (b"us-east-1", regions[0]),
            (b"eu-west-1", regions[1]),
        ]
        inos = {}
        for name in ("c.img", "a.img", "b.img"):
            inos[name], _ = await fs.write_file(regions[0], name, image(BLOCK, seed=5))
        entries = await listing(regions[0])
        assert sorted(n for n, _, _ in entries) == [b"a.img", b"b.img", b"c.img"]
        assert {n.decode(): i for n, i, _ in entries} == inos
        assert all(cookie == ino for _, ino, cookie in entries)  # the inode is the offset
        first = await listing(regions[0], room=1)  # a buffer with room for one
        rest = await listing(regions[0], start=first[-1][2])
        assert first + rest == entries
        assert await listing(regions[1]) == []
        assert await fuse_errno(fs.ops.opendir(inos["a.img"], CTX)) == errno.EPERM


# --- rename, unlink, move --------------------------------------------------------------------


async def test_rename_within_a_region_keeps_the_inode_and_replaces_a_target(
    tmp_path: Path,
) -> None:
    a, b = image(3 * BLOCK, seed=6), image(2 * BLOCK, seed=7)
    async with served(tmp_path / "store") as fs:
        region = await fs.mkdir("us-east-1")
        ino_a, _ = await fs.write_file(region, "a.img", a)
        ino_b, _ = await fs.write_file(region, "b.img", b)
        assert await fs.status(ino_a) == await fs.status(ino_b) == b"available"

        await fs.ops.rename(region, b"a.img", region, b"c.img", 0, CTX)
        assert await fuse_errno(fs.lookup(region, "a.img")) == errno.ENOENT
        assert (await fs.lookup(region, "c.img")).st_ino == ino_a
        assert await fs.read_file(ino_a) == a

        noreplace = fs.ops.rename(region, b"c.img", region, b"b.img", RENAME_NOREPLACE, CTX)
        assert await fuse_errno(noreplace) == errno.EEXIST
        await fs.ops.rename(region, b"c.img", region, b"b.img", RENAME_EXCHANGE, CTX)
        assert (await fs.lookup(region, "b.img")).st_ino == ino_a
        assert (await fs.lookup(region, "c.img")).st_ino == ino_b

        await fs.ops.rename(region, b"c.img", region, b"b.img", 0, CTX)  # b.img replaced
        assert (await fs.lookup(region, "b.img")).st_ino == ino_b
        assert await fs.read_file(ino_b) == b
        assert await fuse_errno(fs.ops.getattr(ino_a, CTX)) == errno.ENOENT
        backend = fs.store.region("us-east-1").backend
        await until(lambda: len(list(backend.keys())) == 2, "the replaced one's blocks freed")


async def test_an_unlinked_snapshot_stays_readable_while_open_then_goes(tmp_path: Path) -> None:
    data = image(3 * BLOCK, seed=8)
    async with served(tmp_path / "store") as fs:
        region = await fs.mkdir("us-east-1")
        ino, _ = await fs.write_file(region, "doomed.img", data)
        assert await fs.status(ino) == b"available"
        info = await fs.ops.open(ino, os.O_RDONLY, CTX)
        await fs.ops.unlink(region, b"doomed.img", CTX)
        assert await fuse_errno(fs.lookup(region, "doomed.img")) == errno.ENOENT
        assert (await fs.ops.getattr(ino, CTX)).st_nlink == 0  # open, but no name
        assert await fs.read_all(info.fh) == data  # POSIX: an open file outlives its name
        await fs.ops.release(info.fh)
        assert await fuse_errno(fs.ops.getattr(ino, CTX)) == errno.ENOENT
        backend = fs.store.region("us-east-1").backend
        await until(lambda: not list(backend.keys()), "its blocks collected")
        assert await fuse_errno(fs.ops.unlink(region, b"doomed.img", CTX)) == errno.ENOENT


async def test_a_rename_across_regions_is_a_move_job_and_cp_is_a_recognised_copy(
    tmp_path: Path,
) -> None:
    data = image(5 * BLOCK + 11, seed=9)
    async with served(tmp_path / "store") as fs:
        src = await fs.mkdir("us-east-1")
        dst = await fs.mkdir("eu-west-1")
        ino, _ = await fs.write_file(src, "disk.img", data)
        assert await fs.status(ino) == b"available"
        source_id = await fs.ops.getxattr(ino, b"user.snapfs.id", CTX)

        # cp: the same process reads the source and writes a new snapshot with its bytes.
        cp = Ctx(pid=777)
        reader = await fs.ops.open(ino, os.O_RDONLY, cp)
        copy_ino, _ = await fs.write_file(dst, "cp.img", await fs.read_all(reader.fh), cp)
        await fs.ops.release(reader.fh)
        assert await fs.status(copy_ino) == b"available"
        assert await fs.ops.getxattr(copy_ino, b"user.snapfs.source_snapshot_id", CTX) == (
            source_id
        )
        assert await fs.read_file(copy_ino) == data

        # mv: the destination appears at once; a copy job fills it in the background.
        await fs.ops.rename(src, b"disk.img", dst, b"moved.img", 0, CTX)
        assert await fuse_errno(fs.lookup(src, "disk.img")) == errno.ENOENT
        moved = (await fs.lookup(dst, "moved.img")).st_ino
        assert await fs.ops.getxattr(moved, b"user.snapfs.source_region", CTX) == b"us-east-1"
        with trio.fail_after(WAIT):
            while (status := await fs.status(moved)) != b"available":
                assert status == b"copying"
                await trio.sleep(0.01)
        assert await fs.read_file(moved) == data
        assert await fs.ops.getxattr(moved, b"user.snapfs.progress", CTX) == b"100"
        # Across regions an exchange is refused.
        exchange = fs.ops.rename(dst, b"moved.img", src, b"x.img", RENAME_EXCHANGE, CTX)
        assert await fuse_errno(exchange) == errno.EINVAL


# --- the filesystem as a whole ---------------------------------------------------------------


async def test_statfs_is_the_store_disk_and_init_runs_its_hook(tmp_path: Path) -> None:
    ran = threading.Event()
    async with served(tmp_path / "store") as fs:
        st = await fs.ops.statfs(CTX)
        disk = os.statvfs(tmp_path / "store")
        assert (st.f_bsize, st.f_frsize, st.f_blocks) == (
            disk.f_bsize,
            disk.f_frsize,
            disk.f_blocks,
        )
        assert st.f_files == disk.f_files and st.f_namemax == 255
        ops = Operations(fs.store, fs.nursery, on_init=ran.set)
        assert not ops.connected
        ops.init()  # the INIT answer: the hook then runs in a thread (the read-ahead)
        assert ops.connected
        with trio.fail_after(WAIT):
            while not ran.is_set():
                await trio.sleep(0.01)


async def test_what_a_clean_shutdown_keeps_and_what_recovery_removes(tmp_path: Path) -> None:
    """Sealed and closed snapshots persist with their bytes, inodes and metadata; one still
    open for writing at shutdown was never complete, and the next start removes it."""
    sealed, closed, unfinished = (image(3 * BLOCK + n, seed=10 + n) for n in range(3))
    async with served(tmp_path / "store") as fs:
        region = await fs.mkdir("us-east-1")
        sealed_ino, _ = await fs.write_file(region, "sealed.img", sealed)
        await fs.ops.setxattr(sealed_ino, b"user.snapfs.seal", b"", CTX)
        await fs.ops.setxattr(sealed_ino, b"user.snapfs.description", b"kept", CTX)
        await fs.ops.setxattr(sealed_ino, b"user.tag.env", b"prod", CTX)
        closed_ino, _ = await fs.write_file(region, "closed.img", closed)
        assert fs.store.by_ino[closed_ino].status == "creating"  # settling at shutdown
        open_ino, fh = await fs.write_file(region, "open.img", unfinished, close=False)
        await fs.ops.setxattr(region, b"user.snapfs.compression", b"zstd", CTX)
        sealed_id = await fs.ops.getxattr(sealed_ino, b"user.snapfs.id", CTX)
    assert fh is not None  # never released: the daemon stopped with it open

    async with served(tmp_path / "store") as fs:
        assert fs.store.was_clean
        region = (await fs.lookup(ROOT_INO, "us-east-1")).st_ino
        assert (await fs.lookup(region, "sealed.img")).st_ino == sealed_ino
        assert (await fs.lookup(region, "closed.img")).st_ino == closed_ino
        assert await fs.status(sealed_ino) == await fs.status(closed_ino) == b"available"
        assert await fs.read_file(sealed_ino) == sealed
        assert await fs.read_file(closed_ino) == closed
        assert await fs.ops.getxattr(sealed_ino, b"user.snapfs.id", CTX) == sealed_id
        assert await fs.ops.getxattr(sealed_ino, b"user.snapfs.description", CTX) == b"kept"
        assert await fs.ops.getxattr(sealed_ino, b"user.tag.env", CTX) == b"prod"
        assert await fs.ops.getxattr(region, b"user.snapfs.compression", CTX) == b"zstd"
        assert await fuse_errno(fs.lookup(region, "open.img")) == errno.ENOENT
        assert await fuse_errno(fs.ops.getattr(open_ino, CTX)) == errno.ENOENT
        # Nothing of the removed one is left: the blocks of sealed.img (2, and a hole) and
        # of closed.img (3, and a hole).
        await until(
            lambda: len(list(fs.store.region("us-east-1").backend.keys())) == 5,
            "the unfinished snapshot's blocks collected",
        )
