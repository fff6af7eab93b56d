"""The backends' ops as torch.library custom ops, `torch.ops.ember.*`: the public, compilable entry points.

Each op runs the implementation the registry picks for its inputs (device, dtype, quantization), and has
a fake (meta) implementation so torch.compile can trace through it without running it. Eager model code
calls the backend's bound functions instead: a custom op costs several microseconds of dispatch per call,
more than 1% of a decode step at ~120 calls (benchmarks/BACKENDS.md).
"""

from __future__ import annotations

import torch

from ember.backends.registry import select_backend
from ember.models.attention import AttentionMetadata


@torch.library.custom_op("ember::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H], weight [H] -> [T, H]."""
    return select_backend(x.device, x.dtype).rms_norm(x, weight, eps)


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("ember::rope_write_kv", mutates_args=("k_cache", "v_cache"))
def rope_write_kv(
    qkv: torch.Tensor,  # [T, (Hq + 2 * Hkv) * D]
    cos: torch.Tensor,  # [T, D]
    sin: torch.Tensor,
    slots: torch.Tensor,  # [T] int64
    k_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, D]: written
    v_cache: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """-> rotated q [T, Hq, D]."""
    backend = select_backend(qkv.device, qkv.dtype)
    return backend.rope_write_kv(qkv, cos, sin, slots, k_cache, v_cache, num_heads)


@rope_write_kv.register_fake
def _(qkv, cos, sin, slots, k_cache, v_cache, num_heads):
    return qkv.new_empty(qkv.shape[0], num_heads, k_cache.shape[-1])


@torch.library.custom_op("ember::decode_attention", mutates_args=("out",))
def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int64, padded with 0
    context_lens: torch.Tensor,  # [B] int64
    window: int | None,
    scale: float,
    out: torch.Tensor,  # [B, Hq, D]: written
) -> None:
    meta = AttentionMetadata(
        slot_mapping=context_lens.new_empty(0),
        num_decode_tokens=q.shape[0],
        decode_block_tables=block_tables,
        decode_context_lens=context_lens,
        prefills=[],
        block_size=k_cache.shape[2],
        sliding_window=window,
        max_decode_len=int(context_lens.max()) if context_lens.numel() else 0,
    )
    select_backend(q.device, q.dtype).decode_attention(q, k_cache, v_cache, meta, scale, out)


@decode_attention.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, window, scale, out) -> None:
    return None


@torch.library.custom_op("ember::block_linear", mutates_args=())
def block_linear(
    x: torch.Tensor,  # [M, K] float32
    codes: torch.Tensor,  # q4_1: [N, K / 2] uint8; q8_0: [N, K] int8
    d: torch.Tensor,  # [N, K / 32] float16 bits (int16)
    m: torch.Tensor | None,
    bias: torch.Tensor | None,  # [N]
    fmt: str,
) -> torch.Tensor:
    """-> [M, N] float32; binds the weight on every call (the model binds once, see BlockQuantLinear)."""
    return select_backend(x.device, x.dtype, fmt).block_linear(fmt, codes, d, m, bias)(x.contiguous())


@block_linear.register_fake
def _(x, codes, d, m, bias, fmt):
    return x.new_empty(x.shape[0], codes.shape[0])
