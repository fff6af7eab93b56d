"""The Responses API on the real default model through the openai SDK: an answer, a function tool round
trip with previous_response_id, and the MCP loop (a fake hub; the real MCP servers are the mcp tests')."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from ember import AsyncEngine, CacheConfig, EngineConfig
from ember.server.app import ServerState
from ember.server.platform import Platform
from tests.e2e.conftest import MODEL, running_server
from tests.server.test_responses import ADD_SCHEMA, CALC, CITY_SCHEMA, FakeHub

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url(default_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("responses-e2e")
    state = ServerState(platform=Platform.open(root, f"sqlite:///{root}/ember.db", 1 << 20), mcp=FakeHub())
    engine = AsyncEngine(
        EngineConfig(model=str(default_model_dir), cache=CacheConfig(kv_cache_memory="256MiB")), mode="thread"
    )
    try:
        with running_server(engine, state) as served:
            yield served
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_the_default_model_answers(client):
    r = client.responses.create(
        model=MODEL,
        input="What is the capital of France? Answer in one word.",
        temperature=0,
        max_output_tokens=16,
    )
    assert "Paris" in r.output_text


def test_a_function_tool_round_trip_on_the_default_model(client):
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather",
        "parameters": CITY_SCHEMA,
    }
    first = client.responses.create(
        model=MODEL, input="What's the weather in Oslo?", tools=[tool], tool_choice="required", temperature=0
    )
    (call,) = [o for o in first.output if o.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), CITY_SCHEMA)
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Rain, 4 C"}],
        tools=[tool],
        tool_choice="none",
        temperature=0,
        max_output_tokens=40,
    )
    assert second.output[-1].type == "message" and second.output_text
    assert second.usage.input_tokens_details.cached_tokens > 0


def test_the_server_side_loop_on_the_default_model(client):
    r = client.responses.create(
        model=MODEL,
        input="Use the add tool to add 2 and 3.",
        tools=[CALC],
        tool_choice="required",
        max_tool_calls=1,
        temperature=0,
        max_output_tokens=80,
    )
    (call,) = [o for o in r.output if o.type == "mcp_call"]
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, ADD_SCHEMA)
    assert call.output == str(arguments["a"] + arguments["b"])
    assert r.output[-1].type == "message"
