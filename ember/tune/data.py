"""Training files -> token ids and loss masks, rendered exactly as the server renders a chat request.

Formats (one JSON object a line):
- chat SFT, OpenAI's: `{"messages": [...], "tools"?: [...], "parallel_tool_calls"?: bool}`, with an optional
  `weight` 0/1 on assistant messages (Fireworks'): 0 keeps the turn in the context but does not train it;
- prompt/completion: `{"prompt": str, "completion": str}`, raw text; the completion and an EOS are trained;
- DPO, OpenAI's preference lines: `{"input": {"messages": [...], "tools"?: [...]}, "preferred_output":
  [assistant message], "non_preferred_output": [assistant message]}`.

A conversation goes through the server's own path (a ChatCompletionRequest into `tools.prompt_ids`,
what the chat route calls), so a model trains on the tokens it will be served. The loss mask comes
from rendering prefixes: the tokens of assistant turn i are those between the render of messages[:i] with
the generation prompt (what the server sends the model) and the render of messages[:i+1], up to and
including the EOS that ends the turn (the server stops there; the template's separator after it is never
generated, so it is not trained). Templates for which a prefix render is not a token prefix of the whole
conversation, or whose assistant turns do not end with EOS, are refused rather than trained wrongly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from ember.errors import InvalidRequest
from ember.protocol import tools
from ember.protocol.requests import ChatCompletionRequest

if TYPE_CHECKING:
    from ember.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant", "tool")
CHAT_KEYS = {"messages", "tools", "parallel_tool_calls"}
COMPLETION_KEYS = {"prompt", "completion"}
DPO_KEYS = {"input", "preferred_output", "non_preferred_output"}


class DataError(ValueError):
    """A bad training file: `line` is the 1-based JSONL line at fault, None for the file as a whole."""

    def __init__(self, what: str, line: int | None = None):
        self.line = line
        super().__init__(what if line is None else f"line {line}: {what}")


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]  # the rendered conversation, exactly what the server would tokenize
    labels: list[bool]  # same length; True where the token is supervised (assistant output, its EOS)


@dataclass(frozen=True)
class DPOPair:
    prompt_ids: list[int]  # rendered prompt incl. the generation prompt
    chosen_ids: list[int]  # completion tokens of preferred_output, ending with the turn's EOS
    rejected_ids: list[int]  # same for non_preferred_output


class Examples(list):
    """The loaded examples; `truncated` counts those cut to max_len."""

    truncated: int = 0


# -- public ------------------------------------------------------------------------------------------


def load_sft(path_or_lines, tokenizer: Tokenizer, max_len: int | None = None) -> list[SFTExample]:
    """Chat or prompt/completion lines (one format a file) -> examples; every line is checked."""
    out, kind = Examples(), None
    for n, obj in _objects(path_or_lines):
        if DPO_KEYS & obj.keys():
            raise DataError("a preference (DPO) example in an SFT file; train it with method dpo", n)
        this = "completion" if COMPLETION_KEYS & obj.keys() else "chat"
        if kind is not None and this != kind:
            raise DataError(f"a {this} example in a file of {kind} examples; use one format a file", n)
        kind = this
        ids, labels = _completion(obj, tokenizer, n) if this == "completion" else _chat(obj, tokenizer, n)
        if max_len is not None and len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            out.truncated += 1
        out.append(SFTExample(ids, labels))
    if not any(any(e.labels) for e in out):
        raise DataError(_nothing_to_learn(out, "every assistant message has weight 0 or was cut by max_len"))
    _report(out, max_len)
    return out


def load_dpo(path_or_lines, tokenizer: Tokenizer, max_len: int | None = None) -> list[DPOPair]:
    """Preference lines -> pairs; every line is checked."""
    out = Examples()
    for n, obj in _objects(path_or_lines):
        pair = _pair(obj, tokenizer, n)
        if (
            max_len is not None
            and len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)) > max_len
        ):
            pair = _cut(pair, max_len, n)
            out.truncated += 1
        out.append(pair)
    if not out:
        raise DataError(_nothing_to_learn(out, ""))
    _report(out, max_len)
    return out


def detect_method(path_or_lines) -> str:
    """Which method a file is for, "sft" or "dpo", from its first line that is a JSON object."""
    for n, line in _lines(path_or_lines):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        if DPO_KEYS & obj.keys():
            return "dpo"
        if (CHAT_KEYS | COMPLETION_KEYS) & obj.keys():
            return "sft"
        raise DataError(
            f"neither an SFT line (messages, or prompt and completion) nor a DPO one (input, "
            f"preferred_output, non_preferred_output); its keys: {', '.join(sorted(obj)) or 'none'}",
            n,
        )
    raise DataError("the file has no JSON object lines")


# -- lines -------------------------------------------------------------------------------------------


def _lines(source) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines of a path, bytes, or an iterable of lines."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"no such file: {path}")
        rows: Iterable[str | bytes] = path.read_bytes().splitlines()
    elif isinstance(source, bytes):
        rows = source.splitlines()
    else:
        rows = source
    for n, row in enumerate(rows, 1):
        if isinstance(row, bytes):
            try:
                row = row.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"not UTF-8 text (byte {exc.start})", n) from None
        if row.strip():
            yield n, row


def _objects(source) -> Iterator[tuple[int, dict]]:
    for n, line in _lines(source):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"not JSON ({exc.msg} at column {exc.colno})", n) from None
        if not isinstance(obj, dict):
            raise DataError(f"an example is a JSON object, not {type(obj).__name__}", n)
        yield n, obj


def _nothing_to_learn(out: Examples, why: str) -> str:
    if not out:
        return "the file has no examples"
    return f"no supervised token in the file's {len(out)} examples" + (f": {why}" if why else "")


def _report(out: Examples, max_len: int | None) -> None:
    if out.truncated:
        log.warning(
            "%d of %d examples were longer than max_len %s and were cut", out.truncated, len(out), max_len
        )


# -- checking a conversation -------------------------------------------------------------------------


def _request(obj: dict, n: int, where: str = "") -> ChatCompletionRequest:
    """A chat example checked field by field, then as the server checks a request."""
    unknown = obj.keys() - CHAT_KEYS
    if unknown:
        raise DataError(
            f"unknown field {where}{sorted(unknown)[0]!r}; a chat example has {sorted(CHAT_KEYS)}", n
        )
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}messages must be a non-empty list of messages", n)
    calls: set[str] = set()
    declared = {_name(t) for t in obj.get("tools") or [] if isinstance(t, dict)}
    for i, m in enumerate(messages):
        at = f"{where}messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at} is not an object", n)
        if "role" not in m:
            raise DataError(f"{at} has no role", n)
        if m["role"] not in ROLES:
            raise DataError(f"{at}: unknown role {m['role']!r}; roles are {', '.join(ROLES)}", n)
        if "weight" in m:
            if m["role"] != "assistant":
                raise DataError(f"{at}: weight is only for assistant messages", n)
            if isinstance(m["weight"], bool) or m["weight"] not in (0, 1):
                raise DataError(f"{at}: weight must be 0 or 1, got {m['weight']!r}", n)
        if m["role"] == "assistant":
            if not m.get("content") and not m.get("tool_calls"):
                raise DataError(f"{at}: an assistant message needs content or tool_calls", n)
            if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
                raise DataError(f"{at}: tool_calls must be a list", n)
            for c in m.get("tool_calls") or []:
                name = _name(c) if isinstance(c, dict) else None
                if obj.get("tools") and isinstance(name, str) and name not in declared:
                    raise DataError(f"{at} calls {name!r}, which is not among the tools", n)
                if isinstance(c, dict) and isinstance(c.get("id"), str):
                    calls.add(c["id"])
            if obj.get("parallel_tool_calls") is False and len(m.get("tool_calls") or []) > 1:
                raise DataError(
                    f"{at} makes {len(m['tool_calls'])} tool calls but parallel_tool_calls is false", n
                )
        if m["role"] == "tool" and isinstance(m.get("tool_call_id"), str) and m["tool_call_id"] not in calls:
            raise DataError(f"{at} answers tool call {m['tool_call_id']!r}, which no earlier message made", n)
    try:
        body = ChatCompletionRequest.model_validate({"model": "tune", **obj})
        for m in body.messages:
            m.text()  # refuses content parts that are not text
    except ValidationError as exc:
        err = exc.errors()[0]
        raise DataError(f"{where}{_loc(err['loc'])}: {err['msg']}", n) from None
    except InvalidRequest as exc:
        raise DataError(f"{where}{exc}", n) from None
    return body


def _name(entry: dict) -> str | None:
    """The function name of a tool definition or a tool call, if it has one."""
    function = entry.get("function")
    return function.get("name") if isinstance(function, dict) else None


def _loc(loc: tuple) -> str:
    """pydantic's ('messages', 1, 'content', 'str') -> 'messages[1].content' (union branch tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _TAGS and "[" not in part and "-" not in part:
            out += ("." if out else "") + part
    return out or "example"


