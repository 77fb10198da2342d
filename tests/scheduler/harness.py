"""Drive the scheduler step by step with `KVRunner` (no torch, no mocks), checking every step.

`Harness.step` checks the step contract and the scheduler's invariants against the state
before it: the token budget, the prefill bound while streams decode and the row capacity; FFD
rows; a decode for every running sequence past its prefill; prefill pieces cut only where the
step, a row or an aligned chunk ends; every position of an admission computed once, in order,
after its prefix-cache hit; the documented preemption victims; no admission while preempting;
policy order (priority, then shortest-first with its fairness bound, or fcfs) up to the
reasons a request may be passed over; reference counts equal to the running requests that hold
each block; the prefix-cache index (found through the tests' own chain of digests) holding
exactly the blocks whose content is the prefix its digest stands for; cache counters; events.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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
    block_hash,
    blocks_for,
)

from .kv_runner import KVRunner, TokenFn
from .reference import EOS, NO_EOS, VOCAB, chain_digests, reference_rows


def ids(requests: Iterable[Request]) -> list[str]:
    return [r.request_id for r in requests]


def all_token_ids(request: Request) -> list[int]:
    return request.prompt_token_ids + request.output_token_ids


def prefill_len(cfg: SchedulerConfig, request: Request) -> int:
    """Tokens a request prefills when admitted: the prompt alone when replaying."""
    return len(request.prompt_token_ids) if cfg.replay_preempted else request.num_tokens


def num_prefill_tokens(out: SchedulerOutput) -> int:
    return sum(seq.num_tokens for seq in out.prefills)


def row_ids(out: SchedulerOutput) -> list[list[str]]:
    return [[seq.request_id for seq in row] for row in out.rows]


def row_lens(out: SchedulerOutput) -> list[int]:
    """Real tokens in each row."""
    return [sum(seq.num_tokens for seq in row) for row in out.rows]


def cached_prefix(sched: Scheduler, request: Request, target: int) -> list[int]:
    """The blocks a request admitted now would reuse, by the documented rule (found with the
    tests' own digests): the longest registered prefix of its full blocks that leaves the last
    token of `target` to compute, in whole chunks with chunk_align."""
    cfg = sched.config
    if not cfg.enable_prefix_caching:
        return []
    bs, align = cfg.block_size, cfg.chunk_align
    usable = target - 1
    if align:
        usable = usable // align * align
    tokens = all_token_ids(request)[: usable // bs * bs]
    hit = sched.allocator.lookup(chain_digests(tokens, bs))
    if align:
        per_chunk = align // bs
        del hit[len(hit) // per_chunk * per_chunk :]
    return hit


@dataclass
class Running:
    """A running request as it was before `schedule()`."""

    request: Request
    computed: int  # num_computed_tokens
    prefill_end: int
    block_ids: list[int]

    @property
    def rid(self) -> str:
        return self.request.request_id

    @property
    def decoding(self) -> bool:
        return self.computed >= self.prefill_end


@dataclass
class Snapshot:
    """What the scheduler looked like before `schedule()`."""

    running: list[Running]
    waiting: list[Request]
    outputs: dict[str, list[int]]
    num_free: int
    skipped: dict[str, int]  # num_skipped_steps
    hits: dict[str, int]  # waiting request -> tokens its admission would find cached
    has_unfinished: bool

    @classmethod
    def of(cls, sched: Scheduler) -> Snapshot:
        cfg = sched.config
        return cls(
            running=[
                Running(r, r.num_computed_tokens, r.prefill_end, list(r.block_ids))
                for r in sched.running
            ],
            waiting=list(sched.waiting),
            outputs={rid: list(r.output_token_ids) for rid, r in sched.requests.items()},
            num_free=sched.allocator.num_free,
            skipped={rid: r.num_skipped_steps for rid, r in sched.requests.items()},
            hits={
                r.request_id: len(cached_prefix(sched, r, prefill_len(cfg, r))) * cfg.block_size
                for r in sched.waiting
            },
            has_unfinished=sched.has_unfinished,
        )


def simulate_decode_phase(cfg: SchedulerConfig, before: Snapshot) -> tuple[list[str], list[str]]:
    """The documented first phase of a step: in admission order, one decode for each running
    request past its prefill; where its next block does not fit, preempt the running request
    not yet scheduled with the highest (priority, admission position), itself included, until
    it fits. Returns the decoded ids and the victims, in order."""
    refs = Counter(b for run in before.running for b in run.block_ids)
    free = before.num_free
    alive = list(before.running)
    scheduled: list[str] = []
    victims: list[str] = []
    for run in before.running:
        if run not in alive or not run.decoding:
            continue
        need = blocks_for(run.computed + 1, cfg.block_size) - len(run.block_ids)
        while need > free:
            unscheduled = [x for x in alive if x.rid not in scheduled]
            victim = max(unscheduled, key=lambda x: (x.request.priority, alive.index(x)))
            alive.remove(victim)
            victims.append(victim.rid)
            for b in victim.block_ids:
                refs[b] -= 1
                free += refs[b] == 0
            if victim is run:
                break
        else:
            free -= max(need, 0)
            scheduled.append(run.rid)
    return scheduled, victims


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
        self.requests: dict[str, Request] = {}
        self.runner = KVRunner(config, token_fn, truth=lambda rid: self.truth[rid])
        self.truth: dict[str, list[int]] = {}  # each request's tokens while a step runs
        self.events: dict[str, list[TokenEvent]] = defaultdict(list)
        self.reasons: dict[str, str] = {}  # finish reason of every ended request
        self.history: list[SchedulerOutput] = []
        self.ended: list[str] = []  # requests that ended since the last step with work
        self.stale: set[str] = set()  # preempted in a step that did not run
        self.num_steps = 0
        # Per admission: the next position to compute, the prefill target, the cache hit.
        self.next_pos: dict[str, int] = {}
        self.targets: dict[str, int] = {}
        self.hits: dict[str, list[int]] = defaultdict(list)  # every admission's hit, in order
        self.hits_before_output: dict[str, list[int]] = defaultdict(list)
        self.first_token_step: dict[str, int] = {}
        self._digests: dict[str, list[bytes]] = {}
        self._keys: dict[str, list[int]] = {}
        self.index: dict[bytes, int] = {}  # the prefix-cache index, as found with our digests

    # -- requests in and out -----------------------------------------------------------------

    def add(self, rid: str, prompt: Sequence[int], priority: int = 0, **params) -> Request:
        return self.add_request(Request(rid, list(prompt), SamplingParams(**params), priority))

    def add_request(self, request: Request) -> Request:
        self.sched.add(request)
        self.requests[request.request_id] = request
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
            self.next_pos.pop(rid, None)
            r = self.requests[rid]
            assert r.status == status and r.block_ids == []
            assert rid not in self.sched.requests
            assert r not in self.sched.running and r not in self.sched.waiting
        self.check_state()
        return done

    def abort(self, rid: str) -> bool:
        return self.finish(rid, RequestStatus.FINISHED_ABORTED)

    # -- the step ------------------------------------------------------------------------------

    def step(self, abort_mid: Iterable[str] = ()) -> tuple[SchedulerOutput, list[TokenEvent]]:
        before = Snapshot.of(self.sched)
        out = self.sched.schedule()
        self.check_schedule(before, out)
        self.check_state()
        self.truth = {rid: all_token_ids(r) for rid, r in self.requests.items()}
        running = set(ids(self.sched.running))
        for rid in abort_mid:  # the caller ends requests while the runner works
            self.abort(rid)
        if out.is_empty:  # nothing to run: the engine skips the runner
            assert not before.has_unfinished or out.preempted_ids, "idle step with work left"
            self.stale |= set(out.preempted_ids)
            result = RunnerOutput({}, {})
        else:
            self.ended = [rid for rid in self.ended if rid not in out.finished_ids]
            self.stale -= {n.request_id for n in out.new_requests} | set(out.finished_ids)
            self.runner.registered = set(self.index.values())
            self.runner.live = running  # a request aborted while the step runs still writes
            result = self.runner(out)
            # The runner holds the running requests (one preempted in a step that did not run
            # stays until it is admitted again or reported finished).
            assert set(self.runner.states) == running | self.stale, "runner state mismatch"
        events = self.sched.update(out, result)
        self._check_events(out, events)
        self.check_state(contents=True)
        self.history.append(out)
        self.num_steps += 1
        return out, events

    def run(self, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished:
                break
            self.step()
        assert not self.sched.has_unfinished, "the scheduler did not drain"
        self.check_drained()

    # -- checks of one schedule() ------------------------------------------------------------

    def check_schedule(self, before: Snapshot, out: SchedulerOutput) -> None:
        """Check one `schedule()` against the state before it."""
        cfg, sched = self.config, self.sched
        bs, align = cfg.block_size, cfg.chunk_align
        segs = {seq.request_id: seq for seq in out.segments}
        assert len(segs) == len(out.segments), "two segments for one request"
        self._check_rows(out)

        # Preemption: the decode phase exactly as documented; later victims (prefilling
        # requests whose chunk did not fit) in decreasing (priority, admission) order.
        pos = {run.rid: i for i, run in enumerate(before.running)}
        by_id = {run.rid: run for run in before.running}
        decoded, decode_victims = simulate_decode_phase(cfg, before)
        assert sorted(s.request_id for s in out.decodes if s.request_id in by_id) == sorted(
            decoded
        ), "not every running sequence past its prefill decodes"
        assert list(out.preempted_ids[: len(decode_victims)]) == decode_victims
        preempted = set(out.preempted_ids)
        assert len(preempted) == len(out.preempted_ids) and preempted <= set(by_id)

        def key(rid: str) -> tuple[int, int]:
            return (by_id[rid].request.priority, pos[rid])

        later_victims = out.preempted_ids[len(decode_victims) :]
        survivors = [run for run in before.running if run.rid not in preempted]
        idle = [run.rid for run in survivors if run.rid not in segs]
        for a, b in zip(later_victims, later_victims[1:], strict=False):
            assert key(a) > key(b), "victims not in (priority, admission) order"
        for rid in out.preempted_ids:
            assert all(key(rid) > key(other) for other in idle), f"{rid} was not the victim"
            r = self.requests[rid]
            assert r.status == RequestStatus.WAITING and r.block_ids == []
            assert r.num_computed_tokens == 0 and rid not in segs
            self.next_pos.pop(rid, None)
        for rid in later_victims:
            assert not by_id[rid].decoding

        # Admission: from the waiting requests, never in a step that preempted.
        admitted = [n.request_id for n in out.new_requests]
        waiting_before = set(ids(before.waiting))
        assert set(admitted) <= waiting_before and len(set(admitted)) == len(admitted)
        assert not (admitted and out.preempted_ids), "admitted in a step that preempted"
        assert ids(sched.running) == [run.rid for run in survivors] + admitted
        assert sorted(ids(sched.waiting)) == sorted((waiting_before - set(admitted)) | preempted)
        assert len(sched.running) <= cfg.max_num_seqs
        assert set(segs) <= set(ids(sched.running))

        queries = hits = 0
        for new in out.new_requests:
            rid = new.request_id
            r = self.requests[rid]
            seq = segs[rid]
            target = prefill_len(cfg, r)
            assert new.params is r.params
            assert new.num_prompt_tokens == len(r.prompt_token_ids)
            assert list(new.output_token_ids) == before.outputs[rid]
            assert list(new.block_ids) + list(seq.new_block_ids) == r.block_ids
            assert r.prefill_end == target
            hit = seq.start_pos
            assert hit % bs == 0 and hit < target, f"{rid}: a hit of {hit} tokens"
            assert hit % (align or bs) == 0, f"{rid}: a hit of {hit} tokens, not whole chunks"
            if not cfg.enable_prefix_caching:
                assert hit == 0
            # The hit's blocks are the index's blocks for the request's own prefix, the longest
            # one usable (its blocks cannot have been evicted since, nor others registered).
            digests = chain_digests(all_token_ids(r)[:hit], bs)
            assert r.block_ids[: hit // bs] == [self.index.get(d) for d in digests]
            assert len(cached_prefix(sched, r, target)) * bs == hit, f"{rid}: not the longest hit"
            queries += target if cfg.enable_prefix_caching else 0
            hits += hit
            self.next_pos[rid] = hit
            self.targets[rid] = target
            self.hits[rid].append(hit)
            if not before.outputs[rid]:
                self.hits_before_output[rid].append(hit)
        assert out.num_cache_query_tokens == queries
        assert out.num_cache_hit_tokens == hits <= queries

        # Each segment: the next positions of its admission, its tokens, its block table.
        # While sequences decode, the step's prefill is bounded (the gap between a stream's
        # tokens); a piece takes what is left of that, of the budget and of a row.
        # While anything decodes, a prefill token after c cached ones is charged
        # 1 + c / prefill_context_cost (when set).
        budget_left = cfg.max_num_batched_tokens - out.num_tokens
        weighted = bool(out.decodes and cfg.prefill_context_cost)

        def weight(start: int) -> tuple[int, int]:
            k = cfg.prefill_context_cost
            return (k + start, k) if weighted else (1, 1)

        def charge(seq: ScheduledSequence) -> int:
            num, den = weight(seq.start_pos)
            return -(-seq.num_tokens * num // den)

        # While anything decodes: a bounded prefill per prompt that could be served (running
        # prefills, and waiting prompts up to the free seats).
        seats = cfg.max_num_seqs - len(before.running)
        num_prefills = min(len(before.waiting), seats) + sum(
            not run.decoding for run in before.running
        )
        prefill_cap = (
            cfg.max_prefill_tokens_while_decoding * num_prefills if out.decodes else budget_left
        )
        prefill_left = prefill_cap - (sum(map(charge, out.prefills)) if out.decodes else 0)
        assert prefill_left >= 0, "over the prefill bound of a step with decodes"

        def room(start: int) -> int:
            num, den = weight(start)
            return min(budget_left, prefill_left * den // num, cfg.row_capacity)

        for rid, seq in segs.items():
            r = self.requests[rid]
            tokens = all_token_ids(r)
            target = self.targets[rid]
            assert seq.start_pos == self.next_pos[rid], f"{rid}: a position skipped or redone"
            assert seq.num_tokens >= 1
            assert list(seq.token_ids) == tokens[seq.start_pos : seq.end_pos]
            assert seq.sample == (seq.end_pos == len(tokens))
            if seq.is_decode:  # one token past the prefill: a new one, or a replayed one
                assert seq.num_tokens == 1 and seq.start_pos >= target
                assert cfg.replay_preempted or seq.sample
            else:
                assert seq.end_pos <= target
                if align:  # whole aligned chunks, or the prefill's end
                    assert seq.start_pos % align == 0
                    assert seq.end_pos % align == 0 or seq.end_pos == target
                elif seq.end_pos < target:  # cut where the step's room or a row ends
                    assert room(seq.start_pos) == 0 or (seq.num_tokens == cfg.row_capacity), (
                        f"{rid}'s piece was cut with room left"
                    )
            if rid in by_id:
                run = by_id[rid]
                assert seq.is_decode == run.decoding
                assert seq.start_pos == run.computed
                assert run.block_ids + list(seq.new_block_ids) == r.block_ids
            assert len(r.block_ids) == blocks_for(seq.end_pos, bs)
            self.next_pos[rid] = seq.end_pos

        # Passed over only for a reason: a prefilling request not served had no room left for
        # its next piece; a waiting one not admitted (in a step that did not preempt) had no
        # seat, no room, or not the KV blocks its whole prefill needs beyond those promised.
        promised = sum(  # blocks the running prefills still need
            max(blocks_for(r.prefill_end, bs) - len(r.block_ids), 0)
            for r in sched.running
            if r.num_computed_tokens < r.prefill_end
        )
        seats_full = len(sched.running) >= cfg.max_num_seqs

        def chunk(start: int, target: int) -> int:
            return min(target, (start // align + 1) * align) - start if align else 1

        def no_room(run: Running) -> bool:
            return chunk(run.computed, run.prefill_end) > room(run.computed)

        def kv_blocked(r: Request) -> bool:
            target = prefill_len(cfg, r)
            hit = cached_prefix(sched, r, target)
            hit_free = sum(sched.allocator.is_free(b) for b in hit)
            need = blocks_for(target, bs) - len(hit)
            return need + promised > sched.allocator.num_free - hit_free

        def refused(r: Request) -> bool:
            target = prefill_len(cfg, r)
            start = len(cached_prefix(sched, r, target)) * bs
            return seats_full or chunk(start, target) > room(start) or kv_blocked(r)

        for rid in idle:
            if not by_id[rid].decoding:
                assert no_room(by_id[rid]), f"running {rid} got no piece with room left"
        if not out.preempted_ids:
            for r in sched.waiting:
                assert refused(r), f"{r.request_id} could have been admitted"

        # Policy order: a candidate passed over while a later one in the order was served had
        # no room (or, waiting, no seat while a running prefill was served, or no KV blocks).
        # Checked where the hits the order was made with are known: none changed in the step.
        candidates = [
            run.request
            for run in before.running
            if not run.decoding and run.rid not in decode_victims
        ]
        if not decode_victims:
            candidates += before.waiting
        stable = all(
            before.hits[r.request_id]
            == (
                segs[r.request_id].start_pos
                if r.request_id in admitted
                else len(cached_prefix(sched, r, prefill_len(cfg, r))) * bs
            )
            for r in before.waiting
            if r in candidates
        )
        # Overtaken: a candidate left out of a step in which a later arrival was served.
        latest = max((r.arrival_index for r in candidates if r.request_id in segs), default=-1)
        for r in candidates:
            overtaken = r.request_id not in segs and r.arrival_index < latest
            assert r.num_skipped_steps == before.skipped[r.request_id] + overtaken
        for rid in set(before.skipped) - set(ids(candidates)):
            assert self.requests[rid].num_skipped_steps == before.skipped[rid]
        if stable:
            order = sorted(candidates, key=lambda r: self._policy_key(before, by_id, r))
            for i, r in enumerate(order):
                rid = r.request_id
                if rid in segs or rid in preempted:
                    continue
                for later in order[i + 1 :]:
                    if later.request_id not in segs:
                        continue
                    if rid in by_id:
                        assert no_room(by_id[rid]), f"{later.request_id} overtook {rid}"
                    elif not out.preempted_ids:  # else no admission after the preemption
                        assert (
                            (seats_full and later.request_id not in admitted)
                            or chunk(before.hits[rid], prefill_len(cfg, r)) > room(before.hits[rid])
                            or kv_blocked(r)
                        ), f"{later.request_id} overtook {rid}"

        # Requests that ended are reported once, in the first step with work after they ended.
        if out.is_empty:
            assert out.finished_ids == ()
        else:
            assert sorted(out.finished_ids) == sorted(self.ended)

    def _policy_key(self, before: Snapshot, by_id: dict[str, Running], r: Request) -> tuple:
        """The documented service order: priority, then (fcfs) arrival; or (shortest-first)
        the requests overtaken in fairness_steps steps in arrival order, then the shortest
        uncached prefill left, ties by arrival."""
        cfg = self.config
        if cfg.policy == "fcfs":
            return (r.priority, r.arrival_index)
        if before.skipped[r.request_id] >= cfg.fairness_steps:
            return (r.priority, 0, r.arrival_index, 0)
        if r.request_id in by_id:
            run = by_id[r.request_id]
            left = run.prefill_end - run.computed
        else:
            left = prefill_len(cfg, r) - before.hits[r.request_id]
        return (r.priority, 1, left, r.arrival_index)

    def _check_rows(self, out: SchedulerOutput) -> None:
        """The step's token budget, the row capacity, and how segments are laid out."""
        cfg = self.config
        assert out.num_tokens <= cfg.max_num_batched_tokens, "over the step's token budget"
        assert out.num_tokens == sum(row_lens(out)) + len(out.decode_batch)
        for row in out.rows:
            assert row, "empty row"
            assert sum(seq.num_tokens for seq in row) <= cfg.row_capacity, "row over capacity"
        if cfg.mix_decodes:
            assert out.decode_batch == ()
        else:  # decode tokens run as a forward of their own
            assert all(not seq.is_decode for row in out.rows for seq in row)
            assert all(seq.is_decode for seq in out.decode_batch)
        assert out.segments == (*(seq for row in out.rows for seq in row), *out.decode_batch)
        assert out.prefills == tuple(s for s in out.segments if not s.is_decode)
        assert out.decodes == tuple(s for s in out.segments if s.is_decode)
        assert out.is_empty == (not out.segments)
        if cfg.prefill_mode == "padded":
            assert all(len(row) == 1 for row in out.rows), "padded mode: one segment a row"
        else:  # FFD: the rows' lengths are FFD's whatever the order of equal lengths
            lengths = [seq.num_tokens for row in out.rows for seq in row]
            expect = [[lengths[i] for i in b] for b in reference_rows(lengths, cfg.row_capacity)]
            assert [[seq.num_tokens for seq in row] for row in out.rows] == expect, "not FFD"

    # -- checks of the state -------------------------------------------------------------------

    def digests(self, rid: str) -> list[bytes]:
        """The chain of digests of a request's full blocks (extended as it generates)."""
        tokens = all_token_ids(self.requests[rid])
        bs = self.config.block_size
        known = self._digests.setdefault(rid, [])
        for i in range(len(known), len(tokens) // bs):
            parent = known[-1] if known else b""
            known.append(block_hash(parent, tokens[i * bs : (i + 1) * bs]))
        return known

    def keys(self, rid: str) -> list[int]:
        """`chain_keys` of a request's tokens (extended as it generates)."""
        tokens = all_token_ids(self.requests[rid])
        known = self._keys.setdefault(rid, [])
        for token in tokens[len(known) :]:
            known.append(hash((known[-1] if known else 0, token)))
        return known

    def check_state(self, contents: bool = False) -> None:
        """Block ownership and the prefix-cache index. Reference counts equal the running
        requests holding each block; a block held by two is registered. Every registered block
        is found by the digest of a prefix some request has, no block under two digests; with
        `contents`, each holds exactly the K/V of that prefix."""
        sched, alloc = self.sched, self.sched.allocator
        total = self.config.num_kv_blocks
        refs = Counter(b for r in sched.running for b in r.block_ids)
        for r in sched.running:
            assert r.status == RequestStatus.RUNNING
            assert len(set(r.block_ids)) == len(r.block_ids)
            assert all(0 <= b < total for b in r.block_ids)
        for r in sched.waiting:
            assert r.status == RequestStatus.WAITING
            assert r.block_ids == [] and r.num_computed_tokens == 0
        assert [alloc.ref_counts[b] for b in range(total)] == [refs[b] for b in range(total)]
        assert all(alloc.is_free(b) == (refs[b] == 0) for b in range(total))
        assert alloc.num_free == total - len(refs) and alloc.num_used == len(refs)
        index: dict[bytes, int] = {}
        stands_for: dict[bytes, tuple[str, int]] = {}  # (request, end) of the prefix
        bs = self.config.block_size
        for rid, r in self.requests.items():
            digests = self.digests(rid)
            assert r.block_hashes == digests[: len(r.block_hashes)], f"{rid}: wrong digests"
            for i, digest in enumerate(digests):
                found = alloc.lookup([digest])
                if found:
                    index[digest] = found[0]
                    stands_for[digest] = (rid, (i + 1) * bs)
        if not self.config.enable_prefix_caching:
            assert not index
        assert alloc.num_cached == len(index), "a block registered under a digest of no prefix"
        assert len(set(index.values())) == len(index), "one block under two prefixes"
        assert {b for b, n in refs.items() if n > 1} <= set(index.values())
        self.index = index
        if contents:
            cache = self.runner.cache
            for digest, block in index.items():
                rid, end = stands_for[digest]
                tokens, keys = all_token_ids(self.requests[rid]), self.keys(rid)
                expect = [(tokens[p], keys[p]) for p in range(end - bs, end)]
                assert cache[block] == expect, f"block {block} is not the prefix it stands for"

    def _check_events(self, out: SchedulerOutput, events: list[TokenEvent]) -> None:
        live = {s.request_id for s in out.segments if self.reasons.get(s.request_id) != "abort"}
        sampling = {s.request_id for s in out.segments if s.sample}
        assert sorted(e.request_id for e in events) == sorted(live & sampling)
        for e in events:
            rid = e.request_id
            assert rid not in self.reasons, "event after the request ended"
            r = self.requests[rid]
            assert len(e.new_token_ids) == 1 and r.output_token_ids[-1] == e.new_token_ids[0]
            # The hit of an admission before its first token (that it is the first admission's,
            # as documented, is test_prefix_cache's `test_num_cached_tokens_is_the_first_...`).
            assert e.num_cached_tokens == r.num_cached_tokens
            assert e.num_cached_tokens in self.hits_before_output[rid]
            # Sampled with every token generated before it (penalties, seeded draw index).
            assert self.runner.sampled_with[rid] == tuple(r.output_token_ids[:-1])
            self.events[rid].append(e)
            self.first_token_step.setdefault(rid, self.num_steps)
            if e.finish_reason is None:
                assert r in self.sched.running and r.status == RequestStatus.RUNNING
                assert r.num_computed_tokens == r.num_tokens - 1
                assert len(r.block_ids) == blocks_for(r.num_computed_tokens, self.config.block_size)
                assert self.runner.states[rid].output_token_ids == r.output_token_ids
            else:
                self.reasons[rid] = e.finish_reason
                self.ended.append(rid)
                self.next_pos.pop(rid, None)
                assert r.status.is_finished and r.status.finish_reason == e.finish_reason
                assert r.block_ids == [] and rid not in self.sched.requests
                assert r not in self.sched.running
        for seq in out.segments:  # the scheduler's count of computed tokens is the runner's
            r = self.requests[seq.request_id]
            if seq.request_id in self.sched.requests:
                assert r.num_computed_tokens == seq.end_pos

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
        assert set(self.runner.states) <= set(self.ended) | self.stale
        # The free list holds every block exactly once (taken from a copy: the cached blocks
        # stay for the requests a test adds next).
        assert sorted(copy.deepcopy(s.allocator).allocate(self.config.num_kv_blocks)) == list(
            range(self.config.num_kv_blocks)
        )

    # -- what happened ---------------------------------------------------------------------------

    def tokens(self, rid: str) -> list[int]:
        return list(self.requests[rid].output_token_ids)

    def num_preemptions(self, rid: str) -> int:
        return sum(rid in out.preempted_ids for out in self.history)


# The scheduler config has no defaults (the engine's EngineConfig holds them); these are the
# tests' own, with the engine's policies (shortest-first, prefix caching, decodes mixed in).
TEST_CONFIG = SchedulerConfig(
    max_model_len=32,
    num_kv_blocks=256,
    block_size=4,
    max_num_seqs=8,
    max_num_batched_tokens=4096,
    max_prefill_tokens_while_decoding=4096,
    prefill_context_cost=0,
    max_prefill_row_len=0,
    prefill_mode="packed",
    mix_decodes=True,
    policy="shortest-first",
    fairness_steps=32,
    enable_prefix_caching=True,
    chunk_align=0,
    replay_preempted=False,
)


def config(**kw: Any) -> SchedulerConfig:
    """TEST_CONFIG with these fields changed (padded mode runs decodes apart)."""
    if kw.get("prefill_mode") == "padded":
        kw.setdefault("mix_decodes", False)
    return dataclasses.replace(TEST_CONFIG, **kw)


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 31 + 7 * i) % VOCAB for i in range(n)]


def scripted(prompts: dict[str, list[int]], scripts: dict[str, list[int]]) -> TokenFn:
    """A runner whose k-th sampled token for a request is scripts[request][k]."""
    return lambda rid, ctx: scripts[rid][len(ctx) - len(prompts[rid])]


def preemption_workload(num_kv_blocks: int, **kw) -> Harness:
    """A, B, C: 3-token prompts, 6 tokens each, 2 blocks of 2 each once prefilled; a pool of
    6 blocks makes them preempt one another."""
    cfg = config(max_model_len=12, num_kv_blocks=num_kv_blocks, block_size=2, **kw)
    h = Harness(cfg, eos=NO_EOS)
    for i, rid in enumerate("ABC"):
        h.add(rid, prompt(i + 1, 3), max_tokens=6)
    return h
