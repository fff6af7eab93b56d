"""The OpenAI-compatible HTTP API: routes, auth and errors over the backends of ember.server.backend
(ember's engine, the embedding model).

Every error leaves in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
field (never FastAPI's 422), 401 for a missing or wrong key, 404 for an unknown model or route, 429 when
the queue is full and 503 while loading, draining or after the engine died (both with Retry-After).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineNotReadyError,
    EngineOverloadedError,
    LoRAOpError,
)
from ember.engine.client import EngineState
from ember.engine.messages import ErrorKind
from ember.errors import InvalidRequest
from ember.protocol.requests import AdapterRequest, ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from ember.server.backend import ClientGone, EmbeddingBackend, EngineBackend, RequestContext, Stream
from ember.server.middleware import AnswerErrors

log = logging.getLogger(__name__)

PUBLIC_PATHS = ("/health", "/ready")  # reachable without an API key
# What a refused adapter operation answers: status, code, the field at fault.
_LORA_ERRORS = {
    ErrorKind.INVALID: (400, "invalid_adapter", "path"),
    ErrorKind.NOT_FOUND: (404, "model_not_found", "name"),
    ErrorKind.CONFLICT: (409, "adapter_in_use", "name"),
}
RETRY_AFTER_S = {429: "1", 503: "5"}


@dataclass
class ServerState:
    """What the HTTP layer knows beyond the engine: keys, drain state, the embedding model."""

    api_keys: list[str] = field(default_factory=list)
    draining: bool = False
    in_flight: int = 0  # HTTP requests being answered, public routes aside: a drain waits for them
    embedder: object | None = None  # ember.embeddings.EmbeddingModel
    # Prefix-cache namespaces: each API key is its own, unless listed here (key -> shared namespace name).
    cache_namespaces: dict[str, str] = field(default_factory=dict)
    # Never leaves the server: salts are derived from it, so no client can name another's namespace.
    cache_secret: bytes = field(default_factory=lambda: os.urandom(32))
    admin_key: str | None = None  # guards /v1/adapters; None: adapters cannot be changed at runtime
    loading_adapters: bool = False  # the --lora adapters are still being loaded: not ready yet

    def cache_salt(self, key: str | None) -> bytes | None:
        """The prefix-cache namespace of a request made with `key` (as the gate accepted it); None (one
        shared namespace) when the server has no API keys."""
        if not self.api_keys:
            return None
        if key not in self.api_keys:  # cannot happen past the gate; if it ever did, share nothing
            return os.urandom(32)
        shared = self.cache_namespaces.get(key)
        ident = f"namespace:{shared}" if shared is not None else f"key:{key}"
        return hmac.new(self.cache_secret, ident.encode(), hashlib.sha256).digest()


def bearer_key(header: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` header value, or None."""
    scheme, _, key = header.partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
) -> JSONResponse:
    response = JSONResponse(error_body(message, kind, param, code), status_code=status)
    if status in RETRY_AFTER_S:
        response.headers["Retry-After"] = RETRY_AFTER_S[status]
    return response


