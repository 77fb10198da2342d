"""Where batching may change a greedy output, and where it may not.

bench/stress.py found one prompt of 512 (request 107 of seed 512, a chat request) whose greedy
output changed with its batch neighbours. At its 11th generated token two candidates have
exactly the same float32 logit when the prompt runs alone (the lower id wins, as in
transformers `generate`); batched, CPU matmul kernels round differently for other batch
shapes, the logits move by an ulp and the other candidate wins. Batch-invariant kernels would
remove this; until then the contract is: batched greedy output equals the prompt alone up to
the first exact tie (top-2 logprobs equal to float rounding), never diverging anywhere else.
The tie is exact with the model's own linear layers (`linear_backend="torch"`, MKL); with
oneDNN's (the server's default) the two logits there differ by ~2e-6. This test pins the
contract on both, and the exact tie on the first, deterministically."""

from __future__ import annotations

import pytest
import torch

from packserve.scheduler import SamplingParams

CONTENT = (
    "Stress chat 107: window river light river stone engine light garden silver silver river "
    "garden window stone light window river garden silver paper paper window river stone "
    "engine music light engine"
)
MESSAGES = [{"role": "user", "content": CONTENT}]
TIE_AT = 10  # the generated token whose two best logits are equal when the prompt runs alone
COMPANION = [7, 8, 9, 10, 11, 12]


@pytest.mark.parametrize("linear_backend", ["torch", "onednn"])
def test_greedy_output_with_an_exact_tie_is_the_same_batched(
    make_engine, linear_backend, chat_ids, tok
):
    engine = make_engine(linear_backend=linear_backend)
    ids = chat_ids(MESSAGES)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reliability servers and the offline engine run
    try:
        alone = engine.generate([ids], params)[0]
        batched = engine.generate([ids, COMPANION], params)[0]
    finally:
        torch.set_num_threads(threads)
    tie = alone.logprobs[TIE_AT].top
    if linear_backend == "torch":
        assert tie[0][1] == tie[1][1], f"no exact tie any more at token {TIE_AT}: {tie}"
    assert abs(tie[0][1] - tie[1][1]) <= 1e-5, f"no near-tie at token {TIE_AT}: {tie}"

    pairs = zip(batched.token_ids, alone.token_ids, strict=True)
    first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
    if first is None:
        return  # identical: the rounding happened to agree this time
    # A divergence is allowed only where the prompt alone has an exact tie (within rounding).
    top = alone.logprobs[first].top
    assert abs(top[0][1] - top[1][1]) <= 1e-5, (
        f"batched output left the prompt-alone output at token {first} without a tie there: "
        f"alone {[(tok.decode([t]), lp) for t, lp in top]}, batched "
        f"{[(tok.decode([t]), lp) for t, lp in batched.logprobs[first].top]}"
    )
    assert first == TIE_AT
