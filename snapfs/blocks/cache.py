"""A bounded LRU cache of decoded block plaintext, shared by all readers of a store.

Reads arrive in pieces smaller than a block (256 KiB from `cp`, 128 KiB from many tools), so
each block would be decoded several times without it; read-ahead fills it before the reader
asks. Keyed by block id, so identical blocks of different snapshots share one entry.

Since sealed snapshots are read through the kernel's page cache (issue 15), repeated reads
of the same bytes no longer reach it; what remains its job, and why 64 MiB (`CACHE_BYTES`)
stays enough: a block decoded once for the several requests the kernel splits it into, the
daemon's read-ahead (8 blocks per sequential reader), single 64 KiB frames of random reads
(until read-around hands them to the page cache), the bases of delta reads (day 1's block
while day 2 is read), content a writer reads back for a partial block write, and reads of
`creating` and `copying` snapshots, which stay direct_io.
"""

from __future__ import annotations

from collections import OrderedDict

# A writer hands its block buffer (a bytearray) over when it stores the block and never
# writes it again, so it is cached as it is, without a copy of 512 KiB per block.
Plaintext = bytes | bytearray


class BlockCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[bytes, Plaintext] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __contains__(self, block_id: bytes) -> bool:
        return block_id in self._entries

    def get(self, block_id: bytes) -> Plaintext | None:
        plain = self._entries.get(block_id)
        if plain is None:
            self.misses += 1
            return None
        self._entries.move_to_end(block_id)
        self.hits += 1
        return plain

    def put(self, block_id: bytes, plain: Plaintext) -> None:
        if len(plain) > self.max_bytes:
            return
        old = self._entries.pop(block_id, None)
        if old is not None:
            self.size -= len(old)
        self._entries[block_id] = plain
        self.size += len(plain)
        while self.size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.size -= len(evicted)

    def discard(self, block_id: bytes) -> None:
        old = self._entries.pop(block_id, None)
        if old is not None:
            self.size -= len(old)
