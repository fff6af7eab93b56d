"""The official OpenAI SDK against a real ember server on loopback, with the default model."""

from __future__ import annotations

import asyncio
import base64
import math

import httpx
import numpy as np
import openai
import pytest

from ember import SamplingParams
from ember.server.app import ServerState
from tests.e2e.conftest import MODEL, default_server, running_server, small_engine, wait_idle

USER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", params=["thread", "process"])
def server(request, default_model_dir, embedder):
    """Every test here runs against both engine clients: the core on a thread and in a process."""
    with default_server(default_model_dir, embedder, request.param) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_chat_completion_matches_the_offline_engine(client, default_llm):
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=20)
    want = default_llm.chat(USER, SamplingParams(temperature=0, max_tokens=20))[0]
    assert r.choices[0].message.content == want.outputs[0].text
    assert "Paris" in r.choices[0].message.content
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.system_fingerprint
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_streaming_chat_matches_non_streaming(client):
    kwargs = dict(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], temperature=0, max_tokens=24
    )
    full = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and not any(finishes[:-1])


def test_completions_prompt_forms(client, default_llm):
    params = SamplingParams(temperature=0, max_tokens=6)
    prompt = "The capital of France is"
    ids = default_llm.tokenizer.encode(prompt)
    want = default_llm.generate(prompt, params)[0].outputs[0].text
    for p in (prompt, ids):
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
        assert r.choices[0].text == want
    r = client.completions.create(model=MODEL, prompt=[prompt, "Hello"], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == want
    r2 = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in r2.choices] == [want, want]
    assert [m.id for m in client.models.list().data] == [MODEL, "all-minilm-l6-v2"]


def test_stop_and_max_completion_tokens(client):
    base = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_completion_tokens=20)
    text = base.choices[0].message.content
    assert base.usage.completion_tokens <= 20
    stop = text.split()[2]  # a word known to come
    r = client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, max_tokens=20, stop=[stop, "zzz"]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(stop)]
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_seed_reproduces_and_n_samples(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16)
    a = client.chat.completions.create(**kwargs, temperature=1.0, seed=123, n=3)
    b = client.chat.completions.create(**kwargs, temperature=1.0, seed=123, n=3)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.message.content for c in a.choices}) > 1  # distinct samples
    assert a.usage.completion_tokens == b.usage.completion_tokens <= 3 * 16


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
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role]
    assert sorted(roles) == [0, 1, 2]


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    # As vLLM does, the EOS token that ended the answer is counted in usage and listed, though not in the text.
    if r.choices[0].finish_reason == "stop":
        assert content[-1].token == "<|im_end|>"
        content = content[:-1]
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the most likely
        assert math.isclose(t.top_logprobs[0].logprob, t.logprob)
        assert bytes(t.bytes).decode() == t.token
    total = sum(math.exp(t.logprob) for t in content[0].top_logprobs)
    assert 0 < total <= 1.0001
    streamed = list(
        client.chat.completions.create(
            model=MODEL,
            messages=USER,
            temperature=0,
            max_tokens=8,
            logprobs=True,
            top_logprobs=1,
            stream=True,
        )
    )
    tokens = [
        t.token
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert tokens[: len(content)] == [t.token for t in content]


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert all(len(d) == 2 for d in lp.top_logprobs)


def test_embeddings_float_and_base64(client, embedder):
    texts = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
    ]
    r = client.embeddings.create(model="all-minilm-l6-v2", input=texts, encoding_format="float")
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (3, 384) and [d.index for d in r.data] == [0, 1, 2]
    sims = vecs @ vecs.T
    assert sims[0, 1] > sims[0, 2] + 0.3 and sims[0, 1] > sims[1, 2] + 0.3
    # The SDK asks for base64 by default and decodes it itself.
    r64 = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    assert np.allclose(np.array([d.embedding for d in r64.data]), vecs, atol=1e-6)
    assert r.usage.prompt_tokens == sum(len(t) for t in embedder.tokenize(texts))
    ids = embedder.tokenize(texts[:1])[0]
    r_ids = client.embeddings.create(model="all-minilm-l6-v2", input=[ids], encoding_format="float")
    assert np.allclose(r_ids.data[0].embedding, vecs[0], atol=1e-6)
    raw = httpx.post(
        str(client.base_url) + "embeddings",
        json={"model": "all-minilm-l6-v2", "input": "hi", "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert decoded.shape == (384,) and math.isclose(float(np.linalg.norm(decoded)), 1.0, rel_tol=1e-5)


def test_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=5)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=USER)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi " * 9000, max_tokens=10)
    assert e.value.code == "context_length_exceeded"
    assert "8192" in e.value.message and "10 to generate" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="all-minilm-l6-v2", input="word " * 400)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=MODEL, input="hi")
    with pytest.raises(openai.BadRequestError, match="functions"):
        client.chat.completions.create(model=MODEL, messages=USER, functions=[{"name": "f"}])
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert r.choices  # still serving


def test_api_keys(server):
    _, engine = server
    with running_server(engine, ServerState(api_keys=["k1", "k2"])) as url:
        for key in ("k1", "k2"):
            ok = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            assert ok.models.list().data
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        for path in ("/v1/models", "/nope"):
            assert httpx.get(url + path).status_code == 401
        assert (
            httpx.get(url + "/metrics", headers={"Authorization": "Bearer k1"}).status_code == 403
        )  # operator's
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/ready").status_code == 200


def test_overload_gets_429_with_retry_after_and_admitted_requests_complete(default_model_dir, default_llm):
    engine = small_engine(default_model_dir, max_num_seqs=2, max_queue=2)
    prompt = "Write a long poem about the sea."
    want = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    try:
        with running_server(engine) as url:

            async def burst():
                async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                    return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(24)))

            responses = asyncio.run(burst())
            codes = [r.status_code for r in responses]
            assert set(codes) <= {200, 429}, codes
            assert codes.count(429) > 0 and codes.count(200) >= 4
            for r in responses:
                if r.status_code == 429:
                    assert r.headers["retry-after"] and r.json()["error"]["code"] == "rate_limit_exceeded"
                else:
                    assert r.json()["choices"][0]["text"] == want.outputs[0].text
            wait_idle(url)
            assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        engine.shutdown()


def test_models_retrieve_and_the_vllm_and_fireworks_extras(client):
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    r = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=4,
        temperature=0,
        extra_body={"guided_choice": ["Paris", "London"], "perf_metrics_in_response": True},
    )
    assert r.choices[0].message.content in ("Paris", "London")
    assert r.model_extra["perf_metrics"]["completion-tokens"] == r.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=USER, extra_body={"frobnicate": 1})
    assert err.value.code == "unknown_parameter" and err.value.param == "frobnicate"
