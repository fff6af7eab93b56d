"""An ember server over a fake engine, as the gateway tests' upstream: in a thread of the test process, or
as a process of its own (`python -m tests.gateway.upstream PORT NAME`) that a test can SIGKILL.

Its answers name it ("from NAME"), so a test sees which upstream answered; streams come in several
chunks, a moment apart, so a test sees them pass through one by one.
"""

from __future__ import annotations

import asyncio
import sys

from ember.engine.client import EngineState
from ember.metrics import EngineMetrics
from ember.outputs import CompletionOutput, RequestOutput
from tests.fixtures_tokenizer import smollm2_tokenizer

MODEL = "fake"
PIECES = 4  # chunks of a streamed answer


class NamedEngine:
    """An EngineClient that answers every prompt with 'from NAME' in PIECES steps, `delay` s apart."""

    def __init__(self, name: str, delay: float = 0.0):
        self.name = name
        self.delay = delay
        self.metrics = EngineMetrics()
        self.adapters: dict[str, str] = {}
        self.error: str | None = None
        self.tokenizer = smollm2_tokenizer()
        self.max_pending = None
        self.inputs = None
        self.info = None
        self.params: list = []  # each request's SamplingParams
        self.fail: Exception | None = None  # raised by every request while set

    def stalled_for(self) -> float:
        return 0.0

    @property
    def state(self) -> EngineState:
        return EngineState.READY

    async def generate(self, prompt, params, request_id=None, **_):
        if self.fail is not None:
            raise self.fail
        self.params.append(params)
        words = ["from ", self.name, " ", "ok"][:PIECES]
        text = ""
        for i, word in enumerate(words):
            if i and self.delay:
                await asyncio.sleep(self.delay)
            text += word
            last = i == len(words) - 1
            out = CompletionOutput(
                0, text, list(range(i + 1)), "length" if last else None, delta_text=word, delta_token_ids=[i]
            )
            yield RequestOutput(request_id, None, [1, 2, 3], [out], finished=last)

    def abort(self, request_id: str) -> None:
        pass


def main(port: int, name: str, delay: float) -> None:
    import uvicorn

    from ember.server.app import ServerState, create_app

    app = create_app(NamedEngine(name, delay), MODEL, ServerState())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
