"""Build a model from an HF-layout directory: config, weights, device and dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from ember.backends import REFERENCE, select_backend
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
    training: bool = False,
) -> LlamaForCausalLM:
    """training: for ember.tune, the reference backend's autograd-capable ops and plain nn.Linear weights
    (no packing), left in train mode."""
    # The backend first: it refuses a quantization no kernel here computes, before any weight is read.
    backend = REFERENCE if training else select_backend(device, dtype, quantization)
    # Construct without initialising (the checkpoint overwrites every parameter), then load.
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions, backend)
    model = model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_hf_state_dict(load_state_dict(Path(path), dtype=torch.float32))
    model.rope.to(device)
    if quantization is not None:  # from the fp32 weights; the quantized buffers are bf16 already
        quantize_model(model, quantization, backend)
    model = model.to(device=device, dtype=dtype)
    if training:
        return model.train()
    model.eval()
    if device.type == "cpu" and dtype == torch.float32 and quantization is None and packing_available():
        pack_model(model)  # oneDNN's matmul on reordered weights: faster at every batch size here
    return model
