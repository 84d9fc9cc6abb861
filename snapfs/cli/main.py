"""The `snapfs` command line.

Every failure prints `Code: message` on stderr (the cloud-style code of `SnapfsError`) and
exits non-zero; no traceback reaches the user for a refusal.

Why one module of ~680 lines: it is the argparse tree and one short handler per command
(mount, umount, copy, key, region, diff, check, seal, status), which share parsing helpers and
nothing else; the work itself is in the service layer and cli/status.py and cli/diff.py.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import select
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from snapfs import durable
from snapfs.errors import InvalidParameter, SnapfsError, StoreNotFound, from_sqlite
from snapfs.fuse import mounts
from snapfs.model import params
from snapfs.model.states import SnapshotStatus

MOUNT_TIMEOUT = 120.0
UMOUNT_TIMEOUT = 300.0


def default_store_path() -> Path:
    # Imported when a command needs it: the service layer (trio, sqlite-utils and what
    # they pull in) is a quarter of a second that `snapfs clone` and `snapfs diff` in a
    # backup script's loop should not pay.
    from snapfs.service.store import default_store_path as default

    return default()


def store_for(args: argparse.Namespace, path: str | None = None) -> Path:
    """The store a command means (issue 18): `--store`; else the mount a path given to the
    command is in; else the one store that is mounted; else the default store, which must
    exist already. Never a new store: only `snapfs mount` creates one, so a command that
    would silently act on an empty default store while another is mounted refuses."""
    if getattr(args, "store", None):
        return Path(args.store).expanduser()
    if path is not None:
        found = mounts.find_mount_root(Path(path))
        if found is not None:
            return Path(found[0].store)
    live = mounts.live_mounts()
    stores = sorted({m.store for m in live})
    if len(stores) == 1:
        return Path(stores[0])
    default = default_store_path()
    if len(stores) > 1:
        where = ", ".join(f"{m.store} on {m.mountpoint}" for m in live)
        raise InvalidParameter(
            f"several snapfs stores are mounted ({where}): give a path into one "
            "(MOUNTPOINT/REGION) or --store"
        )
    if not (default / "store.db").exists():
        raise StoreNotFound(
            f"no snapfs store at {default} and none is mounted: `snapfs mount MOUNTPOINT "
            "[--store DIR]` creates one, or give --store"
        )
    return default


def _region_arg(value: str) -> tuple[str, str | None]:
    """A region given as NAME or as a path into a mount (MOUNTPOINT/NAME): (the name, the
    path to find the store by, or None)."""
    if "/" not in value:
        return value, None
    found = mounts.find_mount_root(Path(value))
    if found is None or len(found[1]) != 1:
        return value, None  # not in a mount: the name's own check refuses it
    return found[1][0], value


def _fail(code: str, message: str, exit_code: int = 1) -> int:
    print(f"{code}: {message}", file=sys.stderr)
    return exit_code


def cmd_mount(args: argparse.Namespace) -> int:
    store = Path(args.store).expanduser() if args.store else default_store_path()
    if args.foreground:
        from snapfs import daemon

        return daemon.run(
            Path(args.mountpoint),
            store,
            allow_other=args.allow_other,
            to_stderr=not args.quiet,
            ready_fd=args.ready_fd,
            block_size=args.block_size,
            copy_bandwidth_limit=args.copy_bwlimit,
            settle=args.settle,
            debug=args.debug,
        )
    return _spawn_daemon(args, store)


def _spawn_daemon(args: argparse.Namespace, store: Path) -> int:
    """Start the daemon in its own session; return once it reports the mount ready."""
    durable.make_dirs(store)  # a new store must not vanish with a power loss
    read_end, write_end = os.pipe()
    cmd = [
        sys.executable,
        "-m",
        "snapfs",
        "mount",
        os.path.abspath(args.mountpoint),
        "--store",
        str(store.resolve()),
        "--foreground",
        "--quiet",
        "--ready-fd",
        str(write_end),
    ]
    if args.allow_other:
        cmd.append("--allow-other")
    if args.block_size is not None:  # 0 is a bad size, not "the default"
        cmd += ["--block-size", str(args.block_size)]
    if args.copy_bwlimit:
        cmd += ["--copy-bwlimit", str(args.copy_bwlimit)]
    if args.settle is not None:
        cmd += ["--settle", str(args.settle)]
    if args.debug:
        cmd.append("--debug")
    env = _daemon_env(store)
    with open(store / "daemon.err", "ab") as err:
        proc = subprocess.Popen(
            cmd,
            pass_fds=(write_end,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
            env=env,
        )
    os.close(write_end)
    answer = b""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    with os.fdopen(read_end, "rb") as pipe:
        while b"\n" not in answer and time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 1.0)
            if ready:
                chunk = os.read(pipe.fileno(), 4096)
                if not chunk:
                    break
                answer += chunk
            elif proc.poll() is not None:
                break
    line = answer.decode(errors="replace").strip()
    if line == "ok":
        return 0
    if line.startswith("error "):
        print(line[len("error ") :], file=sys.stderr)
        return 1
    proc.poll()
    return _fail(
        "MountFailed",
        f"the daemon did not report a mount (exit {proc.returncode}); "
        f"see {store / 'snapfs.log'} and {store / 'daemon.err'}",
    )


def _daemon_env(store: Path) -> dict[str, str]:
    """The daemon runs without a terminal: ask for a store passphrase here if it needs one."""
    from snapfs.meta import db as dbutil
    from snapfs.meta.keys import PASSPHRASE_ENV, read_passphrase

    env = dict(os.environ)
    if PASSPHRASE_ENV in env or not (store / "store.db").exists():
        return env
    catalogue = dbutil.connect(store / "store.db", readonly=True)
    try:
        protected = dbutil.get_meta(catalogue, "key_protection") == "passphrase"
    finally:
        catalogue.close()
    if protected:
        passphrase = read_passphrase(f"passphrase of store {store}: ")
        if passphrase is not None:
            env[PASSPHRASE_ENV] = passphrase
    return env


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = Path(os.path.abspath(args.mountpoint))
    record = mounts.lookup(mountpoint)
    if mounts.mount_fstype(mountpoint) is None:
        return _fail("MountPoint.NotMounted", f"nothing is mounted at {mountpoint}")
    if mounts.clear_stale_mount(mountpoint):
        print(f"cleared a stale mount at {mountpoint} (its daemon had died)", file=sys.stderr)
        return 0
    result = mounts.fusermount_unmount(mountpoint)
    if result.returncode != 0:
        reason = result.stderr.strip() or f"fusermount3 exited {result.returncode}"
        return _fail("MountPoint.Busy", reason)
    if record is not None:
        deadline = time.monotonic() + UMOUNT_TIMEOUT
        while record.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        if record.alive:
            return _fail("UnmountTimeout", f"daemon pid {record.pid} is still flushing")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    store = store_for(args, args.path)
    region = snapshot = None
    mountpoint: Path | None = None
    if args.path:
        found = mounts.find_mount_root(Path(args.path))
        if found is None:
            return _fail("InvalidParameter", f"{args.path} is not inside a snapfs mount")
        record, parts = found
        store = Path(record.store)
        if len(parts) > 2:
            return _fail("InvalidParameter", f"{args.path} is not a region or a snapshot")
        region = parts[0] if parts else None
        snapshot = parts[1] if len(parts) > 1 else None
        mountpoint = Path(record.mountpoint)
    elif (mounted := mounts.find_by_store(store)) is not None:
        mountpoint = Path(mounted.mountpoint)
    from snapfs.cli import status

    if args.watch is not None:
        return _watch_copies(store, region, args.watch)
    with _working(f"reading the indexes of {store}"):
        data = status.collect(store, region, snapshot)
        if mountpoint is not None and _seal_settling(mountpoint, data):
            data = status.collect(store, region, snapshot)
    if args.metrics:
        sys.stdout.write(status.metrics(data, mountpoint))
        return 0
    if snapshot is not None and not args.json:
        status.render_attributes(Path(args.path), data)
        return 0
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        print()
    else:
        status.render(data)
    return 0


@contextlib.contextmanager
def _working(what: str):
    """A spinner on stderr while a long read runs, when stderr is a terminal (a region of
    millions of map rows takes seconds to sum up); nothing otherwise."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(what):
        yield


