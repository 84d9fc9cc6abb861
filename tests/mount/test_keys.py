"""`snapfs key`: customer master keys, wrapped under the store master key."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from snapfs.meta.catalogue import open_catalogue
from snapfs.meta.keys import KeyRing, _open, unlock_master

from ..conftest import SNAPFS, SnapfsMount, run


def key_cli(store: Path, *args: str, env: dict | None = None, check: bool = True):
    return run(
        *SNAPFS, "key", *args, "--store", store, check=check, env={**os.environ, **(env or {})}
    )


def test_key_lifecycle_without_a_mount(tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = key_cli(store, "create", "--region", "us-east-1", "--alias", "prod").stdout
    key_id = out.strip().splitlines()[-1]
    assert len(key_id) == 36 and key_id.count("-") == 4
    listed = json.loads(key_cli(store, "list", "--json").stdout)
    assert listed == [
        {
            "id": key_id,
            "region": "us-east-1",
            "alias": "prod",
            "enabled": True,
            "created_at": listed[0]["created_at"],
        }
    ]
    assert key_cli(store, "disable", key_id).stdout.strip().endswith("disabled")
    assert json.loads(key_cli(store, "list", "--json").stdout)[0]["enabled"] is False
    assert key_cli(store, "enable", key_id).stdout.strip().endswith("enabled")
    # The embedded default protects the master key with a 0600 keyfile.
    assert stat.S_IMODE((store / "master.key").stat().st_mode) == 0o600


def test_key_material_is_never_stored_in_the_clear(tmp_path: Path) -> None:
    store = tmp_path / "store"
    key_id = key_cli(store, "create", "--region", "us-east-1").stdout.split()[-1]
    catalogue = open_catalogue(store)
    master = unlock_master(store, catalogue, create=False)
    (wrapped,) = catalogue.execute("SELECT wrapped FROM keys WHERE id = ?", [key_id]).fetchone()
    material = _open(master, wrapped, key_id.encode())
    catalogue.close()
    assert len(material) == 32
    for path in store.rglob("*"):
        if path.is_file():
            assert material not in path.read_bytes(), path


def test_bad_key_ids_and_regions_are_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = key_cli(store, "enable", "not-a-uuid", check=False)
    assert result.returncode != 0
    assert result.stderr.startswith("InvalidParameter.KMSKeyId.NotFound")
    result = key_cli(store, "disable", "0c8a6e2e-3f57-4c59-a0d9-2b1f3c1f1e11", check=False)
    assert result.returncode != 0 and "does not exist" in result.stderr
    result = key_cli(store, "create", "--region", "Not_A_Region", check=False)
    assert result.returncode != 0 and result.stderr.startswith("InvalidRegionId.Malformed")


def test_export_and_import_move_a_key_wrapped(tmp_path: Path) -> None:
    src, dst = tmp_path / "a", tmp_path / "b"
    key_id = key_cli(src, "create", "--region", "eu-west-1").stdout.split()[-1]
    env = {"SNAPFS_EXPORT_PASSPHRASE": "correct horse"}
    export = tmp_path / "key.json"
    key_cli(src, "export", key_id, "--out", str(export), env=env)
    assert stat.S_IMODE(export.stat().st_mode) == 0o600
    data = json.loads(export.read_text())
    assert data["id"] == key_id and "wrapped" in data
    bad = key_cli(
        dst, "import", str(export), env={"SNAPFS_EXPORT_PASSPHRASE": "wrong"}, check=False
    )
    assert bad.returncode != 0 and bad.stderr.startswith("InvalidPassphrase")
    assert key_cli(dst, "import", str(export), env=env).stdout.split()[-1] == key_id
    # Both stores derive the same block keys from it.
    rings = [KeyRing(p, open_catalogue(p), None) for p in (src, dst)]
    a, b = (ring.block_keys(key_id) for ring in rings)
    assert a.id_key == b.id_key


def test_passphrase_protected_store(tmp_path: Path) -> None:
    store, mnt_dir = tmp_path / "store", tmp_path / "mnt"
    key_cli(store, "create", "--region", "us-east-1", env={"SNAPFS_PASSPHRASE": "s3cret"})
    assert not (store / "master.key").exists()
    assert b"s3cret" not in (store / "store.db").read_bytes()
    m = SnapfsMount(store, mnt_dir)
    env = {**os.environ, "SNAPFS_PASSPHRASE": "wrong"}
    result = run(
        *SNAPFS, "mount", mnt_dir, "--store", store, check=False, env=env, stdin=subprocess.DEVNULL
    )
    assert result.returncode != 0
    assert "InvalidPassphrase" in result.stderr and "wrong passphrase" in result.stderr
    assert not m.is_mounted()
    env["SNAPFS_PASSPHRASE"] = "s3cret"
    assert run(*SNAPFS, "mount", mnt_dir, "--store", store, env=env).returncode == 0
    try:
        assert m.is_mounted()
        # `snapfs key` works while the store is mounted.
        key_cli(store, "create", "--region", "us-east-1", env={"SNAPFS_PASSPHRASE": "s3cret"})
        assert len(json.loads(key_cli(store, "list", "--json").stdout)) == 2
    finally:
        m.teardown()
