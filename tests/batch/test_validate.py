"""The input file's lines: which run, which are refused and why."""

from __future__ import annotations

import json

import pytest

from ember.batch import validate
from ember.batch.validate import check

URL = "/v1/chat/completions"


def good(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": URL, "body": {"model": "m", **body}}


def data(*lines) -> bytes:
    return b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines)


@pytest.mark.parametrize(
    "bad, code",
    [
        (b"{oops", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1]", "invalid_request"),
        ({"method": "POST", "url": URL, "body": {"model": "m"}}, "missing_custom_id"),
        ({**good("x"), "custom_id": 3}, "missing_custom_id"),
        ({**good("x"), "method": "GET"}, "invalid_method"),
        ({**good("x"), "url": "/v1/completions"}, "invalid_url"),
        ({**good("x"), "body": "hi"}, "invalid_body"),
        ({**good("x"), "body": {"messages": []}}, "missing_model"),
        (good("x", stream=True), "invalid_body"),
        ({**good("x"), "extra": 1}, "unknown_parameter"),
    ],
)
def test_a_bad_line_is_refused_and_the_others_run(bad, code):
    out = check(data(good("a"), bad, good("b")), URL)
    assert [v["custom_id"] for v in out.valid] == ["a", "b"]
    assert [(r["line"], r["code"]) for r in out.rejects] == [(2, code)]


def test_a_duplicate_custom_id_is_refused_after_its_first_use():
    out = check(data(good("a"), good("a", n=2), b"", good("b")), URL)
    assert [(v["custom_id"], v["line"]) for v in out.valid] == [("a", 1), ("b", 4)]
    (dup,) = out.rejects
    assert (dup["custom_id"], dup["line"], dup["code"]) == ("a", 2, "duplicate_custom_id")
    assert "line 1" in dup["message"] and out.model == "m"


def test_past_the_line_limit_the_file_is_refused(monkeypatch):
    monkeypatch.setattr(validate, "MAX_LINES", 2)
    assert check(data(good("a"), good("b"), good("c")), URL).too_many
    assert not check(data(good("a"), good("b")), URL).too_many
