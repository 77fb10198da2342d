"""KV-cache accounting: reference-counted blocks and the prefix-cache index. Owns no tensor.

A full block's identity is a chained digest of its tokens: `block_hash(parent, tokens)` covers
every token from position 0 to the block's end, so two blocks with one digest hold the K/V of
one token prefix (at the same positions). Blocks whose K/V is complete are registered under
their digest; a new request reuses the longest registered prefix of its own digests. Blocks
are shared by reference count; a block nobody references is free, and a free block that is
still registered keeps its K/V until the pool needs it (least recently released first).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The digest of a block holding `token_ids` after the prefix whose digest is `parent`
    (b"" for the first block). BLAKE2b-128 over the parent's digest and the tokens: unlike
    Python's hash of a tuple of ints, a collision (two prefixes sharing a block's K/V) can
    not be crafted by a client."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockAllocator:
    """Hands out KV block ids from a fixed pool (the runner's tensors are indexed by them),
    counts their references and keeps the prefix-cache index."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks  # registered blocks' digests
        self._cached: dict[bytes, int] = {}  # digest -> registered block
        # Unreferenced blocks, in eviction order: unregistered ones first (they hold nothing
        # reusable), then registered ones, least recently released first.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks nobody references (registered ones among them are evicted when taken)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Registered blocks, referenced or not."""
        return len(self._cached)

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (evicting registered ones last); raises if fewer are free
        (callers check `num_free` first)."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        taken = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            digest = self._hash_of[block_id]
            if digest is not None:  # evicted: its K/V is about to be overwritten
                del self._cached[digest]
                self._hash_of[block_id] = None
            self.ref_counts[block_id] = 1
            taken.append(block_id)
        return taken

    def lookup(self, digests: Sequence[bytes]) -> list[int]:
        """The registered blocks of the longest prefix of `digests` (a request's chain)."""
        found = []
        for digest in digests:
            block_id = self._cached.get(digest)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def share(self, block_ids: Sequence[int]) -> None:
        """Take one more reference to each of these registered blocks (a prefix hit)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self._free[block_id]
            self.ref_counts[block_id] += 1

    def register(self, block_id: int, digest: bytes) -> None:
        """Record that `block_id` holds the complete K/V of the prefix `digest`. A digest
        already registered keeps its block (this one stays a private copy)."""
        if digest not in self._cached and self._hash_of[block_id] is None:
            self._cached[digest] = block_id
            self._hash_of[block_id] = digest

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block. A block left unreferenced becomes free: a
        registered one at the back of the eviction order (a sequence's first blocks, released
        last, are evicted last), an unregistered one at the front."""
        for block_id in reversed(block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free[block_id] = None
                if self._hash_of[block_id] is None:
                    self._free.move_to_end(block_id, last=False)
