"""`mount -t fuse.snapfs STORE MOUNTPOINT -o OPTIONS`, and fstab lines (issue 18).

mount(8) runs `/sbin/mount.fuse.snapfs STORE MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS]` for a
`fuse.snapfs` file system, and mount.fuse3 runs `snapfs STORE MOUNTPOINT -o OPTIONS` for a
`fuse` one whose source is `snapfs#STORE`: the conventions sshfs, s3fs and rclone follow.
Both land here (`snapfs` given a source and a mountpoint instead of a command, and
`scripts/install-service` links mount.fuse.snapfs to `snapfs`). The options become the
flags of `snapfs mount`, which returns once the mount answers, as mount(8) expects.

An fstab line:

    /var/lib/snapfs  /mnt/snap  fuse.snapfs  allow_other,copy_bwlimit=50M,_netdev,nofail  0 0

Options mount(8) and systemd act on themselves (`_netdev`, `nofail`, `noauto`, `user`,
`x-systemd.*`, ...) and the FUSE defaults the kernel applies anyway (`rw`, `suid`, `dev`,
`exec`, ...) are accepted and left alone; `ro` is refused (a read-only snapfs mount does not
exist: sealed snapshots are read-only already), and so is any other unknown option, with its
name, rather than ignored.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

USAGE = "usage: mount.fuse.snapfs [snapfs#]STORE MOUNTPOINT [-sfnv] [-o OPTION[,OPTION...]]"

# option -> the `snapfs mount` flag it becomes (a value after '=' follows the flag).
FLAGS = {
    "allow_other": "--allow-other",
    "copy_bwlimit": "--copy-bwlimit",
    "copy-bwlimit": "--copy-bwlimit",
    "settle": "--settle",
    "block_size": "--block-size",
    "block-size": "--block-size",
    "debug": "--debug",
}
WITH_VALUE = {"--copy-bwlimit", "--settle", "--block-size"}
# Acted on by mount(8), systemd or the kernel, not by snapfs.
LEFT_ALONE = {
    "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "_netdev",
    "nofail", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "async", "atime",
    "noatime", "relatime", "nodiratime", "lazytime", "default_permissions", "nonempty",
}  # fmt: skip
LEFT_ALONE_PREFIXES = ("x-systemd.", "x-", "comment=", "fsname=", "subtype=")


class HelperError(Exception):
    pass


def mount_command(argv: Sequence[str]) -> tuple[list[str], bool]:
    """The `snapfs mount` arguments for a helper's argv, and whether it is a fake (-f)
    mount that must do nothing."""
    positional: list[str] = []
    options: list[str] = []
    fake = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "-o":
            if not args:
                raise HelperError("-o needs options")
            options += [o for o in args.pop(0).split(",") if o]
        elif arg.startswith("-o"):
            options += [o for o in arg[2:].split(",") if o]
        elif arg in ("-N", "-t"):  # a namespace or the type: mount(8) handled them
            if args:
                args.pop(0)
        elif arg.startswith("-") and len(arg) > 1:
            fake = fake or "f" in arg[1:]  # -s (sloppy), -n (no mtab), -v: nothing to do
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise HelperError(USAGE)
    source, mountpoint = positional
    store = source.split("#", 1)[1] if source.startswith("snapfs#") else source
    command = ["mount", mountpoint, "--store", store]
    for option in options:
        name, has_value, value = option.partition("=")
        if option in LEFT_ALONE or option.startswith(LEFT_ALONE_PREFIXES):
            continue
        if name == "ro":
            raise HelperError("ro: a snapfs mount is read-write (sealed snapshots are read-only)")
        flag = FLAGS.get(name)
        if flag is None:
            raise HelperError(f"unknown mount option {option!r} (snapfs takes: "
                              f"{', '.join(sorted(set(FLAGS)))})")  # fmt: skip
        if (flag in WITH_VALUE) != bool(has_value):
            raise HelperError(f"mount option {name!r} " + ("needs a value" if flag in
                              WITH_VALUE else "takes no value"))  # fmt: skip
        command += [flag, value] if flag in WITH_VALUE else [flag]
    return command, fake


def main(argv: Sequence[str]) -> int:
    try:
        command, fake = mount_command(argv)
    except HelperError as exc:
        print(f"InvalidParameter.MountOption: {exc}", file=sys.stderr)
        return 1
    if fake:
        return 0
    return subprocess.run([sys.executable, "-m", "snapfs", *command], check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
