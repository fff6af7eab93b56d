"""The streaming client on canned server answers: what counts as a token chunk, where token counts come
from, and how every kind of failure ends up in the record instead of an exception."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from ember.bench.serving.client import RequestRecord, error_message, request_body, send
from ember.bench.serving.metrics import compute_metrics
from ember.bench.serving.workloads import Request


def _sse(*events: dict | str) -> bytes:
    """SSE text: dicts as JSON data, "[DONE]" as data, strings starting with ':' as comment lines."""

    def line(e: dict | str) -> str:
        if isinstance(e, str):
            return e if e.startswith(":") else f"data: {e}"
        return f"data: {json.dumps(e)}"

    return "".join(line(e) + "\n\n" for e in events).encode()


def _chunk(text: str, usage=None) -> dict:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text}], "usage": usage}


USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}


def _run(handler, record: RequestRecord | None = None, body: dict | None = None) -> RequestRecord:
    async def go():
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            return await send(
                client, "/v1/completions", body or {"model": "m"}, record or RequestRecord("r", "m"), 0.0
            )

    return asyncio.run(go())


def test_tokens_come_from_usage_and_every_chunk_with_choices_is_a_token_event():
    # 5 tokens in 4 chunks (two arrived together); one chunk has empty text (e.g. half a character)
    body = _sse(
        ": keep-alive comment",
        _chunk("Hel"),
        _chunk(""),
        _chunk("lo w"),
        _chunk("orld"),
        {"choices": [], "usage": USAGE},
        "[DONE]",
    )
    r = _run(lambda req: httpx.Response(200, content=body))
    assert r.success, r.error
    assert (r.output_tokens, r.input_tokens, r.tokens_from_usage) == (5, 11, True)
    assert r.num_chunks == 4 and len(r.itl) == 3
    assert r.ttft is not None and r.e2el == pytest.approx(r.ttft + sum(r.itl))


def test_usage_on_the_last_token_chunk_is_read_too():
    body = _sse(_chunk("a"), _chunk("b", usage=USAGE), "[DONE]")
    r = _run(lambda req: httpx.Response(200, content=body))
    assert (r.output_tokens, r.num_chunks, r.tokens_from_usage) == (5, 2, True)


def test_cached_prompt_tokens_are_read_from_usage_details():
    usage = {**USAGE, "prompt_tokens_details": {"cached_tokens": 48}}
    body = _sse(_chunk("a"), {"choices": [], "usage": usage}, "[DONE]")
    r = _run(lambda req: httpx.Response(200, content=body))
    assert r.cached_tokens == 48
    m = compute_metrics([r], duration=1.0)
    assert m.total_cached == 48 and m.prefix_hit_rate == pytest.approx(48 / r.input_tokens)


def test_without_usage_tokens_fall_back_to_chunks_and_say_so():
    body = _sse(_chunk("a"), _chunk("b"), _chunk("c"), "[DONE]")
    r = _run(lambda req: httpx.Response(200, content=body), RequestRecord("r", "m", input_tokens=7))
    assert (r.output_tokens, r.input_tokens, r.tokens_from_usage) == (3, 7, False)


def test_http_error_status_is_a_failed_request_with_the_servers_message():
    err = {"error": {"message": "model 'x' does not exist; available: m", "type": "invalid_request_error"}}
    r = _run(lambda req: httpx.Response(404, json=err))
    assert not r.success
    assert r.error == "HTTP 404: model 'x' does not exist; available: m"
    r = _run(lambda req: httpx.Response(502, text="bad gateway"))
    assert r.error == "HTTP 502: bad gateway"


def test_in_band_error_after_the_stream_began_fails_the_request():
    body = _sse(_chunk("a"), {"error": {"message": "engine died", "type": "server_error"}}, "[DONE]")
    r = _run(lambda req: httpx.Response(200, content=body))
    assert not r.success and "engine died" in r.error


def test_a_stream_with_no_token_chunk_fails():
    r = _run(lambda req: httpx.Response(200, content=_sse({"choices": [], "usage": USAGE}, "[DONE]")))
    assert not r.success and "without a chunk" in r.error


def test_a_refused_connection_is_recorded_not_raised():
    def refuse(req):
        raise httpx.ConnectError("connection refused")

    r = _run(refuse)
    assert not r.success and "ConnectError" in r.error


def test_request_body_shapes():
    req = Request("r", 16, "adapter-3", prompt="hello")
    body = request_body(req, "completions", temperature=0.0, ignore_eos=False)
    assert body["prompt"] == "hello" and body["model"] == "adapter-3" and body["max_tokens"] == 16
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "ignore_eos" not in body and "messages" not in body
    chat = request_body(req, "chat", temperature=0.5, ignore_eos=True)
    assert chat["messages"] == [{"role": "user", "content": "hello"}] and "prompt" not in chat
    assert chat["ignore_eos"] is True and chat["temperature"] == 0.5


def test_error_message_reads_openai_bodies_and_plain_text():
    assert error_message({"error": {"message": "m1"}}) == "m1"
    assert error_message('{"error": "m2"}') == "m2"
    assert error_message('{"detail": "m3"}') == "m3"
    assert error_message("  plain  ") == "plain"
