"""The CUDA backend: ember's Triton kernels (ember.kernels.triton) on a GPU, in bfloat16 (or any float
dtype), over the reference KV layout in device memory.

Every hot op of a step is a kernel here: RMSNorm fused with the residual add before it, RoPE fused with
the KV write, paged decode attention split over the context, all prefill chunks of a step in one launch,
SwiGLU's activation, and the multi-adapter LoRA delta. The projections stay cuBLAS matmuls (torch's
F.linear), which already run at the tensor cores' rate. None of the ops reads a value back to the host,
so the decode step can be captured in a CUDA graph (ember.engine.cuda_graphs).

The same kernels run on CPU tensors under TRITON_INTERPRET=1, which is how the tests exercise this
backend without a GPU.
"""

from __future__ import annotations

import torch

from ember.backends.base import Backend, KVCacheLayout
from ember.kernels.triton import attention, cache, lora, norm
from ember.models.attention import AttentionMetadata
from ember.models.config import ModelConfig


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,  # [B, Hq, D]
) -> None:
    attention.decode_attention(
        q,
        k_cache,
        v_cache,
        meta.decode_block_tables,
        meta.decode_context_lens,
        scale,
        out,
        meta.sliding_window,
    )


def prefill_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
) -> None:
    p = meta.prefill_batch
    attention.prefill_attention(
        q,
        k_cache,
        v_cache,
        p.query_starts,
        p.query_lens,
        p.context_lens,
        p.block_tables,
        p.max_query_len,
        scale,
        out,
        meta.sliding_window,
    )


def rope_write_kv(qkv, cos, sin, slots, k_cache, v_cache, num_heads: int) -> torch.Tensor:
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return cache.rope_write_kv(qkv, cos, sin, slots, k_cache, v_cache, num_heads)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return norm.add_rms_norm(x, residual, weight, eps), residual


class CudaBackend(Backend):
    name = "cuda"
    rms_norm = staticmethod(norm.rms_norm)
    add_rms_norm = staticmethod(add_rms_norm)
    silu_and_mul = staticmethod(norm.silu_and_mul)
    rope_write_kv = staticmethod(rope_write_kv)
    decode_attention = staticmethod(decode_attention)
    prefill_attention = staticmethod(prefill_attention)
    lora_delta = staticmethod(lora.lora_delta)

    def kv_cache_layout(self, cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> KVCacheLayout:
        # The kernels tile a KV block as one [block_size, D] dot operand: both powers of two, 16 at least.
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"the CUDA kernels need --block-size 16, 32, 64... (got {block_size})")
        if cfg.head_dim & (cfg.head_dim - 1):
            raise ValueError(f"the CUDA kernels need a power-of-two head_dim (the model has {cfg.head_dim})")
        return super().kv_cache_layout(cfg, block_size, dtype)
