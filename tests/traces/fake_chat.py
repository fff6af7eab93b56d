"""A chat-capable stand-in engine: FakeEngine with a tokenizer, answering in three streamed pieces."""

from __future__ import annotations

from types import SimpleNamespace

from ember.outputs import CompletionOutput, RequestOutput
from tests.server.fake_engine import FakeEngine

PIECES = ("Write to ", "bob@example.com", " today.")


class _Tokenizer:
    hf = SimpleNamespace(chat_template="{{ messages }}")

    def apply_chat_template(self, messages, *_, **__) -> list[int]:
        return [7] * len(messages)


class ChatEngine(FakeEngine):
    def __init__(self, adapters: dict[str, str] | None = None):
        super().__init__(adapters)
        self.tokenizer = _Tokenizer()

    async def generate(self, prompt, params, request_id=None, *, lora=None, **_):
        text = ""
        for i, piece in enumerate(PIECES):
            text += piece
            last = i == len(PIECES) - 1
            out = CompletionOutput(
                0, text, list(range(i + 1)), "stop" if last else None, delta_text=piece, delta_token_ids=[i]
            )
            yield RequestOutput(request_id, None, list(prompt), [out], finished=last, num_cached_tokens=1)
