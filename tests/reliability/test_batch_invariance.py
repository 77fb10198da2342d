"""Where batching may change a greedy output in the default mode, and where it may not.

In the default mode CPU kernels pick their blocking and reduction order from the batch's
shape, so a request's logits move by float rounding (~1e-5) with its batch neighbours. The
contract: the batched logprobs equal the prompt-alone ones up to that rounding, and a greedy
output may leave the prompt-alone output only where the two best candidates are that close
(a near-tie). Nothing here pins one machine's rounding: no fixed prompt, position or tie is
expected; whichever divergences this CPU produces are checked against the contract.
(`--batch-invariant` removes the exception; tests/kernels/test_batch_invariant.py.)"""

from __future__ import annotations

import random

import pytest

from packserve.scheduler import SamplingParams

# Largest logprob difference batching may cause. Measured differences are ~2e-5 on the tiny
# model (both linear backends); this leaves room for other CPUs and deeper models while
# still far below the gaps of ordinary greedy choices (median ~0.3 on the tiny model).
ROUNDING = 1e-3
WORDS = ["river", "stone", "light", "window", "paper", "garden", "music", "silver", "engine"]


def chat_prompts(chat_ids, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        chat_ids([{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 120)))}])
        for _ in range(count)
    ]


@pytest.mark.parametrize("linear_backend", ["torch", "onednn"])
def test_batched_greedy_leaves_alone_only_at_a_near_tie(make_engine, chat_ids, linear_backend):
    engine = make_engine(linear_backend=linear_backend)
    prompts = chat_prompts(chat_ids, 48, seed=107)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    alone = [engine.generate([p], params)[0] for p in prompts]
    batched = engine.generate(prompts, params)
    diverged = 0
    for a, b in zip(alone, batched, strict=True):
        for i, (x, y) in enumerate(zip(a.logprobs, b.logprobs, strict=True)):
            lead = x.top[0][1] - x.top[1][1]
            if a.token_ids[i] != b.token_ids[i]:
                # the first divergence: the prompt alone had a near-tie there
                assert lead <= 2 * ROUNDING, f"diverged at token {i} with a lead of {lead}"
                diverged += 1
                break
            assert abs(x.logprob - y.logprob) <= ROUNDING, f"token {i}: {x} vs {y}"
            for (_, lx), (_, ly) in zip(x.top, y.top, strict=True):
                assert abs(lx - ly) <= ROUNDING or lead <= 2 * ROUNDING, (i, x, y)
    assert diverged <= len(prompts) // 8, "divergence is meant to be the rare near-tie"
