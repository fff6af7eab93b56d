"""ember/config/cli.py: the `ember` commands' engine and server flags, generated from the schema."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from ember.cli import app
from ember.config import DeploymentSpec
from ember.config.spec import spec_settings

runner = CliRunner()

COMMANDS = {  # command path -> the spec roots its flags come from
    ("serve",): ("engine", "server"),
    ("generate",): ("engine",),
    ("chat",): ("engine",),
    ("bench", "offline"): ("engine",),
}


def _command(path: tuple[str, ...]):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def _flag_default(leaf):
    return [] if isinstance(leaf.default, dict) else leaf.default


@pytest.mark.parametrize("path", list(COMMANDS))
def test_cli_defaults_are_the_schemas(path):
    params = {p.name: p for p in _command(path).params}
    for name, (where, leaf) in spec_settings().items():
        if where[0] not in COMMANDS[path] and where != ("model",):
            assert name not in params
            continue
        param = params[name]
        want = [leaf.default] if path == ("bench", "offline") and name == "dtype" else _flag_default(leaf)
        assert param.default == want, f"{path} {leaf.flag}"
        assert param.help == leaf.setting.help
        assert leaf.flag in param.opts + param.secondary_opts
        for alias in leaf.setting.aliases:
            assert alias.lstrip("/") in param.opts + param.secondary_opts


def test_vllm_flag_names_and_ember_aliases():
    params = _command(("serve",)).params
    flags = {flag for p in params for flag in p.opts + p.secondary_opts}
    vllm = (
        "--max-model-len --max-num-seqs --max-num-batched-tokens --served-model-name --enable-prefix-caching"
    )
    vllm += " --no-enable-prefix-caching --chat-template --api-key --seed --block-size --dtype --quantization"
    vllm += " --enable-lora --max-loras --max-lora-rank"
    ember = "--no-prefix-cache --kv-cache-memory --speculative --num-speculative-tokens --draft-num-layers"
    ember += " --admin-key --cache-namespace --lora --max-queue --shutdown-timeout --embedding-model"
    ember += " --engine-mode --log-level --host --port --device --model -m --config --print-config"
    assert set((vllm + " " + ember).split()) <= flags


def _print(*args: str) -> str:
    res = runner.invoke(app, ["serve", *args, "--print-config"])
    assert res.exit_code == 0, res.output
    return res.stdout


def test_print_config_then_config_prints_the_same_spec(tmp_path):
    printed = _print()
    assert DeploymentSpec.from_dict(__import__("yaml").safe_load(printed)) == DeploymentSpec()
    path = tmp_path / "d.yaml"
    path.write_text(printed)
    assert _print("--config", str(path)) == printed


def test_flags_reach_the_spec_through_their_aliases(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    printed = _print(
        "--no-prefix-cache",
        "--kv-cache-memory",
        "512MiB",
        "--speculative",
        "draft:tiny",
        "--draft-num-layers",
        "2",
        "--api-key-file",
        str(keys),
        "--lora",
        "sql=/a/sql",
        "-m",
        "some/model",
    )
    path = tmp_path / "d.yaml"
    path.write_text(printed)
    spec = DeploymentSpec.load(path)
    assert spec.model == "some/model" and not spec.engine.cache.enable_prefix_caching
    assert spec.engine.cache.kv_cache_memory == 512 * 2**20
    assert (spec.engine.speculative.method, spec.engine.speculative.draft_model) == ("draft", "tiny")
    assert spec.server.keys.api == ["k1"] and spec.server.loras == {"sql": "/a/sql"}
    assert spec.engine.lora.enabled  # implied by --lora
    assert _print("--config", str(path)) == printed


def test_an_explicit_flag_overrides_the_file(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(
        "engine:\n  scheduler:\n    max_num_seqs: 4\n  cache:\n    block_size: 32\nserver:\n  port: 9000\n"
    )
    spec = DeploymentSpec.from_dict(
        __import__("yaml").safe_load(_print("--config", str(path), "--port", "9100", "--block-size", "16"))
    )
    assert spec.server.port == 9100 and spec.engine.cache.block_size == 16  # given: the flag wins
    assert spec.engine.scheduler.max_num_seqs == 4  # not given: the file's value holds


def test_a_bad_value_in_the_file_exits_2_naming_it(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("engine:\n  quantization: q5\n")
    res = runner.invoke(app, ["serve", "--config", str(path), "--print-config"])
    assert res.exit_code == 2
    assert "engine.quantization" in res.output and "q4_1, q8_0, int4, int8 or none" in res.output


def test_an_unknown_key_in_the_file_exits_2_naming_it(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"server": {"prot": 80}}')
    res = runner.invoke(app, ["serve", "--config", str(path), "--print-config"])
    assert res.exit_code == 2
    assert "server.prot" in res.output and "port" in res.output


def test_a_bad_flag_value_exits_2_naming_the_flag():
    res = runner.invoke(app, ["serve", "--quantization", "q5", "--print-config"])
    assert res.exit_code == 2
    assert "--quantization" in res.output and "int4, int8 or none" in res.output
    res = runner.invoke(app, ["serve", "--lora", "no-path", "--print-config"])
    assert res.exit_code == 2 and "NAME=PATH" in res.output


def test_a_missing_config_file_exits_2(tmp_path):
    res = runner.invoke(app, ["serve", "--config", str(tmp_path / "nope.yaml"), "--print-config"])
    assert res.exit_code == 2
