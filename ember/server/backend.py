"""What the OpenAI routes stand on: a small backend interface per kind of model, so the same routes can
serve ember's engine today and a pipeline or an external provider later.

A generation backend answers chat and completions requests with a body (a dict) or a `Stream` of chunk
bodies, and says which model names it serves; an embedding backend answers embeddings requests. The
routes own HTTP: auth, status codes, SSE framing, disconnects, drain.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ember.engine.client import EngineClient, EngineState
from ember.errors import InvalidRequest
from ember.outputs import RequestOutput
from ember.protocol import format as fmt
from ember.protocol import tools
from ember.protocol.requests import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from ember.protocol.text import check_text


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


@dataclass
class RequestContext:
    """What a backend may know of the HTTP request behind a call."""

    cache_salt: bytes | None  # the tenant's prefix-cache namespace
    disconnected: Callable[[], Awaitable[bool]]  # polled while the answer is computed


class Stream:
    """A streamed answer: chunk bodies as they come; `close()` stops the work behind it (called once the
    response is over, however it ended)."""

    def __init__(self, chunks: AsyncIterator[dict], close: Callable[[], None]):
        self.chunks = chunks
        self.close = close


class GenerationBackend(Protocol):
    def model_cards(self) -> list[dict]: ...

    def resolve(self, model: str) -> str | None | bool:
        """None: the base model; an adapter's name; False: not a model this backend serves."""
        ...

    async def chat(
        self, body: ChatCompletionRequest, target: str | None, ctx: RequestContext
    ) -> dict | Stream: ...

    async def complete(
        self, body: CompletionRequest, target: str | None, ctx: RequestContext
    ) -> dict | Stream: ...


class EngineBackend:
    """ember's own engine behind the routes, through an EngineClient: the base model and its adapters."""

    def __init__(self, engine: EngineClient, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.created = int(time.time())

    # -- models -------------------------------------------------------------------------------------

    def card(self, name: str, path: str | None = None) -> dict:
        """As vLLM lists LoRA modules: an adapter is a model whose parent is the base. Where it lives on
        the server is for the admin's listing only."""
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "ember"}
        if name != self.model_name:
            card["parent"] = self.model_name
        return card if path is None else {**card, "path": path}

    def model_cards(self) -> list[dict]:
        return [self.card(self.model_name)] + [self.card(n) for n in sorted(self.engine.adapters)]

    def resolve(self, model: str) -> str | None | bool:
        """Adapters answer to their own name or to BASE:NAME (adapter names have no ':'; a base's may)."""
        if model == self.model_name:
            return None
        if model in self.engine.adapters:
            return model
        base, sep, rest = model.rpartition(":")
        if sep and base == self.model_name and rest in self.engine.adapters:
            return rest
        return False

    def known(self) -> list[str]:
        return [self.model_name, *sorted(self.engine.adapters)]

    @property
    def state(self) -> EngineState:
        return self.engine.state

    # -- generation ---------------------------------------------------------------------------------

    async def chat(
        self, body: ChatCompletionRequest, target: str | None, ctx: RequestContext
    ) -> dict | Stream:
        check_text(body)
        body.check_supported()
        tokenizer = self.engine.tokenizer
        messages, tool_defs = tools.render(body, tokenizer.hf.chat_template)
        # Templates render off the event loop: a long history takes a while.
        prompt_ids = await asyncio.to_thread(tokenizer.apply_chat_template, messages, True, tool_defs)
        top = body.requested_logprobs()
        params = body.sampling_params(None, top)
        params.structured = tools.constraint(body)
        return await self._respond(body, [prompt_ids], params, True, top, target, ctx, body.tool_mode())

    async def complete(
        self, body: CompletionRequest, target: str | None, ctx: RequestContext
    ) -> dict | Stream:
        check_text(body)
        body.check_supported()
        params = body.sampling_params(16, body.logprobs)
        return await self._respond(body, body.prompts(), params, False, body.logprobs, target, ctx)

    async def _respond(
        self,
        body,
        prompts: list,
        params,
        chat: bool,
        top: int | None,
        lora: str | None,
        ctx: RequestContext,
        tool_mode: str | None = None,
    ) -> dict | Stream:
        engine = self.engine
        total = len(prompts) * params.n
        limit = getattr(engine, "max_pending", None)
        if limit is not None and total > limit:
            what = f"{len(prompts)} prompts x n={params.n}" if len(prompts) > 1 else f"n={params.n}"
            raise InvalidRequest(
                f"{what} is {total} sequences, more than this server admits at once ({limit})",
                param="n" if len(prompts) == 1 else "prompt",
            )
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        ids = [rid if len(prompts) == 1 else f"{rid}-{i}" for i in range(len(prompts))]
        cache_cap = body.prompt_cache_max_len
        streams = [
            engine.generate(
                p, params, request_id=i, cache_salt=ctx.cache_salt, max_cached_tokens=cache_cap, lora=lora
            )
            for p, i in zip(prompts, ids, strict=True)
        ]

        def abort_all() -> None:
            for i in ids:
                engine.abort(i)

        try:
            # The first output of each prompt before answering: a refused request gets a plain 4xx, not a
            # broken stream.
            firsts = await _unless_disconnected(ctx, _firsts(streams))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        logprobs = fmt.LogprobFormatter(engine.tokenizer, top) if top is not None else None
        obj = "chat.completion" if chat else "text_completion"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            base = fmt.envelope(rid, created, body.model, obj + ".chunk" if chat else obj)
            maker = fmt.ChunkMaker(base, chat, params.n, logprobs, include_usage, tool_mode)
            return Stream(_chunks(firsts, streams, maker), abort_all)
        try:
            outs = await _unless_disconnected(
                ctx, asyncio.gather(*(_last(f, s) for f, s in zip(firsts, streams, strict=True)))
            )
        except ClientGone:
            abort_all()
            raise
        if chat:
            choices = [fmt.chat_choice(c, c.index, logprobs, tool_mode) for c in outs[0].outputs]
        else:
            choices = [
                fmt.completion_choice(c, i * params.n + c.index, logprobs)
                for i, o in enumerate(outs)
                for c in o.outputs
            ]
        return {**fmt.envelope(rid, created, body.model, obj), "choices": choices, "usage": fmt.usage(outs)}


