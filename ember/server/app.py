"""The OpenAI-compatible HTTP API: routes, auth and errors over the backends of ember.server.backend
(ember's engine, the embedding model).

Every error leaves in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
field (never FastAPI's 422), 401 for a missing or wrong key, 404 for an unknown model or route, 429 when
the queue is full and 503 while loading, draining, stalled or after the engine died (both with
Retry-After); 413 and 408 for a body too large or too slow (ember.server.middleware, before any route).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Router

from ember.config import ServerConfig
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
from ember.gateway.guard import RESPONSE_HEADERS, Gateway
from ember.gateway.limits import Limited
from ember.gateway.providers import RawStream
from ember.gateway.routing import GATEWAY_ERRORS, Route, Routing, error_answer
from ember.lora.adapter import AdapterError, precheck
from ember.pipelines.run import StepFailed
from ember.protocol.requests import AdapterRequest, ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from ember.server import middleware
from ember.server.backend import ClientGone, EmbeddingBackend, EngineBackend, RequestContext, Stream
from ember.server.files_api import Refusal
from ember.server.middleware import AnswerErrors
from ember.server.openapi import install_openapi
from ember.server.platform import (
    INTERACTIVE_PRIORITY,
    STORE_PREFIXES,
    CallResult,
    Platform,
    PlatformContext,
    feature_modules,
)

log = logging.getLogger(__name__)

# Who may call a route, by the route the router matched (never by the path as written: the router also
# matches '/v1/adapters\n'). Every other route takes an API key; /metrics is the operator's (see _Gate).
PUBLIC_PATHS = ("/health", "/ready")  # reachable without an API key
ADMIN_PATHS = ("/v1/adapters", "/v1/adapters/{name}")  # the admin key only
# Fine-tuning: the admin key once the server has any key; open on an open server.
TUNING_PATHS = (
    "/v1/fine_tuning/jobs",
    "/v1/fine_tuning/jobs/{job_id}",
    "/v1/fine_tuning/jobs/{job_id}/cancel",
    "/v1/fine_tuning/jobs/{job_id}/events",
    "/v1/fine_tuning/jobs/{job_id}/checkpoints",
)
# Files: any API key, and the admin key too (it uploads the files of the jobs it creates).
FILES_PATHS = ("/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content")
METRICS_PATH = "/metrics"
# What a refused adapter operation answers: status, code, the field at fault.
_LORA_ERRORS = {
    ErrorKind.INVALID: (400, "invalid_adapter", "path"),
    ErrorKind.NOT_FOUND: (404, "model_not_found", "name"),
    ErrorKind.CONFLICT: (409, "adapter_in_use", "name"),
}
RETRY_AFTER_S = {429: "1", 503: "5"}
OUTSIDE_ROOTS = "the adapter path is not under any adapter root of this server (see --lora-root)"
TUNING_PREFIX = "/v1/fine_tuning"  # served with --fine-tuning only
# OpenAI's routes that ember does not serve (yet): a 404 that says so, not a bare "Not Found".
NOT_IMPLEMENTED = (
    "/v1/assistants",
    "/v1/audio",
    "/v1/chatkit",
    "/v1/containers",
    "/v1/conversations",
    "/v1/edits",
    "/v1/engines",
    "/v1/fine-tunes",
    "/v1/images",
    "/v1/moderations",
    "/v1/organization",
    "/v1/realtime",
    "/v1/threads",
    "/v1/uploads",
    "/v1/vector_stores",
    "/v1/videos",
)
# The type tags pydantic puts in an error's location for a union's branches: `str`, `list[int]`,
# `literal['auto']`, `function-after[...]`, a model's class name. The client named none of them.
_UNION_TAG = re.compile(r"^([a-z-]+\[.*\]|str|int|float|bool|none|[A-Z][A-Za-z0-9]*)$")


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
    # Where POST /v1/adapters may load from (real paths); a path outside every root is refused unread.
    lora_roots: list[str] = field(default_factory=list)
    # Adapters private to one key: name -> the owner's tenant id (see `tenant`). An adapter not listed is
    # global: the --lora and admin-loaded ones are, and every key may use them.
    adapter_owners: dict[str, str] = field(default_factory=dict)
    metrics_public: bool = False  # /metrics without any key, like /health
    allow_unknown_fields: bool = False  # ignore request fields ember does not know, instead of a 400
    tuning: object | None = None  # ember.server.tuning_api.Tuning: /v1/fine_tuning; None: off
    platform: Platform | None = None  # the store (files, responses, traces, batches, evals); None: off
    # Access to the platform features' routes (their ACCESS): route template -> user | user_or_admin | admin.
    route_access: dict[str, str] = field(default_factory=dict)
    recorder: object | None = None  # ember.traces: stored chat completions (--store-traces, `store: true`)
    mcp: object | None = None  # ember.responses.mcp.McpHub: the operator's MCP servers (--mcp)
    prices: object | None = None  # ember.gateway.usage.PriceTable (--prices); None: every token is free
    # ember.gateway.guard.Gateway: virtual keys, limits, usage; made by create_app when there is a store.
    gateway: object | None = None

    def closed(self) -> bool:
        """Whether requests need a key: an --api-key was given, or a virtual key was ever made."""
        return bool(self.api_keys) or (self.gateway is not None and self.gateway.keys.any())

    def tenant(self, key: str | None) -> str | None:
        """The owner id of a request made with `key` (as the gate accepted it): stable across restarts, so
        a stored adapter can name its owner, and no key in it. None without a key."""
        if key is None:
            return None
        return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]

    def cache_salt(self, key: str | None) -> bytes | None:
        """The prefix-cache namespace of a request made with `key` (as the gate accepted it); None (one
        shared namespace) when the server has no API keys."""
        if not self.closed():
            return None
        if key not in self.api_keys:
            virtual = self.gateway.keys.cached(key) if self.gateway is not None and key is not None else None
            if virtual is None:  # cannot happen past the gate; if it ever did, share nothing
                return os.urandom(32)
            return self._salt(f"tenant:{virtual.tenant}")
        shared = self.cache_namespaces.get(key)
        return self._salt(f"namespace:{shared}" if shared is not None else f"key:{key}")

    def _salt(self, ident: str) -> bytes:
        return hmac.new(self.cache_secret, ident.encode(), hashlib.sha256).digest()

    def cache_salt_of(self, tenant: str | None) -> bytes | None:
        """The prefix-cache namespace of the key whose owner id is `tenant` (work the server runs for a
        key it no longer has in hand: a batch after a restart); nothing shared if no key has it. A
        virtual key's namespace is named by its owner id, so it is the same with the key in hand or not."""
        if not self.closed():
            return None
        for key in self.api_keys:
            if self.tenant(key) == tenant:
                return self.cache_salt(key)
        virtual = self.gateway.keys.by_tenant(tenant) if self.gateway is not None else None
        return self._salt(f"tenant:{tenant}") if virtual is not None else os.urandom(32)


