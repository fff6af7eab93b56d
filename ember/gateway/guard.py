"""`Gateway`: a key's limits checked before a request reaches a backend, and its usage metered after.

Every generation request goes through `MeteredBackend`, the server's backend wrapped (the HTTP routes,
the requests run inside the server: batch lines, evals, the Responses API's model calls), and every
embeddings request through `Gateway.embed`. For the caller's key (found by its owner id, RequestContext
.tenant) admission checks, in order: the key may call this model (403 model_not_allowed), its requests
and tokens per minute (429 rate_limit_exceeded; interactive requests only: batch lines are paced by the
batch runner), its budget (429 budget_exceeded; every request). The admission's estimate is reserved and
settled with the real usage once the answer is complete.

Prompt tokens are estimated before the chat template runs (it runs once, in the backend): a message
costs ceil(characters / 4) + 4 tokens, a text prompt ceil(characters / 4) + 1, token ids their number;
the output is estimated at max_tokens (max_completion_tokens) times n, or DEFAULT_OUTPUT_ESTIMATE (16
for completions, as their default max_tokens) when the request sets none. The estimate sizes the
reservation only: what is charged is the usage the engine reports.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from ember.gateway import budgets
from ember.gateway.keys import KeyRing, VirtualKey
from ember.gateway.limits import Limited, RateLimiter
from ember.gateway.usage import Meter, Metered, PriceTable
from ember.protocol.requests import StreamOptions
from ember.server.backend import Stream
from ember.store.db import Store

DEFAULT_OUTPUT_ESTIMATE = 256
INTERACTIVE_PRIORITY = 0  # ember.server.platform's (not imported: the platform imports the server's parts)
BATCH_PRIORITY = 10

# The rate-limit headers of the request being answered: the gate (ember.server.app) puts a dict here
# before the route runs and adds what admission wrote into it to the response.
RESPONSE_HEADERS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ratelimit", default=None)


def _chars_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def estimate_prompt(body) -> int:
    messages = getattr(body, "messages", None)
    if messages is not None:
        total = 0
        for m in messages:
            content = m.content
            if isinstance(content, str):
                total += _chars_tokens(content)
            elif content:
                total += sum(_chars_tokens(p.text or "") for p in content)
            total += 4
        return total
    items = body.inputs() if hasattr(body, "inputs") else body.prompts()
    return sum(len(p) if isinstance(p, list) else _chars_tokens(p) + 1 for p in items)


def estimate_output(body) -> int:
    if not hasattr(body, "n"):
        return 0  # embeddings
    most = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if most is None:
        most = 16 if hasattr(body, "prompts") else DEFAULT_OUTPUT_ESTIMATE
    prompts = len(body.prompts()) if hasattr(body, "prompts") else 1
    return most * body.n * prompts


@dataclass
class Ticket:
    """One admitted request: who it is charged to and what it holds."""

    tenant: str | None
    key: VirtualKey | None
    model: str
    endpoint: str
    batch: bool
    estimate_prompt: int
    estimate_output: int
    reserved: float = 0.0
    period: str | None = None  # the budget period reserved in; None: nothing reserved
    event: list | None = None  # the rate limiter's admission
    done: bool = False


class Gateway:
    """The keys, limits, prices and meter of one server (ServerState.gateway)."""

    def __init__(
        self,
        store: Store,
        registry: CollectorRegistry,
        prices: PriceTable | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.keys = KeyRing(store)
        self.limiter = RateLimiter(clock)
        self.prices = prices or PriceTable()
        self.meter = Meter(store, registry, self.keys, self.prices)

    async def key_of(self, tenant: str | None) -> VirtualKey | None:
        """The virtual key of an owner id (read at most CACHE_S ago); None for --api-key keys."""
        if tenant is None or self.keys.tenant_fresh(tenant):
            return self.keys.by_tenant(tenant)
        return await asyncio.to_thread(self.keys.by_tenant, tenant)

    def key_id(self, ticket: Ticket) -> str | None:
        return ticket.key.id if ticket.key is not None else ticket.tenant

    async def admit(self, endpoint: str, body, tenant: str | None, priority: int) -> Ticket:
        key = await self.key_of(tenant)
        ticket = Ticket(
            tenant,
            key,
            body.model,
            endpoint,
            priority >= BATCH_PRIORITY,
            estimate_prompt(body),
            estimate_output(body),
        )
        if key is None:
            return ticket
        try:
            if key.revoked:  # work queued before the revocation (a batch's lines)
                raise Limited(401, f"virtual key {key.id} has been revoked", "key_revoked")
            if key.models is not None and body.model not in key.models:
                allowed = ", ".join(key.models) or "none"
                raise Limited(
                    403,
                    f"this key may not call model '{body.model}'; it may call: {allowed}",
                    "model_not_allowed",
                )
            if priority == INTERACTIVE_PRIORITY and (key.rpm is not None or key.tpm is not None):
                tokens = ticket.estimate_prompt + ticket.estimate_output
                ticket.event, headers = self.limiter.admit(key.id, key.rpm, key.tpm, tokens)
                sink = RESPONSE_HEADERS.get()
                if sink is not None:
                    sink.update(headers)
            if key.budget is not None:
                amount = self._charge(ticket, ticket.estimate_prompt, 0, ticket.estimate_output)
                ticket.period = await asyncio.to_thread(budgets.reserve, self.store, key, amount)
                ticket.reserved = amount
        except Limited as exc:
            self.meter.refused(key.id, exc.code)
            if ticket.event is not None:
                self.limiter.correct(key.id, ticket.event, 0)
            raise
        return ticket

    def _charge(self, ticket: Ticket, prompt: int, cached: int, completion: int) -> float:
        """What these tokens take from the ticket's key's budget: tokens, or USD."""
        if ticket.key is not None and ticket.key.budget_unit == "usd":
            return self.prices.cost(ticket.model, prompt, cached, completion, ticket.batch)
        return float(prompt + completion)

    def finish(self, ticket: Ticket, usage: dict | None, status: int = 200) -> None:
        """Meter an admitted request and settle its reservation. `usage` None with status 200: the answer
        was cut off (a stream the client left), charged at its estimate."""
        if ticket.done:
            return
        ticket.done = True
        if usage is None and status == 200:
            prompt, cached, completion = ticket.estimate_prompt, 0, ticket.estimate_output
        elif usage is None:
            prompt = cached = completion = 0
        else:
            prompt = usage.get("prompt_tokens", 0)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            completion = usage.get("completion_tokens", 0)
        key = ticket.key
        if key is not None and ticket.event is not None:
            self.limiter.correct(key.id, ticket.event, prompt + completion)
        settle = None
        if ticket.period is not None:
            settle = (
                key.id,
                ticket.period,
                ticket.reserved,
                self._charge(ticket, prompt, cached, completion),
            )
        self.meter.record(
            Metered(
                tenant=ticket.tenant,
                key_id=self.key_id(ticket),
                team=key.team if key is not None else None,
                model=ticket.model,
                endpoint=ticket.endpoint,
                batch=ticket.batch,
                prompt_tokens=prompt,
                cached_tokens=cached,
                completion_tokens=completion,
                cost=self.prices.cost(ticket.model, prompt, cached, completion, ticket.batch),
                status=status,
                settle=settle,
            )
        )

    async def run(self, endpoint: str, body, tenant: str | None, priority: int, call):
        """`call()`'s answer (a dict or a Stream), admitted and metered."""
        ticket = await self.admit(endpoint, body, tenant, priority)
        asked_usage = False
        if getattr(body, "stream", False):  # the usage chunk is what meters a stream: ask for it
            asked_usage = bool(body.stream_options and body.stream_options.include_usage)
            body.stream_options = StreamOptions(include_usage=True)
        try:
            answer = await call()
        except Exception as exc:
            self.finish(ticket, None, getattr(exc, "status", 400))
            raise
        except BaseException:  # cancelled: the client left before any answer
            self.finish(ticket, None, 499)
            raise
        if isinstance(answer, Stream):
            return self._metered_stream(ticket, answer, asked_usage)
        self.finish(ticket, answer.get("usage"))
        return answer

    def _metered_stream(self, ticket: Ticket, stream: Stream, asked_usage: bool) -> Stream:
        async def chunks():
            async for chunk in stream.chunks:
                if "usage" in chunk and not chunk.get("choices"):
                    self.finish(ticket, chunk["usage"])
                    if not asked_usage:
                        continue
                yield chunk

        def close() -> None:
            stream.close()
            self.finish(ticket, None)

        return Stream(chunks(), close)

    def metered(self, backend) -> MeteredBackend:
        return MeteredBackend(backend, self)


class MeteredBackend:
    """A generation backend whose chat and completions requests go through the gateway; everything else
    is the backend's own."""

    def __init__(self, inner, gateway: Gateway):
        self.inner = inner
        self.gateway = gateway

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def chat(self, body, target, ctx):
        return await self.gateway.run(
            "/v1/chat/completions", body, ctx.tenant, ctx.priority, lambda: self.inner.chat(body, target, ctx)
        )

    async def complete(self, body, target, ctx):
        return await self.gateway.run(
            "/v1/completions", body, ctx.tenant, ctx.priority, lambda: self.inner.complete(body, target, ctx)
        )
