"""`ember optimize`'s bad input: clear errors, exit code 2, before any model loads."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ember.cli import app


@pytest.mark.parametrize(
    "args, says",
    [
        (["--objective", "ttft_p99<=1s", "--shape", "chat"], "unknown metric 'ttft_p99'"),
        (["--objective", "minimize cost"], "give --workload FILE or --shape"),
        (
            ["--objective", "minimize cost", "--shape", "poem"],
            "unknown workload shape 'poem'; known: chat, rag, edit",
        ),
        (["--objective", "minimize cost", "--workload", "BAD"], "w.jsonl:1: not a workload record"),
        (["--objective", "minimize cost", "--workload", "BAD", "--vary", "seqs"], "is not NAME=VALUE"),
    ],
)
def test_bad_input_says_what_is_wrong(tmp_path, args, says):
    bad = tmp_path / "w.jsonl"
    bad.write_text("{oops\n")
    args = [str(bad) if a == "BAD" else a for a in args]
    result = CliRunner().invoke(app, ["optimize", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split())
