"""The gateway over upstreams in this process (ember servers over a fake engine, and a scripted one that
fails on demand): provider models by name, streams passed through byte for byte, ember's own fields
refused for a non-ember upstream, retries, fallbacks and the cool-down."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from ember.config import ServerConfig
from ember.engine.async_engine import EngineOverloadedError
from ember.gateway.providers import RawStream
from ember.server.app import ServerState, create_app
from tests.gateway.upstream import MODEL, PIECES, NamedEngine
from tests.server.fakes import serving

LOCAL = "local-model"
DELAY = 0.15  # between an upstream's streamed chunks


class Recorder:
    """ASGI middleware: the response bytes the wrapped app sent, per request, in order."""

    def __init__(self, app):
        self.app = app
        self.sent: list[bytes] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body = bytearray()
        self.sent.append(b"")

        async def record(message):
            if message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                self.sent[-1] = bytes(body)
            await send(message)

        await self.app(scope, receive, record)


def scripted() -> tuple[FastAPI, dict]:
    """An upstream whose answer is its model's name: 'e500' a 500, 'long' a context-length 400, 'busy'
    a 429, 'junk' a 200 that is not JSON; hits counts the calls per model."""
    app = FastAPI()
    hits: dict[str, int] = {}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        model = (await request.json())["model"]
        hits[model] = hits.get(model, 0) + 1
        if model == "long":
            error = {
                "message": "too long",
                "type": "invalid_request_error",
                "code": "context_length_exceeded",
            }
            return JSONResponse({"error": error}, status_code=400)
        if model == "junk":
            return PlainTextResponse("<html>a proxy's page</html>")
        status = {"e500": 500, "busy": 429}[model]
        return JSONResponse({"error": {"message": model, "type": "server_error"}}, status_code=status)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        hits["embeddings"] = body
        vector = {"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}
        usage = {"prompt_tokens": 1, "total_tokens": 1}
        return {"object": "list", "data": [vector], "model": body["model"], "usage": usage}

    return app, hits


@pytest.fixture(scope="module")
def upstream():
    """(url, engine, recorder) of an ember upstream serving MODEL."""
    engine = NamedEngine("up", DELAY)
    recorder = Recorder(create_app(engine, MODEL, ServerState()))
    with serving(recorder, ServerConfig(port=0, embedding_model=None)) as (host, port):
        yield f"http://{host}:{port}/v1", engine, recorder


@pytest.fixture(scope="module")
def failing():
    app, hits = scripted()
    with serving(app, ServerConfig(port=0, embedding_model=None)) as (host, port):
        yield f"http://{host}:{port}/v1", hits


@pytest.fixture(scope="module")
def gateway(upstream, failing):
    """(url, local engine, app) of the gateway: 'up' and 'em' (kind=ember) over the ember upstream, 'bad'
    and 'long' over the failing one, each falling back to the local model."""
    url, _, _ = upstream
    bad, _ = failing
    options = ServerConfig(
        port=0,
        embedding_model=None,
        providers=[
            f"up={url}",
            f"em={url},kind=ember",
            f"bad={bad}",
            f"long={bad}",
            f"busy={bad}",
            f"junk={bad}",
            f"vec={bad}",
            "gone=http://127.0.0.1:9/v1",
        ],
        fallbacks={
            "bad/e500": [LOCAL],
            "long/long": [LOCAL],
            "busy/busy": [LOCAL],
            "junk/junk": [LOCAL],
            LOCAL: [f"up/{MODEL}"],
        },
        provider_retries=2,
        provider_failures=3,
        provider_cooldown=60.0,
    )
    engine = NamedEngine("local")
    app = create_app(engine, LOCAL, ServerState(), options)
    with serving(app, options) as (host, port):
        yield f"http://{host}:{port}", engine, app


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def ask(client: openai.OpenAI, model: str, **kw) -> str:
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], **kw)
    return answer.choices[0].message.content


def test_provider_models_are_listed_and_served(gateway):
    url, _, _ = gateway
    client = sdk(url)
    ids = [m.id for m in client.models.list()]
    assert LOCAL in ids and f"up/{MODEL}" in ids and f"em/{MODEL}" in ids
    assert ask(client, f"up/{MODEL}") == "from up ok"
    assert ask(client, LOCAL) == "from local ok"
    done = client.completions.create(model=f"up/{MODEL}", prompt="hi", max_tokens=4)
    assert done.choices[0].text == "from up ok"


def test_stream_passes_through_byte_for_byte(gateway, upstream):
    url, _, _ = gateway
    _, _, recorder = upstream
    body = {"model": f"up/{MODEL}", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    got, arrivals = b"", []
    started = time.monotonic()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for chunk in response.iter_raw():
            got += chunk
            arrivals.append(time.monotonic() - started)
    assert got == recorder.sent[-1]  # exactly what the upstream sent
    assert got.endswith(b"data: [DONE]\n\n")
    # Chunk by chunk as the upstream made them (DELAY apart), not gathered first.
    assert len(arrivals) >= 2 and arrivals[-1] - arrivals[0] >= (PIECES - 1) * DELAY * 0.8
    text = "".join(
        (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
        for line in got.decode().splitlines()
        if line.startswith("data: {")
    )
    assert text == "from up ok"


def test_ember_fields_refused_for_a_non_ember_upstream(gateway, upstream):
    url, _, _ = gateway
    _, engine, _ = upstream
    client = sdk(url)
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, f"up/{MODEL}", extra_body={"top_k": 5})
    assert refused.value.body["param"] == "top_k" and "ember" in refused.value.body["message"]
    # A default spelled out changes nothing, and is not refused.
    assert ask(client, f"up/{MODEL}", extra_body={"top_k": -1}) == "from up ok"
    # An ember upstream takes them, and gets them.
    assert ask(client, f"em/{MODEL}", extra_body={"top_k": 5, "priority": 3}) == "from up ok"
    assert engine.params[-1].top_k == 5 and engine.params[-1].priority == 3


def test_upstream_client_errors_are_its_answer(gateway):
    url, _, _ = gateway
    with pytest.raises(openai.NotFoundError) as missing:
        ask(sdk(url), "up/no-such-model")
    assert "no-such-model" in missing.value.body["message"]  # the upstream's own words


def test_unknown_provider_is_a_404(gateway):
    url, _, _ = gateway
    with pytest.raises(openai.NotFoundError) as missing:
        ask(sdk(url), "nobody/x")
    assert "up/..." in missing.value.body["message"]


def test_5xx_retries_then_falls_back_then_cools_down(gateway, failing):
    url, _, app = gateway
    _, hits = failing
    client = sdk(url)
    assert ask(client, "bad/e500") == "from local ok"  # no client-visible error
    assert hits["e500"] == 3  # the call and its 2 retries
    assert app.state.routing.providers["bad"].breaker.state == "open"
    for _ in range(3):
        assert ask(client, "bad/e500") == "from local ok"
    assert hits["e500"] == 3  # cooling down: not called again
    metrics = httpx.get(url + "/metrics").text
    assert (
        'ember:provider_calls_total{model_name="local-model",outcome="error",provider="bad"} 3.0' in metrics
    )
    assert 'outcome="cooling",provider="bad"} 3.0' in metrics


def test_context_length_moves_on_at_once(gateway, failing):
    url, _, _ = gateway
    _, hits = failing
    assert ask(sdk(url), "long/long") == "from local ok"
    assert hits["long"] == 1  # the same prompt would not fit again: no retry


def test_429_is_retried_then_falls_back(gateway, failing):
    url, _, _ = gateway
    _, hits = failing
    assert ask(sdk(url), "busy/busy") == "from local ok"
    assert hits["busy"] == 3


def test_a_200_that_is_not_json_is_a_failure(gateway, failing):
    url, _, _ = gateway
    _, hits = failing
    assert ask(sdk(url), "junk/junk") == "from local ok"
    assert hits["junk"] == 3


def test_an_unreachable_provider_without_fallback_is_a_502(gateway):
    url, _, _ = gateway
    with pytest.raises(openai.APIStatusError) as failed:
        ask(sdk(url), "gone/x")
    assert failed.value.status_code == 502 and "'gone' cannot be reached" in failed.value.body["message"]


def test_embeddings_through_a_provider(gateway, failing):
    url, _, _ = gateway
    _, hits = failing
    done = sdk(url).embeddings.create(model="vec/v", input="hi", encoding_format="float")
    assert done.data[0].embedding == [0.5, 0.25]
    assert hits["embeddings"] == {"model": "v", "input": "hi", "encoding_format": "float"}


def test_local_falls_back_to_a_provider(gateway):
    url, engine, _ = gateway
    engine.fail = EngineOverloadedError("the queue is full")
    try:
        assert ask(sdk(url), LOCAL) == "from up ok"
        streamed = sdk(url).chat.completions.create(
            model=LOCAL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "from up ok"
    finally:
        engine.fail = None


def test_no_fallback_keeps_the_local_error():
    """Without fallbacks a local failure answers as it always did (a 429 here)."""
    engine = NamedEngine("alone")
    engine.fail = EngineOverloadedError("the queue is full")
    options = ServerConfig(port=0, embedding_model=None)
    app = create_app(engine, LOCAL, ServerState(), options)
    with serving(app, options) as (host, port), pytest.raises(openai.RateLimitError):
        ask(sdk(f"http://{host}:{port}"), LOCAL)


def test_a_passed_through_stream_keeps_its_usage_for_metering():
    """The bytes go on as they came, split anywhere; the usage chunk is read on the way."""
    events = b'data: {"choices":[{"delta":{"content":"hi"}}]}\r\n\r\ndata: {"choices":[],"usage":'
    events += b'{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\ndata: [DONE]\n\n'
    pieces = [events[i : i + 7] for i in range(7, len(events), 7)]

    async def upstream():
        for piece in pieces:
            yield piece

    async def passed() -> tuple[bytes, RawStream]:
        stream = RawStream("up", events[:7], upstream(), lambda: None)
        return b"".join([chunk async for chunk in stream.body]), stream

    got, stream = asyncio.run(passed())
    assert got == events
    assert stream.usage == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
