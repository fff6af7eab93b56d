"""The server-side loop's last turn (the call budget spent: no more calls) keeps the prompt the call turns
had, so that its prompt extends theirs token for token and the prefix cache serves the whole conversation;
tool_choice none alone renders another prompt from the first message on."""

from __future__ import annotations

import json

import pytest

from ember.protocol.requests import ChatCompletionRequest
from ember.protocol.tools import constraint, prompt_ids
from ember.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": SCHEMA}} for n in ("add", "multiply")]
USER = {"role": "user", "content": "Add 40 and 2."}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "add", "arguments": json.dumps({"a": 40, "b": 2})},
}
AFTER = [
    USER,
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


def request(messages: list[dict], choice, keep: str | None = None) -> ChatCompletionRequest:
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": messages, "tools": TOOLS, "tool_choice": choice}
    )
    if keep is not None:
        body.keep_prompt_tools(keep)
    return body


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("choice", ["required", "auto", {"type": "function", "function": {"name": "add"}}])
def test_the_last_turn_extends_the_call_turns_prompt(tokenizer, choice):
    mode = choice if isinstance(choice, str) else "add"
    first = prompt_ids(request([USER], choice), tokenizer)
    called = first + tokenizer.hf.encode(
        '<tool_call>\n{"name": "add", "arguments": {"a": 40, "b": 2}}\n</tool_call>', add_special_tokens=False
    )
    kept = request(AFTER, "none", keep=mode)
    last = prompt_ids(kept, tokenizer)
    assert common(called, last) == len(called)  # the whole first turn, its call included, is a prefix
    assert kept.tool_mode() is None and constraint(kept) is None  # and the turn decodes text: no calls
    dropped = prompt_ids(request(AFTER, "none"), tokenizer)
    assert common(first, dropped) < 16  # what tool_choice none alone would cost: the whole conversation


def test_a_client_cannot_ask_for_it():
    body = {
        "model": "m",
        "messages": [USER],
        "tools": TOOLS,
        "tool_choice": "none",
        "_prompt_tool_mode": "required",
    }
    assert ChatCompletionRequest.model_validate(body).prompt_tool_mode() is None
