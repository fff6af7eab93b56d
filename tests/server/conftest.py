"""A server over a small random-weight model (the default model's tokenizer and chat template) and the
real embedding model: fast enough for the HTTP layer's own tests and the fuzz run."""

from __future__ import annotations

import pytest

from ember import AsyncEngine, CacheConfig, EngineConfig
from ember.embeddings import EmbeddingModel
from ember.server.app import ServerState
from tests.e2e.conftest import running_server

MAX_MODEL_LEN = 256  # short, so that whatever a fuzzer asks for is answered in a moment


@pytest.fixture(scope="session")
def small_state() -> ServerState:
    """The server's state, for tests that flip a switch of it (and put it back)."""
    return ServerState(embedder=EmbeddingModel.load("all-minilm-l6-v2"))


@pytest.fixture(scope="session")
def small_server(random_model_dirs, small_state):
    """(url, engine) of an open server that serves the random model as the default model's name."""
    engine = AsyncEngine(
        EngineConfig(
            model=str(random_model_dirs["llama-gqa"]),
            max_model_len=MAX_MODEL_LEN,
            cache=CacheConfig(kv_cache_memory="32MiB"),
        ),
        mode="thread",
        max_queue=64,
    )
    try:
        with running_server(engine, small_state) as url:
            yield url, engine
    finally:
        engine.shutdown()
