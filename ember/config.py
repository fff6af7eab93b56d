"""Engine configuration: one dataclass per concern, each checked where it is made."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20}
_UNITS |= {"g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_bytes(value: str | int) -> int:
    """'2GiB', '512MB', '1g' or a plain number of bytes -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read '{value}' as a size; write e.g. 2GiB, 512MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_memory: int | str = "2GiB"  # memory budget for the KV block pool
    num_blocks: int | None = None  # set directly to override the budget (tests force tiny pools)
    enable_prefix_caching: bool = True  # reuse the KV of repeated prompt prefixes (see kv_cache)

    def __post_init__(self) -> None:
        self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1 (got {self.block_size})")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1 (got {self.num_blocks})")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 128  # cap on running sequences
    max_num_batched_tokens: int = 2048  # token budget per step, shared by prefill chunks and decodes

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1 (got {self.max_num_seqs})")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1 (got {self.max_num_batched_tokens})")


@dataclass
class LoRAConfig:
    enabled: bool = False  # wrap the model's projections for LoRA adapters (off: no cost at all)
    max_loras: int = 8  # adapter slots in device memory; more adapters wait in host memory
    max_rank: int = 64
    max_adapters: int = 1024  # registered at once

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_rank", "max_adapters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")


@dataclass
class SpeculativeConfig:
    """Speculative decoding: a proposer guesses up to `num_speculative_tokens` tokens per sequence and the
    target model checks them all in one forward pass (see ember.engine.speculative)."""

    method: str | None = None  # None (off), "ngram" (prompt lookup) or "draft" (a smaller model)
    num_speculative_tokens: int = 4  # k: the most tokens proposed per sequence per step
    draft_model: str | None = None  # method "draft": catalog name, local path or HF repo id
    draft_num_layers: int | None = None  # keep only the draft's first layers (and its LM head)
    ngram_max: int = 4  # prompt lookup matches the last ngram_max .. ngram_min tokens, longest first
    ngram_min: int = 2
    # Adaptive, per step: speculate only while running sequences x (1 + k) stays within this many tokens,
    # shortening k as the batch grows; past it a step decodes plainly (verification would cost more than
    # the accepted tokens save).
    max_batch_tokens: int = 16
    # Adaptive, per sequence: one whose recent acceptance rate falls below this pauses speculation.
    min_acceptance: float = 0.25

    @classmethod
    def parse(cls, spec: str | None, **kwargs) -> SpeculativeConfig:
        """'ngram', 'draft:MODEL' or None/'none' (off), as the --speculative flag takes them."""
        if spec is None or spec.lower() in ("", "none", "off"):
            return cls(**kwargs)
        if spec.lower() == "ngram":
            return cls(method="ngram", **kwargs)
        if spec.startswith("draft:") and spec[len("draft:") :]:
            return cls(method="draft", draft_model=spec[len("draft:") :], **kwargs)
        raise ValueError(f"speculative must be ngram or draft:MODEL (got '{spec}')")

    def __post_init__(self) -> None:
        if self.method not in (None, "ngram", "draft"):
            raise ValueError(f"speculative method must be ngram or draft (got '{self.method}')")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("speculative method draft needs a draft model: draft:MODEL")
        if not 1 <= self.num_speculative_tokens <= 32:
            raise ValueError(f"num_speculative_tokens must be 1..32 (got {self.num_speculative_tokens})")
        if self.draft_num_layers is not None and self.method != "draft":
            raise ValueError("draft_num_layers applies to a draft model: pass draft:MODEL as the method")
        if self.draft_num_layers is not None and self.draft_num_layers < 1:
            raise ValueError(f"draft_num_layers must be at least 1 (got {self.draft_num_layers})")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max (got {self.ngram_min}, {self.ngram_max})")
        if self.max_batch_tokens < 2:
            raise ValueError(f"speculative max_batch_tokens must be at least 2 (got {self.max_batch_tokens})")
        if not 0.0 <= self.min_acceptance < 1.0:
            raise ValueError(f"min_acceptance must be in [0, 1) (got {self.min_acceptance})")


@dataclass
class EngineConfig:
    model: str = "smollm2-135m-instruct"
    device: str = "cpu"
    dtype: str = "float32"
    quantization: str | None = None  # q4_1, q8_0 (float32), int4 (bfloat16), int8; CPU: ember.models.quant
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    seed: int = 0  # for requests that give no seed of their own
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16 (got '{self.dtype}')")
        if self.quantization is not None and self.quantization.lower() in ("", "none"):
            self.quantization = None
        if self.quantization is not None:
            self.quantization = self.quantization.lower()
            if self.quantization not in ("int4", "int8", "q4_1", "q8_0"):
                raise ValueError(
                    f"quantization must be q4_1, q8_0, int4, int8 or none (got '{self.quantization}')"
                )
            if self.device != "cpu":
                raise ValueError(
                    f"quantization {self.quantization} runs on the CPU (got device {self.device})"
                )
            if self.quantization in ("q4_1", "q8_0") and self.dtype != "float32":
                raise ValueError(
                    f"quantization {self.quantization} runs with float32 activations: pass dtype float32 "
                    f"(got {self.dtype})"
                )
            if self.quantization == "int4" and self.dtype != "bfloat16":
                raise ValueError(
                    f"quantization int4 runs with bfloat16 activations: pass dtype bfloat16 (got {self.dtype})"
                )
            if self.quantization == "int8" and self.dtype == "float16":
                raise ValueError("quantization int8 runs with float32 or bfloat16 activations (got float16)")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1 (got {self.max_model_len})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)
