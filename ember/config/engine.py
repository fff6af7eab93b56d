"""Engine configuration: one dataclass per concern, each setting declared once (see schema.setting) and
checked where it is made."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ember.config.auto import AUTO, AutoChoice, choose
from ember.config.schema import ConfigError, Range, build, check, leaves, sections, setting
from ember.config.units import format_bytes, parse_bytes

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("q4_1", "q8_0", "int4", "int8", None)


@dataclass
class CacheConfig:
    block_size: int = setting(16, help="tokens per KV block", minimum=1, search=(8, 16, 32))
    kv_cache_memory: int | str = setting(
        "2GiB",
        help="memory budget for the KV block pool (2GiB, 512MiB or bytes)",
        search=Range(2**28, 2**33, log=True),
        show=format_bytes,
    )
    num_blocks: int | None = setting(
        None, help="KV blocks in the pool; overrides --kv-cache-memory (tests force tiny pools)", minimum=1
    )
    gpu_memory_utilization: float = setting(
        0.9,
        help="on CUDA: the fraction of the GPU's memory ember may hold in all; the KV pool gets what the "
        "loaded model leaves of it (replaces --kv-cache-memory there; activations and CUDA graphs come "
        "out of the rest)",
        minimum=0.01,
        search=(0.8, 0.9, 0.95),
    )
    enable_prefix_caching: bool = setting(
        True,
        help="reuse the KV of repeated prompt prefixes",
        aliases=("/--no-prefix-cache",),
        search=(True, False),
    )

    def __post_init__(self) -> None:
        try:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        except ValueError as exc:
            raise ConfigError("kv_cache_memory", str(exc)) from None
        check(self)
        if self.gpu_memory_utilization > 1:
            raise ConfigError(
                "gpu_memory_utilization",
                f"is a fraction of the GPU's memory: 0.01..1 (got {self.gpu_memory_utilization})",
            )

    def kv_budget(self, device: torch.device) -> int:
        """Bytes for the KV pool on `device`: --kv-cache-memory on the CPU; on CUDA, the share of the GPU's
        memory --gpu-memory-utilization allows, less what is in use already (the model's weights, other
        processes), read once the model is loaded."""
        if device.type != "cuda":
            return self.kv_cache_memory
        import torch

        free, total = torch.cuda.mem_get_info(device)
        budget = int(self.gpu_memory_utilization * total) - (total - free)
        if budget <= 0:
            raise ConfigError(
                "gpu_memory_utilization",
                f"{self.gpu_memory_utilization} of {format_bytes(total)} leaves no room for the KV cache: "
                f"{format_bytes(total - free)} is in use once the model is loaded; raise it",
            )
        return budget


@dataclass
class SchedulerConfig:
    max_num_seqs: int = setting(
        128, help="cap on running sequences", minimum=1, search=Range(1, 256, log=True)
    )
    max_num_batched_tokens: int = setting(
        2048,
        help="token budget per engine step, shared by prefill chunks, decodes and speculative tokens",
        minimum=1,
        search=Range(64, 8192, log=True),
    )
    background_token_budget: int | None = setting(
        None,
        help="while interactive (priority 0) requests are in the engine, the most tokens per step that "
        "lower-priority work (batches) may take; none: whatever interactive work leaves",
        minimum=1,
        search=(None, 4, 16, 64),
    )
    # 0.03: on a 2-core CPU the interactive steps came out ~2x the nominal share slower (per-row work the
    # step's time does not see: the batch lines' own request handling), 0.03 kept TTFT and TPOT within 15%.
    background_slowdown: float | None = setting(
        0.03,
        help="while interactive (priority 0) requests are in the engine, how much longer lower-priority work "
        "(batches) may make a step, as a fraction of the interactive work's own step time, by the engine's "
        "running estimate of what a token costs (0.1: steps about a tenth slower); none: no such limit",
        minimum=0,
        search=(None, 0.03, 0.1, 0.25),
    )
    background_grace_s: float = setting(
        1.0,
        help="interactive work counts as in the engine until this many seconds after the last of it left (the "
        "gap between a user's turns), so batch work does not rush into it",
        minimum=0,
    )

    def __post_init__(self) -> None:
        check(self)


@dataclass
class LoRAConfig:
    enabled: bool = setting(
        False, help="serve LoRA adapters (off: no cost at all; implied by --lora)", flag="--enable-lora"
    )
    max_loras: int = setting(
        8, help="adapter slots in device memory; more adapters wait in host memory", minimum=1
    )
    max_rank: int = setting(64, help="the largest LoRA rank accepted", flag="--max-lora-rank", minimum=1)
    max_adapters: int = setting(1024, help="adapters registered at once", flag="--max-cpu-loras", minimum=1)

    def __post_init__(self) -> None:
        check(self)


@dataclass
class SpeculativeConfig:
    """Speculative decoding: a proposer guesses up to `num_speculative_tokens` tokens per sequence and the
    target model checks them all in one forward pass (see ember.engine.speculative)."""

    method: str | None = setting(
        None,
        help="speculative decoding: ngram (prompt lookup), draft:MODEL (a smaller model) or none",
        flag="--speculative",
        choices=(None, "ngram", "draft"),
        metavar="[none|ngram|draft:MODEL]",
        search=(None, "ngram"),
    )
    num_speculative_tokens: int = setting(
        4, help="k: the most tokens proposed per sequence per step (1..32)", search=Range(1, 8)
    )
    draft_model: str | None = setting(None, help="the draft model (--speculative draft:MODEL sets it)")
    draft_num_layers: int | None = setting(None, help="keep only the draft model's first N layers", minimum=1)
    ngram_max: int = setting(
        4,
        help="prompt lookup matches the last N down to --ngram-prompt-lookup-min tokens, longest first",
        flag="--ngram-prompt-lookup-max",
    )
    ngram_min: int = setting(
        2, help="the shortest match prompt lookup tries", flag="--ngram-prompt-lookup-min"
    )
    # Past this, verification would cost more than the accepted tokens save: shorten k as the batch grows.
    max_batch_tokens: int = setting(
        16,
        help="speculate only while running sequences x (1 + k) stays within this many tokens",
        flag="--speculative-max-batch-tokens",
        minimum=2,
        search=(8, 16, 32, 64),
    )
    min_acceptance: float = setting(
        0.25,
        help="a sequence whose recent acceptance rate falls below this pauses speculation",
        flag="--speculative-min-acceptance",
    )

    @classmethod
    def parse(cls, spec: str | None, **kwargs: Any) -> SpeculativeConfig:
        """'ngram', 'draft:MODEL' or None/'none' (off), as the --speculative flag takes them."""
        return cls(method=spec, **kwargs)

    def __post_init__(self) -> None:
        method = self.method.strip() if isinstance(self.method, str) else self.method
        if isinstance(method, str) and method.lower() in ("", "none", "off"):
            method = None
        # The flag's one-word form: 'draft:MODEL' names the model too (and wins over draft_model).
        if isinstance(method, str) and method.startswith("draft:") and method[len("draft:") :]:
            method, self.draft_model = "draft", method[len("draft:") :]
        if method not in (None, "ngram", "draft"):
            raise ConfigError(
                "method", f"speculative must be ngram or draft:MODEL (got {method!r}); none turns it off"
            )
        self.method = method
        check(self)
        if self.method == "draft" and not self.draft_model:
            raise ConfigError("method", "speculative method draft needs a draft model: draft:MODEL")
        if not 1 <= self.num_speculative_tokens <= 32:
            raise ConfigError("num_speculative_tokens", f"must be 1..32 (got {self.num_speculative_tokens})")
        if self.draft_num_layers is not None and self.method != "draft":
            raise ConfigError(
                "draft_num_layers",
                "set, but draft_num_layers applies to a draft model: pass draft:MODEL as the method",
            )
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(
                "ngram_min", f"need 1 <= ngram_min <= ngram_max (got {self.ngram_min}, {self.ngram_max})"
            )
        if not 0.0 <= self.min_acceptance < 1.0:
            raise ConfigError("min_acceptance", f"must be in [0, 1) (got {self.min_acceptance})")


@dataclass
class EngineConfig:
    # The catalog's DEFAULT_MODEL; written out here because the catalog imports the GGUF reader.
    model: str = setting(
        "smollm2-135m-instruct", help="catalog name, local path or HF repo id", aliases=("-m",)
    )
    device: str = setting("cpu", help="cpu or cuda")
    dtype: str = setting(
        "float32",
        help="activation (and float weight) dtype; auto: the fastest for the quantization on this machine",
        choices=(AUTO, *DTYPES),
        search=DTYPES,
    )
    # The default stays the exact float32 reference: every exactness test (and a user comparing against
    # transformers) runs it; `auto` is one flag away and logs what it picked.
    quantization: str | None = setting(
        None,
        help="q4_1 or q8_0: GGUF block formats on ember's CPU kernels (float32); int4: 4-bit weights with "
        "--dtype bfloat16; int8: any dtype (CPU); auto: the fastest this CPU runs (logged at start-up); "
        "none: the exact float32 reference",
        choices=(AUTO, *QUANTIZATIONS),
        search=QUANTIZATIONS,
    )
    max_model_len: int | None = setting(None, help="context length; default: the model's own", minimum=1)
    seed: int = setting(0, help="seed for requests that give no seed of their own")
    chat_template: str | None = setting(
        None, help="a Jinja chat template (a file, or the template text) replacing the model's own"
    )
    enforce_eager: bool = setting(
        False, help="on CUDA: run decode steps eagerly instead of replaying captured CUDA graphs"
    )
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    # What `auto` resolved to and why (None: nothing was auto); not a setting, so never written to a spec.
    auto_choice: ClassVar[AutoChoice | None] = None

    def __post_init__(self) -> None:
        if isinstance(self.quantization, str):
            self.quantization = self.quantization.strip().lower()
        check(self)
        if AUTO in (self.quantization, self.dtype):
            self.auto_choice = choose(self.device, self.quantization, self.dtype)
            self.quantization, self.dtype = self.auto_choice.quantization, self.auto_choice.dtype
        if self.quantization is None:
            return
        if self.device != "cpu":
            raise ConfigError(
                "quantization", f"{self.quantization} runs on the CPU: pass --device cpu (got {self.device})"
            )
        if self.quantization in ("q4_1", "q8_0") and self.dtype != "float32":
            raise ConfigError(
                "quantization",
                f"{self.quantization} runs with float32 activations: pass dtype float32 (got {self.dtype})",
            )
        if self.quantization == "int4" and self.dtype != "bfloat16":
            raise ConfigError(
                "quantization", f"int4 runs with bfloat16 activations: pass dtype bfloat16 (got {self.dtype})"
            )
        if self.quantization == "int8" and self.dtype == "float16":
            raise ConfigError("quantization", "int8 runs with float32 or bfloat16 activations (got float16)")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch  # here, so that reading a config (the CLI's --print-config) needs no torch

        return getattr(torch, self.dtype)


def engine_kwargs() -> dict[str, tuple[str, ...]]:
    """The flat keyword arguments of `LLM(**kw)` (the CLI's flags with underscores) -> field paths."""
    return {leaf.name: leaf.path for leaf in leaves(EngineConfig)}


def engine_config(**kwargs: Any) -> EngineConfig:
    """An EngineConfig from flat keyword arguments: LLM(block_size=4, speculative="ngram", ...). A section
    may also be passed whole (speculative=SpeculativeConfig(...)); its own fields then go inside it."""
    paths = engine_kwargs()
    subs = sections(EngineConfig)
    nested: dict[str, Any] = {}
    whole = {k: kwargs.pop(k) for k in list(kwargs) if k in subs and isinstance(kwargs[k], subs[k])}
    for key, value in kwargs.items():
        if key not in paths:
            close = difflib.get_close_matches(key, paths, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise TypeError(f"unknown engine setting '{key}'{hint} (known: {', '.join(paths)})")
        *section, name = paths[key]
        (nested.setdefault(section[0], {}) if section else nested)[name] = value
    for name, config in whole.items():
        if name in nested:
            given = [k for k in kwargs if paths[k][0] == name]
            raise ValueError(f"pass {', '.join(given)} inside the {type(config).__name__}")
        nested[name] = config
    return build(EngineConfig, nested)
