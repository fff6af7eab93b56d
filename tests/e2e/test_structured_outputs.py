"""response_format through the official SDK, on the real default model: every json_schema answer validates
(jsonschema), streamed or not, greedy or sampled; GBNF grammars hold (checked with lark); bad constraints
are 400s that name the problem, and the server keeps serving."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import lark
import openai
import pytest

from tests.e2e.conftest import MODEL, wait_idle

NAME = {"type": "string", "maxLength": 24}
SCHEMAS: dict[str, tuple[str, dict]] = {
    "person": (
        "a person",
        {
            "type": "object",
            "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"],
        },
    ),
    "enum": (
        "a traffic light state",
        {
            "type": "object",
            "properties": {"color": {"enum": ["red", "amber", "green"]}},
            "required": ["color"],
        },
    ),
    "bounded_number": (
        "a temperature reading",
        {
            "type": "object",
            "properties": {"celsius": {"type": "number", "minimum": -50, "maximum": 60}},
            "required": ["celsius"],
        },
    ),
    "exclusive_bounds": (
        "a probability",
        {
            "type": "object",
            "properties": {"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
            "required": ["p"],
        },
    ),
    "array_of_strings": (
        "three fruits",
        {
            "type": "object",
            "properties": {"fruits": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
            "required": ["fruits"],
        },
    ),
    "array_of_ints": (
        "some lottery numbers",
        {
            "type": "object",
            "properties": {
                "numbers": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 1, "maximum": 49},
                    "minItems": 2,
                    "maxItems": 6,
                }
            },
            "required": ["numbers"],
        },
    ),
    "nested": (
        "a company and its address",
        {
            "type": "object",
            "properties": {
                "company": NAME,
                "address": {
                    "type": "object",
                    "properties": {
                        "street": NAME,
                        "city": NAME,
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["street", "city", "zip"],
                },
            },
            "required": ["company", "address"],
        },
    ),
    "optional_fields": (
        "a book",
        {
            "type": "object",
            "properties": {
                "title": NAME,
                "subtitle": NAME,
                "pages": {"type": "integer", "minimum": 1, "maximum": 2000},
            },
            "required": ["title"],
        },
    ),
    "pattern_date": (
        "a date in ISO format",
        {
            "type": "object",
            "properties": {
                "date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])$"}
            },
            "required": ["date"],
        },
    ),
    "pattern_code": (
        "a product code",
        {
            "type": "object",
            "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}},
            "required": ["code"],
        },
    ),
    "boolean": (
        "whether the sky is blue",
        {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]},
    ),
    "array_of_objects": (
        "two students and their grades",
        {
            "type": "object",
            "properties": {
                "students": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": NAME, "grade": {"enum": ["A", "B", "C", "D"]}},
                        "required": ["name", "grade"],
                    },
                    "minItems": 1,
                    "maxItems": 3,
                }
            },
            "required": ["students"],
        },
    ),
    "ref_defs": (
        "a line segment",
        {
            "$defs": {
                "point": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": -100, "maximum": 100},
                        "y": {"type": "integer", "minimum": -100, "maximum": 100},
                    },
                    "required": ["x", "y"],
                }
            },
            "type": "object",
            "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
            "required": ["start", "end"],
        },
    ),
    "any_of": (
        "an id that is a number or a short string",
        {
            "type": "object",
            "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9999}, NAME]}},
            "required": ["id"],
        },
    ),
    "nullable": (
        "a user with an optional nickname",
        {
            "type": "object",
            "properties": {"user": NAME, "nickname": {"type": ["string", "null"], "maxLength": 16}},
            "required": ["user", "nickname"],
        },
    ),
    "const": (
        "a version 2 message",
        {
            "type": "object",
            "properties": {"version": {"const": 2}, "text": NAME},
            "required": ["version", "text"],
        },
    ),
    "string_lengths": (
        "a username",
        {
            "type": "object",
            "properties": {"username": {"type": "string", "minLength": 3, "maxLength": 12}},
            "required": ["username"],
        },
    ),
    "deep_nesting": (
        "a tree of three levels",
        {
            "type": "object",
            "properties": {
                "level1": {
                    "type": "object",
                    "properties": {
                        "level2": {
                            "type": "object",
                            "properties": {"level3": {"type": "integer", "minimum": 0, "maximum": 9}},
                            "required": ["level3"],
                        }
                    },
                    "required": ["level2"],
                }
            },
            "required": ["level1"],
        },
    ),
    "enum_array_unique": (
        "the primary colors",
        {
            "type": "object",
            "properties": {
                "colors": {
                    "type": "array",
                    "items": {"enum": ["red", "green", "blue", "yellow"]},
                    "minItems": 1,
                    "maxItems": 4,
                },
                "count": {"type": "integer", "minimum": 0, "maximum": 4},
            },
            "required": ["colors", "count"],
        },
    ),
    "top_level_array": (
        "a list of numbers",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 100},
            "minItems": 1,
            "maxItems": 5,
        },
    ),
    "event": (
        "a calendar event",
        {
            "type": "object",
            "properties": {
                "title": NAME,
                "start": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
                "attendees": {"type": "array", "items": NAME, "maxItems": 3},
                "online": {"type": "boolean"},
                "priority": {"enum": ["low", "normal", "high"]},
            },
            "required": ["title", "start", "attendees", "online", "priority"],
        },
    ),
}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _ask(client, name: str, temperature: float, stream: bool) -> tuple[str, str]:
    what, schema = SCHEMAS[name]
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": f"Reply in JSON with {what}."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        },
        temperature=temperature,
        max_tokens=400,
        seed=7,
    )
    if not stream:
        r = client.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, reason = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    return text, reason


@pytest.mark.slow
def test_every_json_schema_answer_validates(client, server):
    assert len(SCHEMAS) >= 20
    cases = [(n, t, s) for n in SCHEMAS for t in (0.0, 1.0) for s in (False, True)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda c: _ask(client, *c), cases))
    for (name, temperature, stream), (text, reason) in zip(cases, answers, strict=True):
        where = f"{name} at temperature {temperature}, {'streamed' if stream else 'whole'}: {text!r}"
        assert reason == "stop", where
        jsonschema.validate(json.loads(text), SCHEMAS[name][1])
    # Greedy answers are the same streamed or not.
    by_case = dict(zip(cases, answers, strict=True))
    for name in SCHEMAS:
        assert by_case[(name, 0.0, False)][0] == by_case[(name, 0.0, True)][0]
    wait_idle(server[0])


def test_json_object_is_an_object(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat in JSON."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=200,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens, but a prefix of an object all the same
        assert r.choices[0].message.content.startswith("{")


ARITHMETIC_GBNF = r"""
root ::= expr " = " num
expr ::= term (("+" | "-") term)*
term ::= num | "(" expr ")"
num ::= [1-9] [0-9]?
"""
ARITHMETIC_LARK = r"""
start: expr " = " NUM
expr: term (("+" | "-") term)*
term: NUM | "(" expr ")"
NUM: /[1-9][0-9]?/
"""


def test_gbnf_grammar_constrains_the_output(client):
    parser = lark.Lark(ARITHMETIC_LARK, parser="earley", lexer="dynamic")
    for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2), (1.0, 3)):
        r = client.completions.create(
            model=MODEL,
            prompt="Write a sum: ",
            extra_body={"response_format": {"type": "grammar", "grammar": ARITHMETIC_GBNF}},
            temperature=temperature,
            seed=seed,
            max_tokens=60,
        )
        text = r.choices[0].text
        assert r.choices[0].finish_reason == "stop", text
        parser.parse(text)  # raises where the text is not in the grammar


def test_choice_of_n_samples_each_constrained(client):
    schema = SCHEMAS["person"][1]
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A person, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        n=3,
        temperature=1.0,
        seed=11,
        logprobs=True,
        max_tokens=100,
    )
    assert len(r.choices) == 3
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), schema)
        assert len(c.logprobs.content) == r.usage.completion_tokens // 3 or c.logprobs.content


BAD_FORMATS = [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}, "not"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "strin"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "nowhere"),
    (
        {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}},
        },
        "look-around",
    ),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
    ({"type": "grammar", "grammar": 'root ::= "a" | missing'}, "missing"),
    ({"type": "grammar"}, "grammar"),
    ({"type": "xml"}, "type"),
]


@pytest.mark.parametrize(("fmt", "named"), BAD_FORMATS)
def test_bad_constraints_are_400s_that_name_the_problem(client, fmt, named):
    for _ in range(2):  # the second time from the cache of refusals
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], response_format=fmt, max_tokens=4
            )
        assert named in e.value.message
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert r.choices  # still serving
