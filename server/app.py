"""The OpenAI-compatible HTTP service: routes, auth, limits, readiness and graceful drain."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from packserve.scheduler import SamplingParams, StepStats

from .async_engine import AsyncEngine
from .dashboard import DashboardRecorder, dashboard_router
from .engine import Engine
from .logs import configure_logging
from .metrics import Metrics
from .protocol import (
    MAX_CHOICES,
    MAX_STOP,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    SamplingFields,
    TokenizeRequest,
)
from .settings import Settings
from .streams import Choice, Generation, chat_logprobs, completion_logprobs, sse, usage

log = logging.getLogger("packserve.requests")
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 413, 429, 500, 503)
}


@dataclass(slots=True)
class ServerState:
    """What the handlers share. `engine` is None until the model has loaded."""

    settings: Settings
    metrics: Metrics
    engine: AsyncEngine | None = None
    draining: bool = False
    ids: itertools.count = field(default_factory=itertools.count)
    dashboard: DashboardRecorder = field(default_factory=DashboardRecorder)

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive and not self.draining

    def live_engine(self) -> AsyncEngine:
        if self.draining:
            raise APIError(503, "the server is shutting down")
        if self.engine is None or not self.engine.alive:
            raise APIError(503, "the model is not ready")
        return self.engine


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413, declared or streamed.

    It reads the body itself (up to the limit) and replays it, because the framework turns
    any error raised while it reads the body into a generic 400."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for a disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = APIError(413, f"request body over {self.limit} bytes").body.model_dump()
        await JSONResponse(body, status_code=413)(scope, receive, send)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app. The model loads in the background unless an engine is given, so
    /health answers at once and /ready turns 200 when loading is done."""
    state = ServerState(settings, Metrics(settings.served_model_name))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def load() -> None:
            loaded = engine
            if loaded is None:
                loaded = await asyncio.to_thread(Engine, settings.engine)
            scheduler = loaded.scheduler

            def on_step(stats: StepStats) -> None:  # engine thread, after every step
                state.metrics.observe_step(stats)
                state.dashboard.observe_step(stats, scheduler)  # reads scheduler.running here

            async_engine = AsyncEngine(loaded, on_step, settings.engine.packing_window_s)
            blocks = scheduler.allocator
            state.metrics.track(
                lambda: (
                    scheduler.num_running,
                    async_engine.num_waiting,
                    blocks.num_used / blocks.num_blocks,
                )
            )
            async_engine.start()
            state.engine = async_engine

        loading = asyncio.create_task(load())
        yield
        loading.cancel()
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="packserve", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body.model_dump(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return await api_error(request, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return await api_error(request, APIError(400, "the body is not valid JSON"))
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return await api_error(request, APIError(400, message, param=".".join(loc) or None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("packserve").exception("unhandled error")
        return await api_error(request, APIError(500, f"internal error: {type(exc).__name__}"))

    async def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {settings.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise APIError(401, "missing or invalid API key", code="invalid_api_key")

    api = [Depends(authorized)]

    # -- probes and metrics ---------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", responses=ERRORS)
    async def ready() -> dict[str, str]:
        """Readiness: the model is loaded, the engine loop alive, and we are not draining."""
        if not state.ready:
            raise APIError(503, "draining" if state.draining else "not ready")
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(dashboard_router(state.dashboard, settings.served_model_name))  # open

    # -- models and tokens ----------------------------------------------------------------------

    @app.get("/v1/models", dependencies=api, responses=ERRORS)
    async def models() -> dict[str, Any]:
        engine = state.live_engine().engine
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.served_model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "packserve",
                    "max_model_len": engine.scheduler.config.max_model_len,
                }
            ],
        }

    @app.post("/tokenize", dependencies=api, responses=ERRORS)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        engine = state.live_engine().engine
        _check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            ids = _chat_prompt(engine, body.messages)
        else:
            ids = engine.tokenizer(
                body.prompt, add_special_tokens=body.add_special_tokens
            ).input_ids
        return {
            "tokens": ids,
            "count": len(ids),
            "max_model_len": engine.scheduler.config.max_model_len,
        }

    @app.post("/detokenize", dependencies=api, responses=ERRORS)
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        engine = state.live_engine().engine
        _check_model(body.model)
        _check_ids(engine, body.tokens, "tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    # -- generation -----------------------------------------------------------------------------

    @app.post("/v1/completions", dependencies=api, responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        async_engine = state.live_engine()
        engine = async_engine.engine
        _check_model(body.model)
        prompts = _completion_prompts(engine, body.prompt)
        echo = [
            engine.tokenizer.decode(p, skip_special_tokens=True) if body.echo else ""
            for p in prompts
        ]
        choices = _choices(state, engine, prompts, body, body.max_tokens, body.logprobs)
        generation = Generation(async_engine, choices, state.metrics, _done(state))
        rid = f"cmpl-{uuid.uuid4().hex}"
        head = {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": settings.served_model_name,
        }
        decode = engine.tokenizer.decode

        def logprobs_of(c: Choice, start: int, offset: int) -> dict[str, Any] | None:
            if body.logprobs is None:
                return None
            return completion_logprobs(c.logprobs[start:], c.token_ids[start:], decode, offset)

        if body.stream:

            async def events() -> AsyncIterator[str]:
                seen = {c.index: 0 for c in choices}
                chars = {c.index: len(echo[c.index // body.n]) for c in choices}
                if body.echo:
                    for c in choices:
                        yield sse(
                            {
                                **head,
                                "choices": [
                                    {
                                        "index": c.index,
                                        "text": echo[c.index // body.n],
                                        "logprobs": None,
                                        "finish_reason": None,
                                    }
                                ],
                            }
                        )
                async for choice, item in generation.events():
                    d = item.delta
                    if d.error:
                        yield sse(APIError(500, d.error).body.model_dump())
                        continue
                    if not d.text and d.finish_reason is None and not d.logprobs:
                        continue
                    lp = logprobs_of(choice, seen[choice.index], chars[choice.index])
                    seen[choice.index] = len(choice.logprobs)
                    chars[choice.index] += len(d.text)
                    yield sse(
                        {
                            **head,
                            "choices": [
                                {
                                    "index": choice.index,
                                    "text": d.text,
                                    "logprobs": lp,
                                    "finish_reason": d.finish_reason,
                                }
                            ],
                        }
                    )
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**head, "choices": [], "usage": usage(choices)})
                yield sse("[DONE]")

            return _streaming(events(), state)

        await _run(state, generation, request)
        return {
            **head,
            "usage": usage(choices),
            "choices": [
                {
                    "index": c.index,
                    "text": echo[c.index // body.n] + "".join(c.text),
                    "logprobs": logprobs_of(c, 0, len(echo[c.index // body.n])),
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
        }

    @app.post("/v1/chat/completions", dependencies=api, responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        async_engine = state.live_engine()
        engine = async_engine.engine
        _check_model(body.model)
        prompt = _chat_prompt(engine, body.messages)
        top = (body.top_logprobs or 0) if body.logprobs else None
        choices = _choices(
            state, engine, [prompt], body, body.max_completion_tokens or body.max_tokens, top
        )
        generation = Generation(async_engine, choices, state.metrics, _done(state))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": settings.served_model_name}
        decode = engine.tokenizer.decode

        def logprobs_of(c: Choice, start: int) -> dict[str, Any] | None:
            if not body.logprobs:
                return None
            return chat_logprobs(c.logprobs[start:], c.token_ids[start:], decode)

        if body.stream:
            chunk = {**head, "object": "chat.completion.chunk"}

            async def events() -> AsyncIterator[str]:
                seen = {c.index: 0 for c in choices}
                for c in choices:
                    yield sse(
                        {
                            **chunk,
                            "choices": [
                                {
                                    "index": c.index,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
                async for choice, item in generation.events():
                    d = item.delta
                    if d.error:
                        yield sse(APIError(500, d.error).body.model_dump())
                        continue
                    if not d.text and d.finish_reason is None and not d.logprobs:
                        continue
                    lp = logprobs_of(choice, seen[choice.index])
                    seen[choice.index] = len(choice.logprobs)
                    delta = {"content": d.text} if d.text else {}
                    yield sse(
                        {
                            **chunk,
                            "choices": [
                                {
                                    "index": choice.index,
                                    "delta": delta,
                                    "logprobs": lp,
                                    "finish_reason": d.finish_reason,
                                }
                            ],
                        }
                    )
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**chunk, "choices": [], "usage": usage(choices)})
                yield sse("[DONE]")

            return _streaming(events(), state)

        await _run(state, generation, request)
        return {
            **head,
            "object": "chat.completion",
            "usage": usage(choices),
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": logprobs_of(c, 0),
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
        }

    def _check_model(model: str | None) -> None:
        if model is not None and model != settings.served_model_name:
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves "
                f"{settings.served_model_name!r}",
                param="model",
                code="model_not_found",
            )

    return app


# -- helpers (no state of their own) ------------------------------------------------------------


def _check_ids(engine: Engine, ids: list[int], param: str) -> None:
    vocab = engine.model.config.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise APIError(400, f"token ids must be in 0..{vocab - 1}", param=param)


def _completion_prompts(engine: Engine, prompt: Any) -> list[list[int]]:
    """Normalize the four prompt forms to token-id lists."""
    if isinstance(prompt, str) or prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    out = []
    for p in prompt:
        ids = engine.tokenizer(p).input_ids if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        _check_ids(engine, ids, "prompt")
        out.append(ids)
    return out


def _chat_prompt(engine: Engine, messages: list[Any]) -> list[int]:
    if not engine.tokenizer.chat_template:
        raise APIError(400, "this model has no chat template", param="messages")
    conversation = [
        {"role": m.role if m.role != "developer" else "system", "content": m.text()}
        for m in messages
    ]
    try:
        text = engine.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # the template's own checks (roles, alternation)
        raise APIError(
            400, f"messages do not fit the chat template: {exc}", param="messages"
        ) from exc
    return list(engine.tokenizer(text, add_special_tokens=False).input_ids)


def _choices(
    state: ServerState,
    engine: Engine,
    prompts: list[list[int]],
    body: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
) -> list[Choice]:
    """One Choice per prompt x n, with the request's checks: context, queue, parameters."""
    max_model_len = engine.scheduler.config.max_model_len
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(400, f"n x prompts must be at most {MAX_CHOICES}", param="n")
    stop = body.stop_strings()
    if len(stop) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop strings", param="stop")
    assert state.engine is not None
    if state.engine.num_waiting + len(prompts) * body.n > state.settings.max_queued_requests:
        raise APIError(429, "too many requests are waiting; retry later")
    choices = []
    for p, ids in enumerate(prompts):
        room = max_model_len - len(ids)
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this model's context is {max_model_len} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
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
                )
            except ValueError as exc:
                raise APIError(400, str(exc)) from exc
            choices.append(Choice(p * body.n + j, f"req-{next(state.ids)}", ids, params))
    return choices


def _done(state: ServerState):
    """Called once per finished choice: metrics and the request log line."""
    settings = state.settings

    def done(choice: Choice) -> None:
        t = choice.timings()
        state.metrics.observe_request(t)
        state.dashboard.observe_request(t)
        fields = {
            "request_id": choice.request_id,
            "prompt_tokens": t.num_prompt_tokens,
            "output_tokens": t.num_generation_tokens,
            "queue_s": round((t.scheduled or t.finished) - t.arrival, 4),
            "ttft_s": round(t.first_token - t.arrival, 4) if t.first_token else None,
            "latency_s": round(t.finished - t.arrival, 4),
            "finish_reason": t.finish_reason,
        }
        if settings.log_prompts:
            fields["prompt_token_ids"] = choice.prompt_token_ids
        log.info("request finished", extra={"fields": fields})

    return done


async def _run(state: ServerState, generation: Generation, request: Request) -> None:
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
    failed = [c.error for c in generation.choices if c.finish_reason == "error"]
    if failed:
        raise APIError(500, f"generation failed: {failed[0]}")


def _streaming(events: AsyncIterator[str], state: ServerState) -> StreamingResponse:
    async def timed() -> AsyncIterator[str]:
        timeout = state.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout):
                async for event in events:
                    yield event
        except TimeoutError:
            yield sse(APIError(408, "the request timed out").body.model_dump())
            yield sse("[DONE]")

    return StreamingResponse(
        timed(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


# -- running it ---------------------------------------------------------------------------------


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM first drains: readiness goes 503, new requests get 503, in-flight
    ones finish (up to the shutdown timeout), then the process exits 0."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.state.draining or self.loop is None:  # a second signal: stop now
            self.force_exit = self.should_exit
            self.should_exit = True
            return
        self.state.draining = True
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.state.settings.shutdown_timeout_s
        engine = self.state.engine
        while engine and engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.should_exit = True


def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; exit 0 after draining."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=configure_logging(settings.log_format),
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, app.state.server)
    server.run()
    # Drained and stopped. Skip the interpreter's teardown (seconds of garbage collection
    # over the model) so a terminating pod exits well inside its grace period.
    logging.shutdown()
    os._exit(0)
