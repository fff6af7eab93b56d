"""Priority scheduling: lower numbers first, batch work filling what interactive work leaves, preemption
of less urgent work (never of work as urgent) with exact outputs after it resumes."""

from __future__ import annotations

import asyncio

import pytest

from ember.config import CacheConfig, EngineConfig, SchedulerConfig
from ember.engine.async_engine import AsyncEngine
from ember.engine.kv_cache import KVCacheManager
from ember.engine.llm_engine import LLMEngine
from ember.engine.scheduler import Scheduler, StepCost
from ember.engine.sequence import Status
from ember.sampling_params import SamplingParams
from tests.engine.test_scheduler import FakeSeq, _advance

BATCH = 10


def _seq(num_tokens: int, priority: int = 0) -> FakeSeq:
    return FakeSeq(num_tokens, params=SamplingParams(priority=priority))


def _scheduler(budget=16, max_seqs=8, blocks=64, block_size=4, background=None, slowdown=None, clock=None):
    """A scheduler without the background share unless asked (`slowdown`), so the order is plain."""
    kv = KVCacheManager(blocks, block_size)
    config = SchedulerConfig(
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        background_token_budget=background,
        background_slowdown=slowdown,
    )
    return Scheduler(config, kv, clock=clock or (lambda: 0.0)), kv


def test_the_queue_orders_by_priority_then_arrival():
    sched, _ = _scheduler()
    b1, i1, b2, i2, mid = _seq(4, BATCH), _seq(4), _seq(4, BATCH), _seq(4), _seq(4, 5)
    for s in (b1, i1, b2, i2, mid):
        sched.add(s)
    assert list(sched.waiting) == [i1, i2, mid, b1, b2]


def test_interactive_work_is_admitted_ahead_of_queued_batch_work():
    sched, _ = _scheduler(budget=8, max_seqs=2)
    batch = [_seq(4, BATCH) for _ in range(3)]
    for s in batch:
        sched.add(s)
    urgent = _seq(4)
    sched.add(urgent)
    out = sched.schedule()
    assert list(out.num_scheduled) == [urgent, batch[0]]
    assert sched.running == [urgent, batch[0]]


def test_batch_work_fills_the_budget_interactive_work_leaves():
    sched, _ = _scheduler(budget=10)
    urgent, batch = _seq(3), _seq(30, BATCH)
    sched.add(batch)
    sched.add(urgent)
    out = sched.schedule()
    assert out.num_scheduled == {urgent: 3, batch: 7}


def test_a_full_running_list_makes_room_for_interactive_work_by_preempting_batch_work():
    sched, _ = _scheduler(budget=16, max_seqs=2)
    a, b = _seq(4, BATCH), _seq(4, BATCH)
    sched.add(a)
    sched.add(b)
    _advance(sched.schedule())
    urgent = _seq(4)
    sched.add(urgent)
    out = sched.schedule()
    assert out.preempted == [b]  # the least urgent, newest
    assert urgent in out.num_scheduled and b not in out.num_scheduled
    assert sched.running == [urgent, a] and list(sched.waiting) == [b]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0


def test_a_full_pool_makes_room_for_interactive_work_by_preempting_batch_work():
    sched, kv = _scheduler(budget=32, max_seqs=8, blocks=4, block_size=4)
    batch = _seq(12, BATCH)  # three of the four blocks
    sched.add(batch)
    _advance(sched.schedule())
    urgent = _seq(8)  # needs two
    sched.add(urgent)
    out = sched.schedule()
    assert out.preempted == [batch] and out.num_scheduled == {urgent: 8}


def test_interactive_work_never_preempts_interactive_work():
    sched, _ = _scheduler(budget=16, max_seqs=2)
    a, b = _seq(4), _seq(4)
    sched.add(a)
    sched.add(b)
    _advance(sched.schedule())
    late = _seq(4)
    sched.add(late)
    out = sched.schedule()
    assert out.preempted == [] and late not in out.num_scheduled and list(sched.waiting) == [late]


def test_a_preempted_batch_sequence_resumes_first_among_batch_work():
    sched, _ = _scheduler(budget=16, max_seqs=2)
    a, b, c = _seq(4, BATCH), _seq(4, BATCH), _seq(4, BATCH)
    for s in (a, b, c):
        sched.add(s)
    _advance(sched.schedule())
    sched.add(_seq(4))
    sched.schedule()
    assert list(sched.waiting) == [b, c]


def test_the_background_budget_caps_batch_work_only_while_interactive_work_is_in():
    sched, _ = _scheduler(budget=64, background=4)
    batch = _seq(40, BATCH)
    sched.add(batch)
    out = sched.schedule()
    assert out.num_scheduled == {batch: 40}  # alone: the whole budget
    _advance(out)
    urgent = _seq(20)
    sched.add(urgent)
    more = _seq(30, BATCH)
    sched.add(more)
    out = sched.schedule()
    assert out.num_scheduled == {urgent: 20, batch: 1, more: 3}


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_step_cost_fits_the_fixed_cost_and_the_cost_of_a_token():
    cost = StepCost()
    for tokens in (1, 5, 2, 9, 4, 1, 7) * 5:
        cost.observe(tokens, 0.020 + 0.003 * tokens)
    assert cost.per_token == pytest.approx(0.003, rel=1e-6)
    assert cost.seconds(4) == pytest.approx(0.032, rel=1e-6)


