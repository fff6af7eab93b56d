"""The Responses API's request body (POST /v1/responses) and its parts, validated into the canonical shapes
the server stores and converts to a chat request: input items, tools (function and mcp) and tool choice.

Items and tools are checked here by hand, not by a pydantic union: a client's mistake is then named by its
place in the body (`input[2].call_id`, `tools[0].require_approval`), as OpenAI names it.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from ember.errors import InvalidRequest
from ember.protocol import fields
from ember.protocol.requests import MAX_TOOL_CALLS, MAX_TOOLS, _Body

# Defined by OpenAI for /v1/responses, not served by ember: refused with what to do instead.
NOT_SERVED = {
    "background": "'background' responses are not supported; send the request and wait for it, or stream",
    "conversation": "'conversation' is not supported; continue a conversation with previous_response_id",
    "prompt": "'prompt' (stored prompt templates) is not supported; send instructions and input",
    "reasoning": "'reasoning' is not supported: the served models do not reason",
    "top_logprobs": "'top_logprobs' is not supported by /v1/responses here; use /v1/chat/completions",
    "context_management": "'context_management' (compaction) is not supported by this server",
    "moderation": "'moderation' is not supported by this server",
    "image": "'image' is not supported: this server generates text only",
    "access_programs": "'access_programs' is not supported by this server",
    "background_options": "'background_options' is not supported: background responses are not",
}
HOSTED_TOOLS = (
    "function and mcp tools are served; OpenAI's hosted tools (web search, file search, ...) are not"
)
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_METADATA = 16


class ResponseRequest(_Body):
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_tool_calls: int | None = Field(default=None, ge=1, le=MAX_TOOL_CALLS)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    text: dict[str, Any] | None = None
    store: bool = True  # as OpenAI: stored unless the client says not to
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: nothing to obfuscate here
    truncation: Literal["disabled"] | None = None  # "auto" would drop history silently: not done
    include: list[str] | None = Field(default=None, max_length=0)  # nothing extra to include
    # Accepted and not acted on: they describe the caller or its account, not what is computed.
    user: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None  # ember's prefix cache needs no hint
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > MAX_METADATA:
            raise ValueError(f"at most {MAX_METADATA} keys are allowed (got {len(v)})")
        for key, value in v.items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError(f"keys are at most 64 characters and values 512 (key '{key[:64]}')")
        return v

    def check_supported(self, allow_unknown: bool = False) -> None:
        extra = {k: v for k, v in (self.model_extra or {}).items() if v is not None}
        for name in extra:
            if name in NOT_SERVED:
                raise InvalidRequest(NOT_SERVED[name], param=name, code="unsupported_parameter")
        fields.check(extra, allow_unknown)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")

    def response_format(self) -> dict | None:
        """`text.format` as chat's response_format (None: free text)."""
        text = dict(self.text or {})
        fmt = text.pop("format", None)
        if text.get("verbosity") in (None, "medium"):  # the one verbosity there is
            text.pop("verbosity", None)
        if text:
            name = next(iter(text))
            raise InvalidRequest(f"'text.{name}' is not supported", param=f"text.{name}")
        if fmt is None:
            return None
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            schema = fmt.get("schema")
            if not isinstance(schema, dict):
                raise InvalidRequest(
                    "text.format of type 'json_schema' needs a 'schema' object", "text.format.schema"
                )
            return {
                "type": "json_schema",
                "json_schema": {
                    "name": fmt.get("name") or "response",
                    "schema": schema,
                    "strict": fmt.get("strict"),
                },
            }
        raise InvalidRequest(
            f"text.format.type must be 'text', 'json_schema' or 'json_object' (got {kind!r})",
            "text.format.type",
        )

    def text_config(self) -> dict:
        """`text` as the response object echoes it."""
        return {"format": (self.text or {}).get("format") or {"type": "text"}, "verbosity": "medium"}


# -- input items ---------------------------------------------------------------------------------------


def input_items(value: str | list[dict[str, Any]]) -> list[dict]:
    """The request's `input` as canonical items (ids not yet given): a string is one user message."""
    if isinstance(value, str):
        return [_message({"role": "user", "content": value}, "input")]
    if not value:
        raise InvalidRequest("input must not be an empty list", param="input")
    return [_item(item, f"input[{i}]") for i, item in enumerate(value)]


