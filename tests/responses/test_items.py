"""Items in their chat form: turns kept apart, results after their calls, and a conversation that renders
the previous turn's prompt first, token for token (what lets the prefix cache serve a continuation)."""

from __future__ import annotations

import pytest

from ember.protocol import tools
from ember.protocol.requests import ChatCompletionRequest
from ember.protocol.responses import input_items
from ember.responses import items as it
from tests.fixtures_tokenizer import smollm2_tokenizer


def mcp(turn: int, n: int, error: str | None = None) -> dict:
    item = it.mcp_call(f"mcp_{n}", "calc", "add", '{"a": 1, "b": 2}', "completed")
    if error:
        item["error"] = {"type": "mcp_tool_execution_error", "content": [{"type": "text", "text": error}]}
    else:
        item["output"] = "3"
    return {**item, "_turn": turn}


def test_two_turns_of_one_call_are_not_one_turn_of_two():
    apart = it.to_messages(None, [mcp(1, 1), mcp(2, 2)])
    together = it.to_messages(None, [mcp(1, 1), mcp(1, 2)])
    assert [m["role"] for m in apart] == ["assistant", "tool", "assistant", "tool"]
    assert [m["role"] for m in together] == ["assistant", "tool", "tool"]
    assert [c["id"] for c in together[0]["tool_calls"]] == ["mcp_1", "mcp_2"]


def test_a_failed_call_is_read_as_its_error_and_function_outputs_follow_their_calls():
    call = it.function_call("fc_1", "call_1", "get_weather", '{"city": "Oslo"}', "completed")
    given = input_items([{"type": "function_call_output", "call_id": "call_1", "output": "rain"}])
    messages = it.to_messages("Be brief", [mcp(1, 1, error="boom"), call, *given])
    assert messages[0] == {"role": "system", "content": "Be brief"}
    assert messages[2] == {"role": "tool", "tool_call_id": "mcp_1", "content": "error: boom"}
    assert messages[3]["tool_calls"][0]["id"] == "call_1"
    assert messages[4] == {"role": "tool", "tool_call_id": "call_1", "content": "rain"}


def test_public_items_hide_the_turn():
    assert "_turn" not in it.public(mcp(1, 1)) and it.public(mcp(1, 1))["id"] == "mcp_1"
    assert it.chat_name("files.read/all") == "files_read_all"


@pytest.mark.parametrize("with_tools", [False, True])
def test_a_continuation_renders_the_previous_prompt_and_answer_first(with_tools):
    tok = smollm2_tokenizer()
    declared = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]

    def ids(items: list[dict]) -> list[int]:
        body = {"model": "m", "messages": it.to_messages("Be brief", items)}
        if with_tools:
            body.update(tools=declared, tool_choice="auto")
        return tools.prompt_ids(ChatCompletionRequest.model_validate(body), tok)

    first = input_items("What is 1 + 2?")
    answer = it.message("msg_1", "It is 3.", "completed")
    before = ids(first)
    after = ids([*first, answer, *input_items("And 2 + 2?")])
    generated = tok.encode("It is 3.")
    assert after[: len(before) + len(generated)] == before + generated
