"""LoRA adapters at run time, with vLLM's routes and bodies: POST /v1/load_lora_adapter
{"lora_name", "lora_path"} and POST /v1/unload_lora_adapter {"lora_name"}. Off unless the
server runs with --allow-runtime-lora (vLLM gates them behind an environment variable); behind
the API key like every /v1 route. The engine does the work on its own thread, between steps
(`AsyncEngine.call`); the server keeps the list /v1/models shows."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.params import Depends
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from .protocol import APIError, ErrorResponse
from .state import ServerState


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)  # a PEFT adapter folder on the server's disk


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's clients may send it; names alone identify here


def lora_router(state: ServerState, auth: Depends) -> APIRouter:
    """The adapter routes, all behind `auth`."""
    errors = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 503)}
    router = APIRouter(dependencies=[auth], responses=errors)  # type: ignore[arg-type]

    def check_allowed() -> None:
        if not state.settings.engine.allow_runtime_lora:
            raise APIError(
                403, "loading LoRA adapters at run time is off; start with --allow-runtime-lora"
            )

    @router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(body: LoadLoRARequest) -> str:
        check_allowed()
        engine = state.live_engine()
        name = body.lora_name
        if name == state.settings.model_name or name in state.adapters:
            raise APIError(
                400, f"the LoRA adapter {name!r} has already been loaded", param="lora_name"
            )
        try:
            await engine.call("load_lora", name, body.lora_path)
        except ValueError as exc:  # the folder cannot be served (AdapterError), or the name
            raise APIError(400, str(exc), param="lora_path") from None
        state.adapters[name] = body.lora_path
        return f"Success: LoRA adapter '{name}' added successfully."

    @router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(body: UnloadLoRARequest) -> str:
        check_allowed()
        engine = state.live_engine()
        name = body.lora_name
        if name not in state.adapters:
            raise APIError(404, f"the LoRA adapter {name!r} cannot be found", param="lora_name")
        try:
            await engine.call("unload_lora", name)
        except LookupError as exc:
            raise APIError(404, str(exc), param="lora_name") from None
        del state.adapters[name]
        return f"Success: LoRA adapter '{name}' removed successfully."

    return router
