"""/health and /ready follow the engine's step loop: a core with work that stops reporting steps turns
them 503 after --health-stall-timeout; an idle core stays healthy however long it idles."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from ember import AsyncEngine, CacheConfig, EngineConfig
from ember.config import ServerConfig
from ember.engine.core import EngineCore
from tests.conftest import build_random_model
from tests.e2e.conftest import running_server

STALL_S = 0.5


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, default_model_dir):
    return build_random_model(tmp_path_factory.mktemp("tiny"), "llama-gqa", default_model_dir)


def test_a_wedged_step_loop_turns_health_503(tiny_model, monkeypatch):
    release = threading.Event()
    real_step = EngineCore.step
    wedged = threading.Event()

    def step(self):
        if not release.is_set():
            wedged.set()
            release.wait(30)  # the core's thread hangs here, as in a kernel or grammar that never returns
        return real_step(self)

    monkeypatch.setattr(EngineCore, "step", step)
    engine = AsyncEngine(
        EngineConfig(model=str(tiny_model), cache=CacheConfig(kv_cache_memory="16MiB")), mode="thread"
    )
    options = ServerConfig(health_stall_timeout=STALL_S)
    try:
        with running_server(engine, options=options) as url:
            time.sleep(2 * STALL_S)  # idle past the deadline: still healthy
            assert httpx.get(url + "/health").status_code == 200
            assert httpx.get(url + "/ready").status_code == 200
            answer: dict = {}
            body = {"model": "smollm2-135m-instruct", "prompt": "Hello", "max_tokens": 2}
            client = threading.Thread(
                target=lambda: answer.update(r=httpx.post(url + "/v1/completions", json=body, timeout=60))
            )
            client.start()
            assert wedged.wait(10)
            deadline = time.monotonic() + 10
            while httpx.get(url + "/health").status_code == 200:
                assert time.monotonic() < deadline, "/health stayed 200 while the step loop hung"
                time.sleep(0.1)
            r = httpx.get(url + "/health")
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "engine_stalled"
            assert "stalled" in r.json()["error"]["message"]
            assert httpx.get(url + "/ready").status_code == 503
            release.set()  # the loop moves again: the request finishes, health recovers
            client.join(timeout=30)
            assert answer["r"].status_code == 200
            assert httpx.get(url + "/health").status_code == 200
            assert httpx.get(url + "/ready").status_code == 200
    finally:
        release.set()
        engine.shutdown()


def test_a_slow_but_moving_core_reports_a_heartbeat(tiny_model, monkeypatch):
    """A core busy for longer than the deadline in total, but stepping, is not stalled."""
    real_step = EngineCore.step

    def step(self):
        time.sleep(0.05)
        return real_step(self)

    monkeypatch.setattr(EngineCore, "step", step)
    engine = AsyncEngine(
        EngineConfig(model=str(tiny_model), cache=CacheConfig(kv_cache_memory="16MiB")), mode="thread"
    )
    try:
        with running_server(engine, options=ServerConfig(health_stall_timeout=STALL_S)) as url:
            body = {"model": "smollm2-135m-instruct", "prompt": "Hello", "max_tokens": 12}
            client = threading.Thread(
                target=lambda: httpx.post(url + "/v1/completions", json=body, timeout=60)
            )
            client.start()
            seen = set()
            while client.is_alive():
                seen.add(httpx.get(url + "/health").status_code)
                time.sleep(0.05)
            assert seen == {200}
    finally:
        engine.shutdown()
