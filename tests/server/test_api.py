"""The HTTP layer over a small random model: errors name the field as sent, unknown fields and routes
answer clearly, models can be looked up, the OpenAPI document matches, and the vLLM and Fireworks
extras do what they say."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.server.conftest import MAX_MODEL_LEN

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "What is the capital of France?"}]
BASE = {"model": MODEL, "messages": USER, "max_tokens": 6, "temperature": 0}


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def stream(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


@pytest.mark.parametrize(
    "path,body,param",
    [
        (CHAT, {**BASE, "stop": 5}, "stop"),
        (CHAT, {**BASE, "logprobs": "yes"}, "logprobs"),
        (CHAT, {**BASE, "stream": "yes"}, "stream"),
        (CHAT, {**BASE, "tool_choice": 5}, "tool_choice"),
        (CHAT, {**BASE, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (CHAT, {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
        (CHAT, {**BASE, "guided_json": 5}, "guided_json"),
        (CHAT, {**BASE, "response_format": {"type": "json_object", "extra": 1}}, "response_format.extra"),
        ("/v1/completions", {"model": MODEL, "prompt": [True, False]}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": {"text": "hi"}}, "prompt"),
        ("/v1/embeddings", {"model": "all-minilm-l6-v2", "input": [True]}, "input"),
    ],
)  # fmt: skip
def test_a_bad_field_is_named_as_the_client_sent_it(small_server, path, body, param):
    r = post(small_server[0], path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert not re.search(r"\.(str|int|list\[|dict\[|literal\[)|[A-Z][a-z]+[A-Z]", err["message"]), err[
        "message"
    ]


def test_unknown_fields_get_a_400_unless_the_server_allows_them(small_server, small_state):
    url, _ = small_server
    r = post(url, CHAT, {**BASE, "best_of_luck": 3})
    assert r.status_code == 400
    assert r.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "invalid_request_error",
        "param": "best_of_luck",
        "code": "unknown_parameter",
    }
    r = post(url, CHAT, {**BASE, "web_search_options": {}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    small_state.allow_unknown_fields = True
    try:
        assert post(url, CHAT, {**BASE, "best_of_luck": 3}).status_code == 200
        assert (
            post(url, "/v1/embeddings", {"model": "all-minilm-l6-v2", "input": "x", "z": 1}).status_code
            == 200
        )
        assert post(url, CHAT, {**BASE, "web_search_options": {}}).status_code == 400
    finally:
        small_state.allow_unknown_fields = False


def test_models_can_be_listed_and_retrieved_with_their_context_length(small_server):
    url, _ = small_server
    cards = httpx.get(url + "/v1/models").json()["data"]
    assert {c["id"]: c["max_model_len"] for c in cards} == {MODEL: MAX_MODEL_LEN, "all-minilm-l6-v2": 256}
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    got = client.models.retrieve(MODEL)
    assert got.id == MODEL and got.model_extra["max_model_len"] == MAX_MODEL_LEN
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-9")
    assert err.value.body["code"] == "model_not_found" and "gpt-9" in err.value.body["message"]


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/v1/uploads"),
        ("GET", "/v1/vector_stores"),
        ("POST", "/v1/audio/transcriptions"),
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/moderations"),
        ("POST", "/v1/assistants"),
        ("POST", "/v1/threads/t/runs"),
    ],
)
def test_openai_routes_ember_does_not_serve_say_so(small_server, method, path):
    r = httpx.request(method, small_server[0] + path, json={})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "not_implemented" and "not implemented in ember" in err["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/files",
        "/v1/fine_tuning/jobs",
        "/v1/files/file-abc/content",
        "/v1/responses/resp_1",
        "/v1/batches",
        "/v1/evals",
    ],
)
def test_the_stores_routes_say_the_store_is_off(small_server, path):
    r = httpx.get(small_server[0] + path)  # small_server is made without a store, as --no-store
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "not_enabled" and "--no-store" in err["message"]


def test_unknown_routes_say_so(small_server):
    r = httpx.get(small_server[0] + "/v1/filesystem")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_route"


def test_the_openapi_document_lists_the_errors_the_server_sends(small_server):
    doc = httpx.get(small_server[0] + "/openapi.json").json()
    assert '"422"' not in json.dumps(doc) and "HTTPValidationError" not in json.dumps(doc)
    assert "/v1/models/{model_id}" in doc["paths"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            if "requestBody" in op:
                assert "400" in codes, (method, path)
            if path not in ("/health", "/ready"):
                assert "401" in codes, (method, path)
            for code in codes - {"200"}:
                ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/Error"
    assert {"429", "503", "404"} <= set(doc["paths"][CHAT]["post"]["responses"])


def test_guided_fields_constrain_the_output(small_server):
    url, _ = small_server
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for body in ({"guided_json": schema}, {"structured_outputs": {"json": schema}}):
        r = post(url, CHAT, {**BASE, "max_tokens": 40, **body})
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)
    r = post(url, CHAT, {**BASE, "guided_choice": ["Paris", "Rome"]})
    assert r.json()["choices"][0]["message"]["content"] in ("Paris", "Rome")
    r = post(
        url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 8, "guided_regex": "[0-9]{3}"}
    )
    assert re.fullmatch("[0-9]{3}", r.json()["choices"][0]["text"])
    r = post(url, CHAT, {**BASE, "guided_json": schema, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "conflicting_constraints"


def test_template_switches_shape_the_prompt(small_server):
    url, _ = small_server

    def prompt(**kw) -> str:
        r = post(url, CHAT, {**BASE, "max_tokens": 1, "raw_output": True, **kw})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["raw_output"]["prompt_fragments"][0]

    opened = prompt()
    assert opened.endswith("<|im_start|>assistant\n")
    assert not prompt(add_generation_prompt=False).endswith("assistant\n")
    partial = USER + [{"role": "assistant", "content": "The capital is"}]
    assert prompt(messages=partial, continue_final_message=True).endswith("The capital is")
    assert prompt(chat_template_kwargs={"unused_by_this_template": 1}) == opened


def test_echo_raw_output_and_perf_metrics(small_server):
    url, _ = small_server
    body = {**BASE, "echo": True, "raw_output": True, "perf_metrics_in_response": True}
    r = post(url, CHAT, body).json()
    raw = r["choices"][0]["raw_output"]
    assert r["choices"][0]["message"]["content"] == raw["prompt_fragments"][0] + raw["completion"]
    assert len(raw["prompt_token_ids"]) == r["usage"]["prompt_tokens"]
    assert len(raw["completion_token_ids"]) == r["usage"]["completion_tokens"]
    perf = r["perf_metrics"]
    assert perf["prompt-tokens"] == r["usage"]["prompt_tokens"]
    assert 0 <= perf["server-time-to-first-token"] <= perf["server-processing-time"]
    chunks = stream(url, CHAT, body)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == r["choices"][0]["message"]["content"]  # greedy: the same answer, echoed the same
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] and last["perf_metrics"]["completion-tokens"] == 6
    assert last["choices"][0]["raw_output"] == raw
    c = post(url, "/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 3, "echo": True}).json()
    assert c["choices"][0]["text"].startswith("Once")


def test_truncate_lowers_max_tokens_to_the_room_left(small_server):
    url, _ = small_server
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5000, "ignore_eos": True}
    r = post(url, "/v1/completions", body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(url, "/v1/completions", {**body, "context_length_exceeded_behavior": "truncate"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] == MAX_MODEL_LEN
    assert r.json()["choices"][0]["finish_reason"] == "length"
