"""--mcp, --mcp-timeout and --mcp-max-output (ember/config/server.py): parsed, checked with messages that
name the fault, and carried through a spec file."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from ember.cli import app
from ember.config import ConfigError, DeploymentSpec, ServerConfig
from ember.config.server import McpServer, parse_mcp

runner = CliRunner()


def test_stdio_and_http_servers_are_parsed():
    given = ["calc=stdio:python -m calc --fast", "kv=http://127.0.0.1:8001/mcp", "web=https://h.example/mcp"]
    config = ServerConfig(mcp_servers=parse_mcp(given))
    assert config.mcp == [
        McpServer("calc", command=("python", "-m", "calc", "--fast")),
        McpServer("kv", url="http://127.0.0.1:8001/mcp"),
        McpServer("web", url="https://h.example/mcp"),
    ]
    quoted = McpServer.parse("q", "stdio:'my server' --name 'a b'")
    assert quoted.command == ("my server", "--name", "a b")


@pytest.mark.parametrize(
    "specs, words",
    [
        (["calc"], "LABEL=stdio:COMMAND"),
        (["=stdio:x"], "LABEL=stdio:COMMAND"),
        (["calc="], "LABEL=stdio:COMMAND"),
        (["calc=stdio:a", "calc=stdio:b"], "the label 'calc' is given twice"),
        (["9lives=stdio:a"], "the label must start with a letter"),
        (["a b=stdio:a"], "the label must start with a letter"),
        (["calc=ftp://h/mcp"], "unknown scheme 'ftp'; use stdio:COMMAND ARGS or http(s)://HOST/PATH"),
        (["calc=python -m calc"], "no scheme"),
        (["calc=stdio:"], "stdio: needs a command"),
        (["calc=stdio:python 'unclosed"], "cannot split the command"),
        (["calc=http:///mcp"], "the URL has no host"),
    ],
)
def test_a_bad_flag_is_refused_naming_the_fault(specs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_mcp(specs)


def test_a_spec_file_is_checked_like_the_flag():
    with pytest.raises(ConfigError, match="unknown scheme 'ws'") as caught:
        ServerConfig(mcp_servers={"calc": "ws://h/mcp"})
    assert caught.value.field == "mcp_servers"
    with pytest.raises(ConfigError, match="needs the store"):
        ServerConfig(mcp_servers={"calc": "stdio:python -m calc"}, store=False)
    with pytest.raises(ConfigError, match="mcp_timeout"):
        ServerConfig(mcp_timeout=0)
    with pytest.raises(ConfigError, match="mcp_max_output"):
        ServerConfig(mcp_max_output="12 parsecs")
    assert ServerConfig(mcp_max_output="1MiB").mcp_max_output == 1 << 20


def test_the_flags_reach_the_spec_and_round_trip(tmp_path):
    args = ["serve", "--mcp", "calc=stdio:python -m calc", "--mcp", "kv=http://127.0.0.1:9/mcp"]
    res = runner.invoke(app, [*args, "--mcp-timeout", "5", "--mcp-max-output", "16KiB", "--print-config"])
    assert res.exit_code == 0, res.output
    server = yaml.safe_load(res.stdout)["server"]
    assert server["mcp_servers"] == {"calc": "stdio:python -m calc", "kv": "http://127.0.0.1:9/mcp"}
    assert server["mcp_timeout"] == 5 and server["mcp_max_output"] == "16KiB"
    path = tmp_path / "d.yaml"
    path.write_text(res.stdout)
    loaded = DeploymentSpec.load(path).server
    assert [s.label for s in loaded.mcp] == ["calc", "kv"] and loaded.mcp_max_output == 16 << 10


def test_a_bad_flag_exits_2_naming_it():
    res = runner.invoke(app, ["serve", "--mcp", "calc=gopher://h", "--print-config"])
    assert res.exit_code == 2 and "--mcp" in res.output and "unknown scheme 'gopher'" in res.output
