"""`ember eval`: a spec's mistakes are named before anything runs, and a two-model spec run against a
live server (a stand-in engine, the adapter 'tuned' better than the base) writes its report: the table
with the paired interval, the plot and every item as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ember.cli import app
from ember.evals.cli import load_spec
from ember.server.app import ServerState
from tests.e2e.conftest import MODEL, running_server
from tests.evals.math_engine import MathEngine

ITEMS = [{"q": f"what is {i} + 1?", "a": str(i + 1)} for i in range(10)]


def write_spec(tmp_path, drop: str | None = None, **change) -> str:
    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"item": it}) + "\n" for it in ITEMS))
    spec = {
        "name": "sums",
        "items": "items.jsonl",
        "input_messages": [{"role": "user", "content": "{{item.q}}"}],
        "criteria": [
            {
                "type": "string_check",
                "name": "exact",
                "operation": "eq",
                "input": "{{sample.output_text}}",
                "reference": "{{item.a}}",
            }
        ],
        "models": [MODEL, "tuned"],
        "n_boot": 500,
        **change,
    }
    spec.pop(drop, None)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"modles": ["a"]}, "unknown key 'modles'"),
        ({"models": ["a", "b", "c"]}, "one model, or two"),
        ({"items": "missing.jsonl"}, "items file"),
        ({"drop": "input_messages"}, "'input_messages' is required"),
    ],
)
def test_a_bad_spec_is_named(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_spec(Path(write_spec(tmp_path, **change)))


def test_a_two_model_spec_writes_a_report_with_the_paired_interval(tmp_path):
    with running_server(MathEngine(), ServerState()) as url:
        result = CliRunner().invoke(
            app, ["eval", write_spec(tmp_path), "--url", url, "--out", str(tmp_path / "out")]
        )
    assert result.exit_code == 0, result.output
    report = (tmp_path / "out" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| exact"))
    assert "| 10 | 0 | 0.500 [" in row and "| 1.000 [1.000, 1.000] |" in row and row.endswith("| yes |")
    assert (tmp_path / "out" / "report.png").stat().st_size > 10_000
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["criteria"][0]["diff"] == 0.5 and len(results["items"]) == 10
    assert results["items"][1]["sample_b"]["output_text"] == "2"


def test_one_model_and_a_bad_criterion(tmp_path):
    with running_server(MathEngine(), ServerState()) as url:
        ok = CliRunner().invoke(
            app, ["eval", write_spec(tmp_path, models=[MODEL]), "--url", url, "--out", str(tmp_path / "one")]
        )
        bad_criteria = [
            {"type": "string_check", "name": "x", "operation": "gt", "input": "a", "reference": "b"}
        ]
        bad = CliRunner().invoke(app, ["eval", write_spec(tmp_path, criteria=bad_criteria), "--url", url])
    assert ok.exit_code == 0, ok.output
    row = next(
        line
        for line in (tmp_path / "one" / "report.md").read_text().splitlines()
        if line.startswith("| exact")
    )
    assert row.startswith("| exact | string_check | 10 | 0 | 5 | 5 | 0.500 | [")
    assert bad.exit_code == 2 and "testing_criteria[0].operation" in bad.output
