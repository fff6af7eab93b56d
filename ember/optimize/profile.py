"""What an engine step costs on this machine, measured once per (model, quantization, dtype) and cached.

A step's time is fitted as

    seconds = fixed + per_token * tokens + per_seq * seqs + per_attention * sum_i(n_i * context_i) / 1000

over real steps of the real engine (`LLMEngine.step`, detokenization and output handling included):
`tokens` the step's scheduled tokens (prefill chunks, decodes and speculative slots alike, as the
scheduler's one budget counts them), `seqs` the sequences in it, and the attention term the query tokens
times the KV they read. Non-negative least squares (scipy), so no term can pay for another's error. The
steps are drawn from prefill- and decode-heavy batches of several sizes and contexts.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ember.config import CacheConfig, EngineConfig, SchedulerConfig
from ember.paths import ember_data_dir

# (requests, prompt tokens, output tokens, token budget): prefill at several sizes, decode at several
# batch widths and contexts, a chunked long prompt.
SHAPES = ((1, 32, 8, 2048), (4, 96, 6, 2048), (12, 32, 6, 2048), (1, 384, 2, 128))


@dataclass
class StepModel:
    fixed: float
    per_token: float
    per_seq: float
    per_attention: float  # seconds per 1000 query-token x context-token products
    steps: int = 0  # steps the fit saw
    rel_error: float = 0.0  # median |fit - measured| / measured over them
    kv_bytes_per_token: int = 0  # the KV pool's size per token of context (sizes the pool in blocks)

    def seconds(self, tokens: int, seqs: int, attention: float) -> float:
        return (
            self.fixed + self.per_token * tokens + self.per_seq * seqs + self.per_attention * attention / 1000
        )

    def scaled(self, factor: float) -> StepModel:
        """Every step `factor` times as long (a machine running slower or faster than when profiled)."""
        if factor == 1.0:
            return self
        return replace(
            self,
            fixed=self.fixed * factor,
            per_token=self.per_token * factor,
            per_seq=self.per_seq * factor,
            per_attention=self.per_attention * factor,
        )

    def num_blocks(self, config: EngineConfig) -> int:
        """The blocks `config`'s KV memory buys, as EngineCore sizes its pool."""
        cache = config.cache
        if cache.num_blocks:
            return cache.num_blocks
        return max(1, cache.kv_cache_memory // max(self.kv_bytes_per_token * cache.block_size, 1))


def cpu_name() -> str:
    from ember.quality.report import cpu_name as name

    return name()


def profile_key(model: str, quantization: str | None, dtype: str, device: str = "cpu") -> str:
    """Machine (CPU model string), model, settings and torch: a profile from elsewhere does not apply."""
    import torch

    parts = [cpu_name(), platform.machine(), model, str(quantization), dtype, device, torch.__version__]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def profile_dir() -> Path:
    return ember_data_dir() / "optimize" / "profiles"


def fit(rows: list[tuple[int, int, float, float]]) -> StepModel:
    """rows: (tokens, seqs, attention, seconds) per step."""
    from scipy.optimize import nnls

    a = np.array([[1.0, t, s, att / 1000] for t, s, att, _ in rows])
    y = np.array([sec for *_, sec in rows])
    # Relative error is what matters (a 5 ms decode and a 2 s prefill alike): weight rows by 1/y.
    w = 1.0 / np.maximum(y, 1e-4)
    coef, _ = nnls(a * w[:, None], y * w)
    pred = a @ coef
    rel = float(np.median(np.abs(pred - y) / np.maximum(y, 1e-9))) if len(y) else 0.0
    return StepModel(*map(float, coef), steps=len(rows), rel_error=rel)


def measure_steps(
    config: EngineConfig, progress=None, shapes: tuple[tuple[int, int, int, int], ...] = SHAPES
) -> tuple[list[tuple[int, int, float, float]], int]:
    """Run the shapes through one real engine (a fresh scheduler per shape, over the same loaded model)
    and time every step it takes; also the KV bytes per token of context."""
    from ember.engine.llm_engine import LLMEngine
    from ember.engine.scheduler import Scheduler
    from ember.sampling_params import SamplingParams

    engine = LLMEngine(
        EngineConfig(
            model=config.model,
            device=config.device,
            dtype=config.dtype,
            quantization=config.quantization,
            cache=CacheConfig(kv_cache_memory="256MiB", enable_prefix_caching=False),
        )
    )
    core = engine.core
    from ember.engine.model_runner import ModelRunner

    per_token = (
        ModelRunner.bytes_per_block(core.model_config, 16, config.torch_dtype, core.model.backend) // 16
    )
    vocab = core.model_config.vocab_size
    rows: list[tuple[int, int, float, float]] = []
    try:
        for n, prompt_len, out_len, budget in shapes:
            limits = SchedulerConfig(max_num_seqs=n, max_num_batched_tokens=budget)
            core.scheduler = Scheduler(limits, core.kv, core.lora)
            seen: dict = {}
            _recording(core.scheduler, seen)
            rng = np.random.default_rng(prompt_len)
            # A short untimed request first: the first steps of a shape pay one-off kernel and allocator costs.
            for n_req, length, out, timed in ((1, 8, 2, False), (n, prompt_len, out_len, True)):
                params = SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True)
                for _ in range(n_req):
                    engine.add_request(rng.integers(100, min(vocab, 20000), length).tolist(), params)
                while engine.has_unfinished_requests():
                    seen.clear()
                    start = time.perf_counter()
                    engine.step()
                    seconds = time.perf_counter() - start
                    if timed and seen.get("shape", (0,))[0]:
                        rows.append((*seen["shape"], seconds))
            if progress is not None:
                progress()
    finally:
        engine.close()
    return rows, per_token


def _recording(scheduler, seen: dict) -> None:
    """Make `scheduler.schedule` note the shape of each step it plans in `seen['shape']`."""
    schedule = scheduler.schedule

    def schedule_and_note():
        out = schedule()
        work = out.num_scheduled
        attention = float(sum(k * (s.num_computed_tokens + k) for s, k in work.items()))
        seen["shape"] = (sum(work.values()), len(work), attention)
        return out

    scheduler.schedule = schedule_and_note


def load_or_measure(
    model: str, quantization: str | None, dtype: str, progress=None, shapes: tuple = SHAPES
) -> StepModel:
    """The cached profile of this machine for these settings, measured now if there is none. `shapes`:
    (requests, prompt tokens, output tokens, token budget) batches to time (fewer: a rougher profile)."""
    drawn = hashlib.sha256(repr(shapes).encode()).hexdigest()[:6]  # a rougher profile is not the full one
    path = profile_dir() / f"{profile_key(model, quantization, dtype)}-{drawn}.json"
    if path.is_file():
        return StepModel(**json.loads(path.read_text())["model"])
    config = EngineConfig(model=model, dtype=dtype, quantization=quantization)
    rows, per_token = measure_steps(config, progress, shapes)
    model_fit = fit(rows)
    model_fit.kv_bytes_per_token = per_token
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": cpu_name(), "model": model, "quantization": quantization, "dtype": dtype}
    path.write_text(json.dumps({"machine": meta, "model": asdict(model_fit)}, indent=2))
    return model_fit
