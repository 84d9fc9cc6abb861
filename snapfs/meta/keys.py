"""Customer master keys (CMKs) and the store master key that wraps them.

Envelope encryption, as a KMS does it:

- the **store master key** (32 random bytes) never touches the index in the clear. It is
  either kept in `STORE/master.key` (mode 0600; the embedded default) or, when the store was
  created with `SNAPFS_PASSPHRASE` set, wrapped with AES-256-GCM under a key derived from the
  passphrase with scrypt (n=2**15, r=8, p=1) and kept in `store.db`;
- each **CMK** (id of UUID form, belonging to a region, enabled or disabled) is 32 random
  bytes wrapped under the master key (AES-256-GCM, the key id as associated data) in the
  `keys` table of `store.db`;
- blocks are never encrypted with a CMK itself: `BlockKeys` derives with HKDF-SHA256 one key
  for block ids (keyed BLAKE3, so the index does not reveal plaintext hashes) and one for
  AES-256-GCM (see codec.py).

`snapfs key ...` works on `store.db` directly, so it works whether or not the store is
mounted; a mounted daemon sees enable/disable at once (it re-reads key states whenever
SQLite's data_version says another connection committed).
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from snapfs import durable
from snapfs.errors import (
    InvalidParameter,
    KeyDisabled,
    KeyIdDuplicate,
    KeyNotFound,
    MasterKeyNotFound,
    WrongPassphrase,
)
from snapfs.meta import db as dbutil
from snapfs.model.names import check_region_name, is_text

# KeyNotFound, KeyDisabled and WrongPassphrase live in snapfs.errors; callers may import them
# from here too.

MASTER_FILE = "master.key"
MASTER_KEY_BYTES = 32
PASSPHRASE_ENV = "SNAPFS_PASSPHRASE"
EXPORT_PASSPHRASE_ENV = "SNAPFS_EXPORT_PASSPHRASE"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
EXPORT_FORMAT = "snapfs-key-export-v1"


def _scrypt(passphrase: str, salt: bytes) -> bytes:
    kdf = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return kdf.derive(passphrase.encode())


def _seal(key: bytes, plain: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, plain, aad)


def _open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)


def read_passphrase(prompt: str, env: str = PASSPHRASE_ENV) -> str | None:
    """The passphrase from the environment, or asked for on a terminal; None if neither."""
    value = os.environ.get(env)
    if value is not None:
        return value
    if os.isatty(0):
        return getpass.getpass(prompt)
    return None


# --- the master key -------------------------------------------------------------------------


def unlock_master(store_path: Path, db: sqlite_utils.Database, *, create: bool) -> bytes | None:
    """The store master key; created on first use (passphrase-protected if SNAPFS_PASSPHRASE
    is set then, else in a 0600 keyfile). None if there is none and `create` is false."""
    protection = dbutil.get_meta(db, "key_protection")
    if protection is None:
        if not create:
            return None
        return _create_master(store_path, db)
    if protection == "keyfile":
        try:
            return (store_path / MASTER_FILE).read_bytes()
        except FileNotFoundError:
            raise MasterKeyNotFound(
                f"the store's master key file {store_path / MASTER_FILE} is missing"
            ) from None
    passphrase = read_passphrase("snapfs store passphrase: ")
    if passphrase is None:
        raise WrongPassphrase(
            f"store {store_path} is protected by a passphrase: set "
            f"{PASSPHRASE_ENV} or run from a terminal"
        )
    salt = bytes.fromhex(dbutil.get_meta(db, "master_salt") or "")
    wrapped = bytes.fromhex(dbutil.get_meta(db, "master_wrapped") or "")
    try:
        return _open(_scrypt(passphrase, salt), wrapped, b"snapfs master v1")
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase for the store's master key") from None


def _create_master(store_path: Path, db: sqlite_utils.Database) -> bytes:
    master = secrets.token_bytes(MASTER_KEY_BYTES)
    passphrase = os.environ.get(PASSPHRASE_ENV)
    with dbutil.transaction(db) as conn:
        if passphrase:
            salt = secrets.token_bytes(16)
            wrapped = _seal(_scrypt(passphrase, salt), master, b"snapfs master v1")
            dbutil.set_meta(conn, "master_salt", salt.hex())
            dbutil.set_meta(conn, "master_wrapped", wrapped.hex())
            dbutil.set_meta(conn, "key_protection", "passphrase")
        else:
            path = store_path / MASTER_FILE
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, master)
                os.fsync(fd)
            finally:
                os.close(fd)
            # The catalogue is about to say a key file exists: its entry must survive too.
            durable.fsync_dir(store_path)
            dbutil.set_meta(conn, "key_protection", "keyfile")
    return master


# --- CMKs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    id: str
    region: str
    alias: str | None
    enabled: bool
    created_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "region": self.region,
            "alias": self.alias,
            "enabled": self.enabled,
            "created_at": self.created_at,
        }


def _info(row: dict[str, Any]) -> KeyInfo:
    return KeyInfo(row["id"], row["region"], row["alias"], bool(row["enabled"]), row["created_at"])


def check_key_id(key_id: str) -> str:
    try:
        return str(uuid.UUID(key_id))
    except ValueError:
        raise KeyNotFound(f"{key_id!r} is not a key id (UUID form)") from None


class KeyRing:
    """The store's CMKs; opened by the daemon and by `snapfs key`."""

    def __init__(self, store_path: Path, db: sqlite_utils.Database, master: bytes | None):
        self.store_path = store_path
        self.db = db
        self._master = master
        self._states: dict[str, KeyInfo] = {}
        self._version = -1
        self._block_keys: dict[str, BlockKeys] = {}

    def _master_key(self) -> bytes:
        if self._master is None:
            self._master = unlock_master(self.store_path, self.db, create=True)
        assert self._master is not None
        return self._master

    def _refresh(self) -> None:
        (version,) = self.db.conn.execute("PRAGMA data_version").fetchone()
        if version != self._version:
            self._states = {r["id"]: _info(r) for r in self.db["keys"].rows}
            self._version = version

    def create(self, region: str, alias: str | None = None) -> KeyInfo:
        check_region_name(region)
        key_id = str(uuid.uuid4())
        material = secrets.token_bytes(32)
        wrapped = _seal(self._master_key(), material, key_id.encode())
        row = {
            "id": key_id,
            "region": region,
            "alias": alias,
            "enabled": 1,
            "created_at": time.time(),
            "wrapped": wrapped,
        }
        self.db.table("keys").insert(row)
        self._version = -1
        return _info(row)

    def list(self) -> list[KeyInfo]:
        self._refresh()
        return sorted(self._states.values(), key=lambda k: k.created_at)

    def info(self, key_id: str) -> KeyInfo:
        key_id = check_key_id(key_id)
        self._refresh()
        info = self._states.get(key_id)
        if info is None:
            raise KeyNotFound(f"the key {key_id} does not exist")
        return info

    def set_enabled(self, key_id: str, enabled: bool) -> KeyInfo:
        info = self.info(key_id)
        self.db.execute("UPDATE keys SET enabled = ? WHERE id = ?", [int(enabled), info.id])
        self._version = -1  # data_version only counts other connections' commits
        return self.info(info.id)

    def usable(self, key_id: str, region: str | None = None) -> KeyInfo:
        """A key that exists, is enabled and (if given) belongs to `region`."""
        info = self.info(key_id)
        if region is not None and info.region != region:
            raise KeyNotFound(f"the key {info.id} belongs to region {info.region}, not {region}")
        if not info.enabled:
            raise KeyDisabled(f"the key {info.id} is disabled")
        return info

    def prime(self) -> None:
        """Unwrap every enabled key's block keys (on the trio thread), so that worker
        threads can decode with `loaded()` without touching SQLite."""
        self._refresh()
        for info in self._states.values():
            if info.enabled and info.id not in self._block_keys:
                self.block_keys(info.id)

    def loaded(self, key_id: str) -> BlockKeys:
        """Thread-safe lookup of primed keys: KeyNotFound or KeyDisabled if unusable."""
        info = self._states.get(key_id)
        if info is None:
            raise KeyNotFound(f"the key {key_id} does not exist")
        if not info.enabled:
            raise KeyDisabled(f"the key {key_id} is disabled")
        keys = self._block_keys.get(key_id)
        if keys is None:
            raise KeyNotFound(f"the key {key_id} is not loaded")
        return keys

    def block_keys(self, key_id: str) -> BlockKeys:
        """The derived block keys of an enabled CMK (checked on every call: cheap)."""
        info = self.usable(key_id)
        keys = self._block_keys.get(info.id)
        if keys is None:
            row = self.db.execute("SELECT wrapped FROM keys WHERE id = ?", [info.id]).fetchone()
            material = _open(self._master_key(), row[0], info.id.encode())
            keys = self._block_keys[info.id] = BlockKeys(info.id, material)
        return keys

    def for_snapshot(self, encrypted: bool, key_id: str | None) -> BlockKeys | None:
        """The one rule for a snapshot's block keys: none if it is not encrypted, else its
        CMK's (KeyNotFound or KeyDisabled if that is unusable)."""
        if not encrypted or key_id is None:
            return None
        return self.block_keys(key_id)

    # --- moving keys between stores --------------------------------------------------------

    def export(self, key_id: str, passphrase: str) -> dict[str, Any]:
        info = self.info(key_id)
        row = self.db.execute("SELECT wrapped FROM keys WHERE id = ?", [info.id]).fetchone()
        material = _open(self._master_key(), row[0], info.id.encode())
        salt = secrets.token_bytes(16)
        sealed = _seal(_scrypt(passphrase, salt), material, info.id.encode())
        return {
            "format": EXPORT_FORMAT,
            **info.as_dict(),
            "salt": salt.hex(),
            "wrapped": base64.b64encode(sealed).decode(),
        }

    def import_(self, data: Any, passphrase: str) -> KeyInfo:
        export = _check_export(data)
        key_id = check_key_id(export["id"])
        try:
            material = _open(
                _scrypt(passphrase, bytes.fromhex(export["salt"])),
                base64.b64decode(export["wrapped"], validate=True),
                key_id.encode(),
            )
        except (ValueError, TypeError):  # bad hex or base64, a cut-off ciphertext
            raise _not_an_export("its salt or wrapped key is malformed") from None
        except InvalidTag:
            raise WrongPassphrase("wrong passphrase for this key export") from None
        self._refresh()
        if key_id in self._states:
            raise KeyIdDuplicate(f"the key {key_id} is already in this store")
        row = {
            "id": key_id,
            "region": check_region_name(export["region"]),
            "alias": export.get("alias"),
            "enabled": int(bool(export.get("enabled", True))),
            "created_at": float(export.get("created_at") or time.time()),
            "wrapped": _seal(self._master_key(), material, key_id.encode()),
        }
        self.db.table("keys").insert(row)
        self._version = -1
        return _info(row)


