"""Cheap structural limits on what a request asks the grammar library to compile, checked before it sees it.

llguidance recurses natively over a schema's nesting, its `$ref` chains and a grammar's rules: a hostile
input crashes it (a segfault takes the whole process) or compiles for minutes. These limits sit far
under where that starts (measured in benchmarks/GRAMMAR_LIMITS.md) and far over what real schemas and
grammars use; a request past one gets a 400 naming it. Compilation itself is also bounded in time, in a
process of its own (ember/grammar_check.py): that is what catches whatever these counts do not.
"""

from __future__ import annotations

import json
import re

from ember.errors import InvalidRequest

MAX_SCHEMA_CHARS = 100_000  # a JSON schema as JSON text
MAX_SCHEMA_DEPTH = 64  # nested objects and arrays, at any key
MAX_SCHEMA_REFS = 500  # "$ref" occurrences in one schema
MAX_SCHEMA_DEFS = 500  # entries of $defs / definitions
MAX_REF_CHAIN = 100  # definitions reached one through another's "$ref", in a row
MAX_GRAMMAR_CHARS = 1_000_000  # a Lark or GBNF grammar (tool grammars embed their schemas)
MAX_GRAMMAR_RULES = 1_000
MAX_PATTERN_CHARS = 10_000  # a regex
MAX_CHOICES = 1_000

# A rule definition's head: Lark `name:` / `?name.2:` / `NAME:` at a line start, or GBNF `name ::=`.
_RULE_HEAD = re.compile(r"^[ \t]*(?:[?!]?[A-Za-z_][\w]*(?:\.-?\d+)?[ \t]*:(?!:)|[\w-]+[ \t]*::=)", re.M)


def _refuse(what: str, value: int, limit: int, param: str) -> None:
    raise InvalidRequest(
        f"{what} is {value}, over this server's limit of {limit}; simplify it",
        param=param,
        code="grammar_too_large",
    )


def refuse_depth(param: str) -> None:
    raise InvalidRequest(
        f"the JSON schema is nested deeper than this server's limit of {MAX_SCHEMA_DEPTH}; simplify it",
        param=param,
        code="grammar_too_large",
    )


def check_schema(schema: object, param: str = "response_format") -> None:
    """InvalidRequest naming the limit a JSON schema (already parsed) goes past. Iterative: a schema
    nested deeper than Python's own recursion limit is measured like any other."""
    refs: list[str] = []
    defs: dict[str, object] = {}
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            refuse_depth(param)
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    refs.append(value)
                elif key in ("$defs", "definitions") and isinstance(value, dict):
                    defs.update({f"#/{key}/{name}": sub for name, sub in value.items()})
                if isinstance(value, dict | list):
                    stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    if len(refs) > MAX_SCHEMA_REFS:
        _refuse('the number of "$ref"s in the JSON schema', len(refs), MAX_SCHEMA_REFS, param)
    if len(defs) > MAX_SCHEMA_DEFS:
        _refuse("the number of $defs in the JSON schema", len(defs), MAX_SCHEMA_DEFS, param)
    chain = _longest_ref_chain(defs)
    if chain > MAX_REF_CHAIN:
        _refuse('the longest chain of "$ref"s between $defs', chain, MAX_REF_CHAIN, param)
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_CHARS:
        _refuse("the JSON schema's size in characters", size, MAX_SCHEMA_CHARS, param)


def _refs_in(node: object) -> set[str]:
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            ref = n.get("$ref")
            if isinstance(ref, str):
                out.add(ref)
            stack.extend(v for v in n.values() if isinstance(v, dict | list))
        elif isinstance(n, list):
            stack.extend(v for v in n if isinstance(v, dict | list))
    return out


def _longest_ref_chain(defs: dict[str, object]) -> int:
    """The most definitions one can pass through following `$ref`s without repeating one (a cycle is
    ordinary recursion and counts once): longest path over the graph with back edges dropped."""
    edges = {name: [r for r in _refs_in(sub) if r in defs] for name, sub in defs.items()}
    longest: dict[str, int] = {}
    for root in edges:
        if root in longest:
            continue
        on_path = {root}
        stack = [(root, iter(edges[root]))]
        while stack:
            name, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(name)
                longest[name] = 1 + max(
                    (longest.get(c, 0) for c in edges[name] if c not in on_path), default=0
                )
            elif child not in longest and child not in on_path:
                on_path.add(child)
                stack.append((child, iter(edges[child])))
    return max(longest.values(), default=0)


def check_grammar(text: str, param: str = "response_format") -> None:
    if len(text) > MAX_GRAMMAR_CHARS:
        _refuse("the grammar's size in characters", len(text), MAX_GRAMMAR_CHARS, param)
    rules = len(_RULE_HEAD.findall(text))
    if rules > MAX_GRAMMAR_RULES:
        _refuse("the number of rules in the grammar", rules, MAX_GRAMMAR_RULES, param)


def check_pattern(text: str, param: str = "response_format") -> None:
    if len(text) > MAX_PATTERN_CHARS:
        _refuse("the regex's size in characters", len(text), MAX_PATTERN_CHARS, param)


def check_choices(choices: list, param: str = "response_format") -> None:
    if len(choices) > MAX_CHOICES:
        _refuse("the number of choices", len(choices), MAX_CHOICES, param)
