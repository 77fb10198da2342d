"""The scheduler driven step by step, with a hand-built runner (no torch, no mocks).

The runner here is a stand-in for the model: it writes each scheduled sequence's tokens into a
paged "KV cache" of token ids through the scheduler's block tables, reads the whole context
back through the same tables, and samples a deterministic function of it. Block tables that are
short, shared between sequences or stale after reuse corrupt what is read back, and with it the
sampled tokens, which are compared against a reference generation computed without the
scheduler.

Every step also goes through `Harness.step`, which checks the step contract and the scheduler's
invariants (budgets, FCFS, block tables, preemption order, events) against the state before it.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from packserve.scheduler import (
    Request,
    RequestStatus,
    RunnerOutput,
    SamplingParams,
    ScheduledSequence,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    TokenEvent,
    TokenLogprobs,
    blocks_for,
)

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


def reference_ffd(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit over the items by decreasing length (ties: earlier first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep order
    bins: list[list[int]] = []
    for i in order:
        for b in bins:
            if sum(lengths[j] for j in b) + lengths[i] <= capacity:
                b.append(i)
                break
        else:
            bins.append([i])
    return bins


def reference_rows(lengths: list[int], widest: int) -> list[list[int]]:
    """The documented row policy: FFD at the longest prompt x 1, 2, 4, ... (capped at the
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


TokenFn = Callable[[str, list[int]], int]


class KVRunner:
    """Paged token-id cache addressed by the scheduler's block tables; samples from it."""

    def __init__(self, config: SchedulerConfig, token_fn: TokenFn | None = None) -> None:
        self.block_size = config.block_size
        self.cache: list[list[int | None]] = [
            [None] * config.block_size for _ in range(config.num_kv_blocks)
        ]
        self.token_fn = token_fn or (lambda rid, ctx: next_token(ctx))
        self.logprobs: dict[str, TokenLogprobs] = {}

    def _slot(self, seq: ScheduledSequence, pos: int) -> tuple[list[int | None], int]:
        return self.cache[seq.block_ids[pos // self.block_size]], pos % self.block_size

    def __call__(self, out: SchedulerOutput) -> RunnerOutput:
        seqs = (*out.prefills, *out.decodes)
        # The whole batch writes its K/V first, then attends: shared blocks would clobber.
        for seq in seqs:
            for j, token in enumerate(seq.token_ids):
                block, off = self._slot(seq, seq.start_pos + j)
                block[off] = token
        sampled = {}
        for seq in seqs:
            ctx = []
            for pos in range(seq.start_pos + seq.num_tokens):
                block, off = self._slot(seq, pos)
                ctx.append(block[off])
            assert None not in ctx, f"{seq.request_id} read a KV slot nobody wrote"
            sampled[seq.request_id] = self.token_fn(seq.request_id, ctx)
        lps = {rid: lp for rid, lp in self.logprobs.items() if rid in sampled}
        return RunnerOutput(sampled_token_ids=sampled, logprobs=lps)


@dataclass
class Snapshot:
    """What the scheduler looked like before `schedule()`."""

    running: list[tuple[Request, int, list[int]]]  # request, num_computed_tokens, block ids
    waiting: list[Request]
    outputs: dict[str, list[int]]
    num_free: int

    @classmethod
    def of(cls, sched: Scheduler) -> Snapshot:
        return cls(
            running=[(r, r.num_computed_tokens, list(r.block_ids)) for r in sched.running],
            waiting=list(sched.waiting),
            outputs={rid: list(r.output_token_ids) for rid, r in sched.requests.items()},
            num_free=sched.allocator.num_free,
        )


def ids(requests: Iterable[Request]) -> list[str]:
    return [r.request_id for r in requests]


def check_blocks(sched: Scheduler) -> None:
    """Block ownership: running requests hold disjoint blocks, the rest are free."""
    total = sched.config.num_kv_blocks
    held = [b for r in sched.running for b in r.block_ids]
    assert len(held) == len(set(held)), "a block is held by two running requests"
    assert all(0 <= b < total for b in held)
    assert len(held) == sched.allocator.num_used
    assert sched.allocator.num_used + sched.allocator.num_free == total
    for r in sched.waiting:
        assert r.block_ids == [] and r.status == RequestStatus.WAITING
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING


def check_schedule(sched: Scheduler, before: Snapshot, out: SchedulerOutput) -> None:
    cfg = sched.config
    bs = cfg.block_size
    pre_running = [r for r, _, _ in before.running]
    decode_ids = [s.request_id for s in out.decodes]
    prefill_ids = [s.request_id for s in out.prefills]

    # Preemption takes a suffix of the running list, most recently admitted first.
    k = len(out.preempted_ids)
    m = len(pre_running) - k
    assert list(out.preempted_ids) == ids(pre_running[m:])[::-1]
    assert decode_ids == ids(pre_running[:m]), "every kept running sequence decodes, in order"
    if k:
        assert not out.prefill_bins, "admitted prompts in a step that preempted"
        # Preempting one request fewer would not have fit: the kept ones plus the earliest
        # victim need more new blocks than were free plus what the other victims held.
        need = [blocks_for(c + 1, bs) - len(b) for _, c, b in before.running]
        held_after = sum(len(b) for _, _, b in before.running[m + 1 :])
        assert sum(need[: m + 1]) > before.num_free + held_after, "needless preemption"
        # Requeued at the front, in admission order, for recompute from scratch.
        assert ids(sched.waiting) == ids(pre_running[m:]) + ids(before.waiting)
        for r in pre_running[m:]:
            assert r.status == RequestStatus.WAITING
            assert r.block_ids == [] and r.num_computed_tokens == 0
        admitted: list[Request] = []
    else:
        admitted = sched.running[m:]
        assert ids(admitted) == ids(before.waiting[: len(admitted)]), "not FCFS"
        assert ids(sched.waiting) == ids(before.waiting[len(admitted) :])
        assert sorted(prefill_ids) == sorted(ids(admitted))
        if sched.waiting:  # admission stopped for a reason: seats, token budget or KV blocks
            head = sched.waiting[0]
            head_len = prefill_len(cfg, head)
            left = cfg.max_num_batched_tokens - len(out.decodes) - out.num_prefill_tokens
            assert (
                len(sched.running) >= cfg.max_num_seqs
                or head_len > left
                or blocks_for(head_len, bs) > sched.allocator.num_free
            ), f"{head.request_id} could have been admitted"

    # Budgets.
    assert out.num_prefill_tokens + len(out.decodes) <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs
    assert sorted(prefill_ids + decode_ids) == sorted(ids(sched.running))
    assert len(set(prefill_ids + decode_ids)) == len(prefill_ids) + len(decode_ids)

    # Prefill rows.
    for row in out.prefill_bins:
        assert row, "empty prefill row"
        assert sum(s.num_tokens for s in row) <= cfg.row_capacity
    if cfg.prefill_mode == "padded":
        assert [len(row) for row in out.prefill_bins] == [1] * len(admitted)
        assert prefill_ids == ids(admitted)
    else:
        lengths = [prefill_len(cfg, r) for r in admitted]
        bins = reference_rows(lengths, cfg.row_capacity)
        expect = [[admitted[i].request_id for i in b] for b in bins]
        assert [[s.request_id for s in row] for row in out.prefill_bins] == expect

    # Each sequence's view and block table.
    old_tables = {r.request_id: b for r, _, b in before.running}
    computed = {r.request_id: c for r, c, _ in before.running}
    for seq in (*out.prefills, *out.decodes):
        r = sched.requests[seq.request_id]
        assert len(seq.block_ids) == blocks_for(seq.start_pos + seq.num_tokens, bs)
        assert list(seq.block_ids) == r.block_ids
        assert seq.params is r.params
        assert list(seq.output_token_ids) == before.outputs[r.request_id]
        if seq.request_id in prefill_ids:
            assert seq.start_pos == 0
            assert list(seq.token_ids) == r.all_token_ids[: prefill_len(cfg, r)]
        else:  # the next token without K/V: the last one, or a replayed one
            assert seq.start_pos == computed[seq.request_id] < r.num_tokens
            assert cfg.replay_preempted or seq.start_pos == r.num_tokens - 1
            assert seq.token_ids == (r.all_token_ids[seq.start_pos],)
            old = old_tables[seq.request_id]
            assert list(seq.block_ids[: len(old)]) == old, "a running sequence's blocks moved"
    check_blocks(sched)


class Harness:
    """Drives a Scheduler with a KVRunner, checking every step and recording the events."""

    def __init__(
        self,
        config: SchedulerConfig,
        eos: frozenset[int] = frozenset({EOS}),
        token_fn: TokenFn | None = None,
    ) -> None:
        self.config = config
        self.eos = eos
        self.sched = Scheduler(config, eos)
        self.runner = KVRunner(config, token_fn)
        self.requests: dict[str, Request] = {}
        self.events: dict[str, list[TokenEvent]] = defaultdict(list)
        self.reasons: dict[str, str] = {}  # finish reason of every ended request
        self.history: list[SchedulerOutput] = []

    def add(self, rid: str, prompt: Sequence[int], **params) -> Request:
        request = Request(rid, list(prompt), SamplingParams(**params))
        self.sched.add(request)
        self.requests[rid] = request
        return request

    def abort(self, rid: str) -> bool:
        done = self.sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)
        if done:
            assert rid not in self.reasons
            self.reasons[rid] = "abort"
            r = self.requests[rid]
            assert r.status == RequestStatus.FINISHED_ABORTED and r.block_ids == []
            assert rid not in self.sched.requests
            assert r not in self.sched.running and r not in self.sched.waiting
        check_blocks(self.sched)
        return done

    def step(self, abort_mid: Iterable[str] = ()) -> tuple[SchedulerOutput, list[TokenEvent]]:
        before = Snapshot.of(self.sched)
        out = self.sched.schedule()
        check_schedule(self.sched, before, out)
        for rid in abort_mid:  # the caller ends requests while the runner works
            self.abort(rid)
        # A replaying sequence runs a token it already has: it gains none in this step.
        replaying = {
            s.request_id
            for s in (*out.prefills, *out.decodes)
            if s.start_pos + s.num_tokens < self.requests[s.request_id].num_tokens
        }
        events = self.sched.update(out, self.runner(out))
        self._check_events(out, events, replaying)
        self.history.append(out)
        return out, events

    def _check_events(
        self, out: SchedulerOutput, events: list[TokenEvent], replaying: set[str]
    ) -> None:
        scheduled = (*out.prefills, *out.decodes)
        live = {s.request_id for s in scheduled if self.reasons.get(s.request_id) != "abort"}
        assert sorted(e.request_id for e in events) == sorted(live - replaying)
        for e in events:
            assert e.request_id not in self.reasons, "event after the request ended"
            r = self.requests[e.request_id]
            assert len(e.new_token_ids) == 1 and r.output_token_ids[-1] == e.new_token_ids[0]
            self.events[e.request_id].append(e)
            if e.finish_reason is None:
                assert r in self.sched.running and r.status == RequestStatus.RUNNING
                assert r.num_computed_tokens == r.num_tokens - 1
                assert len(r.block_ids) == blocks_for(r.num_computed_tokens, self.config.block_size)
            else:
                self.reasons[e.request_id] = e.finish_reason
                assert r.status.is_finished and r.status.finish_reason == e.finish_reason
                assert r.block_ids == [] and e.request_id not in self.sched.requests
                assert r not in self.sched.running
        check_blocks(self.sched)

    def run(self, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished:
                break
            self.step()
        assert not self.sched.has_unfinished, "the scheduler did not drain"
        self.check_drained()

    def check_drained(self) -> None:
        s = self.sched
        assert not s.running and not s.waiting and not s.requests
        assert s.num_running == 0 and s.num_waiting == 0
        assert s.allocator.num_free == self.config.num_kv_blocks
        for rid, r in self.requests.items():
            assert rid in self.reasons
            emitted = [t for e in self.events.get(rid, []) for t in e.new_token_ids]
            assert emitted == r.output_token_ids
        # The free list holds every block exactly once.
        assert sorted(s.allocator.allocate(self.config.num_kv_blocks)) == list(
            range(self.config.num_kv_blocks)
        )

    def tokens(self, rid: str) -> list[int]:
        return list(self.requests[rid].output_token_ids)


def prefill_len(cfg: SchedulerConfig, request: Request) -> int:
    """Tokens a request prefills when admitted: the prompt alone when replaying."""
    return len(request.prompt_token_ids) if cfg.replay_preempted else request.num_tokens


def config(**kw) -> SchedulerConfig:
    kw.setdefault("max_model_len", 32)
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("block_size", 4)
    return SchedulerConfig(**kw)


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 31 + 7 * i) % VOCAB for i in range(n)]


def scripted(prompts: dict[str, list[int]], scripts: dict[str, list[int]]) -> TokenFn:
    """A runner whose k-th sampled token for a request is scripts[request][k]."""
    return lambda rid, ctx: scripts[rid][len(ctx) - len(prompts[rid])]


# -- admission ------------------------------------------------------------------------------


def test_fcfs_admission():
    h = Harness(config(max_num_seqs=2), eos=NO_EOS)
    for i, n in enumerate([1, 5, 5, 5]):
        h.add("abcd"[i], prompt(i, 3), max_tokens=n)
    out, _ = h.step()
    assert sorted(s.request_id for s in out.prefills) == ["a", "b"]
    assert ids(h.sched.waiting) == ["c", "d"]
    out, _ = h.step()  # a finished after one token: its seat goes to c, not d
    assert [s.request_id for s in out.prefills] == ["c"]
    assert [s.request_id for s in out.decodes] == ["b"]
    assert ids(h.sched.waiting) == ["d"]
    h.run()


def test_later_short_prompt_does_not_overtake():
    h = Harness(config(max_model_len=16, max_num_batched_tokens=16), eos=NO_EOS)
    h.add("x", [1], max_tokens=3)
    h.add("y", [2], max_tokens=3)
    h.step()
    h.add("big", prompt(1, 15), max_tokens=1)  # 15 > 16 - 2 decode tokens
    h.add("small", [3], max_tokens=1)  # fits the budget, but arrived later
    for _ in range(2):
        out, _ = h.step()
        assert not out.prefills
        assert ids(h.sched.waiting) == ["big", "small"]
    out, _ = h.step()  # x and y are done: 15 + 1 tokens fit the budget of 16
    assert sorted(s.request_id for s in out.prefills) == ["big", "small"]
    h.run()


def test_token_budget_limits_admission():
    h = Harness(config(max_model_len=32, max_num_batched_tokens=32), eos=NO_EOS)
    for i in range(6):
        h.add(f"r{i}", prompt(i, 10), max_tokens=4)
    admitted = []
    for _ in range(3):
        out, _ = h.step()
        admitted.append(len(out.prefills))
        assert out.num_prefill_tokens + len(out.decodes) <= 32
    # 3 x 10 <= 32; then 3 decodes leave 29 for 2 more; then 5 decodes leave 27 for the last.
    assert admitted == [3, 2, 1]
    h.run()


def test_max_num_seqs_caps_running():
    h = Harness(config(max_num_seqs=3), eos=NO_EOS)
    for i in range(7):
        h.add(f"r{i}", prompt(i, 2), max_tokens=2 + i)
    out, _ = h.step()
    assert len(out.prefills) == 3 and h.sched.num_waiting == 4
    peak = 0
    while h.sched.has_unfinished:
        out, _ = h.step()
        peak = max(peak, len(out.prefills) + len(out.decodes))
    assert peak == 3
    h.check_drained()


def test_prompt_waits_until_enough_blocks_are_free():
    # 8 blocks of 4: a (20 tokens, 5 blocks, 6 once it decodes) leaves no room for b's 4.
    h = Harness(config(max_model_len=32, num_kv_blocks=8, block_size=4), eos=NO_EOS)
    h.add("a", prompt(1, 20), max_tokens=3)
    h.add("b", prompt(2, 16), max_tokens=2)
    for _ in range(2):
        out, _ = h.step()
        assert [s.request_id for s in out.prefills] in (["a"], [])
        assert ids(h.sched.waiting) == ["b"]
        assert h.sched.allocator.num_free < 4
    out, _ = h.step()  # a's third and last token; b still could not have been admitted
    assert not out.prefills and ids(h.sched.waiting) == ["b"]
    assert h.reasons == {"a": "length"}
    free_before = h.sched.allocator.num_free
    out, _ = h.step()
    assert free_before == 8
    assert [s.request_id for s in out.prefills] == ["b"]
    h.run()


def test_packed_rows_are_first_fit_decreasing():
    h = Harness(config(max_model_len=16, max_num_batched_tokens=64), eos=NO_EOS)
    for i, n in enumerate([9, 8, 7, 5, 3]):
        h.add(f"p{i}", prompt(i, n), max_tokens=1)
    out, _ = h.step()
    # Capacity 16: 9 | 8 | 7 joins 9 | 5 joins 8 | 3 joins 8+5.
    assert [[s.request_id for s in row] for row in out.prefill_bins] == [
        ["p0", "p2"],
        ["p1", "p3", "p4"],
    ]
    assert out.row_lens == [16, 16]
    h.run()


def test_wider_rows_hold_more_prompts():
    cfg = config(max_model_len=16, max_num_batched_tokens=64, max_prefill_row_len=32)
    h = Harness(cfg, eos=NO_EOS)
    for i, n in enumerate([9, 8, 7, 5, 3]):
        h.add(f"p{i}", prompt(i, n), max_tokens=1)
    out, _ = h.step()
    assert len(out.prefill_bins) == 1 and out.row_lens == [32]
    h.run()


def test_padded_mode_one_prompt_per_row():
    cfg = config(max_model_len=16, max_num_batched_tokens=64, prefill_mode="padded")
    h = Harness(cfg, eos=NO_EOS)
    for i, n in enumerate([9, 8, 7, 5, 3]):
        h.add(f"p{i}", prompt(i, n), max_tokens=2)
    out, _ = h.step()
    assert [[s.request_id for s in row] for row in out.prefill_bins] == [
        [f"p{i}"] for i in range(5)
    ]
    assert out.num_padded_prefill_tokens == 5 * 9
    h.run()


def test_empty_scheduler_step():
    sched = Scheduler(config(), frozenset({EOS}))
    out = sched.schedule()
    assert out.is_empty and not out.preempted_ids
    assert sched.update(out, RunnerOutput({}, {})) == []
    assert not sched.has_unfinished


# -- continuous batching ----------------------------------------------------------------------


def test_new_request_joins_the_running_batch():
    h = Harness(config(), eos=NO_EOS)
    h.add("a", prompt(1, 4), max_tokens=6)
    h.step()
    h.step()
    h.add("b", prompt(2, 5), max_tokens=6)
    out, _ = h.step()  # step 3: b prefills while a decodes
    assert [s.request_id for s in out.prefills] == ["b"]
    assert [s.request_id for s in out.decodes] == ["a"]
    out, _ = h.step()  # step 4: b decodes right away
    assert [s.request_id for s in out.decodes] == ["a", "b"]
    h.step()
    out, events = h.step()  # step 6: a's sixth token
    assert {e.request_id: e.finish_reason for e in events} == {"a": "length", "b": None}
    assert h.sched.allocator.num_used == len(h.requests["b"].block_ids)
    out, _ = h.step()  # a left at once
    assert [s.request_id for s in out.decodes] == ["b"] and not out.prefills
    h.run()
    assert len(h.tokens("a")) == 6 and len(h.tokens("b")) == 6


def test_request_finishing_at_prefill_never_decodes():
    h = Harness(config(), eos=NO_EOS)
    h.add("one", prompt(1, 5), max_tokens=1)
    h.add("many", prompt(2, 5), max_tokens=3)
    out, events = h.step()
    assert {e.request_id: e.finish_reason for e in events} == {"one": "length", "many": None}
    out, _ = h.step()
    assert [s.request_id for s in out.decodes] == ["many"]
    h.run()


# -- finish checks ----------------------------------------------------------------------------


def run_scripted(script: list[int], eos=frozenset({EOS}), max_model_len=32, plen=4, **params):
    p = prompt(3, plen)
    h = Harness(
        config(max_model_len=max_model_len),
        eos=eos,
        token_fn=scripted({"r": p}, {"r": script}),
    )
    h.add("r", p, **params)
    h.run()
    return h.tokens("r"), h.reasons["r"], h.events["r"]


def test_finish_on_max_tokens():
    tokens, reason, events = run_scripted([5, 6, 7, 8, 9], max_tokens=3)
    assert tokens == [5, 6, 7] and reason == "length"
    assert [e.finish_reason for e in events] == [None, None, "length"]


def test_finish_on_eos():
    tokens, reason, events = run_scripted([5, EOS, 7, 8], max_tokens=10)
    assert tokens == [5, EOS] and reason == "stop"
    assert [e.finish_reason for e in events] == [None, "stop"]


def test_eos_at_prefill():
    assert run_scripted([EOS, 7], max_tokens=10)[:2] == ([EOS], "stop")


def test_any_of_several_eos_ids_stops():
    assert run_scripted([5, 41, 7], eos=frozenset({EOS, 41}), max_tokens=10)[:2] == (
        [5, 41],
        "stop",
    )


def test_ignore_eos_keeps_going():
    tokens, reason, _ = run_scripted([5, EOS, 7, EOS], max_tokens=4, ignore_eos=True)
    assert tokens == [5, EOS, 7, EOS] and reason == "length"


def test_finish_on_stop_token_ids():
    tokens, reason, _ = run_scripted([5, 9, 7], max_tokens=10, stop_token_ids=(9, 11))
    assert tokens == [5, 9] and reason == "stop"


def test_stop_token_ids_apply_despite_ignore_eos():
    tokens, reason, _ = run_scripted(
        [EOS, 11, 7], max_tokens=10, stop_token_ids=(11,), ignore_eos=True
    )
    assert tokens == [EOS, 11] and reason == "stop"


def test_eos_on_the_last_allowed_token_is_stop():
    assert run_scripted([5, EOS], max_tokens=2)[:2] == ([5, EOS], "stop")


def test_finish_on_max_model_len():
    tokens, reason, _ = run_scripted([1] * 20, max_model_len=8, plen=5, max_tokens=100)
    assert tokens == [1, 1, 1] and reason == "length"


def test_longest_prompt_gets_one_token():
    tokens, reason, _ = run_scripted([1] * 5, max_model_len=8, plen=7, max_tokens=100)
    assert tokens == [1] and reason == "length"


def test_logprobs_are_passed_through():
    h = Harness(config(), eos=NO_EOS)
    h.add("with", prompt(1, 3), max_tokens=2, logprobs=1)
    h.add("without", prompt(2, 3), max_tokens=2)
    lp = TokenLogprobs(logprob=-0.5, top=((3, -0.5), (4, -1.5)))
    h.runner.logprobs = {"with": lp}
    h.run()
    assert [e.logprobs for e in h.events["with"]] == [(lp,), (lp,)]
    assert [e.logprobs for e in h.events["without"]] == [(), ()]


# -- outputs match the reference ----------------------------------------------------------------


def test_outputs_match_reference_generation():
    h = Harness(config(max_model_len=40, max_num_seqs=4, max_num_batched_tokens=48))
    params = {}
    for i in range(10):
        kw = {"max_tokens": 5 + 3 * i, "ignore_eos": i % 3 == 0}
        if i % 4 == 1:
            kw["stop_token_ids"] = (next_token(prompt(i, 3 + i)),)  # stops at its first token
        params[f"r{i}"] = kw
        h.add(f"r{i}", prompt(i, 3 + i), **kw)
    h.run()
    for i in range(10):
        rid = f"r{i}"
        sp = SamplingParams(**params[rid])
        expected = reference(prompt(i, 3 + i), sp, {EOS}, 40)
        assert (h.tokens(rid), h.reasons[rid]) == expected


# -- preemption -------------------------------------------------------------------------------


def preemption_workload(num_kv_blocks: int) -> Harness:
    cfg = config(max_model_len=12, num_kv_blocks=num_kv_blocks, block_size=2)
    h = Harness(cfg, eos=NO_EOS)
    for i, rid in enumerate("ABC"):
        h.add(rid, prompt(i + 1, 3), max_tokens=6)
    return h


def test_preemption_evicts_the_latest_and_recomputes():
    h = preemption_workload(num_kv_blocks=6)
    h.step()  # A, B, C prefill: 2 blocks each, the pool is full
    h.step()  # 4 tokens each still fit 2 blocks
    c_outputs = h.tokens("C")
    out, _ = h.step()  # A needs a third block: C, the most recent, goes
    assert out.preempted_ids == ("C",)
    assert [s.request_id for s in out.decodes] == ["A", "B"]
    c = h.requests["C"]
    assert ids(h.sched.waiting) == ["C"]
    assert c.num_preemptions == 1 and c.block_ids == [] and c.status == RequestStatus.WAITING
    assert h.tokens("C") == c_outputs and len(c_outputs) == 2  # generated tokens are kept

    preempted_at = {}
    reprefills = {}
    while h.sched.has_unfinished:
        outputs_before = {rid: h.tokens(rid) for rid in h.requests}
        out, _ = h.step()
        for rid in out.preempted_ids:
            preempted_at.setdefault(rid, outputs_before[rid])
        for seq in out.prefills:
            reprefills.setdefault(seq.request_id, (seq, outputs_before[seq.request_id]))
    h.check_drained()
    assert "B" in preempted_at  # later, A's growth pushes B out as well
    for rid in ("B", "C"):
        seq, outputs = reprefills[rid]
        assert outputs, f"{rid} re-prefilled before generating anything"
        assert list(seq.token_ids) == h.requests[rid].prompt_token_ids + outputs
        assert list(seq.output_token_ids) == outputs
        assert seq.start_pos == 0
    assert h.sched.num_preemptions_total >= 2

    big = preemption_workload(num_kv_blocks=1000)
    big.run()
    assert big.sched.num_preemptions_total == 0
    for rid in "ABC":
        assert h.tokens(rid) == big.tokens(rid)
        assert h.reasons[rid] == big.reasons[rid] == "length"
        sp = h.requests[rid].params
        assert h.tokens(rid) == reference(h.requests[rid].prompt_token_ids, sp, (), 12)[0]


def test_replay_after_preemption_feeds_known_tokens_back_one_per_step():
    cfg = config(max_model_len=12, num_kv_blocks=6, block_size=2, replay_preempted=True)
    h = Harness(cfg, eos=NO_EOS)
    for i, rid in enumerate("ABC"):
        h.add(rid, prompt(i + 1, 3), max_tokens=6)
    h.run()  # the harness checks each step, and that replay steps emit nothing
    assert h.sched.num_preemptions_total >= 2
    replayed = 0
    for rid, request in h.requests.items():
        final = request.all_token_ids
        expected_pos = None
        decodes = 0
        for out in h.history:
            for seq in out.prefills:
                if seq.request_id == rid:  # the prompt alone, first time or after preemption
                    assert list(seq.token_ids) == request.prompt_token_ids
                    expected_pos = len(request.prompt_token_ids)
            for seq in out.decodes:
                if seq.request_id == rid:  # the next position, with the token known there
                    assert seq.start_pos == expected_pos
                    assert seq.token_ids == (final[seq.start_pos],)
                    expected_pos += 1
                    decodes += 1
            if rid in out.preempted_ids:
                expected_pos = None
        # Without replay each decode yields one of the outputs after the first.
        replayed += decodes - (len(request.output_token_ids) - 1)
    assert replayed > 0
    big = preemption_workload(num_kv_blocks=1000)
    big.run()
    for rid in "ABC":
        assert h.tokens(rid) == big.tokens(rid) and h.reasons[rid] == "length"


def test_request_can_preempt_itself():
    # Two blocks of 4: A (1 token) and B (4 tokens) take one each; B's fifth token needs a
    # second block, and B is the most recent, so B is the one to go.
    cfg = config(max_model_len=8, num_kv_blocks=2, block_size=4, max_num_batched_tokens=8)
    h = Harness(cfg, eos=NO_EOS)
    h.add("A", [5], max_tokens=3)
    h.add("B", prompt(2, 4), max_tokens=3)
    h.step()
    b_out = h.tokens("B")
    out, _ = h.step()
    assert out.preempted_ids == ("B",)
    assert [s.request_id for s in out.decodes] == ["A"] and not out.prefills
    out, _ = h.step()  # B needs 2 blocks, A still holds one
    assert not out.prefills and h.reasons == {"A": "length"}
    out, _ = h.step()
    assert [s.token_ids for s in out.prefills] == [tuple(prompt(2, 4) + b_out)]
    h.run()
    sp = h.requests["B"].params
    assert h.tokens("B") == reference(prompt(2, 4), sp, (), 8)[0]


def test_several_preemptions_in_one_step_keep_admission_order():
    # Block size 1: every decode needs a new block. Four 1-token prompts fill the pool of 4.
    cfg = config(max_model_len=4, num_kv_blocks=4, block_size=1)
    h = Harness(cfg, eos=NO_EOS)
    for rid in "ABCD":
        h.add(rid, [ord(rid) % VOCAB], max_tokens=3)
    h.step()
    out, _ = h.step()  # A takes D's block, B takes C's
    assert out.preempted_ids == ("D", "C")
    assert [s.request_id for s in out.decodes] == ["A", "B"]
    assert ids(h.sched.waiting) == ["C", "D"]
    out, _ = h.step()  # A needs another block: B goes
    assert out.preempted_ids == ("B",)
    assert ids(h.sched.waiting) == ["B", "C", "D"]
    h.run()
    for rid in "ABCD":
        sp = h.requests[rid].params
        assert h.tokens(rid) == reference([ord(rid) % VOCAB], sp, (), 4)[0]


# -- aborts -----------------------------------------------------------------------------------


def test_abort_waiting_request():
    h = Harness(config(max_num_seqs=1), eos=NO_EOS)
    h.add("a", prompt(1, 3), max_tokens=4)
    h.add("b", prompt(2, 3), max_tokens=4)
    h.step()
    assert ids(h.sched.waiting) == ["b"]
    assert h.abort("b")
    assert h.sched.num_waiting == 0
    assert h.requests["b"].status.finish_reason == "abort"
    assert not h.abort("b") and not h.abort("never-added")
    h.run()
    assert "b" not in h.events
    assert h.requests["b"].output_token_ids == []


def test_abort_running_request_frees_its_blocks():
    h = Harness(config(), eos=NO_EOS)
    h.add("a", prompt(1, 9), max_tokens=8)
    h.add("b", prompt(2, 5), max_tokens=8)
    h.step()
    h.step()
    assert h.sched.allocator.num_used == len(h.requests["a"].block_ids) + len(
        h.requests["b"].block_ids
    )
    n_events = len(h.events["a"])
    assert h.abort("a")
    assert h.sched.allocator.num_used == len(h.requests["b"].block_ids)
    assert ids(h.sched.running) == ["b"]
    h.run()
    assert len(h.events["a"]) == n_events
    assert all(e.finish_reason is None for e in h.events["a"])
    assert all("a" not in [s.request_id for s in o.decodes] for o in h.history[2:])


def test_abort_while_the_step_runs():
    h = Harness(config(), eos=NO_EOS)
    h.add("a", prompt(1, 6), max_tokens=8)
    h.add("b", prompt(2, 6), max_tokens=8)
    h.step()
    out, events = h.step(abort_mid=["a"])
    assert "a" in [s.request_id for s in out.decodes]
    assert [e.request_id for e in events] == ["b"]
    assert h.requests["a"].block_ids == []
    h.run()
    assert len(h.events["a"]) == 1


def test_abort_preempted_request():
    cfg = config(max_model_len=8, num_kv_blocks=2, block_size=4, max_num_batched_tokens=8)
    h = Harness(cfg, eos=NO_EOS)
    h.add("A", [5], max_tokens=3)
    h.add("B", prompt(2, 4), max_tokens=3)
    h.step()
    out, _ = h.step()
    assert out.preempted_ids == ("B",)
    assert h.abort("B")
    assert h.sched.num_waiting == 0
    h.run()
    assert len(h.events["B"]) == 1


def test_finish_request_with_error_status():
    h = Harness(config(), eos=NO_EOS)
    h.add("a", prompt(1, 3), max_tokens=8)
    h.step()
    assert h.sched.finish_request("a", RequestStatus.FINISHED_ERROR)
    assert h.requests["a"].status.finish_reason == "error"
    assert h.sched.allocator.num_used == 0 and not h.sched.has_unfinished


# -- random workloads ---------------------------------------------------------------------------


@dataclass
class Job:
    rid: str
    prompt: list[int]
    params: SamplingParams
    arrive: int  # step before which it is added
    abort: tuple[int, bool] | None  # (step, while the step runs?)


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    max_model_len = draw(st.integers(4, 40))
    min_blocks = blocks_for(max_model_len, block_size)
    cfg = SchedulerConfig(
        max_model_len=max_model_len,
        num_kv_blocks=draw(st.integers(min_blocks, 3 * min_blocks)),
        block_size=block_size,
        max_num_seqs=draw(st.integers(1, 8)),
        max_num_batched_tokens=draw(st.integers(max_model_len, 3 * max_model_len)),
        max_prefill_row_len=draw(st.sampled_from([0, max_model_len, 2 * max_model_len])),
        prefill_mode=draw(st.sampled_from(["packed", "padded"])),
        replay_preempted=draw(st.booleans()),
    )
    jobs = []
    for i in range(draw(st.integers(1, 12))):
        n = draw(st.integers(1, max_model_len - 1))
        params = SamplingParams(
            max_tokens=draw(st.integers(1, 40)),
            ignore_eos=draw(st.booleans()),
            stop_token_ids=tuple(draw(st.lists(st.integers(0, VOCAB - 1), max_size=2))),
        )
        abort = draw(st.none() | st.tuples(st.integers(0, 30), st.booleans()))
        jobs.append(
            Job(
                rid=f"r{i}",
                prompt=draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n)),
                params=params,
                arrive=draw(st.integers(0, 10)),
                abort=abort,
            )
        )
    return cfg, jobs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_drain(workload):
    cfg, jobs = workload
    h = Harness(cfg)
    last_arrival = max(j.arrive for j in jobs)
    step = 0
    while step <= last_arrival or h.sched.has_unfinished:
        assert step < 5000, "did not drain"
        for j in jobs:
            if j.arrive == step:
                req = Request(j.rid, list(j.prompt), j.params)
                h.sched.add(req)
                h.requests[j.rid] = req
        mid = []
        for j in jobs:
            if j.abort and j.abort[0] == step and j.rid in h.sched.requests:
                if j.abort[1]:
                    mid.append(j.rid)
                else:
                    h.abort(j.rid)
        h.step(abort_mid=mid)
        step += 1
    h.check_drained()
    event(f"preemptions: {min(h.sched.num_preemptions_total, 3)}")
    event(f"aborted: {min(sum(r == 'abort' for r in h.reasons.values()), 2)}")
    for j in jobs:
        tokens, reason = reference(j.prompt, j.params, {EOS}, cfg.max_model_len)
        if h.reasons[j.rid] == "abort":
            assert h.tokens(j.rid) == tokens[: len(h.tokens(j.rid))]
            assert len(h.tokens(j.rid)) < len(tokens) or h.tokens(j.rid) == []
        else:
            assert (h.tokens(j.rid), h.reasons[j.rid]) == (tokens, reason)


