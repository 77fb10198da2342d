"""A runner stand-in with a paged "KV cache" of token ids, addressed through block tables it
rebuilds from the step deltas alone, as `kernels.Runner` does.

Each slot holds a token and a key chained over the slot before it (read through the same
table), as a real model's K/V at a position depends on every token before it: a block holding
the right tokens computed after another prefix is caught too. It reads every context back
through the tables and samples a deterministic function of it, so block tables that are short,
shared where they must not be, stale after reuse or wrongly rebuilt corrupt the sampled
tokens, which are compared against a reference generation. Fresh blocks held by another
request, writes into shared or cached blocks, and unwritten slots fail at once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from packserve.scheduler import (
    RunnerOutput,
    SamplingParams,
    SchedulerConfig,
    SchedulerOutput,
    TokenLogprobs,
    blocks_for,
)

from .reference import chain_keys, next_token

TokenFn = Callable[[str, list[int]], int]
Slot = tuple[int, int]  # (token, key of the prefix up to it)


@dataclass
class RunnerState:
    """What the runner keeps about one request, rebuilt from the step deltas only."""

    params: SamplingParams
    num_prompt_tokens: int
    output_token_ids: list[int]
    block_ids: list[int]


class KVRunner:
    """Paged cache of (token, prefix key) slots addressed by block tables it keeps from the
    deltas; samples from it. Records, for each sampled request, the generated tokens it would
    have sampled with (penalties, the seeded draw index).

    Set by the harness before each step, where it knows them: `registered`, the blocks of the
    prefix-cache index; `live`, the requests running (a request preempted in a step that did
    not run keeps its state here until it is admitted again or ends, but holds no block).
    `truth`, when given, gives the tokens each request really has: every context read back
    must be exactly those.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        token_fn: TokenFn | None = None,
        truth: Callable[[str], Sequence[int]] | None = None,
    ) -> None:
        self.block_size = config.block_size
        self.cache: list[list[Slot | None]] = [
            [None] * config.block_size for _ in range(config.num_kv_blocks)
        ]
        self.token_fn = token_fn or (lambda rid, ctx: next_token(ctx))
        self.truth = truth
        self.logprobs: dict[str, TokenLogprobs] = {}
        self.states: dict[str, RunnerState] = {}
        self.registered: set[int] | None = None
        self.live: set[str] | None = None
        self.sampled_with: dict[str, tuple[int, ...]] = {}  # this step's sampling inputs

    def slot(self, table: list[int], pos: int) -> Slot | None:
        return self.cache[table[pos // self.block_size]][pos % self.block_size]

    def read(self, rid: str, end: int) -> list[Slot]:
        """The slots at positions [0, end) through the request's block table."""
        table = self.states[rid].block_ids
        slots = [self.slot(table, pos) for pos in range(end)]
        assert None not in slots, f"{rid} read a KV slot nobody wrote"
        return slots  # type: ignore[return-value]

    def __call__(self, out: SchedulerOutput) -> RunnerOutput:
        bs = self.block_size
        for rid in (*out.preempted_ids, *out.finished_ids):
            self.states.pop(rid, None)
        segs = {seq.request_id: seq for seq in out.segments}
        fresh: dict[str, list[int]] = {}  # blocks each request takes from the free pool
        cached = self.registered if self.registered is not None else set()
        known = self.registered is not None
        for new in out.new_requests:
            self.states[new.request_id] = RunnerState(
                new.params, new.num_prompt_tokens, list(new.output_token_ids), list(new.block_ids)
            )
            num_hit = segs[new.request_id].start_pos // bs  # blocks found in the prefix cache
            hit = new.block_ids[:num_hit]
            assert set(hit) <= cached or not known, "a prefix hit on a block the index lacks"
            fresh[new.request_id] = list(new.block_ids[num_hit:])
        for seq in segs.values():
            self.states[seq.request_id].block_ids += seq.new_block_ids
            fresh.setdefault(seq.request_id, []).extend(seq.new_block_ids)
        holders: dict[int, set[str]] = defaultdict(set)
        for rid, state in self.states.items():
            if self.live is None or rid in self.live:
                for b in state.block_ids:
                    holders[b].add(rid)
        for rid, blocks in fresh.items():
            for b in blocks:  # a block in use is never handed out
                assert holders[b] == {rid}, f"{rid} got block {b}, held by {holders[b]}"
                assert b not in cached, f"{rid} got block {b} the index holds"
        # The whole step writes its K/V first, then attends.
        for rid, seq in segs.items():
            table = self.states[rid].block_ids
            assert len(table) >= blocks_for(seq.end_pos, bs), f"{rid}: block table too short"
            for j, token in enumerate(seq.token_ids):
                pos = seq.start_pos + j
                block = table[pos // bs]
                # Only blocks the writer alone holds and the index does not: a write never
                # changes a token another request or the prefix cache relies on.
                assert block not in cached, f"{rid} wrote into cached block {block}"
                assert holders[block] == {rid}, f"{rid} wrote into block {block} of {holders}"
                prev = self.slot(table, pos - 1) if pos else (0, 0)
                assert prev is not None, f"{rid} computed position {pos} before {pos - 1}"
                self.cache[block][pos % bs] = (token, hash((prev[1], token)))
        sampled = {}
        self.sampled_with = {}
        for rid, seq in segs.items():
            state = self.states[rid]
            slots = self.read(rid, seq.end_pos)
            ctx = [token for token, _ in slots]
            assert [key for _, key in slots] == chain_keys(ctx), f"{rid}: K/V of another prefix"
            if self.truth is not None:
                assert ctx == list(self.truth(rid))[: seq.end_pos], f"{rid} read a wrong context"
            if not seq.sample:  # a prompt's chunk or a replayed token: nothing to sample
                continue
            token = self.token_fn(rid, ctx)
            sampled[rid] = token
            self.sampled_with[rid] = tuple(state.output_token_ids)
            state.output_token_ids.append(token)
        lps = {rid: lp for rid, lp in self.logprobs.items() if rid in sampled}
        return RunnerOutput(sampled_token_ids=sampled, logprobs=lps)