def _watch_copies(store: Path, region: str | None, every: float) -> int:
    """`snapfs status --watch`: the copies table, redrawn in place on a terminal (printed
    again otherwise), until no copy is left."""
    from rich.console import Console
    from rich.live import Live

    from snapfs.cli import status

    data = status.collect(store, region)
    console = Console()
    with Live(status.copies_table(data), console=console, auto_refresh=False) as live:
        while status.copies_left(data):
            time.sleep(max(every, 0.1))
            data = status.collect(store, region)
            live.update(status.copies_table(data), refresh=True)
    console.print("no copy running or queued")
    return 0


def _seal_settling(mountpoint: Path, data: dict) -> bool:
    """Asking a snapshot's status seals it if its last writer is gone (the settle period):
    ask the mount for every `creating` one, so status shows final states. True if any."""
    asked = False
    for region in data["regions"]:
        for snap in region["snapshots"]:
            if snap["status"] == SnapshotStatus.CREATING:
                with contextlib.suppress(OSError):  # deleted meanwhile: the next read says
                    os.getxattr(mountpoint / region["name"] / snap["name"], "user.snapfs.status")
                asked = True
    return asked


def cmd_seal(args: argparse.Namespace) -> int:
    _, parts = _resolve(args.path, "snapshot")
    if len(parts) != 2:
        return _fail("InvalidSnapshotId.Malformed", f"{args.path} is not a snapshot file")
    try:
        os.setxattr(args.path, "user.snapfs.seal", b"1")
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return _fail("InvalidSnapshotId.NotReady", f"{args.path} is open for writing")
        if exc.errno == errno.ENOENT:
            return _fail("InvalidSnapshotId.NotFound", f"{args.path} does not exist")
        raise
    print(os.getxattr(args.path, "user.snapfs.status").decode())
    return 0


