"""The paged decode kernel (kernels/native.py): attention read through block tables, in place."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def paged(kernels):
    return kernels.paged_decode


def scattered_pool(g, lengths, kv_heads, dim, block_size, dtype):
    """A pool of K/V with each sequence's blocks scattered through it (and blocks nobody owns
    between them, full of large values: reading past a length or off the table shows)."""
    widths = [-(-n // block_size) for n in lengths]
    num_blocks = 2 * sum(widths) + 3
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lengths), max(widths), dtype=torch.int32)
    used = 0
    for i, w in enumerate(widths):
        tables[i, :w] = order[used : used + w]
        used += w
    shape = (num_blocks * block_size, kv_heads, dim)
    k_pool = torch.full(shape, 1e4).to(dtype)
    v_pool = torch.full(shape, 1e4).to(dtype)
    for i, n in enumerate(lengths):
        pos = torch.arange(n)
        slots = tables[i, pos // block_size].long() * block_size + pos % block_size
        k_pool[slots] = torch.randn(n, kv_heads, dim, generator=g).to(dtype)
        v_pool[slots] = torch.randn(n, kv_heads, dim, generator=g).to(dtype)
    return k_pool, v_pool, tables


def reference(q, k_pool, v_pool, tables, lengths, block_size, scale):
    """Each sequence alone, in float64, over its context gathered through its table."""
    out = []
    heads, kv_heads = q.shape[1], k_pool.shape[1]
    for i, n in enumerate(lengths):
        pos = torch.arange(n)
        slots = tables[i, pos // block_size].long() * block_size + pos % block_size
        k = k_pool[slots].double().repeat_interleave(heads // kv_heads, dim=1)  # [n, H, D]
        v = v_pool[slots].double().repeat_interleave(heads // kv_heads, dim=1)
        probs = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), k) * scale, dim=-1)
        out.append(torch.einsum("hn,nhd->hd", probs, v))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [(9, 3, 64, 8), (8, 4, 32, 16), (6, 1, 48, 1), (10, 2, 128, 5), (4, 4, 16, 8)],
    ids=["smollm2", "tiny", "mqa-dim48", "group5-dim128", "mha-dim16"],
)
@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)],
    ids=["float32", "bfloat16", "float16"],
)
def test_paged_decode_equals_attention_over_the_gathered_context(
    paged, heads, kv_heads, dim, block_size, dtype, tolerance
):
    """Head sizes with and without the vectorized path, group sizes over the kernel's chunk
    of 4, lengths from 1 to past several 16-token runs: each sequence attends exactly to its
    own tokens (the large values elsewhere in the pool never leak in)."""
    g = torch.Generator().manual_seed(dim + heads)
    lengths = [1, 2, 15, 16, 17, 40, 100, 257]
    k_pool, v_pool, tables = scattered_pool(g, lengths, kv_heads, dim, block_size, dtype)
    q = torch.randn(len(lengths), heads, dim, generator=g).to(dtype)
    scale = dim**-0.5
    got = paged(
        q, k_pool, v_pool, tables, torch.tensor(lengths, dtype=torch.int32), block_size, scale
    )
    assert got.shape == q.shape and got.dtype == dtype
    want = reference(q, k_pool, v_pool, tables, lengths, block_size, scale)
    torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sequence_computes_the_same_bits_in_any_batch_and_on_any_thread_count(paged, dtype):
    """Each sequence runs start to end on one thread in a fixed order: alone, in a batch of
    others, in another order, on one thread or two, its output is the same to the bit."""
    g = torch.Generator().manual_seed(1)
    lengths = [300, 7, 64, 129, 1, 33, 250, 16]
    k_pool, v_pool, tables = scattered_pool(g, lengths, 3, 64, 8, dtype)
    q = torch.randn(len(lengths), 9, 64, generator=g).to(dtype)
    length = torch.tensor(lengths, dtype=torch.int32)

    def run(rows):
        return paged(q[rows], k_pool, v_pool, tables[rows], length[rows], 8, 0.125)

    everything = run(list(range(len(lengths))))
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for i in range(len(lengths)):
                assert torch.equal(run([i])[0], everything[i])
            backwards = list(reversed(range(len(lengths))))
            assert torch.equal(run(backwards), everything[backwards])
    finally:
        torch.set_num_threads(threads)
