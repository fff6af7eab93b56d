"""Function calling's pieces: prompt rendering, the call grammar, and reading calls back, whole or streamed."""

from __future__ import annotations

import json
import random

import llguidance
import llguidance.hf
import pytest

from ember.protocol import tools
from ember.protocol.requests import ChatCompletionRequest
from tests.fixtures_tokenizer import smollm2_tokenizer
from tests.helpers import ADD

CITY = {
    "type": "function",
    "function": {
        "name": "city_info",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TWO_CALLS = (
    '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
    '<tool_call>\n{"name": "city_info", "arguments": {"city": "Zürich \\"}\\n</tool_call>\\""}}\n</tool_call>'
)


def _body(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="m", messages=kw.pop("messages", [{"role": "user", "content": "hi"}]), **kw
    )


def test_parse_reads_calls_and_keeps_the_arguments_text():
    calls = tools.parse(TWO_CALLS)
    assert [c["function"]["name"] for c in calls] == ["add", "city_info"]
    assert calls[0]["function"]["arguments"] == '{"a": 2, "b": 3}'
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": 'Zürich "}\n</tool_call>"'}
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert tools.parse("Hello") is None


def test_parse_keeps_the_complete_calls_of_an_output_cut_short():
    first = TWO_CALLS.split("\n<tool_call>")[0]
    # cut by max_tokens inside the second call: the first comes back, the tail is dropped
    assert [c["function"]["name"] for c in tools.parse(TWO_CALLS[:-5])] == ["add"]
    assert [c["function"]["name"] for c in tools.parse(first + '\n<tool_call>\n{"na')] == ["add"]
    assert tools.parse('<tool_call>\n{"name": "ad') == []  # calls, none finished: still not content
    assert tools.parse("<tool") == []
    # a call repeated word for word is one call
    assert len(tools.parse(first + "\n" + first + "\n" + first)) == 1


def _choice(text: str, reason: str, mode: str = "required") -> dict:
    from ember.outputs import CompletionOutput
    from ember.protocol.format import chat_choice

    out = CompletionOutput(index=0, text=text, token_ids=[], finish_reason=reason)
    return chat_choice(out, 0, None, mode)


def test_a_forced_call_cut_by_max_tokens_comes_back_as_tool_calls():
    """The issue's case: the model began a second call and ran out of tokens in it."""
    choice = _choice(TWO_CALLS[:-5], "length")
    assert choice["message"]["content"] is None
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["add"]
    assert choice["finish_reason"] == "tool_calls"
    nothing = _choice('<tool_call>\n{"name": "ad', "length")
    assert nothing["message"]["content"] is None and nothing["message"]["tool_calls"] is None
    assert nothing["finish_reason"] == "length"
    assert _choice("Hi there", "stop", "auto")["message"]["content"] == "Hi there"


def test_a_stream_cut_between_calls_ends_as_tool_calls_and_inside_one_as_length():
    first = TWO_CALLS.split("\n<tool_call>")[0]
    between = tools.CallStream(forced=True)
    between.feed(first + '\n<tool_call>\n{"na')
    assert between.finish_reason("length") == "tool_calls"
    inside = tools.CallStream(forced=True)
    inside.feed(TWO_CALLS[:-5])
    assert inside.finish_reason("length") == "length"  # its arguments were already streamed half-way
    assert tools.CallStream(forced=True).finish_reason("length") == "length"


@pytest.mark.parametrize("seed", range(6))
def test_streamed_calls_reassemble_to_the_parsed_ones(seed):
    rng = random.Random(seed)
    cuts = (
        sorted(rng.sample(range(1, len(TWO_CALLS)), rng.randint(1, 40)))
        if seed
        else list(range(1, len(TWO_CALLS)))
    )
    pieces = [TWO_CALLS[i:j] for i, j in zip([0, *cuts], [*cuts, len(TWO_CALLS)], strict=True)]
    stream = tools.CallStream(forced=seed % 2 == 0)
    merged: dict[int, dict] = {}
    for piece in pieces:
        content, deltas = stream.feed(piece)
        assert not content
        for d in deltas:
            entry = merged.setdefault(d["index"], {"name": "", "arguments": ""})
            if "id" in d:
                entry["name"] = d["function"]["name"]
            entry["arguments"] += d["function"]["arguments"]
    want = [(c["function"]["name"], c["function"]["arguments"]) for c in tools.parse(TWO_CALLS)]
    assert [(merged[i]["name"], merged[i]["arguments"]) for i in sorted(merged)] == want
    assert stream.made_calls


def test_auto_stream_passes_text_through():
    stream = tools.CallStream(forced=False)
    assert stream.feed("") == ("", [])
    assert stream.feed("Hel") == ("Hel", [])
    assert stream.feed("lo <tool_call>") == ("lo <tool_call>", [])
    assert not stream.made_calls


def test_fallback_rendering_describes_tools_and_rewrites_the_history():
    body = _body(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+3 and 4+5?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "add", "arguments": '{"a":2,"b":3}'},
                    },
                    {
                        "id": "c2",
                        "type": "function",
                        "function": {"name": "add", "arguments": '{"a":4,"b":5}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "5"},
            {"role": "tool", "tool_call_id": "c2", "content": "9"},
        ],
        tools=[ADD],
        tool_choice="required",
    )
    messages, tool_defs = tools.render(body, template="{{ messages }}")
    assert tool_defs is None
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert (
        '"name": "add"' in messages[0]["content"] and "must call at least one tool" in messages[0]["content"]
    )
    assert messages[2] == {
        "role": "assistant",
        "content": tools._format_call("add", {"a": 2, "b": 3})
        + "\n"
        + tools._format_call("add", {"a": 4, "b": 5}),
    }
    assert messages[3] == {
        "role": "user",
        "content": "<tool_response>\n5\n</tool_response>\n<tool_response>\n9\n</tool_response>",
    }
    assert len(messages) == 4
    # the history's calls are in the very format the grammar makes the model write
    assert tools.parse(messages[2]["content"])[1]["function"]["arguments"] == '{"a": 4, "b": 5}'


