"""One OpenAI-compatible upstream (--provider): its HTTP client, its model list, and a call to it.

One pooled httpx client per provider keeps connections open between requests (a TLS handshake per call
would be most of the overhead of a fast upstream). A streamed answer is passed through as the upstream's
own bytes, chunk by chunk as they arrive, never parsed or re-framed: the client gets exactly what the
upstream sent, as soon as it sent it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator

import httpx

from ember.config.server import ProviderSpec
from ember.gateway.breaker import Breaker

log = logging.getLogger(__name__)

MODELS_TTL_S = 60.0  # how long a provider's /v1/models listing is reused
MODELS_TIMEOUT_S = 5.0  # /v1/models on ember lists what it can; a slow provider is left out, not waited on
MODELS_RETRY_S = 5.0  # after a failed listing, the next try
CONNECT_TIMEOUT_S = 5.0
POOL_CONNECTIONS = 256


class UpstreamError(Exception):
    """A provider answered with an error: its status and body, passed on to the client as they are."""

    def __init__(self, provider: str, status: int, body: dict, retry_after: str | None = None):
        super().__init__(f"provider '{provider}' answered {status}")
        self.provider, self.status, self.body, self.retry_after = provider, status, body, retry_after

    @property
    def code(self) -> str | None:
        error = self.body.get("error")
        return error.get("code") if isinstance(error, dict) else None


class RawStream:
    """A streamed answer as the upstream framed it (server-sent events, bytes), passed on untouched; the
    `usage` of its usage chunk once that has passed (what meters it: the upstream sends one if asked with
    stream_options.include_usage). `close()` ends the upstream response (called once the client's
    response is over, however it ended)."""

    def __init__(self, provider: str, first: bytes, chunks: AsyncIterator[bytes], close):
        self.provider = provider
        self.close = close
        self.usage: dict | None = None
        self._scan = b""  # the tail of an event not complete yet, for `usage`
        self.body = self._passthrough(first, chunks)

    async def _passthrough(self, first: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The upstream's bytes as they come; if it breaks off, an error event (the client has had bytes
        already, so the answer cannot go elsewhere now)."""
        if first:
            self._note(first)
            yield first
        try:
            async for chunk in chunks:
                self._note(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            log.warning("provider '%s': stream broke off (%s)", self.provider, type(exc).__name__)
            message = f"provider '{self.provider}' broke off the stream ({type(exc).__name__})"
            error = {"message": message, "type": "server_error", "param": None, "code": "upstream_error"}
            yield b"\n\ndata: " + json.dumps({"error": error}).encode() + b"\n\n"

    def _note(self, chunk: bytes) -> None:
        """Read the usage of the events `chunk` completes, where one carries it (bytes sent are untouched)."""
        self._scan += chunk.replace(b"\r\n", b"\n")
        *events, self._scan = self._scan.split(b"\n\n")
        for event in events:
            if b'"usage"' not in event:
                continue
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                try:
                    data = json.loads(line[5:])
                except ValueError:
                    continue
                if isinstance(data, dict) and isinstance(data.get("usage"), dict):
                    self.usage = data["usage"]


class Provider:
    """`spec`'s upstream; `timeout`: seconds for it to answer, and between streamed chunks."""

    def __init__(self, spec: ProviderSpec, timeout: float, breaker: Breaker, environ=os.environ):
        self.spec = spec
        self.name = spec.name
        self.ember = spec.kind == "ember"
        self.breaker = breaker
        key = environ.get(spec.key_env, "").strip()
        headers = {"Accept-Encoding": "identity"}  # SSE bytes passed through as they are: not compressed
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(
            base_url=spec.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)),
            limits=httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_CONNECTIONS),
        )
        self.attempts = 0  # calls made to it (each retry counts)
        self._models: list[dict] = []
        self._models_at = float("-inf")

    async def call(self, path: str, body: dict) -> dict | RawStream:
        """POST `body` to `path` ('/chat/completions'): the answer's JSON, or for `stream` a RawStream once
        its first bytes have come (until then a failure can still go elsewhere). UpstreamError for an
        error answer; httpx's TransportError (no connection, a timeout) when there is none."""
        self.attempts += 1
        request = self.client.build_request("POST", path, json=body)
        response = await self.client.send(request, stream=True)
        try:
            if response.status_code != 200:
                await response.aread()
                raise UpstreamError(
                    self.name, response.status_code, _error_of(response), response.headers.get("retry-after")
                )
            if not body.get("stream"):
                await response.aread()
                return _json_of(self.name, response)
            chunks = response.aiter_raw()
            first = await anext(chunks, b"")
        except BaseException:
            await response.aclose()
            raise
        return RawStream(self.name, first, chunks, response.aclose)

    async def model_cards(self) -> list[dict]:
        """The provider's models as NAME/model, from its /v1/models (reused for MODELS_TTL_S); none while
        it cannot be reached."""
        if time.monotonic() - self._models_at < MODELS_TTL_S:
            return self._models
        try:
            response = await self.client.get("/models", timeout=MODELS_TIMEOUT_S)
            response.raise_for_status()
            listed = response.json().get("data", [])
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            log.warning("provider '%s': cannot list its models (%s)", self.name, type(exc).__name__)
            self._models_at = time.monotonic() - MODELS_TTL_S + MODELS_RETRY_S  # not asked on every call
            return self._models
        self._models = [
            {**card, "id": f"{self.name}/{card['id']}", "owned_by": card.get("owned_by", self.name)}
            for card in listed
            if isinstance(card, dict) and isinstance(card.get("id"), str)
        ]
        self._models_at = time.monotonic()
        return self._models

    async def aclose(self) -> None:
        await self.client.aclose()


def _json_of(name: str, response: httpx.Response) -> dict:
    """A 200 answer's body; one that is not a JSON object is the upstream's failure (a 502, retried)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        message = f"provider '{name}' answered 200 with a body that is not a JSON object"
        raise UpstreamError(
            name,
            502,
            {"error": {"message": message, "type": "server_error", "param": None, "code": "upstream_error"}},
        )
    return body


def _error_of(response: httpx.Response) -> dict:
    """The upstream's error body in OpenAI's shape (its own, if it sent one)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body
    text = response.text[:500]
    return {
        "error": {
            "message": text or response.reason_phrase,
            "type": "upstream_error",
            "param": None,
            "code": None,
        }
    }
