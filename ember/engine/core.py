"""The engine core: the step loop alone, fed commands, answering with token ids.

It runs on a thread or in a process of its own (AsyncEngine picks) and never touches text: the frontend
tokenizes prompts, detokenizes outputs and matches stop strings, so HTTP and text work cannot hold up a
step. Messages both ways are small picklable dataclasses, so the same loop serves both transports.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
from dataclasses import dataclass, field

from ember.config import EngineConfig
from ember.engine.llm_engine import LLMEngine
from ember.errors import InvalidRequest
from ember.outputs import Logprob, RequestOutput
from ember.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# -- frontend -> core -------------------------------------------------------------------------------


@dataclass
class AddRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    cache_salt: bytes | None = None  # prefix-cache namespace
    max_cached_tokens: int | None = None
    lora: str | None = None  # adapter name; None: the base model


@dataclass
class AddLoRA:
    name: str
    path: str


@dataclass
class RemoveLoRA:
    name: str


@dataclass
class LoRADone:
    """The core's answer to AddLoRA / RemoveLoRA: error is None on success."""

    name: str
    error: str | None
    status: int = 200  # what the HTTP layer should answer on error: 400 bad adapter, 404, 409 in use


@dataclass
class Abort:
    request_id: str


@dataclass
class FinishSample:
    """The frontend matched a stop string in sample `index`: stop generating it."""

    request_id: str
    index: int
    stop_reason: str


@dataclass
class Shutdown:
    pass


# -- core -> frontend -------------------------------------------------------------------------------


@dataclass
class Ready:
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    lora_enabled: bool = False
    eos_token_ids: list[int] = field(default_factory=list)


@dataclass
class Added:
    request_id: str
    error: tuple[str, str | None, str | None] | None  # (message, param, code) of an InvalidRequest


@dataclass
class SampleUpdate:
    index: int
    new_token_ids: list[int]
    new_logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: str | int | None


@dataclass
class RequestUpdate:
    request_id: str
    samples: list[SampleUpdate]
    num_cached_tokens: int
    queue_time: float | None
    # Ended by an abort: every sample not finished yet ends with "abort" (an n > 1 request aborted
    # before it forked has fewer samples in the core than it asked for).
    aborted: bool = False


@dataclass
class CoreStats:
    num_running: int  # requests with a sample running
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    num_preemptions: int
    prefix_cache_queries: int = 0  # tokens, cumulative
    prefix_cache_hits: int = 0
    # Speculative decoding, cumulative: tokens proposed, kept, and emitted by speculative steps.
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_emitted_tokens: int = 0


@dataclass
class Step:
    updates: list[RequestUpdate]
    stats: CoreStats


@dataclass
class Dead:
    message: str


# Seconds an idle core waits for a command before checking that its parent is still there.
_IDLE_POLL_S = 1.0
# Seconds a core with only grammar-waiting requests dozes before looking at its commands again.
_GRAMMAR_POLL_S = 0.005


def run_core(config: EngineConfig, inbox, outbox) -> None:
    """Entry point of the core's thread or process: load the model, then serve commands until Shutdown."""
    if multiprocessing.parent_process() is not None:
        # Ctrl-C reaches the whole process group: the parent drains and then says Shutdown, so the core
        # must not die under the requests still finishing.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = LLMEngine(config, detokenize=False)
    except BaseException as exc:
        outbox.put(Dead(f"the engine failed to start: {exc}"))
        return
    outbox.put(
        Ready(
            engine.max_model_len,
            engine.model_config.vocab_size,
            engine.kv.pool.num_blocks,
            engine.kv.block_size,
            engine.lora is not None,
            list(engine.eos_token_ids),
        )
    )
    engine.grammars  # noqa: B018 -- starts wrapping the vocabulary for structured outputs, off this thread
    try:
        EngineCore(engine, outbox).run(inbox)
    except BaseException as exc:  # report, so every waiting caller hears why
        log.exception("the engine core failed")
        outbox.put(Dead(f"the engine failed: {exc!r}"))
    finally:
        engine.close()  # on a thread the process lives on: leave no threads or model memory behind