def test_step_cost_overcharges_a_token_until_it_has_seen_steps_of_other_sizes():
    cost = StepCost()
    for _ in range(10):
        cost.observe(4, 0.032)  # every step the same size: the fixed cost cannot be told apart
    assert cost.per_token == pytest.approx(0.008)  # the whole step per token: an upper bound
    assert cost.seconds(4) == pytest.approx(0.032)


def _timed(sched: Scheduler, fixed: float, per_token: float) -> None:
    for tokens in (1, 3, 8, 2, 6):
        sched.observe(tokens, fixed + per_token * tokens)


def test_the_slowdown_gives_batch_work_the_tokens_a_tenth_of_the_interactive_step_buys():
    sched, _ = _scheduler(budget=512, slowdown=0.1)
    _timed(sched, fixed=0.020, per_token=0.0001)  # a fast token (a GPU): 0.1 * 20.4 ms buys 20 of them
    users = [_seq(1) for _ in range(4)]
    batch = [_seq(100, BATCH) for _ in range(3)]
    for s in users + batch:
        sched.add(s)
    out = sched.schedule()
    assert sum(out.num_scheduled[s] for s in users) == 4
    assert sum(out.num_scheduled.get(s, 0) for s in batch) == 20


def test_a_costly_token_is_earned_over_several_steps():
    sched, _ = _scheduler(budget=64, slowdown=0.1)
    _timed(sched, fixed=0.020, per_token=0.004)  # CPU-like: a token costs 4 ms, 10% of a 24 ms step ~2.4 ms
    user = _seq(40)
    sched.add(user)
    out = sched.schedule()  # prefill the user's prompt, then it decodes
    _advance(out)
    batch = _seq(8, BATCH)
    sched.add(batch)
    granted = []
    for _ in range(10):
        out = sched.schedule()
        granted.append(out.num_scheduled.get(batch, 0))
        _advance(out)
    # 2.4 ms earned a step, 4 ms a token: 6 tokens in 10 steps (7 with what the prefill step left over,
    # which carries at most one token's worth), never two in one step
    assert sum(granted) in (6, 7) and max(granted) == 1


def test_batch_work_waits_out_the_grace_after_interactive_work_then_runs_freely():
    clock = _Clock()
    sched, _ = _scheduler(budget=64, slowdown=0.0, clock=clock)
    _timed(sched, fixed=0.020, per_token=0.004)
    user = _seq(4)
    sched.add(user)
    batch = _seq(40, BATCH)
    sched.add(batch)
    out = sched.schedule()
    assert out.num_scheduled == {user: 4}  # slowdown 0: nothing beside interactive work
    sched.running.remove(user)  # the user's request ends
    clock.now = 0.5
    assert sched.schedule().empty  # within the grace (1 s): the next turn may come
    clock.now = 1.0
    assert sched.schedule().num_scheduled == {batch: 40}


def _engine(model_dir, num_blocks=None, **sched) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(model_dir),
            max_model_len=256,
            cache=CacheConfig(num_blocks=num_blocks, block_size=16),
            scheduler=SchedulerConfig(**sched) if sched else SchedulerConfig(),
        )
    )


def _run(engine: LLMEngine, order: list[str] | None = None) -> dict[str, list[int]]:
    """Step until done: each request's generated tokens, and (into `order`) the order they finished in."""
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
                if order is not None:
                    order.append(out.request_id)
    return finished


def test_preempted_batch_work_resumes_with_the_same_greedy_tokens(random_model_dirs):
    prompts = [[5 + i, 17, 29 + i, 41, 53, 7 + i] for i in range(4)]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    alone = _engine(random_model_dirs["llama-gqa"])
    for i, p in enumerate(prompts):
        alone.add_request(p, greedy, request_id=f"b{i}")
    done = _run(alone)
    alone.close()
    expected = [done[f"b{i}"] for i in range(4)]

    # A pool too small for the batch and an interactive request at once: the batch is preempted.
    engine = _engine(random_model_dirs["llama-gqa"], num_blocks=12, max_num_seqs=4)
    batch = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, priority=BATCH)
    for i, p in enumerate(prompts):
        engine.add_request(p, batch, request_id=f"b{i}")
    for _ in range(8):
        engine.step()
    engine.add_request([3] * 100, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), "urgent")
    order: list[str] = []
    finished = _run(engine, order)
    preemptions = engine.core.scheduler.num_preemptions
    engine.close()
    assert preemptions > 0
    assert order[0] == "urgent"  # it did not wait for the batch to finish
    assert [finished[f"b{i}"] for i in range(4)] == expected


def test_priority_reaches_the_core_through_the_process_client(random_model_dirs):
    config = EngineConfig(
        model=str(random_model_dirs["llama-gqa"]),
        max_model_len=128,
        cache=CacheConfig(kv_cache_memory="8MiB"),
    )
    engine = AsyncEngine(config, mode="process")

    async def go():
        await engine.wait_ready()
        seen = []
        params = SamplingParams(temperature=0, max_tokens=4)
        async for out in engine.generate([5, 6, 7], params, priority=BATCH):
            seen.append(out)
        return seen

    try:
        outs = asyncio.run(go())
    finally:
        engine.shutdown()
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4


def test_a_negative_priority_is_refused_naming_the_field():
    from ember.protocol.requests import ChatCompletionRequest

    with pytest.raises(Exception, match="priority"):
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "priority": -1}
        )
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "priority": 10}
    )
    assert body.sampling_params(16, None).priority == 10
