"""The rate limiter on an injected clock: a minute of traffic in a moment."""

from __future__ import annotations

import pytest

from ember.gateway.limits import Limited, RateLimiter, duration


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_60_rpm_driven_at_120_rpm_for_a_minute():
    clock = Clock()
    limiter = RateLimiter(clock)
    answered, refused = 0, []
    for i in range(120):  # one request every 0.5 s
        clock.t = 1000.0 + i * 0.5
        try:
            _, headers = limiter.admit("vk-a", 60, None, 10)
            answered += 1
            assert headers["x-ratelimit-remaining-requests"] == str(60 - answered)
        except Limited as exc:
            refused.append((clock.t, exc))
    assert answered == 60
    assert len(refused) == 60
    for at, exc in refused:
        h = exc.headers
        assert exc.status == 429 and exc.code == "rate_limit_exceeded"
        assert h["x-ratelimit-limit-requests"] == "60"
        assert h["x-ratelimit-remaining-requests"] == "0"
        # The first admission (t=1000) leaves the window at t=1060: that is when to retry.
        assert int(h["Retry-After"]) == pytest.approx(1060 - at, abs=1)
        assert h["x-ratelimit-reset-requests"] == duration(1060 - at)
    clock.t = 1060.0  # the first minute's first request has left the window
    limiter.admit("vk-a", 60, None, 10)


def test_no_60_s_window_holds_more_than_the_limit():
    clock = Clock()
    limiter = RateLimiter(clock)
    times = []
    for i in range(600):  # ten minutes at 120 RPM
        clock.t = 1000.0 + i * 0.5
        try:
            limiter.admit("vk-a", 60, None, 1)
            times.append(clock.t)
        except Limited:
            pass
    assert len(times) == 600 // 2
    assert all(b - a >= 60 for a, b in zip(times, times[60:], strict=False))


def test_tokens_per_minute_with_the_real_usage():
    clock = Clock()
    limiter = RateLimiter(clock)
    event, headers = limiter.admit("vk-a", None, 100, 80)  # estimated 80 tokens
    assert headers["x-ratelimit-remaining-tokens"] == "20"
    limiter.correct("vk-a", event, 30)  # it used 30
    _, headers = limiter.admit("vk-a", None, 100, 60)
    assert headers["x-ratelimit-remaining-tokens"] == "10"
    limiter.admit("vk-a", None, 100, 20)  # admitted while the window holds less than the limit (90)
    with pytest.raises(Limited) as refused:  # 110: the limit is reached
        limiter.admit("vk-a", None, 100, 1)
    assert refused.value.headers["x-ratelimit-limit-tokens"] == "100"
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "0"


def test_keys_are_limited_apart():
    clock = Clock()
    limiter = RateLimiter(clock)
    limiter.admit("vk-a", 1, None, 1)
    with pytest.raises(Limited):
        limiter.admit("vk-a", 1, None, 1)
    limiter.admit("vk-b", 1, None, 1)


def test_duration_reads_like_openai():
    assert duration(0.25) == "250ms"
    assert duration(1.2) == "2s"
    assert duration(360) == "6m0s"
