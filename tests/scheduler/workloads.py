"""The hypothesis strategy of random scheduler workloads: any valid config, small, and jobs with
shared and repeated prompts, priorities, arrivals and aborts."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from packserve.scheduler import SamplingParams, SchedulerConfig, blocks_for

from .reference import VOCAB


@dataclass
class Job:
    rid: str
    prompt: list[int]
    params: SamplingParams
    priority: int
    arrive: int  # step before which it is added
    abort: tuple[int, bool] | None  # (step, while the step runs?)


@st.composite
def configs(draw) -> SchedulerConfig:
    """Any valid config, small: tiny KV pools (preemption), small budgets (chunking)."""
    block_size = draw(st.sampled_from([1, 2, 4]))
    chunk_align = draw(st.sampled_from([0, 0, block_size, 2 * block_size]))
    max_model_len = draw(st.integers(4, 32))
    min_blocks = blocks_for(max_model_len, block_size)
    max_num_seqs = draw(st.integers(1, 6))
    least = max_num_seqs + chunk_align
    budget = draw(st.integers(least, least + 2 * max_model_len))
    padded = draw(st.booleans())
    return SchedulerConfig(
        max_model_len=max_model_len,
        num_kv_blocks=draw(st.integers(min_blocks, 3 * min_blocks)),
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_prefill_tokens_while_decoding=draw(st.integers(max(chunk_align, 1), budget)),
        prefill_context_cost=0 if chunk_align else draw(st.sampled_from([0, 2, 8, 64])),
        max_prefill_row_len=draw(st.sampled_from([0, max(chunk_align, 3), max(chunk_align, 9)])),
        prefill_mode="padded" if padded else "packed",
        mix_decodes=not padded and draw(st.booleans()),
        policy=draw(st.sampled_from(["shortest-first", "fcfs"])),
        fairness_steps=draw(st.integers(1, 4)),
        enable_prefix_caching=draw(st.booleans()),
        chunk_align=chunk_align,
        replay_preempted=draw(st.booleans()),
    )


@st.composite
def workloads(draw):
    """A scheduler config and jobs arriving (and maybe aborted) over the first steps. Prompts
    share prefixes (and repeat), so prefix caching has something to find."""
    cfg = draw(configs())
    n_max = cfg.max_model_len
    bases = [
        draw(st.lists(st.integers(0, VOCAB - 1), min_size=n_max, max_size=n_max)) for _ in range(2)
    ]
    jobs = []
    for i in range(draw(st.integers(1, 8))):
        n = draw(st.integers(1, n_max - 1))
        shared = draw(st.integers(0, n))
        tail = draw(st.lists(st.integers(0, VOCAB - 1), min_size=n - shared, max_size=n - shared))
        params = SamplingParams(
            max_tokens=draw(st.integers(1, 24)),
            ignore_eos=draw(st.booleans()),
            stop_token_ids=tuple(draw(st.lists(st.integers(0, VOCAB - 1), max_size=2))),
        )
        jobs.append(
            Job(
                rid=f"r{i}",
                prompt=draw(st.sampled_from(bases))[:shared] + tail,
                params=params,
                priority=draw(st.sampled_from([0, 0, 1, 2])),
                arrive=draw(st.integers(0, 8)),
                abort=draw(st.none() | st.none() | st.tuples(st.integers(0, 30), st.booleans())),
            )
        )
    return cfg, jobs
