"""Offline throughput: ember's batched engine vs HF transformers `generate`, one prompt at a time.

Both run greedy on the same weights in the same process, with EOS ignored so every prompt produces
exactly `max_tokens` new tokens. HF is timed on the first `hf_prompts` prompts (one at a time, as a
user of `generate` would run them); tokens/s is comparable across the two because each HF prompt costs
the same whether or not the others run.
"""

from __future__ import annotations

import json
import platform
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from ember import LLM, SamplingParams
from ember.models.catalog import resolve_model

_TOPICS = [
    "photosynthesis",
    "the French Revolution",
    "black holes",
    "how vaccines work",
    "the water cycle",
    "supply and demand",
    "the Roman Empire",
    "machine learning",
    "plate tectonics",
    "the human heart",
    "compound interest",
    "the theory of evolution",
    "climate change",
    "the printing press",
    "volcanoes",
    "the immune system",
    "electric cars",
    "the moon landing",
    "honey bees",
    "the stock market",
    "quantum computing",
    "the Great Wall of China",
    "recycling",
    "the internet",
    "dinosaurs",
    "solar panels",
    "the Renaissance",
    "earthquakes",
    "DNA",
    "the Olympic Games",
    "coffee",
    "rainbows",
]
_ASKS = [
    "Explain {} to a ten-year-old.",
    "Write a short paragraph about {}.",
    "What are three facts about {}?",
]


def chat_prompts(n: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": _ASKS[i % len(_ASKS)].format(_TOPICS[i % len(_TOPICS)])}]
        for i in range(n)
    ]


def _run_ember(
    model: str, dtype: str, num_prompts: int, max_tokens: int, engine_kwargs: dict[str, Any]
) -> tuple[dict, list[list[int]]]:
    llm = LLM(model=model, dtype=dtype, **engine_kwargs)
    prompts = [llm.tokenizer.apply_chat_template(m) for m in chat_prompts(num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    t0 = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.outputs[0].token_ids) for r in results)
    return {
        "dtype": dtype,
        "seconds": seconds,
        "output_tokens": tokens,
        "tokens_per_s": tokens / seconds,
    }, prompts


def run_offline(
    model: str,
    num_prompts: int,
    max_tokens: int,
    hf_prompts: int,
    out: str | None,
    dtypes: list[str],
    engine_kwargs: dict[str, Any] | None = None,
) -> dict:
    """`engine_kwargs`: more LLM(**kw) settings for every ember run (quantization, kv_cache_memory...)."""
    console = Console(width=120)
    runs = []
    for dtype in dtypes:
        run, prompts = _run_ember(model, dtype, num_prompts, max_tokens, engine_kwargs or {})
        runs.append(run)
    report = {
        "model": model,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "num_prompts": num_prompts,
        "max_tokens": max_tokens,
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "ember": runs,
    }

    if hf_prompts:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32).eval()
        hf_tokens, hf_s = 0, 0.0
        with torch.inference_mode():
            for ids in prompts[:hf_prompts]:
                x = torch.tensor([ids])
                t0 = time.perf_counter()
                y = hf.generate(
                    x,
                    max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens,
                    do_sample=False,
                    attention_mask=torch.ones_like(x),
                )
                hf_s += time.perf_counter() - t0
                hf_tokens += y.shape[1] - x.shape[1]
        report["hf"] = {
            "prompts": hf_prompts,
            "seconds": hf_s,
            "output_tokens": hf_tokens,
            "tokens_per_s": hf_tokens / hf_s,
        }
        for run in runs:
            run["ratio_vs_hf"] = run["tokens_per_s"] / report["hf"]["tokens_per_s"]

    table = Table(title=f"offline throughput: {model}, {max_tokens} new tokens per prompt, greedy")
    for col in ("engine", "prompts", "output tokens", "seconds", "output tokens/s"):
        table.add_column(col, justify="right")
    table.add_column("vs HF", justify="right")
    for e in runs:
        ratio = f"{e['ratio_vs_hf']:.1f}x" if "ratio_vs_hf" in e else "-"
        table.add_row(
            f"ember {e['dtype']} (one batch)",
            str(num_prompts),
            str(e["output_tokens"]),
            f"{e['seconds']:.1f}",
            f"{e['tokens_per_s']:.1f}",
            ratio,
        )
    if "hf" in report:
        h = report["hf"]
        table.add_row(
            "HF transformers float32 (one at a time)",
            str(h["prompts"]),
            str(h["output_tokens"]),
            f"{h['seconds']:.1f}",
            f"{h['tokens_per_s']:.1f}",
            "1.0x",
        )
    console.print(table)
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    return report
