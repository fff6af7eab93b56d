"""A configuration's predicted numbers: the simulator over the workload's token ids with this machine's
profile for its (model, quantization, dtype), and its quality (lossless settings cost none)."""

from __future__ import annotations

import math
from collections.abc import Callable

from ember.config import EngineConfig
from ember.optimize.profile import StepModel, load_or_measure
from ember.optimize.simulate import SimRequest, latency_metrics, simulate
from ember.optimize.space import Candidate, lossless
from ember.optimize.workload import Workload

# $ per machine-hour when --price is not given (an on-demand cloud machine of the kind, 2026).
PRICES = {"cpu": 0.10, "cuda": 2.50}


def with_cost(metrics: dict, price_per_hour: float) -> dict:
    """Cost = machine-seconds per million good output tokens x price per machine-second."""
    good_tokens = metrics["output_tokens"] * metrics["good_fraction"]
    seconds_per_mtok = metrics["duration"] / good_tokens * 1e6 if good_tokens else math.inf
    return {**metrics, "cost": seconds_per_mtok * price_per_hour / 3600}


class Predictor:
    """Tokenizes the workload once, profiles each (quantization, dtype) once, and simulates candidates."""

    def __init__(
        self,
        workload: Workload,
        base: EngineConfig,
        slos_ms: dict[str, float],
        outputs: list[list[int]] | None = None,
        profiles: Callable[[str, str | None, str], StepModel] = load_or_measure,
    ):
        from ember.models.catalog import resolve_model
        from ember.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(resolve_model(base.model))
        self.base = base
        self.slos_ms = slos_ms
        self.requests = [
            SimRequest(
                tokenizer.encode(i.prompt), i.max_tokens, i.arrival, None if outputs is None else outputs[n]
            )
            for n, i in enumerate(workload.items)
        ]
        self._profiles = profiles
        self._cache: dict[tuple[str | None, str], StepModel] = {}
        self.speed = 1.0  # step times x this: the machine now against its profile (calibrate)

    def profile(self, config: EngineConfig) -> StepModel:
        key = (config.quantization, config.dtype)
        if key not in self._cache:
            self._cache[key] = self._profiles(config.model, *key)
        return self._cache[key]

    def __call__(self, candidate: Candidate) -> dict:
        config = candidate.engine(self.base)
        cost = self.profile(config)
        line = simulate(config, self.requests, cost.scaled(self.speed), cost.num_blocks(config))
        return latency_metrics(line, self.slos_ms)

    def calibrate(self, predicted: dict, measured: dict) -> float:
        """Scale step times so that the default's replayed TPOT p50 would have been predicted: one number
        for how fast the machine runs now (its load, the server's own overhead) against its profile."""
        p, m = predicted.get("tpot_p50"), measured.get("tpot_p50")
        if p and m and math.isfinite(p) and math.isfinite(m):
            self.speed *= m / p
        return self.speed


def greedy_outputs(workload: Workload, model: str) -> list[list[int]]:
    """The reference (float32, unquantized) greedy answer to each request: what n-gram speculation's
    proposals are checked against in the simulator (greedy speculation emits exactly these)."""
    from ember.llm import LLM
    from ember.sampling_params import SamplingParams

    llm = LLM(model, kv_cache_memory="256MiB")
    try:
        params = [
            SamplingParams(temperature=0.0, max_tokens=i.max_tokens, ignore_eos=True) for i in workload.items
        ]
        outs = llm.generate([i.prompt for i in workload.items], params)
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        llm.close()


def quality_of(candidate: Candidate, base: EngineConfig, prompts: list[str], cache: dict) -> dict:
    """{'quality': agreement, 'kl_mean': ...} against the float32 reference; lossless: 1.0 and 0 unmeasured.
    `cache` holds the reference and each (quantization, dtype) measured, across calls."""
    if lossless(candidate, base):
        return {"quality": 1.0, "kl_mean": 0.0}
    from ember.quality import measure, reference

    config = candidate.engine(base)
    key = f"{config.quantization}/{config.dtype}"
    if key not in cache:
        if "_reference" not in cache:
            cache["_reference"] = reference(config.model, prompts=prompts, max_tokens=16)
        f = measure(
            config.model,
            quantization=config.quantization,
            dtype=config.dtype,
            prompts=prompts,
            max_tokens=16,
            reference=cache["_reference"],
        )
        cache[key] = {"quality": f.agreement, "kl_mean": f.kl_mean}
    return cache[key]
