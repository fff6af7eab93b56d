"""`ember serve`: engine, embedding model and HTTP server, with a drain on SIGTERM.

SIGTERM (or Ctrl-C) drains: /ready turns 503 and new requests get 503 with Retry-After while the
requests in flight finish, for up to `shutdown_timeout` seconds; what is left then is aborted, and the
process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable

import uvicorn

from ember.config import EngineConfig, ServerConfig
from ember.engine.async_engine import AsyncEngine
from ember.engine.client import EngineState
from ember.models.catalog import describe_source
from ember.server import startup
from ember.server.app import ServerState, create_app
from ember.server.connections import limited_protocol

log = logging.getLogger("ember.serve")


# The server's settings are declared with the rest of the schema (ember.config.server); ServeOptions is
# the name this module's callers have always imported.
ServeOptions = ServerConfig


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        engine: AsyncEngine,
        state: ServerState,
        shutdown_timeout: float,
        loras: dict[str, str] | None = None,
        on_ready: Callable[[], None] | None = None,
    ):
        super().__init__(config)
        self.engine = engine
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self.loras = loras or {}
        self.on_ready = on_ready
        self.failed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        watcher = asyncio.ensure_future(self._watch_engine())
        try:
            await super().serve(sockets)
        finally:
            watcher.cancel()

    def handle_exit(self, sig: int, frame) -> None:
        if self.state.draining or self._loop is None:
            return super().handle_exit(sig, frame)  # a second signal: stop now
        self.state.draining = True
        log.info(
            "%s: draining (up to %.0f s for requests in flight)",
            signal.Signals(sig).name,
            self.shutdown_timeout,
        )
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    def _busy(self) -> bool:
        """Requests in the engine, or responses still being written (a stream's tail, a late error)."""
        return bool(self.engine.num_unfinished or self.state.in_flight)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while self._busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._busy():
            log.warning("shutdown timeout: aborting %d unfinished requests", self.engine.num_unfinished)
            self.engine.abort_all()
            for _ in range(100):
                if not self._busy():
                    break
                await asyncio.sleep(0.02)
        self.should_exit = True

    async def _watch_engine(self) -> None:
        """Stop serving if the engine fails to load: a server that can never answer should not linger."""
        try:
            await self.engine.wait_ready()
            for name, path in self.loras.items():
                await self.engine.add_lora(name, path)
                log.info("LoRA adapter '%s' loaded from %s", name, path)
            self.state.loading_adapters = False
            while not self.started:  # the listener too, before saying "ready on"
                await asyncio.sleep(0.05)
            if self.on_ready is not None:
                self.on_ready()
        except Exception as exc:
            log.error("%s", exc)
            self.failed = True
            self.should_exit = True


def _shown_url(options: ServerConfig) -> str:
    """The store's database URL as a log may show it: a password in it is not."""
    from sqlalchemy.engine import make_url

    return make_url(options.store_url()).render_as_string(hide_password=True)


def http_config(app, options: ServerConfig) -> uvicorn.Config:
    """uvicorn's settings for `app`: the listener, and the connection limits (ember.server.connections)."""
    return uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        timeout_graceful_shutdown=5,
        http=limited_protocol(options.header_timeout, options.max_connections),
        # Past this many connections or requests in flight uvicorn answers 503 (the protocol closes
        # connections past max_connections outright, before they send anything).
        limit_concurrency=options.max_connections,
    )


def serve(config: EngineConfig, options: ServerConfig, sock: socket.socket | None = None) -> int:
    """Run until drained; the exit code: 0 after a clean drain, 1 if the engine failed. `sock`: the
    listening socket, bound already (startup.bind); else bound here."""
    # What can fail fast fails before the model loads: the port, the device.
    sock = sock or startup.bind(options.host, options.port)
    try:
        startup.check_device(config.device)
        if (options.served_model_name or config.model) in options.loras:
            raise ValueError(
                f"--lora: '{options.served_model_name or config.model}' is the base model's own name"
            )
        return _serve(config, options, sock)
    finally:
        sock.close()


def _serve(config: EngineConfig, options: ServerConfig, sock: socket.socket) -> int:
    served = options.served_model_name or config.model
    log.info(
        "loading %s (%s) on %s, engine core in a %s",
        served,
        describe_source(config.model),
        config.device,
        options.engine_mode,
    )
    if options.ray:
        try:
            from ember.serve_ray import deploy
        except ImportError as exc:
            raise startup.StartupError(f"--ray needs Ray Serve: pip install 'ember[ray]' ({exc})") from None
        log.info("starting %s engine replicas on Ray Serve", options.autoscale or options.replicas)
        engine = deploy.start(config, options)
    else:
        engine = AsyncEngine(config, mode=options.engine_mode, max_queue=options.max_queue, wait_ready=False)
    embedder = None
    if options.embedding_model:
        from ember.embeddings import EmbeddingModel

        log.info("loading embedding model %s", options.embedding_model)
        embedder = EmbeddingModel.load(options.embedding_model)
    shared = {key: name for name, keys in options.cache_namespaces.items() for key in keys}
    keys = options.keys  # the flags', the key files' and the environment's
    state = ServerState(
        api_keys=keys.api,
        embedder=embedder,
        cache_namespaces=shared,
        loading_adapters=bool(options.loras),
        admin_key=keys.admin,
        lora_roots=options.adapter_roots(),
        metrics_public=options.metrics_public,
        allow_unknown_fields=options.allow_unknown_fields,
    )
    if options.store:
        from ember.server.platform import Platform

        data_dir = options.store_dir()
        log.info("the store: %s (files in %s)", _shown_url(options), data_dir / "files")
        state.platform = Platform.open(data_dir, options.store_url(), options.max_upload_bytes)
        from ember.traces import TraceRecorder, TraceSettings

        state.recorder = TraceRecorder(state.platform.store, TraceSettings.from_config(options))
        if options.prices is not None:
            from ember.gateway.usage import PriceTable

            state.prices = PriceTable.load(options.prices)
    if options.mcp:
        from ember.responses.mcp import McpHub

        state.mcp = McpHub(options.mcp, options.mcp_timeout, options.mcp_max_output)
        log.info("MCP servers: %s", ", ".join(s.label for s in options.mcp))
    if options.fine_tuning:
        from ember.server.tuning_api import Tuning

        state.tuning = Tuning(
            options.store_dir(),
            options.store_url(),
            engine,
            served,
            state.adapter_owners,
            options.max_upload_bytes,
            options.max_tuning_jobs,
            platform=state.platform,
        )
    try:  # a --pipeline naming a model this server lacks is refused here, once the names are known
        app = create_app(engine, served, state, options)
    except ValueError:
        engine.shutdown()
        raise
    if not keys.api:
        log.warning(
            "no --api-key given: the API is open to anyone who can reach %s:%d", options.host, options.port
        )
    uv = http_config(app, options)
    url = startup.url_of(sock)

    def ready() -> None:
        for line in startup.summary(config, options, engine.info, served, url):
            log.info("%s", line)

    # With --ray each replica loads the adapters itself, as it starts.
    loras = {} if options.ray else options.loras
    server = DrainingServer(uv, engine, state, options.shutdown_timeout, loras, on_ready=ready)
    log.info("waiting for the engine to load the model (the HTTP API answers /health meanwhile)")
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
        if options.ray:
            deploy.stop()
    failed = engine.state is EngineState.FAILED
    return 1 if failed or server.failed or not server.started else 0