def _clone_error(exc: OSError) -> tuple[str, str]:
    return _CLONE_ERRORS.get(exc.errno or 0, ("InvalidParameter", exc.strerror or str(exc)))


# What the daemon's errno means for `snapfs clone` (the reason is in its log).
_CLONE_ERRORS = {
    errno.ENOENT: ("InvalidSnapshotId.NotFound", "no such snapshot to clone in that region"),
    errno.EBUSY: (
        "InvalidSnapshotId.NotReady",
        "the snapshot is not available (still being created or copied, or failed)",
    ),
    errno.EINVAL: ("InvalidParameter", "the new file is not a new, empty snapshot"),
    errno.EEXIST: ("InvalidSnapshotName.Duplicate", "the new name exists already"),
    errno.EDQUOT: ("QuotaExceed.SnapshotQuota", "the region is at its snapshot quota"),
    errno.ENOSPC: ("StoreFull", "the store is full"),
    errno.EKEYREVOKED: (
        "InvalidParameter.KMSKeyId.CMKNotEnabled",
        "the snapshot's key is disabled",
    ),
}


def cmd_clone(args: argparse.Namespace) -> int:
    """A new snapshot that starts as a copy of a sealed one in the same region, `creating`
    until it settles: write the changed ranges into it (dd conv=notrunc, qemu-img dd,
    rsync --inplace) within the settle period, or with it held open."""
    _, src = _resolve(args.source, "source")
    _, dst = _resolve(args.path, "new snapshot")
    if len(src) != 2 or len(dst) != 2:
        return _fail("InvalidSnapshotId.Malformed", "both paths must be MOUNTPOINT/REGION/NAME")
    if src[0] != dst[0]:
        return _fail(
            "InvalidParameter",
            f"a clone stays in its parent's region ({src[0]}, not {dst[0]}): copy the "
            "snapshot there first (mv, cp or snapfs copy)",
        )
    try:
        fd = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        code, text = _clone_error(exc)
        return _fail(code, f"{args.path}: {text}")
    try:
        os.setxattr(args.path, "user.snapfs.parent", src[1].encode())
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(args.path)  # nothing was written: the empty snapshot goes
        code, text = _clone_error(exc)
        return _fail(code, f"{args.source}: {text}")
    os.close(fd)
    print(args.path)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from snapfs.cli.diff import diff

    result = diff(Path(args.first), Path(args.second))
    if args.json:
        json.dump(result.as_dict(), sys.stdout, indent=2)
        print()
        return 0
    a, b = result.first, result.second
    print(
        f"# {a.region}/{a.name} ({a.id}, {a.size} bytes) -> {b.region}/{b.name} ({b.id}, "
        f"{b.size} bytes): {len(result.ranges)} ranges, {result.changed_bytes} bytes differ "
        f"(compared by {result.compared_by}); OFFSET LENGTH per line"
    )
    for offset, length in result.ranges:
        print(offset, length)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from snapfs.service import check

    store = store_for(args)
    report = check.check(store, repair=args.repair)
    if args.json:
        json.dump(report.as_dict(), sys.stdout, indent=2)
        print()
    else:
        check.render(report)
    return 0 if report.ok else 1


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 3600")
    return value


