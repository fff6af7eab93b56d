"""A chat-capable stand-in engine for eval tests: it reads the question 'what is N + 1?' back from the
prompt and answers it right when N is even (or always, under the adapter 'tuned'), '?' otherwise."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from ember.outputs import CompletionOutput, RequestOutput
from tests.server.fake_engine import FakeEngine


class _Tokenizer:
    """Encodes the last message's text as its bytes, so the engine can read the question back."""

    hf = SimpleNamespace(chat_template="{{ messages }}")

    def apply_chat_template(self, messages, *_, **__) -> list[int]:
        return list(messages[-1]["content"].encode())


class MathEngine(FakeEngine):
    """Holds questions about N >= `hold` until `held` is set (a restart mid-run), and records the
    priorities it ran at."""

    def __init__(self, hold: int | None = None):
        super().__init__({"tuned": "/adapters/tuned"})
        self.tokenizer = _Tokenizer()
        self.hold, self.held = hold, threading.Event()
        self.priorities: list[int] = []

    async def generate(self, prompt, params, request_id=None, *, lora=None, **_):
        self.priorities.append(params.priority)
        n = int(bytes(prompt).decode().split()[2])
        while self.hold is not None and n >= self.hold and not self.held.is_set():
            await asyncio.sleep(0.01)
        text = str(n + 1) if n % 2 == 0 or lora == "tuned" else "?"
        out = CompletionOutput(0, text, [1], "stop", delta_text=text, delta_token_ids=[1])
        yield RequestOutput(request_id, None, list(prompt), [out], finished=True)
