"""A pipeline served as a model, driven through the unmodified `openai` SDK over a stand-in engine that
reads its prompts: route (an LLM classifier) -> one of two adapters -> a grader's check with a fallback,
streamed and not, through Chat Completions and Responses; the steps taken in the answer and in the stored
traces. Steps that hang or fail answer an error in time; map items are in the engine together."""

from __future__ import annotations

import contextlib
import time

import httpx
import openai
import pytest
import yaml

from ember.config import ServerConfig
from ember.pipelines.spec import SpecError
from ember.server.app import ServerState, create_app
from ember.server.platform import Platform
from ember.traces import TraceRecorder, TraceSettings
from tests.pipelines.fake_engine import ANSWERS, TextEngine
from tests.pipelines.test_spec import SUPPORT
from tests.server.fakes import serving

MODEL = "smollm2-135m-instruct"
ADAPTERS = {"billing-lora": "/a/billing", "tech-lora": "/a/tech"}

EXTRA = {
    "steps": [
        {
            "name": "numbers",
            "kind": "tool",
            "function": "tests.pipelines.test_serve:numbers",
            "arguments": {"n": 8},
        },
        {"name": "said", "kind": "map", "over": "numbers", "model": MODEL, "prompt": "Say {{item}}"},
        {
            "name": "evens",
            "kind": "filter",
            "over": "numbers",
            "model": MODEL,
            "prompt": "keep {{item}}?",
        },
        {"name": "out", "kind": "generate", "model": MODEL, "prompt": "{{said.0}} {{evens}}"},
    ],
    "output": "out",
}
STUCK = {
    "steps": [{"name": "stuck", "kind": "generate", "model": MODEL, "prompt": "hang", "timeout_s": 0.5}],
    "output": "stuck",
}


def numbers(n: int) -> list[str]:
    """A registered Python function a tool step calls."""
    return [f"{'even' if i % 2 == 0 else 'odd'} {i}" for i in range(n)]


def _options(tmp_path, specs: dict) -> ServerConfig:
    paths = {}
    for name, spec in specs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        paths[name] = str(path)
    return ServerConfig(pipelines=paths, port=0)


@contextlib.contextmanager
def _served(tmp_path, specs: dict, engine: TextEngine | None = None):
    options = _options(tmp_path, specs)
    state = ServerState(platform=Platform.open(tmp_path, f"sqlite:///{tmp_path}/ember.db", 1 << 20))
    state.recorder = TraceRecorder(state.platform.store, TraceSettings(always=True, flush_ms=20))
    engine = engine or TextEngine(ADAPTERS)
    with serving(create_app(engine, MODEL, state, options), options) as (host, port):
        yield f"http://{host}:{port}", engine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with _served(
        tmp_path_factory.mktemp("pipelines"), {"support": SUPPORT, "extra": EXTRA, "stuck": STUCK}
    ) as s:
        yield s


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=20)


def _steps(trace: dict) -> list[str]:
    return [s["step"] for s in trace["steps"]]


def test_the_pipeline_is_a_model(server):
    url, _ = server
    models = {m.id: m for m in _client(url).models.list().data}
    assert {"support", "extra", MODEL} <= set(models)
    assert models["support"].model_extra["pipeline"]["output"] == "checked"


@pytest.mark.parametrize("stream", [False, True])
def test_route_adapter_check_and_fallback_through_the_sdk(server, stream):
    url, _ = server
    client = _client(url)

    def ask(text: str) -> tuple[str, dict, dict]:
        messages = [{"role": "user", "content": text}]
        if not stream:
            r = client.chat.completions.create(model="support", messages=messages)
            return r.choices[0].message.content, r.model_extra["pipeline"], r.usage
        chunks = list(
            client.chat.completions.create(
                model="support", messages=messages, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        (trace,) = [c.model_extra["pipeline"] for c in chunks if c.model_extra.get("pipeline")]
        assert all(c.model == "support" for c in chunks)
        return text, trace, chunks[-1].usage

    text, trace, usage = ask("I want a refund for my order")
    assert text == ANSWERS["billing-lora"]  # the grader passed the billing adapter's answer
    assert _steps(trace) == ["triage", "billing", "checked"]
    route, _, check = trace["steps"]
    assert (route["picked"], route["next"], check["passed"]) == ("billing", "billing", True)
    assert all(s["duration_ms"] >= 0 and s["status"] == "ok" for s in trace["steps"])
    assert usage.completion_tokens == sum(s.get("completion_tokens", 0) for s in trace["steps"]) > 0

    text, trace, _ = ask("my screen is black")
    assert text == ANSWERS[None]  # the tech adapter's answer failed the grader: the fallback answered
    assert _steps(trace) == ["triage", "tech", "checked", "careful"]
    assert trace["steps"][2]["passed"] is False and trace["steps"][2]["fallback"] == "careful"


def test_the_steps_are_in_the_stored_trace_and_in_responses(server):
    url, _ = server
    client = _client(url)
    r = client.chat.completions.create(model="support", messages=[{"role": "user", "content": "refund?"}])
    stored = client.chat.completions.retrieve(r.id)
    assert _steps(stored.model_extra["pipeline"]) == ["triage", "billing", "checked"]

    response = client.responses.create(model="support", input="my screen is black")
    assert response.output_text == ANSWERS[None]
    assert _steps(response.model_extra["pipeline"]) == ["triage", "tech", "checked", "careful"]
    with client.responses.stream(model="support", input="refund please") as events:
        final = events.get_final_response()
    assert final.output_text == ANSWERS["billing-lora"]


def test_map_items_run_together_with_tool_and_filter(server):
    url, engine = server
    engine.delay_s, engine.most_in_flight = 0.05, 0
    try:
        r = _client(url).chat.completions.create(model="extra", messages=[{"role": "user", "content": "go"}])
    finally:
        engine.delay_s = 0.0
    trace = r.model_extra["pipeline"]
    assert set(_steps(trace)) == {"numbers", "said", "evens", "out"}
    evens = next(s for s in trace["steps"] if s["step"] == "evens")
    assert (evens["items"], evens["kept"]) == (8, 4)
    # Each list's first item goes alone until its prompt is computed (so the rest find the shared prefix in
    # the cache); then the map's and the filter's 7 others are in flight at once.
    assert engine.most_in_flight >= 14


def test_a_step_that_hangs_answers_an_error_in_time(server):
    url, _ = server
    started = time.monotonic()
    r = httpx.post(
        url + "/v1/chat/completions", json={"model": "stuck", "messages": [{"role": "user", "content": "x"}]}
    )
    assert time.monotonic() - started < 5
    assert r.status_code == 504, r.text
    error = r.json()["error"]
    assert error["code"] == "pipeline_step_failed" and "'stuck'" in error["message"]
    with pytest.raises(openai.APIStatusError):  # and through the SDK, streamed: refused before it began
        list(
            _client(url).chat.completions.create(
                model="stuck", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )


def test_a_pipeline_naming_a_model_the_server_lacks_is_refused(tmp_path):
    spec = {
        "steps": [{"name": "a", "kind": "generate", "model": "nope", "prompt": "{{input}}"}],
        "output": "a",
    }
    with pytest.raises(SpecError, match="step 'a' field 'model': unknown model 'nope'"):
        create_app(TextEngine(), MODEL, ServerState(), _options(tmp_path, {"p": spec}))
