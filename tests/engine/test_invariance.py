"""A sequence's greedy output does not depend on what else the engine is doing."""

from __future__ import annotations

import pytest

from ember import LLM, SamplingParams
from tests.helpers import make_prompts, wait_client_idle

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def _alone(llm: LLM, prompt: list[int], params=GREEDY) -> list[int]:
    return llm.generate(prompt, params)[0].outputs[0].token_ids


def _drive(engine, schedule: dict[int, list], max_steps: int = 10_000) -> dict:
    """Step the engine, running schedule[step] actions (callables) before that step; final outputs by id."""
    final, step = {}, 0
    while engine.has_unfinished_requests() or any(k >= step for k in schedule):
        for action in schedule.get(step, []):
            action()
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
        assert step < max_steps
    return final


def test_unchanged_when_others_join_and_leave(random_llm):
    llm = random_llm
    engine = llm.engine
    target, long_p, short_p = make_prompts(llm.tokenizer, [30, 250, 8], seed=3)
    want = _alone(llm, target)
    final = _drive(
        engine,
        {
            0: [lambda: engine.add_request(target, GREEDY, "target")],
            2: [
                lambda: engine.add_request(long_p, SamplingParams(temperature=0, max_tokens=10), "long"),
                lambda: engine.add_request(
                    short_p, SamplingParams(temperature=0.8, max_tokens=60, seed=1), "short"
                ),
            ],
            6: [lambda: engine.abort_request("short")],
            9: [lambda: engine.add_request(short_p, SamplingParams(temperature=0, max_tokens=5), "late")],
        },
    )
    assert final["target"].outputs[0].token_ids == want
    assert "short" not in final and {"long", "late"} <= set(final)
    assert engine.kv.pool.is_whole()


@pytest.mark.parametrize("budget", [1, 5, 16, 97])
def test_unchanged_under_chunked_prefill(random_model_dirs, random_llm, budget):
    prompts = make_prompts(random_llm.tokenizer, [40, 180], seed=4)
    want = [_alone(random_llm, p) for p in prompts]
    llm = LLM(model=str(random_model_dirs["llama-gqa"]), max_num_batched_tokens=budget, num_blocks=64)
    got = [r.outputs[0].token_ids for r in llm.generate(prompts, GREEDY)]
    assert got == want
    assert llm.engine.kv.pool.is_whole()


def test_unchanged_when_preempted_and_recomputed(random_model_dirs, random_llm):
    prompts = make_prompts(random_llm.tokenizer, [20, 35, 50, 28, 44, 60], seed=5)
    want = [_alone(random_llm, p) for p in prompts]
    # 6 sequences of up to ~100 tokens in blocks of 4 need ~150 blocks; give them 40.
    llm = LLM(model=str(random_model_dirs["llama-gqa"]), block_size=4, num_blocks=40)
    got = [r.outputs[0].token_ids for r in llm.generate(prompts, GREEDY)]
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == want
    assert llm.engine.kv.pool.is_whole()


def test_pool_whole_after_aborts_at_every_stage(random_llm):
    engine = random_llm.engine
    prompts = make_prompts(random_llm.tokenizer, [10, 300, 40, 25, 500, 12], seed=6)
    ids = [f"r{i}" for i in range(len(prompts))]
    params = SamplingParams(temperature=0.7, max_tokens=30, n=2, seed=0)
    final = _drive(
        engine,
        {
            0: [lambda: [engine.add_request(p, params, rid) for p, rid in zip(prompts, ids, strict=True)]],
            1: [lambda: engine.abort_request("r1")],  # mid-prefill
            4: [lambda: engine.abort_request("r0")],  # decoding, forked
            5: [lambda: engine.abort_request("r4")],
        },
    )
    assert set(final) == {"r2", "r3", "r5"}
    assert engine.kv.pool.is_whole() and not engine.scheduler.has_work()


@pytest.mark.slow
def test_default_model_invariant_to_chunking_and_preemption(default_model_dir, default_llm):
    prompts = make_prompts(default_llm.tokenizer, [30, 120, 300], seed=7)
    params = SamplingParams(temperature=0, max_tokens=32)
    want = [_alone(default_llm, p, params) for p in prompts]
    llm = LLM(model=str(default_model_dir), max_num_batched_tokens=37, block_size=8, num_blocks=45)
    got = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == want
    assert llm.engine.kv.pool.is_whole()


def test_no_max_tokens_runs_to_what_the_pool_holds(random_model_dirs):
    # A 32-token pool and a model context of 2048: the request must end at the pool's size, not hang.
    llm = LLM(model=str(random_model_dirs["llama-gqa"]), block_size=4, num_blocks=8)
    out = llm.generate([1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 32 - 5
    assert llm.engine.kv.pool.is_whole()


def test_a_refused_prompt_leaves_nothing_of_its_batch_behind(random_llm):
    with pytest.raises(ValueError, match="empty"):
        random_llm.generate([[1, 2, 3], []], GREEDY)
    assert not random_llm.engine.has_unfinished_requests() and random_llm.engine.kv.pool.is_whole()


def test_engine_seed_makes_unseeded_sampling_reproducible(random_model_dirs):
    params = SamplingParams(temperature=1.0, max_tokens=12)
    runs = [
        LLM(model=str(random_model_dirs["llama-gqa"]), num_blocks=32, seed=5).generate([1, 2, 3], params)
        for _ in range(2)
    ]
    assert runs[0][0].outputs[0].token_ids == runs[1][0].outputs[0].token_ids
    tiny = SamplingParams(temperature=1e-30, max_tokens=12, ignore_eos=True)
    assert _alone(LLM(model=str(random_model_dirs["llama-gqa"]), num_blocks=32), [1, 2, 3], tiny) == _alone(
        LLM(model=str(random_model_dirs["llama-gqa"]), num_blocks=32),
        [1, 2, 3],
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    )


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_unchanged_through_both_clients(random_model_dirs, random_llm, mode):
    """Through the serving client, in a pool small enough to preempt: a target's greedy output is what
    it gives alone while others join, and one leaves mid-way (its caller stops reading); every block
    comes back."""
    import asyncio

    from ember import AsyncEngine, CacheConfig, EngineConfig

    prompts = make_prompts(random_llm.tokenizer, [30, 20, 35, 50, 28, 44], seed=8)
    want = [_alone(random_llm, p) for p in prompts]
    config = EngineConfig(
        model=str(random_model_dirs["llama-gqa"]), cache=CacheConfig(block_size=4, num_blocks=40)
    )
    engine = AsyncEngine(config, mode=mode)

    async def one(prompt, delay: float, leave_after: int | None = None):
        await asyncio.sleep(delay)
        last, n = None, 0
        async for out in engine.generate(prompt, GREEDY):
            last, n = out, n + 1
            if leave_after is not None and n >= leave_after:
                return None
        return last.outputs[0].token_ids

    async def run():
        jobs = [one(prompts[0], 0.0)]
        jobs += [one(p, 0.05 * (i + 1)) for i, p in enumerate(prompts[1:])]
        jobs.append(one(prompts[3], 0.1, leave_after=3))
        return await asyncio.gather(*jobs)

    try:
        got = asyncio.run(run())
        assert got[:-1] == want and got[-1] is None
        assert engine.stats.num_preemptions > 0
        wait_client_idle(engine)
    finally:
        engine.shutdown()
