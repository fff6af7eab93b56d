"""The simulator against schedules worked out by hand: steps of known cost through the real scheduler."""

from __future__ import annotations

import pytest

from ember.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from ember.optimize.profile import StepModel
from ember.optimize.simulate import SimRequest, latency_metrics, simulate

ONE_SECOND_A_STEP = StepModel(fixed=1.0, per_token=0.0, per_seq=0.0, per_attention=0.0)
ONE_SECOND_A_TOKEN = StepModel(fixed=0.0, per_token=1.0, per_seq=0.0, per_attention=0.0)


def _config(budget: int = 2048, prefix: bool = False, **kw) -> EngineConfig:
    return EngineConfig(
        cache=CacheConfig(block_size=16, enable_prefix_caching=prefix),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget),
        **kw,
    )


def test_two_requests_batched_in_one_step_each_then_decode_together():
    reqs = [SimRequest([1, 2, 3, 4], 3, 0.0), SimRequest([5, 6, 7, 8], 3, 0.0)]
    line = simulate(_config(), reqs, ONE_SECOND_A_STEP, num_blocks=64)
    assert line.tokens == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
    m = latency_metrics(line, {})
    assert m["ttft_p50"] == pytest.approx(1000) and m["tpot_p50"] == pytest.approx(1000)
    assert m["goodput"] == pytest.approx(2 / 3)


def test_a_small_budget_chunks_the_second_prompt_behind_the_first_ones_decode():
    # budget 4: step 1 A's prompt; step 2 A's decode + 3 of B's tokens; step 3 A's last, B's last prompt
    # token (its first output); then B alone.
    reqs = [SimRequest([1, 2, 3, 4], 3, 0.0), SimRequest([5, 6, 7, 8], 3, 0.0)]
    line = simulate(_config(budget=4), reqs, ONE_SECOND_A_STEP, num_blocks=64)
    assert line.tokens == [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]
    m = latency_metrics(line, {"ttft": 2500})
    assert m["goodput"] == pytest.approx(1 / 5)  # only A starts within 2.5 s; 5 s in all


def test_an_idle_engine_waits_for_the_next_arrival():
    line = simulate(_config(), [SimRequest([1, 2], 2, 10.0)], ONE_SECOND_A_STEP, num_blocks=64)
    assert line.tokens == [[11.0, 12.0]]
    assert latency_metrics(line, {})["ttft_p50"] == pytest.approx(1000)


@pytest.mark.parametrize("prefix, ttft_second", [(True, 8.0 + 1.0), (False, 40.0 + 1.0)])
def test_prefix_cache_hits_cost_no_budget(prefix, ttft_second):
    shared = list(range(100, 132))  # two full blocks of 16
    a = SimRequest([*shared, 1, 2, 3, 4, 5, 6, 7, 8], 1, 0.0)
    b = SimRequest([*shared, 9, 9, 9, 9, 9, 9, 9, 9], 1, 100.0)
    line = simulate(_config(prefix=prefix), [a, b], ONE_SECOND_A_TOKEN, num_blocks=64)
    assert line.tokens[0] == [40.0]
    # 1 s: the step also pays for its one-token chunk (the last prompt token is never taken from cache)
    assert line.tokens[1][0] - 100.0 == pytest.approx(ttft_second - 1.0)


def test_ngram_speculation_on_a_copied_answer_takes_fewer_steps():
    prompt = list(range(200, 240))
    answer = prompt[:16]  # the model copies its prompt
    reqs = [SimRequest([7, *prompt, 7, *prompt[:3]], 16, 0.0, output_ids=answer[3:] + [1, 2, 3])]
    plain = simulate(_config(), reqs, ONE_SECOND_A_STEP, num_blocks=64)
    spec = simulate(_config(speculative=SpeculativeConfig("ngram")), reqs, ONE_SECOND_A_STEP, 64)
    assert len(plain.tokens[0]) == len(spec.tokens[0]) == 16
    assert plain.steps == 16 and spec.steps < 8


def test_a_full_pool_preempts_and_still_finishes_everything():
    reqs = [SimRequest(list(range(30)), 20, 0.0) for _ in range(4)]
    line = simulate(_config(), reqs, ONE_SECOND_A_STEP, num_blocks=8)  # 8 blocks of 16: two at a time
    assert all(len(t) == 20 for t in line.tokens)
    assert line.preemptions > 0
