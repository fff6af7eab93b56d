"""The official OpenAI SDK against a real ember server on loopback, with the default model."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from ember import AsyncEngine, CacheConfig, EngineConfig
from ember.server.app import create_app

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server(default_model_dir):
    engine = AsyncEngine(
        EngineConfig(model=str(default_model_dir), cache=CacheConfig(kv_cache_memory="256MiB"))
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, MODEL), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield url, engine
    server.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_chat_completion(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=20,
    )
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0


def test_streaming_chat_matches_non_streaming(client):
    kwargs = dict(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], temperature=0, max_tokens=24
    )
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason in ("stop", "length")


def test_text_completion_and_models(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.choices[0].text
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_bad_input_is_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=5
        )
    assert "temperature" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert r.choices  # still serving


def test_streaming_n_samples_each_finish_once(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Say something."}],
            n=3,
            temperature=1.0,
            max_tokens=12,
            seed=3,
            stream=True,
        )
    )
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2]


def test_unsupported_fields_are_refused_not_ignored(client):
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_object"}
        )


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_hangs_up_frees_its_request(server, stream):
    url, engine = server
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:  # read a few chunks, then hang up
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10.0) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 4:
                    break
    else:  # give up waiting for the whole answer
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=1.0)
    for _ in range(100):
        if not engine.engine.has_unfinished_requests():
            break
        time.sleep(0.05)
    assert not engine.engine.has_unfinished_requests()
