"""What a request asks of generation: how to pick tokens and when to stop (vLLM's names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.structured_outputs import StructuredOutputs

_MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per token; 0: only the chosen token's logprob
    skip_special_tokens: bool = True
    structured: StructuredOutputs | None = None  # a grammar the output must follow
    # The scheduler serves lower numbers first (vLLM's convention); equal priorities in arrival order.
    # 0: interactive; ember's batches run at 10 (ember.server.platform.BATCH_PRIORITY).
    priority: int = 0
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.n >= 1, "n", "must be at least 1"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be -1, 0 (off) or a positive number of tokens"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", "must be >= 0"),
            (self.priority >= 0, "priority", "must be >= 0"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens",
                "must not exceed max_tokens",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= _MAX_LOGPROBS,
                "logprobs",
                f"must be between 0 and {_MAX_LOGPROBS}",
            ),
            (all(s for s in self.stop_list), "stop", "must not contain empty strings"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"{name} {why} (got {getattr(self, name)!r})")
        if self.structured is not None and not isinstance(self.structured, StructuredOutputs):
            raise ValueError(f"structured must be a StructuredOutputs (got {type(self.structured).__name__})")
        for token, bias in (self.logit_bias or {}).items():
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias for token {token} must be in [-100, 100] (got {bias})")

    @property
    def greedy(self) -> bool:
        # A vanishing temperature is greedy: dividing logits by it would overflow (as vLLM treats it).
        return self.temperature < 1e-5

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
