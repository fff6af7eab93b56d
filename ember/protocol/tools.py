"""Function calling: tools into the prompt, a grammar that allows only valid calls, calls out of the text.

ember's call format is the Hermes one (Qwen2.5 and Hermes models are trained on it):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, parallel calls separated by a newline. With tool_choice `required` or a named
function the output is constrained to such blocks, each naming a declared function with arguments that
validate against its schema; with `auto` it is either text (which may not begin with "<") or calls.
Parallel calls are bounded so that a small model cannot loop on one call until max_tokens: by default each
declared tool may be called at most once per turn (the grammar tracks which are left), and a request
that wants more sets `max_tool_calls` (the Responses API's field), up to that many calls of any tools.
Reading calls back keeps every complete call: a turn cut short by max_tokens still returns the calls it
finished, and the call markup never reaches `content`.
Templates that know tools render them themselves; for the others (SmolLM2's among them) the tools and the
format are described in the system message (FALLBACK_INSTRUCTIONS), and earlier calls and tool results
are written into the history in the same format.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any

from ember.errors import InvalidRequest
from ember.grammar_limits import check_schema
from ember.protocol.chat import ChatMessage, Tool
from ember.protocol.requests import ChatCompletionRequest
from ember.structured_outputs import JSON_OPTIONS, StructuredOutputs, closed

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
_END = "}" + CLOSE  # closes the call object, then the block
FALLBACK_INSTRUCTIONS = """You can call these tools. Each is given with the JSON schema of its arguments:
{tools}

