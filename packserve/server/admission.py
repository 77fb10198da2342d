"""From a request body to engine work: prompts as token ids, checked, one Choice per sequence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from packserve.engine import AsyncEngine, Completion
from packserve.engine.tools import ToolFormatName
from packserve.scheduler import SamplingParams, StructuredOutput

from .fields import check_context, logit_bias
from .protocol import (
    MAX_CHOICES,
    MAX_STOP,
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    SamplingFields,
)
from .state import ServerState
from .streams import Choice
from .tool_calls import conversation, template_renders_tools
from .tool_protocol import Tool


def check_token_ids(engine: AsyncEngine, ids: list[int], param: str) -> None:
    vocab = engine.info.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise APIError(400, f"token ids must be in 0..{vocab - 1}", param=param)


def encode(
    engine: AsyncEngine, text: str, param: str, add_special_tokens: bool = True
) -> list[int]:
    """Text to token ids; text the tokenizer cannot take (a lone surrogate) is a 400."""
    try:
        return list(engine.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
    except (TypeError, ValueError) as exc:
        raise APIError(400, f"{param} cannot be tokenized: {exc}", param=param) from exc


def completion_prompts(engine: AsyncEngine, prompt: Any) -> list[list[int]]:
    """The four prompt forms (text, texts, ids, lists of ids) as token-id lists."""
    if isinstance(prompt, str) or prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    out = []
    for p in prompt:
        ids = encode(engine, p, "prompt") if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        check_token_ids(engine, ids, "prompt")
        out.append(ids)
    return out


def chat_prompt(
    engine: AsyncEngine,
    messages: list[ChatMessage],
    fmt: ToolFormatName,
    tools: Sequence[Tool] = (),
) -> list[int]:
    """Messages (and the tools to show) rendered with the model's chat template, as token
    ids; tool calls and results in the history, and the tools when the template ignores
    them, are written in the tool-call format `fmt` (packserve/server/tool_calls.py)."""
    tokenizer = engine.tokenizer
    if not tokenizer.chat_template:
        raise APIError(400, "this model has no chat template", param="messages")
    native = template_renders_tools(tokenizer)
    turns = conversation(messages, tools, fmt, native)
    shown: list[Any] | None = None  # OpenAI's tool objects, for a template that shows them
    if native and tools:
        shown = [t.model_dump(exclude_none=True) for t in tools]
    try:
        text = tokenizer.apply_chat_template(
            turns, tools=shown, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # the template's own checks (roles, alternation)
        raise APIError(
            400, f"messages do not fit the chat template: {exc}", param="messages"
        ) from exc
    assert isinstance(text, str)  # tokenize=False: the rendered text
    # The template writes the special tokens itself.
    return encode(engine, text, "messages", add_special_tokens=False)


def make_choices(
    state: ServerState,
    engine: AsyncEngine,
    prompts: list[list[int]],
    body: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    capped: bool = False,
    structured: StructuredOutput | None = None,
) -> list[Choice]:
    """One Choice per prompt x n, after the request-level checks: size, queue, context.

    `max_tokens` None means the context left; a value must fit in it with the prompt, unless
    `capped` (a default, not the client's request): then it is capped by it. Choice j of a
    seeded request uses seed + j, so n > 1 draws n different samples."""
    max_model_len = engine.info.max_model_len
    prompt_param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    bias = logit_bias(body, engine.info.vocab_size)
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(400, f"n x prompts must be at most {MAX_CHOICES}", param="n")
    stop = body.stop_strings()
    if len(stop) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop strings", param="stop")
    queue_limit = state.settings.max_queued_requests
    if len(prompts) * body.n > queue_limit:  # would never fit: retrying cannot help
        raise APIError(400, f"n x prompts must be at most {queue_limit} on this server", param="n")
    if engine.num_waiting + len(prompts) * body.n > queue_limit:
        raise APIError(429, "too many requests are waiting; retry later")
    choices = []
    for p, ids in enumerate(prompts):
        room = max_model_len - len(ids)
        prompt_ids = tuple(ids)  # shared by the prompt's n choices
        check_context(len(ids), None if capped else max_tokens, max_model_len, prompt_param)
        for j in range(body.n):
            seed = None if body.seed is None else (body.seed + j) % 2**63
            try:
                params = SamplingParams(
                    max_tokens=min(max_tokens or room, room),
                    temperature=body.temperature,
                    top_p=body.top_p,
                    top_k=body.top_k,
                    seed=seed,
                    stop=stop,
                    ignore_eos=body.ignore_eos,
                    presence_penalty=body.presence_penalty,
                    frequency_penalty=body.frequency_penalty,
                    logprobs=logprobs,
                    min_p=body.min_p,
                    repetition_penalty=body.repetition_penalty,
                    min_tokens=body.min_tokens,
                    logit_bias=bias,
                    structured=structured,
                )
            except ValueError as exc:
                raise APIError(400, str(exc)) from exc
            out = Completion(f"req-{next(state.ids)}", prompt_ids)
            choices.append(Choice(p * body.n + j, params, out))
    return choices