def _item(item: dict, where: str) -> dict:
    kind = item.get("type", "message")
    if kind == "message":
        return _message(item, where)
    if kind == "function_call":
        out = _take(item, where, ("call_id", "name", "arguments"), ("id", "status"))
        return {"type": "function_call", **out, "status": "completed"}
    if kind == "function_call_output":
        out = _take(item, where, ("call_id",), ("id", "status"), also=("output",))
        output = item.get("output")
        if isinstance(output, list):
            output = _text_of(output, f"{where}.output")
        if not isinstance(output, str):
            raise InvalidRequest(
                f"'{where}.output' must be a string or a list of text parts", f"{where}.output"
            )
        return {"type": "function_call_output", **out, "output": output, "status": "completed"}
    if kind == "mcp_call":  # a server-side call, sent back by a client that keeps the state itself
        out = _take(item, where, ("id", "server_label", "name", "arguments"), ("output", "error", "status"))
        return {"type": "mcp_call", **out}
    if kind == "mcp_list_tools":
        out = _take(item, where, ("id", "server_label"), ("tools", "error"))
        return {"type": "mcp_list_tools", "tools": [], **out}
    raise InvalidRequest(
        f"'{where}.type' {kind!r} is not supported; input items are message, function_call, "
        "function_call_output, mcp_call and mcp_list_tools",
        param=f"{where}.type",
    )


def _take(
    item: dict, where: str, required: tuple[str, ...], optional: tuple[str, ...], also: tuple[str, ...] = ()
) -> dict:
    """The `required` and `optional` fields of a body part; `also`: others the caller reads itself."""
    out = {}
    for name in required:
        if not isinstance(item.get(name), str):
            raise InvalidRequest(f"'{where}.{name}' is required (a string)", param=f"{where}.{name}")
        out[name] = item[name]
    for name in optional:
        if item.get(name) is not None:
            out[name] = item[name]
    unknown = set(item) - {"type", *required, *optional, *also}
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequest(
            f"Unrecognized field '{where}.{name}'", param=f"{where}.{name}", code="unknown_parameter"
        )
    return out


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise InvalidRequest(
            f"'{where}.role' must be user, system, developer or assistant (got {role!r})", f"{where}.role"
        )
    content = item.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = _text_of(content, f"{where}.content")
    else:
        raise InvalidRequest(f"'{where}.content' must be a string or a list of parts", f"{where}.content")
    part = (
        {"type": "output_text", "text": text, "annotations": []}
        if role == "assistant"
        else {"type": "input_text", "text": text}
    )
    out = {"type": "message", "role": role, "content": [part], "status": "completed"}
    if isinstance(item.get("id"), str):
        out["id"] = item["id"]
    return out


def _text_of(parts: list, where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise InvalidRequest(
                f"'{where}[{j}]' of type {kind!r} is not supported; this model reads text only (input_text)",
                param=f"{where}[{j}]",
            )
    return "".join(texts)


# -- tools ---------------------------------------------------------------------------------------------


def function_tool(tool: dict, where: str) -> dict:
    """A Responses function tool (flat: name, parameters) as the response echoes it."""
    out = _take(tool, where, ("name",), ("description", "parameters", "strict"))
    if not _TOOL_NAME.match(out["name"]):
        raise InvalidRequest(
            f"'{where}.name': function names are 1-64 letters, digits, '_' or '-'", f"{where}.name"
        )
    return {"type": "function", "parameters": None, "strict": True, "description": None, **out}


def mcp_tool(tool: dict, where: str) -> tuple[dict, set[str] | None]:
    """A Responses mcp tool (the operator's server `server_label`) and the names it allows (None: all)."""
    for name in ("server_url", "connector_id", "headers", "authorization"):
        if tool.get(name) is not None:
            raise InvalidRequest(
                f"'{where}.{name}' is not supported: this server calls only the MCP servers its operator "
                "configured (--mcp); name one by server_label",
                param=f"{where}.{name}",
                code="unsupported_parameter",
            )
    out = _take(tool, where, ("server_label",), ("allowed_tools", "require_approval", "server_description"))
    approval = out.get("require_approval", "never")
    never = approval == "never" or (
        isinstance(approval, dict) and set(approval) <= {"never"} and not approval.get("always")
    )
    if not never:
        raise InvalidRequest(
            f"'{where}.require_approval' must be 'never': this server runs MCP tools without pausing for approval",
            param=f"{where}.require_approval",
        )
    allowed = out.get("allowed_tools")
    if isinstance(allowed, dict):
        allowed = allowed.get("tool_names")
    if allowed is not None and not (isinstance(allowed, list) and all(isinstance(n, str) for n in allowed)):
        raise InvalidRequest(
            f"'{where}.allowed_tools' must be a list of tool names or {{\"tool_names\": [...]}}",
            param=f"{where}.allowed_tools",
        )
    return {"type": "mcp", "require_approval": "never", **out}, None if allowed is None else set(allowed)


def tool_choice(choice: str | dict | None) -> str | dict:
    """The request's tool_choice as chat's: none, auto, required or a named function (an mcp choice with a
    name is that tool; without one, any tool)."""
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    kind = choice.get("type")
    if kind == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind == "mcp" and isinstance(choice.get("server_label"), str):
        name = choice.get("name")
        return {"type": "function", "function": {"name": name}} if isinstance(name, str) else "required"
    raise InvalidRequest(
        'tool_choice must be none, auto, required, {"type": "function", "name": ...} or '
        f'{{"type": "mcp", "server_label": ...}} (got type {kind!r})',
        param="tool_choice",
    )
