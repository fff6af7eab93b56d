"""SIGTERM drains `ember serve`: in-flight requests finish, new ones are refused, the process exits 0."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import MODEL, free_port, wait_until


def _ember() -> str:
    return shutil.which("ember") or str(Path(sys.executable).parent / "ember")


@pytest.mark.slow
def test_sigterm_during_load_finishes_in_flight_and_exits_0(default_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [_ember(), "serve", "--port", str(port), "--embedding-model", "none", "--kv-cache-memory", "128MiB"]
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(url)
        results: list[dict] = []
        started = threading.Barrier(5)

        def stream_one(i: int) -> None:
            body = {
                "model": MODEL,
                "prompt": f"Story number {i}:",
                "max_tokens": 64,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            text, reason, usage, first = "", None, None, True
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        text += chunk["choices"][0]["text"]
                        reason = chunk["choices"][0]["finish_reason"] or reason
                    usage = chunk.get("usage") or usage
                    if first:
                        first = False
                        started.wait()
            results.append({"text": text, "reason": reason, "usage": usage})

        threads = [threading.Thread(target=stream_one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait(timeout=60)  # every stream is under way
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(url + "/ready").status_code == 503
        refused = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "draining"
        for t in threads:
            t.join(timeout=120)
        assert len(results) == 4
        for r in results:
            assert r["reason"] == "length" and r["usage"]["completion_tokens"] == 64 and r["text"]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
