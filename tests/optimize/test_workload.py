"""Workload files: bench records with arrivals, exported traces, and a malformed line named by number."""

from __future__ import annotations

import json

import pytest

from ember.optimize.workload import load


def _write(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return path


def test_bench_records_keep_their_arrivals_and_lengths(tmp_path):
    f = _write(
        tmp_path / "w.jsonl",
        [
            {"id": "a", "prompt": "hi", "max_tokens": 8, "arrival": 0.5},
            {"messages": [{"role": "user", "content": "yo"}]},
        ],
    )
    w = load(f, default_max_tokens=12)
    assert [(i.id, i.prompt, i.max_tokens, i.arrival) for i in w.items] == [
        ("req-1", "yo", 12, 0.0),
        ("a", "hi", 8, 0.5),
    ]


def test_traces_arrive_at_their_created_times_and_generate_what_the_model_did(tmp_path):
    row = {
        "request": {"messages": [{"role": "user", "content": "q"}], "max_tokens": 99},
        "usage": {"completion_tokens": 7},
    }
    f = _write(
        tmp_path / "t.jsonl", [{**row, "id": "x", "created_at": 1010}, {**row, "id": "y", "created_at": 1000}]
    )
    w = load(f)
    assert [(i.id, i.arrival, i.max_tokens) for i in w.items] == [("y", 0.0, 7), ("x", 10.0, 7)]


@pytest.mark.parametrize(
    "line, says",
    [
        ("{not json", "w.jsonl:2: not a workload record"),
        (
            '{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}',
            "exactly one of prompt or messages",
        ),
        ('{"prompt": "a", "max_tokens": 0}', "w.jsonl:2: max_tokens must be at least 1"),
        ('{"prompt": "a", "arrival": -1}', "arrival must be >= 0"),
        ("[1, 2]", "a record is a JSON object"),
    ],
)
def test_a_malformed_line_is_named(tmp_path, line, says):
    f = _write(tmp_path / "w.jsonl", [{"prompt": "ok"}, line])
    with pytest.raises(ValueError, match=says):
        load(f)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load(tmp_path / "e.jsonl")
