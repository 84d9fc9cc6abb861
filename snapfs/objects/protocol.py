"""`ObjectStore`: the one interface every object store of a region offers.

A region keeps its block objects (and, on a bucket, its manifests) in an object store:
`LocalBackend` (pack files and packs.db on local disk, local.py) or `S3Backend` (a key prefix
of an S3-compatible bucket, s3.py). The block repository (blocks/repository.py), `snapfs
check` (service/check.py), the manifest publisher (service/manifests.py) and the store
(service/store.py) use them only through the members below, so either can stand in for the
other. tests/unit/test_object_stores.py is the contract suite both are run against.

The contract (crash safety, as the region's write order relies on it):

- after `put(key, data)` returns, `get(key)` returns `data` (also from another thread);
- after the next `sync()` returns, the object survives a crash or a power loss: a new
  instance on the same location gets it back. What was put but not synced may be lost by a
  crash (local disk) or may already be durable (S3: a PUT is acknowledged only once stored);
  the region never relies on more than the first;
- a later `put` of the same key replaces the object; after `sync()` the new bytes are the
  durable ones (before it, a crash may give back the previous ones);
- `get` of a key that is not stored raises FileNotFoundError; `exists` says False;
- `delete` of a key that is not stored is not an error (deleting is idempotent);
- `keys()` lists every stored key, each once, and nothing deleted.

Keys are lowercase hex strings of even length (block ids, 64 digits): `LocalBackend` keeps
them as bytes (`bytes.fromhex`), so a key it cannot decode fails at `sync()`. Only an S3 store
takes other keys (the manifest publisher's `region.json`, `snapshots/...` under `meta/`).

Every method blocks; callers run them in worker threads, several at once, so every method
is thread-safe.

Extras that are not part of the protocol, used only where the concrete class is known:
`LocalBackend.layout_problem()`, `.pack_problems()` and `readonly` (check.py narrows with
`isinstance(backend, LocalBackend)`); `S3Backend.sibling()` and `.ensure_bucket()` (the store
and regionadmin.py construct an `S3Backend` themselves).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

# What `put` takes: one buffer, or pieces stored back to back as one object (a block's
# header, frame table and frames; a local store writes them with one pwritev).
Buffers = bytes | bytearray | memoryview | Sequence[bytes | memoryview]


def pieces(data: Buffers) -> list[bytes | bytearray | memoryview]:
    """`data` as a list of buffers."""
    if isinstance(data, bytes | bytearray | memoryview):
        return [data]
    return list(data)


def joined(data: Buffers) -> bytes:
    """`data` as one bytes (for stores that need one)."""
    if isinstance(data, bytes):
        return data
    return b"".join(pieces(data))


@runtime_checkable
class ObjectStore(Protocol):
    """Opaque objects under string keys; see the module docstring for the contract."""

    @property
    def remote(self) -> bool:
        """Whether I/O waits on a network: a region then runs object I/O under the store's
        wider I/O limiter rather than the CPU one. Constant for a store."""
        ...

    @property
    def interrupted(self) -> bool:
        """Whether `interrupt()` was called on this store (or on one sharing its interrupt,
        `S3Backend.sibling`) and it now refuses calls. Always False for a store whose
        `interrupt()` is a no-op (local disk)."""
        ...

    def put(self, key: str, data: Buffers) -> None:
        """Store `data` (bytes, or a sequence of pieces stored back to back) under `key`,
        replacing any object there. When it returns, `get(key)`
        gives `data` back; it is durable after the next `sync()` returns (or at once, on a
        store where a put is durable by itself). Raises StoreFull when the store is out of
        space (local disk)."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes as last put; FileNotFoundError if it is not stored. The bytes
        are not verified here: callers decode them, which rejects damaged ones."""
        ...

    def exists(self, key: str) -> bool:
        """Whether `get(key)` would find an object (put, synced or not, and not deleted)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a key that is not stored is not an error."""
        ...

    def delete_many(self, keys: Sequence[str], each: Callable[[], None] | None = None) -> None:
        """Remove every object of `keys` (missing ones are not an error). `each` is called
        once per key, after that object is gone (a fault point for the crash tests); a crash
        midway leaves some deleted and some not, which is why callers delete objects only
        after the index rows naming them."""
        ...

    def keys(self) -> Iterator[str]:
        """Every stored key, each once: what was put (synced or not) and not deleted."""
        ...

    def sync(self) -> None:
        """Make every object put so far durable (and every delete done so far, where that
        takes a sync). A no-op on a store whose puts are durable when they return."""
        ...

    def reclaim_unmapped(self) -> int:
        """Give back the space of bytes no object owns any more (appended by puts a crash
        cut off before their sync; overwritten objects). Only while no put runs: at mount,
        or from `check --repair`. Returns the bytes given back, for the log (callers
        ignore it); 0 where a put that did not return leaves nothing behind (S3)."""
        ...

    def interrupt(self) -> None:
        """The mount is stopping: end every wait on a server now. On a remote store every
        call after it that would talk to the server (put, get, exists, delete, delete_many,
        keys, destroy; on this store and its siblings) raises BackendUnavailable, and
        `interrupted` is True; `sync`, `reclaim_unmapped` and `close` still return. On
        local disk nothing waits that way and it is a no-op."""
        ...

    def close(self) -> None:
        """Release files and connections. Idempotent. It makes nothing durable: call
        `sync()` first. The store is not used after it (open a new instance)."""
        ...

    def destroy(self) -> None:
        """Remove every object at the store's location (the region is being deleted)."""
        ...
