"""What a request asks its output to be: a JSON schema, any JSON object, a grammar, a regex or a choice.

This is the request side of structured outputs and imports no torch, so the OpenAI protocol layer (and
anything that builds requests without an engine) can use it. `grammar_text` turns a constraint into the
one llguidance grammar string that the engine compiles (ember/engine/structured.py) and caches by.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ember import grammar_limits as limits
from ember.errors import InvalidRequest

# JSON is generated compactly but readably, with no free whitespace: a small model given "any
# whitespace" can spend its whole budget on newlines. A schema's own "x-guidance" options still win.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class StructuredOutputs:
    """Exactly one of the fields: what the output must be (vLLM's StructuredOutputsParams)."""

    json: dict | str | None = None  # a JSON schema (dict or its text)
    json_object: bool = False  # any JSON object
    grammar: str | None = None  # a GBNF (llama.cpp) or Lark (llguidance) grammar
    regex: str | None = None
    choice: list[str] | None = None
    # The llguidance grammar, once made (a checker in the client process leaves it here for the engine).
    _grammar: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [
            name for name in ("json", "grammar", "regex", "choice") if getattr(self, name) is not None
        ] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError(
                "structured outputs take exactly one of json, json_object, grammar, regex, choice "
                f"(got {', '.join(given) or 'none'})"
            )

    def checked_key(self) -> tuple[str, str]:
        """(kind, text) of the constraint, once it passes the structural limits (ember/grammar_limits.py):
        what a grammar checker compiles and caches by. InvalidRequest names the limit it goes past."""
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except RecursionError:
                    limits.refuse_depth("response_format")
                except ValueError as exc:
                    raise InvalidRequest(
                        f"the JSON schema is not JSON: {exc}", param="response_format"
                    ) from None
            limits.check_schema(schema)
            return "json", json.dumps(schema)
        if self.json_object:
            return "json_object", ""
        if self.grammar is not None:
            limits.check_grammar(self.grammar)
            return "grammar", self.grammar
        if self.regex is not None:
            limits.check_pattern(self.regex)
            return "regex", self.regex
        limits.check_choices(self.choice)
        return "choice", json.dumps(self.choice)

    def set_grammar(self, grammar: str) -> None:
        self._grammar = grammar

    def grammar_text(self) -> str:
        """The llguidance grammar (the cache key); InvalidRequest where the input cannot be one."""
        if self._grammar is None:
            self._grammar = self._make_grammar()
        return self._grammar

    def _make_grammar(self) -> str:
        import llguidance

        try:
            if self.json is not None:
                schema = json.loads(self.json) if isinstance(self.json, str) else self.json
                if not isinstance(schema, dict):
                    raise InvalidRequest("the JSON schema must be an object", param="response_format")
                return llguidance.LLMatcher.grammar_from_json_schema(closed(schema), defaults=JSON_OPTIONS)
            if self.json_object:
                return llguidance.LLMatcher.grammar_from_json_schema(
                    {"type": "object"}, defaults=JSON_OPTIONS
                )
            if self.grammar is not None:
                return grammar_from_text(self.grammar)
            if self.regex is not None:
                return llguidance.LLMatcher.grammar_from_regex(self.regex)
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise InvalidRequest("choice must be a non-empty list of non-empty strings")
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in self.choice)
            )
        except InvalidRequest:
            raise
        except (ValueError, TypeError) as exc:  # not JSON, not a grammar llguidance can read
            raise InvalidRequest(
                f"invalid structured output constraint: {exc}", param="response_format"
            ) from None


# Keys whose values are data, not subschemas: never rewritten.
_DATA_KEYS = frozenset({"const", "enum", "default", "examples", "x-guidance"})


def closed(schema):
    """The schema with objects that list their properties closed to others (additionalProperties false
    where it is unset), as OpenAI's strict mode and xgrammar's default have it. Whatever validates against
    the result validates against the original; a small model left free to add keys may never stop."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in _DATA_KEYS else closed(v)) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar_from_text(text: str) -> str:
    """A GBNF grammar (`root ::= ...`, llama.cpp's format) or a Lark one (`start: ...`) -> llguidance's."""
    import llguidance
    from llguidance.gbnf_to_lark import any_to_lark

    limits.check_grammar(text)
    try:
        lark = any_to_lark(text)  # GBNF is converted; Lark passes through
    except Exception as exc:  # the converter raises bare Exceptions for a rule it cannot resolve
        raise InvalidRequest(f"invalid grammar: {exc}", param="response_format") from None
    return llguidance.LLMatcher.grammar_from_lark(lark)


def explain_error(message: str) -> str:
    """llguidance's error text -> the message a client gets."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    if first.startswith("Unimplemented keys"):
        return f"the JSON schema uses features this server does not support: {first}"
    return f"invalid structured output constraint: {message.strip()[:2000]}"
