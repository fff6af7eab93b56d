"""Text a request carries must be valid Unicode: a lone UTF-16 surrogate (JSON's "\\ud800" escape without its
pair, or half of a split emoji) is a Python string but cannot be encoded, so it is refused as a 400 naming
the field before anything tries to tokenize it."""

from __future__ import annotations

import re

from pydantic import BaseModel

from ember.errors import InvalidRequest

_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(body: BaseModel) -> None:
    """InvalidRequest naming the first field (`messages[0].content`) whose text holds a lone surrogate.
    Iterative: tool schemas may nest deeper than Python's recursion limit."""
    stack: list[tuple[str, object]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and (m := _SURROGATE.search(value)):
                raise InvalidRequest(
                    f"'{path}' holds a lone UTF-16 surrogate (U+{ord(m.group()):04X} at character {m.start()}), "
                    "which is not valid Unicode; send the whole character (both halves of a surrogate pair)",
                    param=path,
                    code="invalid_text",
                )
        elif isinstance(value, BaseModel):
            items = [(k, getattr(value, k)) for k in type(value).model_fields]
            items += list((value.model_extra or {}).items())
            stack.extend((f"{path}.{k}" if path else k, v) for k, v in reversed(items))
        elif isinstance(value, dict):
            stack.extend((f"{path}.{k}", v) for k, v in reversed(value.items()))
            stack.extend((f"{path}.<key>", k) for k in value if isinstance(k, str))
        elif isinstance(value, list | tuple):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
