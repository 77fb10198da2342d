"""The engine loop as the server drives it, in a thread and in its own process: requests in
from an event loop, each request's deltas back in its collector, calls, aborts, and a loop
that dies ending every open request with an error."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from packserve import Engine, EngineConfig, SamplingParams
from packserve.engine import AsyncEngine, Completion
from packserve.engine.async_engine import Timed
from packserve.engine.process import EngineStartError

CONFIG = {"max_num_seqs": 4, "num_kv_blocks": 64, "max_model_len": 256}
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26]]


@pytest.fixture(scope="module")
def engine(make_engine) -> Engine:
    return make_engine(**CONFIG)


def run(make: Callable[[], Awaitable[AsyncEngine]], body: Callable[..., Awaitable[Any]]) -> Any:
    async def main() -> Any:
        front = await make()
        front.start()
        try:
            return await body(front)
        finally:
            front.shutdown()

    return asyncio.run(main())


async def collect(front: AsyncEngine, prompts: list[list[int]], params: SamplingParams) -> list:
    queue: asyncio.Queue[Timed] = asyncio.Queue()
    outs = {f"r{i}": Completion(f"r{i}", tuple(p)) for i, p in enumerate(prompts)}
    for rid, out in outs.items():
        front.submit(rid, list(out.prompt_token_ids), params, queue)
    while not all(o.finish_reason for o in outs.values()):
        item = await queue.get()
        outs[item.delta.request_id].add(item.delta)
    for rid in outs:
        front.release(rid, finished=True)
    return [outs[f"r{i}"] for i in range(len(prompts))]


def thread_front(engine: Engine) -> Callable[[], Awaitable[AsyncEngine]]:
    async def make() -> AsyncEngine:
        return AsyncEngine.in_thread(engine)

    return make


def process_front(model_dir: str) -> Callable[[], Awaitable[AsyncEngine]]:
    async def make() -> AsyncEngine:
        config = EngineConfig(model=model_dir, dtype="float32", **CONFIG)  # type: ignore[arg-type]
        return await AsyncEngine.in_process(config)

    return make


@pytest.fixture(params=["thread", "process"])
def front(request, engine: Engine, tiny_model_dir) -> Callable[[], Awaitable[AsyncEngine]]:
    if request.param == "thread":
        return thread_front(engine)
    return process_front(str(tiny_model_dir))


def test_outputs_equal_the_offline_engine(front, engine: Engine) -> None:
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = [c.token_ids for c in engine.generate(PROMPTS, params)]
    got = run(front, lambda f: collect(f, PROMPTS, params))
    assert [c.token_ids for c in got] == expected
    assert all(c.finish_reason == "length" for c in got)


def test_call_returns_the_result_or_raises(front) -> None:
    async def body(f: AsyncEngine) -> tuple[Any, BaseException | None]:
        load = await f.call("load")
        try:
            await f.call("add_request", [10**9], SamplingParams(max_tokens=1))
        except ValueError as exc:
            return load, exc
        return load, None

    load, error = run(front, body)
    assert load.num_running == 0 and load.num_kv_blocks > 0
    assert error is not None and "token ids must be in" in str(error)


def test_a_refused_request_ends_with_its_error_and_others_run(front) -> None:
    async def body(f: AsyncEngine) -> list[Completion]:
        return await collect(f, [[10**9], [5, 6, 7]], SamplingParams(max_tokens=2))

    bad, good = run(front, body)
    assert bad.finish_reason == "error" and "token ids must be in" in (bad.error or "")
    assert good.finish_reason == "length" and len(good.token_ids) == 2


def test_abort_frees_the_request_and_stops_its_deltas(front) -> None:
    async def body(f: AsyncEngine) -> tuple[int, int]:
        queue: asyncio.Queue[Timed] = asyncio.Queue()
        f.submit("long", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), queue)
        await queue.get()  # it runs
        f.release("long", finished=False)
        while f.load.num_running:
            await asyncio.sleep(0.01)
        left = queue.qsize()
        await asyncio.sleep(0.2)
        return queue.qsize() - left, f.load.num_kv_blocks_used

    more, used = run(front, body)
    assert more == 0 and used == 0


def test_a_dead_engine_process_ends_open_requests_with_an_error(tiny_model_dir) -> None:
    async def body(f: AsyncEngine) -> tuple[Completion, bool]:
        queue: asyncio.Queue[Timed] = asyncio.Queue()
        f.submit("long", [5, 6, 7], SamplingParams(max_tokens=10_000, ignore_eos=True), queue)
        out = Completion("long", (5, 6, 7))
        out.add((await queue.get()).delta)
        pid = f._link._process.pid  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGKILL)
        while out.finish_reason is None:
            out.add((await asyncio.wait_for(queue.get(), 10)).delta)
        return out, f.alive

    out, alive = run(process_front(str(tiny_model_dir)), body)
    assert out.finish_reason == "error" and "engine process exited" in (out.error or "")
    assert not alive


def test_an_engine_process_that_cannot_load_says_why(tmp_path) -> None:
    async def main() -> None:
        await AsyncEngine.in_process(EngineConfig(model=str(tmp_path)))

    with pytest.raises(EngineStartError, match="tmp|config|Unrecognized|not"):
        asyncio.run(main())
