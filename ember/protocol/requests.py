"""OpenAI request bodies, validated with pydantic, and their mapping onto SamplingParams.

Validation is strict: a field takes the JSON type it is defined with ("yes" is not true, true is not the
token id 1), except that an integer is a number (temperature 1). Fields OpenAI defines that ember does not
serve, and fields nobody defines, are refused with a 400 that names them (ember/protocol/fields.py). Beyond
OpenAI, the bodies take vLLM's sampling and structured-output fields and Fireworks' response options.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ember.errors import InvalidRequest
from ember.protocol import fields
from ember.protocol.chat import ChatMessage, NamedToolChoice, Tool
from ember.protocol.constraints import GUIDED, GuidedOutputs, ResponseFormat
from ember.sampling_params import SamplingParams
from ember.structured_outputs import StructuredOutputs

MAX_STOP = 4
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_EMBEDDING_INPUTS = 2048
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128
# OpenAI's limits on `metadata` (a stored completion's tags).
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512

# Variables a chat template gets from ember itself; chat_template_kwargs may not replace them.
_TEMPLATE_OWN = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "chat_template"}
)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


def check_metadata(v: dict[str, str] | None) -> dict[str, str] | None:
    """`metadata` within OpenAI's limits: 16 pairs, keys of 64 characters, values of 512."""
    if v is None:
        return v
    if len(v) > MAX_METADATA_PAIRS:
        raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs are allowed (got {len(v)})")
    for key, value in v.items():
        if len(key) > MAX_METADATA_KEY:
            raise ValueError(
                f"keys must be at most {MAX_METADATA_KEY} characters (got {len(key)}: '{key[:20]}...')"
            )
        if len(value) > MAX_METADATA_VALUE:
            raise ValueError(
                f"values must be at most {MAX_METADATA_VALUE} characters (key '{key}' has {len(value)})"
            )
    return v


def _ids(v: Any) -> bool:
    return isinstance(v, list) and all(type(x) is int for x in v)


def _strs(v: Any) -> bool:
    return isinstance(v, list) and all(type(x) is str for x in v)


def _prompt_shape(v: Any) -> Any:
    """The value, if it is one of the prompt shapes OpenAI takes (one message for the union, not one per
    branch); a bool is not a token id."""
    if isinstance(v, str) or _strs(v) or _ids(v) or (isinstance(v, list) and all(_ids(x) for x in v)):
        return v
    raise ValueError(f"must be {PROMPT_SHAPES}")


class _Body(BaseModel):
    """A request body: explicit nulls mean "use the default", as OpenAI treats them."""

    # Extras are kept to be refused by name (or ignored, by the server's choice); the document says
    # what a client may send.
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"additionalProperties": False})

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaults = {name: f.default for name, f in cls.model_fields.items()}
        return {k: v for k, v in data.items() if not (v is None and defaults.get(k) is not None)}

    def check_supported(self, allow_unknown: bool = False) -> None:
        """400 for what validation lets through but ember does not serve: see ember/protocol/fields.py."""
        fields.check(self.model_extra or {}, allow_unknown)


