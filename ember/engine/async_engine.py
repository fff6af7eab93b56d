"""Online serving: the engine core steps on its own thread or process; callers await incremental outputs.

Three roles, as in mini-sglang and vLLM V1: callers (the HTTP handlers) tokenize and submit; the core
(ember.engine.core) runs the step loop on token ids only; an output thread here turns the core's token
updates into text (incremental detokenization, stop strings, logprobs) and hands each caller its
RequestOutput. Text work never runs on the step loop.

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
from dataclasses import dataclass, field

from ember.config import EngineConfig
from ember.engine.core import (
    Abort,
    Added,
    AddLoRA,
    AddRequest,
    CoreStats,
    Dead,
    FinishSample,
    LoRADone,
    Ready,
    RemoveLoRA,
    RequestUpdate,
    Shutdown,
    Step,
    run_core,
)
from ember.engine.detokenizer import IncrementalDetokenizer
from ember.errors import InvalidRequest
from ember.metrics import EngineMetrics
from ember.models.catalog import resolve_model
from ember.outputs import CompletionOutput, Logprob, RequestOutput
from ember.sampling_params import SamplingParams
from ember.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine failed or was shut down: no request can be served."""


class EngineNotReadyError(RuntimeError):
    """The model is still loading."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full: retry later."""


