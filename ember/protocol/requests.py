"""OpenAI request bodies, validated with pydantic, and their mapping onto SamplingParams.

Fields OpenAI defines that ember does not serve yet are refused with a 400 that names them rather than
silently ignored; fields nobody defines are ignored, as OpenAI-compatible servers commonly do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ember.errors import InvalidRequest
from ember.protocol.chat import ChatMessage, NamedToolChoice, Tool
from ember.sampling_params import SamplingParams
from ember.structured_outputs import StructuredOutputs

MAX_STOP = 4
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_EMBEDDING_INPUTS = 2048
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128

# Defined by OpenAI, not served yet (the legacy `functions` are served as `tools`).
_NOT_YET = ("functions", "function_call", "suffix", "audio")


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


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format, plus Fireworks' `grammar` type (a GBNF grammar) and its `json_object`
    with a `schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema", "grammar"]
    json_schema: JSONSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    grammar: str | None = None

    @model_validator(mode="after")
    def _fields_match_type(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("type 'json_schema' needs json_schema.schema")
        if self.type == "grammar" and not self.grammar:
            raise ValueError("type 'grammar' needs a non-empty 'grammar' (GBNF)")
        if self.grammar is not None and self.type != "grammar":
            raise ValueError("'grammar' is only allowed with type 'grammar'")
        return self

    def constraint(self) -> StructuredOutputs | None:
        if self.type == "json_schema":
            return StructuredOutputs(json=self.json_schema.schema_)
        if self.type == "json_object":
            return (
                StructuredOutputs(json=self.schema_) if self.schema_ else StructuredOutputs(json_object=True)
            )
        if self.type == "grammar":
            return StructuredOutputs(grammar=self.grammar)
        return None


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
    response_format: ResponseFormat | None = None

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
            if value not in (None, [], {}):
                hint = "; use 'tools' and 'tool_choice'" if name in ("functions", "function_call") else ""
                raise InvalidRequest(f"'{name}' is not supported by this server{hint}", param=name)

    def structured(self) -> StructuredOutputs | None:
        """What response_format asks the output to be; None for free text."""
        return None if self.response_format is None else self.response_format.constraint()

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
            structured=self.structured(),
        )

    def _max_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # ember's (the Responses API's name): with parallel calls on, up to this many calls of any tools in one
    # turn; unset, each declared tool may be called once (so a small model cannot repeat a call forever).
    max_tool_calls: int | None = Field(default=None, ge=1, le=MAX_TOOL_CALLS)

    @model_validator(mode="after")
    def _top_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @model_validator(mode="after")
    def _tools(self):
        names = [t.function.name for t in self.tools or []]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"tool names must be unique (repeated: {', '.join(sorted(dup))})")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(
                f"tool_choice names function '{choice.function.name}', which is not among the tools"
            )
        return self

    def tool_mode(self) -> str | None:
        """None (no tools in play), "auto", "required" or the one function's name."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"

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
