"""Online serving: the engine steps on its own thread; callers await incremental outputs.

`generate()` is an async iterator of RequestOutput (cumulative text plus the step's delta). Leaving the
iterator early (a client went away) aborts the request, so its KV blocks return to the pool at once.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator

from ember.config import EngineConfig
from ember.engine.llm_engine import LLMEngine
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        self.engine = engine or LLMEngine(config or EngineConfig())
        self.tokenizer = self.engine.tokenizer
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="ember-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.error is None

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if not self.is_running:
            raise EngineDeadError(f"the engine has stopped: {self.error!r}")
        request_id = request_id or uuid.uuid4().hex
        if isinstance(prompt, str):
            # Tokenize here, off the engine thread.
            prompt_ids = await asyncio.to_thread(self.tokenizer.encode, prompt)
        else:
            prompt_ids = list(prompt)
        stream: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        added: asyncio.Future = loop.create_future()
        self._streams[request_id] = (loop, stream)
        self._commands.put(("add", request_id, prompt, prompt_ids, params, added))
        self._wake.set()
        finished = False
        try:
            await added  # raises the engine's validation error, if any
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
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
        except BaseException as exc:  # the engine is dead: tell every waiting caller why
            self.error = exc
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"the engine failed: {exc!r}"))

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "abort":
                self.engine.abort_request(cmd[1])
                continue
            _, rid, prompt, prompt_ids, params, added = cmd
            loop = self._streams.get(rid, (None,))[0]
            try:
                request = self.engine.add_request(prompt_ids, params, rid)
                request.prompt = prompt if isinstance(prompt, str) else None
                error = None
            except Exception as exc:
                error = exc
            if loop is not None:
                loop.call_soon_threadsafe(_settle, added, error)

    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, stream = entry
            loop.call_soon_threadsafe(stream.put_nowait, item)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
