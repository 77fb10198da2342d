"""Continuous batching with chunked prefill, prefix caching and FFD-packed mixed steps. Pure
Python."""

from __future__ import annotations

import itertools

from .block_manager import BlockAllocator, block_hash, blocks_for
from .config import SchedulerConfig
from .lora_slots import LoRASlots
from .outputs import NewRequest, RunnerOutput, ScheduledSequence, SchedulerOutput, TokenEvent
from .packing import pack_rows
from .request import Request, RequestStatus


class Scheduler:
    """Owns request state and KV-block accounting; decides each step's segments.

    A step spends at most `max_num_batched_tokens` tokens: first one decode token for every
    running sequence past its prefill, then prefill pieces. While anything decodes, the
    prefill pieces take at most `max_prefill_tokens_while_decoding` per prompt that could be
    served (running prefills, and waiting prompts up to the free seats), a piece's tokens
    charged more the deeper its context: one long prompt lengthens the running streams' steps
    by a bounded amount, and a burst of prompts fills the budget instead of queueing behind
    the streams it started. Prefills are served in
    policy order: priority first, then the shortest uncached prefill (or arrival order under
    fcfs), a prompt overtaken for `fairness_steps` steps going first. A prompt that does not
    fit what the step has left is cut (chunked prefill); a prompt whose leading blocks are in
    the prefix cache starts after them. The segments are packed into rows first-fit-decreasing.

    The runner holds each running request's state; a step sends a request whole once, when it
    is (re)admitted, and afterwards only what changed (a segment's tokens and new blocks), with
    the ids whose state the runner should drop.
    """

    def __init__(self, config: SchedulerConfig, eos_token_ids: frozenset[int]) -> None:
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.allocator = BlockAllocator(config.num_kv_blocks)
        self.lora = LoRASlots(config.max_loras)  # adapters resident in the runner's pool
        self.waiting: list[Request] = []  # served in policy order, not list order
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}  # every unfinished request by id
        self.num_preemptions_total = 0
        self._finished_ids: list[str] = []  # ended since the last step with work
        self._arrivals = itertools.count()

    # -- requests in and out ------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request. Raises ValueError if it can never run."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if not request.prompt_token_ids:
            raise ValueError("the prompt must hold at least one token")
        if request.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"the prompt has {request.num_tokens} tokens; this model's context is "
                f"{self.config.max_model_len} tokens including at least one generated token"
            )
        request.arrival_index = next(self._arrivals)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> bool:
        """End a request (abort, stop string, error) and free its blocks.

        Returns False if the request is unknown or already finished.
        """
        assert status.is_finished
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        if request.status == RequestStatus.RUNNING:
            self._stop_running(request)
        else:
            self.waiting.remove(request)
        self._free(request)
        request.status = status
        self._finished_ids.append(request_id)
        return True

    # -- the step -------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Choose this step's work: a decode for each running sequence past its prefill, then
        prefill pieces in policy order while the budget, the seats and the KV pool allow."""
        step = _Step(self.config.max_num_batched_tokens, self.config.prefill_context_cost)
        # Prompts that could get prefill work: running prefills, waiting ones up to the seats.
        seats = self.config.max_num_seqs - len(self.running)
        num_prefills = min(len(self.waiting), seats) + sum(
            not self._is_decoding(r) for r in self.running
        )
        for request in list(self.running):
            if request.status == RequestStatus.RUNNING and self._is_decoding(request):
                self._schedule_decode(request, step)
        if step.segments:  # streams are decoding: a bounded prefill per prompt served
            step.decoding = True
            step.prefill_left = self.config.max_prefill_tokens_while_decoding * num_prefills
        candidates = [r for r in self.running if r.request_id not in step.segments]
        if not step.preempted:  # admitting while preempting would only evict again (as vLLM)
            candidates += self.waiting
        for request in self._ordered(candidates):
            if step.room(0) == 0:
                break
            if request.status == RequestStatus.RUNNING:
                self._schedule_prefill(request, step)
            elif not step.preempted:  # waiting, and nobody was preempted (nor is this one)
                self._try_admit(request, step)
        self._count_skips(candidates, step)
        return self._output(step)

    def update(self, output: SchedulerOutput, result: RunnerOutput) -> list[TokenEvent]:
        """Record what ran: computed tokens, newly full blocks for the prefix cache, sampled
        tokens; finish what is done. One event per segment that sampled."""
        events = []
        for seq in output.segments:
            request = self.requests.get(seq.request_id)
            if request is None:  # finished by the caller while the step ran
                continue
            request.num_computed_tokens = seq.end_pos
            self._register_blocks(request, seq.start_pos)
            if not seq.sample:  # a prompt's chunk, or a replayed token
                continue
            token = result.sampled_token_ids[seq.request_id]
            request.output_token_ids.append(token)
            status = self._finished_status(request, token)
            if status is not None:
                self.finish_request(request.request_id, status)
            logprobs = result.logprobs.get(seq.request_id)
            events.append(
                TokenEvent(
                    request_id=seq.request_id,
                    new_token_ids=(token,),
                    finish_reason=status.finish_reason if status else None,
                    logprobs=(logprobs,) if logprobs else (),
                    num_cached_tokens=request.num_cached_tokens or 0,
                )
            )
        return events

    # -- state ----------------------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- decodes and prefills -------------------------------------------------------------------

    def _is_decoding(self, request: Request) -> bool:
        return request.num_computed_tokens >= request.prefill_end

    def _schedule_decode(self, request: Request, step: _Step) -> None:
        pos = request.num_computed_tokens  # the first token without K/V
        new_block_ids = self._grow(request, pos + 1, step)
        if new_block_ids is None:  # it was the one to preempt
            return
        step.add(
            ScheduledSequence(
                request_id=request.request_id,
                token_ids=request.known_token_ids(pos, pos + 1),
                start_pos=pos,
                new_block_ids=new_block_ids,
                is_decode=True,
                sample=pos + 1 == request.num_tokens,
            )
        )

    def _schedule_prefill(self, request: Request, step: _Step) -> None:
        """The next chunk of a running request's prefill, if one fits the step."""
        start = request.num_computed_tokens
        end = self._chunk_end(request, start, step.room(start))
        if end == start:
            return
        new_block_ids = self._grow(request, end, step)
        if new_block_ids is not None:
            step.add(self._prefill_segment(request, start, end, new_block_ids))

    def _try_admit(self, request: Request, step: _Step) -> None:
        """Admit a waiting request with its first chunk, if a seat, the budget and the KV pool
        (after the blocks promised to unfinished prefills) allow."""
        if len(self.running) >= self.config.max_num_seqs:
            return
        if not self._adapter_ready(request):
            return
        target = self._prefill_target(request)
        hit = self._cached_prefix(request, target)
        start = len(hit) * self.config.block_size
        end = self._chunk_end(request, start, step.room(start), target)
        if end == start:
            return
        hit_free = sum(self.allocator.is_free(b) for b in hit)
        need_all = blocks_for(target, self.config.block_size) - len(hit)
        if need_all + self._promised_blocks() > self.allocator.num_free - hit_free:
            return
        self.allocator.share(hit)
        request.block_ids = hit + self.allocator.allocate(
            blocks_for(end, self.config.block_size) - len(hit)
        )
        if request.adapter is not None:
            self.lora.acquire(request.adapter)
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = start
        request.prefill_end = target
        if request.num_cached_tokens is None:  # usage reports the first admission's hit
            request.num_cached_tokens = start
        self.waiting.remove(request)
        self.running.append(request)
        step.new_requests.append(self._new_request(request))
        step.cache_queries += target if self.config.enable_prefix_caching else 0
        step.cache_hits += start
        step.add(self._prefill_segment(request, start, end, ()))

    def _prefill_segment(
        self, request: Request, start: int, end: int, new_block_ids: tuple[int, ...]
    ) -> ScheduledSequence:
        return ScheduledSequence(
            request_id=request.request_id,
            token_ids=request.known_token_ids(start, end),
            start_pos=start,
            new_block_ids=new_block_ids,
            is_decode=False,
            sample=end == request.num_tokens,
        )

    def _prefill_target(self, request: Request) -> int:
        """Tokens prefilled after an admission: all known ones, or the prompt alone when
        replaying a preempted request's generated tokens."""
        if self.config.replay_preempted:
            return len(request.prompt_token_ids)
        return request.num_tokens

    def _chunk_end(self, request: Request, start: int, budget: int, target: int = 0) -> int:
        """Where a prefill piece from `start` ends, given what the step has left: at the
        target, or where the budget (or a row) ends; with chunk_align, at the next multiple of
        it (or the target), and only if that whole chunk fits. `start` when nothing fits."""
        target = target or request.prefill_end
        room = min(budget, self.config.row_capacity)
        align = self.config.chunk_align
        if not align:
            return min(target, start + room)
        end = min(target, (start // align + 1) * align)
        return end if end - start <= room else start

    def _grow(self, request: Request, end: int, step: _Step) -> tuple[int, ...] | None:
        """Blocks for a running request's positions up to `end`, preempting unscheduled
        requests (the lowest priority, most recently admitted first) until they fit. None
        if the request itself was the one preempted."""
        need = blocks_for(end, self.config.block_size) - len(request.block_ids)
        while need > self.allocator.num_free:
            _, _, victim = max(  # by priority, then admission order
                (r.priority, i, r)
                for i, r in enumerate(self.running)
                if r.request_id not in step.segments
            )
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is request:
                return None
        new_block_ids = self.allocator.allocate(max(need, 0))
        request.block_ids += new_block_ids
        return tuple(new_block_ids)

    def _promised_blocks(self) -> int:
        """Blocks the running prefills still need to finish: admission leaves them free."""
        size = self.config.block_size
        return sum(
            max(blocks_for(r.prefill_end, size) - len(r.block_ids), 0)
            for r in self.running
            if not self._is_decoding(r)
        )

    def _ordered(self, candidates: list[Request]) -> list[Request]:
        """Prefill candidates in service order: priority, then (shortest-first) the requests
        overtaken for `fairness_steps` steps in arrival order, then the rest by uncached
        prefill left; or (fcfs) arrival order."""
        if self.config.policy == "fcfs":
            return sorted(candidates, key=lambda r: (r.priority, r.arrival_index))

        def key(r: Request) -> tuple[int, int, int, int]:
            if r.num_skipped_steps >= self.config.fairness_steps:
                return (r.priority, 0, r.arrival_index, 0)
            if r.status == RequestStatus.WAITING:
                target = self._prefill_target(r)
                left = target - len(self._cached_prefix(r, target)) * self.config.block_size
            else:
                left = r.prefill_end - r.num_computed_tokens
            return (r.priority, 1, left, r.arrival_index)

        return sorted(candidates, key=key)

    def _count_skips(self, candidates: list[Request], step: _Step) -> None:
        """A candidate left out of a step in which a later arrival was served was overtaken."""
        served = [r.arrival_index for r in candidates if r.request_id in step.segments]
        latest = max(served, default=-1)
        for request in candidates:
            if request.request_id not in step.segments and request.arrival_index < latest:
                request.num_skipped_steps += 1

    def _output(self, step: _Step) -> SchedulerOutput:
        finished_ids: tuple[str, ...] = ()
        if step.segments:  # a step with no work is not run: keep the ids for the next
            finished_ids = tuple(self._finished_ids)
            self._finished_ids.clear()
        segments = list(step.segments.values())
        mixed = self.config.mix_decodes
        to_pack = segments if mixed else [s for s in segments if not s.is_decode]
        if self.config.prefill_mode == "padded":
            bins = [[i] for i in range(len(to_pack))]
        else:
            bins = pack_rows([s.num_tokens for s in to_pack], self.config.row_capacity)
        return SchedulerOutput(
            new_requests=tuple(step.new_requests),
            rows=tuple(tuple(to_pack[i] for i in row) for row in bins),
            decode_batch=() if mixed else tuple(s for s in segments if s.is_decode),
            preempted_ids=tuple(r.request_id for r in step.preempted),
            finished_ids=finished_ids,
            num_cache_query_tokens=step.cache_queries,
            num_cache_hit_tokens=step.cache_hits,
        )

    # -- the prefix cache -----------------------------------------------------------------------

    def _cached_prefix(self, request: Request, target: int) -> list[int]:
        """The cached blocks a request admitted now would reuse: the longest registered prefix
        of its full blocks, leaving at least the last token of `target` to compute (its
        logits are needed); in whole chunks with chunk_align."""
        if not self.config.enable_prefix_caching:
            return []
        size, align = self.config.block_size, self.config.chunk_align
        usable = target - 1
        if align:
            usable = usable // align * align
        num_blocks = usable // size
        self._hash_blocks(request, num_blocks)
        hit = self.allocator.lookup(request.block_hashes[:num_blocks])
        if align:
            del hit[len(hit) // (align // size) * (align // size) :]
        return hit

    def _register_blocks(self, request: Request, start: int) -> None:
        """Register the blocks a segment from `start` completed (K/V now cached). With
        chunk_align, only blocks of whole chunks computed by the prefill."""
        if not self.config.enable_prefix_caching:
            return
        size, align = self.config.block_size, self.config.chunk_align

        def complete(computed: int) -> int:  # registrable blocks once `computed` are
            if align:
                computed = min(computed, request.prefill_end) // align * align
            return computed // size

        first, end = complete(start), complete(request.num_computed_tokens)
        self._hash_blocks(request, end)
        for i in range(first, end):
            self.allocator.register(request.block_ids[i], request.block_hashes[i])

    def _hash_blocks(self, request: Request, num_blocks: int) -> None:
        """Extend the request's chain of block digests to its first `num_blocks` blocks."""
        size = self.config.block_size
        hashes = request.block_hashes
        for i in range(len(hashes), num_blocks):
            parent = hashes[-1] if hashes else request.cache_salt
            hashes.append(block_hash(parent, request.known_token_ids(i * size, (i + 1) * size)))

    # -- internals ------------------------------------------------------------------------------

    def _adapter_ready(self, request: Request) -> bool:
        """Whether the request's LoRA adapter (if any) is in the pool. If not, a slot is
        reserved for it when one can be (the engine then loads it between steps): the request
        waits without holding anyone else up."""
        name = request.adapter
        if name is None:
            return True
        if self.lora.is_loaded(name):
            self.lora.touch(name)  # wanted: the last idle adapter to evict
            return True
        self.lora.reserve(name)
        return False

    def _lora_slot(self, request: Request) -> int:
        """The pool slot of a running request's adapter; -1 for the base model."""
        if request.adapter is None:
            return -1
        slot = self.lora.slot_of(request.adapter)
        assert slot is not None, "a running request's adapter is resident"
        return slot

    def _stop_running(self, request: Request) -> None:
        self.running.remove(request)
        if request.adapter is not None:
            self.lora.release(request.adapter)

    def _preempt(self, request: Request) -> None:
        """Free a running request's blocks and requeue it, for recompute."""
        self._stop_running(request)
        self._free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.prefill_end = 0
        self.num_preemptions_total += 1
        self.waiting.append(request)

    def _new_request(self, request: Request) -> NewRequest:
        """What the runner keeps about an admitted request."""
        return NewRequest(
            request_id=request.request_id,
            params=request.params,
            prompt_token_ids=tuple(request.prompt_token_ids),
            output_token_ids=tuple(request.output_token_ids),
            block_ids=tuple(request.block_ids),
            lora_slot=self._lora_slot(request),
        )

    def _finished_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.params
        if token in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token in self.eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if len(request.output_token_ids) >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _free(self, request: Request) -> None:
        self.allocator.free(request.block_ids)
        request.block_ids = []


class _Step:
    """What one `schedule` call has chosen so far."""

    def __init__(self, budget: int, context_cost: int) -> None:
        self.budget = budget  # tokens left
        # While sequences decode, prefill pieces are charged for their attention too: a
        # piece of n tokens after `start` cached ones costs n * (1 + start / context_cost).
        self.context_cost = context_cost
        self.decoding = False
        self.prefill_left = budget  # prefill charge left
        self.segments: dict[str, ScheduledSequence] = {}  # by request id, in schedule order
        self.new_requests: list[NewRequest] = []
        self.preempted: list[Request] = []
        self.cache_queries = 0
        self.cache_hits = 0

    def _weight(self, start: int) -> tuple[int, int]:
        """A prefill token's charge after `start` cached tokens, as a fraction."""
        if self.decoding and self.context_cost:
            return self.context_cost + start, self.context_cost
        return 1, 1

    def room(self, start: int) -> int:
        """Tokens a prefill piece starting after `start` cached tokens may still take."""
        num, den = self._weight(start)
        return min(self.budget, self.prefill_left * den // num)

    def add(self, seq: ScheduledSequence) -> None:
        self.segments[seq.request_id] = seq
        self.budget -= seq.num_tokens
        if not seq.is_decode:
            num, den = self._weight(seq.start_pos)
            self.prefill_left -= -(-seq.num_tokens * num // den)