def confined(path: str, roots: list[str]) -> str | None:
    """`path` resolved (symlinks, '..') if it lies under one of `roots`, else None. Decided on the path's
    text and the links on it, never by reading what is there."""
    real = os.path.realpath(path)
    for root in roots:
        root = os.path.realpath(root)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return real
    return None


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


def create_app(
    engine: AsyncEngine,
    model_name: str,
    state: ServerState | None = None,
    options: ServerConfig | None = None,
) -> FastAPI:
    """The routes over ember's engine (`engine`, served as `model_name`) and the server's embedding model;
    `options` gives the HTTP limits, CORS and the health deadline (default: ServerConfig's defaults)."""
    state = state or ServerState()
    options = options or ServerConfig()
    app = FastAPI(title="ember", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.ember = state
    embeddings = EmbeddingBackend(state.embedder) if state.embedder is not None else None
    app.add_middleware(_Gate, state=state, counter=engine.metrics.http_requests, router=app.router)
    app.add_middleware(AnswerErrors, respond=_unexpected)
    _install_error_handlers(app)
    install_openapi(app, PUBLIC_PATHS)

    # -- around every route: body limits, CORS, request ids (ember.server.middleware) -----------------
    tuning = state.tuning
    if tuning is not None and state.platform is None:  # a server made with the tuning store alone
        state.platform = Platform(tuning.data_dir, tuning.store, tuning.blobs, tuning.max_upload_bytes)
    platform = state.platform
    streamed = {"/v1/files": platform.max_upload_bytes} if platform is not None else None
    middleware.install(
        app, options.max_request_bytes, options.body_timeout, options.allowed_origins, streamed
    )
    engine.metrics.model_name = model_name  # the `model_name` label of every series, as vLLM's
    backend = EngineBackend(engine, model_name, state.adapter_owners)
    if platform is not None:  # keys, limits and usage live in the store (ember.gateway)
        state.gateway = Gateway(platform.store, engine.metrics.registry, state.prices)
        backend = state.gateway.metered(backend)
    pipelines = None
    if options.pipeline_specs:  # served as models, their steps run through `routing` (attached below)
        from ember.pipelines.serve import PipelineBackend

        backend = pipelines = PipelineBackend(backend, options.pipeline_specs, state.mcp)
    # Where a request's model runs: the engine (metered, above) or a --provider, then its --fallback targets.
    routing = Routing.from_config(backend, options, engine.metrics.provider_calls)
    app.state.routing = routing
    app.router.on_shutdown.append(routing.aclose)
    # ---------------------------------------------------------------------------------------------------

    def stalled() -> JSONResponse | None:
        """A 503 while the core has had work but reported no step for longer than the deadline."""
        quiet = engine.stalled_for()
        if quiet <= options.health_stall_timeout:
            return None
        return _error(
            503,
            f"the engine's step loop is stalled: requests are in flight and no step was reported for "
            f"{quiet:.0f} s (--health-stall-timeout {options.health_stall_timeout:g})",
            kind="server_error",
            code="engine_stalled",
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        if backend.state in (EngineState.LOADING, EngineState.READY):
            return stalled() or JSONResponse({"status": "ok"})
        return _error(503, f"the engine has stopped: {engine.error or 'shut down'}", kind="server_error")

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.draining:
            return _error(503, "the server is draining", kind="server_error", code="draining")
        if backend.state is EngineState.READY and (refusal := stalled()) is not None:
            return refusal
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
    async def models(request: Request) -> dict:
        cards = backend.model_cards(_tenant(request))
        if embeddings is not None:
            cards[1:1] = embeddings.model_cards(backend.created)
        return {"object": "list", "data": cards + await routing.provider_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        cards = (await models(request))["data"]
        for card in cards:
            if card["id"] == model_id:
                return card
        known = ", ".join(c["id"] for c in cards)
        raise _Refuse(404, f"model '{model_id}' does not exist; available: {known}", "model_not_found")

    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        return {"object": "list", "data": [backend.card(n, p) for n, p in sorted(engine.adapters.items())]}

    @app.post("/v1/adapters")
    async def add_adapter(body: AdapterRequest) -> dict:
        """Load an adapter, global (every key may use it), from a directory under a --lora-root."""
        if body.name == model_name or body.name in engine.adapters or body.name in backend.aliases:
            raise _Refuse(
                409, f"a model, adapter or alias named '{body.name}' already exists", "adapter_exists"
            )
        path = confined(body.path, state.lora_roots)
        if path is None:  # one answer whatever is or is not at that path: no file-system oracle
            raise LoRAOpError(OUTSIDE_ROOTS, ErrorKind.INVALID)
        try:  # the untrusted files are read and checked here, off the engine's step loop, first
            await asyncio.to_thread(precheck, body.name, path)
        except AdapterError as exc:
            raise LoRAOpError(str(exc), ErrorKind.INVALID) from None
        await engine.add_lora(body.name, path)
        return backend.card(body.name, path)

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str) -> dict:
        if name not in engine.adapters:
            raise _Refuse(404, f"no LoRA adapter named '{name}' is loaded", "model_not_found")
        if name in backend.alias_adapters:
            alias = backend.alias_adapters[name]
            raise LoRAOpError(
                f"adapter '{name}' serves alias '{alias}'; repoint or delete the alias instead",
                ErrorKind.CONFLICT,
            )
        await engine.remove_lora(name)
        state.adapter_owners.pop(name, None)
        return {"id": name, "object": "model", "deleted": True}

    def _tenant(request: Request) -> str | None:
        return state.tenant(getattr(request.state, "api_key", None))

    def _admit(name: str, request: Request) -> Route:
        return _admit_tenant(name, _tenant(request))

    def _admit_tenant(name: str, tenant: str | None) -> Route:
        """Where a request's `model` runs (ember.gateway.routing.Route); 404 for a name that is no model,
        another key's private adapters included."""
        if state.draining:
            raise _Refuse(503, "the server is draining and takes no new requests", "draining", "server_error")
        route = routing.resolve(name, tenant)
        if route is not None:
            return route
        if embeddings is not None and name == embeddings.name:
            raise InvalidRequest(f"'{name}' is an embedding model; use /v1/embeddings", param="model")
        known = ", ".join(routing.known(tenant))
        raise _Refuse(404, f"model '{name}' does not exist; available: {known}", "model_not_found")

    def _context(request: Request) -> RequestContext:
        return RequestContext(
            state.cache_salt(getattr(request.state, "api_key", None)),
            request.is_disconnected,
            tenant=_tenant(request),
        )

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        body.check_supported(state.allow_unknown_fields)
        route = _admit(body.model, request)
        recorded = state.recorder if route.local else None  # a provider's answers are not traced (yet)
        trace = recorded and await recorded.begin(body, request, route.adapter, _tenant(request))
        answer = await routing.chat(body, route, _context(request))
        return _reply(trace.finish(answer) if trace else answer)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.check_supported(state.allow_unknown_fields)
        route = _admit(body.model, request)
        return _reply(await routing.complete(body, route, _context(request)))

    @app.post("/v1/embeddings")
    async def embed(body: EmbeddingRequest, request: Request):
        body.check_supported(state.allow_unknown_fields)
        return await _embed(body, _tenant(request), INTERACTIVE_PRIORITY)

    async def _embed(body: EmbeddingRequest, tenant: str | None, priority: int) -> dict:
        if state.draining:
            raise _Refuse(503, "the server is draining and takes no new requests", "draining", "server_error")
        if embeddings is None or body.model != embeddings.name:
            if (answer := await routing.embed(body)) is not None:  # a provider's NAME/model
                return answer
            known = embeddings.name if embeddings is not None else "none (start with --embedding-model)"
            raise _Refuse(
                404, f"embedding model '{body.model}' does not exist; available: {known}", "model_not_found"
            )
        if state.gateway is not None:
            return await state.gateway.run(
                "/v1/embeddings", body, tenant, priority, lambda: embeddings.embed(body)
            )
        return await embeddings.embed(body)

    # -- what runs inside the server: the same endpoints, called without HTTP (batches, evals) ---------

    def _internal(tenant: str | None, priority: int) -> RequestContext:
        return RequestContext(state.cache_salt_of(tenant), _never_gone, priority=priority, tenant=tenant)

    async def chat_endpoint(body: dict, tenant: str | None, priority: int) -> dict:
        req = _unstreamed(ChatCompletionRequest, body)
        req.check_supported(state.allow_unknown_fields)
        return await routing.chat(req, _admit_tenant(req.model, tenant), _internal(tenant, priority))

    async def completions_endpoint(body: dict, tenant: str | None, priority: int) -> dict:
        req = _unstreamed(CompletionRequest, body)
        req.check_supported(state.allow_unknown_fields)
        return await routing.complete(req, _admit_tenant(req.model, tenant), _internal(tenant, priority))

    async def embeddings_endpoint(body: dict, tenant: str | None, priority: int) -> dict:
        req = EmbeddingRequest.model_validate(body)
        req.check_supported(state.allow_unknown_fields)
        return await _embed(req, tenant, priority)

    endpoints = {
        "/v1/chat/completions": chat_endpoint,
        "/v1/completions": completions_endpoint,
        "/v1/embeddings": embeddings_endpoint,
    }
    if platform is not None:
        ctx = PlatformContext(
            state,
            engine,
            backend,
            embeddings,
            model_name,
            platform,
            _internal_caller(app, endpoints),
            endpoints,
        )
        app.state.platform = ctx  # the features' context (tests and tools reach `call` through it)
        _install_platform(app, ctx)
    if pipelines is not None:  # after the platform: the aliases it serves are models the steps may name
        name = embeddings.name if embeddings is not None else None
        pipelines.attach(routing, _internal_caller(app, endpoints), list(options.loras), name)
    return app


async def _never_gone() -> bool:
    return False


def _unstreamed(model, body: dict):
    if body.get("stream"):
        raise InvalidRequest("'stream' is not supported for requests run inside the server", param="stream")
    return model.model_validate(body)


def _internal_caller(app: FastAPI, endpoints: dict):
    """PlatformContext.call: run `path`'s endpoint on a JSON body for `tenant`; the status and body a
    client would have got over HTTP, errors answered by the app's own exception handlers."""

    async def call(path: str, body: dict, tenant: str | None, priority: int = INTERACTIVE_PRIORITY):
        handler = endpoints.get(path)
        if handler is None:
            known = ", ".join(sorted(endpoints))
            return CallResult(
                400,
                error_body(
                    f"'{path}' cannot be called here; one of: {known}",
                    "invalid_request_error",
                    param="url",
                    code="invalid_url",
                ),
            )
        try:
            return CallResult(200, await handler(body, tenant, priority))
        except Exception as exc:  # answered as the route would have answered it
            return await _answer_of(app, exc)

    return call


async def _answer_of(app: FastAPI, exc: Exception) -> CallResult:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        exc = RequestValidationError(exc.errors())
    for kind in type(exc).__mro__:
        handler = app.exception_handlers.get(kind)
        if handler is not None and kind is not Exception:
            response = await handler(None, exc)
            return CallResult(response.status_code, json.loads(response.body or b"{}"))
    log.exception("internal call failed", exc_info=exc)
    response = _unexpected(exc)
    return CallResult(response.status_code, json.loads(response.body))


def _install_platform(app: FastAPI, ctx: PlatformContext) -> None:
    """The files routes, fine-tuning (with --fine-tuning) and every platform feature, over the store; their
    services start and stop with the app."""
    from ember.server.files_api import install_files

    state, platform = ctx.state, ctx.platform
    install_files(app, platform.store, platform.blobs, platform.max_upload_bytes, ctx.tenant_of)
    if state.tuning is not None:
        _install_tuning(app, state.tuning, ctx.engine, ctx.model_name, state)
        ctx.services.append(state.tuning.runner)
    for module in feature_modules():
        state.route_access.update(getattr(module, "ACCESS", {}))
        module.install(app, ctx)
    outer = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application):
        async with outer(application) as inner:
            started = []
            try:
                for service in ctx.services:
                    await service.start()
                    started.append(service)
                yield inner
            finally:
                for service in reversed(started):
                    await service.stop()

    app.router.lifespan_context = lifespan


def _install_tuning(app: FastAPI, tuning, engine: AsyncEngine, model_name: str, state: ServerState) -> None:
    """The fine-tuning routes over `tuning` (ember.server.tuning_api.Tuning)."""
    from ember.server.tuning_api import install_tuning, served_base

    def tenant_of(request: Request) -> str | None:
        return state.tenant(getattr(request.state, "api_key", None))

    def caller(request: Request) -> tuple[str | None, bool]:
        return tenant_of(request), bool(getattr(request.state, "admin", False))

    source, template, max_rank = served_base(engine, model_name)
    install_tuning(app, tuning.store, tuning.runner, model_name, source, caller, max_rank, template)


class _Refuse(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.code, self.kind = status, code, kind


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "the request body is not valid JSON", param=None, code="invalid_json")
        paths = [_field_path(e.get("loc", ())) for e in errors]
        # Of a union's branches, the one that got furthest into the value names the field best.
        best = max(range(len(errors)), key=lambda i: paths[i][0])
        first, where = errors[best], paths[best][1]
        if first.get("type") == "missing":
            return _error(400, f"'{where}' is required", param=where or None)
        if first.get("type") == "extra_forbidden":
            return _error(
                400,
                f"Unrecognized request argument supplied: '{where}'",
                param=where,
                code="unknown_parameter",
            )
        msgs: list[str] = []
        for e, (_, path) in zip(errors, paths, strict=True):
            msg = e.get("msg", "invalid value").removeprefix("Value error, ")
            if path == where and msg not in msgs:
                msgs.append(msg)
        msg = " or ".join([msgs[0]] + [m.removeprefix("Input should be ") for m in msgs[1:]])
        return _error(400, f"'{where or 'body'}': {msg}", param=where or None)

    @app.exception_handler(StepFailed)
    async def _step_failed(_: Request, exc: StepFailed) -> JSONResponse:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        return _error(exc.status, str(exc), code="pipeline_step_failed", kind=kind)

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

    @app.exception_handler(Refusal)
    async def _refusal(_: Request, exc: Refusal) -> JSONResponse:
        return _error(exc.status, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(middleware.BodyTooLarge)
    async def _upload_too_large(_: Request, exc: middleware.BodyTooLarge) -> JSONResponse:
        return _error(413, str(exc), param="file", code="file_too_large")

    @app.exception_handler(middleware.BodyTimeout)
    async def _upload_too_slow(_: Request, exc: middleware.BodyTimeout) -> JSONResponse:
        return _error(408, str(exc), code="request_timeout")

    @app.exception_handler(jinja2.TemplateError)
    async def _template(_: Request, exc: jinja2.TemplateError) -> JSONResponse:
        return _error(400, f"the model's chat template refused these messages: {exc}", param="messages")

    @app.exception_handler(LoRAOpError)
    async def _lora(_: Request, exc: LoRAOpError) -> JSONResponse:
        status, code, param = _LORA_ERRORS[exc.kind]
        return _error(status, str(exc), param=param, code=code)

    @app.exception_handler(Limited)
    async def _limited(_: Request, exc: Limited) -> JSONResponse:
        kind = {401: "authentication_error", 403: "permission_error"}.get(exc.status, "rate_limit_error")
        response = _error(
            exc.status, str(exc), param="model" if exc.status == 403 else None, code=exc.code, kind=kind
        )
        response.headers.update(exc.headers)
        if exc.code == "budget_exceeded":  # waiting a second does not help
            del response.headers["Retry-After"]
        return response

    @app.exception_handler(EngineOverloadedError)
    async def _overloaded(_: Request, exc: EngineOverloadedError) -> JSONResponse:
        return _error(429, str(exc), code="rate_limit_exceeded", kind="rate_limit_error")

    @app.exception_handler(EngineNotReadyError)
    async def _loading(_: Request, exc: EngineNotReadyError) -> JSONResponse:
        return _error(503, str(exc), code="not_ready", kind="server_error")

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return _error(503, str(exc), code="engine_dead", kind="server_error")

    async def _upstream_failed(_: Request, exc: Exception) -> JSONResponse:
        return error_answer(exc)

    for kind in GATEWAY_ERRORS:
        app.add_exception_handler(kind, _upstream_failed)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code != 404:
            return _error(exc.status_code, str(exc.detail))
        path = request.url.path
        if request.app.state.ember.platform is None and any(
            path == p or path.startswith(p + "/") for p in (*STORE_PREFIXES, TUNING_PREFIX)
        ):
            return _error(
                404,
                f"{request.method} {path}: this server runs without its store (--no-store); files, "
                "responses, batches, evals and fine-tuning need it",
                code="not_enabled",
            )
        if path == TUNING_PREFIX or path.startswith(TUNING_PREFIX + "/"):  # served, but off here
            return _error(
                404,
                f"{request.method} {path}: fine-tuning is off on this server; start it with --fine-tuning",
                code="not_enabled",
            )
        if any(path == p or path.startswith(p + "/") for p in NOT_IMPLEMENTED):
            return _error(
                404,
                f"{request.method} {path} is part of the OpenAI API but not implemented in ember yet",
                code="not_implemented",
            )
        return _error(
            404,
            f"unknown route {request.method} {path}; /openapi.json lists the routes",
            code="unknown_route",
        )


def _unexpected(exc: Exception) -> JSONResponse:
    return _error(500, f"internal error: {type(exc).__name__}", kind="server_error")


class _Gate:
    """ASGI middleware (pure, so streaming and disconnects pass through untouched): the key check, and a
    count of responses by route and status.

    Access is decided by the route the router will match (PUBLIC_PATHS: anyone; ADMIN_PATHS: the admin
    key; /metrics: the admin key, or anyone on an open server or with --metrics-public; any other route,
    matched or not: an API key when the server has any), and a path with control characters is refused
    before any route is looked at."""

    def __init__(self, app, state: ServerState, counter: Counter, router: Router):
        self.app = app
        self.state = state
        self.counter = counter
        self.router = router

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}
        limits: dict[str, str] = {}  # the key's rate-limit headers, written by admission (ember.gateway)
        token = RESPONSE_HEADERS.set(limits)

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if limits:
                    have = {k for k, _ in message.get("headers", [])}
                    extra = [(k.lower().encode(), v.encode()) for k, v in limits.items()]
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), *(h for h in extra if h[0] not in have)],
                    }
            await send(message)

        if any(ch < " " or ch == "\x7f" for ch in scope["path"]):
            response = _error(400, "the request path holds control characters", code="invalid_path")
            await response(scope, receive, send_counted)
            self.counter.labels("unmatched", "400").inc()
            return
        route = self._route(scope)
        access = self._access(route)
        public = access == "public"
        if not public:
            self.state.in_flight += 1
        try:
            user = access in ("user", "user_or_admin")
            refusal = self._admin_refusal(scope, access) if not user and not public else None
            if refusal is None and access in ("tuning", "admin"):  # the admin key: its own tenant
                scope.setdefault("state", {}).update(api_key=self.state.admin_key, admin=True)
            if user:
                key = self._key(scope, admin_too=access == "user_or_admin")
                why = "missing or wrong API key; send it as 'Authorization: Bearer <key>'"
                if key is None and self.state.gateway is not None:
                    key, why = await self._virtual_key(scope, why)
                # The handlers read request.state.api_key (and .admin: whether it is the admin key).
                admin = key is not None and key == self.state.admin_key
                scope.setdefault("state", {}).update(api_key=key, admin=admin)
                if key is None and (self.state.api_keys or self._closed()):
                    refusal = _error(401, why, code="invalid_api_key")
            await (self.app if refusal is None else refusal)(scope, receive, send_counted)
        finally:
            RESPONSE_HEADERS.reset(token)
            if not public:
                self.state.in_flight -= 1
            route = scope.get("route")
            self.counter.labels(getattr(route, "path", "unmatched"), str(status["code"])).inc()

    async def _virtual_key(self, scope, why: str) -> tuple[str | None, str]:
        """The presented key if it is a live virtual key (looked up by its hash), else None and why."""
        key = _presented_key(scope)
        if key is None:
            return None, why
        keys = self.state.gateway.keys
        found = keys.lookup(key) if keys.fresh(key) else await asyncio.to_thread(keys.lookup, key)
        if found is None:
            return None, why
        if found.revoked:
            return None, f"API key {found.id} has been revoked"
        return key, why

    def _closed(self) -> bool:
        gateway = self.state.gateway
        return gateway is not None and gateway.keys.any()  # a read at most once a second

    def _route(self, scope) -> str | None:
        """The path template of the route the router will take for this request (one that matches the
        path but not the method counts: it answers 405), or None."""
        partial = None
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return getattr(route, "path", None)
            if match is Match.PARTIAL and partial is None:
                partial = getattr(route, "path", None)
        return partial

    def _access(self, route: str | None) -> str:
        """public, user, user_or_admin, admin, tuning or metrics."""
        declared = self.state.route_access.get(route)  # a platform feature's route
        if declared is not None:
            return declared
        if route in FILES_PATHS:
            return "user_or_admin"
        if route in PUBLIC_PATHS:
            return "public"
        if route in ADMIN_PATHS:
            return "admin"
        if route in TUNING_PATHS:
            return "user" if not self.state.api_keys and self.state.admin_key is None else "tuning"
        if route == METRICS_PATH:
            open_server = not self.state.api_keys and self.state.admin_key is None
            return "public" if self.state.metrics_public or open_server else "metrics"
        return "user"

    def _admin_refusal(self, scope, access: str) -> JSONResponse | None:
        """None if the request carries the admin key; otherwise the 401 or 403 to answer."""
        admin = self.state.admin_key
        metrics = access == "metrics"
        if admin is None:
            why = (
                "server metrics are the operator's: start the server with --admin-key or --metrics-public"
                if metrics
                else "adapters cannot be changed at runtime: start the server with --admin-key"
            )
            if access == "tuning":
                why = "fine-tuning needs the admin key: start the server with --admin-key"
            return _error(403, why, code="admin_disabled", kind="permission_error")
        key = _presented_key(scope)
        if key is not None and hmac.compare_digest(key.encode(), admin.encode()):
            return None
        if key is not None and any(
            hmac.compare_digest(key.encode(), k.encode()) for k in self.state.api_keys
        ):
            what = {"metrics": "read server metrics", "tuning": "fine-tune"}.get(access, "manage adapters")
            return _error(
                403,
                f"this API key may not {what}; use the admin key",
                code="forbidden",
                kind="permission_error",
            )
        what = {"metrics": "server metrics need", "tuning": "fine-tuning needs"}.get(
            access, "adapter management needs"
        )
        return _error(401, f"{what} the admin key as 'Authorization: Bearer <key>'", code="invalid_api_key")

    def _key(self, scope, admin_too: bool = False) -> str | None:
        """The configured API key this request presents (or the admin key, with `admin_too`), or None."""
        key = _presented_key(scope)
        if key is None:
            return None
        keys = [*self.state.api_keys, *([self.state.admin_key] if admin_too and self.state.admin_key else [])]
        match = [k for k in keys if hmac.compare_digest(key.encode(), k.encode())]
        return match[0] if match else None


def _field_path(loc: tuple) -> tuple[int, str]:
    """(depth, the field as the client wrote it: `messages[0].content`) of a validation error's location,
    without the `body` root and the union-branch tags."""
    out, depth = "", 0
    for i, part in enumerate(loc):
        if i == 0 and part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif _UNION_TAG.match(part):
            continue
        else:
            out += ("." if out else "") + part
        depth += 1
    return depth, out


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


def _reply(answer: dict | Stream | RawStream):
    if isinstance(answer, RawStream):  # a provider's events, passed through as it framed them
        return StreamingResponse(
            answer.body, media_type="text/event-stream", background=BackgroundTask(answer.close)
        )
    if isinstance(answer, Stream):
        # close() runs once the response is over, however it ended: a client that left aborts its requests.
        return StreamingResponse(
            _sse(answer), media_type="text/event-stream", background=BackgroundTask(answer.close)
        )
    return answer
