"""The API routes: completions, chat completions, models, tokenize, detokenize, version."""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.params import Depends
from fastapi.responses import StreamingResponse

from packserve.engine import AsyncEngine, Delta
from packserve.engine.reasoning import State, prompt_state
from packserve.engine.tools import ToolFormatName

from .admission import chat_prompt, check_token_ids, completion_prompts, encode, make_choices
from .fields import FieldCheck, chat_max_tokens
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    SamplingFields,
    TokenizePrompt,
    TokenizeRequest,
)
from .state import ServerState
from .streams import Choice, Generation, chat_logprobs, completion_logprobs, sse, usage
from .structured import admit_constraint
from .tool_calls import ToolPlan, tool_format

ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 413, 429, 500, 503)
}
# A generation answers with one JSON object, or, with "stream": true, an SSE stream of chunks.
GENERATED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the completion, or its chunks as server-sent events when streamed",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            # One schema per event: its data is a JSON chunk (or an error object), then [DONE].
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": {"type": "string"}},
                }
            },
        },
    }
}
ChunkOf = Callable[[Choice, Delta], list[dict[str, Any]]]  # a delta's chunks' choice entries
VERSION = importlib.metadata.version("packserve")
PROMPT_TAIL = 16  # the prompt's last tokens, enough to hold the think tags a template ends with


