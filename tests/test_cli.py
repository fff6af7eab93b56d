"""The `ember` command: generate and chat on the real default model."""

from __future__ import annotations

from typer.testing import CliRunner

from ember.cli import app

runner = CliRunner()


def test_generate_streams_a_completion(default_model_dir):
    res = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(default_model_dir),
            "--chat",
            "--max-tokens",
            "12",
            "What is the capital of France?",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "Paris" in res.stdout


def test_chat_answers_each_turn(default_model_dir):
    res = runner.invoke(
        app,
        ["chat", "--model", str(default_model_dir), "--temperature", "0", "--max-tokens", "16"],
        input="What is the capital of France?\n/exit\n",
    )
    assert res.exit_code == 0, res.output
    assert "Paris" in res.stdout


def test_unknown_model_lists_known_ones():
    res = runner.invoke(app, ["generate", "--model", "no-such-model", "hi"])
    assert res.exit_code == 2
    assert "smollm2-135m-instruct" in res.output
