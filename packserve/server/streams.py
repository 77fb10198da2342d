"""From engine deltas to OpenAI responses: per-choice accumulation, SSE chunks, usage."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from packserve.engine import AsyncEngine, Completion, Delta
from packserve.engine.async_engine import Timed
from packserve.scheduler import SamplingParams, TokenLogprobs

from .metrics import Metrics, RequestTimings


@dataclass(slots=True)
class Choice:
    """One generated sequence of a request (there are n x prompts of them): its output so
    far and when its tokens arrived."""

    index: int
    params: SamplingParams
    out: Completion  # request id, prompt, and everything generated so far
    arrival: float = field(default_factory=time.perf_counter)
    scheduled: float | None = None  # start of the step that produced its first token
    token_times: list[float] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.out.request_id

    def observe(self, item: Timed, metrics: Metrics) -> None:
        delta = item.delta
        if self.scheduled is None and delta.token_ids:
            self.scheduled = item.step_start
            metrics.count_tokens(len(self.out.prompt_token_ids), 0)
        if delta.token_ids:
            self.token_times.append(time.perf_counter())
            metrics.count_tokens(0, len(delta.token_ids))
        self.out.add(delta)

    def timings(self) -> RequestTimings:
        return RequestTimings(
            arrival=self.arrival,
            scheduled=self.scheduled,
            first_token=self.token_times[0] if self.token_times else None,
            finished=time.perf_counter(),
            token_times=tuple(self.token_times),
            num_prompt_tokens=len(self.out.prompt_token_ids),
            num_generation_tokens=len(self.out.token_ids),
            finish_reason=self.out.finish_reason or "abort",
        )


MAX_BACKLOG_PER_CHOICE = 128  # deltas a stream may fall behind before it is cut


class Backlog(asyncio.Queue[Timed]):
    """A generation's collector, bounded: a consumer that falls `capacity` deltas behind (a
    client that stopped reading a stream) triggers `on_overflow` once, and the queue is
    emptied and takes nothing more from the engine."""

    def __init__(self, capacity: int, on_overflow: Callable[[], None]) -> None:
        super().__init__()
        self.capacity = capacity
        self.on_overflow = on_overflow
        self.overflowed = False

    def put_nowait(self, item: Timed) -> None:
        if self.overflowed:
            return
        if self.qsize() >= self.capacity:
            self.overflowed = True
            while not self.empty():
                self.get_nowait()
            self.on_overflow()
            return
        super().put_nowait(item)

    def put_final(self, item: Timed) -> None:
        """An item that ends a request, accepted even after an overflow."""
        super().put_nowait(item)


class Generation:
    """The choices of one HTTP request, submitted to the engine together on construction,
    all at the request's `priority` (lower is scheduled first), with its LoRA `adapter`
    (None: the base model)."""

    def __init__(
        self,
        engine: AsyncEngine,
        choices: list[Choice],
        metrics: Metrics,
        on_done: Callable[[Choice], None],
        priority: int = 0,
        adapter: str | None = None,
    ) -> None:
        self.engine = engine
        self.choices = choices
        self.metrics = metrics
        self.on_done = on_done
        capacity = MAX_BACKLOG_PER_CHOICE * len(choices)
        self.collector = Backlog(capacity, self._fell_behind)
        for c in choices:
            prompt = list(c.out.prompt_token_ids)
            engine.submit(c.request_id, prompt, c.params, self.collector, priority, adapter)

    def _fell_behind(self) -> None:
        """The consumer is too far behind: abort what is unfinished (KV freed within a step)
        and end each choice with an error the stream will carry if its client reads again."""
        message = f"the client fell {MAX_BACKLOG_PER_CHOICE} tokens behind the stream"
        for c in self.choices:
            if c.out.finish_reason is None:
                self.engine.abort(c.request_id)
                cut = Delta(
                    c.request_id,
                    (),
                    "",
                    "abort",
                    error=message,
                    num_cached_tokens=c.out.num_cached_tokens,  # usage still tells it
                )
                self.collector.put_final(Timed(cut, 0.0))

    async def events(self) -> AsyncIterator[tuple[Choice, Timed]]:
        """Every choice's deltas as they arrive, each already recorded in its Choice.
        Leaving early aborts whatever is unfinished; `on_done` sees every choice once."""
        by_id = {c.request_id: c for c in self.choices}
        unfinished = set(by_id)
        try:
            while unfinished:
                item = await self.collector.get()
                choice = by_id[item.delta.request_id]
                choice.observe(item, self.metrics)
                if choice.out.finish_reason is not None:
                    unfinished.discard(choice.request_id)
                yield choice, item
        finally:  # no await here: this also runs when the client's cancellation lands
            for c in self.choices:
                self.engine.release(c.request_id, finished=c.out.finish_reason is not None)
                self.on_done(c)


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def usage(choices: list[Choice], n: int) -> dict[str, Any]:
    """OpenAI's usage object. The n choices of one prompt share its tokens: the prompt is
    counted once, and so is its cached part: the tokens every one of its choices found in
    the prefix cache (the least of them), so cached_tokens <= prompt_tokens always."""
    prompts: dict[int, int] = {}
    cached: dict[int, int] = {}
    for c in choices:
        p = c.index // n
        prompts[p] = len(c.out.prompt_token_ids)
        cached[p] = min(cached.get(p, prompts[p]), c.out.num_cached_tokens)
    completion = sum(len(c.out.token_ids) for c in choices)
    prompt = sum(prompts.values())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
    }


def completion_logprobs(
    entries: list[TokenLogprobs],
    token_ids: list[int],
    decode: Callable[[list[int]], str],
    offset: int,
) -> dict[str, Any]:
    """The legacy completions logprobs object."""
    tokens = [decode([t]) for t in token_ids[: len(entries)]]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{decode([t]): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(
    entries: list[TokenLogprobs], token_ids: list[int], decode: Callable[[list[int]], str]
) -> dict[str, Any]:
    """The chat completions logprobs object."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**item(t, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
            for t, e in zip(token_ids, entries, strict=False)
        ]
    }