_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _render(
    tokenizer: Tokenizer, body: ChatCompletionRequest, k: int, generation_prompt: bool, n: int
) -> list[int]:
    """The token ids of the first k messages, rendered as the server renders a chat request."""
    part = body.model_copy(update={"messages": body.messages[:k]})
    try:
        return tools.prompt_ids(part, tokenizer, generation_prompt)
    except InvalidRequest as exc:
        raise DataError(str(exc), n) from None


def _turn(
    tokenizer: Tokenizer, body: ChatCompletionRequest, i: int, full: list[int], n: int
) -> tuple[int, int]:
    """[start, end) in `full` of assistant message i's output, through the EOS that ends it."""
    if i == 0:
        raise DataError(
            "messages[0] is the assistant's; a conversation the model answers begins with another role", n
        )
    start = _render(tokenizer, body, i, True, n)
    end = _render(tokenizer, body, i + 1, False, n)
    for prefix, what in ((start, f"messages[:{i}] with the generation prompt"), (end, f"messages[:{i + 1}]")):
        if full[: len(prefix)] != prefix:
            k = next((j for j, (a, b) in enumerate(zip(prefix, full, strict=False)) if a != b), len(full))
            raise DataError(
                f"the chat template renders {what} as tokens that are not a prefix of the whole conversation's "
                f"(they part at token {k}), so the loss mask cannot come from it; check the message contents "
                "at that point (e.g. leading whitespace that merges with the template's) or the template",
                n,
            )
    eos = tokenizer.eos_token_id
    segment = full[len(start) : len(end)]
    if eos not in segment:
        raise DataError(
            f"the chat template does not end messages[{i}] (assistant) with the EOS token "
            f"{tokenizer.decode([eos], skip_special_tokens=False)!r}, so a tuned model would not stop "
            "where the server stops; use a template that ends assistant turns with EOS",
            n,
        )
    return len(start), len(start) + len(segment) - segment[::-1].index(eos)


