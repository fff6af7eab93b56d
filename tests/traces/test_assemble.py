"""A stream put back together equals the chat.completion of the same answer unstreamed."""

from __future__ import annotations

from ember.traces.assemble import assemble


def _chunk(delta: dict, reason=None, index=0) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "m",
        "choices": [choice],
    }


def test_content_tool_calls_and_usage_are_put_back_together():
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    chunks = [
        _chunk({"role": "assistant", "content": "Hel"}),
        _chunk({"content": "lo"}),
        _chunk({"role": "assistant", "content": "B"}, index=1),
        _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}]}, index=1),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}, "tool_calls", index=1),
        _chunk({"content": ""}, "stop"),
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m", "choices": [], "usage": usage},
    ]  # fmt: skip
    out = assemble(chunks)
    assert out["object"] == "chat.completion" and out["id"] == "chatcmpl-1" and out["usage"] == usage
    first, second = out["choices"]
    assert first["message"]["content"] == "Hello" and first["finish_reason"] == "stop"
    assert first["message"]["tool_calls"] is None
    call = second["message"]["tool_calls"][0]
    assert call == {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert second["finish_reason"] == "tool_calls" and second["message"]["content"] == "B"
