"""Regions are directories: mkdir, rmdir, ls, and what may live where."""

from __future__ import annotations

import errno
import os

import pytest

from ..conftest import SnapfsMount, run


def test_mkdir_creates_region_with_own_index_and_blocks(mnt: SnapfsMount) -> None:
    (mnt.path / "us-east-1").mkdir()
    (mnt.path / "cn-hangzhou").mkdir()
    assert sorted(os.listdir(mnt.path)) == ["cn-hangzhou", "us-east-1"]
    for name in ("us-east-1", "cn-hangzhou"):
        assert (mnt.store / "regions" / name / "index.db").is_file()
        assert (mnt.store / "regions" / name / "blocks").is_dir()
    assert run("ls", "-l", mnt.path).returncode == 0


@pytest.mark.parametrize(
    "name", ["A", "x", "Us-east", "1region", "-abc", "us_east", "a" * 64, "us.east"]
)
def test_bad_region_name_is_einval(mnt: SnapfsMount, name: str) -> None:
    with pytest.raises(OSError) as exc:
        (mnt.path / name).mkdir()
    assert exc.value.errno == errno.EINVAL
    assert not (mnt.path / name).exists()
    assert "InvalidRegionId.Malformed" in mnt.log()


def test_mkdir_shell_reports_invalid_argument(mnt: SnapfsMount) -> None:
    result = run("mkdir", mnt.path / "Bad_Name", check=False)
    assert result.returncode != 0
    assert "Invalid argument" in result.stderr


def test_rmdir_empty_region_and_refuse_non_empty(mnt: SnapfsMount, region) -> None:
    (region / "snap").write_bytes(b"data")
    with pytest.raises(OSError) as exc:
        region.rmdir()
    assert exc.value.errno == errno.ENOTEMPTY
    (region / "snap").unlink()
    region.rmdir()
    assert os.listdir(mnt.path) == []
    assert not (mnt.store / "regions" / "us-east-1").exists()


def test_regions_hold_files_only(mnt: SnapfsMount, region) -> None:
    with pytest.raises(OSError) as exc:
        (region / "sub").mkdir()
    assert exc.value.errno == errno.EPERM
    with pytest.raises(OSError) as exc:
        (mnt.path / "loose-file").write_bytes(b"x")
    assert exc.value.errno == errno.EPERM
    with pytest.raises(OSError) as exc:
        os.symlink("target", region / "link")
    assert exc.value.errno == errno.EPERM


def test_existing_region_is_eexist(mnt: SnapfsMount, region) -> None:
    with pytest.raises(FileExistsError):
        region.mkdir()


def test_regions_survive_remount(mnt: SnapfsMount) -> None:
    (mnt.path / "eu-west-1").mkdir()
    mnt.remount()
    assert os.listdir(mnt.path) == ["eu-west-1"]
