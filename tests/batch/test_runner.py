"""The runner's pure parts: which batches warm a shared prefix first, and usage in either API's names."""

from __future__ import annotations

import pytest

from ember.batch.runner import shares_prefix, usage_of

SYSTEM = {"role": "system", "content": "You label support tickets as billing, bug or other. " * 40}
CHAT = "/v1/chat/completions"


def chat(*messages) -> dict:
    return {"model": "m", "messages": list(messages)}


@pytest.mark.parametrize(
    "endpoint, a, b, want",
    [
        (
            CHAT,
            chat(SYSTEM, {"role": "user", "content": "a"}),
            chat(SYSTEM, {"role": "user", "content": "b"}),
            True,
        ),
        (
            CHAT,
            chat({"role": "user", "content": "a"}),
            chat({"role": "user", "content": "a"}),
            False,
        ),  # short
        (CHAT, chat(SYSTEM), chat({**SYSTEM, "content": "other"}), False),
        (CHAT, chat(), chat(SYSTEM), False),
        (CHAT, {"model": "m", "messages": "x"}, chat(SYSTEM), False),
        ("/v1/completions", {"prompt": "p" * 2100 + "a"}, {"prompt": "p" * 2100 + "b"}, True),
        ("/v1/completions", {"prompt": "p" * 10 + "a"}, {"prompt": "p" * 10 + "b"}, False),
        ("/v1/completions", {"prompt": [1, 2, 3]}, {"prompt": [1, 2, 3]}, False),
        ("/v1/embeddings", {"input": "x" * 100}, {"input": "x" * 100}, False),
    ],
)
def test_a_warm_up_only_where_lines_share_a_long_prefix(endpoint, a, b, want):
    assert shares_prefix(endpoint, a, b) is want


def test_usage_in_chat_and_responses_names():
    chat_usage = {"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}
    responses_usage = {"input_tokens": 7, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 4}}
    want = {"input_tokens": 7, "output_tokens": 3, "cached_tokens": 4}
    assert usage_of({"usage": chat_usage}) == want == usage_of({"usage": responses_usage})
    assert usage_of({"usage": {"prompt_tokens": 5, "total_tokens": 5}}) == {
        "input_tokens": 5,
        "output_tokens": 0,
        "cached_tokens": 0,
    }
    assert usage_of({"error": {}}) == {"input_tokens": 0, "output_tokens": 0, "cached_tokens": 0}
