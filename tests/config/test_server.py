"""ember/config/server.py: where API keys come from (flags, files, environment), and that a printed
spec never shows them."""

from __future__ import annotations

import re

import pytest
import yaml
from typer.testing import CliRunner

from ember.cli import app
from ember.config import ConfigError, DeploymentSpec
from ember.config.server import ServerConfig


@pytest.fixture(autouse=True)
def _no_keys_in_env(monkeypatch):
    monkeypatch.delenv("EMBER_API_KEYS", raising=False)
    monkeypatch.delenv("EMBER_ADMIN_KEY", raising=False)


def test_keys_come_from_flags_files_and_the_environment(tmp_path, monkeypatch):
    api_file, admin_file = tmp_path / "api", tmp_path / "admin"
    api_file.write_text("# team keys\nk-file-1\n\n  k-file-2  \nk-flag\n")
    admin_file.write_text("adm-file\n")
    monkeypatch.setenv("EMBER_API_KEYS", "k-env-1, k-env-2,,")
    monkeypatch.setenv("EMBER_ADMIN_KEY", "adm-env")
    config = ServerConfig(api_keys=["k-flag"], api_key_file=str(api_file), admin_key_file=str(admin_file))
    assert config.keys.api == ["k-flag", "k-file-1", "k-file-2", "k-env-1", "k-env-2"]
    assert config.keys.admin == "adm-file"  # the flag, else its file, else the environment
    assert ServerConfig().keys.admin == "adm-env" and ServerConfig().keys.api == ["k-env-1", "k-env-2"]
    assert ServerConfig(admin_key="adm-flag", admin_key_file=str(admin_file)).keys.admin == "adm-flag"
    assert config.api_keys == [
        "k-flag"
    ]  # what a spec writes: the files and the environment stay where they are


def test_an_admin_key_from_the_environment_enables_lora(monkeypatch):
    untuned = ServerConfig(fine_tuning=False)
    assert not DeploymentSpec(server=untuned).engine.lora.enabled
    monkeypatch.setenv("EMBER_ADMIN_KEY", "adm")
    assert DeploymentSpec(server=ServerConfig(fine_tuning=False)).engine.lora.enabled


def test_fine_tuning_enables_lora():
    assert not DeploymentSpec().engine.lora.enabled  # the default server pays nothing for LoRA
    # what it tunes is served by the multi-LoRA engine
    assert DeploymentSpec(server=ServerConfig(fine_tuning=True)).engine.lora.enabled


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"api_key_file": "/nonexistent/keys"}, "--api-key-file /nonexistent/keys: cannot read it"),
        ({"admin_key_file": "TWO"}, "holds 2 keys, not one"),
        ({"api_key_file": "ONE", "admin_key": "k1"}, "differ from every --api-key"),
        ({"api_key_file": "ONE", "cache_namespaces": {"t": ["k1", "zz"]}}, "'zz' is not one of"),
        ({"api_keys": ["***"]}, "--print-config hides keys"),
    ],
)
def test_bad_key_sources_are_refused(tmp_path, kwargs, words):
    (tmp_path / "one").write_text("k1\n")
    (tmp_path / "two").write_text("a\nb\n")
    files = {"ONE": str(tmp_path / "one"), "TWO": str(tmp_path / "two")}
    kwargs = {k: files.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=re.escape(words)):
        ServerConfig(**kwargs)


def test_print_config_hides_the_keys(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sk-from-file\n")
    args = ["serve", "--api-key", "sk-secret-1", "--api-key-file", str(keys), "--admin-key", "sk-admin"]
    args += ["--cache-namespace", "team=sk-secret-1", "--print-config"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "sk-" not in res.stdout
    server = yaml.safe_load(res.stdout)["server"]
    assert server["api_keys"] == ["***"] and server["admin_key"] == "***"
    assert server["cache_namespaces"] == {"team": ["***"]} and server["api_key_file"] == str(keys)
    path = tmp_path / "d.yaml"
    path.write_text(res.stdout)
    with pytest.raises(ConfigError, match="hides keys"):  # never served with '***' as a key
        DeploymentSpec.load(path)


def test_adapter_roots_are_the_flags_ember_s_directory_and_each_lora(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    config = ServerConfig(lora_roots=[str(tmp_path / "roots")], loras={"sql": str(tmp_path / "a" / "sql")})
    assert config.adapter_roots() == [
        str(tmp_path / "roots"),
        str(tmp_path / "cache" / "adapters"),
        str(tmp_path / "a" / "sql"),
    ]
