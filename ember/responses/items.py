"""Items, the Responses API's unit of conversation, in their chat form: what the model reads of a
conversation, so that a continuation renders the previous turn's prompt and output first, token for token,
and the prefix cache serves them.

A turn's calls (function_call and mcp_call items in a row) are one assistant message with tool_calls; an
mcp_call carries its own result, a function_call's comes in a later function_call_output. Output items
keep the model turn that made them in a private `_turn` (stored, never shown: `public`), so two turns of one
call each are not read back as one turn of two parallel calls.
"""

from __future__ import annotations

import json
import re
import secrets

PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "mcp_call": "mcp",
    "mcp_list_tools": "mcpl",
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def with_ids(items: list[dict]) -> list[dict]:
    """The items, each with an id (a client's own kept)."""
    return [item if "id" in item else {"id": new_id(PREFIXES[item["type"]]), **item} for item in items]


def mcp_error_text(error: dict | str | None) -> str:
    """What the model reads of a failed MCP call."""
    if isinstance(error, dict):
        content = error.get("content")
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(error.get("message") or content or error)
    return str(error)


def to_messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """The chat messages (ChatMessage dicts) for `instructions` and a conversation's items."""
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    calls: list[dict] = []  # the current turn's calls
    results: list[dict] = []  # the tool messages of its mcp calls, in call order

    def flush() -> None:
        if calls:
            messages.append({"role": "assistant", "content": None, "tool_calls": list(calls)})
            messages.extend(results)
            calls.clear()
            results.clear()

    turn = None
    for item in items:
        kind = item["type"]
        if kind in ("function_call", "mcp_call") and item.get("_turn") != turn:
            flush()  # the calls of another model turn
        turn = item.get("_turn")
        if kind == "function_call":
            calls.append(_call(item["call_id"], item["name"], item["arguments"]))
        elif kind == "mcp_call":
            calls.append(_call(item["id"], item["name"], item["arguments"]))
            if item.get("error") is not None:
                text = "error: " + mcp_error_text(item["error"])
            else:
                text = item.get("output") or ""
            results.append({"role": "tool", "tool_call_id": item["id"], "content": text})
        elif kind == "function_call_output":
            flush()
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        elif kind == "message":
            flush()
            text = "".join(p["text"] for p in item["content"])
            messages.append({"role": item["role"], "content": text})
        # mcp_list_tools: what the server offered, not something the model reads as a turn
    flush()
    return messages


def chat_name(name: str) -> str:
    """An MCP tool's name as a chat function name (letters, digits, '_', '-'; at most 64)."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64] or "_"


def public(item: dict) -> dict:
    """The item as a client sees it (without the server's private keys)."""
    return {k: v for k, v in item.items() if not k.startswith("_")}


def _call(call_id: str, name: str, arguments: str) -> dict:
    try:  # the history renders arguments as JSON: text that is not JSON is kept as a string
        json.loads(arguments)
    except json.JSONDecodeError:
        arguments = json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# -- output items, as the response object and the stream carry them ------------------------------------


def message(item_id: str, text: str, status: str) -> dict:
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def function_call(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def mcp_call(item_id: str, label: str, name: str, arguments: str, status: str) -> dict:
    return {
        "id": item_id,
        "type": "mcp_call",
        "server_label": label,
        "name": name,
        "arguments": arguments,
        "output": None,
        "error": None,
        "status": status,
    }


def mcp_list_tools(label: str, tools: list) -> dict:
    """`tools`: the hub's McpTool objects (name, description, input_schema)."""
    listed = [
        {"name": t.name, "description": t.description, "input_schema": t.input_schema, "annotations": None}
        for t in tools
    ]
    return {"id": new_id("mcpl"), "type": "mcp_list_tools", "server_label": label, "tools": listed}
