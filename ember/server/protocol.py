"""OpenAI request bodies, validated with pydantic, and their mapping onto SamplingParams.

Fields OpenAI defines that ember does not serve yet are refused with a 400 that names them rather than
silently ignored; fields nobody defines are ignored, as OpenAI-compatible servers commonly do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ember.errors import InvalidRequest
from ember.sampling_params import SamplingParams

MAX_STOP = 4
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_EMBEDDING_INPUTS = 2048

# Defined by OpenAI, not served yet (structured output and tools arrive with their own issue).
_NOT_YET = ("tools", "tool_choice", "functions", "function_call", "response_format", "suffix", "audio")


class _Body(BaseModel):
    """A request body: explicit nulls mean "use the default", as OpenAI treats them."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaults = {name: f.default for name, f in cls.model_fields.items()}
        return {k: v for k, v in data.items() if not (v is None and defaults.get(k) is not None)}


class StreamOptions(_Body):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Beyond OpenAI, as vLLM accepts them.
    top_k: int = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    # As Fireworks names it: the most prompt tokens taken from the prefix cache; 0 opts out of it.
    prompt_cache_max_len: int | None = Field(default=None, ge=0)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None:
            if len(stops) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop sequences are allowed (got {len(stops)})")
            if any(not s for s in stops):
                raise ValueError("stop sequences must not be empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            try:
                int(key)
            except ValueError:
                raise ValueError(f"keys must be token ids (got '{key}')") from None
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {key} must be in [-100, 100] (got {bias})")
        return v

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def check_supported(self) -> None:
        extra = self.model_extra or {}
        for name in _NOT_YET:
            value = extra.get(name)
            harmless = name == "tool_choice" and value == "none"
            if value not in (None, [], {}) and not harmless:
                raise InvalidRequest(f"'{name}' is not supported by this server yet", param=name)

    def sampling_params(self, default_max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        max_tokens = self._max_tokens() or default_max_tokens
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise InvalidRequest(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens})",
                param="min_tokens",
            )
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            seed=self.seed,
            stop=self.stop,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )

    def _max_tokens(self) -> int | None:
        return self.max_tokens


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            kinds = {p.type for p in self.content} - {"text"}
            if kinds:
                raise InvalidRequest(
                    f"content parts of type {sorted(kinds)} are not supported; this model reads text only",
                    param="messages",
                )
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Prompt) -> Prompt:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidRequest("'echo' is not supported by this server yet", param="echo")
        if self.best_of not in (None, 1, self.n):
            raise InvalidRequest("'best_of' other than n is not supported", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class EmbeddingRequest(_Body):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        v = self.input
        if isinstance(v, str):
            items: list[Any] = [v]
        elif v and all(isinstance(x, int) for x in v):
            items = [list(v)]
        else:
            items = list(v)
        if not items:
            raise InvalidRequest("input must not be empty", param="input")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequest(
                f"at most {MAX_EMBEDDING_INPUTS} inputs per request (got {len(items)})", param="input"
            )
        for i, item in enumerate(items):
            if not item:
                raise InvalidRequest(f"input[{i}] is empty", param="input")
        return items


class AdapterRequest(BaseModel):
    """POST /v1/adapters: load a PEFT LoRA adapter from a directory on the server."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1)
