"""Trace capture: the chat route hands each stored completion to the recorder, which queues it in memory
and writes it in batches off the request path.

A request is captured when it says `store: true`, or when the server runs with `--store-traces` and the
request does not say `store: false`. The route never waits on the disk: `record` appends to a bounded
queue (full: the trace is dropped, counted in `ember:traces_dropped_total` and logged), and the writer, a
Service started with the app, commits the queue every `flush_ms` or as soon as `BATCH_ROWS` rows wait,
up to `BATCH_ROWS` rows per transaction. Everything heavier than an append (decoding the request body,
assembling a stream, redaction) happens in the writer's thread.

Durability: on a clean stop (SIGTERM's drain, then the app's lifespan) the writer commits everything it
holds. A crash loses what was captured and not yet committed: the rows of the last `flush_ms` plus the
write in progress, which is at most one batch at the rates a server answers (BATCH_ROWS rows in one
interval is a far higher rate than the default model serves).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field

from ember.protocol.requests import ChatCompletionRequest, StreamOptions
from ember.server.backend import Stream
from ember.store.db import Store, now
from ember.store.traces import traces
from ember.traces.assemble import assemble
from ember.traces.query import Retention
from ember.traces.redact import Redactor

log = logging.getLogger(__name__)

BATCH_ROWS = 256  # rows per transaction, and the queue length that wakes the writer before flush_ms
PRUNE_EVERY_S = 60.0  # how often the writer applies the retention rule
DROP_LOG_EVERY_S = 10.0


@dataclass
class TraceSettings:
    always: bool = False  # --store-traces: capture unless a request says store: false
    retention: Retention = field(default_factory=lambda: Retention(max_age_s=30 * 86400))
    redact: list[str] = field(default_factory=list)  # --trace-redact: extra regexes, or "off"
    flush_ms: int = 200  # the longest a captured trace waits in memory
    max_queue: int = 10000  # traces held at most; past it, new ones are dropped

    @classmethod
    def from_config(cls, options) -> TraceSettings:
        """From a ServerConfig's --store-traces, --trace-* settings."""
        return cls(
            always=options.store_traces,
            retention=Retention.parse(options.trace_retention),
            redact=list(options.trace_redact),
            flush_ms=options.trace_flush_ms,
            max_queue=options.trace_queue,
        )


@dataclass
class _Captured:
    """A finished completion waiting for the writer; `response` is a dict, or a stream's chunks."""

    tenant: str | None
    created_at: int
    model: str
    adapter: str | None
    raw_request: bytes
    metadata: dict[str, str]
    response: dict | list[dict]
    latency_ms: float
    ttft_ms: float | None