def openai_router(state: ServerState, auth: Depends) -> APIRouter:
    """The API routes, all behind `auth`."""
    router = APIRouter(dependencies=[auth], responses=ERRORS)
    model_name = state.settings.model_name
    fields = FieldCheck(state.settings.allow_unknown_fields)

    def tool_format_of(engine: AsyncEngine) -> ToolFormatName:
        return tool_format(state.settings.tool_call_parser, engine.tokenizer.chat_template)

    def card(adapter: str | None = None) -> dict[str, Any]:
        """The base model's card, or a LoRA adapter's (vLLM's: parent is the base)."""
        entry: dict[str, Any] = {
            "id": adapter or model_name,
            "object": "model",
            "created": 0,
            "owned_by": "packserve",
            "root": state.adapters[adapter] if adapter else model_name,
            "parent": model_name if adapter else None,
            "max_model_len": state.live_engine().info.max_model_len,
        }
        return entry

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The base model, then every LoRA adapter served."""
        return {"object": "list", "data": [card(), *(card(a) for a in state.adapters)]}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        """The card of the base model or an adapter; any other id is 404 model_not_found."""
        return card(state.check_model(model_id))

    @router.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VERSION}

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        engine = state.live_engine()
        state.check_model(body.model)
        if isinstance(body, TokenizePrompt):
            ids = encode(engine, body.prompt, "prompt", body.add_special_tokens)
        else:
            ids = chat_prompt(engine, body.messages, tool_format_of(engine))
        return {
            "tokens": ids,
            "count": len(ids),
            "max_model_len": engine.info.max_model_len,
        }

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        engine = state.live_engine()
        state.check_model(body.model)
        check_token_ids(engine, body.tokens, "tokens")
        return {"prompt": engine.decode(body.tokens)}

    @router.post("/v1/completions", responses=GENERATED)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        engine = state.live_engine()
        adapter = state.check_model(body.model)
        fields.check(body)
        prompts = completion_prompts(engine, body.prompt)
        unsent = "max_tokens" not in body.model_fields_set  # the default is capped, not refused
        structured = await admit_constraint(engine, body)
        choices = make_choices(
            state,
            engine,
            prompts,
            body,
            body.max_tokens,
            body.logprobs,
            capped=unsent,
            structured=structured,
        )
        # Submitted in the same event-loop turn as the queue check above.
        generation = Generation(
            engine, choices, state.metrics, state.finished, body.priority, adapter
        )
        decode = engine.decode
        echo = [decode(p, skip_special_tokens=True) if body.echo else "" for p in prompts]
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": adapter or model_name,
        }

        def logprobs_of(c: Choice, start: int, offset: int) -> dict[str, Any] | None:
            if body.logprobs is None:
                return None
            return completion_logprobs(
                c.out.logprobs[start:], c.out.token_ids[start:], decode, offset
            )

        def chunk_of(c: Choice, d: Delta) -> list[dict[str, Any]]:
            offset = len(echo[c.index // body.n]) + len(c.out.text) - len(d.text)
            lp = logprobs_of(c, len(c.out.logprobs) - len(d.logprobs), offset)
            return [
                {
                    "index": c.index,
                    "text": d.text,
                    "logprobs": lp,
                    "finish_reason": d.finish_reason,
                }
            ]

        def whole() -> dict[str, Any]:
            return {
                **head,
                "usage": usage(choices, body.n),
                "choices": [
                    {
                        "index": c.index,
                        "text": echo[c.index // body.n] + c.out.text,
                        "logprobs": logprobs_of(c, 0, len(echo[c.index // body.n])),
                        "finish_reason": c.out.finish_reason,
                    }
                    for c in choices
                ],
            }

        first = [
            {
                "index": c.index,
                "text": echo[c.index // body.n],
                "logprobs": None,
                "finish_reason": None,
            }
            for c in choices
            if body.echo
        ]
        return await respond(state, generation, request, body, head, first, chunk_of, whole)

    @router.post("/v1/chat/completions", responses=GENERATED)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        engine = state.live_engine()
        adapter = state.check_model(body.model)
        fields.check(body)
        max_tokens = chat_max_tokens(body)
        plan = ToolPlan.of(body)
        prompt = chat_prompt(engine, body.messages, tool_format_of(engine), plan.tools)
        top = (body.top_logprobs or 0) if body.logprobs else None
        structured = await plan.admit_constraint(engine, await admit_constraint(engine, body))
        choices = make_choices(
            state, engine, [prompt], body, max_tokens, top, structured=structured
        )
        generation = Generation(
            engine, choices, state.metrics, state.finished, body.priority, adapter
        )
        # Where a think block stands when the output starts (the template may open it).
        thinking: State | None = None
        if state.settings.reasoning_parser != "none":
            thinking = prompt_state(engine.decode(prompt[-PROMPT_TAIL:]))
        readers = {c.index: plan.reader(thinking) for c in choices}  # reasoning, tool calls
        decode = engine.decode
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": adapter or model_name,
        }

        def logprobs_of(c: Choice, start: int) -> dict[str, Any] | None:
            if not body.logprobs:
                return None
            return chat_logprobs(c.out.logprobs[start:], c.out.token_ids[start:], decode)

        def chunk_of(c: Choice, d: Delta) -> list[dict[str, Any]]:
            """The delta's content and tool-call pieces, one chunk each; one with an empty
            delta for logprobs or the end when the text is held back (none otherwise)."""
            reader = readers[c.index]
            items = reader.push(d.text) + (reader.finish() if d.finish_reason else [])
            if not (items or d.logprobs or d.finish_reason):
                return []
            entries: list[dict[str, Any]] = [
                {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}
                for delta in reader.deltas(items) or [{}]
            ]
            entries[0]["logprobs"] = logprobs_of(c, len(c.out.logprobs) - len(d.logprobs))
            entries[-1]["finish_reason"] = reader.finish_reason(d.finish_reason)
            return entries

        def whole() -> dict[str, Any]:
            return {
                **head,
                "object": "chat.completion",
                "usage": usage(choices, body.n),
                "choices": [
                    {
                        "index": c.index,
                        "message": (reader := plan.reader(thinking)).message(c.out.text),
                        "logprobs": logprobs_of(c, 0),
                        "finish_reason": reader.finish_reason(c.out.finish_reason),
                    }
                    for c in choices
                ],
            }

        # The first chunk of each choice carries the role, as OpenAI's do.
        first = [
            {
                "index": c.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for c in choices
        ]
        chunk_head = {**head, "object": "chat.completion.chunk"}
        return await respond(state, generation, request, body, chunk_head, first, chunk_of, whole)

    return router


async def respond(
    state: ServerState,
    generation: Generation,
    request: Request,
    body: SamplingFields,
    head: dict[str, Any],
    first: list[dict[str, Any]],
    chunk_of: ChunkOf,
    whole: Callable[[], dict[str, Any]],
) -> Any:
    """Stream the generation as SSE chunks (`first`, then one per delta with something to
    show, usage when asked, [DONE]), or wait for it and return `whole()`."""
    if not body.stream:
        await _run_to_end(state, generation, request)
        return whole()

    async def events() -> AsyncIterator[str]:
        for opening in first:
            yield sse({**head, "choices": [opening]})
        async for choice, item in generation.events():
            d = item.delta
            if d.error:  # a failed step (500) or a stream cut for a client too slow (408)
                status = 500 if d.finish_reason == "error" else 408
                yield sse(APIError(status, d.error).body.model_dump())
            elif d.text or d.finish_reason or d.logprobs:
                for entry in chunk_of(choice, d):
                    yield sse({**head, "choices": [entry]})
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": usage(generation.choices, body.n)})
        yield sse("[DONE]")

    async def timed() -> AsyncIterator[str]:
        try:
            async with asyncio.timeout(state.settings.request_timeout_s):
                async for event in events():
                    yield event
        except TimeoutError:
            yield sse(APIError(408, "the request timed out").body.model_dump())
            yield sse("[DONE]")

    return StreamingResponse(
        timed(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _run_to_end(state: ServerState, generation: Generation, request: Request) -> None:
    """Generate every choice to the end; abort them if the client leaves or time runs out."""

    async def consume() -> None:
        async for _ in generation.events():
            pass

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.create_task(consume())
    watch = asyncio.create_task(disconnected())
    try:
        done, _ = await asyncio.wait(
            {work, watch},
            timeout=state.settings.request_timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        for task in (work, watch):
            task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work not in done:
        if watch in done:
            raise APIError(400, "client disconnected")  # nobody is there to read it
        raise APIError(408, "the request timed out")
    work.result()
    failed = [c.out.error for c in generation.choices if c.out.finish_reason == "error"]
    if failed:
        raise APIError(500, f"generation failed: {failed[0]}")
