"""An EngineClient with no model: enough for the HTTP layer's auth and routing tests, instantly."""

from __future__ import annotations

from ember.engine.client import EngineState
from ember.metrics import EngineMetrics
from ember.outputs import CompletionOutput, RequestOutput


class FakeEngine:
    """Answers every request at once with text naming the adapter it ran under; records adapter loads."""

    def __init__(self, adapters: dict[str, str] | None = None):
        self.metrics = EngineMetrics()
        self.adapters = dict(adapters or {})
        self.loads: list[tuple[str, str]] = []  # (name, path) of each add_lora
        self.error: str | None = None
        self.tokenizer = None
        self.max_pending = None
        self.inputs = None  # no text-length bound before the template

    def stalled_for(self) -> float:
        return 0.0  # never wedged

    @property
    def state(self) -> EngineState:
        return EngineState.READY

    async def generate(self, prompt, params, request_id=None, *, lora=None, **_):
        text = f"lora={lora}"
        out = CompletionOutput(0, text, [1, 2], finish_reason="length", delta_text=text)
        yield RequestOutput(request_id, None, [0], [out], finished=True)

    def abort(self, request_id: str) -> None:
        pass

    async def add_lora(self, name: str, path: str) -> None:
        self.loads.append((name, path))
        self.adapters[name] = path

    async def remove_lora(self, name: str) -> None:
        self.adapters.pop(name)
