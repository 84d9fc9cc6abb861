"""The `snapfs` command line.

Every failure prints `Code: message` on stderr (the cloud-style code of `SnapfsError`) and
exits non-zero; no traceback reaches the user for a refusal.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from . import mounts, status
from .errors import SnapfsError
from .store import default_store_path

MOUNT_TIMEOUT = 120.0
UMOUNT_TIMEOUT = 300.0


def _fail(code: str, message: str, exit_code: int = 1) -> int:
    print(f"{code}: {message}", file=sys.stderr)
    return exit_code


def cmd_mount(args: argparse.Namespace) -> int:
    store = Path(args.store).expanduser() if args.store else default_store_path()
    if args.foreground:
        from . import daemon

        return daemon.run(
            Path(args.mountpoint),
            store,
            allow_other=args.allow_other,
            to_stderr=not args.quiet,
            ready_fd=args.ready_fd,
            block_size=args.block_size,
            debug=args.debug,
        )
    return _spawn_daemon(args, store)


def _spawn_daemon(args: argparse.Namespace, store: Path) -> int:
    """Start the daemon in its own session; return once it reports the mount ready."""
    store.mkdir(parents=True, exist_ok=True, mode=0o700)
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
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    if args.debug:
        cmd.append("--debug")
    with open(store / "daemon.err", "ab") as err:
        proc = subprocess.Popen(
            cmd,
            pass_fds=(write_end,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
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
    store = Path(args.store).expanduser() if args.store else default_store_path()
    region = snapshot = None
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
    data = status.collect(store, region, snapshot)
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        print()
    else:
        status.render(data)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapfs",
        description="Cloud-style disk snapshots as plain files: regions are directories, "
        "snapshots are files.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mount", help="mount a store (created on first use)")
    p.add_argument("mountpoint")
    p.add_argument("--store", help="store directory (default: $XDG_DATA_HOME/snapfs)")
    p.add_argument(
        "--foreground", action="store_true", help="stay in the foreground, log to stderr"
    )
    p.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    p.add_argument("--block-size", type=int, help="block size of a new store, in bytes")
    p.add_argument("--debug", action="store_true", help="log every request")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="flush and unmount")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("status", help="snapshots with size, stored bytes, status, progress")
    p.add_argument("path", nargs="?", help="a mountpoint, region directory or snapshot file")
    p.add_argument("--store", help="store directory, when PATH is not given")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SnapfsError as exc:
        return _fail(exc.code, exc.message)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `snapfs status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
