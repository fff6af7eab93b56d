"""The arrival schedule (vLLM's gamma process) and chat sessions' ordering, without a server."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ember.bench.serving.runner import _previous_turns, arrival_offsets
from ember.bench.serving.workloads import Request


def test_infinite_rate_sends_everything_at_once():
    assert list(arrival_offsets(5, math.inf, 1.0, np.random.default_rng(0))) == [0.0] * 5


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_schedule_is_seeded_increasing_and_ends_at_n_over_rate(burstiness):
    a = arrival_offsets(200, 10.0, burstiness, np.random.default_rng(1))
    b = arrival_offsets(200, 10.0, burstiness, np.random.default_rng(1))
    assert np.array_equal(a, b)
    assert np.all(np.diff(a) > 0)
    assert a[-1] == pytest.approx(200 / 10.0)


def test_burstiness_sets_the_spread_of_gaps():
    # gamma(shape k): coefficient of variation 1/sqrt(k); 1 is Poisson (exponential gaps)
    for k in (0.25, 1.0, 4.0):
        gaps = np.diff(arrival_offsets(20000, 5.0, k, np.random.default_rng(2)))
        assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(k), rel=0.05)
    even = np.diff(arrival_offsets(10, 5.0, math.inf, np.random.default_rng(0)))
    assert even == pytest.approx([0.2] * 9)


def test_each_chat_turn_waits_for_the_previous_turn_of_its_session():
    reqs = [
        Request("s0-t0", 4, "m", prompt="a", session_id="s0", turn=0),
        Request("s1-t0", 4, "m", prompt="a", session_id="s1", turn=0),
        Request("x", 4, "m", prompt="a"),
        Request("s0-t1", 4, "m", prompt="a", session_id="s0", turn=1),
        Request("s1-t1", 4, "m", prompt="a", session_id="s1", turn=1),
        Request("s0-t2", 4, "m", prompt="a", session_id="s0", turn=2),
    ]
    assert _previous_turns(reqs) == [None, None, None, 0, 1, 3]
