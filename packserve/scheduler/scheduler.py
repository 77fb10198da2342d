"""Continuous-batching scheduler with first-fit-decreasing prefill packing. Pure Python."""

from __future__ import annotations

from collections import deque

from .block_manager import BlockAllocator, blocks_for
from .config import SchedulerConfig
from .outputs import NewRequest, RunnerOutput, ScheduledSequence, SchedulerOutput, TokenEvent
from .packing import pack_rows
from .request import Request, RequestStatus


class Scheduler:
    """Owns request state and KV-block accounting; decides each step's prefills and decodes.

    Step contract: `schedule()` -> runner -> `update(output, runner_output)`. Requests are
    admitted first come, first served while the token budget, the sequence cap and the free KV
    blocks allow; the admitted prompts are then packed into rows first-fit-decreasing.

    The runner holds each running request's state; a step sends a request whole once, when it
    is (re)admitted, and afterwards only what changed (a decode's token and new blocks), with
    the ids whose state the runner should drop.
    """

    def __init__(self, config: SchedulerConfig, eos_token_ids: frozenset[int]) -> None:
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.allocator = BlockAllocator(config.num_kv_blocks)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is preempted first
        self.requests: dict[str, Request] = {}  # every unfinished request by id
        self.num_preemptions_total = 0
        self._finished_ids: list[str] = []  # ended since the last step with work

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
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._free(request)
        request.status = status
        self._finished_ids.append(request_id)
        return True

    # -- the step -------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Choose this step's work: one token for each running sequence, then new prefills."""
        decodes, preempted = self._schedule_decodes()
        # Admitting while preempting would only evict again; vLLM makes the same choice.
        budget = self.config.max_num_batched_tokens - len(decodes)
        admitted = [] if preempted else self._admit(budget)
        finished_ids: tuple[str, ...] = ()
        if decodes or admitted:  # a step with no work is not run: keep the ids for the next
            finished_ids = tuple(self._finished_ids)
            self._finished_ids.clear()
        return SchedulerOutput(
            new_requests=tuple(self._new_request(r) for r in admitted),
            prefill_bins=self._pack(admitted),
            decodes=tuple(decodes),
            preempted_ids=tuple(r.request_id for r in preempted),
            finished_ids=finished_ids,
        )

    def update(self, output: SchedulerOutput, result: RunnerOutput) -> list[TokenEvent]:
        """Record the sampled tokens, finish what is done, and emit one delta per sequence
        that gained a token (a replaying sequence gains none until it has caught up)."""
        events = []
        for seq in (*output.prefills, *output.decodes):
            request = self.requests.get(seq.request_id)
            if request is None:  # finished by the caller while the step ran
                continue
            request.num_computed_tokens = seq.end_pos
            if request.num_computed_tokens < request.num_tokens:  # replaying known tokens
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

    # -- internals ------------------------------------------------------------------------------

    def _schedule_decodes(self) -> tuple[list[ScheduledSequence], list[Request]]:
        """One token for every running sequence, with room for it in the KV pool: preempts
        from the back (most recently admitted first) until the rest fit. Returns the decodes
        and the preempted requests."""
        decodes: list[ScheduledSequence] = []
        preempted: list[Request] = []
        i = 0
        while i < len(self.running):
            request = self.running[i]
            pos = request.num_computed_tokens  # the first token without K/V
            need = blocks_for(pos + 1, self.config.block_size) - len(request.block_ids)
            while need > self.allocator.num_free and request in self.running:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
            if request not in self.running:  # it was the most recent one: preempted itself
                break
            new_block_ids = self.allocator.allocate(need)
            request.block_ids += new_block_ids
            decodes.append(
                ScheduledSequence(
                    request_id=request.request_id,
                    token_ids=request.known_token_ids(pos, pos + 1),
                    start_pos=pos,
                    new_block_ids=tuple(new_block_ids),
                )
            )
            i += 1
        return decodes, preempted

    def _preempt(self, request: Request) -> None:
        """Free a running request's blocks and requeue it at the front, for recompute."""
        self.running.remove(request)
        self._free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    def _admit(self, token_budget: int) -> list[Request]:
        """Admit waiting requests in arrival order while budget, seats and KV blocks last."""
        admitted: list[Request] = []
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_tokens = self._prefill_len(request)
            need = blocks_for(num_tokens, self.config.block_size)
            if num_tokens > token_budget or need > self.allocator.num_free:
                break
            self.waiting.popleft()
            request.block_ids = self.allocator.allocate(need)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            admitted.append(request)
            token_budget -= num_tokens
        return admitted

    def _prefill_len(self, request: Request) -> int:
        """Tokens prefilled on admission: all known ones, or the prompt alone when replaying."""
        if self.config.replay_preempted:
            return len(request.prompt_token_ids)
        return request.num_tokens

    def _pack(self, admitted: list[Request]) -> tuple[tuple[ScheduledSequence, ...], ...]:
        """Group admitted prompts into prefill rows: FFD when packed, one per row when padded."""
        if self.config.prefill_mode == "padded":
            bins = [[i] for i in range(len(admitted))]
        else:
            bins = pack_rows([self._prefill_len(r) for r in admitted], self.config.row_capacity)
        return tuple(tuple(self._prefill(admitted[i]) for i in row) for row in bins)

    def _prefill(self, request: Request) -> ScheduledSequence:
        """An admitted request's prefill: its known tokens from position 0 (the prompt alone
        when replaying); its block table went with its `NewRequest`."""
        token_ids = request.known_token_ids(0, self._prefill_len(request))
        return ScheduledSequence(request.request_id, token_ids, start_pos=0, new_block_ids=())

    def _new_request(self, request: Request) -> NewRequest:
        """What the runner keeps about an admitted request."""
        return NewRequest(
            request_id=request.request_id,
            params=request.params,
            num_prompt_tokens=len(request.prompt_token_ids),
            output_token_ids=tuple(request.output_token_ids),
            block_ids=tuple(request.block_ids),
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
