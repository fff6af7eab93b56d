"""A streamed chat completion put back together: the chat.completion object a non-streamed request would
have answered, from the chunks the client got (content and tool-call arguments concatenated per choice,
logprobs appended, the last finish_reason, the usage chunk's usage)."""

from __future__ import annotations


def assemble(chunks: list[dict]) -> dict:
    """chat.completion.chunk dicts, in order -> one chat.completion dict."""
    choices: dict[int, dict] = {}
    usage = None
    pipeline = None  # a pipeline's trace (ember.pipelines.serve), on a chunk of its own
    head = chunks[0] if chunks else {}
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk.get("pipeline"):
            pipeline = chunk["pipeline"]
        for c in chunk.get("choices", ()):
            choice = choices.setdefault(
                c["index"],
                {
                    "index": c["index"],
                    "message": {"role": "assistant", "content": None, "refusal": None, "tool_calls": None},
                    "logprobs": None,
                    "finish_reason": None,
                },
            )
            _add_delta(choice["message"], c.get("delta") or {})
            if c.get("logprobs"):
                lp = choice["logprobs"] = choice["logprobs"] or {"content": []}
                lp["content"].extend(c["logprobs"].get("content") or [])
            if c.get("finish_reason"):
                choice["finish_reason"] = c["finish_reason"]
    out = {
        "id": head.get("id"),
        "object": "chat.completion",
        "created": head.get("created"),
        "model": head.get("model"),
        "choices": [choices[i] for i in sorted(choices)],
    }
    if "system_fingerprint" in head:
        out["system_fingerprint"] = head["system_fingerprint"]
    if usage is not None:
        out["usage"] = usage
    if pipeline is not None:
        out["pipeline"] = pipeline
    return out


def _add_delta(message: dict, delta: dict) -> None:
    if delta.get("role"):
        message["role"] = delta["role"]
    if delta.get("content"):
        message["content"] = (message["content"] or "") + delta["content"]
    for call in delta.get("tool_calls") or ():
        calls = message["tool_calls"] = message["tool_calls"] or []
        i = call.get("index", len(calls))
        while len(calls) <= i:
            calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        into = calls[i]
        if call.get("id"):
            into["id"] = call["id"]
        fn = call.get("function") or {}
        if fn.get("name"):
            into["function"]["name"] += fn["name"]
        if fn.get("arguments"):
            into["function"]["arguments"] += fn["arguments"]
