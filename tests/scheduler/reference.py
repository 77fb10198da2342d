"""What the scheduler's results are checked against, computed without it: the fake model and
its reference generation, first-fit-decreasing written independently (shared with
test_packing.py), the K/V key of each position and the documented digest of each full block."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

from packserve.scheduler import SamplingParams, block_hash

VOCAB = 64
EOS = 0
NO_EOS: frozenset[int] = frozenset()


def next_token(context: Sequence[int]) -> int:
    """The fake model: a deterministic function of every token of the sequence so far."""
    return zlib.crc32(",".join(map(str, context)).encode()) % VOCAB


def reference(
    prompt: Sequence[int], params: SamplingParams, eos: Iterable[int], max_model_len: int
) -> tuple[list[int], str]:
    """What a request generates on its own, by the documented stop rules."""
    eos = set(eos)
    out: list[int] = []
    while True:
        token = next_token([*prompt, *out])
        out.append(token)
        if token in params.stop_token_ids or (token in eos and not params.ignore_eos):
            return out, "stop"
        if len(out) >= params.max_tokens or len(prompt) + len(out) >= max_model_len:
            return out, "length"


def descending(lengths: list[int]) -> list[int]:
    """Indices by decreasing length; equal lengths keep their input order."""
    order = list(range(len(lengths)))
    # Two stable sorts: by index, then by length descending.
    order.sort()
    order.sort(key=lambda i: lengths[i], reverse=True)
    return order


def reference_ffd(lengths: list[int], capacity: int) -> list[list[int]]:
    """A plain first-fit-decreasing, written independently of the implementation: items by
    decreasing length (ties: earlier first), each into the first bin with room."""
    bins: list[list[int]] = []
    for i in descending(lengths):
        for b in bins:
            if sum(lengths[j] for j in b) + lengths[i] <= capacity:
                b.append(i)
                break
        else:
            bins.append([i])
    return bins


def reference_rows(lengths: list[int], widest: int) -> list[list[int]]:
    """The documented row policy: FFD at the longest segment x 1, 2, 4, ... (capped at the
    widest row), keeping the first capacity with the fewest computed tokens."""
    if not lengths:
        return []
    best, best_cost = [], None
    capacity = max(lengths)
    while True:
        bins = reference_ffd(lengths, capacity)
        cost = len(bins) * max(sum(lengths[i] for i in b) for b in bins)
        if best_cost is None or cost < best_cost:
            best, best_cost = bins, cost
        if capacity >= widest:
            return best
        capacity = min(2 * capacity, widest)


def chain_keys(tokens: Sequence[int]) -> list[int]:
    """The key of the K/V at each position: a function of every token up to it."""
    keys, key = [], 0
    for token in tokens:
        key = hash((key, token))
        keys.append(key)
    return keys


def chain_digests(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """The documented identity of each full block of `tokens`: block_hash chained from b""."""
    digests, parent = [], b""
    for i in range(len(tokens) // block_size):
        parent = block_hash(parent, tokens[i * block_size : (i + 1) * block_size])
        digests.append(parent)
    return digests
