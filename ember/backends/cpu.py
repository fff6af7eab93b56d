"""ember's C kernels (ember/kernels/cpu.c) as a backend: float32 on an x86-64 CPU with AVX2, FMA and F16C
(the block-quantized linears in AVX-512 VNNI where the CPU has it: ember.kernels.cpu.isa).

Only decode attention runs here; prefill chunks stay on the reference's SDPA, which is already a good
many-row kernel. The KV cache is the reference layout, in float32 and contiguous, which the kernels read
in place.
"""

from __future__ import annotations

import torch

from ember.backends.base import Backend, BoundLinear
from ember.kernels import cpu as kernels
from ember.models.attention import AttentionMetadata


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,  # [B, Hq, D], contiguous
) -> None:
    kernels.decode_attention(
        q.contiguous(),
        k_cache,
        v_cache,
        meta.decode_block_tables,
        meta.decode_context_lens,
        meta.sliding_window,
        scale,
        out,
    )


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend.add_rms_norm's order, (normed, summed), on the kernel's one pass; new tensors."""
    summed, normed = kernels.add_rms_norm(residual, x, weight, eps)
    return normed, summed


def block_linear(
    fmt: str, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, bias: torch.Tensor | None
) -> BoundLinear:
    return kernels.QuantLinear(fmt, codes, d, m, bias)


class CpuBackend(Backend):
    name = "cpu"
    rms_norm = staticmethod(kernels.rms_norm)  # the kernel itself: nothing between the module and C
    add_rms_norm = staticmethod(add_rms_norm)  # the residual add fused into the norm
    silu_and_mul = staticmethod(kernels.silu_mul)
    rope_write_kv = staticmethod(kernels.rope_write_kv)  # qkv: a projection's output, unit column stride
    decode_attention = staticmethod(decode_attention)
    block_linear = staticmethod(block_linear)

    def kv_cache_layout(self, cfg, block_size: int, dtype: torch.dtype):
        if dtype != torch.float32:
            raise ValueError(f"the CPU kernels read a float32 KV cache (got {dtype})")
        return super().kv_cache_layout(cfg, block_size, dtype)


def unavailable_reason() -> str | None:
    """None when this backend runs here; else why not (no AVX2, no C compiler, a failed build)."""
    return kernels.unavailable_reason()
