"""AsyncEngine: streams deltas from the engine thread, aborts when the caller leaves early."""

from __future__ import annotations

import asyncio

import pytest

from ember import AsyncEngine, CacheConfig, EngineConfig, SamplingParams
from ember.engine.async_engine import EngineDeadError
from ember.errors import InvalidRequest


@pytest.fixture(scope="module")
def async_engine(random_model_dirs):
    # Its own engine: the engine thread must be the only one stepping it.
    engine = AsyncEngine(
        EngineConfig(model=str(random_model_dirs["llama-gqa"]), cache=CacheConfig(num_blocks=256))
    )
    yield engine
    engine.shutdown()


def test_streams_deltas_that_add_up_to_the_offline_result(async_engine, random_llm):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompt = "Tell me about rivers"
    want = random_llm.generate(prompt, params)[0].outputs[0]

    async def run():
        async def one(rid):
            deltas, last = [], None
            async for out in async_engine.generate(prompt, params, request_id=rid):
                deltas.append(out.outputs[0].delta_text)
                last = out
            return deltas, last

        return await asyncio.gather(*(one(f"s{i}") for i in range(3)))

    for deltas, last in asyncio.run(run()):
        assert last.finished and last.outputs[0].token_ids == want.token_ids
        assert "".join(deltas) == want.text == last.outputs[0].text
        assert len(deltas) > 1


def test_leaving_early_aborts_and_frees_blocks(async_engine):
    async def run():
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        n = 0
        async for _ in async_engine.generate("a long story", params, request_id="quitter"):
            n += 1
            if n == 3:
                break
        for _ in range(100):  # the abort is applied on the engine thread
            if not async_engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)

    asyncio.run(run())
    assert not async_engine.engine.has_unfinished_requests()
    assert async_engine.engine.kv.pool.is_whole()


def test_bad_request_raises_to_the_caller_and_engine_keeps_serving(async_engine):
    async def run():
        with pytest.raises(InvalidRequest):
            async for _ in async_engine.generate([], SamplingParams()):
                pass
        outs = [o async for o in async_engine.generate("hi", SamplingParams(max_tokens=3, ignore_eos=True))]
        return outs[-1]

    last = asyncio.run(run())
    assert last.finished and len(last.outputs[0].token_ids) == 3
    assert async_engine.is_running


def test_external_abort_ends_the_stream(async_engine):
    async def run():
        params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        outs = []
        async for out in async_engine.generate("a long story", params, request_id="stopped"):
            outs.append(out)
            if len(outs) == 2:
                async_engine.abort("stopped")
        return outs[-1]

    last = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert async_engine.engine.kv.pool.is_whole()


def test_duplicate_request_id_is_refused_without_harming_the_first(async_engine):
    async def run():
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        first = async_engine.generate("hello", params, request_id="dup")
        await anext(first)
        with pytest.raises(InvalidRequest, match="already in use"):
            async for _ in async_engine.generate("hello", params, request_id="dup"):
                pass
        outs = [out async for out in first]
        return outs[-1]

    last = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert last.finished and len(last.outputs[0].token_ids) == 30


def test_shutdown_ends_open_streams(random_model_dirs):
    engine = AsyncEngine(
        EngineConfig(model=str(random_model_dirs["llama-gqa"]), cache=CacheConfig(num_blocks=64))
    )

    async def run():
        params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("hello", params):
                await asyncio.to_thread(engine.shutdown)

    asyncio.run(asyncio.wait_for(run(), timeout=60))
    with pytest.raises(EngineDeadError):
        asyncio.run(anext(engine.generate("hello")))
