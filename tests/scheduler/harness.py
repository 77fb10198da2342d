"""Drive the scheduler step by step with a hand-built runner (no torch, no mocks).

The runner here is a stand-in for the model and for `kernels.Runner`'s bookkeeping: it keeps
each running request's state (block table, generated tokens) from the step deltas alone, as the
real runner does, writes each scheduled segment's tokens into a paged "KV cache" of token ids
through that block table, reads the whole context back through it, and samples a deterministic
function of it. Block tables that are short, shared between sequences, stale after reuse or
wrongly rebuilt from the deltas corrupt what is read back, and with it the sampled tokens, which
are compared against a reference generation computed without the scheduler.

Every step also goes through `Harness.step`, which checks the step contract and the scheduler's
invariants (budgets, FCFS, block tables, preemption order, deltas, events) against the state
before it, and that the runner holds state for exactly the requests of the step it ran.

Also here: the reference first-fit-decreasing (shared with test_packing.py) and the hypothesis
strategy of random workloads.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from hypothesis import strategies as st

from packserve.scheduler import (
    Request,
    RequestStatus,
    RunnerOutput,
    SamplingParams,
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


@dataclass
class RunnerState:
    """What the runner keeps about one request, rebuilt from the step deltas only."""

    params: SamplingParams
    num_prompt_tokens: int
    output_token_ids: list[int]
    block_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)


class KVRunner:
    """Paged token-id cache addressed by block tables it keeps from the deltas; samples from
    it. Records, for each sampled request, the generated tokens it would have sampled with
    (penalties, the seeded draw index)."""

    def __init__(self, config: SchedulerConfig, token_fn: TokenFn | None = None) -> None:
        self.block_size = config.block_size
        self.cache: list[list[int | None]] = [
            [None] * config.block_size for _ in range(config.num_kv_blocks)
        ]
        self.token_fn = token_fn or (lambda rid, ctx: next_token(ctx))
        self.logprobs: dict[str, TokenLogprobs] = {}
        self.states: dict[str, RunnerState] = {}
        self.sampled_with: dict[str, tuple[int, ...]] = {}  # this step's sampling inputs

    def _slot(self, table: list[int], pos: int) -> tuple[list[int | None], int]:
        return self.cache[table[pos // self.block_size]], pos % self.block_size

    def __call__(self, out: SchedulerOutput) -> RunnerOutput:
        for rid in (*out.preempted_ids, *out.finished_ids):
            self.states.pop(rid, None)
        for new in out.new_requests:
            self.states[new.request_id] = RunnerState(
                new.params, new.num_prompt_tokens, list(new.output_token_ids), list(new.block_ids)
            )
        seqs = (*out.prefills, *out.decodes)
        for seq in seqs:
            self.states[seq.request_id].block_ids += seq.new_block_ids
        # The whole batch writes its K/V first, then attends: shared blocks would clobber.
        for seq in seqs:
            table = self.states[seq.request_id].block_ids
            for j, token in enumerate(seq.token_ids):
                block, off = self._slot(table, seq.start_pos + j)
                block[off] = token
        sampled = {}
        self.sampled_with = {}
        for seq in seqs:
            state = self.states[seq.request_id]
            ctx = []
            for pos in range(seq.end_pos):
                block, off = self._slot(state.block_ids, pos)
                ctx.append(block[off])
            assert None not in ctx, f"{seq.request_id} read a KV slot nobody wrote"
            token = self.token_fn(seq.request_id, ctx)
            sampled[seq.request_id] = token
            self.sampled_with[seq.request_id] = tuple(state.output_token_ids)
            if seq.end_pos == state.num_tokens:  # a new token, not a replayed position's
                state.output_token_ids.append(token)
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


def all_token_ids(request: Request) -> list[int]:
    return request.prompt_token_ids + request.output_token_ids


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


def num_prefill_tokens(out: SchedulerOutput) -> int:
    return sum(seq.num_tokens for seq in out.prefills)


def check_schedule(
    sched: Scheduler, before: Snapshot, out: SchedulerOutput, ended: list[str]
) -> None:
    """Check one `schedule()` against the state before it; `ended` holds the requests that
    ended since the last step with work, which this one must report if it has work."""
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
            left = cfg.max_num_batched_tokens - len(out.decodes) - num_prefill_tokens(out)
            assert (
                len(sched.running) >= cfg.max_num_seqs
                or head_len > left
                or blocks_for(head_len, bs) > sched.allocator.num_free
            ), f"{head.request_id} could have been admitted"

    # Budgets.
    assert num_prefill_tokens(out) + len(out.decodes) <= cfg.max_num_batched_tokens
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

    # Admitted requests are sent whole, once: what the runner keeps about each.
    assert [n.request_id for n in out.new_requests] == ids(admitted)
    new = {n.request_id: n for n in out.new_requests}
    for r in admitted:
        n = new[r.request_id]
        assert n.params is r.params
        assert n.num_prompt_tokens == len(r.prompt_token_ids)
        assert list(n.output_token_ids) == before.outputs[r.request_id]

    # Each segment: its tokens, and the block table the runner rebuilds from the deltas.
    old_tables = {r.request_id: b for r, _, b in before.running}
    computed = {r.request_id: c for r, c, _ in before.running}
    for seq in (*out.prefills, *out.decodes):
        r = sched.requests[seq.request_id]
        if seq.request_id in new:
            table = list(new[seq.request_id].block_ids) + list(seq.new_block_ids)
            assert seq.start_pos == 0
            assert list(seq.token_ids) == all_token_ids(r)[: prefill_len(cfg, r)]
        else:  # the next token without K/V: the last one, or a replayed one
            table = old_tables[seq.request_id] + list(seq.new_block_ids)
            assert seq.start_pos == computed[seq.request_id] < r.num_tokens
            assert cfg.replay_preempted or seq.start_pos == r.num_tokens - 1
            assert seq.token_ids == (all_token_ids(r)[seq.start_pos],)
        assert table == r.block_ids, "the runner's block table differs from the scheduler's"
        assert len(table) == blocks_for(seq.end_pos, bs)

    # Requests that ended are reported once, in the first step with work after they ended.
    if out.is_empty:
        assert out.finished_ids == ()
    else:
        assert sorted(out.finished_ids) == sorted(ended)
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
        self.ended: list[str] = []  # requests that ended since the last step with work

    def add(self, rid: str, prompt: Sequence[int], **params) -> Request:
        request = Request(rid, list(prompt), SamplingParams(**params))
        self.sched.add(request)
        self.requests[rid] = request
        return request

    def finish(self, rid: str, status: RequestStatus) -> bool:
        """End a request from outside the scheduler, as the engine does (abort, stop string,
        error)."""
        done = self.sched.finish_request(rid, status)
        if done:
            assert rid not in self.reasons
            reason = status.finish_reason
            assert reason is not None
            self.reasons[rid] = reason
            self.ended.append(rid)
            r = self.requests[rid]
            assert r.status == status and r.block_ids == []
            assert rid not in self.sched.requests
            assert r not in self.sched.running and r not in self.sched.waiting
        check_blocks(self.sched)
        return done

    def abort(self, rid: str) -> bool:
        return self.finish(rid, RequestStatus.FINISHED_ABORTED)

    def step(self, abort_mid: Iterable[str] = ()) -> tuple[SchedulerOutput, list[TokenEvent]]:
        before = Snapshot.of(self.sched)
        out = self.sched.schedule()
        check_schedule(self.sched, before, out, self.ended)
        scheduled = {s.request_id for s in (*out.prefills, *out.decodes)}
        for rid in abort_mid:  # the caller ends requests while the runner works
            self.abort(rid)
        # A replaying sequence runs a token it already has: it gains none in this step.
        replaying = {
            s.request_id
            for s in (*out.prefills, *out.decodes)
            if s.end_pos < self.requests[s.request_id].num_tokens
        }
        if out.is_empty:  # nothing to run: the engine skips the runner
            result = RunnerOutput({}, {})
        else:
            self.ended = [rid for rid in self.ended if rid not in out.finished_ids]
            result = self.runner(out)
            assert set(self.runner.states) == scheduled, "runner state for the wrong requests"
        events = self.sched.update(out, result)
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
            # Sampled with every token generated before it (penalties, seeded draw index).
            assert self.runner.sampled_with[e.request_id] == tuple(r.output_token_ids[:-1])
            self.events[e.request_id].append(e)
            if e.finish_reason is None:
                assert r in self.sched.running and r.status == RequestStatus.RUNNING
                assert r.num_computed_tokens == r.num_tokens - 1
                assert len(r.block_ids) == blocks_for(r.num_computed_tokens, self.config.block_size)
                state = self.runner.states[e.request_id]
                assert state.output_token_ids == r.output_token_ids
            else:
                self.reasons[e.request_id] = e.finish_reason
                self.ended.append(e.request_id)
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
        # The runner holds nothing the next step with work would not tell it to drop.
        assert set(self.runner.states) <= set(self.ended)
        # The free list holds every block exactly once.
        assert sorted(s.allocator.allocate(self.config.num_kv_blocks)) == list(
            range(self.config.num_kv_blocks)
        )

    def tokens(self, rid: str) -> list[int]:
        return list(self.requests[rid].output_token_ids)

    def num_preemptions(self, rid: str) -> int:
        return sum(rid in out.preempted_ids for out in self.history)


def prefill_len(cfg: SchedulerConfig, request: Request) -> int:
    """Tokens a request prefills when admitted: the prompt alone when replaying."""
    return len(request.prompt_token_ids) if cfg.replay_preempted else request.num_tokens


# The scheduler config has no defaults (the engine's EngineConfig holds them); these are the
# tests' own, with the engine's budgets and policies.
TEST_CONFIG = {
    "max_model_len": 32,
    "num_kv_blocks": 256,
    "block_size": 4,
    "max_num_seqs": 64,
    "max_num_batched_tokens": 4096,
    "max_prefill_row_len": 0,
    "prefill_mode": "packed",
    "replay_preempted": False,
}


def config(**kw) -> SchedulerConfig:
    return SchedulerConfig(**(TEST_CONFIG | kw))


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 31 + 7 * i) % VOCAB for i in range(n)]


def scripted(prompts: dict[str, list[int]], scripts: dict[str, list[int]]) -> TokenFn:
    """A runner whose k-th sampled token for a request is scripts[request][k]."""
    return lambda rid, ctx: scripts[rid][len(ctx) - len(prompts[rid])]


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
    """A scheduler config and jobs arriving (and maybe aborted) over the first steps."""
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