def _size(text: str) -> int:
    from snapfs.cli.diskimage import parse_size

    try:
        value = parse_size(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 50M")
    return value


# What the daemon's errno means for the CopySnapshot API (the reason is in its log).
_COPY_ERRORS = {
    errno.ENOENT: ("InvalidSnapshotId.NotFound", "the source snapshot does not exist"),
    errno.EBUSY: (
        "InvalidSnapshotId.NotReady",
        "the source snapshot is still being created or copied",
    ),
    errno.EDQUOT: ("QuotaExceed.SnapshotQuota", "the destination region is at its snapshot quota"),
    errno.EEXIST: (
        "InvalidSnapshotName.Duplicate",
        "a snapshot of that name already exists in the destination region",
    ),
    errno.EINVAL: ("InvalidParameter", "a parameter was refused"),
    errno.ENOKEY: (
        "InvalidParameter.KMSKeyId.NotFound",
        "no usable key: unknown key id, a key "
        "of another region, or an encrypted source and no key in the destination",
    ),
    errno.EKEYREVOKED: ("InvalidParameter.KMSKeyId.CMKNotEnabled", "the key is disabled"),
    errno.EROFS: (
        "OperationNotPermitted.ReadOnlyRegion",
        "the destination region is attached read-only",
    ),
}


def _resolve(path: str, what: str) -> tuple[mounts.MountRecord, list[str]]:
    found = mounts.find_mount_root(Path(path))
    if found is None:
        raise InvalidParameter(f"{what} {path} is not inside a snapfs mount")
    return found


def cmd_copy(args: argparse.Namespace) -> int:
    # Validate everything before touching the mount: a refusal changes nothing.
    if args.name is not None:
        params.check_cloud_snapshot_name(args.name)
    if args.description is not None:
        params.check_description(args.description)
    if args.retention_days is not None:
        params.check_retention_days(args.retention_days)
    tags = params.check_tags([params.parse_tag(t) for t in args.tag])
    if args.decrypt and (args.encrypted or args.kms_key_id):
        return _fail("InvalidParameter", "--decrypt cannot go with --encrypted or --kms-key-id")
    if args.kms_key_id:
        from snapfs.meta.keys import check_key_id

        check_key_id(args.kms_key_id)
    src_mount, src_parts = _resolve(args.source, "source")
    if len(src_parts) != 2:
        return _fail(
            "InvalidSnapshotId.Malformed",
            f"{args.source} is not a snapshot file (MOUNTPOINT/REGION/SNAPSHOT)",
        )
    dst_mount, dst_parts = _resolve(args.destination, "destination")
    if dst_mount.mountpoint != src_mount.mountpoint:
        return _fail("InvalidParameter", "source and destination must be in the same mount")
    if not 1 <= len(dst_parts) <= 2:
        return _fail("InvalidParameter", f"{args.destination} is not a region directory")
    if len(dst_parts) == 2 and args.name and args.name != dst_parts[1]:
        return _fail("InvalidParameter", "give the new name either in DST or with --name")
    # A name given here follows the cloud rule; without one the copy keeps the source's.
    explicit = args.name or (dst_parts[1] if len(dst_parts) == 2 else None)
    if explicit:
        params.check_cloud_snapshot_name(explicit)
    name = explicit or src_parts[1]
    region_dir = Path(dst_mount.mountpoint) / dst_parts[0]
    if not region_dir.is_dir():
        return _fail("InvalidRegionId.NotFound", f"region {dst_parts[0]} does not exist")
    if not (Path(src_mount.mountpoint) / src_parts[0] / src_parts[1]).exists():
        return _fail("InvalidSnapshotId.NotFound", f"{args.source} does not exist")
    request = {
        "source": f"{src_parts[0]}/{src_parts[1]}",
        "name": explicit,
        "description": args.description,
        "retention_days": args.retention_days,
        "tags": tags,
        "encrypted": False if args.decrypt else (True if args.encrypted else None),
        "kms_key_id": args.kms_key_id,
    }
    try:
        os.setxattr(region_dir, "user.snapfs.copy", json.dumps(request).encode())
    except OSError as exc:
        code, message = _COPY_ERRORS.get(exc.errno or 0, ("InternalError", str(exc)))
        return _fail(code, f"{message} (see the daemon log in {dst_mount.store})")
    target = region_dir / name
    snapshot_id = os.getxattr(target, "user.snapfs.id").decode()
    if args.wait and not _wait_for_copy(target):
        error = os.getxattr(target, "user.snapfs.error").decode()
        code, _, message = error.partition(": ")
        print(snapshot_id)
        return _fail(code, message)
    print(snapshot_id)
    return 0


def _wait_for_copy(target: Path) -> bool:
    """A progress bar until the copy ends: percent, bytes, the rate since the start and the
    time left at that rate; True if it succeeded. The rate is ours, not rich's (whose speed
    column says "?" once a task is done or between sparse updates): the bytes so far over
    the time so far, so the last line shows the copy's real average."""
    from rich.progress import BarColumn, Progress, TextColumn

    size = max(target.stat().st_size, 1)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[done]}/{task.fields[size]}"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[eta]}"),
    )
    start = time.monotonic()
    with Progress(*columns, transient=False, refresh_per_second=5) as bar:
        task = bar.add_task(target.name, total=size, done="0 B", size=_human(size), rate="",
                            eta="")  # fmt: skip
        while True:
            status = os.getxattr(target, "user.snapfs.status").decode()
            percent = float(os.getxattr(target, "user.snapfs.progress"))
            ended = status in (SnapshotStatus.AVAILABLE, SnapshotStatus.FAILED)
            done = size if status == SnapshotStatus.AVAILABLE else size * percent / 100
            elapsed = max(time.monotonic() - start, 1e-3)
            rate = done / elapsed
            left = (size - done) / rate if rate > 0 else None
            bar.update(
                task,
                completed=done,
                done=_human(done),
                rate=f"{_human(rate)}/s",
                eta="done" if ended else (f"ETA {_clock(left)}" if left is not None else ""),
            )
            if ended:
                return status == SnapshotStatus.AVAILABLE
            time.sleep(0.2)


