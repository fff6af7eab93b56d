"""Templates as OpenAI's Evals render them: `{{item.question}}`, `{{sample.output_text}}`, nested paths
(`{{item.meta.lang}}`, `{{item.choices.0}}`). A string value is put in as it is; any other value as JSON."""

from __future__ import annotations

import json
import re

from ember.errors import InvalidRequest

_VAR = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")


def lookup(path: str, namespaces: dict):
    """The value at a dotted path (`item.a.b`, `sample.output_text`); InvalidRequest naming it if absent."""
    head, *rest = path.split(".")
    if head not in namespaces:
        known = ", ".join(sorted(namespaces))
        raise InvalidRequest(f"template variable '{{{{{path}}}}}': no namespace '{head}'; known: {known}")
    value = namespaces[head]
    for i, key in enumerate(rest):
        if isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            where = ".".join([head, *rest[:i]])
            raise InvalidRequest(f"template variable '{{{{{path}}}}}': {where} has no '{key}'")
    return value


def variables(text: str) -> list[str]:
    """The dotted paths `text` refers to (`{{item.a}}` -> 'item.a'), in order."""
    return _VAR.findall(text)


def render(text: str, namespaces: dict) -> str:
    """`text` with every `{{path}}` replaced by its value."""

    def one(match: re.Match) -> str:
        value = lookup(match.group(1), namespaces)
        return value if isinstance(value, str) else json.dumps(value)

    return _VAR.sub(one, text)


def content_text(content) -> str:
    """A message's content as one string: a plain string, an `input_text`/`output_text` part, or a list
    of them (what OpenAI's eval item messages allow, images aside)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict) and isinstance(content.get("text"), str):
        return content["text"]
    if isinstance(content, list):
        return "".join(content_text(part) for part in content)
    raise InvalidRequest(f"message content must be text (a string or input_text parts), got {content!r:.80}")


def render_messages(template: list[dict], namespaces: dict) -> list[dict]:
    """Chat messages from a list of {role, content} templates ('developer' is sent as 'system')."""
    out = []
    for message in template:
        role = message.get("role", "user")
        out.append(
            {
                "role": "system" if role == "developer" else role,
                "content": render(content_text(message.get("content", "")), namespaces),
            }
        )
    return out
