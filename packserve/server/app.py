"""The HTTP service: app assembly, errors, auth, the request edge, probes, graceful drain."""

from __future__ import annotations

import asyncio
import copy
import gc
import hmac
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from packserve.engine import AsyncEngine, Engine, EngineLoad, StepStats
from packserve.engine.process import ProcessLink

from .connections import EdgeLimits, default_max_connections, guarded_protocol
from .dashboard import dashboard_router
from .logs import configure_logging, quiet_libraries
from .lora_api import lora_router
from .metrics import Metrics
from .openai_api import VERSION, openai_router
from .protocol import APIError, ErrorResponse
from .settings import Settings
from .state import ServerState

log = logging.getLogger("packserve.server")


GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def bearer_ok(authorization: str, api_key: str | None) -> bool:
    """Whether an Authorization header carries the API key (any header when there is none).
    Schemes are case-insensitive (RFC 9110 11.1); the key is compared in constant time."""
    if api_key is None:
        return True
    scheme, _, token = authorization.strip().partition(" ")
    valid = hmac.compare_digest(token.strip().encode(), api_key.encode())
    return scheme.lower() == "bearer" and valid


class RequestGate:
    """ASGI middleware around the whole app, the request edge: a generation request meets a
    full queue with 429
    before its body is read (a refusal must not wait behind the work it refuses); a body
    over `max_body_bytes` gets 413, declared or streamed; a body not received within
    `body_timeout_s` gets 408.

    It reads the body itself and replays it, because the framework turns any error raised
    while it reads the body into a generic 400."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_timeout_s: float,
        queue_full: Callable[[], bool],
        api_key: str | None,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.limit = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.queue_full = queue_full

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._refusable(scope) and self.queue_full():
            error = APIError(429, "too many requests are waiting; retry later")
            return await self._refuse(error, {"Retry-After": "1"}, scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client left while sending
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.limit:
                        return await self._too_large(scope, receive, send)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            error = APIError(408, f"the request body did not arrive within {self.body_timeout_s} s")
            return await self._refuse(error, {"Connection": "close"}, scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for a disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    def _refusable(self, scope: Scope) -> bool:
        """A generation request from a caller with the key (others learn nothing, not even
        that the queue is full: the app answers them 401)."""
        if scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            return False
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        return bearer_ok(header, self.api_key)

    def refuse_early(self, head: bytes) -> bool:
        """The same decision from a request's raw head (request line and headers), for the
        connection protocol to answer before anything is parsed."""
        lines = head.split(b"\r\n")
        method, _, rest = lines[0].partition(b" ")
        path = rest.partition(b" ")[0].decode("latin-1")
        headers = [tuple(line.split(b":", 1)) for line in lines[1:] if b":" in line]
        scope = {
            "method": method.decode("latin-1"),
            "path": path,
            "headers": [(name.strip().lower(), value.strip()) for name, value in headers],
        }
        return self._refusable(scope) and self.queue_full()

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"request body over {self.limit} bytes")
        await self._refuse(error, {}, scope, receive, send)

    @staticmethod
    async def _refuse(
        error: APIError, headers: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        """The error as raw ASGI messages: this runs outside the framework, so a refusal
        under a burst costs little more than parsing the request line."""
        body = error.body.model_dump_json().encode()
        fields = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *((k.lower().encode(), v.encode()) for k, v in headers.items()),
        ]
        await send({"type": "http.response.start", "status": error.status, "headers": fields})
        await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings, link: ProcessLink | None = None) -> FastAPI:
    """The FastAPI app. The model loads in the background (in `link`'s engine process, spawned
    by the caller, with --engine-process), so /health answers at once and /ready turns 200
    when loading is done."""
    if settings.engine_process and link is None:
        raise ValueError("with --engine-process, create_app needs the spawned engine process")
    state = ServerState(settings, Metrics(settings.model_name))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_start_engine(state, link))
        loading.add_done_callback(lambda task: _started(state, task))
        yield
        loading.cancel()
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="packserve", version=VERSION, lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = dict(exc.headers)
        if exc.status == 429:
            headers["Retry-After"] = "1"
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="packserve"'
        return JSONResponse(exc.body.model_dump(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Keeps the framework's headers: a 405 says which methods are Allowed.
        error = APIError(exc.status_code, str(exc.detail), headers=exc.headers)
        return await api_error(request, error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = _most_telling(list(exc.errors()))
        if first.get("type") == "json_invalid":
            return await api_error(request, APIError(400, "the body is not valid JSON"))
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_tag(p)]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return await api_error(request, APIError(400, message, param=".".join(loc) or None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return await api_error(request, APIError(500, f"internal error: {type(exc).__name__}"))

    async def authorized(request: Request) -> None:
        if not bearer_ok(request.headers.get("authorization", ""), settings.api_key):
            raise APIError(401, "missing or invalid API key", code="invalid_api_key")

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> dict[str, str]:
        """Liveness: the process answers and its engine loop, once started, still runs."""
        if state.failed:
            raise APIError(503, "the server failed to start")
        if state.engine is not None and not state.engine.alive and not state.draining:
            raise APIError(503, "the engine loop has stopped")
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": ErrorResponse}})
    async def ready() -> dict[str, str]:
        """Readiness: the model is loaded, the engine loop alive, and we are not draining."""
        if not state.ready:
            raise APIError(503, "draining" if state.draining else "not ready")
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    # Open like /metrics: counts and timings only, and a browser page cannot send a bearer key.
    app.include_router(dashboard_router(state.dashboard, settings.model_name))
    app.include_router(openai_router(state, Depends(authorized)))
    app.include_router(lora_router(state, Depends(authorized)))
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _most_telling(errors: list[Any]) -> dict[str, Any]:
    """The error to report. A value that fits no member of a union gets errors from every
    member: report the member that came closest (fewest errors; a wrong type tells least, so
    "prompt": [] is a list that is too short, not "not a string")."""
    if not errors:
        return {}
    groups: dict[str | None, list[Any]] = {}
    for error in errors:
        tag = next((p for p in error.get("loc", ()) if _union_tag(p)), None)
        groups.setdefault(tag, []).append(error)

    def mismatch(error: Any) -> bool:
        return str(error.get("type", "")).endswith("_type")

    closest = min(groups.values(), key=lambda group: (len(group), all(map(mismatch, group))))
    return next((e for e in closest if not mismatch(e)), closest[0])


def _union_tag(part: Any) -> bool:
    """A location part naming the union member tried (`str`, `list[int]`, `TokenizeChat`)."""
    if not isinstance(part, str):
        return False
    return part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper()


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, corrected to what is served: validation errors are 400s, and every
    error (whatever the route's own media type, e.g. text/plain) is an OpenAI error object in
    JSON (the framework documents 422 and its own error shape)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None and "400" not in responses:
                    responses["400"] = {"description": "Bad Request"}
                for status, response in responses.items():
                    if status[0] in "45":
                        response["content"] = copy.deepcopy(error)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _started(state: ServerState, task: asyncio.Task[None]) -> None:
    """A failed start is fatal: one clear error line, then the server stops (exit 1)."""
    if task.cancelled() or task.exception() is None:
        return
    exc = task.exception()
    log.error(f"startup failed: {type(exc).__name__}: {exc}")
    state.fail()


async def _start_engine(state: ServerState, link: ProcessLink | None) -> None:
    """Start the engine loop (loading the model: in its own process unless
    --no-engine-process), wire metrics and dashboard."""
    settings = state.settings

    def on_step(stats: StepStats, load: EngineLoad) -> None:  # event loop, after every step
        state.metrics.observe_step(stats)
        state.dashboard.observe_step(stats, load)

    if link is not None:
        async_engine = await AsyncEngine.in_process(settings.engine, on_step, link)
    else:
        engine = await asyncio.to_thread(Engine, settings.engine)
        async_engine = AsyncEngine.in_thread(engine, on_step)
    state.dashboard.set_info(async_engine.info)
    state.metrics.track(lambda: async_engine.load, lambda: async_engine.num_waiting)
    state.metrics.set_kernel_info(async_engine.info)
    # Everything loaded so far (libraries, tokenizer; the model too when the engine is a
    # thread: ~400k objects with SmolLM2) lives as long as the process: leave it out of the
    # collector's scans, or every full collection (~190 ms here) stalls every running stream.
    gc.freeze()
    async_engine.start()
    state.engine = async_engine
    info = async_engine.info
    log.info(
        "engine ready",
        extra={
            "fields": {
                "model": state.settings.model_name,
                "dtype": info.dtype,
                "device": settings.engine.device,
                "max_model_len": info.max_model_len,
                "num_kv_blocks": info.num_kv_blocks,
                "block_size": info.block_size,
                "max_num_seqs": info.max_num_seqs,
                "attention": settings.engine.attention_backend,
                "linear": info.linear_backend,
                "decode_attention": info.decode_attention,
                "threads": info.threads,
                "quantization": info.quantization,
                "batch_invariant": info.batch_invariant,
                "engine": "process" if settings.engine_process else "thread",
                "gc_frozen_objects": gc.get_freeze_count(),
            }
        },
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

    def stop_now(self) -> None:
        """Stop without draining (nothing was served: the start failed)."""
        self.should_exit = True

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


def run(settings: Settings, sock: socket.socket, link: ProcessLink | None = None) -> None:
    """Serve on the bound `sock` until SIGTERM/SIGINT; exit 0 after draining, 1 if the server
    could not start."""
    quiet_libraries()
    app = create_app(settings, link)
    state: ServerState = app.state.server
    gate = RequestGate(
        app,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        queue_full=state.queue_full,
        api_key=settings.api_key,
    )
    limits = EdgeLimits(
        header_timeout_s=settings.header_timeout_s,
        stall_timeout_s=settings.stall_timeout_s,
        max_connections=settings.max_connections or default_max_connections(),
        refuse_early=gate.refuse_early,
    )
    config = uvicorn.Config(
        gate,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(limits),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        log_config=configure_logging(settings.log_format),
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, state)
    state.on_fail = server.stop_now
    server.run(sockets=[sock])
    # Drained and stopped. Skip the interpreter's teardown (seconds of garbage collection
    # over the model) so a terminating pod exits well inside its grace period.
    logging.shutdown()
    os._exit(1 if state.failed else 0)
