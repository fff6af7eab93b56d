"""A request and its sequences: the state the scheduler and the engine move through each step."""

from __future__ import annotations

import enum
import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.outputs import Logprob
from ember.sampling_params import SamplingParams

_seq_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample of a request: prompt plus the tokens generated for it, and its place in the KV cache."""

    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]
    generator: torch.Generator | None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hashes of full token blocks
    num_registered_blocks: int = 0  # leading blocks of the table named in the prefix cache
    lora_slot: int | None = None  # the adapter slot it holds while running
    matcher: Any = None  # its grammar's parser state (an llguidance LLMatcher), once it has one
    # Speculative decoding (see ember.engine.speculative): slots to reserve this step for proposed
    # tokens, tokens whose KV the draft model has in its cache, and the recent acceptance rate.
    num_lookahead: int = 0
    num_draft_computed: int = 0
    spec_acceptance: float = 1.0
    spec_paused_steps: int = 0
    spec_num_pauses: int = 0  # pauses in a row
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # Logprob entries of tokens not yet reported (None: not asked for); the client keeps the history.
    logprobs: list[dict[int, Logprob]] | None = None
    num_emitted_tokens: int = 0  # output tokens already reported

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_total_tokens: int  # prompt + the most tokens it may generate
    eos_token_ids: list[int] = field(default_factory=list)  # the model's; ignored with ignore_eos
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # n > 1 requests fork their samples after the prompt's prefill
    # Prefix cache: where the block hash chain starts (namespace and adapter); None = no caching.
    cache_root: bytes | None = None
    max_cached_tokens: int | None = None  # the most prompt tokens this request may take from the cache
    num_cached_tokens: int = 0  # prompt tokens it did take, at its first admission
    admitted: bool = False  # first admitted to the running batch (and its cache lookup reported)
    lora: str | None = None  # the LoRA adapter it runs with; None: the base model
    # Structured output: the grammar being compiled for it (a Future), then the compiled template that
    # each of its sequences copies. It is not scheduled while the grammar is pending.
    grammar: Future | None = None
    grammar_template: Any = None

    @property
    def grammar_pending(self) -> bool:
        return self.grammar is not None and self.grammar_template is None

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.finished for s in self.seqs)


@dataclass(eq=False)
class SequenceAhead:
    """A sequence as it would stand with `extra` tokens kept: what the sampler's bias and penalties read
    at a position speculative decoding proposed, before anything is decided."""

    seq: Sequence
    extra: list[int]

    @property
    def params(self) -> SamplingParams:
        return self.seq.params

    @property
    def request(self) -> Request:
        return self.seq.request

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + self.extra

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids + self.extra

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + len(self.extra)
