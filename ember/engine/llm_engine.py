"""The in-process engine: the core and the shared input and output processors on the caller's thread.

`LLM` drives it to completion for offline batches, `ember generate` and `ember chat` stream from it, and
tests reach into its core (`engine.kv`, `engine.scheduler`, ...). `step()` runs one core step and
returns a RequestOutput for every request that gained something.
"""

from __future__ import annotations

import uuid

from ember.config import EngineConfig
from ember.engine.core import EngineCore
from ember.engine.processors import InputProcessor, OutputProcessor, RequestState
from ember.engine.sequence import Request
from ember.errors import InvalidRequest
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.core = EngineCore(config)
        self.config = config
        self.tokenizer = self.core.tokenizer
        self.inputs = InputProcessor(self.tokenizer, self.core.info)
        self.outputs = OutputProcessor(self.tokenizer, self.core.eos_token_ids)
        self._states: dict[str, RequestState] = {}

    # The core's parts, for callers that inspect the engine (tests, benchmarks): read through.
    _CORE_PARTS = frozenset(
        ("model", "model_config", "runner", "kv", "scheduler", "lora", "speculator", "grammars")
        + ("max_model_len", "eos_token_ids", "last_step_idle")
    )

    def __getattr__(self, name: str):
        if name in LLMEngine._CORE_PARTS:
            return getattr(self.core, name)
        raise AttributeError(f"'LLMEngine' object has no attribute '{name}'")

    # -- requests -----------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        cache_salt: str | bytes | None = None,
        max_cached_tokens: int | None = None,
        lora: str | None = None,
    ) -> Request:
        """As EngineCore.add_request, from text or token ids (checked here first)."""
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        ids = self.inputs.token_ids(prompt, params)
        text = prompt if isinstance(prompt, str) else None
        salt = cache_salt.encode() if isinstance(cache_salt, str) else cache_salt
        request = self.core.add_request(
            ids,
            params,
            request_id,
            prompt=text,
            cache_salt=salt,
            max_cached_tokens=max_cached_tokens,
            lora=lora,
        )
        self._states[request_id] = self.outputs.new_request(request_id, text, ids, params, lora)
        return request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        update = self.core.abort_request(request_id)
        state = self._states.pop(request_id, None)
        if update is None or state is None:
            return None
        return self.outputs.process(state, update).output

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def poll_grammars(self) -> list[tuple[Request, InvalidRequest | None]]:
        """As EngineCore.poll_grammars; a refused request is forgotten here too."""
        resolved = self.core.poll_grammars()
        for request, error in resolved:
            if error is not None:
                self._states.pop(request.request_id, None)
        return resolved

    def wait_for_grammars(self, timeout: float) -> None:
        self.core.wait_for_grammars(timeout)

    def step(self) -> list[RequestOutput]:
        outputs = []
        for update in self.core.step():
            state = self._states.get(update.request_id)
            if state is None:
                continue
            done = self.outputs.process(state, update)
            for request_id, index, matched in done.stops:
                self.core.finish_sequence(request_id, index, matched)
            if done.output.finished:
                del self._states[update.request_id]
            outputs.append(done.output)
        return outputs

    # -- adapters -----------------------------------------------------------------------------------

    def add_lora(self, name: str, path: str) -> None:
        self.core.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self.core.remove_lora(name)

    def close(self) -> None:
        """Release the core (threads, model, KV cache); see EngineCore.close."""
        self._states.clear()
        self.inputs.close()
        self.core.close()
