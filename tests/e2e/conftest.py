"""Real ember servers on loopback for the end-to-end tests: uvicorn in a thread, or `ember serve` itself."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from ember import AsyncEngine, CacheConfig, EngineConfig, SchedulerConfig
from ember.config import ServerConfig
from ember.embeddings import EmbeddingModel
from ember.server.app import ServerState, create_app

MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(url: str, path: str = "/ready", timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=2.0).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url}{path} did not answer 200 within {timeout} s")


@contextlib.contextmanager
def running_server(
    engine: AsyncEngine, state: ServerState | None = None, options: ServerConfig | None = None
) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, MODEL, state, options), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def metric(url: str, name: str, headers: dict | None = None, default: float | None = None) -> float:
    """The value of series `name` (`ember:x` or `ember:x{label="v"}`): the one sample with that name whose
    labels include the ones given (every series also carries `model_name`); `default` if there is none."""
    text = httpx.get(url + "/metrics", headers=headers).text
    base, _, labels = name.partition("{")
    want = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == base and want.items() <= s.labels.items()
    ]
    if not found and default is not None:
        return default
    assert len(found) == 1, f"{name}: {len(found)} matching series in /metrics"
    return found[0]


def wait_idle(url: str, headers: dict | None = None, timeout: float = 30.0) -> None:
    """Until /metrics shows nothing running or waiting and the KV cache empty."""
    deadline = time.monotonic() + timeout
    names = ("ember:num_requests_running", "ember:num_requests_waiting", "ember:kv_cache_usage_perc")
    while time.monotonic() < deadline:
        if all(metric(url, n, headers) == 0 for n in names):
            return
        time.sleep(0.05)
    raise AssertionError("the server did not go idle: " + str({n: metric(url, n, headers) for n in names}))


@pytest.fixture(scope="session")
def embedder() -> EmbeddingModel:
    return EmbeddingModel.load("all-minilm-l6-v2")


@contextlib.contextmanager
def default_server(model_dir, embedder, mode: str = "thread") -> Iterator[tuple[str, AsyncEngine]]:
    """The default model with embeddings, open (no API keys), its engine core on a thread or in a process."""
    engine = AsyncEngine(
        EngineConfig(model=str(model_dir), cache=CacheConfig(kv_cache_memory="256MiB")),
        mode=mode,
        max_queue=64,
    )
    try:
        with running_server(engine, ServerState(embedder=embedder)) as url:
            yield url, engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def server(default_model_dir, embedder):
    with default_server(default_model_dir, embedder) as s:
        yield s


def small_engine(model_dir, max_num_seqs: int, max_queue: int) -> AsyncEngine:
    return AsyncEngine(
        EngineConfig(
            model=str(model_dir),
            cache=CacheConfig(kv_cache_memory="64MiB"),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs),
        ),
        max_queue=max_queue,
    )
