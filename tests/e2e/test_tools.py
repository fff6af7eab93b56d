"""Function calling through the official SDK, on the real default model (whose template knows no tools,
so the fallback format is what runs): forced calls are always declared functions with arguments that
validate; parallel calls parse; a full round trip works; streamed deltas reassemble to the same calls."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.e2e.conftest import MODEL, wait_idle
from tests.helpers import ADD

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris? And what is 2+3?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _check_calls(message, allowed: set[str]) -> list[tuple[str, dict]]:
    assert message.tool_calls, message.content
    assert message.content is None
    calls = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        calls.append((call.function.name, args))
    return calls


def _streamed(client, **kwargs):
    """Tool calls reassembled from the deltas as the SDK's users do: merged by index, name first."""
    calls: dict[int, dict] = {}
    content, reason = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            content += c.delta.content or ""
            reason = c.finish_reason or reason
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                if d.id:
                    assert entry["id"] is None, "a call's id comes once, first"
                    entry["id"] = d.id
                    assert d.function.name, "the name comes with the first delta"
                    entry["name"] = d.function.name
                else:
                    assert not d.function.name
                entry["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)], content, reason


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_and_named_choices_always_yield_valid_calls(client, temperature):
    prompts = [
        "What is the weather in Paris?",
        "What is 17 plus 25?",
        "Tell me a joke.",  # nothing to call for, but a call is required all the same
        "Is it raining in Oslo right now, in fahrenheit?",
    ]
    choices = ["required", "get_weather", "add"]

    def ask(case: tuple[int, str]):
        i, choice = case
        common = dict(
            model=MODEL,
            messages=[{"role": "user", "content": prompts[i]}],
            tools=TOOLS,
            temperature=temperature,
            seed=i,
            max_tokens=200,
        )
        if choice == "required":
            return client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **common)
        return client.chat.completions.create(
            tool_choice={"type": "function", "function": {"name": choice}}, **common
        )

    cases = [(i, choice) for i in range(len(prompts)) for choice in choices]
    with ThreadPoolExecutor(len(cases)) as pool:  # one batch in the engine, not twelve in a row
        answers = list(pool.map(ask, cases))
    for (_, choice), r in zip(cases, answers, strict=True):
        assert r.choices[0].finish_reason == "tool_calls"
        if choice == "required":
            assert len(_check_calls(r.choices[0].message, {"get_weather", "add"})) == 1
        else:
            assert [n for n, _ in _check_calls(r.choices[0].message, {choice})] == [choice]


@pytest.mark.slow
def test_parallel_calls_parse(client):
    # presence_penalty keeps this small model from repeating the same call until max_tokens.
    r = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        presence_penalty=1.5,
        max_tokens=200,
    )
    calls = _check_calls(r.choices[0].message, {"get_weather", "add"})
    assert r.choices[0].finish_reason == "tool_calls"
    assert [n for n, _ in calls] == ["get_weather", "add"]
    assert calls[0][1]["city"] == "Paris" and calls[1][1] == {"a": 2, "b": 3}


@pytest.mark.slow
def test_streamed_calls_reassemble_to_the_non_streamed_ones(client, server):
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        kwargs = dict(
            model=MODEL,
            messages=QUESTION,
            tools=TOOLS,
            tool_choice=choice,
            temperature=0,
            presence_penalty=1.5,
            max_tokens=200,
        )
        whole = client.chat.completions.create(**kwargs).choices[0]
        calls, content, reason = _streamed(client, **kwargs)
        assert reason == whole.finish_reason == "tool_calls"
        assert content == ""
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (t.function.name, t.function.arguments) for t in whole.message.tool_calls
        ]
    wait_idle(server[0])


@pytest.mark.slow
def test_round_trip_call_result_answer(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=100,
    )
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append(
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21, "sky": "sunny"})}
    )
    # The answer turn, the call and its result in the history. (This 135M model does not make much of the
    # result, and under `auto` it calls again: what is checked is the mechanics, and that the result was read.)
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=60
    )
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    without = client.chat.completions.create(model=MODEL, messages=messages[:1], max_tokens=1)
    assert final.usage.prompt_tokens > without.usage.prompt_tokens + 20  # the call and the result went in
    again = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=60
    )
    if again.choices[0].message.tool_calls:
        _check_calls(again.choices[0].message, {"get_weather", "add"})


def test_auto_streams_text_as_content(client):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        tools=TOOLS,
        tool_choice="auto",
        temperature=0,
        max_tokens=20,
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls, content, reason = _streamed(client, **kwargs)
    assert not whole.message.tool_calls and not calls
    assert content == whole.message.content and reason == whole.finish_reason


BAD_TOOLS = [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "bad name!"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "object",
    ),
    ({"tools": [WEATHER, WEATHER]}, "unique"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "128"),
    (
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}
            ],
            "tool_choice": "required",
        },
        "not",
    ),
    ({"tools": [ADD], "tool_choice": "sometimes"}, "tool_choice"),
    (
        {"tools": [ADD], "response_format": {"type": "grammar", "grammar": 'root ::= "x"'}},
        "response_format",
    ),
]


@pytest.mark.parametrize(("extra", "named"), BAD_TOOLS)
def test_bad_tool_definitions_are_400s(client, extra, named):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, **extra
        )
    assert named in e.value.message
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert r.choices  # still serving


def test_history_with_bad_arguments_is_a_400(client):
    messages = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{oops"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    with pytest.raises(openai.BadRequestError, match="not JSON"):
        client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "5"}], max_tokens=4)


TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("max_tokens", [100, 40])
@pytest.mark.parametrize("stream", [False, True])
def test_required_with_parallel_calls_on_returns_the_calls_it_made(client, max_tokens, stream):
    """LangChain's tool_choice="any": required, parallel calls on (the default). The default model used to
    repeat its call until max_tokens, and the complete first call came back as markup in `content`."""
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather in Oslo, in celsius?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=max_tokens,
        temperature=0,
    )
    schemas = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
    if stream:
        calls, content, reason = _streamed(client, **kwargs)
        names = [c["name"] for c in calls]
        args = [json.loads(c["arguments"]) for c in calls]
        assert content == ""
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.message.content is None
        names = [c.function.name for c in choice.message.tool_calls]
        args = [json.loads(c.function.arguments) for c in choice.message.tool_calls]
        reason = choice.finish_reason
    assert reason == "tool_calls"
    assert names[0] == "get_weather" and len(names) == len(set(names))  # no tool called twice
    assert args[0] == {"city": "Oslo", "unit": "celsius"}
    for name, a in zip(names, args, strict=True):
        jsonschema.validate(a, schemas[name])
