"""Online serving: the engine steps on its own thread; callers await incremental outputs.

`generate()` is an async iterator of RequestOutput (cumulative text plus the step's delta). Leaving the
iterator early (a client went away) aborts the request, so its KV blocks return to the pool at once.
Every stream ends: with a finished output, an aborted one (finish_reason "abort"), or EngineDeadError
when the engine fails or shuts down.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ember.config import EngineConfig
from ember.engine.llm_engine import LLMEngine
from ember.errors import InvalidRequest
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    added: asyncio.Future  # settled by the engine thread once the request is admitted or refused


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine(config or EngineConfig())
        self.tokenizer = self.engine.tokenizer
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams between callers and the engine thread
        self._wake = threading.Event()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="ember-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopped

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        request_id = request_id or uuid.uuid4().hex
        if isinstance(prompt, str):
            # Tokenize here, off the engine thread.
            prompt_ids = await asyncio.to_thread(self.tokenizer.encode, prompt)
        else:
            prompt_ids = list(prompt)
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), loop.create_future())
        with self._lock:
            if not self.is_running:
                raise EngineDeadError(f"the engine has stopped: {self.error!r}")
            if request_id in self._streams:
                raise InvalidRequest(f"request id '{request_id}' is already in use", param="request_id")
            self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt, prompt_ids, params))
        self._wake.set()
        finished = False
        try:
            await stream.added  # raises the engine's validation error, if any
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream, if someone reads it, ends with finish_reason "abort"."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- engine thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
            reason: BaseException = EngineDeadError("the engine was shut down")
        except BaseException as exc:  # the engine is dead: tell every waiting caller why
            self.error = exc
            reason = EngineDeadError(f"the engine failed: {exc!r}")
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            _call(s.loop, _settle, s.added, reason)
            _call(s.loop, s.queue.put_nowait, reason)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "abort":
                out = self.engine.abort_request(cmd[1])
                if out is not None:
                    out.finished = True  # an n > 1 request aborted before its fork has fewer samples
                    self._deliver(cmd[1], out)
                continue
            _, rid, prompt, prompt_ids, params = cmd
            with self._lock:
                stream = self._streams.get(rid)
            if stream is None:  # the caller left before its request was admitted
                continue
            try:
                request = self.engine.add_request(prompt_ids, params, rid)
                request.prompt = prompt if isinstance(prompt, str) else None
                error = None
            except Exception as exc:
                error = exc
            _call(stream.loop, _settle, stream.added, error)

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None and not _call(stream.loop, stream.queue.put_nowait, item):
            self.engine.abort_request(request_id)  # its event loop is gone: nobody will read it


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
