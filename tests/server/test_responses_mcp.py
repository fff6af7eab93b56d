"""The server-side tool loop of /v1/responses over real MCP servers (tests/responses/mcp_servers.py) through
the unmodified openai SDK, on a small random model (the call grammar makes its calls valid; the calculator
takes digits, so that its numbers stay short): mcp_call items
over stdio and Streamable HTTP, each fault an error item, and the server serving after each."""

from __future__ import annotations

import json
import threading

import jsonschema
import openai
import pytest
import uvicorn

from ember import AsyncEngine, CacheConfig, EngineConfig
from ember.config.server import McpServer
from ember.responses.mcp import McpHub
from ember.server.app import ServerState, create_app
from ember.server.platform import Platform
from tests.e2e.conftest import MODEL, free_port, wait_until
from tests.responses.mcp_servers import http_server, stdio_command
from tests.server.test_responses import limits

TIMEOUT_S = 30.0  # 10 MiB takes seconds to read and parse (15 s seen on a busy machine)
MAX_OUTPUT = 1024


def mcp(label: str, **kw) -> dict:
    return {"type": "mcp", "server_label": label, "require_approval": "never", **kw}


def force(label: str, name: str) -> dict:
    return {"type": "mcp", "server_label": label, "name": name}


@pytest.fixture(scope="module")
def served(random_model_dirs, tmp_path_factory):
    """(url, hub, app): a server with the store and three MCP servers: calc and faults over stdio, the
    calculator again over Streamable HTTP as `web`. The app's lifespan starts and stops the hub."""
    root = tmp_path_factory.mktemp("responses-mcp")
    with http_server("digits") as web:
        servers = [
            McpServer("calc", command=tuple(stdio_command("digits"))),
            McpServer("faults", command=tuple(stdio_command("faults"))),
            McpServer("web", url=web),
        ]
        hub = McpHub(servers, timeout_s=TIMEOUT_S, max_output=MAX_OUTPUT)
        state = ServerState(platform=Platform.open(root, f"sqlite:///{root}/ember.db", 1 << 20), mcp=hub)
        engine = AsyncEngine(
            EngineConfig(
                model=str(random_model_dirs["llama-gqa"]),
                max_model_len=2048,
                cache=CacheConfig(kv_cache_memory="64MiB"),
            ),
            mode="thread",
            max_queue=64,
        )
        app = create_app(engine, MODEL, state)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.config.port}"
        try:
            wait_until(url)
            yield url, hub, app
        finally:
            server.should_exit = True
            thread.join(timeout=20)
            engine.shutdown()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="none", max_retries=0)


def create(client, label: str, name: str | None = None, **kw):
    body = {"model": MODEL, "input": "Use the tool", "tools": [mcp(label)], "temperature": 0}
    body["tool_choice"] = force(label, name) if name else "required"
    return client.responses.create(**{"max_tool_calls": 1, "max_output_tokens": 48, **body, **kw})


def calls(r) -> list:
    return [o for o in r.output if o.type == "mcp_call"]


def still_serving(client) -> None:
    r = create(client, "calc", "add")
    (call,) = calls(r)
    a = json.loads(call.arguments)
    assert call.status == "completed" and call.output == str(a["a"] + a["b"])


def test_the_hub_starts_with_the_app_and_lists_each_server(served):
    hub, app = served[1], served[2]
    assert hub.labels == ["calc", "faults", "web"]
    assert app.state.responses.limits.tool_timeout_s == TIMEOUT_S  # --mcp-timeout bounds the loop's calls
    assert sorted(hub._sessions) == ["calc", "faults", "web"]  # opened at start, not on first use


@pytest.mark.parametrize("label", ["calc", "web"])
def test_two_calls_run_in_the_server_and_their_arguments_validate(client, label):
    r = create(client, label, "multiply", max_tool_calls=2, max_output_tokens=96)
    listed = r.output[0]
    assert listed.type == "mcp_list_tools" and listed.server_label == label
    schemas = {t.name: t.input_schema for t in listed.tools}
    assert sorted(schemas) == ["add", "multiply"]
    made = calls(r)
    assert len(made) == 2
    for call in made:
        arguments = json.loads(call.arguments)
        jsonschema.validate(arguments, schemas[call.name])
        assert call.server_label == label and call.status == "completed" and call.error is None
        assert call.output == str(arguments["a"] * arguments["b"])
    assert r.output[-1].type == "message"  # the call budget spent, the model answers


def test_a_crash_mid_call_is_an_error_item_and_the_server_comes_back(client):
    r = create(client, "faults", "crash")
    (call,) = calls(r)
    assert call.status == "failed" and call.output is None
    assert "closed the connection during the call" in call.error.content[0]["text"]
    assert r.output[-1].type == "message"
    assert create(client, "faults", "pid").output[1].status == "completed"  # a new server process
    still_serving(client)


def test_a_hang_is_a_timeout_error_item(client, served):
    with limits(served, tool_timeout_s=1.0):  # the loop's bound on a call; the hub's is TIMEOUT_S
        r = create(client, "faults", "hang")
    (call,) = calls(r)
    assert call.status == "failed" and "did not answer within 1 s" in call.error.content[0]["text"]
    assert r.output[-1].type == "message"
    assert create(client, "faults", "pid").output[1].status == "completed"
    still_serving(client)


def test_a_10_mib_result_reaches_the_model_cut_to_max_output(client):
    r = create(client, "faults", "big")
    (call,) = calls(r)
    assert call.status == "completed" and call.output.startswith("x" * MAX_OUTPUT)
    assert f"cut to the first {MAX_OUTPUT}" in call.output and len(call.output) < MAX_OUTPUT + 200
    assert r.status in ("completed", "incomplete") and r.output[-1].type == "message"
    still_serving(client)


def test_a_loop_that_never_stops_calling_is_bounded(client, served):
    r = create(client, "calc", None, max_tool_calls=3, max_output_tokens=160)
    assert len(calls(r)) == 3 and r.output[-1].type == "message"  # past max_tool_calls: no tools
    with limits(served, max_turns=2):
        r = create(client, "calc", None, max_tool_calls=None, max_output_tokens=None)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_turns"
    assert len(calls(r)) >= 2 and all(c.status == "completed" for c in calls(r))
