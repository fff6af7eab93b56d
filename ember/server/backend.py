"""What the OpenAI routes stand on: a small backend interface per kind of model, so the same routes can
serve ember's engine today and a pipeline or an external provider later.

A generation backend answers chat and completions requests with a body (a dict) or a `Stream` of chunk
bodies, and says which model names it serves; an embedding backend answers embeddings requests. The
routes own HTTP: auth, status codes, SSE framing, disconnects, drain.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ember.engine.async_engine import EngineNotReadyError
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
    priority: int = (
        0  # the engine serves lower numbers first (ember.server.platform: interactive 0, batch 10)
    )
    tenant: str | None = None  # the caller's owner id (ServerState.tenant); None: an open server


@dataclass(frozen=True)
class AliasTarget:
    """What a deployment alias serves now (ember.server.aliases_api keeps them): the base model
    (`adapter` None) or the adapter the engine serves under `adapter`. `unavailable` says why it cannot be
    served at the moment (its adapter is still loading after a restart, or failed to load)."""

    version: int
    adapter: str | None
    card: dict  # what /v1/models shows of it under "alias"
    unavailable: str | None = None


class Stream:
    """A streamed answer: chunk bodies as they come; `close()` stops the work behind it (called once the
    response is over, however it ended)."""

    def __init__(self, chunks: AsyncIterator[dict], close: Callable[[], None]):
        self.chunks = chunks
        self.close = close


class GenerationBackend(Protocol):
    def model_cards(self, tenant: str | None = None) -> list[dict]: ...

    def resolve(self, model: str, tenant: str | None = None) -> str | None | bool:
        """None: the base model; an adapter's name; False: not a model this backend serves to `tenant`
        (the caller's owner id: ServerState.tenant)."""
        ...

    async def chat(
        self, body: ChatCompletionRequest, target: str | None, ctx: RequestContext
    ) -> dict | Stream: ...

    async def complete(
        self, body: CompletionRequest, target: str | None, ctx: RequestContext
    ) -> dict | Stream: ...


class EngineBackend:
    """ember's own engine behind the routes, through an EngineClient: the base model and its adapters.

    Adapters are global (every key may use them) unless `owners` names an owner id for one: then only
    requests of that tenant see it, in /v1/models and at request time; to any other it does not exist.

    Deployment aliases (`aliases`, alias name -> AliasTarget) are global too. A request names one as its
    model and is resolved once, at admission, to the adapter the alias serves then: repointing swaps the
    entry, and a request already admitted finishes on the adapter it started with. The adapters loaded
    for aliases (`alias_adapters`, adapter name -> alias) are not listed as models of their own.
    """

    def __init__(self, engine: EngineClient, model_name: str, owners: dict[str, str] | None = None):
        self.engine = engine
        self.model_name = model_name
        self.owners = owners if owners is not None else {}  # adapter name -> owner id; absent: global
        self.aliases: dict[str, AliasTarget] = {}
        self.alias_adapters: dict[str, str] = {}
        self.created = int(time.time())

    # -- models -------------------------------------------------------------------------------------

    def card(self, name: str, path: str | None = None) -> dict:
        """As vLLM lists LoRA modules: an adapter is a model whose parent is the base. Where it lives on
        the server is for the admin's listing only."""
        info = getattr(self.engine, "info", None)  # None while the model loads
        card = {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "ember",
            "max_model_len": info.max_model_len if info is not None else None,
        }
        if name != self.model_name:
            card["parent"] = self.model_name
        return card if path is None else {**card, "path": path}

    def model_cards(self, tenant: str | None = None) -> list[dict]:
        cards = [self.card(n) for n in self.known(tenant) if n not in self.aliases]
        return cards + [{**self.card(n), "alias": a.card} for n, a in sorted(self.aliases.items())]

    def visible(self, adapter: str, tenant: str | None) -> bool:
        """Whether `tenant` may use this loaded adapter: a global one, or its own."""
        owner = self.owners.get(adapter)
        return adapter in self.engine.adapters and (owner is None or owner == tenant)

    def resolve(self, model: str, tenant: str | None = None) -> str | None | bool:
        """Adapters answer to their own name or to BASE:NAME (adapter names have no ':'; a base's may); an
        alias to what it serves now."""
        if model == self.model_name:
            return None
        alias = self.aliases.get(model)
        if alias is not None:
            if alias.unavailable is not None:
                raise EngineNotReadyError(f"alias '{model}' (version {alias.version}): {alias.unavailable}")
            return alias.adapter
        if self.visible(model, tenant):
            return model
        base, sep, rest = model.rpartition(":")
        if sep and base == self.model_name and self.visible(rest, tenant):
            return rest
        return False

    def known(self, tenant: str | None = None) -> list[str]:
        adapters = (
            n
            for n in sorted(self.engine.adapters)
            if self.visible(n, tenant) and n not in self.alias_adapters
        )
        return [self.model_name, *adapters, *sorted(self.aliases)]

    @property
    def state(self) -> EngineState:
        return self.engine.state

    # -- generation ---------------------------------------------------------------------------------

    async def chat(
        self, body: ChatCompletionRequest, target: str | None, ctx: RequestContext
    ) -> dict | Stream:
        started = time.monotonic()
        if self.engine.inputs is not None:  # bound the text before the template and tokenizer read it all
            self.engine.inputs.check_text_length(_content_chars(body), param="messages")
        check_text(body)
        # Templates render off the event loop: a long history takes a while.
        prompt_ids = await asyncio.to_thread(tools.prompt_ids, body, self.engine.tokenizer)
        top = body.requested_logprobs()
        params = body.sampling_params(None, top)
        params.structured = tools.constraint(body)
        return await self._respond(
            body, [prompt_ids], params, True, top, target, ctx, started, body.tool_mode()
        )

    async def complete(
        self, body: CompletionRequest, target: str | None, ctx: RequestContext
    ) -> dict | Stream:
        started = time.monotonic()
        check_text(body)
        params = body.sampling_params(16, body.logprobs)
        return await self._respond(body, body.prompts(), params, False, body.logprobs, target, ctx, started)

    async def _respond(
        self,
        body,
        prompts: list,
        params,
        chat: bool,
        top: int | None,
        lora: str | None,
        ctx: RequestContext,
        started: float,
        tool_mode: str | None = None,
    ) -> dict | Stream:
        engine = self.engine
        if ctx.priority > params.priority:  # the route's (a batch) or the body's, whichever is lower
            params = dataclasses.replace(params, priority=ctx.priority)
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
        per_prompt = [params] * len(prompts)
        if body.context_length_exceeded_behavior == "truncate" and params.max_tokens is not None:
            prompts = [await self._ids(p) for p in prompts]
            per_prompt = [self._fitted(params, len(p)) for p in prompts]
        texts = None
        if body.echo or body.raw_output:
            texts = [p if isinstance(p, str) else self._text(p) for p in prompts]
        streams = [
            engine.generate(
                p,
                pp,
                request_id=i,
                cache_salt=ctx.cache_salt,
                max_cached_tokens=cache_cap,
                lora=lora,
                replayable=not body.stream,
            )
            for p, pp, i in zip(prompts, per_prompt, ids, strict=True)
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
        first_at = time.monotonic()  # each prompt's first output carries its first token

        def perf(outs: list[RequestOutput]) -> dict:
            return fmt.perf_metrics(outs, started, first_at, time.monotonic())

        logprobs = fmt.LogprobFormatter(engine.tokenizer, top) if top is not None else None
        obj = "chat.completion" if chat else "text_completion"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            base = fmt.envelope(rid, created, body.model, obj + ".chunk" if chat else obj)
            maker = fmt.ChunkMaker(
                base,
                chat,
                params.n,
                logprobs,
                include_usage,
                tool_mode,
                echo=texts if body.echo else None,
                raw=texts if body.raw_output else None,
            )
            return Stream(
                _chunks(firsts, streams, maker, perf if body.perf_metrics_in_response else None), abort_all
            )
        try:
            outs = await _unless_disconnected(
                ctx, asyncio.gather(*(_last(f, s) for f, s in zip(firsts, streams, strict=True)))
            )
        except ClientGone:
            abort_all()
            raise
        if chat:
            made = [
                (0, o, c, fmt.chat_choice(c, c.index, logprobs, tool_mode)) for o in outs for c in o.outputs
            ]
        else:
            made = [
                (i, o, c, fmt.completion_choice(c, i * params.n + c.index, logprobs))
                for i, o in enumerate(outs)
                for c in o.outputs
            ]
        for i, o, c, choice in made:
            if body.echo:
                if chat:
                    choice["message"]["content"] = texts[i] + (choice["message"]["content"] or "")
                else:
                    choice["text"] = texts[i] + choice["text"]
            if body.raw_output:
                choice["raw_output"] = fmt.raw_output(texts[i], o, c)
        answer = {
            **fmt.envelope(rid, created, body.model, obj),
            "choices": [choice for *_, choice in made],
            "usage": fmt.usage(outs),
        }
        if body.perf_metrics_in_response:
            answer["perf_metrics"] = perf(outs)
        return answer

    async def _ids(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids, as the engine would make them (strings tokenized off the event loop)."""
        if isinstance(prompt, str):
            return await asyncio.to_thread(self.engine.tokenizer.encode, prompt)
        return prompt

    def _text(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=False)

    def _fitted(self, params, prompt_len: int):
        """Fireworks' context_length_exceeded_behavior "truncate": max_tokens lowered to the room the
        context (and the KV pool) leaves after the prompt. A prompt that alone fills it is still refused."""
        info = getattr(self.engine, "info", None)
        if info is None:
            return params
        room = min(info.max_model_len, info.pool_tokens) - prompt_len
        if room < 1 or params.max_tokens <= room:
            return params
        return dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))


def _content_chars(body: ChatCompletionRequest) -> int:
    """Characters of message content: all of them reach the prompt (so this never over-counts it)."""
    total = 0
    for m in body.messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content:
            total += sum(len(p.text or "") for p in m.content)
    return total


class EmbeddingBackend:
    """An embedding model (ember.embeddings.EmbeddingModel) behind /v1/embeddings."""

    def __init__(self, model):
        self.model = model
        self.name = model.name

    def model_cards(self, created: int) -> list[dict]:
        card = {"id": self.name, "object": "model", "created": created, "owned_by": "ember"}
        return [{**card, "max_model_len": self.model.max_input_tokens}]

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


async def _chunks(
    firsts: list[RequestOutput],
    streams: list,
    maker: fmt.ChunkMaker,
    perf: Callable[[list[RequestOutput]], dict] | None = None,
) -> AsyncIterator[dict]:
    """The chunks of a stream; with `perf`, its perf_metrics ride on the last choice chunk (the one with
    the final finish_reason), as Fireworks sends them, so each chunk waits for the next."""
    last = list(firsts)
    held: dict | None = None
    async for i, out in _merge(firsts, streams):
        last[i] = out
        for chunk in maker.chunks(i, out):
            if perf is None:
                yield chunk
                continue
            if held is not None:
                yield held
            held = chunk
    if held is not None:
        held["perf_metrics"] = perf(last)
        yield held
    if maker.include_usage:
        yield maker.usage_chunk(last)
