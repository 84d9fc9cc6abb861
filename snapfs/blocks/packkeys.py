"""The region's side of packed objects on a bucket: which key an object is under, and the
AEAD of the trailer sections that list encrypted blocks (objects/s3packs.py asks through
its `TrailerSealer` protocol, so the object layer never reads block headers or keys)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag

from snapfs.errors import BlockCorrupt
from snapfs.formats import codec
from snapfs.objects.s3packs import PLAIN

if TYPE_CHECKING:
    from snapfs.meta.keys import BlockKeys


class TrailerKeys:
    """A `TrailerSealer` over the region's keys (`keys_for`: key id bytes -> BlockKeys,
    callable from worker threads once the key is loaded)."""

    def __init__(self, keys_for: Callable[[bytes], BlockKeys]):
        self._keys_for = keys_for

    def group(self, head: bytes) -> bytes:
        return codec.key_id_of(head) or PLAIN

    def seal(self, group: bytes, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        return self._keys_for(group).pack_aead.encrypt(nonce, body, aad)

    def open(self, group: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
        try:
            return self._keys_for(group).pack_aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise BlockCorrupt("a pack trailer section fails authentication") from None
