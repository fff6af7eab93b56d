"""The OpenAI-compatible HTTP API: a thin adapter over AsyncEngine.

This is the first cut (chat and text completions, streaming, models, health); the full surface
(embeddings, logprobs, metrics, auth, admission control) is built on this module.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from ember.engine.async_engine import AsyncEngine, EngineDeadError
from ember.errors import InvalidRequest
from ember.outputs import RequestOutput
from ember.server.protocol import ChatCompletionRequest, CompletionRequest

SYSTEM_FINGERPRINT = "ember-0.1"


def _error(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def create_app(engine: AsyncEngine, model_name: str) -> FastAPI:
    app = FastAPI(title="ember", version="0.1.0")
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        return _error(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}", param=".".join(loc) or None)

    @app.exception_handler(InvalidRequest)
    async def _invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
        return _error(400, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(jinja2.TemplateError)
    async def _template(_: Request, exc: jinja2.TemplateError) -> JSONResponse:
        return _error(400, f"the model's chat template refused these messages: {exc}", param="messages")

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        response = _error(503, str(exc), kind="server_error")
        response.headers["Retry-After"] = "5"
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.is_running:
            return JSONResponse({"status": "ok"})
        return _error(503, "the engine has stopped", kind="server_error")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "ember"}
        return {"object": "list", "data": [card]}

    def _check_model(name: str) -> JSONResponse | None:
        if name != model_name:
            return _error(
                404,
                f"model '{name}' does not exist; available: {model_name}",
                param="model",
                code="model_not_found",
            )
        return None

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        if (err := _check_model(body.model)) is not None:
            return err
        body.check_supported()
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        # Templates are rendered off the event loop: a long history takes a while.
        prompt_ids = await asyncio.to_thread(engine.tokenizer.apply_chat_template, messages)
        params = body.sampling_params(None)
        return await _respond(engine, request, body, prompt_ids, params, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if (err := _check_model(body.model)) is not None:
            return err
        body.check_supported()
        params = body.sampling_params(16)
        return await _respond(engine, request, body, body.prompt, params, chat=False)

    return app


async def _respond(engine: AsyncEngine, http: Request, body, prompt, params, chat: bool):
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    stream = engine.generate(prompt, params, request_id=rid)
    # Pull the first output before answering, so a refused request gets a plain 400, not a broken stream.
    first = await anext(stream)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(first, stream, rid, created, body.model, chat, include_usage),
            media_type="text/event-stream",
            # Runs once the response is over, however it ended: a client that left aborts its request.
            background=BackgroundTask(engine.abort, rid),
        )
    collect = asyncio.ensure_future(_last(first, stream))
    while not collect.done():
        # The server does not cancel a handler whose client hung up: watch for it, and abort.
        await asyncio.wait({collect}, timeout=0.5)
        if not collect.done() and await http.is_disconnected():
            collect.cancel()
            engine.abort(rid)
            return JSONResponse({}, status_code=499)
    return _full_response(collect.result(), rid, created, body.model, chat)


async def _last(first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = first
    try:
        async for out in stream:
            last = out
    finally:
        await stream.aclose()
    return last


def _usage(out: RequestOutput) -> dict:
    completion = sum(len(c.token_ids) for c in out.outputs)
    prompt = len(out.prompt_token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
    }


def _full_response(out: RequestOutput, rid: str, created: int, model: str, chat: bool) -> dict:
    choices = []
    for c in out.outputs:
        if chat:
            choices.append(
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
            )
        else:
            choices.append(
                {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            )
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": _usage(out),
    }


async def _sse(
    first: RequestOutput,
    rest: AsyncIterator[RequestOutput],
    rid: str,
    created: int,
    model: str,
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    base = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    started: set[int] = set()
    done: set[int] = set()  # samples whose last chunk went out

    def chunks(out: RequestOutput):
        for c in out.outputs:
            if c.index in done or (not c.delta_text and not c.finish_reason and c.index in started):
                continue
            if c.finish_reason:
                done.add(c.index)
            if chat:
                delta = {"content": c.delta_text}
                if c.index not in started:
                    delta = {"role": "assistant", **delta}
                choice = {
                    "index": c.index,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
            else:
                choice = {
                    "index": c.index,
                    "text": c.delta_text,
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
            started.add(c.index)
            yield "data: " + json.dumps({**base, "choices": [choice]}) + "\n\n"

    last = first
    try:
        for line in chunks(first):
            yield line
        async for out in rest:
            last = out
            for line in chunks(out):
                yield line
        if include_usage:
            yield "data: " + json.dumps({**base, "choices": [], "usage": _usage(last)}) + "\n\n"
    except Exception as exc:  # the stream has begun: report in-band, then close
        yield (
            "data: "
            + json.dumps(
                {"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}}
            )
            + "\n\n"
        )
    finally:
        await rest.aclose()
    yield "data: [DONE]\n\n"
