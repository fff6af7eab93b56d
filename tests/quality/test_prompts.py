"""ember.quality.prompts: the built-in set ships with the package; a user's file is JSON or JSONL."""

from __future__ import annotations

import json

import pytest

from ember.quality.prompts import builtin_prompts, load_prompts


def test_builtin_set_is_varied_and_nonempty():
    prompts = builtin_prompts()
    assert len(prompts) >= 8 and all(isinstance(p, str) and p for p in prompts)
    assert any("Python" in p for p in prompts) and any(any(c.isdigit() for c in p) for p in prompts)


def test_json_list_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["one", "two"]))
    (tmp_path / "b.jsonl").write_text('"one"\n{"prompt": "two"}\n\n')
    assert load_prompts(tmp_path / "a.json") == load_prompts(tmp_path / "b.jsonl") == ["one", "two"]


@pytest.mark.parametrize(
    ("text", "message"),
    [("[]", "holds no prompts"), ('["ok", 3]', "prompt 1 is not"), ("not json\n", "not JSON or JSONL")],
)
def test_bad_file_says_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_prompts(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read prompts file"):
        load_prompts(tmp_path / "nope.json")