def _human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _keyring(args: argparse.Namespace):
    from snapfs.meta.catalogue import open_catalogue
    from snapfs.meta.keys import KeyRing

    path = None
    if getattr(args, "region", None):
        args.region, path = _region_arg(args.region)
    store = store_for(args, path)
    return KeyRing(store, open_catalogue(store), None)


def cmd_key(args: argparse.Namespace) -> int:
    from snapfs.meta.keys import EXPORT_PASSPHRASE_ENV, export_to_file, read_export, read_passphrase

    ring = _keyring(args)
    if args.key_command == "create":
        info = ring.create(args.region, args.alias)
        print(f"created key for region {info.region}" + (f" ({info.alias})" if info.alias else ""))
        print(info.id)
    elif args.key_command == "list":
        keys = ring.list()
        if args.json:
            print(json.dumps([k.as_dict() for k in keys], indent=2))
        else:
            for k in keys:
                state = "enabled" if k.enabled else "disabled"
                print(f"{k.id}  {k.region:16} {state:9} {k.alias or ''}")
    elif args.key_command in ("enable", "disable"):
        info = ring.set_enabled(args.key_id, args.key_command == "enable")
        print(f"{info.id} {'enabled' if info.enabled else 'disabled'}")
    elif args.key_command in ("export", "import"):
        passphrase = read_passphrase("passphrase for the key export: ", EXPORT_PASSPHRASE_ENV)
        if not passphrase:
            return _fail(
                "InvalidPassphrase",
                f"set {EXPORT_PASSPHRASE_ENV} or run from a "
                "terminal: exported keys are wrapped under a passphrase",
            )
        if args.key_command == "export":
            text = export_to_file(
                ring, args.key_id, Path(args.out) if args.out else None, passphrase
            )
            if not args.out:
                print(text)
        else:
            info = ring.import_(read_export(Path(args.file)), passphrase)
            print(f"imported key for region {info.region}")
            print(info.id)
    return 0


