"""The `ember` command: generate and chat on the real default model."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
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


# -- start-up speed: --version and flag errors import no torch -----------------------------------------

_PROBE = """
import sys
from ember.cli import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    print("EXIT", e.code)
print("TORCH", "torch" in sys.modules)
"""


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [(["--version"], 0, "ember 0.1.0"), (["serve", "--no-such-flag"], 2, "No such option")],
)
def test_version_and_flag_errors_answer_without_torch(args, code, says):
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert f"EXIT {code}" in out, out
    assert "TORCH False" in out, out
    assert says in out
    assert elapsed < 3, f"{args} took {elapsed:.1f} s"


# -- ember models -----------------------------------------------------------------------------------------


def test_imported_model_resolves_by_name(tmp_path, monkeypatch, default_model_dir):
    from ember import LLM, SamplingParams
    from ember.models.catalog import known_models, resolve_model
    from tests.conftest import build_random_model

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = build_random_model(tmp_path / "src", "llama-gqa", default_model_dir)
    res = runner.invoke(app, ["models", "import", "my-tiny", str(model_dir)])
    assert res.exit_code == 0, res.output
    assert resolve_model("my-tiny") == model_dir.resolve()
    assert "my-tiny" in known_models()
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    assert "my-tiny" in listed.stdout and "imported hf" in listed.stdout
    assert "smollm2-135m-instruct" in listed.stdout and "all-minilm-l6-v2" in listed.stdout
    # the name works wherever a model is named
    llm = LLM(model="my-tiny", kv_cache_memory="16MiB")
    out = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 3
    again = runner.invoke(app, ["models", "import", "my-tiny", str(model_dir)])
    assert again.exit_code == 2 and "already imported" in again.output
    assert runner.invoke(app, ["models", "remove", "my-tiny"]).exit_code == 0
    assert model_dir.is_dir()  # the linked source stays


def test_imported_gguf_resolves_by_name(tmp_path, monkeypatch):
    from ember.models import catalog

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    gguf = catalog.known_model_file("smollm2-135m-instruct")
    res = runner.invoke(app, ["models", "import", "small.gguf-model", str(gguf)])
    assert res.exit_code == 0, res.output
    monkeypatch.setattr(catalog, "convert_gguf", lambda path: ("converted", path.resolve()))
    assert catalog.resolve_model("small.gguf-model") == ("converted", gguf.resolve())


@pytest.mark.parametrize(
    ("name", "path", "says"),
    [
        ("a/b", ".", "no '/'"),
        ("smollm2-135m-instruct", ".", "catalog model"),
        ("x", "/nonexistent-dir", "does not exist"),
        ("x", "pyproject.toml", "not a .gguf"),
    ],
)
def test_import_refuses_bad_names_and_paths(tmp_path, monkeypatch, name, path, says):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    res = runner.invoke(app, ["models", "import", name, path])
    assert res.exit_code == 2
    assert says in res.output


def test_pull_without_a_hub_says_how_to_import(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    res = runner.invoke(app, ["models", "pull", "someorg/some-model"])
    assert res.exit_code == 1
    assert "could not reach the Hugging Face hub" in res.output
    assert "ember models import" in res.output
