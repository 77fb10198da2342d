"""Property tests of first-fit-decreasing packing (`pack_ffd`)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packserve.scheduler import pack_ffd, pack_rows, row_cost

from .reference import descending, reference_ffd


@st.composite
def instances(draw, max_items: int = 40, max_capacity: int = 64):
    """A capacity and a list of item lengths, each of which fits a bin on its own."""
    capacity = draw(st.integers(1, max_capacity))
    lengths = draw(st.lists(st.integers(1, capacity), max_size=max_items))
    return lengths, capacity


def check_first_fit_decreasing(bins: list[list[int]], lengths: list[int], capacity: int) -> None:
    """Replay the placement in descending order and check each item's bin was the first with room.

    Bins are expected in the order they were opened, and each bin's items in placement order.
    """
    where = {i: (b, k) for b, row in enumerate(bins) for k, i in enumerate(row)}
    load = [0] * len(bins)
    placed = [0] * len(bins)  # items placed so far in each bin
    opened = 0
    for i in descending(lengths):
        b, k = where[i]
        n = lengths[i]
        for earlier in range(min(b, opened)):
            assert load[earlier] + n > capacity, (
                f"item {i} (len {n}) went to bin {b} but fit earlier bin {earlier}"
            )
        if b < opened:
            assert load[b] + n <= capacity
        else:
            assert b == opened, f"item {i} opened bin {b} while only {opened} bins were open"
            opened += 1
        assert k == placed[b], f"item {i} is out of placement order in bin {b}"
        placed[b] += 1
        load[b] += n
    assert opened == len(bins)


def brute_force_opt(lengths: list[int], capacity: int) -> int:
    """The minimum number of bins, by exhaustive search (small inputs only)."""
    items = sorted(lengths, reverse=True)
    best = len(items)

    def place(k: int, loads: list[int]) -> None:
        nonlocal best
        if len(loads) >= best:
            return
        if k == len(items):
            best = len(loads)
            return
        seen = set()
        for b in range(len(loads)):
            if loads[b] + items[k] <= capacity and loads[b] not in seen:
                seen.add(loads[b])
                loads[b] += items[k]
                place(k + 1, loads)
                loads[b] -= items[k]
        loads.append(items[k])
        place(k + 1, loads)
        loads.pop()

    place(0, [])
    return best


@given(instances())
def test_no_bin_over_capacity(inst):
    lengths, capacity = inst
    for b in pack_ffd(lengths, capacity):
        assert b, "empty bin"
        assert sum(lengths[i] for i in b) <= capacity


@given(instances())
def test_every_item_placed_exactly_once(inst):
    lengths, capacity = inst
    placed = [i for b in pack_ffd(lengths, capacity) for i in b]
    assert sorted(placed) == list(range(len(lengths)))


@given(instances())
def test_matches_first_fit_over_descending_order(inst):
    lengths, capacity = inst
    bins = pack_ffd(lengths, capacity)
    check_first_fit_decreasing(bins, lengths, capacity)
    assert bins == reference_ffd(lengths, capacity)


@given(instances())
def test_never_more_bins_than_items(inst):
    lengths, capacity = inst
    assert len(pack_ffd(lengths, capacity)) <= len(lengths)


@given(instances())
def test_deterministic_and_input_untouched(inst):
    lengths, capacity = inst
    before = list(lengths)
    first = pack_ffd(lengths, capacity)
    assert lengths == before
    assert pack_ffd(list(lengths), capacity) == first


@given(instances())
def test_bin_count_bounds(inst):
    lengths, capacity = inst
    bins = pack_ffd(lengths, capacity)
    lower = math.ceil(sum(lengths) / capacity)
    assert lower <= len(bins) <= 2 * lower
    # The first-fit property behind the upper bound: no two bins could have been merged.
    loads = [sum(lengths[i] for i in b) for b in bins]
    for a in range(len(loads)):
        for b in range(a + 1, len(loads)):
            assert loads[a] + loads[b] > capacity


@settings(max_examples=60)
@given(instances(max_items=8, max_capacity=20))
def test_within_ffd_worst_case_of_optimum(inst):
    # Dosa (2007): FFD(I) <= 11/9 OPT(I) + 6/9, and the bound is tight.
    lengths, capacity = inst
    opt = brute_force_opt(lengths, capacity)
    ffd = len(pack_ffd(lengths, capacity))
    assert opt <= ffd
    assert 9 * ffd <= 11 * opt + 6


@given(st.integers(1, 50), st.integers(1, 20))
def test_equal_items_fill_bins_in_index_order(capacity, count):
    # Ties break by index: with equal lengths the bins are consecutive runs of indices.
    size = max(1, capacity // 3)
    per_bin = capacity // size
    bins = pack_ffd([size] * count, capacity)
    expected = [list(range(s, min(s + per_bin, count))) for s in range(0, count, per_bin)]
    assert bins == expected


def test_empty_input():
    assert pack_ffd([], 8) == []


def test_known_instance():
    # Sorted: 6(i0) 5(i3) 4(i1) 3(i4) 2(i2) 2(i5), capacity 8.
    # 6 -> bin0; 5 -> bin1; 4 -> bin2; 3 -> bin1 (5+3); 2 -> bin0 (6+2); 2 -> bin2 (4+2).
    assert pack_ffd([6, 4, 2, 5, 3, 2], 8) == [[0, 2], [3, 4], [1, 5]]


@pytest.mark.parametrize(
    "lengths",
    [[0], [3, 0, 2], [9], [1, 9, 1], [-1], [8, 8, 100]],
)
def test_invalid_lengths_raise(lengths):
    with pytest.raises(ValueError):
        pack_ffd(lengths, 8)


def test_item_exactly_capacity_is_allowed():
    assert pack_ffd([8, 8, 1], 8) == [[0], [1], [2]]


@given(
    st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=80),
    st.integers(min_value=300, max_value=4096),
)
def test_pack_rows_never_costs_more_than_padding_or_widest_ffd(lengths, widest):
    bins = pack_rows(lengths, widest)
    assert sorted(i for row in bins for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= widest for row in bins)
    padded = len(lengths) * max(lengths)  # classic batching: one prompt per row
    assert row_cost(lengths, bins) <= padded
    assert row_cost(lengths, bins) <= row_cost(lengths, pack_ffd(lengths, widest))


def test_pack_rows_prefers_rows_of_the_longest_prompt_over_wide_half_empty_rows():
    # The dashboard's case: 130 + 120 in a 256 row and 120 alone costs 2 x 250 = 500 tokens,
    # more than padding (3 x 130 = 390). Rows of 130 cost 390 at most.
    lengths = [130, 120, 120]
    assert row_cost(lengths, pack_ffd(lengths, 256)) == 500
    assert row_cost(lengths, pack_rows(lengths, 256)) == 390
