"""/v1/responses through the unmodified openai SDK, on a small random model: plain and streamed responses,
function tools continued with previous_response_id, json_schema output, stored responses and their owners,
and the server-side loop over a fake MCP hub (the real MCP servers are tests/responses/test_mcp*.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import typing
from dataclasses import dataclass

import jsonschema
import openai
import pydantic
import pytest
import uvicorn

from ember import AsyncEngine, CacheConfig, EngineConfig
from ember.responses.run import LoopLimits
from ember.server.app import ServerState, create_app
from ember.server.platform import BATCH_PRIORITY, Platform
from tests.e2e.conftest import MODEL, free_port, wait_until

KEYS = ["key-a", "key-b"]
DIGIT = {"type": "integer", "enum": [1, 2, 3, 4, 5]}
ADD_SCHEMA = {"type": "object", "properties": {"a": DIGIT, "b": DIGIT}, "required": ["a", "b"]}
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": DIGIT},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
JSON_FORMAT = {"format": {"type": "json_schema", "name": "answer", "schema": ANSWER_SCHEMA, "strict": True}}


class Answer(pydantic.BaseModel):
    ok: bool
    n: typing.Literal[1, 2, 3, 4, 5]


CALC = {"type": "mcp", "server_label": "calc", "require_approval": "never"}


@dataclass
class FakeTool:
    name: str
    description: str
    input_schema: dict


@dataclass
class FakeResult:
    output: str | None
    error: str | None


class FakeHub:
    """The McpHub interface (ember/responses/mcp.py) without servers: `calc` adds, `broken` always fails,
    `slow` sleeps past any sane limit, `big` answers a megabyte."""

    labels = ["calc", "broken", "slow", "big"]

    def __init__(self):
        self.calls: list[tuple[str, str, dict]] = []
        self.listed: list[str] = []

    async def list_tools(self, label: str) -> list[FakeTool]:
        self.listed.append(label)
        return {
            "calc": [FakeTool("add", "Add two small integers", ADD_SCHEMA)],
            "broken": [FakeTool("explode", "Always fails", ADD_SCHEMA)],
            "slow": [FakeTool("wait", "Takes forever", ADD_SCHEMA)],
            "big": [FakeTool("dump", "Says a lot", ADD_SCHEMA)],
        }[label]

    async def call(
        self, label: str, name: str, arguments: dict, timeout_s: float | None = None
    ) -> FakeResult:
        self.calls.append((label, name, arguments))
        if name == "explode":
            return FakeResult(None, "the tool crashed: division by zero")
        if name == "wait":
            await asyncio.sleep(60)
        if name == "dump":
            return FakeResult("x" * (1 << 20), None)
        return FakeResult(str(arguments["a"] + arguments["b"]), None)


@pytest.fixture(scope="module")
def served(random_model_dirs, tmp_path_factory):
    """(url, hub, app) of a server with two keys, the store and the fake hub."""
    root = tmp_path_factory.mktemp("responses")
    hub = FakeHub()
    state = ServerState(
        api_keys=list(KEYS), platform=Platform.open(root, f"sqlite:///{root}/ember.db", 1 << 20), mcp=hub
    )
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
        thread.join(timeout=10)
        engine.shutdown()


def client(served, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=key, max_retries=0)


@contextlib.contextmanager
def limits(served, **kw):
    feature = served[2].state.responses
    before = feature.limits
    feature.limits = LoopLimits(**kw)
    try:
        yield
    finally:
        feature.limits = before


def test_a_plain_response_has_a_message_and_usage(served):
    r = client(served).responses.create(model=MODEL, input="Hello there", max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert [o.type for o in r.output] == ["message"]
    assert r.output[0].role == "assistant" and r.output_text == r.output[0].content[0].text
    u = r.usage
    assert u.input_tokens > 0 and u.total_tokens == u.input_tokens + u.output_tokens
    # The random model rarely stops by itself: cut at max_output_tokens, as OpenAI reports it.
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and u.output_tokens == 8
    else:
        assert r.status == "completed" and u.output_tokens <= 8


def test_streamed_events_come_in_openais_order(served):
    with client(served).responses.stream(model=MODEL, input="Hi", temperature=0, text=JSON_FORMAT) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == events[-4].text
    jsonschema.validate(json.loads(text), ANSWER_SCHEMA)
    assert final.status == "completed" and final.usage.output_tokens > 0


def test_a_streamed_function_call_streams_its_arguments(served):
    tool = {"type": "function", "name": "get_weather", "parameters": CITY_SCHEMA}
    stream = client(served).responses.create(
        model=MODEL, input="Weather?", tools=[tool], tool_choice="required", temperature=0, stream=True
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == events[-3].arguments == events[-1].response.output[0].arguments
    jsonschema.validate(json.loads(args), CITY_SCHEMA)


def test_a_function_tool_round_trip_continues_from_the_cache(served):
    c = client(served)
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "The weather",
        "parameters": CITY_SCHEMA,
    }
    first = c.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[tool],
        tool_choice="required",
        temperature=0,
    )
    assert first.status == "completed"
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls and all(o.name == "get_weather" and o.call_id.startswith("call_") for o in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), CITY_SCHEMA)
    outputs = [{"type": "function_call_output", "call_id": o.call_id, "output": "sunny, 21 C"} for o in calls]
    second = c.responses.create(
        model=MODEL,
        input=outputs,
        previous_response_id=first.id,
        tools=[tool],
        max_output_tokens=6,
        temperature=0,
    )
    assert second.previous_response_id == first.id
    assert second.output[0].type in ("message", "function_call")
    # The prompt is the first turn's and more: the cache serves it up to the tool note of the system
    # message, which says "You must call at least one tool" only under tool_choice required.
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > first.usage.input_tokens_details.cached_tokens


def test_a_continuation_is_served_from_the_prefix_cache(served):
    c = client(served)
    first = c.responses.create(
        model=MODEL, instructions="Answer briefly.", input="Tell me a story about a cat", max_output_tokens=20
    )
    second = c.responses.create(
        model=MODEL,
        instructions="Answer briefly.",
        input="And then?",
        previous_response_id=first.id,
        max_output_tokens=4,
    )
    # Every full KV block of the first prompt is reused (16 tokens a block), and its answer follows it.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 16 * 16


def test_json_schema_output_is_always_valid(served):
    c = client(served)
    for prompt in ("Answer in JSON", "Is it raining?"):
        r = c.responses.create(model=MODEL, input=prompt, text=JSON_FORMAT, temperature=1.0)
        assert r.text.format.type == "json_schema" and r.text.format.name == "answer"
        jsonschema.validate(json.loads(r.output_text), ANSWER_SCHEMA)
    parsed = c.responses.parse(model=MODEL, input="Parse me", text_format=Answer, temperature=0)
    assert isinstance(parsed.output_parsed, Answer) and 1 <= parsed.output_parsed.n <= 5


def test_a_stored_response_is_retrieved_listed_and_deleted(served):
    c = client(served)
    r = c.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Remember me"}]}],
        instructions="Be brief",
        max_output_tokens=4,
        metadata={"run": "42"},
        temperature=0,
    )
    got = c.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"run": "42"}
    assert got.instructions == "Be brief" and got.usage.input_tokens == r.usage.input_tokens
    items = c.responses.input_items.list(r.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "Remember me")]
    c.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    unstored = c.responses.create(model=MODEL, input="Forget me", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model=MODEL, input="And?", previous_response_id=unstored.id, max_output_tokens=2)


def test_another_key_cannot_see_read_delete_or_continue_a_response(served):
    mine = client(served).responses.create(model=MODEL, input="Mine", max_output_tokens=2)
    other = client(served, "key-b")
    for attempt in (
        lambda: other.responses.retrieve(mine.id),
        lambda: other.responses.delete(mine.id),
        lambda: other.responses.input_items.list(mine.id),
        lambda: other.responses.create(
            model=MODEL, input="x", previous_response_id=mine.id, max_output_tokens=2
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert client(served).responses.retrieve(mine.id).id == mine.id  # still there for its owner


def test_input_items_page_in_both_orders(served):
    c = client(served)
    given = [{"role": "user", "content": f"line {i}"} for i in range(3)]
    r = c.responses.create(model=MODEL, input=given, max_output_tokens=2)
    desc = c.responses.input_items.list(r.id).data
    assert [i.content[0].text for i in desc] == ["line 2", "line 1", "line 0"]
    page = c.responses.input_items.list(r.id, order="asc", limit=1, after=desc[-1].id)
    assert [i.content[0].text for i in page.data] == ["line 1"] and page.has_more


def test_the_server_side_loop_runs_two_mcp_calls_then_answers(served):
    hub = served[1]
    hub.calls.clear()
    r = client(served).responses.create(
        model=MODEL,
        input="Add 2 and 3, then add 4 to that",
        tools=[CALC],
        tool_choice="required",
        max_tool_calls=2,
        max_output_tokens=96,
        temperature=0,
    )
    kinds = [o.type for o in r.output]
    assert kinds[0] == "mcp_list_tools" and r.output[0].tools[0].name == "add"
    mcp = [o for o in r.output if o.type == "mcp_call"]
    assert len(mcp) == 2 == len(hub.calls)
    for item, (label, name, arguments) in zip(mcp, hub.calls, strict=True):
        assert (item.server_label, item.name, label, name) == ("calc", "add", "calc", "add")
        jsonschema.validate(json.loads(item.arguments), ADD_SCHEMA)
        assert json.loads(item.arguments) == arguments
        assert item.output == str(arguments["a"] + arguments["b"]) and item.error is None
    assert kinds[-1] == "message"  # the tool budget spent, the last turn answers
    assert r.status in ("completed", "incomplete")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"


def test_a_failing_tool_is_an_error_item_and_the_loop_goes_on(served):
    r = client(served).responses.create(
        model=MODEL,
        input="Explode",
        tools=[{"type": "mcp", "server_label": "broken", "require_approval": "never"}],
        tool_choice="required",
        max_tool_calls=1,
        max_output_tokens=48,
        temperature=0,
    )
    call = next(o for o in r.output if o.type == "mcp_call")
    assert call.status == "failed" and call.output is None
    assert "division by zero" in call.error.content[0]["text"]
    assert r.output[-1].type == "message"


def test_a_caller_that_never_stops_ends_incomplete_at_the_turn_limit(served):
    with limits(served, max_turns=2):
        r = client(served).responses.create(
            model=MODEL, input="Keep adding", tools=[CALC], tool_choice="required", temperature=0
        )
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_turns"
    assert sum(o.type == "mcp_call" for o in r.output) >= 2


def test_a_hanging_tool_is_an_error_item_and_the_wall_time_bounds_the_response(served):
    slow = [{"type": "mcp", "server_label": "slow", "require_approval": "never"}]
    body = {"model": MODEL, "input": "Wait", "tools": slow, "tool_choice": "required", "temperature": 0}
    with limits(served, tool_timeout_s=0.5):
        r = client(served).responses.create(**body, max_tool_calls=1, max_output_tokens=48)
    call = next(o for o in r.output if o.type == "mcp_call")
    assert call.status == "failed" and "did not answer" in call.error.content[0]["text"]
    assert r.output[-1].type == "message"
    with limits(served, max_seconds=2.0):  # the tool's own timeout (30 s) is cut by the response's
        r = client(served).responses.create(**body)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_time"
    assert all(o.status != "in_progress" for o in r.output if o.type != "mcp_list_tools")


def test_a_tool_output_too_long_for_the_context_fails_the_response_not_the_server(served):
    big = [{"type": "mcp", "server_label": "big", "require_approval": "never"}]
    r = client(served).responses.create(
        model=MODEL, input="Dump", tools=big, tool_choice="required", max_tool_calls=1, temperature=0
    )
    assert r.status == "failed" and r.error.code == "invalid_prompt"
    assert next(o for o in r.output if o.type == "mcp_call").output == "x" * (1 << 20)
    assert client(served).responses.create(model=MODEL, input="Still here?", max_output_tokens=2).output


def test_a_streamed_mcp_call_reports_its_progress(served):
    events = list(
        client(served).responses.create(
            model=MODEL,
            input="Add",
            tools=[CALC],
            tool_choice="required",
            max_tool_calls=1,
            max_output_tokens=30,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    start = kinds.index("response.mcp_call.in_progress")
    assert kinds[start - 1] == "response.output_item.added" and events[start - 1].item.type == "mcp_call"
    end = kinds.index("response.mcp_call.completed")
    assert set(kinds[start + 1 : end - 1]) == {"response.mcp_call_arguments.delta"}
    assert (
        kinds[end - 1] == "response.mcp_call_arguments.done" and kinds[end + 1] == "response.output_item.done"
    )
    assert kinds[-1] in ("response.completed", "response.incomplete")


def test_a_continuation_lists_no_tools_again(served):
    c = client(served)
    hub = served[1]
    first = c.responses.create(
        model=MODEL, input="Add", tools=[CALC], tool_choice="required", max_tool_calls=1, max_output_tokens=30
    )
    listed = len(hub.listed)
    second = c.responses.create(
        model=MODEL, input="More", previous_response_id=first.id, tools=[CALC], max_output_tokens=4
    )
    assert len(hub.listed) == listed and all(o.type != "mcp_list_tools" for o in second.output)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"bogus": 1}, "bogus"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        (
            {"tools": [{"type": "mcp", "server_label": "nope", "require_approval": "never"}]},
            "tools[0].server_label",
        ),
        ({"tools": [{**CALC, "require_approval": "always"}]}, "tools[0].require_approval"),
        ({"tools": [{**CALC, "server_url": "https://example.com/mcp"}]}, "tools[0].server_url"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [CALC], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ],
)
def test_what_is_not_served_is_a_400_naming_the_field(served, extra, param):
    body = {"model": MODEL, "input": "Hi", **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client(served).post("/responses", body=body, cast_to=object)
    assert caught.value.body["param"] == param


def test_batches_run_a_response_through_the_internal_endpoint(served):
    app = served[2]
    ctx = app.state.platform
    assert "/v1/responses" in ctx.endpoints
    tenant = app.state.ember.tenant("key-a")

    async def go():
        ok = await ctx.call(
            "/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 3}, tenant, BATCH_PRIORITY
        )
        streamed = await ctx.call("/v1/responses", {"model": MODEL, "input": "Hi", "stream": True}, tenant, 0)
        return ok, streamed

    ok, streamed = asyncio.run(go())  # the engine takes requests from any event loop
    assert ok.ok and ok.body["object"] == "response" and ok.body["usage"]["output_tokens"] <= 3
    assert streamed.status == 400 and streamed.body["error"]["param"] == "stream"
    stored = client(served).responses.retrieve(ok.body["id"])  # stored for the tenant it ran for
    assert stored.id == ok.body["id"]