def create_app(engine: AsyncEngine, model_name: str, state: ServerState | None = None) -> FastAPI:
    """The routes over ember's engine (`engine`, served as `model_name`) and the server's embedding model."""
    state = state or ServerState()
    app = FastAPI(title="ember", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.ember = state
    backend = EngineBackend(engine, model_name)
    embeddings = EmbeddingBackend(state.embedder) if state.embedder is not None else None
    app.add_middleware(_Gate, state=state, counter=engine.metrics.http_requests)
    app.add_middleware(AnswerErrors, respond=_unexpected)
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        if backend.state in (EngineState.LOADING, EngineState.READY):
            return JSONResponse({"status": "ok"})
        return _error(503, f"the engine has stopped: {engine.error or 'shut down'}", kind="server_error")

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.draining:
            return _error(503, "the server is draining", kind="server_error", code="draining")
        now = backend.state
        if now is not EngineState.READY or state.loading_adapters:
            why = (
                "the model is loading"
                if now is EngineState.LOADING
                else f"the engine has stopped: {engine.error}"
            )
            if now is EngineState.READY:
                why = "the LoRA adapters are loading"
            return _error(503, why, kind="server_error", code="not_ready")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        cards = backend.model_cards()
        if embeddings is not None:
            cards[1:1] = embeddings.model_cards(backend.created)
        return {"object": "list", "data": cards}

    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        return {"object": "list", "data": [backend.card(n, p) for n, p in sorted(engine.adapters.items())]}

    @app.post("/v1/adapters")
    async def add_adapter(body: AdapterRequest) -> dict:
        if body.name == model_name or body.name in engine.adapters:
            raise _Refuse(409, f"a model or adapter named '{body.name}' already exists", "adapter_exists")
        await engine.add_lora(body.name, body.path)
        return backend.card(body.name, body.path)

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str) -> dict:
        if name not in engine.adapters:
            raise _Refuse(404, f"no LoRA adapter named '{name}' is loaded", "model_not_found")
        await engine.remove_lora(name)
        return {"id": name, "object": "model", "deleted": True}

    def _admit(name: str) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 for anything else."""
        if state.draining:
            raise _Refuse(503, "the server is draining and takes no new requests", "draining", "server_error")
        target = backend.resolve(name)
        if target is not False:
            return target
        if embeddings is not None and name == embeddings.name:
            raise InvalidRequest(f"'{name}' is an embedding model; use /v1/embeddings", param="model")
        known = ", ".join(backend.known())
        raise _Refuse(404, f"model '{name}' does not exist; available: {known}", "model_not_found")

    def _context(request: Request) -> RequestContext:
        return RequestContext(
            state.cache_salt(getattr(request.state, "api_key", None)), request.is_disconnected
        )

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        target = _admit(body.model)
        return _reply(await backend.chat(body, target, _context(request)))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        target = _admit(body.model)
        return _reply(await backend.complete(body, target, _context(request)))

    @app.post("/v1/embeddings")
    async def embed(body: EmbeddingRequest):
        if state.draining:
            raise _Refuse(503, "the server is draining and takes no new requests", "draining", "server_error")
        if embeddings is None or body.model != embeddings.name:
            known = embeddings.name if embeddings is not None else "none (start with --embedding-model)"
            raise _Refuse(
                404, f"embedding model '{body.model}' does not exist; available: {known}", "model_not_found"
            )
        return await embeddings.embed(body)

    return app


class _Refuse(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.code, self.kind = status, code, kind


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        msg = first.get("msg", "invalid value")
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", param=None, code="invalid_json")
        if first.get("type") == "missing":
            return _error(400, f"'{where}' is required", param=where or None)
        return _error(400, f"'{where or 'body'}': {msg}", param=where or None)

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, exc: ClientGone) -> JSONResponse:
        return JSONResponse({}, status_code=499)

    @app.exception_handler(InvalidRequest)
    async def _invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
        return _error(400, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(_Refuse)
    async def _refuse(_: Request, exc: _Refuse) -> JSONResponse:
        return _error(
            exc.status, str(exc), param="model" if exc.status == 404 else None, code=exc.code, kind=exc.kind
        )

    @app.exception_handler(jinja2.TemplateError)
    async def _template(_: Request, exc: jinja2.TemplateError) -> JSONResponse:
        return _error(400, f"the model's chat template refused these messages: {exc}", param="messages")

    @app.exception_handler(LoRAOpError)
    async def _lora(_: Request, exc: LoRAOpError) -> JSONResponse:
        status, code, param = _LORA_ERRORS[exc.kind]
        return _error(status, str(exc), param=param, code=code)

    @app.exception_handler(EngineOverloadedError)
    async def _overloaded(_: Request, exc: EngineOverloadedError) -> JSONResponse:
        return _error(429, str(exc), code="rate_limit_exceeded", kind="rate_limit_error")

    @app.exception_handler(EngineNotReadyError)
    async def _loading(_: Request, exc: EngineNotReadyError) -> JSONResponse:
        return _error(503, str(exc), code="not_ready", kind="server_error")

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return _error(503, str(exc), code="engine_dead", kind="server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))


def _unexpected(exc: Exception) -> JSONResponse:
    return _error(500, f"internal error: {type(exc).__name__}", kind="server_error")


class _Gate:
    """ASGI middleware (pure, so streaming and disconnects pass through untouched): API-key check on
    every route but the public ones, and a count of responses by route and status."""

    def __init__(self, app, state: ServerState, counter: Counter):
        self.app = app
        self.state = state
        self.counter = counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        public = scope["path"] in PUBLIC_PATHS
        if not public:
            self.state.in_flight += 1
        try:
            if scope["path"] == "/v1/adapters" or scope["path"].startswith("/v1/adapters/"):
                refusal = self._admin_refusal(scope)
                if refusal is not None:
                    await refusal(scope, receive, send_counted)
                    return
                await self.app(scope, receive, send_counted)
                return
            key = self._key(scope)
            scope.setdefault("state", {})["api_key"] = key  # the handlers read it as request.state.api_key
            if self.state.api_keys and not public and key is None:
                response = _error(
                    401,
                    "missing or wrong API key; send it as 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                await response(scope, receive, send_counted)
                return
            await self.app(scope, receive, send_counted)
        finally:
            if not public:
                self.state.in_flight -= 1
            route = scope.get("route")
            self.counter.labels(getattr(route, "path", "unmatched"), str(status["code"])).inc()

    def _admin_refusal(self, scope) -> JSONResponse | None:
        """None if the request carries the admin key; otherwise the 401 or 403 to answer."""
        admin = self.state.admin_key
        if admin is None:
            return _error(
                403,
                "adapters cannot be changed at runtime: start the server with --admin-key",
                code="admin_disabled",
                kind="permission_error",
            )
        key = _presented_key(scope)
        if key is not None and hmac.compare_digest(key.encode(), admin.encode()):
            return None
        if key is not None and any(
            hmac.compare_digest(key.encode(), k.encode()) for k in self.state.api_keys
        ):
            return _error(
                403,
                "this API key may not manage adapters; use the admin key",
                code="forbidden",
                kind="permission_error",
            )
        return _error(
            401,
            "adapter management needs the admin key as 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )

    def _key(self, scope) -> str | None:
        """The configured API key this request presents, or None."""
        key = _presented_key(scope)
        if key is None:
            return None
        match = [k for k in self.state.api_keys if hmac.compare_digest(key.encode(), k.encode())]
        return match[0] if match else None


def _presented_key(scope) -> str | None:
    """The bearer key of the request's Authorization header, or None. One header only: a request with
    several is refused, so no two readers can see different keys."""
    headers = [v for k, v in scope["headers"] if k == b"authorization"]
    return bearer_key(headers[0].decode("latin-1")) if len(headers) == 1 else None


# -- streams -------------------------------------------------------------------------------------------


async def _sse(stream: Stream) -> AsyncIterator[str]:
    """A backend's chunks as server-sent events; an error after the stream began is reported in-band."""
    try:
        async for chunk in stream.chunks:
            yield "data: " + json.dumps(chunk) + "\n\n"
    except Exception as exc:  # the stream has begun: report in-band, then close
        log.warning("stream failed after it began: %s", exc)
        yield "data: " + json.dumps(error_body(str(exc), "server_error")) + "\n\n"
        return
    yield "data: [DONE]\n\n"


def _reply(answer: dict | Stream):
    if isinstance(answer, Stream):
        # close() runs once the response is over, however it ended: a client that left aborts its requests.
        return StreamingResponse(
            _sse(answer), media_type="text/event-stream", background=BackgroundTask(answer.close)
        )
    return answer