_REGION_ERRORS = {
    errno.EEXIST: ("InvalidRegionId.Duplicate", "the region exists, or the prefix holds one"),
    errno.ENOENT: ("InvalidRegionId.NotFound", "no snapfs region (or bucket) at that location"),
    errno.EACCES: ("Forbidden", "the object store or the shared index refused the credentials"),
    errno.EIO: ("ServiceUnavailable", "the object store or the shared index did not answer"),
    errno.EINVAL: ("InvalidParameter", "a parameter was refused"),
    errno.EROFS: ("OperationNotPermitted.ReadOnlyRegion", "the region is attached read-only"),
}


def cmd_region(args: argparse.Namespace) -> int:
    from snapfs.model.names import check_region_name
    from snapfs.objects.s3 import S3Location
    from snapfs.service import regionadmin

    name, path = _region_arg(args.name)
    args.name = name
    check_region_name(args.name)
    store = store_for(args, path)
    location = None
    if args.backend is not None and args.backend != "local":
        location = S3Location.parse(args.backend, args.endpoint)
    if args.region_command == "attach" and location is None:
        return _fail("InvalidParameter", "attach needs --backend s3://BUCKET[/PREFIX]")
    index = args.index
    if index is not None:
        from snapfs.meta.pg import check_url

        check_url(index)  # InvalidIndexUrl before anything is made
        if location is None:
            return _fail("InvalidParameter", "a shared region (--index) needs --backend s3://...")
        if getattr(args, "read_only", False):
            return _fail(
                "InvalidParameter",
                "--read-only attaches a bucket alone (disaster recovery); --index joins a "
                "shared region to write",
            )
    read_only = getattr(args, "read_only", False)
    refresh = getattr(args, "refresh", None)
    if refresh is not None:
        if not read_only:
            return _fail("InvalidParameter", "--refresh goes with --read-only")
        refresh = regionadmin.check_refresh(refresh)
    mounted = mounts.find_by_store(store)
    if mounted is not None:
        return _region_through_mount(args, Path(mounted.mountpoint), location)
    if args.region_command == "create":
        if location is None:
            _create_local_offline(store, args.name)
        else:
            regionadmin.create_offline(store, args.name, location, index)
        print(f"created region {args.name}" + (f" on {location}" if location else "")
              + _shared_note(index))  # fmt: skip
        return 0
    assert location is not None
    if index is not None:
        count = regionadmin.attach_shared_offline(store, args.name, location, index)
        print(f"attached region {args.name} from {location}{_shared_note(index)}: {count} "
              "snapshots (they arrive at the next mount)")  # fmt: skip
        return 0
    report = regionadmin.attach_offline(
        store, args.name, location, read_only=read_only, refresh=refresh
    )
    for reason in report.skipped:
        print(f"not restored: {reason}", file=sys.stderr)
    print(
        f"attached region {args.name} from {location}{' read-only' if read_only else ''}: "
        f"{len(report.restored)} snapshots"
    )
    return 0


def _shared_note(index: str | None) -> str:
    if index is None:
        return ""
    from snapfs.meta.pg import redacted

    return f", shared through {redacted(index)}"


def _create_local_offline(store: Path, name: str) -> None:
    from snapfs.service.store import Store

    opened = Store(store)
    try:
        opened.create_region(name)
    finally:
        opened.close()