def test_templates_that_know_tools_get_them():
    body = _body(tools=[ADD], messages=[{"role": "user", "content": "hi"}])
    messages, tool_defs = tools.render(body, template="{% for t in tools %}{{ t }}{% endfor %}")
    assert tool_defs == [ADD] and messages == [{"role": "user", "content": "hi"}]
    # tool_choice none: no tools in play
    assert tools.render(_body(tools=[ADD], tool_choice="none"), template="tools")[1] is None


@pytest.fixture(scope="module")
def llg():
    tok = smollm2_tokenizer()
    return tok, llguidance.hf.from_tokenizer(tok.hf, n_vocab=49152, eos_token=[2])


def _accepts(llg, grammar: str, text: str) -> bool:
    tok, llt = llg
    m = llguidance.LLMatcher(llt, grammar)
    assert not m.is_error(), m.get_error()
    ids = tok.encode(text, add_special_tokens=False)
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


def _grammar(body) -> str:
    return tools.constraint(body).grammar_text()


def test_the_call_grammar_allows_declared_calls_only(llg):
    required = _grammar(_body(tools=[ADD, CITY], tool_choice="required"))
    assert _accepts(llg, required, TWO_CALLS)
    assert not _accepts(llg, required, "Hello")
    assert not _accepts(
        llg, required, '<tool_call>\n{"name": "sub", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    )
    assert not _accepts(llg, required, '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>')
    assert not _accepts(
        llg, required, '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3, "c": 1}}\n</tool_call>'
    )
    single = _grammar(_body(tools=[ADD, CITY], tool_choice="required", parallel_tool_calls=False))
    assert not _accepts(llg, single, TWO_CALLS)
    named = _grammar(
        _body(tools=[ADD, CITY], tool_choice={"type": "function", "function": {"name": "city_info"}})
    )
    assert not _accepts(llg, named, TWO_CALLS.split("\n<tool_call>")[0])
    assert _accepts(
        llg, named, '<tool_call>\n{"name": "city_info", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    auto = _grammar(_body(tools=[ADD, CITY]))
    assert _accepts(llg, auto, "Just text, no calls.") and _accepts(llg, auto, TWO_CALLS)
    assert not _accepts(llg, auto, '<tool_call>\n{"name": "sub"')
    assert tools.constraint(_body(tools=[ADD], tool_choice="none")) is None


def _call(name: str, args: dict) -> str:
    return tools._format_call(name, args)


def test_parallel_calls_are_bounded_so_a_model_cannot_loop(llg):
    """By default each declared tool is called at most once a turn; max_tool_calls asks for more."""
    add, city = _call("add", {"a": 1, "b": 2}), _call("city_info", {"city": "Oslo"})
    required = _grammar(_body(tools=[ADD, CITY], tool_choice="required"))
    assert _accepts(llg, required, add + "\n" + city) and _accepts(llg, required, city + "\n" + add)
    assert not _accepts(llg, required, add + "\n" + add)
    assert not _accepts(llg, required, add + "\n" + city + "\n" + add)
    auto = _grammar(_body(tools=[ADD, CITY]))
    assert _accepts(llg, auto, city) and not _accepts(llg, auto, city + "\n" + city)
    two = _grammar(_body(tools=[ADD, CITY], tool_choice="required", max_tool_calls=2))
    assert _accepts(llg, two, add + "\n" + _call("add", {"a": 3, "b": 4}))
    assert not _accepts(llg, two, add + "\n" + add + "\n" + add)
    # past DISTINCT_TOOLS_MAX tools, the count is bounded by the number of tools
    many = [
        {
            "type": "function",
            "function": {"name": f"t{i}", "parameters": {"type": "object", "properties": {}}},
        }
        for i in range(tools.DISTINCT_TOOLS_MAX + 1)
    ]
    wide = _grammar(_body(tools=many, tool_choice="required"))
    calls = [_call(f"t{i}", {}) for i in range(len(many))]
    assert _accepts(llg, wide, "\n".join(calls))
    assert not _accepts(llg, wide, "\n".join(calls + calls[:1]))