# -- validation ---------------------------------------------------------------------------------


def test_add_rejects_duplicate_ids():
    sched = Scheduler(config(), frozenset({EOS}))
    sched.add(Request("x", [1, 2], SamplingParams()))
    with pytest.raises(ValueError):
        sched.add(Request("x", [3], SamplingParams()))
    assert sched.num_waiting == 1
    out = sched.schedule()
    sched.update(out, RunnerOutput({"x": 7}, {}))
    assert sched.num_running == 1
    with pytest.raises(ValueError):  # still a duplicate while it runs
        sched.add(Request("x", [3], SamplingParams()))
    assert sched.num_waiting == 0


def test_add_rejects_empty_prompt():
    sched = Scheduler(config(), frozenset({EOS}))
    with pytest.raises(ValueError):
        sched.add(Request("x", [], SamplingParams()))
    assert not sched.has_unfinished


@pytest.mark.parametrize("n", [8, 9, 100])
def test_add_rejects_prompts_that_leave_no_room(n):
    sched = Scheduler(config(max_model_len=8), frozenset({EOS}))
    with pytest.raises(ValueError):
        sched.add(Request("x", list(range(n)), SamplingParams()))
    assert not sched.has_unfinished
    sched.add(Request("y", list(range(7)), SamplingParams()))  # one short of the limit is fine
    assert sched.num_waiting == 1


