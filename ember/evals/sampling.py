"""Sampling a model on an eval item: OpenAI's `completions` data source (input_messages rendered from the
item, the model, sampling_params) as one chat completion through `call`, answered in the shape of an
output item's `sample` (plus `output_text` and `output_json`, the names `{{sample.*}}` templates use)."""

from __future__ import annotations

import asyncio
import contextlib
import json

from ember.errors import InvalidRequest
from ember.evals.template import lookup, render_messages
from ember.server.platform import Caller

RETRY = (429, 503)  # the engine is full or loading: ask again
MAX_TRIES = 8
DEFAULT_MAX_TOKENS = 256
# sampling_params keys (OpenAI's names) -> the chat completions field
PARAMS = {
    "max_completion_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "response_format": "response_format",
    "tools": "tools",
}


def check_input_messages(value, param: str = "input_messages") -> dict:
    """OpenAI's input_messages ({type: template, template: [...]} or {type: item_reference,
    item_reference: "item.x"}); a bare list is taken as a template."""
    if isinstance(value, list):
        value = {"type": "template", "template": value}
    if not isinstance(value, dict) or value.get("type") not in ("template", "item_reference"):
        raise InvalidRequest(f"{param} must be {{type: template | item_reference, ...}}", param=param)
    if value["type"] == "template":
        template = value.get("template")
        if not isinstance(template, list) or not template:
            raise InvalidRequest(
                f"{param}.template must be a non-empty list of messages", param=param + ".template"
            )
        for i, m in enumerate(template):
            if not isinstance(m, dict) or "content" not in m:
                raise InvalidRequest(
                    f"{param}.template[{i}] must be a message with content", param=f"{param}.template[{i}]"
                )
    elif not isinstance(value.get("item_reference"), str):
        raise InvalidRequest(
            f"{param}.item_reference must be a string like 'item.messages'", param=param + ".item_reference"
        )
    return value


def check_sampling_params(value, param: str = "sampling_params") -> dict:
    value = value or {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be an object", param=param)
    unknown = sorted(set(value) - set(PARAMS) - {"reasoning_effort"})
    if unknown:
        raise InvalidRequest(
            f"{param}.{unknown[0]} is not a sampling parameter; known: {', '.join(PARAMS)}",
            param=f"{param}.{unknown[0]}",
        )
    return value


def messages_for(input_messages: dict, item: dict) -> list[dict]:
    spaces = {"item": item}
    if input_messages["type"] == "item_reference":
        messages = lookup(input_messages["item_reference"], spaces)
        if not isinstance(messages, list):
            raise InvalidRequest(f"{input_messages['item_reference']} is not a list of messages")
        return render_messages(messages, {})
    return render_messages(input_messages["template"], spaces)


async def sample(
    call: Caller,
    model: str,
    input_messages: dict,
    item: dict,
    sampling_params: dict,
    tenant: str | None,
    priority: int,
) -> dict:
    """One chat completion of `model` on `item`; the sample, with `error` set when there is no answer."""
    out = {
        "input": [],
        "output": [],
        "model": model,
        "finish_reason": None,
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cached_tokens": 0},
        "error": None,
        "seed": sampling_params.get("seed"),
        "temperature": sampling_params.get("temperature", 1.0),
        "top_p": sampling_params.get("top_p", 1.0),
        "max_completion_tokens": sampling_params.get("max_completion_tokens", DEFAULT_MAX_TOKENS),
        "output_text": "",
    }
    try:
        messages = messages_for(input_messages, item)
    except InvalidRequest as exc:
        out["error"] = {"code": "invalid_template", "message": str(exc)}
        return out
    out["input"] = messages
    body = {"model": model, "messages": messages, "max_tokens": DEFAULT_MAX_TOKENS}
    body.update({PARAMS[k]: v for k, v in sampling_params.items() if k in PARAMS and v is not None})
    delay = 0.25
    for _ in range(MAX_TRIES):
        result = await call("/v1/chat/completions", body, tenant, priority)
        if result.status not in RETRY:
            break
        await asyncio.sleep(delay)
        delay = min(2 * delay, 5.0)
    if not result.ok:
        error = result.body.get("error") or {}
        out["error"] = {"code": error.get("code") or str(result.status), "message": error.get("message", "")}
        return out
    choice = result.body["choices"][0]
    text = choice["message"].get("content") or ""
    usage = result.body.get("usage") or {}
    out.update(
        output=[{"role": "assistant", "content": text}],
        model=result.body.get("model", model),
        finish_reason=choice.get("finish_reason"),
        output_text=text,
        usage={
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0,
        },
    )
    with contextlib.suppress(ValueError):
        out["output_json"] = json.loads(text)
    return out
