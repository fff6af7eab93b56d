"""The Responses request's parts: input items made canonical, and refusals that name the field."""

from __future__ import annotations

import pytest

from ember.errors import InvalidRequest
from ember.protocol.responses import ResponseRequest, input_items, mcp_tool, tool_choice


def test_input_becomes_canonical_items():
    assert input_items("hi") == [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "hi"}],
            "status": "completed",
        }
    ]
    (said,) = input_items([{"role": "assistant", "content": [{"type": "output_text", "text": "yo"}]}])
    assert said["content"][0] == {"type": "output_text", "text": "yo", "annotations": []}
    (out,) = input_items(
        [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_text", "text": "4"}]}]
    )
    assert out["output"] == "4"


@pytest.mark.parametrize(
    "value, param",
    [
        ([], "input"),
        ([{"role": "tool", "content": "x"}], "input[0].role"),
        ([{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}], "input[0].content[0]"),
        ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id"),
        ([{"type": "function_call_output", "call_id": "c", "output": "o", "extra": 1}], "input[0].extra"),
        ([{"type": "item_reference", "id": "x"}], "input[0].type"),
    ],
)
def test_bad_input_is_refused_by_its_place(value, param):
    with pytest.raises(InvalidRequest) as caught:
        input_items(value)
    assert caught.value.param == param


def test_text_format_and_tool_choice_map_to_chat():
    schema = {"type": "object"}
    req = ResponseRequest.model_validate(
        {
            "model": "m",
            "input": "x",
            "text": {"format": {"type": "json_schema", "name": "a", "schema": schema}},
        }
    )
    assert req.response_format() == {
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": schema, "strict": None},
    }
    assert ResponseRequest.model_validate({"model": "m", "input": "x"}).response_format() is None
    assert tool_choice(None) == "auto" and tool_choice("required") == "required"
    assert tool_choice({"type": "function", "name": "f"}) == {"type": "function", "function": {"name": "f"}}
    assert tool_choice({"type": "mcp", "server_label": "s", "name": "t"})["function"] == {"name": "t"}
    with pytest.raises(InvalidRequest):
        tool_choice({"type": "allowed_tools", "tools": []})


def test_mcp_tools_take_allowed_names_and_never_approval():
    spec, allowed = mcp_tool(
        {"type": "mcp", "server_label": "s", "allowed_tools": {"tool_names": ["a"]}}, "tools[0]"
    )
    assert spec["require_approval"] == "never" and allowed == {"a"}
    assert mcp_tool(
        {"type": "mcp", "server_label": "s", "require_approval": {"never": {"tool_names": ["a"]}}}, "t"
    )


def test_not_served_fields_are_refused_with_why():
    req = ResponseRequest.model_validate({"model": "m", "input": "x", "background": True})
    with pytest.raises(InvalidRequest, match="background"):
        req.check_supported()
