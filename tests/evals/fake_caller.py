"""A scripted stand-in for PlatformContext.call: models answer by a function of their messages, and every
request is recorded."""

from __future__ import annotations

import json
import re

from ember.server.platform import CallResult


def chat_body(model: str, text: str) -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


class FakeCaller:
    """`models[name](messages, body) -> str` answers for `name`; an unknown model gets a 404."""

    def __init__(self, models: dict):
        self.models = models
        self.calls: list[tuple[str, dict, str | None, int]] = []

    async def __call__(self, path: str, body: dict, tenant: str | None, priority: int) -> CallResult:
        self.calls.append((path, body, tenant, priority))
        answer = self.models.get(body["model"])
        if answer is None:
            error = {"message": f"model '{body['model']}' not found", "code": "model_not_found"}
            return CallResult(404, {"error": error})
        return CallResult(200, chat_body(body["model"], answer(body["messages"], body)))


def responses_shown(messages: list[dict]) -> tuple[str, str]:
    """The two responses of a pairwise judge prompt, as shown (A, B)."""
    text = messages[-1]["content"]
    a = re.search(r"Response A:\n(.*?)\n\nResponse B:", text, re.S).group(1)
    b = re.search(r"Response B:\n(.*?)\n\nWhich", text, re.S).group(1)
    return a, b


def fair_judge(prefers):
    """A judge that picks the response `prefers(text)` rates higher (ties: 'tie')."""

    def answer(messages, _body) -> str:
        a, b = responses_shown(messages)
        sa, sb = prefers(a), prefers(b)
        return json.dumps({"winner": "A" if sa > sb else "B" if sb > sa else "tie"})

    return answer


def first_judge(_messages, _body) -> str:
    """A judge that always prefers whatever it is shown first."""
    return json.dumps({"winner": "A"})
