"""The request side of structured outputs: the spec and the schema rewriting, without an engine."""

from __future__ import annotations

import json
import time

import pytest

from ember import grammar_limits as limits
from ember.errors import InvalidRequest
from ember.grammar_check import GrammarChecker
from ember.structured_outputs import StructuredOutputs, closed


def test_closed_shuts_listed_objects_only():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
            "c": {"const": {"properties": {}}},
        },
        "$defs": {"open": {"type": "object", "properties": {}, "additionalProperties": True}},
    }
    out = closed(schema)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"] == {"const": {"properties": {}}}  # data, untouched
    assert out["$defs"]["open"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # the caller's schema is not changed


# -- limits and the checker (issue 17: a hostile grammar fails only its own request) ---------------------


# The shapes benchmarks/grammar_limits.py measures.
def ref_chain(n: int) -> dict:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    return {"$defs": {**defs, f"d{n}": {"type": "string"}}, "$ref": "#/$defs/d0"}


def items_nested(n: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(n):
        schema = {"type": "array", "items": schema}
    return schema


def lark_chain(n: int) -> str:
    return "start: r0\n" + "".join(f"r{i}: r{i + 1}\n" for i in range(n)) + f'r{n}: "x"\n'


@pytest.fixture(scope="module")
def checker():
    c = GrammarChecker()
    yield c
    c.close()


@pytest.mark.parametrize(
    "structured,words",
    [
        # Each of these crashed llguidance (a segfault) or tripped Python's recursion limit before.
        (StructuredOutputs(json=ref_chain(5000)), '"$ref"s'),
        (StructuredOutputs(grammar=lark_chain(5000)), "rules"),
        (StructuredOutputs(json=items_nested(600)), "nested deeper"),
        (StructuredOutputs(json='{"items": ' * 5000 + "{}" + "}" * 5000), "nested deeper"),
        (StructuredOutputs(json=ref_chain(limits.MAX_REF_CHAIN + 5) | {"type": "object"}), "chain"),
        (StructuredOutputs(json={"enum": ["x" * 1000] * 200}), "size"),
        (StructuredOutputs(regex="a" * (limits.MAX_PATTERN_CHARS + 1)), "regex"),
    ],
    ids=["ref chain", "lark chain", "deep items", "deep text", "long chain", "large", "long regex"],
)
def test_past_a_limit_is_refused_naming_it(checker, structured, words):
    with pytest.raises(InvalidRequest) as info:
        checker.check(structured)
    assert words in str(info.value) and "limit" in str(info.value)
    assert info.value.param == "response_format" and info.value.code == "grammar_too_large"


def test_ref_cycles_are_recursion_not_a_chain():
    tree = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            }
        },
        "$ref": "#/$defs/node",
    }
    limits.check_schema(tree)
    defs = {f"#/$defs/{name}": d for name, d in ref_chain(50)["$defs"].items()}
    assert limits._longest_ref_chain(defs) == 51


def test_the_checker_leaves_the_grammar_for_the_engine_and_caches(checker):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    first = StructuredOutputs(json=schema)
    checker.check(first)
    assert first.grammar_text() == StructuredOutputs(json=schema)._make_grammar()
    start = time.perf_counter()
    for _ in range(100):
        checker.check(StructuredOutputs(json=schema))
    assert (time.perf_counter() - start) / 100 < 0.005  # cached by text: a lookup, not a compile
    with pytest.raises(InvalidRequest, match="unknown name"):
        checker.check(StructuredOutputs(grammar="start: foo"))


def test_a_crash_in_the_grammar_library_fails_only_that_check(checker):
    # Past the limits (a 5000-link chain segfaults llguidance): the worker dies, the caller lives.
    verdict = checker._run(("json", json.dumps(ref_chain(5000))))
    assert verdict[0] == "refused" and "too complex" in verdict[1]
    ok = StructuredOutputs(json={"type": "string"})
    checker.check(ok)  # a new worker serves the next
    assert ok.grammar_text()


def test_a_compile_past_the_deadline_is_refused():
    slow = GrammarChecker(timeout_s=0.001)  # a worker that has not even started yet misses it
    try:
        with pytest.raises(InvalidRequest, match="too complex") as info:
            slow.check(StructuredOutputs(json={"type": "integer"}))
        assert info.value.code == "grammar_too_complex"
    finally:
        slow.close()