class StreamOptions(_Body):
    model_config = ConfigDict(extra="ignore", strict=True)
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
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # store: keep this chat completion (ember.traces; the server's --store-traces sets the default) with
    # `metadata` as its tags.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # Accepted and not acted on: they describe the caller or its account, not what is computed.
    user: str | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # ember's prefix cache needs no hint
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    # Beyond OpenAI, as vLLM accepts them.
    top_k: int = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    # The engine serves lower numbers first; 0 is interactive, the most urgent a client may ask for (a
    # client can only lower its own priority: batches run at 10).
    priority: int = Field(default=0, ge=0, le=1_000_000)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    guided_grammar: str | None = None
    structured_outputs: GuidedOutputs | None = None
    # As Fireworks names them. prompt_cache_max_len: the most prompt tokens taken from the prefix cache
    # (0 opts out of it); context_length_exceeded_behavior "truncate": max_tokens is lowered to what the
    # context has room for instead of a 400; raw_output: the prompt and completion as the model saw them.
    prompt_cache_max_len: int | None = Field(default=None, ge=0)
    context_length_exceeded_behavior: Literal["error", "truncate"] = "error"
    perf_metrics_in_response: bool = False
    raw_output: bool = False
    echo: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, v: Any) -> Any:
        if v is None or isinstance(v, str) or _strs(v):
            return v
        raise ValueError("must be a string or a list of strings")

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

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(v)

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def check_supported(self, allow_unknown: bool = False) -> None:
        super().check_supported(allow_unknown)
        self.structured()  # conflicting constraints are refused before any work

    def structured(self) -> StructuredOutputs | None:
        """What the output must be (response_format, vLLM's guided_* or structured_outputs); None for free
        text. Two of them at once are refused: which should win is the client's to say."""
        asked: dict[str, StructuredOutputs] = {}
        if self.response_format is not None and (c := self.response_format.constraint()) is not None:
            asked["response_format"] = c
        for name, kind in GUIDED.items():
            value = getattr(self, name)
            if value is not None:
                asked[name] = StructuredOutputs(**{kind: value})
        if self.structured_outputs is not None:
            asked["structured_outputs"] = self.structured_outputs.constraint()
        if len(asked) > 1:
            first, second = list(asked)[:2]
            raise InvalidRequest(
                f"'{first}' and '{second}' both constrain the output; send only one",
                param=second,
                code="conflicting_constraints",
            )
        return next(iter(asked.values()), None)

    def constraint_field(self) -> str | None:
        """The name of the field that asks for a constraint (response_format of type text asks none)."""
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        given = [n for n in (*GUIDED, "structured_outputs") if getattr(self, n) is not None]
        return given[0] if given else None

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
            priority=self.priority,
        )

    def _max_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    _prompt_tool_mode: str | None = PrivateAttr(default=None)  # see keep_prompt_tools
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # ember's (the Responses API's name): with parallel calls on, up to this many calls of any tools in one
    # turn; unset, each declared tool may be called once (so a small model cannot repeat a call forever).
    max_tool_calls: int | None = Field(default=None, ge=1, le=MAX_TOOL_CALLS)
    modalities: list[Literal["text"]] | None = None  # this server writes text only
    # The chat template's switches, as vLLM takes them.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

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

    @model_validator(mode="after")
    def _template(self):
        if self.continue_final_message:
            if self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
                raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
            self.add_generation_prompt = False  # continuing the last message opens no new one
            if self.messages[-1].role != "assistant":
                raise ValueError("continue_final_message needs the last message to be the assistant's")
        for key in self.chat_template_kwargs or {}:
            if key in _TEMPLATE_OWN or not _IDENTIFIER.match(key):
                raise ValueError(
                    f"chat_template_kwargs may not set '{key}': keys are template variable names other "
                    f"than {', '.join(sorted(_TEMPLATE_OWN))}"
                )
        return self

    def check_supported(self, allow_unknown: bool = False) -> None:
        super().check_supported(allow_unknown)
        asked = self.constraint_field()
        if self.tool_mode() is not None and asked not in (None, "response_format"):
            raise InvalidRequest(
                f"'{asked}' cannot be combined with tools; use response_format, or tool_choice 'none'",
                param=asked,
            )
        if self.echo and self.tool_mode() is not None:
            raise InvalidRequest("'echo' cannot be combined with tools", param="echo")

    def tool_mode(self) -> str | None:
        """None (no tools in play), "auto", "required" or the one function's name."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"

    def keep_prompt_tools(self, mode: str) -> None:
        """Render the prompt as under tool mode `mode` (the tools and their note shown) whatever this
        request's own tool_choice: the server's tool loop (ember.responses.run) does so for a turn that may
        call no more tools, so that its prompt extends the earlier turns' and the prefix cache serves all
        of it. Not a request field: no client sets it."""
        self._prompt_tool_mode = mode

    def prompt_tool_mode(self) -> str | None:
        """The tool mode the prompt is rendered with: tool_mode(), unless keep_prompt_tools said another."""
        return self._prompt_tool_mode if self.tools and self._prompt_tool_mode else self.tool_mode()

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        return _prompt_shape(v)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Prompt) -> Prompt:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    def check_supported(self, allow_unknown: bool = False) -> None:
        super().check_supported(allow_unknown)
        if self.echo and self.logprobs is not None:
            raise InvalidRequest(
                "'echo' with 'logprobs' needs the prompt's logprobs, which this server does not compute",
                param="echo",
            )
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

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, v: Any) -> Any:
        return _prompt_shape(v)

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

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1)