To call tools, answer only with one block per call, in this form:
<tool_call>
{{"name": "<tool name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
Tool results come back to you inside <tool_response></tool_response>."""
_ID_CHARS = string.ascii_letters + string.digits
# Up to this many tools, the grammar allows each to be called once per turn (it names every subset of the
# tools not called yet: 2**n rules); past it, only the number of calls is bounded.
DISTINCT_TOOLS_MAX = 6


def call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


# -- prompt ------------------------------------------------------------------------------------------


def render(body: ChatCompletionRequest, template: str | None) -> tuple[list[dict], list[dict] | None]:
    """The messages (and tools, where the template takes them) to render the chat template with."""
    mode = body.prompt_tool_mode()
    native = template is not None and "tools" in template
    if native:
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if mode else None
        return [_native_message(m) for m in body.messages], tools
    messages = _fallback_history(body.messages)
    if mode:
        listed = "\n".join(json.dumps(_describe(t)) for t in body.tools)
        note = FALLBACK_INSTRUCTIONS.format(tools=listed)
        if mode == "required":
            note += "\nYou must call at least one tool."
        elif mode != "auto":
            note += f"\nYou must call the tool '{mode}'."
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + note}
        else:
            messages.insert(0, {"role": "system", "content": note})
    return messages, None


def prompt_ids(
    body: ChatCompletionRequest, tokenizer, add_generation_prompt: bool | None = None
) -> list[int]:
    """The token ids a chat request's prompt is, as the server sends them to the engine (and the trainer
    trains on them: ember.tune.data renders through here too). `tokenizer`: an ember.tokenizer.Tokenizer;
    `add_generation_prompt` overrides the request's."""
    messages, tool_defs = render(body, tokenizer.hf.chat_template)
    return tokenizer.apply_chat_template(
        messages,
        body.add_generation_prompt if add_generation_prompt is None else add_generation_prompt,
        tool_defs,
        body.continue_final_message,
        body.chat_template_kwargs,
    )


def _describe(tool: Tool) -> dict:
    f = tool.function
    out: dict[str, Any] = {"name": f.name}
    if f.description:
        out["description"] = f.description
    out["parameters"] = f.parameters or {"type": "object", "properties": {}}
    return out


def _native_message(m: ChatMessage) -> dict:
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        # HF templates take arguments as a mapping (they write it out with tojson).
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out


def _fallback_history(messages: list[ChatMessage]) -> list[dict]:
    out: list[dict] = []
    for m in messages:
        if m.role == "tool":
            block = f"<tool_response>\n{m.text()}\n</tool_response>"
            if out and out[-1].get("_tool"):  # results of parallel calls go back in one turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
            continue
        content = m.text()
        if m.tool_calls:
            calls = [_format_call(c.function.name, _arguments(c.function.arguments)) for c in m.tool_calls]
            content = "\n".join(([content] if content else []) + calls)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    for m in out:
        m.pop("_tool", None)
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise InvalidRequest(
            f"tool call arguments in the history are not JSON: {text[:80]!r}", param="messages"
        ) from None


def _format_call(name: str, arguments: Any) -> str:
    return OPEN + _prefix(name) + json.dumps(arguments, separators=(", ", ": ")) + _END


def _prefix(name: str) -> str:
    """The text of a call up to its arguments, as the grammar makes the model write it."""
    return '{"name": ' + json.dumps(name) + ', "arguments": '


# -- grammar -----------------------------------------------------------------------------------------


def constraint(body: ChatCompletionRequest) -> StructuredOutputs | None:
    """The grammar for this request's tool_choice (and response_format, which applies to the text
    alternative of `auto`); None when no tools are in play."""
    mode = body.tool_mode()
    if mode is None:
        return body.structured()
    tools = [t for t in body.tools if mode in ("auto", "required") or t.function.name == mode]
    rules = [f"fn_{i}: %json {json.dumps(_call_schema(t))}" for i, t in enumerate(tools)]
    rules += [f"call_{i}: {json.dumps(OPEN)} fn_{i} {json.dumps(CLOSE)}" for i in range(len(tools))]
    # A named function is one call to it; otherwise, with parallel calls on, several (bounded: see above).
    parallel = body.parallel_tool_calls and mode in ("auto", "required")
    lines = [
        "start: calls" if mode != "auto" else "start: (text | calls)?",
        *_calls_rules(len(tools), body.max_tool_calls if parallel else 1),
        *rules,
    ]
    if mode == "auto":
        text = body.response_format
        if text is None or text.type == "text":
            lines.append(r"text: TEXT" + "\n" + r"TEXT: /[^<](.|\n)*/")
        elif text.type == "grammar":
            raise InvalidRequest(
                "response_format of type 'grammar' cannot be combined with tools; use tool_choice 'none'",
                param="response_format",
            )
        else:
            schema = text.constraint().json or {"type": "object"}
            lines.append(f"text: %json {json.dumps(_with_options(schema))}")
    return StructuredOutputs(grammar="%llguidance {}\n" + "\n".join(lines))


def _calls_rules(n: int, limit: int | None) -> list[str]:
    """The `calls` rule over `call_0 .. call_{n-1}`: at most `limit` calls of any tools, or (limit None)
    each tool at most once, in any order (where n is small enough to name the subsets left)."""
    any_call = "(" + " | ".join(f"call_{i}" for i in range(n)) + ")"
    if limit is None and n > DISTINCT_TOOLS_MAX:
        limit = n
    if limit is not None:
        more = f' ("\\n" {any_call}){{0,{limit - 1}}}' if limit > 1 else ""
        return [f"calls: {any_call}{more}"]
    # left_<mask>: one call of a tool in mask, then optionally more calls of the tools still left.
    out = [f"calls: left_{(1 << n) - 1}"]
    for mask in range(1, 1 << n):
        alts = []
        for i in range(n):
            if mask >> i & 1:
                rest = mask & ~(1 << i)
                alts.append(f'call_{i} ("\\n" left_{rest})?' if rest else f"call_{i}")
        out.append(f"left_{mask}: " + " | ".join(alts))
    return out


def _call_schema(tool: Tool) -> dict:
    params = tool.function.parameters
    if params is None:
        params = {"type": "object", "properties": {}, "additionalProperties": False}
    schema = {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    return _with_options(schema)


def _with_options(schema: dict) -> dict:
    if not isinstance(schema, dict):
        raise InvalidRequest("a JSON schema must be an object", param="tools")
    check_schema(schema, param="tools")  # before closed() recurses into it
    return {**closed(schema), "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}}


# -- output ------------------------------------------------------------------------------------------

_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)


def parse(text: str) -> list[dict] | None:
    """The calls in a model's output (OpenAI's tool_calls entries), or None if it is text, not calls.

    Output that begins a call is calls: every complete block is returned (a call repeated word for word
    once), and whatever follows the last complete one (a call cut short by max_tokens) is dropped, so
    call markup never reads as content. The list is empty when not even one call was finished."""
    if not text.startswith(OPEN[: len(text)]) or not text:
        return None
    calls, seen, end = [], set(), 0
    for m in _BLOCK.finditer(text):
        if text[end : m.start()].strip():
            break
        try:
            obj = json.loads(m.group(1))
            name, args = obj["name"], obj["arguments"]
        except (json.JSONDecodeError, KeyError, TypeError):
            break
        end = m.end()
        raw = m.group(1)
        prefix = _prefix(name)
        arguments = raw[len(prefix) : -1] if raw.startswith(prefix) else json.dumps(args)
        if (name, arguments) in seen:
            continue
        seen.add((name, arguments))
        calls.append(
            {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
        )
    return calls


class CallStream:
    """Streams one choice's calls as OpenAI does: per call, a first delta with index, id, type and name,
    then the arguments in fragments. `feed` takes the text as it grows and returns (content delta, tool
    call deltas); text that is not calls passes through as content."""

    def __init__(self, forced: bool):
        self.forced = forced  # the grammar allows only calls
        self.mode: str | None = "calls" if forced else None  # None until the first character decides
        self.buffer = ""
        self.pos = 0  # where the next call (or the separator before it) starts in buffer
        self.args_start: int | None = None  # inside a call: where its arguments start
        self.sent = 0  # of the current call's arguments, characters sent
        self.count = 0  # calls begun

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        if self.mode is None and delta:
            self.mode = "calls" if delta.startswith("<") else "text"
        if self.mode == "text" or (self.mode is None and not delta):
            return delta, []
        self.buffer += delta
        out: list[dict] = []
        while True:
            if self.args_start is None:
                head = self.buffer[self.pos :]
                if self.count:
                    if not head.startswith("\n"):
                        return "", out
                    head = head[1:]
                m = re.match(re.escape(OPEN) + r'\{"name": "([a-zA-Z0-9_-]*)", "arguments": ', head)
                if m is None:
                    return "", out
                self.args_start = self.pos + (1 if self.count else 0) + m.end()
                self.sent = 0
                out.append(
                    {
                        "index": self.count,
                        "id": call_id(),
                        "type": "function",
                        "function": {"name": m.group(1), "arguments": ""},
                    }
                )
                self.count += 1
            args = self.buffer[self.args_start :]
            end = args.find(_END)
            if end >= 0:
                piece = args[self.sent : end]
                self.pos = self.args_start + end + len(_END)
                self.args_start = None
            else:
                keep = next((k for k in range(len(_END), 0, -1) if args.endswith(_END[:k])), 0)
                piece = args[self.sent : len(args) - keep]
            if piece:
                out.append({"index": self.count - 1, "function": {"arguments": piece}})
                self.sent += len(piece)
            if self.args_start is not None:
                return "", out

    @property
    def made_calls(self) -> bool:
        return self.count > 0

    def finish_reason(self, reason: str) -> str:
        """OpenAI's finish_reason for a stream that ended for `reason`: `tool_calls` once calls were made
        and none is left half-written (a call cut inside its arguments stays `length`)."""
        if self.made_calls and reason in ("stop", "length") and self.args_start is None:
            return "tool_calls"
        return reason
