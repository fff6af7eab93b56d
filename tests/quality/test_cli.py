"""`ember quality`: the table, markdown and JSON of a run on a tiny random model; bad settings exit 2."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ember.cli import app

runner = CliRunner()


def test_report_on_tiny_model(random_model_dirs, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["What is 2 + 2?", "def f(x):"]))
    out = tmp_path / "report"
    model = str(random_model_dirs["llama-gqa"])
    args = ["quality", "-m", model, "-q", "none", "-q", "int8", "--prompts", str(prompts)]
    res = runner.invoke(app, [*args, "--max-tokens", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "fidelity vs the float32 reference" in res.stdout and "int8 / float32" in res.stdout
    body = json.loads((out / "fidelity.json").read_text())
    none, int8 = body["results"]
    assert (none["quantization"], none["agreement"], none["kl_mean"]) == (None, 1.0, 0.0)
    assert int8["quantization"] == "int8" and int8["kl_mean"] > 0 and int8["tokens"] == 8
    md = (out / "fidelity.md").read_text()
    assert "| none / float32 | 1.000 | 0.0000 |" in md and "ember quality" in md


def test_unknown_quantization_exits_2():
    res = runner.invoke(app, ["quality", "-q", "q3_k"])
    assert res.exit_code == 2
    assert "quantization: must be" in res.output


def test_pair_the_engine_does_not_run_exits_2():
    res = runner.invoke(app, ["quality", "-q", "q4_1", "--dtype", "bfloat16"])
    assert res.exit_code == 2
    assert "q4_1 runs with float32 activations" in res.output


def test_auto_is_scored_as_what_it_resolves_to(random_model_dirs, tmp_path, monkeypatch):
    from ember.config import auto

    monkeypatch.setattr(auto, "block_kernels_unavailable", lambda: "no C kernels in this test")
    monkeypatch.setattr(auto, "cpu_flags", lambda: frozenset())
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Hi"]))
    model = str(random_model_dirs["llama-gqa"])
    args = ["quality", "-m", model, "-q", "auto", "--prompts", str(prompts), "--max-tokens", "2"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    (result,) = json.loads((tmp_path / "r" / "fidelity.json").read_text())["results"]
    assert (result["quantization"], result["dtype"]) == ("int8", "float32")