@pytest.mark.parametrize(
    "kw",
    [
        {"max_model_len": 0, "num_kv_blocks": 4},
        {"max_model_len": 8, "num_kv_blocks": 4, "block_size": 0},
        {"max_model_len": 8, "num_kv_blocks": 4, "max_num_seqs": 0},
        {"max_model_len": 33, "num_kv_blocks": 2, "block_size": 16},  # pool < one sequence
        {"max_model_len": 64, "num_kv_blocks": 3, "block_size": 16},
        {"max_model_len": 64, "num_kv_blocks": 8, "max_num_batched_tokens": 63},
        {"max_model_len": 64, "num_kv_blocks": 8, "max_prefill_row_len": 32},
        {"max_model_len": 64, "num_kv_blocks": 8, "prefill_mode": "ragged"},
        {"max_model_len": 64, "num_kv_blocks": 8, "packing_window_s": -0.1},
    ],
)
def test_config_rejects_invalid_values(kw):
    with pytest.raises(ValueError):
        SchedulerConfig(**kw)


def test_config_rejects_nan_packing_window():
    with pytest.raises(ValueError):
        SchedulerConfig(max_model_len=64, num_kv_blocks=8, packing_window_s=math.nan)


def test_config_accepts_boundary_values():
    cfg = SchedulerConfig(
        max_model_len=32, num_kv_blocks=2, block_size=16, max_num_batched_tokens=32
    )
    assert cfg.row_capacity == 32
    wide = SchedulerConfig(max_model_len=32, num_kv_blocks=2, max_prefill_row_len=48)
    assert wide.row_capacity == 48
    SchedulerConfig(max_model_len=8, num_kv_blocks=1, block_size=8, prefill_mode="padded")


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"temperature": -0.5},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"top_p": math.nan},
        {"max_tokens": 0},
        {"top_k": -2},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -2.01},
        {"frequency_penalty": math.nan},
        {"logprobs": 21},
        {"logprobs": -1},
    ],
)
def test_sampling_params_reject_invalid_values(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_sampling_params_accept_boundary_values():
    sp = SamplingParams(
        max_tokens=1,
        temperature=0.0,
        top_p=1.0,
        top_k=-1,
        presence_penalty=2.0,
        frequency_penalty=-2.0,
        logprobs=0,
    )
    assert sp.greedy
    assert not SamplingParams(temperature=0.7, logprobs=20).greedy


def test_finish_reason_mapping():
    expected = {
        RequestStatus.WAITING: None,
        RequestStatus.RUNNING: None,
        RequestStatus.FINISHED_STOPPED: "stop",
        RequestStatus.FINISHED_LENGTH: "length",
        RequestStatus.FINISHED_ABORTED: "abort",
        RequestStatus.FINISHED_ERROR: "error",
    }
    assert set(expected) == set(RequestStatus)
    for status, reason in expected.items():
        assert status.finish_reason == reason
        assert status.is_finished == (reason is not None)
