"""A stand-in engine for HTTP-layer tests that never reach generation: the app's wiring, middlewares and
health without a model."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn

from ember.config import ServerConfig
from ember.engine.client import EngineState
from ember.metrics import EngineMetrics


class FakeEngine:
    def __init__(self) -> None:
        self.metrics = EngineMetrics()
        self.adapters: dict[str, str] = {}
        self.state = EngineState.READY
        self.error: str | None = None
        self.stalled = 0.0

    def stalled_for(self) -> float:
        return self.stalled


@contextlib.contextmanager
def serving(app, options: ServerConfig) -> Iterator[tuple[str, int]]:
    """`app` on a real uvicorn server with `ember serve`'s HTTP settings: (host, port)."""
    from ember.server.run import http_config

    config = http_config(app, options)
    config.log_level = "warning"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield options.host, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