class EngineCore:
    def __init__(self, engine: LLMEngine, outbox):
        self.engine = engine
        self.outbox = outbox
        self._last_stats: CoreStats | None = None

    def run(self, inbox) -> None:
        engine = self.engine
        while True:
            for cmd in self._commands(inbox, block=not engine.has_unfinished_requests()):
                if isinstance(cmd, Shutdown):
                    self.outbox.put(Dead("the engine was shut down"))
                    return
                self._handle(cmd)
            for request, error in engine.poll_grammars():
                self._added(request.request_id, error)
            updates = [_update(out) for out in engine.step()] if engine.has_unfinished_requests() else []
            if engine.last_step_idle and engine.has_unfinished_requests():
                # Only requests waiting for their grammars: doze until one is compiled, not spin.
                engine.wait_for_grammars(_GRAMMAR_POLL_S)
            stats = self.stats()
            if updates or stats != self._last_stats:
                self.outbox.put(Step(updates, stats))
                self._last_stats = stats

    def _commands(self, inbox, block: bool) -> list:
        cmds = []
        if block:
            try:
                cmds.append(inbox.get(timeout=_IDLE_POLL_S))
            except queue.Empty:
                parent = multiprocessing.parent_process()
                if parent is not None and not parent.is_alive():
                    return [Shutdown()]  # orphaned: nobody will read what we produce
                return []
        while True:
            try:
                cmds.append(inbox.get_nowait())
            except queue.Empty:
                return cmds

    def _handle(self, cmd) -> None:
        engine = self.engine
        if isinstance(cmd, AddRequest):
            try:
                request = engine.add_request(
                    cmd.prompt_ids,
                    cmd.params,
                    cmd.request_id,
                    cache_salt=cmd.cache_salt,
                    max_cached_tokens=cmd.max_cached_tokens,
                    lora=cmd.lora,
                )
            except ValueError as exc:  # InvalidRequest too
                self._added(cmd.request_id, exc)
                return
            if not request.grammar_pending:  # else answered once its grammar compiles (or is refused)
                self._added(cmd.request_id, None)
        elif isinstance(cmd, Abort):
            out = engine.abort_request(cmd.request_id)
            if out is not None:
                update = _update(out)
                update.aborted = True
                self.outbox.put(Step([update], self.stats()))
        elif isinstance(cmd, FinishSample):
            engine.finish_sequence(cmd.request_id, cmd.index, cmd.stop_reason)
        elif isinstance(cmd, AddLoRA):
            try:
                engine.add_lora(cmd.name, cmd.path)
                self.outbox.put(LoRADone(cmd.name, None))
            except ValueError as exc:  # AdapterError, InvalidRequest: the adapter or the request is bad
                self.outbox.put(LoRADone(cmd.name, str(exc), 400))
            except Exception as exc:  # a file no check foresaw must not take the engine down
                log.exception("loading adapter '%s' failed", cmd.name)
                self.outbox.put(LoRADone(cmd.name, f"adapter '{cmd.name}' could not be loaded: {exc!r}", 400))
        elif isinstance(cmd, RemoveLoRA):
            try:
                engine.remove_lora(cmd.name)
                self.outbox.put(LoRADone(cmd.name, None))
            except KeyError:
                self.outbox.put(LoRADone(cmd.name, f"no LoRA adapter named '{cmd.name}' is loaded", 404))
            except ValueError as exc:
                self.outbox.put(LoRADone(cmd.name, str(exc), 409))

    def _added(self, request_id: str, error: ValueError | None) -> None:
        if error is None:
            self.outbox.put(Added(request_id, None))
        elif isinstance(error, InvalidRequest):
            self.outbox.put(Added(request_id, (str(error), error.param, error.code)))
        else:
            self.outbox.put(Added(request_id, (str(error), None, None)))

    def stats(self) -> CoreStats:
        sched = self.engine.scheduler
        pool = self.engine.kv.pool
        spec = self.engine.speculator
        return CoreStats(
            num_running=len({s.request.request_id for s in sched.running}),
            num_waiting=len({s.request.request_id for s in sched.waiting}),
            kv_cache_usage=1.0 - pool.num_free / pool.num_blocks,
            num_preemptions=sched.num_preemptions,
            prefix_cache_queries=self.engine.kv.prefix_queries,
            prefix_cache_hits=self.engine.kv.prefix_hits,
            spec_draft_tokens=spec.num_draft_tokens if spec else 0,
            spec_accepted_tokens=spec.num_accepted_tokens if spec else 0,
            spec_emitted_tokens=spec.num_emitted_tokens if spec else 0,
        )


def _update(out: RequestOutput) -> RequestUpdate:
    samples = []
    for c in out.outputs:
        if not c.delta_token_ids and not c.finish_reason:
            continue
        k = len(c.delta_token_ids)
        new_logprobs = None if c.logprobs is None else (c.logprobs[-k:] if k else [])
        samples.append(SampleUpdate(c.index, c.delta_token_ids, new_logprobs, c.finish_reason, c.stop_reason))
    return RequestUpdate(out.request_id, samples, out.num_cached_tokens, out.queue_time)
