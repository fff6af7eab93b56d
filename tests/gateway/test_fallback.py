"""Must show: an upstream ember server (a process of its own) SIGKILLed mid-run. Non-streamed requests fail
over to the fallback with no client-visible error; the cool-down stops calls to the dead upstream; once
it is back on the same port, a probe finds it and it serves again. A stream that has sent bytes when its
upstream dies ends with an error event; one that has not fails over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from ember.config import ServerConfig
from ember.server.app import ServerState, create_app
from tests.e2e.conftest import free_port, wait_until
from tests.gateway.upstream import MODEL, NamedEngine
from tests.server.fakes import serving

ROOT = Path(__file__).resolve().parents[2]
LOCAL = "local-model"
COOLDOWN = 2.0
STREAM_DELAY = 0.5  # between the upstream's streamed chunks: time to kill it mid-stream


def start_upstream(port: int, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.gateway.upstream", str(port), "a", str(delay)], cwd=ROOT, env=env
    )
    try:
        wait_until(f"http://127.0.0.1:{port}", "/health", timeout=90)
    except TimeoutError:
        proc.kill()
        raise
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture
def gateway():
    """(url of the gateway, its Routing, the upstream's port): provider 'a' on a port of its own, falling
    back to the local model."""
    port = free_port()
    options = ServerConfig(
        port=0,
        embedding_model=None,
        providers=[f"a=http://127.0.0.1:{port}/v1"],
        fallbacks={f"a/{MODEL}": [LOCAL]},
        provider_retries=1,
        provider_failures=2,
        provider_cooldown=COOLDOWN,
        provider_timeout=10.0,
    )
    app = create_app(NamedEngine("local"), LOCAL, ServerState(), options)
    with serving(app, options) as (host, gport):
        yield f"http://{host}:{gport}", app.state.routing, port


class Driver:
    """Clients sending non-streamed requests back to back until stopped: (when, answer or error) each."""

    def __init__(self, url: str, workers: int = 3):
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        self.results: list[tuple[float, str]] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                answer = self.client.chat.completions.create(
                    model=f"a/{MODEL}", messages=[{"role": "user", "content": "hi"}]
                )
                self.results.append((time.monotonic(), answer.choices[0].message.content))
            except BaseException as exc:  # noqa: BLE001 - any client-visible error fails the test
                self.errors.append(exc)

    def wait_for(self, text: str, since: float, count: int = 1, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for t, a in self.results if t > since and a == text) < count:
            assert not self.errors, self.errors[:3]
            assert time.monotonic() < deadline, f"no {count} answers '{text}' within {timeout} s"
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def test_killed_upstream_fails_over_cools_down_and_comes_back(gateway):
    url, gw, port = gateway
    provider = gw.providers["a"]
    proc = start_upstream(port)
    driver = Driver(url)
    try:
        driver.wait_for("from a ok", since=0, count=10)
        kill(proc)  # mid-run: requests are in flight
        killed = time.monotonic()
        driver.wait_for("from local ok", since=killed, count=10)
        # The cool-down: while the breaker is open, the dead upstream gets no calls at all.
        deadline = time.monotonic() + 10
        while not (provider.breaker.state == "open" and provider.breaker.retry_in() > COOLDOWN * 0.75):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        before, answered = provider.attempts, len(driver.results)
        time.sleep(COOLDOWN * 0.5)
        assert provider.attempts == before
        assert len(driver.results) > answered + 5  # the requests went on, to the fallback
        # A stream before its first byte fails over too.
        streamed = driver.client.chat.completions.create(
            model=f"a/{MODEL}", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "from local ok"
        # Back on the same port: a probe finds it, and it serves again.
        proc = start_upstream(port)
        back = time.monotonic()
        driver.wait_for("from a ok", since=back, count=5, timeout=COOLDOWN * 3 + 30)
        assert provider.breaker.state == "closed"
    finally:
        driver.close()
        kill(proc)
    assert not driver.errors, driver.errors[:3]  # not one client-visible error, throughout


def test_stream_cut_after_its_first_bytes_ends_with_an_error_event(gateway):
    url, _, port = gateway
    proc = start_upstream(port, delay=STREAM_DELAY)
    try:
        body = {"model": f"a/{MODEL}", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 1:
                    kill(proc)
    finally:
        if proc.poll() is None:
            kill(proc)
    assert events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_error" and "'a'" in error["message"]
    assert "from local" not in "".join(events)  # it did not go elsewhere mid-answer
