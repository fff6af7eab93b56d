"""What a serving benchmark sends (WorkloadConfig) and how it sends it (BenchConfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ember.models.catalog import DEFAULT_MODEL

WORKLOADS = ("random", "shared-prefix", "chat", "multi-lora", "file")
ENDPOINTS = ("completions", "chat")
# vLLM's --goodput keys; values are SLOs in milliseconds.
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class WorkloadConfig:
    """The requests of one run. `seed=None` draws a fresh seed, so prompts never repeat across runs
    and a prefix cache cannot inflate the numbers; the seed used is recorded in results.json."""

    kind: str = "random"
    num_requests: int | None = None  # None: 100, or every record of a file
    seed: int | None = None
    tokenizer: str = DEFAULT_MODEL  # catalog name, path or HF repo id: sizes the prompts
    file: Path | None = None
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0
    num_prefix_groups: int = 4
    prefix_len: int = 512
    suffix_len: int = 64
    num_turns: int = 4
    num_adapters: int = 100
    zipf: float = 1.1
    adapter_prefix: str = "lora"

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"unknown workload '{self.kind}'; known: {', '.join(WORKLOADS)}")
        if self.kind == "file" and self.file is None:
            raise ValueError("the file workload needs --workload-file PATH (a workload.jsonl)")
        if self.file is not None:
            self.file = Path(self.file)
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be at least 1, got {self.num_requests}")
        for name in ("input_len", "output_len", "prefix_len", "suffix_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 token, got {getattr(self, name)}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        for name in ("num_prefix_groups", "num_turns", "num_adapters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.zipf <= 0:
            raise ValueError(f"zipf must be positive (1.1 is a typical skew), got {self.zipf}")


@dataclass
class BenchConfig:
    """One run against one server at one concurrency. `max_concurrency=None`: no cap (rate decides)."""

    base_url: str
    model: str
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    endpoint: str = "completions"
    request_rate: float = math.inf  # requests/s; inf sends everything at once
    burstiness: float = 1.0  # gamma shape of inter-arrival times; 1 is Poisson
    max_concurrency: int | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    goodput: dict[str, float] = field(default_factory=dict)  # {"ttft": ms, ...}
    api_key: str | None = None
    warmup: int = 1  # short requests sent before timing starts, not counted
    progress: bool = True  # a progress bar on the terminal

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint '{self.endpoint}'; known: {', '.join(ENDPOINTS)}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive (inf: all at once), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be positive (1.0 is Poisson), got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be 0 or more requests, got {self.warmup}")
        for key, ms in self.goodput.items():
            if key not in SLO_METRICS:
                raise ValueError(f"unknown goodput metric '{key}'; known: {', '.join(SLO_METRICS)}")
            if not ms > 0:
                raise ValueError(f"goodput SLO for {key} must be a positive number of ms, got {ms}")


def parse_goodput(items: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0}, as vLLM's --goodput takes them."""
    slos = {}
    for item in items:
        key, sep, value = item.partition(":")
        try:
            slos[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"goodput '{item}' is not METRIC:MS (e.g. ttft:500); metrics: {SLO_METRICS}")
    return slos


def parse_concurrency(text: str | None) -> list[int | None]:
    """'1,4,16' -> [1, 4, 16]; None -> [None] (one run, no cap)."""
    if text is None or not text.strip():
        return [None]
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--max-concurrency '{text}' is not an integer or a list like 1,4,16") from None
    if not levels or any(c < 1 for c in levels):
        raise ValueError(f"--max-concurrency '{text}': every level must be at least 1")
    return levels
