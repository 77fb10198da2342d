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