class BlockKeys:
    """What a CMK is used for: keyed block ids and the block AEAD key, derived by HKDF."""

    def __init__(self, key_id: str, material: bytes):
        self.key_id = key_id
        self.key_id_bytes = uuid.UUID(key_id).bytes
        self.id_key = _hkdf(material, b"snapfs block id v1")
        self.aead = AESGCM(_hkdf(material, b"snapfs block aead v1"))
        # Snapshot manifests in a region's backend (manifests.py): a key of their own.
        self.manifest_aead = AESGCM(_hkdf(material, b"snapfs manifest aead v1"))
        # Pack trailers on a bucket (objects/s3packs.py) list this key's blocks under it.
        self.pack_aead = AESGCM(_hkdf(material, b"snapfs pack trailer aead v1"))


def _hkdf(material: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)


# The fields of a key export and the JSON types each may have.
_EXPORT_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (str,), "id": (str,), "region": (str,), "salt": (str,), "wrapped": (str,),
    "alias": (str, type(None)), "enabled": (bool,), "created_at": (int, float, type(None)),
}  # fmt: skip
_EXPORT_REQUIRED = ("format", "id", "region", "salt", "wrapped")


def _not_an_export(why: str) -> InvalidParameter:
    return InvalidParameter(f"not a snapfs key export: {why}")


def _check_export(data: Any) -> dict[str, Any]:
    """A key export read from a file the user named: any other JSON is refused cleanly."""
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise _not_an_export(f"its format is not {EXPORT_FORMAT}")
    for name in _EXPORT_REQUIRED:
        if name not in data:
            raise _not_an_export(f"it has no {name}")
    for name, value in data.items():
        types = _EXPORT_FIELDS.get(name)
        if types is not None and not isinstance(value, types):
            raise _not_an_export(f"its {name} has the wrong type")
        if isinstance(value, str) and not is_text(value):
            raise _not_an_export(f"its {name} is not Unicode text")
    return data


def read_export(path: Path) -> Any:
    """The JSON of a key export file; a file that is not JSON is InvalidParameter."""
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        raise _not_an_export(f"{path} is not JSON") from None


def export_to_file(ring: KeyRing, key_id: str, path: Path | None, passphrase: str) -> str:
    text = json.dumps(ring.export(key_id, passphrase), indent=2)
    if path is not None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())  # an export is the backup of a key: it must be on disk
        durable.fsync_dir(path.parent)  # and so must its name
    return text
