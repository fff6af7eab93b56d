"""Connection limits uvicorn lacks: a deadline for a request's headers, and a cap on open connections.

uvicorn closes idle keep-alive connections, but a client that sends a header byte every few seconds is
never idle and never done, so a few hundred such clients hold as many file descriptors for as long as
they like (slowloris). Here each request's headers must be complete within `header_timeout` seconds of
its first byte (of the connection, for the first request), and a connection past `max_connections` is
closed as soon as it is accepted. The body's own deadline is ember.server.middleware.BodyLimit's.
"""

from __future__ import annotations

import asyncio
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

# One warning per kind of refusal per this many seconds: a flood must not flood the log too.
_LOG_EVERY_S = 10.0


class LimitedH11Protocol(H11Protocol):
    header_timeout: float = 10.0
    max_connections: int | None = None
    _last_log: dict[str, float] = {}  # shared by every connection of the class: kind -> time
    _refused: dict[str, int] = {}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self._limit_bites(
                "connections",
                f"{self.max_connections} connections open (--max-connections): closing new ones",
            )
            transport.close()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request on a kept-alive connection begins
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its headers are in
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._disarm_header_timer()
        super().on_response_complete()  # arms the keep-alive timeout, which bounds the idle wait

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        who = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        self._limit_bites(
            "headers",
            f"closing connections whose headers are not complete within {self.header_timeout:g} s "
            f"(--header-timeout), e.g. {who}",
        )
        self.transport.close()

    def _limit_bites(self, kind: str, message: str) -> None:
        cls = type(self)
        cls._refused[kind] = cls._refused.get(kind, 0) + 1
        now = time.monotonic()
        if now - cls._last_log.get(kind, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            cls._last_log[kind] = now
            log.warning("%s (%d so far)", message, cls._refused[kind])


def limited_protocol(header_timeout: float, max_connections: int | None) -> type[LimitedH11Protocol]:
    """A protocol class for `uvicorn.Config(http=...)` with these limits (uvicorn builds one instance per
    connection from the class, so the limits travel as class attributes)."""
    return type(
        "LimitedH11Protocol",
        (LimitedH11Protocol,),
        {
            "header_timeout": header_timeout,
            "max_connections": max_connections,
            "_last_log": {},
            "_refused": {},
        },
    )
