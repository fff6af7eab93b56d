from ember.gateway.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_only():
    breaker = Breaker(failures=3, cooldown=10, clock=Clock())
    breaker.failure()
    breaker.failure()
    breaker.success()  # not consecutive
    breaker.failure()
    breaker.failure()
    assert breaker.state == CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state == OPEN and not breaker.allow()


def test_half_open_lets_one_probe_through():
    clock = Clock()
    breaker = Breaker(failures=1, cooldown=10, clock=clock)
    breaker.failure()
    clock.now = 9.9
    assert not breaker.allow() and breaker.retry_in() > 0
    clock.now = 10.0
    assert breaker.allow()  # the probe
    assert breaker.state == HALF_OPEN and not breaker.allow()  # the others still skip it
    breaker.failure()  # the probe failed: a new cool-down
    assert breaker.state == OPEN and not breaker.allow()
    clock.now = 20.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow() and breaker.allow()


def test_an_abandoned_probe_frees_the_slot():
    clock = Clock()
    breaker = Breaker(failures=1, cooldown=1, clock=clock)
    breaker.failure()
    clock.now = 1.0
    assert breaker.allow()
    breaker.abandon()  # the probe was cancelled: no verdict
    assert breaker.allow()
