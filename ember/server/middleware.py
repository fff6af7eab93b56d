"""ASGI middlewares around the API (pure ASGI, so streams and disconnects pass through untouched):

- `BodyLimit`: a request body is read whole, within a size and a time limit, before any route parses it:
  413 as soon as it is known to be too large (from Content-Length before reading a byte, else while the
  chunks arrive), 408 when it is not all there in time. A refused body is never held in memory whole.
  Uploads (`streamed` paths, /v1/files) are not read whole: they pass through to the route as they
  arrive, under their own size limit (BodyTooLarge past it, a 413) and a limit on the wait per chunk.
- `RequestId`: every response carries `x-request-id`: the client's own when it sent a sane one, else a
  fresh one, so a client's report and the server's log can be matched.
- CORS (Starlette's), only where the operator lists allowed origins.
- `AnswerErrors`: an unexpected exception is answered (a 500) on a connection that stays open.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
_SANE_ID = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,128}$")


def _refusal(status: int, message: str, code: str) -> JSONResponse:
    # OpenAI's error shape, as every other refusal of the API (ember.server.app.error_body).
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers={"connection": "close"})


class BodyTooLarge(Exception):
    """A streamed upload went past its limit (the app answers 413)."""

    def __init__(self, limit: int):
        super().__init__(
            f"the upload is more than {limit} bytes, the most this server accepts (the operator sets "
            "--max-upload-bytes)"
        )


class BodyTimeout(Exception):
    """A streamed upload sent nothing for too long (the app answers 408)."""

    def __init__(self, timeout: float):
        super().__init__(f"the upload sent nothing for {timeout:g} s")


class BodyLimit:
    def __init__(self, app, max_bytes: int, timeout: float, streamed: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.streamed = streamed or {}  # POST path -> its own size limit; the body passes through

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if length is None and not chunked:
            return await self.app(scope, receive, send)  # no body (a GET, say)
        if scope["method"] == "POST" and scope["path"] in self.streamed:
            return await self._stream(scope, receive, send, length, self.streamed[scope["path"]])
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send, f"{int(length)} bytes")
        body = bytearray()
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                log.warning(
                    "%s: request body not complete within %g s (%d bytes so far): 408",
                    _client(scope),
                    self.timeout,
                    len(body),
                )
                response = _refusal(
                    408, f"the request body did not arrive within {self.timeout:g} s", "request_timeout"
                )
                return await response(scope, receive, send)
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send, f"more than {self.max_bytes} bytes")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # what follows the body: a disconnect, in time

        await self.app(scope, replay, send)

    async def _stream(self, scope, receive, send, length: bytes | None, limit: int) -> None:
        if length is not None and length.isdigit() and int(length) > limit:
            response = _refusal(413, str(BodyTooLarge(limit)), "request_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                raise BodyTimeout(self.timeout) from None
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)

    async def _too_large(self, scope, receive, send, size: str) -> None:
        log.warning(
            "%s: request body of %s refused (limit %d bytes): 413", _client(scope), size, self.max_bytes
        )
        response = _refusal(
            413,
            f"the request body is {size}; this server accepts at most {self.max_bytes} bytes "
            "(the operator sets --max-request-bytes)",
            "request_too_large",
        )
        await response(scope, receive, send)


class RequestId:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = [v for k, v in scope["headers"] if k == REQUEST_ID_HEADER]
        rid = given[0] if len(given) == 1 and _SANE_ID.match(given[0]) else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def install(
    app,
    max_request_bytes: int,
    body_timeout: float,
    allowed_origins: list[str],
    streamed: dict[str, int] | None = None,
) -> None:
    """Add the middlewares, outermost last: request ids on everything (refusals and CORS preflights
    included), CORS answered before the key check, bodies bounded before any route reads them
    (`streamed`: upload paths and their limits)."""
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes, timeout=body_timeout, streamed=streamed)
    if allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=allowed_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id", "retry-after"],
        )
    app.add_middleware(RequestId)


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "a client"


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
