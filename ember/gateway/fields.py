"""What a request body becomes on its way to a provider: the fields the client sent, under the provider's
model name; to an upstream that is not ember, OpenAI's fields only.

ember takes more than OpenAI defines (vLLM's sampling and guided-decoding fields, Fireworks' response
options, `priority`...). An upstream that does not know one would ignore it or refuse it, so a request
that sets one is refused here with a 400 naming it: a silently dropped `guided_json` is an answer that
looks right and is not. A field left at its default is not sent either way (the upstream's default is
the same), so a client that spells defaults out is not refused for it.
"""

from __future__ import annotations

from ember.errors import InvalidRequest
from ember.protocol.requests import ChatCompletionRequest, CompletionRequest

# OpenAI's request fields that ember serves, as the openai SDK declares them (tests check the two agree).
OPENAI_CHAT = frozenset(
    {
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "messages",
        "metadata",
        "modalities",
        "model",
        "n",
        "parallel_tool_calls",
        "presence_penalty",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
    }
)
OPENAI_COMPLETIONS = frozenset(
    {
        "best_of",
        "echo",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_tokens",
        "model",
        "n",
        "presence_penalty",
        "prompt",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "user",
    }
)


def upstream_body(
    body: ChatCompletionRequest | CompletionRequest, model: str, provider: str, ember: bool
) -> dict:
    """The JSON body to send `provider` for `body`, naming `model`; InvalidRequest (400) for a field set
    to something other than its default that the upstream does not take (`ember`: it takes them all).
    Fields the server let through unknown (--allow-unknown-fields) are ignored, as they are locally."""
    allowed = OPENAI_CHAT if isinstance(body, ChatCompletionRequest) else OPENAI_COMPLETIONS
    declared = type(body).model_fields
    sent = {name for name in body.model_fields_set if name in declared}
    if not ember:
        for name in sorted(sent - allowed):
            if getattr(body, name) != declared[name].get_default(call_default_factory=True):
                raise InvalidRequest(
                    f"'{name}' is ember's own field; provider '{provider}' is not ember and would not "
                    "honour it (serve this model from an ember upstream with kind=ember, or leave it out)",
                    param=name,
                    code="unsupported_parameter",
                )
        sent &= allowed
    out = body.model_dump(mode="json", include=sent, exclude_unset=True, exclude_none=True)
    out["model"] = model
    return out
