"""One streamed request against an OpenAI-compatible server, timed as vLLM's benchmark client times it.

Timeline of a request (all from the client's clock, `time.perf_counter`):
    sent -> first chunk with choices (TTFT) -> ... each later chunk with choices adds an ITL gap ...
         -> last chunk with choices (E2EL ends here; the usage chunk and [DONE] after it do not count)
A chunk "with choices" is a token event even if its text is empty (a special token, or bytes of a
character still incomplete), exactly as vLLM counts them. Token counts come from the server's `usage`;
only a server that sends none falls back to counting chunks, and the record says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from ember.bench.serving.workloads import Request

# vLLM's client allows six hours; a benchmark should report a slow server, not time it out.
TIMEOUT = httpx.Timeout(6 * 60 * 60, connect=60.0)


@dataclass
class RequestRecord:
    """What one request did. Times in seconds; `start_time` from the start of the run."""

    id: str
    model: str
    start_time: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache (usage, where reported)
    ttft: float | None = None
    e2el: float | None = None
    itl: list[float] = field(default_factory=list)
    num_chunks: int = 0  # chunks that carried choices
    tokens_from_usage: bool = True  # False: the server sent no usage; output_tokens counts chunks
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.error is None


def make_client(base_url: str, api_key: str | None, max_connections: int) -> httpx.AsyncClient:
    """One client for the whole run, with a connection for every request that may be in flight."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=TIMEOUT, limits=limits)


def request_body(request: Request, endpoint: str, temperature: float, ignore_eos: bool) -> dict:
    body: dict = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = request.as_messages()
    else:
        body["prompt"] = request.as_prompt()
    if ignore_eos:  # an extension ember, vLLM and llama.cpp's server accept; OpenAI's API would refuse it
        body["ignore_eos"] = True
    return body


async def send(
    client: httpx.AsyncClient, path: str, body: dict, record: RequestRecord, run_start: float
) -> RequestRecord:
    """POST `body` to `path`, stream the answer and fill `record`. Never raises for a failed request:
    an HTTP error status, an in-band `{"error": ...}` or a broken connection lands in `record.error`.
    `record.input_tokens` may hold the workload's count, kept only if the server reports no usage."""
    sent = time.perf_counter()
    record.start_time = sent - run_start
    last = sent
    usage: dict | None = None
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", errors="replace")
                record.error = f"HTTP {response.status_code}: {error_message(text)}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):  # blank separators, `: ping` comments, `event:` lines
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("error"):
                    record.error = f"in-band error: {error_message(chunk)}"
                    return record
                if chunk.get("choices"):
                    if record.ttft is None:
                        record.ttft = now - sent
                    else:
                        record.itl.append(now - last)
                    last = now
                    record.num_chunks += 1
                # Usually a last chunk with empty choices; some servers put it on the final token chunk.
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    if record.ttft is None:
        record.error = "the stream ended without a chunk carrying choices"
        return record
    record.e2el = last - sent
    if usage is not None and usage.get("completion_tokens") is not None:
        record.output_tokens = int(usage["completion_tokens"])
        record.input_tokens = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        record.cached_tokens = int(details.get("cached_tokens") or 0)
    else:
        record.tokens_from_usage = False
        record.output_tokens = record.num_chunks  # input_tokens keeps the workload's count
    return record


def error_message(payload: str | dict) -> str:
    """The message of an OpenAI-style error body, else the text itself (cut short)."""
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError:
            return payload.strip()[:500] or "(empty body)"
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error
    detail = payload.get("detail") if isinstance(payload, dict) else None
    return str(detail or payload)[:500]