class EmbeddingBackend:
    """An embedding model (ember.embeddings.EmbeddingModel) behind /v1/embeddings."""

    def __init__(self, model):
        self.model = model
        self.name = model.name

    def model_cards(self, created: int) -> list[dict]:
        return [{"id": self.name, "object": "model", "created": created, "owned_by": "ember"}]

    async def embed(self, body: EmbeddingRequest) -> dict:
        check_text(body)
        model = self.model
        if body.dimensions is not None and body.dimensions != model.dim:
            raise InvalidRequest(
                f"dimensions must be {model.dim} for {model.name} (got {body.dimensions})", param="dimensions"
            )
        vectors, n_tokens = await asyncio.to_thread(self._embed, body.inputs())
        data = []
        for i, v in enumerate(vectors):
            if body.encoding_format == "base64":
                value: object = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
            else:
                value = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        usage = {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
        return {"object": "list", "data": data, "model": model.name, "usage": usage}

    def _embed(self, items: list[str | list[int]]):
        model = self.model
        texts = [i for i, x in enumerate(items) if isinstance(x, str)]
        ids: list[list[int]] = list(items)  # type: ignore[arg-type]
        for i, tokens in zip(texts, model.tokenize([items[i] for i in texts]), strict=True):
            ids[i] = tokens
        for i, tokens in enumerate(ids):
            if len(tokens) > model.max_input_tokens:
                raise InvalidRequest(
                    f"input[{i}] has {len(tokens)} tokens; {model.name} reads at most {model.max_input_tokens}",
                    param="input",
                    code="context_length_exceeded",
                )
        return model.embed(ids), sum(map(len, ids))


# -- streams ----------------------------------------------------------------------------------------


async def _unless_disconnected(ctx: RequestContext, awaitable):
    """The awaitable's result; ClientGone once the client hung up (the awaitable is then cancelled).

    The server does not cancel a handler whose client left, so it is watched for here.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await ctx.disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ClientGone
        return task.result()
    finally:
        if not task.done():  # this handler itself was cancelled
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _firsts(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    return [await anext(s) for s in streams]


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


async def _chunks(firsts: list[RequestOutput], streams: list, maker: fmt.ChunkMaker) -> AsyncIterator[dict]:
    last = list(firsts)
    async for i, out in _merge(firsts, streams):
        last[i] = out
        for chunk in maker.chunks(i, out):
            yield chunk
    if maker.include_usage:
        yield maker.usage_chunk(last)
