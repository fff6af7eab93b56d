"""Online serving: the engine core steps on its own thread or process; callers await incremental outputs.

Three roles, as in mini-sglang and vLLM V1: callers (the HTTP handlers) tokenize and submit through the
input processor; the core (ember.engine.core_loop) runs the step loop on token ids only; an output thread
here feeds the core's token deltas to the output processor (ember.engine.processors: detokenization,
stop strings, logprobs) and hands each caller its RequestOutput. Text work never runs on the step loop.

`generate()` is an async iterator of RequestOutput (cumulative text plus the step's delta). Leaving the
iterator early (a client went away) aborts the request, so its KV blocks return to the pool at once.
Every stream ends: with a finished output, an aborted one (finish_reason "abort"), or EngineDeadError
when the engine fails or shuts down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

from ember.config import EngineConfig, ServerConfig
from ember.engine.client import (
    EngineDeadError,
    EngineNotReadyError,
    EngineOverloadedError,
    EngineState,
)
from ember.engine.core_loop import run_core
from ember.engine.messages import (
    Abort,
    Added,
    AddLoRA,
    AddRequest,
    CoreStats,
    Dead,
    EngineInfo,
    ErrorKind,
    FinishSample,
    LoRADone,
    RemoveLoRA,
    RequestUpdate,
    Shutdown,
    Step,
)
from ember.engine.processors import InputProcessor, OutputProcessor, RequestState
from ember.errors import InvalidRequest
from ember.metrics import EngineMetrics
from ember.models.catalog import resolve_model
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams
from ember.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "AsyncEngine",
    "EngineDeadError",
    "EngineNotReadyError",
    "EngineOverloadedError",
    "EngineState",
    "LoRAOpError",
]


class LoRAOpError(Exception):
    """Adding or removing an adapter failed; `kind` says why (a bad adapter, an unknown one, a clash)."""

    def __init__(self, message: str, kind: ErrorKind):
        super().__init__(message)
        self.kind = kind


@dataclass(eq=False)
class _Tracked:
    """A request as this client sees it: its text state, and where to deliver its outputs."""

    state: RequestState
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    added: asyncio.Future  # settled once the core admits or refuses the request


class AsyncEngine:
    """`mode="thread"` runs the core on a thread of this process, `"process"` in a process of its own
    (None: ServerConfig's engine_mode, the one default `ember serve` uses too).

    `max_queue` bounds the requests waiting beyond the `max_num_seqs` the engine runs at once (an n > 1
    request counts n); past it `generate()` raises EngineOverloadedError. `wait_ready=False` returns while
    the model still loads (the server answers /ready 503 meanwhile). `report_blocks=True` keeps
    `cached_blocks`, the hashes of the prefix-cache blocks the core holds (what a replica tells its router).
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        mode: str | None = None,
        max_queue: int | None = None,
        wait_ready: bool = True,
        report_blocks: bool = False,
    ):
        config = config or EngineConfig()
        mode = mode or ServerConfig.engine_mode
        if mode not in ("thread", "process"):
            raise ValueError(f"mode must be 'thread' or 'process' (got '{mode}')")
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 (got {max_queue})")
        path = resolve_model(config.model)  # converts a GGUF once, here, before the core starts
        self.config = dataclasses.replace(config, model=str(path))
        self.mode = mode
        self.tokenizer = Tokenizer.from_dir(path, chat_template=config.chat_template)
        self.metrics = EngineMetrics(model_name=config.model)
        self.max_pending = None if max_queue is None else config.scheduler.max_num_seqs + max_queue
        self.info: EngineInfo | None = None
        self.inputs: InputProcessor | None = None  # made once the core says what it loaded
        self.outputs: OutputProcessor | None = None
        self.stats: CoreStats | None = None
        self.error: str | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()  # guards _tracked and _lora_ops between callers and the output thread
        self.adapters: dict[str, str] = {}  # loaded LoRA adapters: name -> path
        self._lora_ops: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ready = threading.Event()
        self._heard_at = time.monotonic()  # the core's last report, or when it last got work while idle
        self._stopping = False  # shutdown() was called
        self._shutdown_lock = threading.Lock()
        self._closed = False  # the process's queues and handle are closed
        self._shut_down = False  # the core stopped because it was asked to
        self.cached_blocks: set[bytes] = set()  # with report_blocks: the core's prefix-cache block hashes
        if mode == "thread":
            self._inbox, self._outbox = queue.Queue(), queue.Queue()
            self._core = threading.Thread(
                target=run_core,
                args=(self.config, self._inbox, self._outbox, report_blocks),
                name="ember-core",
                daemon=True,
            )
        else:
            ctx = multiprocessing.get_context("spawn")
            self._inbox, self._outbox = ctx.Queue(), ctx.Queue()
            self._core = ctx.Process(
                target=run_core,
                args=(self.config, self._inbox, self._outbox, report_blocks),
                name="ember-core",
                daemon=True,
            )
        self._core.start()
        self._reader = threading.Thread(target=self._read_outputs, name="ember-output", daemon=True)
        self._reader.start()
        if wait_ready:
            self._ready.wait()
            if self.error is not None:
                raise EngineDeadError(self.error)

    # -- state --------------------------------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        if self._stopping or self._shut_down:
            return EngineState.STOPPED
        if self.error is not None:
            return EngineState.FAILED
        return EngineState.LOADING if self.info is None else EngineState.READY

    @property
    def is_ready(self) -> bool:
        return self.state is EngineState.READY

    @property
    def is_running(self) -> bool:
        """False once the engine died or was shut down (still True while the model loads)."""
        return self.state in (EngineState.LOADING, EngineState.READY)

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._tracked)

    def stalled_for(self) -> float:
        """Seconds the core has had requests to work on without reporting a step; 0 while it is idle or
        reporting. A working core reports at least every second (core_loop's heartbeat), so a large value
        means its step loop is wedged."""
        with self._lock:
            if not self._tracked or self.info is None:
                return 0.0
            return max(time.monotonic() - self._heard_at, 0.0)

    async def wait_ready(self) -> None:
        while not self._ready.is_set():  # polled, not a thread: a cancelled wait leaves nothing behind
            await asyncio.sleep(0.05)
        if self.error is not None:
            raise EngineDeadError(self.error)

    # -- callers ------------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        cache_salt: bytes | None = None,
        max_cached_tokens: int | None = None,
        lora: str | None = None,
        priority: int | None = None,
        replayable: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """`cache_salt`, `max_cached_tokens` and `lora` (an adapter name): as in LLMEngine.add_request.
        `priority` (lower first) overrides params.priority. `replayable`: the caller reads only the last
        output, so a client over replicas may run the request again from scratch on another one if its
        replica is lost (one engine in this process has nothing to fail over to)."""
        params = params or SamplingParams()
        if priority is not None and priority != params.priority:
            params = dataclasses.replace(params, priority=priority)
        request_id = request_id or uuid.uuid4().hex
        self._check_admission(request_id, params.n)
        if lora is not None and lora not in self.adapters:
            raise InvalidRequest(
                f"no LoRA adapter named '{lora}' is loaded", param="model", code="model_not_found"
            )
        if (
            isinstance(prompt, str) or params.structured is not None
        ):  # tokenizing, a grammar check: off the loop
            prompt_ids = await asyncio.to_thread(self.inputs.token_ids, prompt, params)
        else:
            prompt_ids = self.inputs.token_ids(prompt, params)
        loop = asyncio.get_running_loop()
        text = prompt if isinstance(prompt, str) else None
        state = self.outputs.new_request(request_id, text, prompt_ids, params, lora)
        t = _Tracked(state, loop, asyncio.Queue(), loop.create_future())
        with self._lock:
            self._check_admission(request_id, params.n)
            if not self._tracked:  # an idle core owes no report: the deadline starts with this work
                self._heard_at = time.monotonic()
            self._tracked[request_id] = t
        try:
            self._send(AddRequest(request_id, prompt_ids, params, cache_salt, max_cached_tokens, lora))
        except BaseException:
            with self._lock:
                if self._tracked.get(request_id) is t:
                    del self._tracked[request_id]
            raise
        finished = False  # True once the core is done with the request: nothing to abort
        try:
            try:
                await t.added  # raises the core's validation error, if any
            except (InvalidRequest, EngineDeadError):
                finished = True
                raise
            while True:
                item = await t.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True  # before the yield: the caller may close the iterator right there
                yield item
                if item.finished:
                    return
        finally:
            with self._lock:
                if self._tracked.get(request_id) is t:  # a finished id may already be reused
                    del self._tracked[request_id]
            if not finished:  # the caller left: counted as aborted, here, as nobody hears the core's answer
                self.abort(request_id)
                self.metrics.request_success.labels(finished_reason="abort").inc()
                self.metrics.e2e_request_latency.observe(time.monotonic() - t.state.arrival)

    def _send(self, cmd: AddRequest) -> None:
        """Queue a request for the core. A process's queue pickles on a feeder thread, where a failure is
        only printed and the request silently lost: pickled here first, so it fails this request."""
        if self.mode == "process":
            try:
                ForkingPickler.dumps(cmd)
            except Exception as exc:  # RecursionError for deep structures, PicklingError, TypeError
                raise InvalidRequest(
                    f"the request cannot be passed to the engine ({type(exc).__name__}); it is nested too deeply "
                    "or holds values that cannot be sent"
                ) from None
        self._inbox.put(cmd)

    def _check_admission(self, request_id: str, n: int) -> None:
        if self.error is not None or self._stopping:
            raise EngineDeadError(f"the engine has stopped: {self.error or 'shut down'}")
        if self.info is None:
            raise EngineNotReadyError("the model is still loading; retry shortly")
        if request_id in self._tracked:
            raise InvalidRequest(f"request id '{request_id}' is already in use", param="request_id")
        if self.max_pending is not None:
            if n > self.max_pending:
                raise InvalidRequest(
                    f"n={n} sequences exceed what this server admits at once ({self.max_pending})", param="n"
                )
            pending = sum(t.state.params.n for t in list(self._tracked.values()))
            if pending + n > self.max_pending:
                raise EngineOverloadedError(
                    f"the server is at capacity ({pending} sequences running or queued); retry later"
                )

    # -- adapters -----------------------------------------------------------------------------------

    async def add_lora(self, name: str, path: str) -> None:
        """Load a PEFT adapter into the core (checked there); LoRAOpError says why it was refused."""
        await self._lora_op(name, AddLoRA(name, str(path)))
        self.adapters[name] = str(path)

    async def remove_lora(self, name: str) -> None:
        await self._lora_op(name, RemoveLoRA(name))
        self.adapters.pop(name, None)

    async def _lora_op(self, name: str, cmd) -> None:
        if self.error is not None or self._stopping:
            raise EngineDeadError(f"the engine has stopped: {self.error or 'shut down'}")
        if self.info is None:
            raise EngineNotReadyError("the model is still loading; retry shortly")
        if not self.info.lora_enabled:
            raise LoRAOpError("this server was started without LoRA support", ErrorKind.INVALID)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if name in self._lora_ops:
                why = f"adapter '{name}' is being changed by another request; retry"
                raise LoRAOpError(why, ErrorKind.CONFLICT)
            self._lora_ops[name] = (loop, future)
        self._inbox.put(cmd)
        try:
            await future
        finally:
            with self._lock:
                self._lora_ops.pop(name, None)

    def _on_lora_done(self, msg: LoRADone) -> None:
        with self._lock:
            op = self._lora_ops.get(msg.name)
        if op is not None:
            error = None if msg.error is None else LoRAOpError(msg.error, msg.kind)
            _call(op[0], _settle, op[1], error)

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream, if someone reads it, ends with finish_reason "abort"."""
        if not self._stopping:  # after shutdown the core, and the queue to it, are gone
            self._inbox.put(Abort(request_id))

    def abort_all(self) -> None:
        with self._lock:
            ids = list(self._tracked)
        for rid in ids:
            self.abort(rid)

    def shutdown(self) -> None:
        """Stop the core and the output thread; in process mode also close the queues (their feeder
        thread and pipes) and the process handle, so nothing is left running or open. Idempotent, and
        safe to call from several threads at once (a drain and a signal, say)."""
        with self._shutdown_lock:
            if not self._stopping:
                self._stopping = True
                self._inbox.put(Shutdown())
            self._reader.join(timeout=10)
            if self.inputs is not None:
                self.inputs.close()
            if isinstance(self._core, threading.Thread):
                self._core.join(timeout=10)
            elif not self._closed:
                self._close_process()
                self._closed = True

    def _close_process(self) -> None:
        self._core.join(timeout=10)
        if self._core.is_alive():
            self._core.kill()
            self._core.join(timeout=5)
            self._inbox.cancel_join_thread()  # nobody will read what is left in the pipe
        self._inbox.close()  # its feeder thread closes both ends of the pipe as it exits
        self._inbox.join_thread()
        if not self._reader.is_alive():  # else it still reads: leave the outbox to the collector
            # This side never wrote to the outbox, so it has no feeder to close its pipe: close it here.
            self._outbox._reader.close()
            self._outbox._writer.close()
        if not self._core.is_alive() and not self._reader.is_alive():  # the reader polls is_alive()
            self._core.close()  # its sentinel fd

    # -- output thread --------------------------------------------------------------------------------

    def _read_outputs(self) -> None:
        try:
            while True:
                try:
                    msg = self._outbox.get(timeout=0.5)
                except queue.Empty:
                    if not self._core.is_alive():
                        self._die("the engine core exited unexpectedly")
                        return
                    continue
                self._heard_at = time.monotonic()
                if isinstance(msg, Step):
                    s = msg.stats
                    self.stats = s
                    self.metrics.set_stats(
                        s.num_running,
                        s.num_waiting,
                        s.kv_cache_usage,
                        s.num_preemptions,
                        s.prefix_cache_queries,
                        s.prefix_cache_hits,
                        (s.spec_draft_tokens, s.spec_accepted_tokens, s.spec_emitted_tokens),
                    )
                    for h, cached in s.cache_events:
                        if cached:
                            self.cached_blocks.add(h)
                        else:
                            self.cached_blocks.discard(h)
                    for update in msg.updates:
                        self._on_update(update)
                elif isinstance(msg, Added):
                    self._on_added(msg)
                elif isinstance(msg, LoRADone):
                    self._on_lora_done(msg)
                elif isinstance(msg, EngineInfo):
                    self.inputs = InputProcessor(self.tokenizer, msg)
                    self.outputs = OutputProcessor(self.tokenizer, msg.eos_token_ids)
                    self.info = msg
                    self._ready.set()
                elif isinstance(msg, Dead):
                    self._shut_down = msg.shutdown
                    self._die(msg.message)
                    return
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            log.exception("the output thread failed")
            self._die(f"the engine's output thread failed: {exc!r}")
            self._inbox.put(Shutdown())

    def _die(self, message: str) -> None:
        if self.error is None:
            self.error = message
        self._ready.set()
        with self._lock:
            tracked = list(self._tracked.values())
            ops = list(self._lora_ops.values())
        for loop, future in ops:
            _call(loop, _settle, future, EngineDeadError(self.error))
        for t in tracked:
            err = EngineDeadError(self.error)
            _call(t.loop, _settle, t.added, err)
            _call(t.loop, t.queue.put_nowait, err)

    def _on_added(self, msg: Added) -> None:
        with self._lock:
            t = self._tracked.get(msg.request_id)
        if t is None:
            return
        error = None if msg.error is None else InvalidRequest(*msg.error)
        _call(t.loop, _settle, t.added, error)

    def _on_update(self, u: RequestUpdate) -> None:
        with self._lock:
            t = self._tracked.get(u.request_id)
        if t is None or t.state.finished:  # the caller left, or its stop strings ended it already
            return
        done = self.outputs.process(t.state, u)
        for request_id, index, matched in done.stops:
            self._inbox.put(FinishSample(request_id, index, matched))
        if u.aborted:
            _call(t.loop, _settle, t.added, None)  # aborted while its grammar compiled: never Added
        self._observe(t.state, u, time.monotonic(), done.new_tokens)
        if done.output.finished:
            with self._lock:
                if self._tracked.get(u.request_id) is t:
                    del self._tracked[u.request_id]
        if not _call(t.loop, t.queue.put_nowait, done.output):
            self.abort(u.request_id)  # its event loop is gone: nobody will read it

    def _observe(self, t: RequestState, u: RequestUpdate, now: float, new_tokens: int) -> None:
        m = self.metrics
        if u.queue_time is not None and t.last_token is None and new_tokens:
            m.request_queue_time.observe(u.queue_time)
        if new_tokens:
            if t.last_token is None:
                m.time_to_first_token.observe(now - t.arrival)
                m.prompt_tokens.inc(len(t.prompt_ids))
            else:
                m.inter_token_latency.observe(now - t.last_token)
            m.generation_tokens.inc(new_tokens)
            if t.lora is not None:
                m.lora_generation_tokens.labels(adapter=t.lora).inc(new_tokens)
            t.last_token = now
        if t.finished:
            m.e2e_request_latency.observe(now - t.arrival)
            m.request_success.labels(finished_reason=t.samples[0].finish_reason).inc()
            if t.lora is not None:
                m.lora_requests.labels(adapter=t.lora).inc()


def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:  # the caller's loop was closed
        return False


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
