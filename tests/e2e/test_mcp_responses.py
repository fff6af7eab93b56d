"""The server-side tool loop on the real default model with real MCP servers, over stdio and over
Streamable HTTP: a task of two calls (40 + 2, then that times 2) answered through the server. The small
model cannot plan, so tool_choice forces each call: add in the first response, multiply in its
continuation (previous_response_id), which reads add's result from the stored conversation. Every call's
arguments validate against the tool's input schema as the server listed it."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from ember import AsyncEngine, CacheConfig, EngineConfig
from ember.config.server import McpServer
from ember.responses.mcp import McpHub
from ember.server.app import ServerState
from ember.server.platform import Platform
from tests.e2e.conftest import MODEL, running_server
from tests.responses.mcp_servers import http_server, stdio_command

pytestmark = pytest.mark.slow

TASK = "Compute (40 + 2) * 2 with the tools: first add 40 and 2, then multiply the sum by 2."


@pytest.fixture(scope="module")
def client(default_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mcp-e2e")
    with http_server("calc") as url:
        hub = McpHub([McpServer("calc", command=tuple(stdio_command("calc"))), McpServer("web", url=url)])
        state = ServerState(platform=Platform.open(root, f"sqlite:///{root}/ember.db", 1 << 20), mcp=hub)
        engine = AsyncEngine(
            EngineConfig(model=str(default_model_dir), cache=CacheConfig(kv_cache_memory="256MiB")),
            mode="thread",
        )
        try:
            with running_server(engine, state) as served:
                yield openai.OpenAI(base_url=served + "/v1", api_key="none", max_retries=0)
        finally:
            engine.shutdown()


@pytest.mark.parametrize("label", ["calc", "web"])  # stdio, Streamable HTTP
def test_two_forced_calls_reach_the_answer_through_the_server(client, label):
    tools = [{"type": "mcp", "server_label": label, "require_approval": "never"}]
    first = client.responses.create(
        model=MODEL,
        input=TASK,
        tools=tools,
        tool_choice={"type": "mcp", "server_label": label, "name": "add"},
        max_tool_calls=1,
        temperature=0,
        max_output_tokens=40,  # the call (~30 tokens) and the start of a message: this answer is not checked
    )
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input="Now multiply that sum by 2.",
        tools=tools,
        tool_choice={"type": "mcp", "server_label": label, "name": "multiply"},
        max_tool_calls=1,
        temperature=0,
        max_output_tokens=64,
    )
    (listed,) = [o for o in first.output if o.type == "mcp_list_tools"]
    schemas = {t.name: t.input_schema for t in listed.tools}
    made = [o for r in (first, second) for o in r.output if o.type == "mcp_call"]
    assert [c.name for c in made] == ["add", "multiply"]
    for call in made:
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
        assert call.status == "completed" and call.server_label == label
    assert json.loads(made[0].arguments) == {"a": 40, "b": 2} and made[0].output == "42"
    assert json.loads(made[1].arguments) == {"a": 42, "b": 2} and made[1].output == "84"
    assert "84" in second.output_text
    assert second.usage.input_tokens_details.cached_tokens > 0  # the first response's prefix, served
