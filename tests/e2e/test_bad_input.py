"""Bad input as raw HTTP: each gets its clear 4xx in OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from ember.server.backend import EngineBackend
from tests.e2e.conftest import MODEL, metric, running_server, small_engine, wait_idle

CHAT = "/v1/chat/completions"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}]}


def _raw(body: dict, content: str | None = None) -> bytes:
    """The body as JSON text with escapes (`\\ud800`), as a client that sends a lone surrogate writes it."""
    if content is not None:
        body = {**body, "messages": [{"role": "user", "content": content}]}
    return json.dumps(body).encode()


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _items(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def _ref_chain(n: int) -> dict:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    return {"$defs": {**defs, f"d{n}": {"type": "string"}}, "$ref": "#/$defs/d0"}


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def _tool(parameters: dict) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


CASES = [
    # (what, path, raw body, status, words the message must contain, param)
    ("malformed JSON", CHAT, b'{"model": "x", "messages": [', 400, "not valid JSON", None),
    ("not an object", CHAT, b"[1, 2]", 400, "", None),
    ("wrong type", CHAT, {**GOOD, "temperature": "hot"}, 400, "temperature", "temperature"),
    ("wrong type n", CHAT, {**GOOD, "n": "three"}, 400, "n", "n"),
    ("out of range", CHAT, {**GOOD, "top_p": 1.5}, 400, "top_p", "top_p"),
    ("negative max_tokens", CHAT, {**GOOD, "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ("too many stops", CHAT, {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "stop"),
    (
        "top_logprobs too high",
        CHAT,
        {**GOOD, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
        None,
    ),
    ("bad logit_bias", CHAT, {**GOOD, "logit_bias": {"abc": 1}}, 400, "logit_bias", "logit_bias"),
    (
        "logit_bias id past vocab",
        CHAT,
        {**GOOD, "logit_bias": {"999999": 1}},
        400,
        "vocabulary",
        "logit_bias",
    ),
    ("empty messages", CHAT, {**GOOD, "messages": []}, 400, "messages", "messages"),
    ("unknown role", CHAT, {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role", None),
    ("missing model", CHAT, {"messages": GOOD["messages"]}, 400, "model", "model"),
    (
        "image part",
        CHAT,
        {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "image_url",
        "messages",
    ),
    (
        "stream_options without stream",
        CHAT,
        {**GOOD, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        None,
    ),
    ("unknown model", CHAT, {**GOOD, "model": "gpt-9"}, 404, "gpt-9", "model"),
    (
        "huge prompt",
        "/v1/completions",
        {"model": MODEL, "prompt": "lorem ipsum " * 20000},
        400,
        "maximum context length",
        "prompt",
    ),
    (
        "token id past vocab",
        "/v1/completions",
        {"model": MODEL, "prompt": [1, 2, 10**9]},
        400,
        "vocabulary",
        "prompt",
    ),
    (
        "negative token id",
        "/v1/completions",
        {"model": MODEL, "prompt": [1, -5]},
        400,
        "vocabulary",
        "prompt",
    ),
    (
        "token id past 2^32",
        "/v1/completions",
        {"model": MODEL, "prompt": [[1, 2**40]]},
        400,
        "vocabulary",
        "prompt",
    ),
    (
        "more sequences than the server admits",
        "/v1/completions",
        {"model": MODEL, "prompt": ["hi"] * 100, "n": 16, "max_tokens": 1},
        400,
        "sequences",
        "prompt",
    ),
    ("logit_bias key not a number", CHAT, {**GOOD, "logit_bias": {"²": 1}}, 400, "logit_bias", "logit_bias"),
    ("empty prompt list", "/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt", "prompt"),
    (
        "empty embedding input",
        "/v1/embeddings",
        {"model": "all-minilm-l6-v2", "input": ""},
        400,
        "input",
        "input",
    ),
    (
        "bad encoding_format",
        "/v1/embeddings",
        {"model": "all-minilm-l6-v2", "input": "x", "encoding_format": "hex"},
        400,
        "encoding_format",
        "encoding_format",
    ),
    ("unknown route", "/v1/nothing", {}, 404, "unknown route", None),
    # JSON types as sent: nothing is coerced.
    ("logprobs a string", CHAT, {**GOOD, "logprobs": "yes"}, 400, "boolean", "logprobs"),
    ("stream a string", CHAT, {**GOOD, "stream": "yes"}, 400, "boolean", "stream"),
    ("max_tokens a string", CHAT, {**GOOD, "max_tokens": "8"}, 400, "integer", "max_tokens"),
    (
        "bools as token ids",
        "/v1/completions",
        {"model": MODEL, "prompt": [True, False]},
        400,
        "token ids",
        "prompt",
    ),
    # The field as the client named it, without pydantic's union-branch tags.
    ("stop a number", CHAT, {**GOOD, "stop": 5}, 400, "stop", "stop"),
    (
        "embedding input of bools",
        "/v1/embeddings",
        {"model": "all-minilm-l6-v2", "input": [True]},
        400,
        "input",
        "input",
    ),
    ("unknown field", CHAT, {**GOOD, "temprature": 0}, 400, "temprature", "temprature"),
    (
        "OpenAI field not served",
        CHAT,
        {**GOOD, "prediction": {"type": "content", "content": "x"}},
        400,
        "prediction",
        "prediction",
    ),
    (
        "two constraints",
        CHAT,
        {**GOOD, "guided_regex": "a+", "response_format": {"type": "json_object"}},
        400,
        "guided_regex",
        "guided_regex",
    ),
    ("OpenAI route not served", "/v1/assistants", {}, 404, "not implemented in ember", None),
    # Text that is not valid Unicode: a lone UTF-16 surrogate as a JSON escape.
    ("lone surrogate in chat", CHAT, _raw(GOOD, content="a\ud800"), 400, "surrogate", "messages[0].content"),
    (
        "lone surrogate in a prompt",
        "/v1/completions",
        _raw({"model": MODEL, "prompt": "a\ud800"}),
        400,
        "U+D800",
        "prompt",
    ),
    (
        "lone surrogate in an embedding input",
        "/v1/embeddings",
        _raw({"model": "all-minilm-l6-v2", "input": ["ok", "\udc00"]}),
        400,
        "surrogate",
        "input[1]",
    ),
    # Grammars past the limits: these crashed or wedged the engine.
    (
        "$ref chain",
        CHAT,
        {**GOOD, "response_format": _schema_format(_ref_chain(5000))},
        400,
        '"$ref"s',
        "response_format",
    ),
    (
        "deep schema",
        CHAT,
        {**GOOD, "response_format": _schema_format(_items(600))},
        400,
        "nested deeper",
        "response_format",
    ),
    (
        "deep tool parameters",
        CHAT,
        {**GOOD, "tools": [_tool(_nested(300))], "tool_choice": "required"},
        400,
        "nested deeper",
        "tools",
    ),
    ("min_tokens past the context", CHAT, {**GOOD, "min_tokens": 10**6}, 400, "room for", "min_tokens"),
]


@pytest.mark.parametrize("what,path,body,status,words,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_4xx(server, what, path, body, status, words, param):
    url, _ = server
    if isinstance(body, bytes):
        r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words in err["message"]
    assert "/work" not in err["message"] and "site-packages" not in err["message"]
    if param is not None:
        assert err["param"] == param
    # ...and the server still gives correct answers.
    ok = httpx.post(url + CHAT, json={**GOOD, "max_tokens": 8, "temperature": 0}, timeout=60)
    assert ok.status_code == 200 and "Paris" in ok.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_hangs_up_frees_its_kv_blocks(server, stream):
    url, _ = server
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:  # read a few chunks, then hang up
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30.0) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 4:
                    assert metric(url, "ember:kv_cache_usage_perc") > 0
                    break
    else:  # give up waiting for the whole answer
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=1.5)
    wait_idle(url)
    assert metric(url, 'ember:request_success_total{finished_reason="abort"}') >= 1


def test_failure_after_the_stream_began_is_reported_in_band(default_model_dir):
    engine = small_engine(default_model_dir, max_num_seqs=4, max_queue=4)
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    try:
        with running_server(engine) as url:
            events = []
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 3:
                            threading.Thread(target=engine.shutdown).start()  # the engine dies mid-stream
            assert json.loads(events[0])["choices"]
            err = json.loads(events[-1])["error"]
            assert err["type"] == "server_error" and "shut down" in err["message"]
            assert httpx.get(url + "/health").status_code == 503
    finally:
        engine.shutdown()


def test_explicit_nulls_mean_the_defaults(server):
    url, _ = server
    nulls = dict.fromkeys(
        ["temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "stream", "logprobs", "seed"]
    )
    body = {**GOOD, **nulls, "max_tokens": 4, "stream_options": None, "stop": None, "user": None}
    r = httpx.post(url + CHAT, json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1
    # ignore_eos: the sample (temperature null is 1.0) may end early otherwise
    body = {"model": MODEL, "prompt": "Hi", **nulls, "echo": None, "max_tokens": None, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 16  # the completions default for max_tokens
    # Fields a newer SDK may send inside stream_options are ignored, not refused.
    body = {**GOOD, "max_tokens": 2, "stream": True, "stream_options": {"include_obfuscation": False}}
    with httpx.stream("POST", url + CHAT, json=body, timeout=60) as r:
        assert r.status_code == 200
        assert list(r.iter_lines())[-2] == "data: [DONE]"


def test_requests_that_finish_are_not_counted_as_aborted(server):
    url, _ = server
    wait_idle(url)
    name = 'ember:request_success_total{finished_reason="abort"}'
    before = metric(url, name, default=0.0)
    for stream in (False, True):
        body = {"model": MODEL, "prompt": ["Hi", "Hello"], "n": 2, "max_tokens": 5, "stream": stream}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200
    wait_idle(url)
    after = metric(url, name, default=0.0)
    assert after == before


def test_client_that_hangs_up_while_queued_is_dropped_from_the_queue(default_model_dir):
    engine = small_engine(default_model_dir, max_num_seqs=1, max_queue=4)
    long = {"model": MODEL, "prompt": "Once", "max_tokens": 1400, "ignore_eos": True, "stream": True}
    try:
        with running_server(engine) as url:
            with httpx.stream("POST", url + "/v1/completions", json=long, timeout=60) as r:
                lines = r.iter_lines()
                next(lines)  # the long request holds the only running slot
                with pytest.raises(httpx.ReadTimeout):  # this one waits in the queue, then its client leaves
                    httpx.post(url + "/v1/completions", json={**long, "stream": False}, timeout=1.5)
                deadline = time.monotonic() + 10
                while metric(url, "ember:num_requests_waiting") > 0 and time.monotonic() < deadline:
                    next(lines)
                assert metric(url, "ember:num_requests_waiting") == 0
                assert metric(url, "ember:num_requests_running") == 1
            wait_idle(url)
    finally:
        engine.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "word " * 2_000_000}]}),
        ("/v1/completions", {"model": MODEL, "prompt": "word " * 2_000_000, "max_tokens": 1}),
    ],
)
def test_prompt_text_past_any_context_is_refused_without_tokenizing_it(server, path, body):
    """10 MB of text, under the body limit: refused from its length at once, not after seconds of
    tokenizing; the server answers the next request as before."""
    url, _ = server
    t0 = time.monotonic()
    r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - t0 < 5
    assert httpx.post(url + CHAT, json={**GOOD, "max_tokens": 2}, timeout=60).status_code == 200


@pytest.mark.slow
def test_a_body_past_the_limit_is_refused_with_413(server):
    url, _ = server
    r = httpx.post(url + CHAT, content=b'{"model": "' + b"x" * (17 << 20) + b'"}', timeout=60)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_a_500_is_answered_and_the_connection_stays_usable(server, monkeypatch):
    url, _ = server

    async def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(EngineBackend, "complete", boom)
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError"
        assert r.headers.get("connection") != "close"
        # The next request on the same keep-alive connection (it used to be reset).
        ok = client.post(CHAT, json={**GOOD, "max_tokens": 8, "temperature": 0})
        assert ok.status_code == 200 and "Paris" in ok.json()["choices"][0]["message"]["content"]
