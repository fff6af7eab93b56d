"""ASGI middleware of ember's own that the app stacks under starlette's."""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.responses import Response

log = logging.getLogger(__name__)


class AnswerErrors:
    """Answers an unexpected exception with `respond(exc)` (a 500) and keeps the connection open.

    Starlette's ServerErrorMiddleware answers such errors too, but then re-raises them to the server, and
    uvicorn closes a connection whose application raised: the client's next request on that keep-alive
    connection fails with "connection reset". An error after the response began is left to them (the
    connection cannot be saved then)."""

    def __init__(self, app, respond: Callable[[Exception], Response]):
        self.app = app
        self.respond = respond

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            if started:
                raise
            log.exception("unexpected error")
            await self.respond(exc)(scope, receive, send)
