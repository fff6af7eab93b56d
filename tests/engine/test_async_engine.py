"""AsyncEngine: the core on a thread or in a process, text made by the frontend, aborts when callers leave."""

from __future__ import annotations

import asyncio

import pytest

from ember import AsyncEngine, CacheConfig, EngineConfig, SamplingParams
from ember.engine.async_engine import EngineDeadError, EngineOverloadedError
from ember.engine.core import EngineCore
from ember.errors import InvalidRequest
from ember.outputs import RequestOutput
from ember.structured_outputs import StructuredOutputs


@pytest.fixture(scope="module", params=["thread", "process"])
def async_engine(request, random_model_dirs):
    engine = AsyncEngine(
        EngineConfig(model=str(random_model_dirs["llama-gqa"]), cache=CacheConfig(num_blocks=256)),
        mode=request.param,
    )
    yield engine
    engine.shutdown()


async def _until_idle(engine: AsyncEngine) -> None:
    """Wait for the core to report nothing running or waiting and every KV block free."""
    for _ in range(500):
        s = engine.stats
        if s is not None and s.num_running == s.num_waiting == 0 and s.kv_cache_usage == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the engine did not go idle: {engine.stats}")


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
        await _until_idle(async_engine)

    asyncio.run(run())


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
        await _until_idle(async_engine)
        return outs[-1]

    last = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert last.finished and last.outputs[0].finish_reason == "abort"


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


async def _drain(engine: AsyncEngine, prompt, params: SamplingParams) -> RequestOutput:
    return [out async for out in engine.generate(prompt, params)][-1]


def _still_serves(engine: AsyncEngine) -> None:
    last = asyncio.run(
        asyncio.wait_for(_drain(engine, "hi", SamplingParams(max_tokens=3, ignore_eos=True)), 60)
    )
    assert last.finished and len(last.outputs[0].token_ids) == 3 and engine.is_running


def test_a_schema_nested_past_the_limits_fails_only_its_request(async_engine):
    # 600 levels: past Python's recursion limit in pickling and in the schema rewrite. It used to vanish
    # on the process queue (the caller waited forever) or kill a threaded core.
    schema: dict = {"type": "string"}
    for _ in range(600):
        schema = {"type": "array", "items": schema}
    params = SamplingParams(max_tokens=3, structured=StructuredOutputs(json=schema))
    with pytest.raises(InvalidRequest, match="nested deeper"):
        asyncio.run(asyncio.wait_for(_drain(async_engine, "hi", params), 30))
    _still_serves(async_engine)


def test_a_request_that_cannot_be_sent_to_the_core_fails_alone(async_engine):
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    params.hook = lambda: None  # no pickle carries a lambda: a stand-in for anything the queue refuses
    if async_engine.mode == "process":
        with pytest.raises(InvalidRequest, match="cannot be passed to the engine"):
            asyncio.run(asyncio.wait_for(_drain(async_engine, "hi", params), 30))
        assert async_engine.num_unfinished == 0
    else:  # nothing is pickled on a thread
        assert asyncio.run(asyncio.wait_for(_drain(async_engine, "hi", params), 30)).finished
    _still_serves(async_engine)


def test_any_failure_while_the_core_adds_a_request_fails_only_it(random_model_dirs, monkeypatch):
    engine = AsyncEngine(
        EngineConfig(model=str(random_model_dirs["llama-gqa"]), cache=CacheConfig(num_blocks=64)),
        mode="thread",
    )
    real = EngineCore.add_request

    def add(self, prompt_ids, params, request_id=None, **kw):
        if request_id == "doomed":
            raise RecursionError("maximum recursion depth exceeded")
        return real(self, prompt_ids, params, request_id, **kw)

    monkeypatch.setattr(EngineCore, "add_request", add)
    try:
        gen = engine.generate("hi", SamplingParams(max_tokens=3), request_id="doomed")
        with pytest.raises(InvalidRequest, match="RecursionError"):
            asyncio.run(asyncio.wait_for(anext(gen), 30))
        _still_serves(engine)
    finally:
        engine.shutdown()


def test_min_tokens_past_the_context_is_refused_at_once(async_engine):
    params = SamplingParams(max_tokens=None, min_tokens=10**6)
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(asyncio.wait_for(_drain(async_engine, [1, 2, 3], params), 10))
    room = min(async_engine.info.max_model_len, async_engine.info.pool_tokens) - 3
    assert f"min_tokens is {10**6}" in str(info.value) and f"room for {room} tokens" in str(info.value)
    assert info.value.param == "min_tokens"


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


def test_stop_strings_and_n_match_the_offline_engine(async_engine, random_llm):
    """Stop strings are matched by the frontend here and by LLMEngine offline: the same text either way."""
    prompt = "Once upon a time"
    probe = random_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    stop = probe.outputs[0].text[-6:-3]  # something the greedy text is known to contain
    cases = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]),
        SamplingParams(temperature=0.8, seed=7, n=3, max_tokens=12, ignore_eos=True, stop=[stop]),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop], min_tokens=10),
    ]

    async def run(params):
        return [o async for o in async_engine.generate(prompt, params)][-1]

    for params in cases:
        want = random_llm.generate(prompt, params)[0]
        got = asyncio.run(run(params))
        for w, g in zip(want.outputs, got.outputs, strict=True):
            assert (g.text, g.finish_reason, g.stop_reason) == (w.text, w.finish_reason, w.stop_reason)
            assert g.token_ids == w.token_ids
            if params.logprobs:
                assert [sorted(e) for e in g.logprobs] == [sorted(e) for e in w.logprobs]
    assert stop in probe.outputs[0].text
    asyncio.run(_until_idle(async_engine))


def test_queue_bound_refuses_past_capacity(random_model_dirs):
    engine = AsyncEngine(
        EngineConfig(model=str(random_model_dirs["llama-gqa"]), cache=CacheConfig(num_blocks=64)),
        max_queue=1,
    )
    engine.max_pending = 2  # two sequences in flight at most

    async def run():
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        first = engine.generate("one", params)
        await anext(first)
        with pytest.raises(EngineOverloadedError):
            await anext(engine.generate("two", SamplingParams(n=2)))
        second = engine.generate("two", params)
        await anext(second)
        with pytest.raises(EngineOverloadedError):
            await anext(engine.generate("three", params))
        await first.aclose()
        await second.aclose()
        await _until_idle(engine)
        out = [o async for o in engine.generate("four", SamplingParams(max_tokens=2, ignore_eos=True))]
        return out[-1]

    try:
        assert asyncio.run(asyncio.wait_for(run(), timeout=60)).finished
    finally:
        engine.shutdown()