class LoRAOpError(Exception):
    """Adding or removing an adapter failed; `status` is the HTTP answer (400, 404 or 409)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class _Sample:
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_emitted: int = 0


@dataclass(eq=False)
class _Tracked:
    """A request as the frontend sees it: where to deliver, and the text state of each sample."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    added: asyncio.Future  # settled once the core admits or refuses the request
    lora: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    last_token: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class AsyncEngine:
    """`mode="thread"` runs the core on a thread of this process, `"process"` in a process of its own.

    `max_queue` bounds the requests waiting beyond the `max_num_seqs` the engine runs at once (an n > 1
    request counts n); past it `generate()` raises EngineOverloadedError. `wait_ready=False` returns while
    the model still loads (the server answers /ready 503 meanwhile).
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        mode: str = "thread",
        max_queue: int | None = None,
        wait_ready: bool = True,
    ):
        config = config or EngineConfig()
        if mode not in ("thread", "process"):
            raise ValueError(f"mode must be 'thread' or 'process' (got '{mode}')")
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 (got {max_queue})")
        path = resolve_model(config.model)  # converts a GGUF once, here, before the core starts
        self.config = dataclasses.replace(config, model=str(path))
        self.mode = mode
        self.tokenizer = Tokenizer.from_dir(path)
        self.metrics = EngineMetrics()
        self.max_pending = None if max_queue is None else config.scheduler.max_num_seqs + max_queue
        self.info: Ready | None = None
        self.stats: CoreStats | None = None
        self.error: str | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()  # guards _tracked and _lora_ops between callers and the output thread
        self.adapters: dict[str, str] = {}  # loaded LoRA adapters: name -> path
        self._lora_ops: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ready = threading.Event()
        self._stopping = False
        if mode == "thread":
            self._inbox, self._outbox = queue.Queue(), queue.Queue()
            self._core = threading.Thread(
                target=run_core, args=(self.config, self._inbox, self._outbox), name="ember-core", daemon=True
            )
        else:
            ctx = multiprocessing.get_context("spawn")
            self._inbox, self._outbox = ctx.Queue(), ctx.Queue()
            self._core = ctx.Process(
                target=run_core, args=(self.config, self._inbox, self._outbox), name="ember-core", daemon=True
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
    def is_ready(self) -> bool:
        return self.info is not None and self.is_running

    @property
    def is_running(self) -> bool:
        """False once the engine died or was shut down (still True while the model loads)."""
        return self.error is None and not self._stopping

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._tracked)

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
    ) -> AsyncIterator[RequestOutput]:
        """`cache_salt`, `max_cached_tokens` and `lora` (an adapter name): as in LLMEngine.add_request."""
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        self._check_admission(request_id, params.n)
        if lora is not None and lora not in self.adapters:
            raise InvalidRequest(
                f"no LoRA adapter named '{lora}' is loaded", param="model", code="model_not_found"
            )
        if isinstance(prompt, str):
            prompt_ids = await asyncio.to_thread(self.tokenizer.encode, prompt)  # off the event loop
        else:
            prompt_ids = list(prompt)
            vocab = self.info.vocab_size
            bad = [t for t in prompt_ids if not 0 <= t < vocab]
            if bad:  # checked here too: the detokenizer would choke on them before the core could refuse
                raise InvalidRequest(
                    f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt"
                )
        loop = asyncio.get_running_loop()
        samples = [
            _Sample(
                IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop_list,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                ),
                logprobs=[] if params.logprobs is not None else None,
            )
            for _ in range(params.n)
        ]
        text = prompt if isinstance(prompt, str) else None
        t = _Tracked(
            request_id, text, prompt_ids, params, samples, loop, asyncio.Queue(), loop.create_future(), lora
        )
        with self._lock:
            self._check_admission(request_id, params.n)
            self._tracked[request_id] = t
        self._inbox.put(AddRequest(request_id, prompt_ids, params, cache_salt, max_cached_tokens, lora))
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
                self.metrics.e2e_request_latency.observe(time.monotonic() - t.arrival)

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
            pending = sum(t.params.n for t in list(self._tracked.values()))
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
            raise LoRAOpError("this server was started without LoRA support", 400)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if name in self._lora_ops:
                raise LoRAOpError(f"adapter '{name}' is being changed by another request; retry", 409)
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
            error = None if msg.error is None else LoRAOpError(msg.error, msg.status)
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
        thread and pipes) and the process handle, so nothing is left running or open. Idempotent."""
        if not self._stopping:
            self._stopping = True
            self._inbox.put(Shutdown())
        self._reader.join(timeout=10)
        if isinstance(self._core, threading.Thread):
            self._core.join(timeout=10)
            return
        try:
            self._core.join(timeout=10)
        except ValueError:  # closed by an earlier shutdown
            return
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
        if not self._core.is_alive():
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
                    for update in msg.updates:
                        self._on_update(update)
                elif isinstance(msg, Added):
                    self._on_added(msg)
                elif isinstance(msg, LoRADone):
                    self._on_lora_done(msg)
                elif isinstance(msg, Ready):
                    self.info = msg
                    self._ready.set()
                elif isinstance(msg, Dead):
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
        if t is None or t.finished:  # the caller left, or its stop strings ended it already
            return
        now = time.monotonic()
        new_tokens = 0
        for su in u.samples:
            s = t.samples[su.index]
            if s.finish_reason is not None:
                continue
            for k, token in enumerate(su.new_token_ids):
                s.token_ids.append(token)
                new_tokens += 1
                if s.logprobs is not None and su.new_logprobs:
                    s.logprobs.append(su.new_logprobs[k])
                    s.cumulative_logprob += su.new_logprobs[k][token].logprob
                if (
                    k == len(su.new_token_ids) - 1
                    and su.finish_reason == "stop"
                    and self._ends(token, t.params)
                ):
                    break  # EOS or a stop token ended it: not part of the text (a grammar's last token is)
                matched = s.detok.append([token], len(s.token_ids) >= t.params.min_tokens)
                if matched is not None:
                    s.finish_reason, s.stop_reason = "stop", matched
                    self._inbox.put(FinishSample(u.request_id, su.index, matched))
                    break
            if s.finish_reason is None and su.finish_reason is not None:
                s.finish_reason, s.stop_reason = su.finish_reason, su.stop_reason
        if u.aborted:
            for s in t.samples:
                if s.finish_reason is None:
                    s.finish_reason = "abort"
            _call(t.loop, _settle, t.added, None)  # aborted while its grammar compiled: never Added
        self._observe(t, u, now, new_tokens)
        out = self._output(t, u)
        if out.finished:
            with self._lock:
                if self._tracked.get(t.request_id) is t:
                    del self._tracked[t.request_id]
        if not _call(t.loop, t.queue.put_nowait, out):
            self.abort(t.request_id)  # its event loop is gone: nobody will read it

    def _ends(self, token: int, params: SamplingParams) -> bool:
        """Whether `token` is one that ends a sample without being part of its text."""
        return token in params.stop_token_ids or (not params.ignore_eos and token in self.info.eos_token_ids)

    def _observe(self, t: _Tracked, u: RequestUpdate, now: float, new_tokens: int) -> None:
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

    def _output(self, t: _Tracked, u: RequestUpdate) -> RequestOutput:
        outs = []
        for index, s in enumerate(t.samples):
            delta = s.detok.flush() if s.finish_reason is not None else s.detok.take_delta()
            new_ids = s.token_ids[s.num_emitted :]
            s.num_emitted = len(s.token_ids)
            outs.append(
                CompletionOutput(
                    index=index,
                    text=s.detok.text,
                    token_ids=list(s.token_ids),
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                    delta_text=delta,
                    delta_token_ids=new_ids,
                )
            )
        return RequestOutput(
            t.request_id,
            t.prompt,
            t.prompt_ids,
            outs,
            t.finished,
            num_cached_tokens=u.num_cached_tokens,
            queue_time=u.queue_time,
        )


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
