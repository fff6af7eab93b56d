"""Relabelling: the answer a stronger model gives to a stored prompt, for SFT data (train on it) or DPO
pairs (prefer it to the answer that was served).

A relabeller takes (messages, tools) and returns the assistant message, or raises RelabelError. Two
kinds: another model or adapter on this server (through PlatformContext.call, at batch priority, as the
dataset's owner: the owner's own adapters are visible, another key's are not), and an OpenAI-compatible
endpoint over HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from ember.server.platform import BATCH_PRIORITY, Caller

# (messages, tools or None) -> the assistant message: {"role": "assistant", "content", "tool_calls"?}
Relabeller = Callable[[list[dict], "list[dict] | None"], Awaitable[dict]]


class RelabelError(Exception):
    """The stronger model gave no usable answer (an error status, no choice, an empty message)."""


@dataclass(frozen=True)
class Generation:
    """How the stronger model answers: `max_tokens` None leaves it to the model; greedy by default."""

    max_tokens: int | None = 512
    temperature: float = 0.0


def _body(model: str, messages: list[dict], tools: list[dict] | None, gen: Generation) -> dict:
    body: dict = {"model": model, "messages": messages, "temperature": gen.temperature}
    if gen.max_tokens is not None:
        body["max_tokens"] = gen.max_tokens
    if tools:
        body["tools"] = tools
    return body


def _message(status: int, answer: dict, who: str) -> dict:
    """The assistant message of a chat.completion answer, or RelabelError saying why not."""
    if status != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        why = error.get("message") if isinstance(error, dict) else str(answer)[:200]
        raise RelabelError(f"{who} answered {status}: {why}")
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not choices or not isinstance(choices[0], dict) or not isinstance(choices[0].get("message"), dict):
        raise RelabelError(f"{who} answered without a choice")
    m = choices[0]["message"]
    if choices[0].get("finish_reason") == "length":
        raise RelabelError(f"{who}'s answer was cut at max_tokens")
    message = {"role": "assistant", "content": m.get("content")}
    if m.get("tool_calls"):
        message["tool_calls"] = m["tool_calls"]
    if not message["content"] and not message.get("tool_calls"):
        raise RelabelError(f"{who} gave an empty answer")
    return message


def server_relabeller(
    call: Caller, model: str, tenant: str | None, gen: Generation = Generation()
) -> Relabeller:
    """A model or adapter this server serves (an alias too), asked as `tenant` at batch priority."""

    async def relabel(messages: list[dict], tools: list[dict] | None) -> dict:
        result = await call(
            "/v1/chat/completions", _body(model, messages, tools, gen), tenant, BATCH_PRIORITY
        )
        return _message(result.status, result.body, f"model '{model}'")

    return relabel


def endpoint_relabeller(
    base_url: str,
    model: str,
    api_key: str | None = None,
    gen: Generation = Generation(),
    timeout: float = 120.0,
) -> tuple[Relabeller, Callable[[], Awaitable[None]]]:
    """An OpenAI-compatible endpoint (`base_url` ends where /chat/completions is appended, as the SDK's);
    also the close function of its HTTP client."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
    who = f"{base_url} ({model})"

    async def relabel(messages: list[dict], tools: list[dict] | None) -> dict:
        try:
            r = await client.post("/chat/completions", json=_body(model, messages, tools, gen))
            answer = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise RelabelError(f"{who}: {type(exc).__name__}: {exc}") from None
        return _message(r.status_code, answer, who)

    return relabel, client.aclose


async def relabel_all(
    relabel: Relabeller, prompts: list[tuple[list[dict], list[dict] | None]], concurrency: int = 4
) -> list[dict | RelabelError]:
    """Each prompt's new answer (or the RelabelError), in order, at most `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(messages: list[dict], tools: list[dict] | None) -> dict | RelabelError:
        async with gate:
            try:
                return await relabel(messages, tools)
            except RelabelError as exc:
                return exc

    return list(await asyncio.gather(*(one(m, t) for m, t in prompts)))