class TraceRecorder:
    """ServerState.recorder: what the chat route captures through, and the writer Service behind it."""

    def __init__(self, store: Store, settings: TraceSettings | None = None):
        self.store = store
        self.settings = settings or TraceSettings()
        self.redactor = Redactor.from_specs(self.settings.redact)
        self.written = 0
        self.dropped: dict[str, int] = {"queue_full": 0, "write_failed": 0}
        self._pending: list[_Captured] = []
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._unreported = 0
        self._reported_at = 0.0

    # -- the request path ----------------------------------------------------------------------------

    def wants(self, body: ChatCompletionRequest) -> bool:
        return body.store if body.store is not None else self.settings.always

    async def begin(self, body: ChatCompletionRequest, request, adapter: str | None, tenant: str | None):
        """A Capture for this request if it is to be stored, else None. `request`: the HTTP request
        (its body is read as sent); `adapter`: what the model name resolved to."""
        if not self.wants(body):
            return None
        return Capture(self, body, await request.body(), adapter, tenant)

    def record(self, item: _Captured) -> None:
        """Queue a finished completion; never blocks, never raises."""
        if len(self._pending) >= self.settings.max_queue:
            self._drop(1, "queue_full")
            return
        self._pending.append(item)
        if len(self._pending) >= BATCH_ROWS:
            self._wake.set()

    def _drop(self, n: int, reason: str) -> None:
        self.dropped[reason] += n
        self._unreported += n
        if time.monotonic() - self._reported_at >= DROP_LOG_EVERY_S:
            log.warning(
                "dropped %d traces (%s; %d held, --trace-queue %d)",
                self._unreported,
                reason,
                len(self._pending),
                self.settings.max_queue,
            )
            self._unreported, self._reported_at = 0, time.monotonic()

    # -- the writer ----------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Commit everything captured before this call (async; safe with or without the writer running).
        A batch the database refuses is dropped and counted, not retried."""
        async with self._lock:
            while self._pending:
                batch = self._pending[:BATCH_ROWS]
                del self._pending[:BATCH_ROWS]
                try:
                    await asyncio.to_thread(self._write, batch)
                    self.written += len(batch)
                except Exception:
                    log.exception("writing %d traces failed; they are dropped", len(batch))
                    self._drop(len(batch), "write_failed")

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="ember-trace-writer")

    async def stop(self) -> None:
        """Stop the writer once it has committed everything it holds."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        await self._prune()
        pruned_at = time.monotonic()
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.flush_ms / 1000)
            self._wake.clear()
            await self.flush()
            if time.monotonic() - pruned_at >= PRUNE_EVERY_S:
                await self._prune()
                pruned_at = time.monotonic()

    async def _prune(self) -> None:
        try:
            async with self._lock:
                gone = await asyncio.to_thread(self.settings.retention.prune, self.store)
            if gone:
                log.info("trace retention: deleted %d traces", gone)
        except Exception:
            log.exception("applying the trace retention rule failed")

    def _write(self, batch: list[_Captured]) -> None:
        rows = [self._row(item) for item in batch]
        with self.store.tx() as conn:
            conn.execute(traces.insert(), rows)

    def _row(self, item: _Captured) -> dict:
        """The table row of a capture, redacted: the only form a trace is ever written in."""
        response = assemble(item.response) if isinstance(item.response, list) else item.response
        usage = response.get("usage")
        cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
        red = self.redactor.value
        return {
            "id": response["id"],
            "tenant": item.tenant,
            "created_at": item.created_at,
            "model": item.model,
            "adapter": item.adapter,
            "stream": isinstance(item.response, list),
            "request": red(json.loads(item.raw_request)),
            "response": {**red(response), "id": response["id"]},  # the id is looked up by, never blanked
            "metadata": red(item.metadata),
            "usage": usage,
            "latency_ms": item.latency_ms,
            "ttft_ms": item.ttft_ms,
            "cached_tokens": cached,
            "score": None,
            "labels": [],
        }


class Capture:
    """One request being captured. It asks the backend for what the trace needs and the client may not
    have asked for (a stream's usage chunk, a body's perf_metrics for the time to first token) and takes
    those back out of what the client gets."""

    def __init__(self, recorder: TraceRecorder, body, raw: bytes, adapter: str | None, tenant: str | None):
        self.recorder = recorder
        self.started = time.monotonic()
        self.item = _Captured(tenant, now(), body.model, adapter, raw, dict(body.metadata or {}), {}, 0, None)
        self.stream = body.stream
        if body.stream:
            self.strip_usage = not (body.stream_options and body.stream_options.include_usage)
            body.stream_options = StreamOptions(include_usage=True)
        else:
            self.strip_perf = not body.perf_metrics_in_response
            body.perf_metrics_in_response = True

    def finish(self, answer: dict | Stream) -> dict | Stream:
        """The answer to send: the same, with the capture recorded (a stream: once it has ended)."""
        if isinstance(answer, Stream):
            return Stream(self._tee(answer.chunks), answer.close)
        perf = answer.pop("perf_metrics") if self.strip_perf else answer.get("perf_metrics")
        self.item.response = answer
        self.item.latency_ms = (time.monotonic() - self.started) * 1000
        if perf is not None:
            self.item.ttft_ms = perf["server-time-to-first-token"] * 1000
        self.recorder.record(self.item)
        return answer

    async def _tee(self, chunks):
        """The chunks as they come, kept (a reference each) for the writer to assemble; recorded when the
        stream has ended, not when the client left or it failed."""
        kept: list[dict] = []
        async for chunk in chunks:
            if self.item.ttft_ms is None and chunk.get("choices"):
                self.item.ttft_ms = (time.monotonic() - self.started) * 1000
            kept.append(chunk)
            if self.strip_usage:
                if not chunk.get("choices") and chunk.get("usage") is not None:
                    continue  # the usage chunk: the trace's, not asked for by the client
                chunk.pop("usage", None)
            yield chunk
        self.item.response = kept
        self.item.latency_ms = (time.monotonic() - self.started) * 1000
        self.recorder.record(self.item)