def _region_through_mount(args: argparse.Namespace, mountpoint: Path, location) -> int:
    """The daemon does it, so the mount shows the region at once."""
    from snapfs.service import regionadmin

    try:
        if location is None:
            os.mkdir(mountpoint / args.name)
        else:
            attr = regionadmin.CREATE_ATTR
            options: dict = {"index": args.index}
            if args.region_command == "attach":
                attr = regionadmin.ATTACH_ATTR
                options |= {"read_only": args.read_only, "refresh": args.refresh}
            os.setxattr(mountpoint, attr, regionadmin.request(args.name, location, **options))
    except OSError as exc:
        code, message = _REGION_ERRORS.get(exc.errno or 0, ("InternalError", str(exc)))
        record = mounts.lookup(mountpoint)
        where = f" (see the daemon log in {record.store})" if record else ""
        return _fail(code, message + where)
    if args.region_command == "create":
        print(f"created region {args.name}" + (f" on {location}" if location else "")
              + _shared_note(args.index))  # fmt: skip
    else:
        count = len(os.listdir(mountpoint / args.name))
        mode = " read-only" if args.read_only else _shared_note(args.index)
        print(f"attached region {args.name} from {location}{mode}: {count} snapshots")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from snapfs import __version__

    parser = argparse.ArgumentParser(
        prog="snapfs",
        description="Cloud-style disk snapshots as plain files: regions are directories, "
        "snapshots are files.",
    )
    parser.add_argument("--version", action="version", version=f"snapfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mount", help="mount a store (created on first use)")
    p.add_argument("mountpoint")
    p.add_argument("--store", help="store directory (default: $XDG_DATA_HOME/snapfs)")
    p.add_argument(
        "--foreground", action="store_true", help="stay in the foreground, log to stderr"
    )
    p.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    p.add_argument("--block-size", type=int, help="block size of a new store, in bytes")
    p.add_argument(
        "--copy-bwlimit",
        type=_size,
        metavar="RATE",
        help="limit each copy to RATE bytes/s of snapshot data (e.g. 50M)",
    )
    p.add_argument(
        "--settle",
        type=_seconds,
        metavar="SECONDS",
        help="how long a closed snapshot waits for its writer to come back before it "
        "seals (default 5; anything that needs it sealed seals it at once)",
    )
    p.add_argument("--debug", action="store_true", help="log every request")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="flush and unmount")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("copy", help="copy a snapshot to a region (the CopySnapshot API)")
    p.add_argument("source", help="the snapshot: MOUNTPOINT/REGION/NAME")
    p.add_argument("destination", help="the region directory (or REGION/NEWNAME)")
    p.add_argument("--name", help="name of the new snapshot (2-128 chars, letter first)")
    p.add_argument("--description", help="2-256 chars, not starting with http(s)://")
    p.add_argument("--retention-days", help="release the copy after 1-65536 days")
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a tag for the new snapshot (tags are not copied from the source)",
    )
    p.add_argument(
        "--encrypted",
        action="store_true",
        help="encrypt the copy (with --kms-key-id, or the region's default key)",
    )
    p.add_argument("--kms-key-id", help="the destination key (a key of the destination region)")
    p.add_argument(
        "--decrypt",
        action="store_true",
        help="copy an encrypted snapshot in the clear (only when asked)",
    )
    p.add_argument("--wait", action="store_true", help="show progress until the copy is done")
    p.set_defaults(func=cmd_copy)

    p = sub.add_parser("key", help="customer master keys (CMKs) for encrypted snapshots")
    keys = p.add_subparsers(dest="key_command", required=True)
    k = keys.add_parser("create", help="a new key for a region; prints its id last")
    k.add_argument("--region", required=True, help="region name, or MOUNTPOINT/REGION")
    k.add_argument("--alias")
    k = keys.add_parser("list", help="keys with region, state and alias")
    k.add_argument("--json", action="store_true")
    for verb in ("enable", "disable", "export"):
        k = keys.add_parser(verb, help=f"{verb} a key")
        k.add_argument("key_id")
        if verb == "export":
            k.add_argument("--out", help="write to this file (mode 0600) instead of stdout")
    k = keys.add_parser("import", help="import a key exported from another store")
    k.add_argument("file")
    for k in keys.choices.values():
        k.add_argument("--store", help="store directory (default: $XDG_DATA_HOME/snapfs)")
    p.set_defaults(func=cmd_key)

    p = sub.add_parser("region", help="regions on local disk or S3-compatible object storage")
    verbs = p.add_subparsers(dest="region_command", required=True)
    r = verbs.add_parser("create", help="a new region (local unless --backend is given)")
    r.add_argument("--backend", help="s3://BUCKET[/PREFIX] (default: local disk)")
    r = verbs.add_parser("attach", help="rebuild a region from its bucket (disaster recovery)")
    r.add_argument("--backend", required=True, help="s3://BUCKET[/PREFIX]")
    r.add_argument(
        "--read-only",
        action="store_true",
        help="a disaster-recovery view of a bucket another store goes on writing: refuses "
        "every change, never deletes or uploads, follows what the owner publishes",
    )
    r.add_argument(
        "--refresh",
        type=float,
        metavar="SECONDS",
        help="with --read-only: how often the bucket's manifests are re-read (default 30)",
    )
    for r in verbs.choices.values():
        r.add_argument(
            "name", help="region name, e.g. eu-west-1, or a path into a mount: MNT/eu-west-1"
        )
        r.add_argument("--endpoint", help="URL of an S3-compatible server (default: AWS)")
        r.add_argument("--store", help="store directory (default: $XDG_DATA_HOME/snapfs)")
        r.add_argument(
            "--index",
            metavar="postgresql://...",
            help="share the region with other stores through this PostgreSQL database "
            "(its password from PGPASSWORD or ~/.pgpass; needs --backend s3://...)",
        )
    p.set_defaults(func=cmd_region)

    p = sub.add_parser("diff", help="byte ranges where two snapshots differ (block-aligned)")
    p.add_argument("first", help="a snapshot file: MOUNTPOINT/REGION/NAME")
    p.add_argument("second", help="another snapshot file, in the same or another region")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("check", help="verify every stored block, reference counts, orphans")
    p.add_argument("--store", help="store directory (default: $XDG_DATA_HOME/snapfs)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--repair",
        action="store_true",
        help="unmounted store only: delete orphans, fix counts (referenced data is kept)",
    )
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "clone",
        help="a new snapshot with a sealed one's content, to write only what changed into",
    )
    p.add_argument("source", help="the snapshot to clone: MOUNTPOINT/REGION/NAME")
    p.add_argument("path", help="the new snapshot, in the same region: MOUNTPOINT/REGION/NEW")
    p.set_defaults(func=cmd_clone)

    p = sub.add_parser("seal", help="seal a creating snapshot now (no writer may have it open)")
    p.add_argument("path", help="the snapshot file: MOUNTPOINT/REGION/NAME")
    p.set_defaults(func=cmd_seal)

    p = sub.add_parser("status", help="snapshots with size, stored bytes, status, progress")
    p.add_argument("path", nargs="?", help="a mountpoint, region directory or snapshot file")
    p.add_argument("--store", help="store directory, when PATH is not given")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--metrics",
        action="store_true",
        help="the Prometheus text format (for node_exporter's textfile collector)",
    )
    p.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=1.0,
        metavar="SECONDS",
        help="refresh the table of running copies every SECONDS (1) until none is left",
    )
    p.set_defaults(func=cmd_status)
    return parser


