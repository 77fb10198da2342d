"""A static-batching OpenAI-style server, for comparison only (what a hand-rolled service does).

Requests are collected into a batch (up to --batch-size, or until --batch-wait-ms after the
first one arrived), the padded batch (left padding) runs through transformers `generate`, and
only when the whole batch is done is each result returned, or streamed as SSE chunks in the
same wire format as /v1/completions. One batch runs at a time; EOS is never a stopping
criterion for the batch (each row is cut at its own EOS unless it asked for ignore_eos).

    .venv/bin/python -m bench.static_server --model DIR --port 8002 [--batch-size 16]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer


class CompletionBody(BaseModel):
    prompt: str
    model: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    ignore_eos: bool = False
    stream_options: dict[str, Any] | None = None


@dataclass
class Job:
    ids: list[int]
    body: CompletionBody
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def create_app(model_dir: str, batch_size: int, wait_s: float, dtype: str = "float32") -> FastAPI:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos_ids or {0})
    queue: asyncio.Queue[Job] = asyncio.Queue()

    @torch.inference_mode()
    def generate(jobs: list[Job]) -> list[list[int]]:
        width = max(len(j.ids) for j in jobs)
        ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in jobs])
        b = jobs[0].body
        config = copy.deepcopy(model.generation_config)
        config.update(
            eos_token_id=None,  # EOS never stops the batch; rows are cut afterwards
            pad_token_id=pad,
            max_new_tokens=max(j.body.max_tokens for j in jobs),
            do_sample=b.temperature > 0,
            temperature=b.temperature if b.temperature > 0 else None,
            top_p=b.top_p if b.temperature > 0 else None,
            top_k=None,
        )
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return [row[width:].tolist() for row in out]

    async def batcher() -> None:
        held: list[Job] = []  # jobs whose sampling settings differ from the running batch's
        while True:
            first = held.pop(0) if held else await queue.get()
            key = (first.body.temperature, first.body.top_p)
            batch, deadline = [first], time.monotonic() + wait_s
            for j in list(held):
                if len(batch) < batch_size and (j.body.temperature, j.body.top_p) == key:
                    held.remove(j)
                    batch.append(j)
            while len(batch) < batch_size:
                try:
                    j = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    break
                (batch if (j.body.temperature, j.body.top_p) == key else held).append(j)
            try:
                outs = await asyncio.to_thread(generate, batch)
                for j, o in zip(batch, outs, strict=True):
                    j.done.set_result(o)
            except Exception as exc:  # the batch fails; the server carries on
                for j in batch:
                    j.done.set_exception(exc)

    def finish(job: Job, out: list[int]) -> tuple[list[int], str]:
        out = out[: job.body.max_tokens]
        if not job.body.ignore_eos:
            for i, t in enumerate(out):
                if t in eos_ids:
                    return out[:i], "stop"
        return out, "length"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher())
        yield
        task.cancel()

    app = FastAPI(title="static-batching", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_dir, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        ids = tok(body.prompt).input_ids
        if not ids or body.max_tokens < 1:
            return JSONResponse({"error": {"message": "empty prompt or max_tokens < 1"}}, 400)
        job = Job(ids, body)
        await queue.put(job)
        try:
            tokens, reason = finish(job, await job.done)
        except Exception as exc:
            return JSONResponse({"error": {"message": f"{type(exc).__name__}: {exc}"}}, 500)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model or model_dir,
        }
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": len(tokens),
            "total_tokens": len(ids) + len(tokens),
        }
        if not body.stream:
            text = tok.decode(tokens, skip_special_tokens=True)
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            return {**head, "choices": [choice], "usage": usage}

        def chunk(text: str, reason: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            return f"data: {json.dumps({**head, 'choices': [choice], **extra})}\n\n"

        async def events():
            shown = ""
            for i in range(len(tokens)):  # one chunk per token, text only when it is whole
                text = tok.decode(tokens[: i + 1], skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > len(shown):
                    yield chunk(text[len(shown) :])
                    shown = text
            yield chunk("", reason)
            if body.stream_options and body.stream_options.get("include_usage"):
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=50.0)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    app = create_app(args.model, args.batch_size, args.batch_wait_ms / 1000, args.dtype)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
