"""Checking a batch's input file, line by line, before anything runs: a bad line is refused with its
custom_id (or its line number) and goes to the error file; the others run.

A line is `{"custom_id": str, "method": "POST", "url": <the batch's endpoint>, "body": {...}}`, as
OpenAI's; the body itself is checked when it runs, by the endpoint (its answer for a bad body is that
line's 400 in the error file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

MAX_LINES = 50_000  # OpenAI's limit per batch
MAX_CUSTOM_ID = 512
LINE_KEYS = ("custom_id", "method", "url", "body")


@dataclass
class Checked:
    valid: list[dict] = field(default_factory=list)  # {custom_id, line, body}
    rejects: list[dict] = field(default_factory=list)  # {line, custom_id, code, message, param}
    model: str | None = None  # the first valid line's
    too_many: bool = False  # more than MAX_LINES lines: the batch fails


def check(data: bytes, endpoint: str) -> Checked:
    """The input file's lines sorted into those that run and those refused (blank lines are skipped)."""
    out = Checked()
    seen: dict[str, int] = {}
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if len(out.valid) + len(out.rejects) >= MAX_LINES:
            out.too_many = True
            return out
        refusal = _refusal(raw, endpoint, seen)
        if isinstance(refusal, dict):
            out.rejects.append({"line": n, **refusal})
            continue
        custom_id, body = refusal
        seen[custom_id] = n
        out.valid.append({"custom_id": custom_id, "line": n, "body": body})
        out.model = out.model or body["model"]
    return out


def _refusal(raw: bytes, endpoint: str, seen: dict[str, int]) -> dict | tuple[str, dict]:
    """(custom_id, body) of a good line, or why it is refused: {custom_id, code, message, param}."""
    try:
        line = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _no(None, "invalid_json", f"the line is not valid JSON: {exc}", None)
    if not isinstance(line, dict):
        return _no(
            None, "invalid_request", "the line must be a JSON object: {custom_id, method, url, body}", None
        )
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _no(None, "missing_custom_id", "'custom_id' is required: a non-empty string", "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID:
        return _no(
            None, "invalid_custom_id", f"'custom_id' is longer than {MAX_CUSTOM_ID} characters", "custom_id"
        )
    if custom_id in seen:
        return _no(
            custom_id,
            "duplicate_custom_id",
            f"custom_id '{custom_id}' is used by line {seen[custom_id]} already; each line needs its own",
            "custom_id",
        )
    unknown = sorted(set(line) - set(LINE_KEYS))
    if unknown:
        return _no(
            custom_id,
            "unknown_parameter",
            f"unknown key {unknown[0]!r}; a line has {', '.join(LINE_KEYS)}",
            unknown[0],
        )
    if line.get("method") != "POST":
        return _no(
            custom_id, "invalid_method", f"'method' must be 'POST' (got {line.get('method')!r})", "method"
        )
    if line.get("url") != endpoint:
        return _no(
            custom_id,
            "invalid_url",
            f"'url' must be the batch's endpoint '{endpoint}' (got {line.get('url')!r})",
            "url",
        )
    body = line.get("body")
    if not isinstance(body, dict):
        return _no(custom_id, "invalid_body", "'body' is required: the request as a JSON object", "body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return _no(custom_id, "missing_model", "'body.model' is required", "body.model")
    if body.get("stream"):
        return _no(custom_id, "invalid_body", "'body.stream' cannot be true in a batch", "body.stream")
    return custom_id, body


def _no(custom_id: str | None, code: str, message: str, param: str | None) -> dict:
    return {"custom_id": custom_id, "code": code, "message": message, "param": param}
