"""KV-block accounting: `BlockAllocator` (reference counts, the prefix-cache index, eviction
order), `block_hash` and `blocks_for`."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from packserve.scheduler import BlockAllocator, block_hash, blocks_for


@pytest.mark.parametrize(
    ("tokens", "block_size", "expected"),
    [
        (0, 16, 0),
        (1, 16, 1),
        (15, 16, 1),
        (16, 16, 1),
        (17, 16, 2),
        (32, 16, 2),
        (33, 16, 3),
        (5, 1, 5),
        (7, 3, 3),
    ],
)
def test_blocks_for_examples(tokens, block_size, expected):
    assert blocks_for(tokens, block_size) == expected


@given(st.integers(0, 10_000), st.integers(1, 512))
def test_blocks_for_is_the_smallest_cover(tokens, block_size):
    n = blocks_for(tokens, block_size)
    assert n >= 0
    assert n * block_size >= tokens  # enough room
    assert (n - 1) * block_size < tokens or n == 0  # and not a block more


# -- block_hash ---------------------------------------------------------------------------------


def test_block_hash_is_a_deterministic_128_bit_digest():
    digest = block_hash(b"", [1, 2, 3])
    assert isinstance(digest, bytes) and len(digest) == 16
    assert block_hash(b"", (1, 2, 3)) == digest


def test_block_hash_depends_on_the_parent_and_on_every_token_in_order():
    root = block_hash(b"", [1, 2])
    digests = {
        root,
        block_hash(b"", [2, 1]),  # order
        block_hash(b"", [1, 3]),  # a token
        block_hash(b"", [1]),  # a token fewer
        block_hash(b"", [1, 2, 0]),  # a token more (0 is no padding)
        block_hash(b"", [258]),  # no two tokens read as one
        block_hash(root, [1, 2]),  # the same tokens after another prefix
        block_hash(block_hash(b"", [3, 4]), [1, 2]),
    }
    assert len(digests) == 8


@given(
    st.lists(st.integers(0, 2**31), min_size=1, max_size=8),
    st.lists(st.integers(0, 2**31), min_size=1, max_size=8),
)
def test_block_hash_chains_tell_prefixes_apart(a, b):
    # Two chains of one block each over different tokens, or with different parents, differ.
    assert (block_hash(b"", a) == block_hash(b"", b)) == (a == b)
    parent_a, parent_b = block_hash(b"", a), block_hash(b"", b)
    assert (block_hash(parent_a, [7]) == block_hash(parent_b, [7])) == (a == b)


# -- allocation and reference counts ------------------------------------------------------------


def test_fresh_allocator_is_all_free():
    alloc = BlockAllocator(10)
    assert alloc.num_blocks == 10
    assert alloc.num_free == 10
    assert alloc.num_used == 0 and alloc.num_cached == 0
    assert alloc.ref_counts == [0] * 10
    assert all(alloc.is_free(b) for b in range(10))


def test_allocate_and_free_accounting():
    alloc = BlockAllocator(10)
    a = alloc.allocate(3)
    b = alloc.allocate(4)
    assert len(a) == 3 and len(b) == 4
    assert len(set(a) | set(b)) == 7
    assert all(0 <= x < 10 for x in a + b)
    assert all(alloc.ref_counts[x] == 1 and not alloc.is_free(x) for x in a + b)
    assert alloc.num_free == 3 and alloc.num_used == 7
    alloc.free(a)
    assert alloc.num_free == 6 and alloc.num_used == 4
    assert all(alloc.ref_counts[x] == 0 and alloc.is_free(x) for x in a)
    c = alloc.allocate(6)
    assert not set(c) & set(b)
    assert set(c) | set(b) == set(range(10))
    assert alloc.num_free == 0


def test_allocate_zero_is_a_no_op():
    alloc = BlockAllocator(4)
    assert alloc.allocate(0) == []
    assert alloc.num_free == 4


def test_allocating_the_whole_pool_yields_every_id_once():
    alloc = BlockAllocator(7)
    assert sorted(alloc.allocate(7)) == list(range(7))
    assert alloc.num_free == 0


def test_over_allocation_raises_and_changes_nothing():
    alloc = BlockAllocator(5)
    held = alloc.allocate(3)
    with pytest.raises(RuntimeError):
        alloc.allocate(3)
    assert alloc.num_free == 2
    # The two remaining blocks are still there, and distinct from the held ones.
    rest = alloc.allocate(2)
    assert set(rest) | set(held) == set(range(5))
    with pytest.raises(RuntimeError):
        alloc.allocate(1)


def test_empty_pool_raises():
    with pytest.raises(RuntimeError):
        BlockAllocator(0).allocate(1)


def test_freed_blocks_are_reused_first():
    alloc = BlockAllocator(8)
    first = alloc.allocate(3)
    alloc.allocate(2)
    alloc.free(first)
    assert set(alloc.allocate(3)) == set(first)


def test_a_shared_block_is_free_only_once_every_holder_freed_it():
    alloc = BlockAllocator(4)
    [b] = alloc.allocate(1)
    alloc.register(b, block_hash(b"", [1]))
    alloc.share([b])
    alloc.share([b])
    assert alloc.ref_counts[b] == 3 and alloc.num_used == 1
    for left in (2, 1):
        alloc.free([b])
        assert alloc.ref_counts[b] == left and not alloc.is_free(b)
        assert b not in alloc.allocate(3)  # never handed out while referenced
        alloc.free([x for x in range(4) if x != b])
    alloc.free([b])
    assert alloc.ref_counts[b] == 0 and alloc.is_free(b) and alloc.num_free == 4


def test_sharing_a_free_cached_block_takes_it_off_the_free_list():
    alloc = BlockAllocator(3)
    [b] = alloc.allocate(1)
    digest = block_hash(b"", [1])
    alloc.register(b, digest)
    alloc.free([b])
    assert alloc.is_free(b) and alloc.num_free == 3 and alloc.lookup([digest]) == [b]
    alloc.share([b])  # a prefix hit on a free cached block
    assert alloc.ref_counts[b] == 1 and not alloc.is_free(b) and alloc.num_free == 2
    assert b not in alloc.allocate(2)
    assert alloc.lookup([digest]) == [b]


# -- the index ---------------------------------------------------------------------------------


def test_register_and_lookup():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(3)
    d0 = block_hash(b"", [1, 2])
    d1 = block_hash(d0, [3, 4])
    d2 = block_hash(d1, [5, 6])
    assert alloc.lookup([d0, d1, d2]) == []
    for b, d in zip(blocks, (d0, d1, d2), strict=True):
        alloc.register(b, d)
    assert alloc.num_cached == 3
    assert alloc.lookup([d0, d1, d2]) == blocks
    assert alloc.lookup([d0, d1]) == blocks[:2]
    assert alloc.lookup([d1]) == [blocks[1]]  # a digest names its block on its own
    assert alloc.lookup([]) == []


def test_lookup_stops_at_the_first_miss():
    alloc = BlockAllocator(4)
    b0, b1, b2 = alloc.allocate(3)
    d0, d1, d2 = (block_hash(b"", [i]) for i in range(3))
    alloc.register(b0, d0)
    alloc.register(b2, d2)
    assert alloc.lookup([d0, d1, d2]) == [b0]
    assert alloc.lookup([d1, d0]) == []


def test_register_keeps_the_first_block_for_a_digest():
    alloc = BlockAllocator(4)
    first, second = alloc.allocate(2)
    digest = block_hash(b"", [9, 9])
    alloc.register(first, digest)
    alloc.register(second, digest)  # computed the same prefix meanwhile: a private copy
    assert alloc.lookup([digest]) == [first] and alloc.num_cached == 1
    alloc.free([first, second])
    # The private copy holds nothing reusable: it is the first to go, the cached one last.
    assert alloc.allocate(1) == [second]
    assert alloc.allocate(2)[-1] != first
    assert alloc.lookup([digest]) == [first]


def test_a_block_is_registered_under_one_digest():
    alloc = BlockAllocator(2)
    [b] = alloc.allocate(1)
    d1, d2 = block_hash(b"", [1]), block_hash(b"", [2])
    alloc.register(b, d1)
    alloc.register(b, d2)
    assert alloc.lookup([d1]) == [b] and alloc.lookup([d2]) == [] and alloc.num_cached == 1


def test_eviction_order_unregistered_first_then_least_recently_released():
    alloc = BlockAllocator(8)
    a = alloc.allocate(3)
    b = alloc.allocate(3)
    never_used = sorted(set(range(8)) - set(a) - set(b))
    chains = {}
    for name, blocks in (("a", a), ("b", b)):
        parent = b""
        chains[name] = []
        for i, block in enumerate(blocks):
            parent = block_hash(parent, [ord(name), i])
            chains[name].append(parent)
            alloc.register(block, parent)
    alloc.free(a)  # released first: its blocks go first, its first block last of them
    alloc.free(b)
    [c] = alloc.allocate(1)
    alloc.free([c])  # unregistered: back to the front
    taken = [alloc.allocate(1)[0] for _ in range(8)]
    assert sorted(taken[:2]) == never_used
    assert taken[2:] == [a[2], a[1], a[0], b[2], b[1], b[0]]


def test_eviction_drops_the_block_from_the_index():
    alloc = BlockAllocator(3)
    blocks = alloc.allocate(3)
    d0 = block_hash(b"", [1])
    d1 = block_hash(d0, [2])
    alloc.register(blocks[0], d0)
    alloc.register(blocks[1], d1)
    alloc.free(blocks)
    assert alloc.num_cached == 2 and alloc.lookup([d0, d1]) == blocks[:2]
    assert alloc.allocate(1) == [blocks[2]]  # unregistered: nothing evicted
    assert alloc.num_cached == 2
    assert alloc.allocate(1) == [blocks[1]]  # the chain's last block goes first
    assert alloc.num_cached == 1 and alloc.lookup([d0, d1]) == [blocks[0]]
    alloc.register(blocks[1], block_hash(b"", [3]))  # the evicted block, reused and re-cached
    assert alloc.lookup([block_hash(b"", [3])]) == [blocks[1]]
    assert alloc.lookup([d1]) == []


def test_a_reused_cached_block_counts_as_released_when_freed_again():
    alloc = BlockAllocator(4)
    a = alloc.allocate(2)
    b = alloc.allocate(2)
    for i, block in enumerate(a + b):
        alloc.register(block, block_hash(b"", [i]))
    alloc.free(a)
    alloc.free(b)
    alloc.share(a[:1])  # a hit on a's first block, released again after b's
    alloc.free(a[:1])
    assert [alloc.allocate(1)[0] for _ in range(4)] == [a[1], b[1], b[0], a[0]]


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/share/register/free sequences against a model: each holder's blocks,
    the digest each registered block stands for, and when each free block was released."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 10
        self.alloc = BlockAllocator(self.size)
        self.held: list[list[int]] = []  # one list per holder (a request's table)
        self.digest_of: dict[int, bytes] = {}  # registered block -> its digest
        self.released = dict.fromkeys(range(self.size), 0)  # free block -> release time
        self.clock = 0
        self.next_token = 0

    def refs(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for group in self.held:
            for b in group:
                counts[b] = counts.get(b, 0) + 1
        return counts

    @rule(n=st.integers(0, 12))
    def allocate(self, n):
        free_before = self.alloc.num_free
        if n > free_before:
            with pytest.raises(RuntimeError):
                self.alloc.allocate(n)
            assert self.alloc.num_free == free_before
            return
        ids = self.alloc.allocate(n)
        assert len(ids) == len(set(ids)) == n
        for b in ids:
            assert b in self.released, "handed out a block that is still referenced"
            # Unregistered free blocks go first, then the least recently released.
            unregistered = [x for x in self.released if x not in self.digest_of]
            if unregistered:
                assert b in unregistered
            else:
                assert self.released[b] == min(self.released.values())
            del self.released[b]
            self.digest_of.pop(b, None)  # evicted
        self.held.append(ids)

    @precondition(lambda self: self.digest_of)
    @rule(data=st.data())
    def share(self, data):
        cached = sorted(self.digest_of)
        blocks = data.draw(st.lists(st.sampled_from(cached), min_size=1, max_size=3, unique=True))
        self.alloc.share(blocks)
        for b in blocks:
            self.released.pop(b, None)
        self.held.append(blocks)

    @precondition(lambda self: any(self.held))
    @rule(data=st.data(), reuse=st.booleans())
    def register(self, data, reuse):
        b = data.draw(st.sampled_from([x for group in self.held for x in group]))
        if reuse and self.digest_of:  # a digest already registered keeps its block
            digest = data.draw(st.sampled_from(sorted(self.digest_of.values())))
        else:
            self.next_token += 1
            digest = block_hash(b"", [self.next_token])
        self.alloc.register(b, digest)
        if b not in self.digest_of and digest not in self.digest_of.values():
            self.digest_of[b] = digest

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free(self, data):
        k = data.draw(st.integers(0, len(self.held) - 1))
        group = self.held.pop(k)
        self.alloc.free(group)
        refs = self.refs()
        for b in reversed(group):  # a table's first blocks are released last
            if b not in refs:
                self.clock += 1
                self.released[b] = self.clock

    @invariant()
    def accounting(self):
        refs = self.refs()
        assert self.alloc.ref_counts == [refs.get(b, 0) for b in range(self.size)]
        assert all(self.alloc.is_free(b) == (b not in refs) for b in range(self.size))
        assert set(self.released) == set(range(self.size)) - set(refs)
        assert self.alloc.num_used == len(refs)
        assert self.alloc.num_used + self.alloc.num_free == self.size
        assert self.alloc.num_cached == len(self.digest_of)
        for b, digest in self.digest_of.items():
            assert self.alloc.lookup([digest]) == [b]

    def teardown(self):
        for group in self.held:
            self.alloc.free(group)
        assert self.alloc.num_free == self.size
        assert sorted(self.alloc.allocate(self.size)) == list(range(self.size))
        assert self.alloc.num_cached == 0


AllocatorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40)
test_allocator_state_machine = AllocatorMachine.TestCase
