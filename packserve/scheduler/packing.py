"""First-fit-decreasing bin packing of prompts into prefill rows (the Prepacking method)."""

from __future__ import annotations


def pack_ffd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Pack items into as few bins of `capacity` as first-fit-decreasing finds.

    Returns bins as lists of indices into `lengths`. Items are visited longest first (ties by
    index, so the result is deterministic); each goes into the first bin with room, or opens a
    new bin. Every item must fit a bin on its own.
    """
    if any(n > capacity or n < 1 for n in lengths):
        raise ValueError(f"every length must be in 1..{capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []  # capacity left in each bin
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def row_cost(lengths: list[int], bins: list[list[int]]) -> int:
    """Tokens a step computes for these rows: every row is padded to the longest one."""
    return len(bins) * max((sum(lengths[i] for i in row) for row in bins), default=0)


def pack_rows(lengths: list[int], max_capacity: int) -> list[list[int]]:
    """FFD at the row capacity that computes the fewest tokens.

    Rows are padded to the longest row, so a step costs rows x longest row. Capacity = the
    longest prompt never costs more than classic padding (at worst one prompt per row, each
    padded to the longest prompt); wider rows cost less when many prompts are short. Tries
    the longest prompt times 1, 2, 4, ... up to `max_capacity`; a tie goes to the narrower
    rows, which cost less attention.
    """
    if not lengths:
        return []
    capacity = max(lengths)
    best = pack_ffd(lengths, capacity)
    while capacity < max_capacity:
        capacity = min(2 * capacity, max_capacity)
        bins = pack_ffd(lengths, capacity)
        if row_cost(lengths, bins) < row_cost(lengths, best):
            best = bins
    return best
