"""`ember serve --speculative ngram` through the official client: the same greedy text as a server without
speculation, streamed and whole, and the speculative-decoding counters on /metrics."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import MODEL, free_port, metric, wait_until

TEXT = (
    "The committee met on Tuesday to discuss the budget for the new library, which will open next spring near "
    "the river. Members agreed that the reading room should have more windows."
)
MESSAGES = [{"role": "user", "content": f"Repeat this text exactly:\n\n{TEXT}"}]


def _ember() -> str:
    return shutil.which("ember") or str(Path(sys.executable).parent / "ember")


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("spec-server") / "serve.log"
    cmd = [_ember(), "serve", "--port", str(port), "--embedding-model", "none", "--kv-cache-memory", "128MiB"]
    cmd += ["--speculative", "ngram", "--num-speculative-tokens", "5"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(url)
        yield url
    except TimeoutError:
        raise AssertionError(log_path.read_text()) from None
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _chat(url: str, stream: bool) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    kw = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=60)
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content
    return "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
    )


@pytest.mark.slow
def test_speculative_server_answers_as_the_plain_one(spec_server, server):
    plain_url, _ = server
    want = _chat(plain_url, stream=False)
    assert want.startswith("The committee met")  # the model copies: lookup has something to propose
    assert _chat(spec_server, stream=False) == want
    assert _chat(spec_server, stream=True) == want
    drafted = metric(spec_server, "ember:spec_decode_num_draft_tokens_total")
    accepted = metric(spec_server, "ember:spec_decode_num_accepted_tokens_total")
    emitted = metric(spec_server, "ember:spec_decode_num_emitted_tokens_total")
    assert 0 < accepted <= drafted and emitted > accepted
    assert metric(plain_url, "ember:spec_decode_num_draft_tokens_total") == 0


def test_a_bad_speculative_flag_is_refused_before_loading():
    done = subprocess.run(
        [_ember(), "serve", "--speculative", "medusa"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "speculative must be ngram or draft:MODEL (got 'medusa')" in done.stderr
