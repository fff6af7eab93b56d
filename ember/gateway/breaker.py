"""A circuit breaker per upstream: stop sending to one that keeps failing, and find out when it is back.

closed (requests go) -> `failures` consecutive failures -> open (requests skip it) for `cooldown` seconds
-> half-open: one request, the probe, goes; the others still skip it -> the probe succeeds: closed; it
fails: open again for another cool-down. A real request is the probe, so no synthetic traffic is needed
and an upstream is trusted again only once it has answered one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Breaker:
    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic):
        self.threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self.state = CLOSED
        self.failed = 0  # consecutive failures
        self.opened_at = 0.0
        self.probing = False  # the half-open probe is in flight

    def allow(self) -> bool:
        """Whether a call may go now; in half-open, True once (the caller is the probe and must report)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self.clock() - self.opened_at >= self.cooldown:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.state, self.failed, self.probing = CLOSED, 0, False

    def failure(self) -> None:
        self.failed += 1
        if self.state == HALF_OPEN or self.failed >= self.threshold:
            self.state, self.opened_at, self.probing = OPEN, self.clock(), False

    def abandon(self) -> None:
        """A call allowed by `allow` ended with no verdict on the upstream (cancelled, or not sent)."""
        if self.state == HALF_OPEN:
            self.probing = False

    def retry_in(self) -> float:
        """Seconds until the next probe may go (0 when it may go now)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.cooldown - (self.clock() - self.opened_at))
