"""Shared fixtures: the real default model (converted once) and small random-weight models in HF layout."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from ember.models.catalog import DEFAULT_MODEL, resolve_model

# Servers the tests start keep their store (files, responses, traces...) in a directory of this run, never
# in the user's own data directory; a test that needs its own store passes --data-dir.
os.environ.setdefault("EMBER_DATA_DIR", tempfile.mkdtemp(prefix="ember-test-data-"))

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return resolve_model(DEFAULT_MODEL)


def build_random_model(root: Path, kind: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A small random-weight model saved in HF layout, with the default model's tokenizer.

    Weights are drawn wider than HF's default init so that logits are well separated and greedy choices
    are not decided by float rounding.
    """
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        initializer_range=0.15,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama-gqa":
        # GQA with 2 KV heads (group of 2), untied head, Llama-3 rope scaling.
        cfg = LlamaConfig(
            **common,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=50000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        )
        model_cls = LlamaForCausalLM
    elif kind == "qwen2-bias":
        cfg = Qwen2Config(**common, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1000000.0)
        model_cls = Qwen2ForCausalLM
    elif kind == "mistral-window":
        # A sliding window far shorter than the prompts, so the window decides what attention sees.
        cfg = MistralConfig(**common, num_key_value_heads=1, tie_word_embeddings=False, sliding_window=24)
        model_cls = MistralForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    if kind == "qwen2-bias":
        with torch.no_grad():  # HF inits biases to zero; make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    path = root / kind
    model.save_pretrained(path, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def random_model_dirs(tmp_path_factory, default_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("random-models")
    kinds = ("llama-gqa", "qwen2-bias", "mistral-window")
    return {k: build_random_model(root, k, default_model_dir) for k in kinds}


@pytest.fixture(scope="session")
def default_llm(default_model_dir):
    from ember import LLM

    return LLM(model=str(default_model_dir), kv_cache_memory="512MiB")


@pytest.fixture(scope="session")
def random_llm(random_model_dirs):
    from ember import LLM

    return LLM(model=str(random_model_dirs["llama-gqa"]), kv_cache_memory="64MiB")
