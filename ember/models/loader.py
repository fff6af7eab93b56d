"""Build a model from an HF-layout directory: config, weights, device and dtype."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ember.kernels import cpu as cpu_kernels
from ember.models.config import ModelConfig
from ember.models.llama import LlamaForCausalLM
from ember.models.packed import pack_model, packing_available
from ember.models.quant import quantize_model
from ember.models.weights import load_state_dict


def load_model(
    path: str | Path,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int | None = None,
    quantization: str | None = None,
) -> LlamaForCausalLM:
    # Construct without initialising (the checkpoint overwrites every parameter), then load.
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions)
    model = model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_hf_state_dict(load_state_dict(Path(path), dtype=torch.float32))
    model.rope.to(device)
    if quantization is not None:  # from the fp32 weights; the quantized buffers are bf16 already
        quantize_model(model, quantization)
    model = model.to(device=device, dtype=dtype).eval()
    if device.type == "cpu" and dtype == torch.float32:
        if quantization is None and packing_available():
            pack_model(model)  # oneDNN's matmul on reordered weights: faster at every batch size here
        if os.environ.get("EMBER_CPU_KERNELS", "1") != "0" and cpu_kernels.available():
            model.use_cpu_kernels()
    return model