# -- the formats -------------------------------------------------------------------------------------


def _chat(obj: dict, tokenizer: Tokenizer, n: int) -> tuple[list[int], list[bool]]:
    body = _request(obj, n)
    if not any(m.role == "assistant" for m in body.messages):
        raise DataError("no assistant message to learn from", n)
    full = _render(tokenizer, body, len(body.messages), False, n)
    labels = [False] * len(full)
    for i, m in enumerate(body.messages):
        if m.role == "assistant" and (m.model_extra or {}).get("weight", 1) == 1:
            start, end = _turn(tokenizer, body, i, full, n)
            labels[start:end] = [True] * (end - start)
    return full, labels


def _completion(obj: dict, tokenizer: Tokenizer, n: int) -> tuple[list[int], list[bool]]:
    unknown = obj.keys() - COMPLETION_KEYS
    if unknown:
        raise DataError(
            f"unknown field {sorted(unknown)[0]!r}; a prompt/completion example has prompt, completion", n
        )
    for key in ("prompt", "completion"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise DataError(f"{key} must be a non-empty string", n)
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to end completions with")
    # The prompt as /v1/completions encodes it; the completion as tokens the model would write after it.
    prompt = tokenizer.encode(obj["prompt"])
    completion = tokenizer.encode(obj["completion"], add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt + completion, [False] * len(prompt) + [True] * len(completion)


def _pair(obj: dict, tokenizer: Tokenizer, n: int) -> DPOPair:
    if "messages" in obj or "prompt" in obj:
        raise DataError("an SFT example in a DPO file; train it with method sft", n)
    missing = [k for k in sorted(DPO_KEYS) if k not in obj]
    if missing:
        raise DataError(f"a preference example needs {', '.join(missing)}", n)
    unknown = obj.keys() - DPO_KEYS
    if unknown:
        raise DataError(
            f"unknown field {sorted(unknown)[0]!r}; a preference example has {sorted(DPO_KEYS)}", n
        )
    if not isinstance(obj["input"], dict):
        raise DataError("input must be an object with messages (and optionally tools)", n)
    prompt_body = _request(obj["input"], n, "input.")
    prompt = _render(tokenizer, prompt_body, len(prompt_body.messages), True, n)
    outputs: list[list[int]] = []
    for key in ("preferred_output", "non_preferred_output"):
        value = obj[key]
        if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
            raise DataError(f"{key} must be a list of one assistant message", n)
        if value[0].get("role") != "assistant":
            raise DataError(f"{key}[0] must have role assistant", n)
        body = _request({**obj["input"], "messages": [*obj["input"]["messages"], value[0]]}, n, f"{key}: ")
        i = len(body.messages) - 1
        full = _render(tokenizer, body, i + 1, False, n)
        start, end = _turn(tokenizer, body, i, full, n)
        outputs.append(full[start:end])
    chosen, rejected = outputs
    if chosen == rejected:
        raise DataError("preferred_output and non_preferred_output are the same", n)
    return DPOPair(prompt, chosen, rejected)


def _cut(pair: DPOPair, max_len: int, n: int) -> DPOPair:
    """Both outputs cut from the right to fit max_len after the prompt (the prompt is never cut)."""
    room = max_len - len(pair.prompt_ids)
    if room < 1:
        raise DataError(
            f"the prompt is {len(pair.prompt_ids)} tokens, which leaves no room under max_len {max_len} for "
            "the outputs; raise max_len or shorten the prompt",
            n,
        )
    return DPOPair(pair.prompt_ids, pair.chosen_ids[:room], pair.rejected_ids[:room])
