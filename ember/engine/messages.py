"""What passes between an engine client and the engine core: small picklable records, so one core loop
serves a thread, a process (and later a remote replica) alike. The core speaks token ids only; text is
the client's job (ember.engine.processors).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ember.outputs import Logprob
from ember.sampling_params import SamplingParams


class ErrorKind(enum.Enum):
    """Why the core refused a command; the serving layer decides what status that is."""

    INVALID = "invalid"  # the input is bad (an adapter that fails its checks, a bad prompt)
    NOT_FOUND = "not_found"  # it names something the core does not have
    CONFLICT = "conflict"  # it clashes with the core's state (an adapter still in use)


# -- client -> core ---------------------------------------------------------------------------------


@dataclass
class AddRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    cache_salt: bytes | None = None  # prefix-cache namespace
    max_cached_tokens: int | None = None
    lora: str | None = None  # adapter name; None: the base model


@dataclass
class AddLoRA:
    name: str
    path: str


@dataclass
class RemoveLoRA:
    name: str


@dataclass
class Abort:
    request_id: str


@dataclass
class FinishSample:
    """The client matched a stop string in sample `index`: stop generating it."""

    request_id: str
    index: int
    stop_reason: str


@dataclass
class Shutdown:
    pass


# -- core -> client ---------------------------------------------------------------------------------


@dataclass
class EngineInfo:
    """What a client needs to know of the loaded engine to validate and detokenize on its side."""

    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    lora_enabled: bool = False
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def pool_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass
class Added:
    request_id: str
    error: tuple[str, str | None, str | None] | None  # (message, param, code) of an InvalidRequest


@dataclass
class LoRADone:
    """The core's answer to AddLoRA / RemoveLoRA: error is None on success."""

    name: str
    error: str | None = None
    kind: ErrorKind | None = None


@dataclass
class SampleUpdate:
    """What one sample gained this step: only the new tokens, never the whole list."""

    index: int
    new_token_ids: list[int]
    new_logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: str | int | None


@dataclass
class RequestUpdate:
    request_id: str
    samples: list[SampleUpdate]
    num_cached_tokens: int
    queue_time: float | None
    # Ended by an abort: every sample not finished yet ends with "abort" (an n > 1 request aborted
    # before it forked has fewer samples in the core than it asked for).
    aborted: bool = False


@dataclass
class CoreStats:
    num_running: int  # requests with a sample running
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    num_preemptions: int
    prefix_cache_queries: int = 0  # tokens, cumulative
    prefix_cache_hits: int = 0
    # Speculative decoding, cumulative: tokens proposed, kept, and emitted by speculative steps.
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_emitted_tokens: int = 0
    # Prefix-cache blocks named or evicted since the last report, (hash, cached), when the client asked
    # for them (AsyncEngine(report_blocks=True), as a Ray replica does for its router).
    cache_events: list[tuple[bytes, bool]] = field(default_factory=list)


@dataclass
class Step:
    updates: list[RequestUpdate]
    stats: CoreStats


@dataclass
class Dead:
    message: str
    shutdown: bool = False  # True: asked to stop (Shutdown), not a failure
