"""The prompt sets fidelity is measured on: the built-in one (chat, code, numbers) or a user's file."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path


def builtin_prompts() -> list[str]:
    """The fixed set that ships with ember (prompts.json): four chat, four code, four arithmetic prompts,
    so a setting's report covers the kinds of text a small instruct model is asked for."""
    return json.loads(files("ember.quality").joinpath("prompts.json").read_text())


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a JSON list of strings, or JSONL with one string or {"prompt": ...} a line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read prompts file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}: not JSON or JSONL ({exc}); write a JSON list of strings or one per line"
            ) from None
    prompts = [x.get("prompt") if isinstance(x, dict) else x for x in items]
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()), None)
    if bad is not None:
        raise ValueError(f'{path}: prompt {bad} is not a non-empty string (or {{"prompt": string}})')
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts
