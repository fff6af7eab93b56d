"""`ember serve --print-config > d.yaml && ember serve --config d.yaml` serves the same deployment."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port, wait_until


def _ember() -> str:
    return shutil.which("ember") or str(Path(sys.executable).parent / "ember")


@pytest.mark.slow
def test_a_printed_config_serves_the_same_deployment(default_model_dir, tmp_path):
    port = free_port()
    (tmp_path / "keys").write_text("k1\n")  # a file, not a flag: --print-config hides keys it is given
    flags = [
        "--port", str(port), "--served-model-name", "tiny", "--kv-cache-memory", "64MiB",
        "--max-num-seqs", "3", "--embedding-model", "none", "--api-key-file", str(tmp_path / "keys"),
        "--engine-mode", "thread",
    ]  # fmt: skip
    printed = subprocess.run([_ember(), "serve", *flags, "--print-config"], capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    spec = tmp_path / "d.yaml"
    spec.write_text(printed.stdout)
    again = subprocess.run(
        [_ember(), "serve", "--config", str(spec), "--print-config"], capture_output=True, text=True
    )
    assert again.stdout == printed.stdout
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [_ember(), "serve", "--config", str(spec)], stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(url)
        key = {"authorization": "Bearer k1"}
        assert httpx.get(url + "/v1/models").status_code == 401  # the file's API key is in force
        models = httpx.get(url + "/v1/models", headers=key).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]  # its served name, and no embedding model
        body = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, headers=key, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    log = (tmp_path / "serve.log").read_text()
    # the start-up report: what is served and with how much room, then where
    assert "model: tiny (catalog: " in log, log
    assert "KV cache: " in log and "context length: " in log
    assert f"ready on http://127.0.0.1:{port}" in log
