"""SIGTERM or Ctrl-C drains `ember serve`: in-flight requests finish, new ones are refused, exit code 0."""

from __future__ import annotations

import json
import os
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


def _start(port: int, tmp_path: Path, kv: str = "128MiB") -> subprocess.Popen:
    cmd = [_ember(), "serve", "--port", str(port), "--embedding-model", "none", "--kv-cache-memory", kv]
    with open(tmp_path / "serve.log", "w") as log:
        # A session of its own, so a Ctrl-C can be sent to the whole group as a terminal would.
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_signal_finishes_in_flight_requests_and_exits_0(default_model_dir, tmp_path, how):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(port, tmp_path)
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
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:  # the engine core's process gets it too, and must keep stepping until the drain ends
            os.killpg(proc.pid, signal.SIGINT)
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


@pytest.mark.slow
def test_sigterm_while_the_model_loads_exits_promptly(default_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(port, tmp_path, kv="2GiB")  # a big pool: loading takes a few seconds
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()
