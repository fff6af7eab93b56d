"""The core's loop: the step loop alone, fed commands (ember.engine.messages), answering with token deltas.

It runs on a thread or in a process of its own (AsyncEngine picks) and never touches text: the client
tokenizes prompts, detokenizes outputs and matches stop strings, so HTTP and text work cannot hold up a
step. Messages both ways are small picklable dataclasses, so the same loop serves both transports.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import time

from ember.config import EngineConfig
from ember.engine import messages as msg
from ember.engine.core import EngineCore
from ember.errors import InvalidRequest

log = logging.getLogger(__name__)

# Seconds an idle core waits for a command before checking that its parent is still there.
_IDLE_POLL_S = 1.0
# Seconds a core with only grammar-waiting requests dozes before looking at its commands again.
_GRAMMAR_POLL_S = 0.005
# A core with work reports at least this often, changed or not: the client's health check reads silence
# past its deadline as a wedged step loop.
_HEARTBEAT_S = 1.0


def run_core(config: EngineConfig, inbox, outbox, report_blocks: bool = False) -> None:
    """Entry point of the core's thread or process: load the model, then serve commands until Shutdown.
    `report_blocks`: each report lists the prefix-cache blocks named and evicted since the last one."""
    if multiprocessing.parent_process() is not None:
        # Ctrl-C reaches the whole process group: the parent drains and then says Shutdown, so the core
        # must not die under the requests still finishing.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = EngineCore(config)
    except BaseException as exc:
        outbox.put(msg.Dead(f"the engine failed to start: {exc}"))
        return
    if report_blocks:
        engine.kv.pool.cache_events = []
    outbox.put(engine.info)
    engine.grammars  # noqa: B018 -- starts wrapping the vocabulary for structured outputs, off this thread
    try:
        CoreLoop(engine, outbox).run(inbox)
    except BaseException as exc:  # report, so every waiting caller hears why
        log.exception("the engine core failed")
        outbox.put(msg.Dead(f"the engine failed: {exc!r}"))
    finally:
        engine.close()  # on a thread the process lives on: leave no threads or model memory behind


class CoreLoop:
    def __init__(self, engine: EngineCore, outbox):
        self.engine = engine
        self.outbox = outbox
        self._last_stats: msg.CoreStats | None = None
        self._last_report = time.monotonic()

    def run(self, inbox) -> None:
        engine = self.engine
        while True:
            for cmd in self._commands(inbox, block=not engine.has_unfinished_requests()):
                if isinstance(cmd, msg.Shutdown):
                    self.outbox.put(msg.Dead("the engine was shut down", shutdown=True))
                    return
                self._handle(cmd)
            for request, error in engine.poll_grammars():
                self._added(request.request_id, error)
            updates = engine.step() if engine.has_unfinished_requests() else []
            if engine.last_step_idle and engine.has_unfinished_requests():
                # Only requests waiting for their grammars: doze until one is compiled, not spin.
                engine.wait_for_grammars(_GRAMMAR_POLL_S)
            stats = engine.stats()
            now = time.monotonic()
            beat = engine.has_unfinished_requests() and now - self._last_report >= _HEARTBEAT_S
            if updates or stats != self._last_stats or beat:
                self.outbox.put(msg.Step(updates, stats))
                self._last_stats = stats
                self._last_report = now

    def _commands(self, inbox, block: bool) -> list:
        cmds = []
        if block:
            try:
                cmds.append(inbox.get(timeout=_IDLE_POLL_S))
            except queue.Empty:
                parent = multiprocessing.parent_process()
                if parent is not None and not parent.is_alive():
                    return [msg.Shutdown()]  # orphaned: nobody will read what we produce
                return []
        while True:
            try:
                cmds.append(inbox.get_nowait())
            except queue.Empty:
                return cmds

    def _handle(self, cmd) -> None:
        engine = self.engine
        if isinstance(cmd, msg.AddRequest):
            known = cmd.request_id in engine.requests
            try:
                request = engine.add_request(
                    cmd.prompt_ids,
                    cmd.params,
                    cmd.request_id,
                    prompt=None,
                    cache_salt=cmd.cache_salt,
                    max_cached_tokens=cmd.max_cached_tokens,
                    lora=cmd.lora,
                )
            except ValueError as exc:  # InvalidRequest too
                self._added(cmd.request_id, exc)
                return
            except Exception as exc:  # RecursionError, a bug: it fails this request, not the engine
                log.exception("adding request '%s' failed", cmd.request_id)
                if not known:  # whatever of it was admitted before the failure
                    engine.abort_request(cmd.request_id)
                self._added(cmd.request_id, InvalidRequest(f"the request could not be admitted: {exc!r}"))
                return
            if not request.grammar_pending:  # else answered once its grammar compiles (or is refused)
                self._added(cmd.request_id, None)
        elif isinstance(cmd, msg.Abort):
            update = engine.abort_request(cmd.request_id)
            if update is not None:
                self.outbox.put(msg.Step([update], engine.stats()))
        elif isinstance(cmd, msg.FinishSample):
            engine.finish_sequence(cmd.request_id, cmd.index, cmd.stop_reason)
        elif isinstance(cmd, msg.AddLoRA):
            try:
                engine.add_lora(cmd.name, cmd.path)
                self.outbox.put(msg.LoRADone(cmd.name, None))
            except ValueError as exc:  # AdapterError, InvalidRequest: the adapter or the request is bad
                self.outbox.put(msg.LoRADone(cmd.name, str(exc), msg.ErrorKind.INVALID))
            except Exception as exc:  # a file no check foresaw must not take the engine down
                log.exception("loading adapter '%s' failed", cmd.name)
                why = f"adapter '{cmd.name}' could not be loaded: {exc!r}"
                self.outbox.put(msg.LoRADone(cmd.name, why, msg.ErrorKind.INVALID))
        elif isinstance(cmd, msg.RemoveLoRA):
            try:
                engine.remove_lora(cmd.name)
                self.outbox.put(msg.LoRADone(cmd.name, None))
            except KeyError:
                why = f"no LoRA adapter named '{cmd.name}' is loaded"
                self.outbox.put(msg.LoRADone(cmd.name, why, msg.ErrorKind.NOT_FOUND))
            except ValueError as exc:
                self.outbox.put(msg.LoRADone(cmd.name, str(exc), msg.ErrorKind.CONFLICT))

    def _added(self, request_id: str, error: ValueError | None) -> None:
        if error is None:
            self.outbox.put(msg.Added(request_id, None))
        elif isinstance(error, InvalidRequest):
            self.outbox.put(msg.Added(request_id, (str(error), error.param, error.code)))
        else:
            self.outbox.put(msg.Added(request_id, (str(error), None, None)))
