"""A stand-in engine that reads its prompt: a tokenizer of UTF-8 bytes, and answers chosen by the prompt's
text and the adapter, streamed a word at a time (what a pipeline's steps need to be told apart)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from ember.outputs import CompletionOutput, RequestOutput
from tests.server.fake_engine import FakeEngine

ANSWERS = {
    "billing-lora": "Sorry about that: your refund is on its way.",
    "tech-lora": "Restart the device.",
    None: "Sorry for the trouble; please restart the device.",
}


class _Tokenizer:
    hf = SimpleNamespace(chat_template="{{ messages }}")

    def apply_chat_template(self, messages, *_, **__) -> list[int]:
        return list("\n".join(f"{m['role']}: {m['content']}" for m in messages).encode())

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def answer(text: str, lora: str | None) -> str:
    if "Classify the text" in text:
        return json.dumps({"label": "billing" if "refund" in text else "tech"})
    if "keep" in text:
        return json.dumps({"keep": "even" in text})
    if text.endswith("hang"):
        return ""
    return ANSWERS.get(lora, f"lora={lora}")


class TextEngine(FakeEngine):
    def __init__(self, adapters: dict[str, str] | None = None, delay_s: float = 0.0):
        super().__init__(adapters)
        self.tokenizer = _Tokenizer()
        self.delay_s = delay_s
        self.in_flight = 0
        self.most_in_flight = 0  # how many requests were in the engine together, at most

    async def generate(self, prompt, params, request_id=None, *, lora=None, **_):
        text = bytes(prompt).decode()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if text.endswith("hang"):
                await asyncio.sleep(3600)
            await asyncio.sleep(self.delay_s)
            words = answer(text, lora).split(" ")
            done = ""
            for i, word in enumerate(words):
                piece = word if i == 0 else " " + word
                done += piece
                last = i == len(words) - 1
                out = CompletionOutput(
                    0,
                    done,
                    list(range(i + 1)),
                    "stop" if last else None,
                    delta_text=piece,
                    delta_token_ids=[i],
                )
                yield RequestOutput(request_id, None, list(prompt), [out], finished=last)
        finally:
            self.in_flight -= 1
