"""Hostile input, by property-based testing (hypothesis) against one mount: file names,
extended-attribute names and values, tag rules, CopySnapshot requests, command-line
arguments, sizes and offsets (huge, negative, overflowing). Every refusal is a clean errno
(never EIO, which would mean a bug or damage) or a `Code: message` from the CLI; the daemon
never dies and never logs a traceback; what is accepted reads back exactly."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapfs.cli import main as cli
from snapfs.errors import SnapfsError
from snapfs.model import params

from ..conftest import SnapfsMount, wait_for

BLOCK = 16 << 10
MAX_OFFSET = (1 << 63) - 1  # off_t
FUZZ = settings(
    deadline=None,  # FUSE round trips on a busy machine
    # `survives` wraps the module's one mount; nothing in it is reset per example.
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
# Refusals a caller may see; EIO is not among them: it is reserved for damage.
CLEAN = {
    errno.EINVAL, errno.ENOENT, errno.EEXIST, errno.EPERM, errno.EACCES, errno.ENOTSUP,
    errno.ENODATA, errno.ENAMETOOLONG, errno.ERANGE, errno.E2BIG, errno.EFBIG, errno.EBUSY,
    errno.EDQUOT, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR, errno.ENOKEY,
    errno.EKEYREVOKED, errno.EXDEV,
}  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_mnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SnapfsMount]:
    root = tmp_path_factory.mktemp("hostile")
    m = SnapfsMount(root / "store", root / "mnt", block_size=BLOCK)
    m.mount()
    for region in ("us-east-1", "eu-west-1"):
        (m.path / region).mkdir()
    (m.path / "us-east-1" / "disk.img").write_bytes(os.urandom(3 * BLOCK + 100))
    try:
        yield m
    finally:
        m.teardown()


@pytest.fixture
def survives(fuzz_mnt: SnapfsMount) -> Iterator[SnapfsMount]:
    """The mount; after the test the daemon must still run and have logged no traceback."""
    logged_before = len(fuzz_mnt.log())
    yield fuzz_mnt
    assert fuzz_mnt.alive(), "the daemon died"
    log = fuzz_mnt.log()[logged_before:]
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 300) :][:3000]


@contextlib.contextmanager
def clean_refusal() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        assert exc.errno in CLEAN, f"unclean refusal {errno.errorcode.get(exc.errno)}: {exc}"


names = st.binary(min_size=1, max_size=300).filter(lambda b: b"\0" not in b)


@settings(FUZZ, max_examples=150)
@given(name=names, other=names)
def test_snapshot_names(survives: SnapfsMount, name: bytes, other: bytes) -> None:
    region = os.fsencode(survives.path / "us-east-1")
    path, renamed = region + b"/" + name, region + b"/" + other
    created = False
    with clean_refusal():
        with open(path, "xb") as f:
            f.write(b"hostile " + name)
        created = True
    if not created:
        return
    assert name in os.listdir(region)
    with clean_refusal():
        os.rename(path, renamed)
        path = renamed
    with open(path, "rb") as f:
        assert f.read() == b"hostile " + name
    os.unlink(path)


KNOWN_ATTRIBUTES = [
    "user.snapfs.description", "user.snapfs.retention_days", "user.snapfs.status",
    "user.snapfs.id", "user.snapfs.max_parallel_copies", "user.snapfs.snapshot_quota",
    "user.snapfs.encrypt_by_default", "user.snapfs.default_kms_key_id",
    "user.snapfs.expires_at", "user.snapfs.progress", "user.tag.env",
]  # fmt: skip
any_names = st.sampled_from(["user.snapfs.", "user.tag.", "user.", "trusted.", "security.", ""])
xattr_names = any_names.flatmap(
    lambda prefix: st.text(max_size=140).map(lambda rest: prefix + rest)
).filter(lambda n: "\0" not in n and 0 < len(n.encode("utf-8", "surrogatepass")) <= 255)
xattr_values = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=300).map(str.encode),
    st.integers(-(1 << 70), 1 << 70).map(lambda n: str(n).encode()),
    st.sampled_from([b"", b"true", b"false", b"0", b"1", b"65536", b"65537", b"\xb2", b"1e3",
                     "²".encode(), "１２".encode(), b"9" * 5000, b" 7", b"7\n", b"0x10"]),
)  # fmt: skip


def set_get_remove(target: Path, name: str, value: bytes) -> None:
    """Set, read back, list and remove one attribute: refusals must be clean, and a stored
    tag must read back exactly."""
    stored = False
    with clean_refusal():
        os.setxattr(target, os.fsencode(name), value)
        stored = True
    with clean_refusal():
        got = os.getxattr(target, os.fsencode(name))
        if stored and name.startswith("user.tag."):
            assert got == value
    with clean_refusal():
        os.listxattr(target)
    if stored:
        with clean_refusal():
            os.removexattr(target, os.fsencode(name))


@settings(FUZZ, max_examples=150)
@given(name=xattr_names, value=xattr_values, on_region=st.booleans())
def test_any_attribute_names(
    survives: SnapfsMount, name: str, value: bytes, on_region: bool
) -> None:
    target = survives.path / "eu-west-1" if on_region else survives.path / "us-east-1" / "disk.img"
    set_get_remove(target, name, value)


@settings(FUZZ, max_examples=200)
@given(name=st.sampled_from(KNOWN_ATTRIBUTES), value=xattr_values, on_region=st.booleans())
def test_known_attributes(survives: SnapfsMount, name: str, value: bytes, on_region: bool) -> None:
    target = survives.path / "eu-west-1" if on_region else survives.path / "us-east-1" / "disk.img"
    set_get_remove(target, name, value)
    if on_region:  # what later examples rely on: no quota, copies not held back
        with clean_refusal():
            os.removexattr(target, b"user.snapfs.snapshot_quota")
        os.setxattr(target, b"user.snapfs.max_parallel_copies", b"100")


def tag_rule_ok(key: str, value: str) -> bool:
    """The CopySnapshot tag rules, written out independently of snapfs/params.py."""

    def text_ok(text: str) -> bool:
        return (
            len(text) <= 128
            and "http://" not in text
            and "https://" not in text
            and not (text.startswith("acs:") or text.startswith("aliyun"))
        )

    return len(key) > 0 and text_ok(key) and text_ok(value)


tag_text = st.one_of(
    st.text(max_size=140).filter(lambda t: "\0" not in t),
    st.sampled_from(["acs:x", "aliyun", "aliyunx", "http://a", "x https://", "", "a" * 128,
                     "a" * 129, "ä" * 60]),
)  # fmt: skip


@settings(FUZZ, max_examples=150)
@given(key=tag_text, value=tag_text)
def test_tag_rules(survives: SnapfsMount, key: str, value: str) -> None:
    snap = survives.path / "us-east-1" / "disk.img"
    try:
        utf8_key, utf8_value = key.encode(), value.encode()
    except UnicodeEncodeError:
        return  # lone surrogates: not text a caller can pass
    expected = tag_rule_ok(key, value)
    try:
        params.check_tag_key(key)
        params.check_tag_value(value)
        accepted = True
    except SnapfsError as exc:
        assert exc.code in ("InvalidTagKey.Malformed", "InvalidTagValue.Malformed")
        accepted = False
    assert accepted == expected
    attribute = b"user.tag." + utf8_key
    if len(attribute) > 255:
        return  # the kernel's limit on attribute names (ERANGE before it reaches snapfs)
    try:
        os.setxattr(snap, attribute, utf8_value)
        assert expected, f"accepted a bad tag {key!r}={value!r}"
        assert os.getxattr(snap, attribute) == utf8_value
        os.removexattr(snap, attribute)
    except OSError as exc:
        assert not expected and exc.errno == errno.EINVAL, exc


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(), st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=8,
)  # fmt: skip
copy_requests = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"source": st.one_of(st.just("us-east-1/disk.img"), json_values)},
        optional={
            "name": json_values | st.sampled_from(["..", "a/b", "ok-Name", "x" * 200]),
            "description": json_values,
            "retention_days": json_values | st.sampled_from(["7", "²", "9" * 5000]),
            "tags": json_values | st.dictionaries(tag_text, tag_text, max_size=3),
            "encrypted": json_values,
            "kms_key_id": json_values,
        },
    ),
)


RAW_REQUESTS = [
    b"", b"{", b"null", b"[]", b'"us-east-1/disk.img"', b"\xff\xfe",
    b'{"source": "us-east-1/disk.img", "description": "\\ud800 lone surrogate"}',
    b'{"source": "us-east-1/disk.img", "tags": {"\\udfff": "v"}}',
    b'{"source": "\\ud800/disk.img"}', b'{"source": "us-east-1/disk.img", "name": NaN}',
    b'{"source": "us-east-1/disk.img", "retention_days": 1e400}',
]  # fmt: skip


@settings(FUZZ, max_examples=150)
@given(request=copy_requests | st.sampled_from(RAW_REQUESTS))
def test_copy_requests(survives: SnapfsMount, request: object) -> None:
    region = survives.path / "eu-west-1"
    before = set(os.listdir(region))
    if isinstance(request, bytes):
        raw = request
    else:
        try:
            raw = json.dumps(request).encode()
        except (ValueError, UnicodeEncodeError):
            return
    started = False
    with clean_refusal():
        os.setxattr(region, "user.snapfs.copy", raw)
        started = True
    for name in set(os.listdir(region)) - before:
        assert started, f"a refused request left {name!r} behind"
        wait_copied(region / name)
        os.unlink(region / name)


def wait_copied(path: Path) -> None:
    assert wait_for(lambda: os.getxattr(path, "user.snapfs.status") != b"copying", 30)
    assert os.getxattr(path, "user.snapfs.status") == b"available"


def run_cli(*args: str) -> tuple[int, str]:
    """`snapfs ARGS` in this process (a fresh interpreter per example is too slow); the
    exit status and stderr. An exception escaping main() is what a user sees as a traceback."""
    err = io.StringIO()
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli.main(list(args))
            except SystemExit as exit_:  # argparse: usage and exit status 2
                code = exit_.code if isinstance(exit_.code, int) else 2
    finally:
        os.umask(umask)
    return code, err.getvalue()


CLOUD_ERROR = re.compile(r"^[A-Z][A-Za-z0-9]*(\.[A-Za-z0-9]+)*: ", re.MULTILINE)
cli_text = st.one_of(
    st.text(max_size=60).filter(lambda t: "\0" not in t),
    st.sampled_from(["", "-1", "0", "1", "65536", "65537", "9" * 5000, "²", "=", "k=v",
                     "acs:k=v", "../x", "a/b", "--", "-h", "http://x"]),
)  # fmt: skip


@settings(FUZZ, max_examples=100)
@given(
    name=st.none() | cli_text,
    description=st.none() | cli_text,
    retention=st.none() | cli_text,
    tags=st.lists(cli_text, max_size=3),
    kms=st.none() | cli_text,
    destination=st.sampled_from(["eu-west-1", "eu-west-1/New-Name", "nowhere", "", "../.."]),
)
def test_copy_command_arguments(
    survives: SnapfsMount,
    name: str | None,
    description: str | None,
    retention: str | None,
    tags: list[str],
    kms: str | None,
    destination: str,
) -> None:
    try:
        for text in (name, description, retention, kms, *tags):
            (text or "").encode()
    except UnicodeEncodeError:
        return
    args = [str(survives.path / "us-east-1" / "disk.img"), str(survives.path / destination)]
    for flag, value in (("--name", name), ("--description", description),
                        ("--retention-days", retention), ("--kms-key-id", kms)):  # fmt: skip
        if value is not None:
            args += [f"{flag}={value}"]
    args += [f"--tag={t}" for t in tags]
    before = set(os.listdir(survives.path / "eu-west-1"))
    code, err = run_cli("copy", *args)
    if code == 0:
        created = set(os.listdir(survives.path / "eu-west-1")) - before
        for new in created:
            wait_copied(survives.path / "eu-west-1" / new)
            os.unlink(survives.path / "eu-west-1" / new)
        return
    assert code in (1, 2), (code, err)
    assert code == 2 or CLOUD_ERROR.search(err), err
    assert "Traceback" not in err


@settings(FUZZ, max_examples=60)
@given(
    command=st.sampled_from(["status", "diff", "key-create", "key-enable", "check", "umount"]),
    first=cli_text,
    second=cli_text,
)
def test_other_commands(survives: SnapfsMount, command: str, first: str, second: str) -> None:
    try:
        first.encode(), second.encode()
    except UnicodeEncodeError:
        return
    store = str(survives.store)
    inside = str(survives.path / first)
    argv = {
        "status": ["status", inside, "--json"],
        "diff": ["diff", inside, str(survives.path / second)],
        "key-create": ["key", "create", "--region", first, "--store", store],
        "key-enable": ["key", "enable", first, "--store", store],
        "check": ["check", "--store", str(survives.path / first)],
        "umount": ["umount", str(survives.path / "us-east-1" / first)],
    }[command]
    if command == "umount" and os.path.abspath(argv[1]) == str(survives.path):
        return  # that one would be obeyed
    code, err = run_cli(*argv)
    assert survives.is_mounted()
    if code != 0:
        assert code == 2 or CLOUD_ERROR.search(err), (argv, err)


class SparseModel:
    """What a snapshot file should hold after a sequence of writes and truncates."""

    def __init__(self) -> None:
        self.size = 0
        self.extents: list[tuple[int, bytes]] = []

    def write(self, offset: int, data: bytes) -> None:
        self.extents.append((offset, data))
        self.size = max(self.size, offset + len(data))

    def truncate(self, size: int) -> None:
        self.extents = [(o, d[: max(0, size - o)]) for o, d in self.extents if o < size]
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        out = bytearray(length)
        for start, data in self.extents:  # later writes win: applied in order
            lo, hi = max(start, offset), min(start + len(data), offset + length)
            if lo < hi:
                out[lo - offset : hi - offset] = data[lo - start : hi - start]
        return bytes(out)


offsets = st.one_of(
    st.integers(0, 4 * BLOCK),
    st.integers(0, MAX_OFFSET),
    st.sampled_from([MAX_OFFSET, MAX_OFFSET - 1, 1 << 62, (1 << 40) - 1, BLOCK - 1]),
    st.integers(-(1 << 64), -1),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), offsets, st.binary(min_size=1, max_size=BLOCK + 10)),
        st.tuples(st.just("truncate"), st.one_of(offsets, st.integers(MAX_OFFSET, 1 << 65))),
    ),
    min_size=1,
    max_size=6,
)


@settings(FUZZ, max_examples=50)
@given(ops=operations, reads=st.lists(st.tuples(offsets, st.integers(0, 1 << 21)), max_size=5))
def test_sizes_and_offsets(
    survives: SnapfsMount, ops: list[tuple], reads: list[tuple[int, int]]
) -> None:
    path = survives.path / "us-east-1" / "sparse.img"
    model = SparseModel()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        for kind, offset, *data in ops:
            try:
                if kind == "write":
                    assert os.pwrite(fd, data[0], offset) == len(data[0])
                    model.write(offset, data[0])
                else:
                    os.ftruncate(fd, offset)
                    model.truncate(offset)
            except OverflowError:
                assert not 0 <= offset <= MAX_OFFSET  # refused by Python before the kernel
            except OSError as exc:
                assert exc.errno in (errno.EINVAL, errno.EFBIG), exc
    finally:
        os.close(fd)
    try:
        assert os.stat(path).st_size == model.size
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset, length in reads:
                try:
                    got = os.pread(fd, length, offset)
                except OverflowError:
                    continue
                except OSError as exc:  # the kernel: negative, or offset + length overflows
                    assert offset < 0 or offset + length > MAX_OFFSET, exc
                    assert exc.errno == errno.EINVAL, exc
                    continue
                assert got == model.read(offset, length)
            for start, data in model.extents[-2:]:  # what was written last reads back
                assert os.pread(fd, len(data), start) == model.read(start, len(data))
        finally:
            os.close(fd)
    finally:
        os.unlink(path)


@settings(FUZZ, max_examples=40)
@given(content=st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"format": st.just("snapfs-key-export-v1")},
        optional={k: json_values for k in ("id", "region", "salt", "wrapped", "alias",
                                           "enabled", "created_at")},
    ).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.sampled_from([b'{"format": "snapfs-key-export-v1", "id": "\\ud800", "region": "x"}']),
))  # fmt: skip
def test_key_import_files(survives: SnapfsMount, content: bytes) -> None:
    export = survives.store.parent / "hostile-export.json"
    export.write_bytes(content)
    old = os.environ.get("SNAPFS_EXPORT_PASSPHRASE")
    os.environ["SNAPFS_EXPORT_PASSPHRASE"] = "hostile"
    try:
        code, err = run_cli("key", "import", str(export), "--store", str(survives.store))
    finally:
        if old is None:
            del os.environ["SNAPFS_EXPORT_PASSPHRASE"]
        else:
            os.environ["SNAPFS_EXPORT_PASSPHRASE"] = old
    assert code == 1 and CLOUD_ERROR.search(err), err


@pytest.mark.parametrize("size", ["-1", "0", "3", "4095", "12345", str(1 << 40), "abc", "1e6"])
def test_mount_refuses_bad_block_sizes(tmp_path: Path, size: str) -> None:
    m = SnapfsMount(tmp_path / "store", tmp_path / "mnt")
    result = m.cli("mount", m.path, "--store", m.store, "--block-size", size, check=False)
    try:
        assert result.returncode != 0 and not m.is_mounted()
        assert CLOUD_ERROR.search(result.stderr) or "invalid int value" in result.stderr
        assert "Traceback" not in result.stderr + m.log()
    finally:
        m.teardown()