def _options_without_value(args: argparse.Namespace) -> str | None:
    """argparse (CPython 3.11-3.12) turns `--name=--` into an empty list instead of the
    string "--": such an option was given no value. Returns its flag, or None."""
    for key, value in vars(args).items():
        values = value if key == "tag" else [value]  # --tag collects a list of strings
        if any(isinstance(v, list) for v in values):
            return "--" + key.replace("_", "-")
    return None


COMMANDS = {
    "mount", "umount", "copy", "key", "region", "diff", "check", "seal", "status", "clone",
}  # fmt: skip


def _is_mount_helper_call(argv: list[str]) -> bool:
    """`snapfs STORE MOUNTPOINT [-o ...]`, as mount.fuse3 (a `snapfs#STORE` fstab source)
    and /sbin/mount.fuse.snapfs (scripts/install-service) call it: cli/mounthelper.py."""
    words = [a for a in argv if not a.startswith("-")]
    return (
        len(argv) >= 2
        and not argv[0].startswith("-")
        and argv[0] not in COMMANDS
        and len(words) >= 2
        and os.path.isdir(words[1])
    )


def main(argv: list[str] | None = None) -> int:
    # Whatever snapfs creates (store, indexes, objects, logs, key files, the daemon's too)
    # is for its owner only; snapshots' own modes come from the callers, not from this.
    os.umask(0o077)
    given = sys.argv[1:] if argv is None else argv
    if _is_mount_helper_call(given):
        from snapfs.cli import mounthelper

        return mounthelper.main(given)
    args = build_parser().parse_args(argv)
    missing = _options_without_value(args)
    if missing:
        return _fail("InvalidParameter", f"{missing} needs a value", 2)
    try:
        return args.func(args)
    except SnapfsError as exc:
        return _fail(exc.code, exc.message)
    except sqlite3.Error as exc:  # a store's index that is damaged, full or unreadable
        error = from_sqlite(exc)
        if error is None:
            raise
        return _fail(error.code, error.message)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `snapfs status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the mount answered with an errno (e.g. a snapshot deleted meanwhile)
        code = errno.errorcode.get(exc.errno or 0, "OSError")
        return _fail(code, f"{exc.filename or ''}: {exc.strerror}".lstrip(": "))


if __name__ == "__main__":
    sys.exit(main())
