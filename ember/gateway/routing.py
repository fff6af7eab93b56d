"""Where a request's model runs: ember's engine or a provider, and where it goes next when that fails.

`Routing.resolve` is the one place a request's `model` becomes a `Route` (the target it names, then its
--fallback targets in order); `chat` and `complete` run a route. A provider call that fails for a reason
another attempt may not meet (5xx, 429, no connection, a timeout) is retried with exponential back-off,
then the next target is tried; a context-length error goes to the next target at once (the same prompt
will not fit the same model again). Any other error is the client's, and is its answer. A provider that
keeps failing cools down (ember.gateway.breaker): skipped without a call until a probe finds it back.

A streamed answer commits to its target once that target's first bytes have come: until then a failure
moves on like any other; after, the stream ends with an error event (ember.gateway.providers).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from dataclasses import dataclass

import httpx
from fastapi.responses import JSONResponse
from prometheus_client import Counter

from ember.config.server import ServerConfig
from ember.engine.async_engine import EngineDeadError, EngineNotReadyError, EngineOverloadedError
from ember.errors import InvalidRequest
from ember.gateway.breaker import CLOSED, Breaker
from ember.gateway.fields import upstream_body
from ember.gateway.providers import Provider, RawStream, UpstreamError
from ember.protocol.requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from ember.server.backend import EngineBackend, RequestContext, Stream

log = logging.getLogger(__name__)

CONTEXT_LENGTH = "context_length_exceeded"  # OpenAI's error code for a prompt too long for the model
BACKOFF_S = 0.05  # the first retry's wait; doubled for each next one, with jitter
MAX_RETRY_AFTER_S = 2.0  # a 429's Retry-After is honoured up to this; past it, the next target is better


class Cooling(Exception):
    """Every target of a route is cooling down: a 503 with when to come back."""

    def __init__(self, model: str, retry_after: float):
        super().__init__(f"every upstream of model '{model}' is failing and cooling down; retry shortly")
        self.retry_after = retry_after


class Unreachable(Exception):
    """A provider gave no answer (no connection, a timeout) after its retries: 502 or 504."""

    def __init__(self, provider: str, exc: httpx.TransportError):
        timeout = isinstance(exc, httpx.TimeoutException)
        what = "did not answer in time" if timeout else "cannot be reached"
        super().__init__(f"provider '{provider}' {what} ({type(exc).__name__})")
        self.status = 504 if timeout else 502


@dataclass(frozen=True)
class Target:
    """ember's engine (`provider` None; `adapter` as EngineBackend.resolve gives it) or a provider's
    `model`. `name`: how the request or the fallback list named it."""

    name: str
    provider: str | None = None
    model: str | None = None
    adapter: str | None = None


@dataclass(frozen=True)
class Route:
    """A request's target, then its fallbacks' names (resolved when they are tried: an alias may have
    moved, an adapter may be gone)."""

    model: str
    primary: Target
    fallbacks: tuple[str, ...]
    tenant: str | None
    local: bool  # every target is ember's own engine (what records answers, traces, expects so)

    @property
    def adapter(self) -> str | None:
        """The adapter the primary runs on (ember's engine), for what records it (traces)."""
        return self.primary.adapter


class Routing:
    """ember's engine (`local`) and the --provider upstreams behind one resolve/chat/complete."""

    def __init__(
        self,
        local: EngineBackend,
        providers: dict[str, Provider],
        fallbacks: dict[str, list[str]],
        retries: int = 2,
        calls: Counter | None = None,
    ):
        self.local = local
        self.calls = calls  # ember:provider_calls, by provider and outcome
        self.providers = providers
        self.fallbacks = {m: tuple(t) for m, t in fallbacks.items()}
        self.retries = retries
        for model, targets in self.fallbacks.items():
            for target in targets:
                prefix, slash, _ = target.partition("/")
                if slash and prefix not in providers and target != local.model_name:
                    known = ", ".join(providers) or "none"
                    raise ValueError(
                        f"--fallback {model}: '{target}' names no --provider '{prefix}' (providers: {known})"
                    )

    @classmethod
    def from_config(
        cls, local: EngineBackend, options: ServerConfig, calls: Counter | None = None
    ) -> Routing:
        providers = {
            name: Provider(
                spec,
                options.provider_timeout,
                Breaker(options.provider_failures, options.provider_cooldown),
            )
            for name, spec in options.provider_specs.items()
        }
        return cls(local, providers, options.fallbacks, options.provider_retries, calls)

    def _count(self, provider: Provider, outcome: str) -> None:
        if self.calls is not None:
            self.calls.labels(provider.name, outcome).inc()

    async def aclose(self) -> None:
        """Close the providers' connection pools (when the server stops)."""
        for provider in self.providers.values():
            await provider.aclose()

    # -- names --------------------------------------------------------------------------------------

    def target(self, name: str, tenant: str | None) -> Target | None:
        """What `name` names for `tenant`: a local model (first: a local name may hold a '/'), NAME/model
        of a provider, or None. A provider's model is not checked against its listing: the provider
        answers for its own names (a 404 for one it does not have)."""
        adapter = self.local.resolve(name, tenant)
        if adapter is not False:
            return Target(name, adapter=adapter)
        prefix, slash, model = name.partition("/")
        if slash and model and prefix in self.providers:
            return Target(name, prefix, model)
        return None

    def resolve(self, name: str, tenant: str | None = None) -> Route | None:
        primary = self.target(name, tenant)
        if primary is None:
            return None
        fallbacks = self.fallbacks.get(name, ())
        local = primary.provider is None and not any(self._remote(f) for f in fallbacks)
        return Route(name, primary, fallbacks, tenant, local)

    def _remote(self, name: str) -> bool:
        prefix, slash, _ = name.partition("/")
        return bool(slash) and prefix in self.providers and name != self.local.model_name

    def known(self, tenant: str | None) -> list[str]:
        """The names a 404 lists: the local models, and NAME/... for each provider."""
        return [*self.local.known(tenant), *(f"{p}/..." for p in self.providers)]

    async def provider_cards(self) -> list[dict]:
        cards = await asyncio.gather(*(p.model_cards() for p in self.providers.values()))
        return [card for listed in cards for card in listed]

    # -- calls --------------------------------------------------------------------------------------

    async def chat(
        self, body: ChatCompletionRequest, route: Route, ctx: RequestContext
    ) -> dict | Stream | RawStream:
        return await self._run(body, route, ctx, "/chat/completions", self.local.chat)

    async def complete(
        self, body: CompletionRequest, route: Route, ctx: RequestContext
    ) -> dict | Stream | RawStream:
        return await self._run(body, route, ctx, "/completions", self.local.complete)

    async def embed(self, body: EmbeddingRequest) -> dict | None:
        """A provider's embeddings for `body` (NAME/model), or None if it names no provider. No fallbacks:
        another model's vectors would not be comparable with the ones the caller has."""
        prefix, slash, model = body.model.partition("/")
        provider = self.providers.get(prefix) if slash and model else None
        if provider is None:
            return None
        if not provider.breaker.allow():
            self._count(provider, "cooling")
            raise Cooling(body.model, provider.breaker.retry_in())
        payload = body.model_dump(mode="json", exclude_unset=True, exclude_none=True)
        payload = {k: v for k, v in payload.items() if k in type(body).model_fields} | {"model": model}
        return await self._call(provider, "/embeddings", payload)

    async def _run(
        self, body, route: Route, ctx: RequestContext, path: str, local
    ) -> dict | Stream | RawStream:
        """The first answer of the route's targets, in order; the last failure if none answers."""
        failure: Exception | None = None
        cooling: list[float] = []
        for i, name in enumerate((route.model, *route.fallbacks)):
            target = route.primary if i == 0 else self.target(name, route.tenant)
            if target is None:
                log.warning("model '%s': fallback '%s' names no model now; skipped", route.model, name)
                continue
            if target.provider is None:
                try:
                    return await local(
                        body if i == 0 else body.model_copy(update={"model": name}), target.adapter, ctx
                    )
                except (EngineOverloadedError, EngineNotReadyError, EngineDeadError) as exc:
                    failure = exc
                except InvalidRequest as exc:
                    if exc.code != CONTEXT_LENGTH:
                        raise
                    failure = exc
                continue
            provider = self.providers[target.provider]
            try:
                payload = upstream_body(body, target.model, provider.name, provider.ember)
            except InvalidRequest:
                if i == 0:
                    raise
                continue  # this fallback cannot take the request as asked
            if not provider.breaker.allow():
                cooling.append(provider.breaker.retry_in())
                self._count(provider, "cooling")
                continue
            try:
                return await self._call(provider, path, payload)
            except UpstreamError as exc:
                if exc.status < 500 and exc.status != 429 and exc.code != CONTEXT_LENGTH:
                    raise  # the request's fault, answered by the upstream: the client's answer
                failure = exc
            except Unreachable as exc:
                failure = exc
        if failure is None:  # nothing was tried: the primary (a provider) and the rest are cooling down
            raise Cooling(route.model, min(cooling))
        raise failure

    async def _call(self, provider: Provider, path: str, payload: dict) -> dict | RawStream:
        """`provider`'s answer, with retries; UpstreamError or Unreachable once they are spent (or for an
        error no retry cures: a client's, which is passed on; a context-length one, which moves on)."""
        breaker = provider.breaker
        wait = 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(wait)
                if breaker.state != CLOSED:  # it cooled down meanwhile (a probe gets one try)
                    break
            wait = BACKOFF_S * 2**attempt * (0.5 + random.random())
            try:
                answer = await provider.call(path, payload)
            except UpstreamError as exc:
                self._count(provider, "error")
                if exc.status != 429 and exc.status < 500:
                    breaker.success()  # it answered: it is up, and the request is at fault
                    raise
                breaker.failure()
                last: Exception = exc
                if exc.status == 429 and exc.retry_after is not None:
                    wait = _seconds(exc.retry_after, wait)
                log.warning("provider '%s' answered %d (attempt %d)", provider.name, exc.status, attempt + 1)
            except httpx.TransportError as exc:
                self._count(provider, "unreachable")
                breaker.failure()
                last = Unreachable(provider.name, exc)
                log.warning("%s (attempt %d)", last, attempt + 1)
            except BaseException:
                breaker.abandon()  # cancelled (the client left): no verdict on the upstream
                raise
            else:
                self._count(provider, "ok")
                breaker.success()
                return answer
            if wait > MAX_RETRY_AFTER_S or breaker.state != CLOSED:
                break
        raise last


def _seconds(retry_after: str, default: float) -> float:
    """A Retry-After in seconds (the HTTP-date form is not worth waiting on: the default)."""
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        return default


def error_answer(exc: Exception) -> JSONResponse:
    """The HTTP answer to a gateway failure: an upstream's own error as it sent it; 502/504 for one that
    gave none; 503 with Retry-After while every target cools down."""
    if isinstance(exc, UpstreamError):
        headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
        return JSONResponse(exc.body, status_code=exc.status, headers=headers)
    status = exc.status if isinstance(exc, Unreachable) else 503
    code = "upstream_unreachable" if isinstance(exc, Unreachable) else "upstream_cooling_down"
    body = {"error": {"message": str(exc), "type": "server_error", "param": None, "code": code}}
    headers = {"Retry-After": str(math.ceil(exc.retry_after))} if isinstance(exc, Cooling) else None
    return JSONResponse(body, status_code=status, headers=headers)


GATEWAY_ERRORS = (UpstreamError, Unreachable, Cooling)
