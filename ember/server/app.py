"""The OpenAI-compatible HTTP API: a thin adapter over AsyncEngine (and the embedding model).

Every error leaves in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
field (never FastAPI's 422), 401 for a missing or wrong key, 404 for an unknown model or route, 429 when
the queue is full and 503 while loading, draining or after the engine died (both with Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
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
from ember.errors import InvalidRequest
from ember.outputs import RequestOutput
from ember.protocol import format as fmt
from ember.protocol import tools
from ember.protocol.requests import AdapterRequest, ChatCompletionRequest, CompletionRequest, EmbeddingRequest

log = logging.getLogger(__name__)

PUBLIC_PATHS = ("/health", "/ready")  # reachable without an API key
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
    state = state or ServerState()
    app = FastAPI(title="ember", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.ember = state
    created = int(time.time())
    app.add_middleware(_Gate, state=state, counter=engine.metrics.http_requests)
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.is_running:
            return JSONResponse({"status": "ok"})
        return _error(503, f"the engine has stopped: {engine.error or 'shut down'}", kind="server_error")

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.draining:
            return _error(503, "the server is draining", kind="server_error", code="draining")
        if not engine.is_ready or state.loading_adapters:
            why = "the model is loading" if engine.is_running else f"the engine has stopped: {engine.error}"
            return _error(503, why, kind="server_error", code="not_ready")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        names = [model_name] + ([state.embedder.name] if state.embedder is not None else [])
        cards = [{"id": n, "object": "model", "created": created, "owned_by": "ember"} for n in names]
        cards += [_adapter_card(name) for name in sorted(engine.adapters)]
        return {"object": "list", "data": cards}

    def _adapter_card(name: str, path: str | None = None) -> dict:
        # As vLLM lists LoRA modules: the adapter is a model whose parent is the base. Where it lives on
        # the server is for the admin's listing only.
        card = {"id": name, "object": "model", "created": created, "owned_by": "ember", "parent": model_name}
        return card if path is None else {**card, "path": path}

    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        return {"object": "list", "data": [_adapter_card(n, p) for n, p in sorted(engine.adapters.items())]}

    @app.post("/v1/adapters")
    async def add_adapter(body: AdapterRequest) -> dict:
        if body.name == model_name or body.name in engine.adapters:
            raise _Refuse(409, f"a model or adapter named '{body.name}' already exists", "adapter_exists")
        await engine.add_lora(body.name, body.path)
        return _adapter_card(body.name, body.path)

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str) -> dict:
        if name not in engine.adapters:
            raise _Refuse(404, f"no LoRA adapter named '{name}' is loaded", "model_not_found")
        await engine.remove_lora(name)
        return {"id": name, "object": "model", "deleted": True}

    def _admit(name: str) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 for anything else.
        Adapters answer to their own name or to BASE:NAME."""
        if state.draining:
            raise _Refuse(503, "the server is draining and takes no new requests", "draining", "server_error")
        if name == model_name:
            return None
        base, sep, rest = name.rpartition(":")  # adapter names have no ':'; a base's name may
        if name in engine.adapters:
            return name
        if sep and base == model_name and rest in engine.adapters:
            return rest
        if state.embedder is not None and name == state.embedder.name:
            raise InvalidRequest(f"'{name}' is an embedding model; use /v1/embeddings", param="model")
        known = ", ".join([model_name, *sorted(engine.adapters)])
        raise _Refuse(404, f"model '{name}' does not exist; available: {known}", "model_not_found")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        lora = _admit(body.model)
        body.check_supported()
        messages, tool_defs = tools.render(body, engine.tokenizer.hf.chat_template)
        # Templates render off the event loop: a long history takes a while.
        prompt_ids = await asyncio.to_thread(engine.tokenizer.apply_chat_template, messages, True, tool_defs)
        top = body.requested_logprobs()
        params = body.sampling_params(None, top)
        params.structured = tools.constraint(body)
        return await _respond(
            engine, request, body, [prompt_ids], params, True, top, state, lora, body.tool_mode()
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        lora = _admit(body.model)
        body.check_supported()
        params = body.sampling_params(16, body.logprobs)
        return await _respond(
            engine, request, body, body.prompts(), params, False, body.logprobs, state, lora
        )

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        embedder = state.embedder
        if state.draining:
            raise _Refuse(503, "the server is draining and takes no new requests", "draining", "server_error")
        if embedder is None or body.model != embedder.name:
            known = embedder.name if embedder is not None else "none (start with --embedding-model)"
            raise _Refuse(
                404, f"embedding model '{body.model}' does not exist; available: {known}", "model_not_found"
            )
        if body.dimensions is not None and body.dimensions != embedder.dim:
            raise InvalidRequest(
                f"dimensions must be {embedder.dim} for {embedder.name} (got {body.dimensions})",
                param="dimensions",
            )
        items = body.inputs()
        vectors, n_tokens = await asyncio.to_thread(_embed, embedder, items)
        data = []
        for i, v in enumerate(vectors):
            if body.encoding_format == "base64":
                value: object = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
            else:
                value = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        usage = {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
        return {"object": "list", "data": data, "model": embedder.name, "usage": usage}

    return app


def _embed(embedder, items: list[str | list[int]]):
    texts = [i for i, x in enumerate(items) if isinstance(x, str)]
    ids: list[list[int]] = list(items)  # type: ignore[arg-type]
    for i, tokens in zip(texts, embedder.tokenize([items[i] for i in texts]), strict=True):
        ids[i] = tokens
    for i, tokens in enumerate(ids):
        if len(tokens) > embedder.max_input_tokens:
            raise InvalidRequest(
                f"input[{i}] has {len(tokens)} tokens; {embedder.name} reads at most {embedder.max_input_tokens}",
                param="input",
                code="context_length_exceeded",
            )
    return embedder.embed(ids), sum(map(len, ids))


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
        codes = {400: "invalid_adapter", 404: "model_not_found", 409: "adapter_in_use"}
        return _error(
            exc.status, str(exc), param="path" if exc.status == 400 else "name", code=codes.get(exc.status)
        )

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

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
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


# -- generation ------------------------------------------------------------------------------------------


async def _respond(
    engine: AsyncEngine,
    http: Request,
    body,
    prompts: list,
    params,
    chat: bool,
    top: int | None,
    state: ServerState,
    lora: str | None = None,
    tool_mode: str | None = None,
):
    total = len(prompts) * params.n
    if engine.max_pending is not None and total > engine.max_pending:
        what = f"{len(prompts)} prompts x n={params.n}" if len(prompts) > 1 else f"n={params.n}"
        raise InvalidRequest(
            f"{what} is {total} sequences, more than this server admits at once ({engine.max_pending})",
            param="n" if len(prompts) == 1 else "prompt",
        )
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    ids = [rid if len(prompts) == 1 else f"{rid}-{i}" for i in range(len(prompts))]
    salt = state.cache_salt(getattr(http.state, "api_key", None))
    cache_cap = body.prompt_cache_max_len
    streams = [
        engine.generate(p, params, request_id=i, cache_salt=salt, max_cached_tokens=cache_cap, lora=lora)
        for p, i in zip(prompts, ids, strict=True)
    ]
    try:
        # The first output of each prompt before answering: a refused request gets a plain 4xx, not a broken stream.
        firsts = await _unless_disconnected(http, _firsts(streams))
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    if firsts is _GONE:
        for s in streams:
            await s.aclose()
        return JSONResponse({}, status_code=499)
    logprobs = fmt.LogprobFormatter(engine.tokenizer, top) if top is not None else None
    obj = "chat.completion" if chat else "text_completion"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        base = fmt.envelope(rid, created, body.model, obj + ".chunk" if chat else obj)
        maker = fmt.ChunkMaker(base, chat, params.n, logprobs, include_usage, tool_mode)
        return StreamingResponse(
            _sse(firsts, streams, maker),
            media_type="text/event-stream",
            # Runs once the response is over, however it ended: a client that left aborts its requests.
            background=BackgroundTask(_abort_all, engine, ids),
        )
    outs = await _unless_disconnected(
        http, asyncio.gather(*(_last(f, s) for f, s in zip(firsts, streams, strict=True)))
    )
    if outs is _GONE:
        _abort_all(engine, ids)
        return JSONResponse({}, status_code=499)
    if chat:
        choices = [fmt.chat_choice(c, c.index, logprobs, tool_mode) for c in outs[0].outputs]
    else:
        choices = [
            fmt.completion_choice(c, i * params.n + c.index, logprobs)
            for i, o in enumerate(outs)
            for c in o.outputs
        ]
    return {**fmt.envelope(rid, created, body.model, obj), "choices": choices, "usage": fmt.usage(outs)}


_GONE = object()


async def _unless_disconnected(http: Request, awaitable):
    """The awaitable's result, or _GONE once the client hung up (the awaitable is then cancelled).

    The server does not cancel a handler whose client left, so it is watched for here.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await http.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return _GONE
        return task.result()
    finally:
        if not task.done():  # this handler itself was cancelled
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _firsts(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    return [await anext(s) for s in streams]


def _abort_all(engine: AsyncEngine, ids: list[str]) -> None:
    for i in ids:
        engine.abort(i)


async def _last(first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = first
    try:
        async for out in stream:
            last = out
    finally:
        await stream.aclose()
    return last


async def _merge(firsts: list[RequestOutput], streams: list[AsyncIterator[RequestOutput]]):
    """(prompt index, output) from several streams as they come."""
    for i, f in enumerate(firsts):
        yield i, f
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams) if not firsts[i].finished}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                yield i, out
                if not out.finished:
                    pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)  # settled before their streams close
        for s in streams:
            await s.aclose()


async def _sse(firsts: list[RequestOutput], streams: list, maker: fmt.ChunkMaker) -> AsyncIterator[str]:
    last = list(firsts)
    try:
        async for i, out in _merge(firsts, streams):
            last[i] = out
            for chunk in maker.chunks(i, out):
                yield "data: " + json.dumps(chunk) + "\n\n"
        if maker.include_usage:
            yield "data: " + json.dumps(maker.usage_chunk(last)) + "\n\n"
    except Exception as exc:  # the stream has begun: report in-band, then close
        log.warning("stream failed after it began: %s", exc)
        yield "data: " + json.dumps(error_body(str(exc), "server_error")) + "\n\n"
        return
    yield "data: [DONE]\n\n"
