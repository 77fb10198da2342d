"""KV-block accounting: `BlockAllocator` and `blocks_for`."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from packserve.scheduler import BlockAllocator, blocks_for


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


def test_fresh_allocator_is_all_free():
    alloc = BlockAllocator(10)
    assert alloc.num_blocks == 10
    assert alloc.num_free == 10
    assert alloc.num_used == 0


def test_allocate_and_free_accounting():
    alloc = BlockAllocator(10)
    a = alloc.allocate(3)
    b = alloc.allocate(4)
    assert len(a) == 3 and len(b) == 4
    assert len(set(a) | set(b)) == 7
    assert all(0 <= x < 10 for x in a + b)
    assert alloc.num_free == 3 and alloc.num_used == 7
    alloc.free(a)
    assert alloc.num_free == 6 and alloc.num_used == 4
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


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free sequences against a model: the set of held ids."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 12
        self.alloc = BlockAllocator(self.size)
        self.held: list[list[int]] = []

    @rule(n=st.integers(0, 14))
    def allocate(self, n):
        free_before = self.alloc.num_free
        if n > free_before:
            with pytest.raises(RuntimeError):
                self.alloc.allocate(n)
            assert self.alloc.num_free == free_before
            return
        ids = self.alloc.allocate(n)
        assert len(ids) == n
        already = {x for group in self.held for x in group}
        assert not set(ids) & already, "handed out a block that is still held"
        self.held.append(ids)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free(self, data):
        k = data.draw(st.integers(0, len(self.held) - 1))
        self.alloc.free(self.held.pop(k))

    @invariant()
    def accounting(self):
        flat = [x for group in self.held for x in group]
        assert len(flat) == len(set(flat))
        assert all(0 <= x < self.size for x in flat)
        assert self.alloc.num_used == len(flat)
        assert self.alloc.num_used + self.alloc.num_free == self.size

    def teardown(self):
        for group in self.held:
            self.alloc.free(group)
        assert self.alloc.num_free == self.size
        assert sorted(self.alloc.allocate(self.size)) == list(range(self.size))


AllocatorMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30)
test_allocator_state_machine = AllocatorMachine.TestCase
