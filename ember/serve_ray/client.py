"""An EngineClient over Ray Serve replicas: what ember's routes stand on when `ember serve --ray` runs.

The ingress tokenizes (it has the model's tokenizer), names the prompt's blocks as the engines will
(ember.serve_ray.routing.prompt_keys) and streams each request from the replica the router picks. A
replica lost before the request's first output is no loss: the request is sent again, elsewhere, and so is
a non-streamed one (`replayable`: its caller reads only the last output) at any point. A stream that has
begun ends with EngineDeadError instead, which the routes report in-band as its last event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator

from ray import exceptions as ray_errors
from ray.serve.exceptions import RayServeException

from ember.engine.client import AdapterConflictError, EngineDeadError, EngineNotReadyError, EngineState
from ember.engine.messages import CoreStats, EngineInfo
from ember.engine.processors import InputProcessor
from ember.errors import InvalidRequest
from ember.metrics import EngineMetrics
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams
from ember.serve_ray.routing import prompt_keys
from ember.tokenizer import Tokenizer

log = logging.getLogger("ember.serve_ray")

# What a call raises when its replica died or left (killed, scaled down, its node lost).
REPLICA_LOST = (ray_errors.RayActorError, ray_errors.ActorUnavailableError, RayServeException)


class RayEngineClient:
    def __init__(self, handle, tokenizer: Tokenizer, model_name: str, retries: int = 3):
        self.handle = handle
        self.tokenizer = tokenizer
        self.retries = retries
        self.metrics = EngineMetrics(model_name=model_name)
        self.info: EngineInfo | None = None
        self.inputs: InputProcessor | None = None
        self.stats: CoreStats | None = None
        self.error: str | None = None
        self.adapters: dict[str, str] = {}
        self.max_pending = None
        self._calls: dict[str, object] = {}  # request id -> the replica call streaming it
        self._stopped = False

    @property
    def state(self) -> EngineState:
        if self._stopped:
            return EngineState.STOPPED
        if self.error is not None:
            return EngineState.FAILED
        return EngineState.LOADING if self.info is None else EngineState.READY

    @property
    def num_unfinished(self) -> int:
        return len(self._calls)

    def stalled_for(self) -> float:
        """0: a replica's own health check (ember.serve_ray.replica) reports a wedged step loop, and Ray
        replaces that replica."""
        return 0.0

    async def wait_ready(self) -> None:
        try:
            info, adapters = await self.handle.describe.remote()
        except Exception as exc:
            self.error = f"the replicas failed to start: {exc}"
            raise EngineDeadError(self.error) from exc
        self.inputs = InputProcessor(self.tokenizer, info)
        self.adapters = adapters
        self.info = info

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
        params = params or SamplingParams()
        if priority is not None and priority != params.priority:
            params = dataclasses.replace(params, priority=priority)
        if self.state is not EngineState.READY:
            if self.info is None and self.error is None and not self._stopped:
                raise EngineNotReadyError("the replicas are still loading the model; retry shortly")
            raise EngineDeadError(f"the engine has stopped: {self.error or 'shut down'}")
        if lora is not None and lora not in self.adapters:
            raise InvalidRequest(
                f"no LoRA adapter named '{lora}' is loaded", param="model", code="model_not_found"
            )
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._calls:
            raise InvalidRequest(f"request id '{request_id}' is already in use", param="request_id")
        prompt_ids = await asyncio.to_thread(self.inputs.token_ids, prompt, params)
        # The router matches blocks of the base model's chain; an adapter's own chain (rooted in its
        # content digest, which only the replicas know) is routed by residency instead.
        keys = prompt_keys(prompt_ids, self.info.block_size, cache_salt) if lora is None else []
        route = {"keys": keys, "adapter": lora}
        args = (route, prompt_ids, params, request_id, cache_salt, max_cached_tokens, lora)
        started = time.monotonic()
        yielded = False
        try:
            for attempt in range(self.retries + 1):
                call = self.handle.options(stream=True).generate.remote(*args)
                self._calls[request_id] = call
                try:
                    async for out in call:
                        yielded = True
                        self._observe(out, started)
                        yield out
                    return
                except REPLICA_LOST as exc:
                    if (yielded and not replayable) or attempt == self.retries:
                        raise EngineDeadError(f"the replica serving this request was lost: {exc}") from None
                    log.warning("replica lost under request %s; sending it again", request_id)
        finally:
            call = self._calls.pop(request_id, None)
            if call is not None and not (yielded and out.finished):
                call.cancel()

    def _observe(self, out: RequestOutput, started: float) -> None:
        if out.finished:
            m = self.metrics
            m.e2e_request_latency.observe(time.monotonic() - started)
            m.request_success.labels(finished_reason=out.outputs[0].finish_reason or "stop").inc()
            m.prompt_tokens.inc(len(out.prompt_token_ids or ()))
            m.generation_tokens.inc(sum(len(c.token_ids) for c in out.outputs))

    def abort(self, request_id: str) -> None:
        call = self._calls.pop(request_id, None)
        if call is not None:
            call.cancel()

    def abort_all(self) -> None:
        for request_id in list(self._calls):
            self.abort(request_id)

    async def add_lora(self, name: str, path: str) -> None:
        raise AdapterConflictError(
            "adapters are loaded into every replica at start with --ray (--lora NAME=PATH); "
            "loading one at run time is not supported yet"
        )

    async def remove_lora(self, name: str) -> None:
        raise AdapterConflictError("adapters given at start with --ray stay loaded while it serves")

    def shutdown(self) -> None:
        self.abort_all()
        self._stopped = True
