"""Pipelines served as models (`ember serve --pipeline NAME=spec.yaml`): a generation backend over the
server's own, so that a pipeline's name is listed in /v1/models and answers Chat Completions and the
Responses API (which both reach models through this backend), and every other name is the inner one's.

A request's last user message is the pipeline's `input`. Every step but the output runs before the
answer begins (a failure there is a plain HTTP error); a streamed request then streams the output step,
if it is a generate step on ember's engine, as it is generated; any other output is sent whole. The
answer carries the trace as `pipeline` (on a stream: a chunk of its own before the usage chunk), and
its usage is the sum of every step's.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from ember.errors import InvalidRequest
from ember.evals.criteria import EMBEDDING_MODEL
from ember.pipelines.check import check_models
from ember.pipelines.run import PipelineRun, StepFailed, count
from ember.pipelines.spec import Pipeline, SpecError
from ember.protocol import format as fmt
from ember.protocol.requests import ChatCompletionRequest
from ember.server.backend import RequestContext, Stream
from ember.server.platform import INTERACTIVE_PRIORITY

HUB_GRACE_S = 1.0  # past a tool's timeout, how long the MCP hub has to report it before the step fails


class PipelineBackend:
    """The inner generation backend, plus the pipelines by name. `attach` gives it what its steps call
    through (the server's Routing, its internal `call`) and checks every step's model against it."""

    def __init__(self, inner, pipelines: dict[str, Pipeline], hub=None):
        self.inner = inner
        self.pipelines = pipelines
        self.hub = hub  # ember.responses.mcp.McpHub, or None
        self.routing = None
        self.call = None
        self.embedding_model = EMBEDDING_MODEL
        self._routers: dict[str, object] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def attach(self, routing, call, extra_models: list[str], embedding_model: str | None) -> None:
        """Wire the steps to the server; SpecError for a step whose model, MCP server or router the server
        does not have. `extra_models`: names served once the server is up (the --lora adapters)."""
        self.routing, self.call = routing, call
        if embedding_model is not None:
            self.embedding_model = embedding_model
        names = [n for n in [*routing.known(None), *extra_models] if n not in self.pipelines]
        for name, pipeline in self.pipelines.items():
            if name in names:
                raise SpecError(f"pipeline '{name}' has the name of a model this server serves", field="name")

            def known(model: str) -> bool:
                return model in extra_models or (
                    model not in self.pipelines and routing.target(model, None) is not None
                )

            check_models(pipeline, known, names)
            labels = self.hub.labels() if self.hub is not None else []
            for s in pipeline.steps:
                if s.kind == "tool" and s.mcp is not None and s.mcp.split("/")[0] not in labels:
                    raise SpecError(
                        f"no --mcp server '{s.mcp.split('/')[0]}' (servers: {', '.join(labels) or 'none'})",
                        s.name,
                        "mcp",
                    )
                if s.kind == "route" and s.by == "learned":
                    router = self.router(s.path, s.name)
                    unknown = set(s.routes) - set(router.candidates)
                    if unknown:
                        raise SpecError(
                            f"{', '.join(sorted(unknown))}: not candidates of the router "
                            f"({', '.join(router.candidates)})",
                            s.name,
                            "routes",
                        )

    def router(self, path: str, step: str = "route"):
        """The learned router at `path` (ember.router), loaded once."""
        if path not in self._routers:
            try:
                from ember.router import LearnedRouter
            except ImportError:
                raise SpecError(
                    "learned routers need ember.router, which is not installed", step, "path"
                ) from None
            try:
                self._routers[path] = LearnedRouter.load(path)
            except (OSError, ValueError) as exc:
                raise SpecError(f"cannot load the router {path}: {exc}", step, "path") from None
        return self._routers[path]

    # -- the backend ----------------------------------------------------------------------------------

    def model_cards(self, tenant: str | None = None) -> list[dict]:
        cards = self.inner.model_cards(tenant)
        for name, p in sorted(self.pipelines.items()):
            steps = [{"name": s.name, "kind": s.kind} for s in p.steps]
            card = {"id": name, "object": "model", "created": self.inner.created, "owned_by": "ember"}
            cards.append(
                {**card, "pipeline": {"output": p.output, "steps": steps, "description": p.description}}
            )
        return cards

    def resolve(self, model: str, tenant: str | None = None) -> str | None | bool:
        """A pipeline runs on no adapter of its own: None (chat() knows it by the request's model)."""
        return None if model in self.pipelines else self.inner.resolve(model, tenant)

    def known(self, tenant: str | None = None) -> list[str]:
        return [*self.inner.known(tenant), *sorted(self.pipelines)]

    async def complete(self, body, target, ctx: RequestContext):
        if body.model in self.pipelines:
            raise InvalidRequest(
                f"'{body.model}' is a pipeline: call it with /v1/chat/completions or /v1/responses",
                param="model",
            )
        return await self.inner.complete(body, target, ctx)

    async def chat(self, body: ChatCompletionRequest, target, ctx: RequestContext) -> dict | Stream:
        pipeline = self.pipelines.get(body.model)
        if pipeline is None:
            return await self.inner.chat(body, target, ctx)
        for field in ("tools", "response_format", "logprobs"):
            if getattr(body, field, None):
                raise InvalidRequest(f"pipeline '{body.model}' does not take '{field}'", param=field)
        if (body.n or 1) > 1:
            raise InvalidRequest(f"pipeline '{body.model}' answers one choice (n=1)", param="n")
        started = time.monotonic()
        run = PipelineRun(pipeline, _Services(self, ctx), _input(body), ctx.tenant)
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        out = pipeline.step(pipeline.output)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream and out.kind == "generate" and self.local(out.model, ctx.tenant):
            entry = {"step": out.name, "kind": out.kind, "model": out.model}
            ns = await run.namespace(list(out.templates().values()), entry)
            request = run.body(out, ns, out.response_format)
            try:
                stream = await asyncio.wait_for(run.services.chat(request, stream=True), out.timeout_s)
            except TimeoutError:
                raise StepFailed(out.name, f"no answer within {out.timeout_s:g} s (timeout_s)", 504) from None
            except InvalidRequest as exc:
                raise StepFailed(out.name, str(exc), 400) from None
            chunks = self._relay(run, stream, entry, rid, created, body.model, include_usage)
            return Stream(chunks, stream.close)
        value = await run.value(pipeline.output)
        text = value if isinstance(value, str) else json.dumps(value)
        first = time.monotonic()
        if body.stream:
            return Stream(self._whole(run, text, rid, created, body.model, include_usage), lambda: None)
        answer = {
            **fmt.envelope(rid, created, body.model, "chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None, "tool_calls": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _total(run.trace),
            "pipeline": _trace(run),
        }
        if body.perf_metrics_in_response:
            answer["perf_metrics"] = _perf(run.trace, started, first)
        return answer

    def local(self, model: str, tenant: str | None) -> bool:
        """Whether `model` runs on ember's engine for `tenant` (not a --provider's)."""
        route = self.routing.resolve(model, tenant)
        return route is not None and route.local

    async def _relay(
        self, run: PipelineRun, stream: Stream, entry: dict, rid, created, model: str, include_usage: bool
    ) -> AsyncIterator[dict]:
        """The output step's chunks under the pipeline's id and name; then the trace, then the usage."""
        began = time.monotonic()
        try:
            async for chunk in stream.chunks:
                if not chunk.get("choices") and chunk.get("usage") is not None:
                    count(entry, chunk["usage"])  # the step's usage chunk: the pipeline sends its own
                    continue
                yield {**chunk, "id": rid, "created": created, "model": model}
        except BaseException:
            entry["status"] = "failed"
            raise
        finally:
            entry.setdefault("status", "ok")
            entry["duration_ms"] = round((time.monotonic() - began) * 1000, 1)
        for chunk in self._tail(run, rid, created, model, include_usage):
            yield chunk

    async def _whole(self, run: PipelineRun, text: str, rid, created, model: str, include_usage: bool):
        base = fmt.envelope(rid, created, model, "chat.completion.chunk")
        delta = {"role": "assistant", "content": text}
        yield {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
        yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}
        for chunk in self._tail(run, rid, created, model, include_usage):
            yield chunk

    def _tail(self, run: PipelineRun, rid, created, model: str, include_usage: bool) -> list[dict]:
        base = fmt.envelope(rid, created, model, "chat.completion.chunk")
        tail = [{**base, "choices": [], "pipeline": _trace(run)}]
        if include_usage:
            tail.append({**base, "choices": [], "usage": _total(run.trace)})
        return tail


class _Services:
    """What one run's steps call, under the request's tenant, cache namespace and priority."""

    def __init__(self, backend: PipelineBackend, ctx: RequestContext):
        self.backend, self.ctx = backend, ctx
        self.call = backend.call

    async def chat(self, body: dict, stream: bool = False) -> dict | Stream:
        if stream:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        req = ChatCompletionRequest.model_validate(body)
        routing = self.backend.routing
        route = routing.resolve(req.model, self.ctx.tenant)
        if route is None:
            raise InvalidRequest(f"model '{req.model}' is not served (any more)", param="model")
        ctx = RequestContext(self.ctx.cache_salt, self.ctx.disconnected, self.ctx.priority, self.ctx.tenant)
        answer = await routing.chat(req, route, ctx)
        if not stream and not isinstance(answer, dict):
            raise TypeError(f"model '{req.model}' answered a stream to a request without one")
        return answer

    async def embed(self, model: str | None, texts: list[str]) -> list[list[float]]:
        name = model or self.backend.embedding_model
        body = {"model": name, "input": texts, "encoding_format": "float"}
        priority = max(self.ctx.priority, INTERACTIVE_PRIORITY)
        result = await self.call("/v1/embeddings", body, self.ctx.tenant, priority)
        if not result.ok:
            message = (result.body.get("error") or {}).get("message", result.body)
            raise RuntimeError(f"the embeddings model '{name}' answered {result.status}: {message}")
        return [d["embedding"] for d in sorted(result.body["data"], key=lambda d: d["index"])]

    async def tool(self, label: str, name: str, arguments: dict, timeout_s: float):
        hub = self.backend.hub
        return await asyncio.wait_for(
            hub.call(label, name, arguments, timeout_s=timeout_s), timeout_s + HUB_GRACE_S
        )

    def router(self, path: str):
        return self.backend.router(path)

    def local(self, model: str) -> bool:
        return self.backend.local(model, self.ctx.tenant)


def _input(body: ChatCompletionRequest) -> str:
    """The pipeline's `input`: the last user message's text."""
    for m in reversed(body.messages):
        if m.role == "user":
            return m.text() or ""
    raise InvalidRequest(
        "a pipeline needs a user message: its text is the pipeline's input", param="messages"
    )


def _trace(run: PipelineRun) -> dict:
    steps = list(run.trace)
    total = round((time.monotonic() - run.started) * 1000, 1)
    return {"name": run.pipeline.name, "output": run.pipeline.output, "duration_ms": total, "steps": steps}


def _total(trace: list[dict]) -> dict:
    prompt = sum(e.get("prompt_tokens", 0) for e in trace)
    completion = sum(e.get("completion_tokens", 0) for e in trace)
    cached = sum(e.get("cached_tokens", 0) for e in trace)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _perf(trace: list[dict], started: float, first: float) -> dict:
    """Fireworks' perf_metrics of the whole pipeline (its answer is out at once: the first token is the last)."""
    u = _total(trace)
    return {
        "prompt-tokens": u["prompt_tokens"],
        "cached-prompt-tokens": u["prompt_tokens_details"]["cached_tokens"],
        "completion-tokens": u["completion_tokens"],
        "server-time-to-first-token": round(first - started, 6),
        "server-processing-time": round(first - started, 6),
        "tokens-per-second": None,
    }
