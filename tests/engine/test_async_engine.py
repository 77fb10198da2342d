"""The engine loop as the server drives it: requests in from an event loop, deltas back."""

from __future__ import annotations

import asyncio

import pytest

from packserve import Engine, SamplingParams
from packserve.engine import AsyncEngine


@pytest.fixture(scope="module")
def engine(make_engine) -> Engine:
    return make_engine(max_num_seqs=4, num_kv_blocks=64, max_model_len=256)


def test_call_runs_an_engine_method_and_returns_or_raises(engine: Engine) -> None:
    async def main() -> tuple[object, BaseException | None]:
        loop_engine = AsyncEngine(engine)
        loop_engine.start()
        try:
            load = await loop_engine.call("load")
            try:
                await loop_engine.call("add_request", [10**9], SamplingParams(max_tokens=1))
            except ValueError as exc:
                return load, exc
            return load, None
        finally:
            loop_engine.shutdown()

    load, error = asyncio.run(main())
    assert load == engine.load()
    assert error is not None and "token ids must be in" in str(error)
