"""Requests and tokens per minute, per key, over a sliding window of the last 60 s: a request is admitted
while the requests (tokens) admitted in the window are under the key's limit, so no 60 s span ever holds
more than `rpm` requests. Counted in this process: N replicas on one database admit up to N times a
key's rate (budgets, in the database, are shared; see ember.gateway.budgets).

`Limited` carries the headers OpenAI sends with a 429: Retry-After and x-ratelimit-{limit,remaining,
reset}-{requests,tokens}; `Window.headers` gives the same on every admitted response.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 60.0


class Limited(Exception):
    """A request refused before admission: a 429 (rate limit or budget) or a 403 (a model the key may
    not call), with the headers to send."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: 1s, 6m0s, 250ms."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    s = math.ceil(seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


class Window:
    """One key's admissions in the last WINDOW_S: (time, tokens) each."""

    def __init__(self):
        self.events: deque[list] = deque()  # [admitted at, tokens]
        self.tokens = 0

    def expire(self, at: float) -> None:
        while self.events and self.events[0][0] <= at - WINDOW_S:
            self.tokens -= self.events.popleft()[1]

    def reset_in(self, at: float, tokens: bool) -> float:
        """Seconds until the oldest admission (with tokens, for the token limit) leaves the window."""
        for t, n in self.events:
            if not tokens or n:
                return max(0.0, t + WINDOW_S - at)
        return 0.0

    def headers(self, at: float, rpm: int | None, tpm: int | None) -> dict[str, str]:
        out = {}
        if rpm is not None:
            out["x-ratelimit-limit-requests"] = str(rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, rpm - len(self.events)))
            out["x-ratelimit-reset-requests"] = duration(self.reset_in(at, False))
        if tpm is not None:
            out["x-ratelimit-limit-tokens"] = str(tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, tpm - self.tokens))
            out["x-ratelimit-reset-tokens"] = duration(self.reset_in(at, True))
        return out


class RateLimiter:
    """Windows by key id; `clock` is injectable so tests can drive a minute in a moment."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._windows: dict[str, Window] = {}
        self._lock = threading.Lock()

    def admit(self, key_id: str, rpm: int | None, tpm: int | None, tokens: int) -> tuple[list, dict]:
        """Count one request of an estimated `tokens` against the key's limits: (the admission, to
        `correct` later, and the headers to send), or Limited (429) when over either limit."""
        with self._lock:
            at = self.clock()
            window = self._windows.setdefault(key_id, Window())
            window.expire(at)
            over = None
            if rpm is not None and len(window.events) >= rpm:
                over = ("requests", rpm, window.reset_in(at, False))
            elif tpm is not None and window.tokens >= tpm:
                over = ("tokens", tpm, window.reset_in(at, True))
            if over is not None:
                what, limit, wait = over
                headers = window.headers(at, rpm, tpm)
                headers["Retry-After"] = str(max(1, math.ceil(wait)))
                raise Limited(
                    429,
                    f"rate limit reached for this key: {limit} {what} per minute; retry in {duration(wait)}",
                    "rate_limit_exceeded",
                    headers,
                )
            event = [at, tokens if tpm is not None else 0]
            window.events.append(event)
            window.tokens += event[1]
            return event, window.headers(at, rpm, tpm)

    def correct(self, key_id: str, event: list, tokens: int) -> None:
        """Replace an admission's estimate with the tokens it really used (if still in the window)."""
        with self._lock:
            window = self._windows.get(key_id)
            if window is not None and event[1] and any(e is event for e in window.events):
                window.tokens += tokens - event[1]
                event[1] = tokens
